"""Instance store: names, path safety, manifests and their atomic replacement."""

import json
import os

import pytest

from vbdfs.store import (DiskSpec, InvalidName, ManifestError, Store, StoreError, UnsafePath,
                         check_instance_name, disk_index, disk_name)
from vbdfs.store import paths
from vbdfs import config

MiB = 1 << 20


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "../x", ".hidden", "", "x\0y",
                                  "has space", "x" * 201, "semi;colon"])
def test_bad_instance_names(name):
    with pytest.raises(InvalidName):
        check_instance_name(name)


@pytest.mark.parametrize("name", ["web1", "db.example.com", "a-b_c+d", "x" * 200])
def test_good_instance_names(name):
    assert check_instance_name(name) == name


def test_disk_names_by_index():
    assert [disk_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == \
        ["sda", "sdb", "sdz", "sdaa", "sdab", "sdzz", "sdaaa"]
    for i in range(800):
        assert disk_index(disk_name(i)) == i
    with pytest.raises(InvalidName):
        disk_index("sdA")


def test_create_load_remove(store):
    m = store.create("web", [DiskSpec(5 << 30), DiskSpec(MiB, driver="blktap")],
                     os_name="debootstrap", primary="node1", secondary="node2")
    assert store.instances() == ["web"]
    again = store.load("web")
    assert again == m
    assert [d.name for d in again.disks] == ["sda", "sdb"]
    sda = again.disks[0]
    assert sda.logical_id == ["loop", "raw", os.path.join(store.root, "web", "sda")]
    assert os.stat(sda.path).st_blocks == 0
    assert os.path.getsize(sda.path) == 5 << 30
    raw = json.load(open(store.manifest_path("web")))
    assert raw["disks"][1]["driver"] == "blktap" and raw["nodes"]["secondary"] == "node2"
    store.remove("web")
    assert store.instances() == []
    assert os.listdir(store.root) == [".vbdfs"]


def test_create_twice_and_bad_input_change_nothing(store):
    store.create("web", [DiskSpec(MiB)])
    before = open(store.manifest_path("web")).read()
    with pytest.raises(StoreError, match="already exists"):
        store.create("web", [DiskSpec(MiB)])
    assert open(store.manifest_path("web")).read() == before
    with pytest.raises(StoreError, match="size must be positive"):
        store.create("db", [DiskSpec(MiB), DiskSpec(0)])
    with pytest.raises(InvalidName):
        store.create("../evil", [DiskSpec(MiB)])
    assert sorted(os.listdir(store.root)) == [".vbdfs", "web"]


def test_failed_create_leaves_nothing(store, monkeypatch):
    from vbdfs.store import store as store_mod
    calls = []

    def failing_create(path, fmt, size):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        from vbdfs.images import create_image
        return create_image(path, fmt, size)
    monkeypatch.setattr(store_mod, "create_image", failing_create)
    with pytest.raises(StoreError, match="No space left"):
        store.create("web", [DiskSpec(MiB), DiskSpec(MiB)])
    assert os.listdir(store.root) == [".vbdfs"]


def test_manifest_save_is_atomic_replace(store):
    m = store.create("web", [DiskSpec(MiB)])
    ino = os.stat(store.manifest_path("web")).st_ino
    m.os = "changed"
    with store.lock("web"):
        store.save(m)
    assert os.stat(store.manifest_path("web")).st_ino != ino   # renamed over, not rewritten
    assert store.load("web").os == "changed"
    assert sorted(os.listdir(store.instance_dir("web"))) == ["manifest.json", "sda"]


@pytest.mark.parametrize("patch, message", [
    (lambda d: d.update(version=99), "unsupported manifest version"),
    (lambda d: d.update(name="other"), "expected 'web'"),
    (lambda d: d["disks"][0].update(index=3), "indices must be"),
    (lambda d: d["disks"][0].update(format="vmdk"), "unknown format"),
    (lambda d: d["disks"][0].update(size=-1), "bad size"),
    (lambda d: d["disks"][0].update(logical_id=["loop", "raw", "/etc/shadow"]), "is not"),
    (lambda d: d["disks"][0].update(logical_id=["loop", "raw", "/srv/x/../web/sda"]), "'..'"),
    (lambda d: d["disks"][0].update(logical_id=["loop", "raw", "/elsewhere/web/sda"]),
     "lists no allowed directory"),
])
def test_hostile_manifests_are_refused(store, patch, message):
    store.create("web", [DiskSpec(MiB)])
    raw = json.load(open(store.manifest_path("web")))
    patch(raw)
    open(store.manifest_path("web"), "w").write(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        store.load("web")


def test_garbage_manifest(store):
    store.create("web", [DiskSpec(MiB)])
    open(store.manifest_path("web"), "wb").write(b"\xff\x00not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        store.load("web")


def test_whitelist_rules(tmp_path):
    wl = tmp_path / "wl"
    with pytest.raises(UnsafePath, match="lists no allowed"):
        paths.check_custom_dir("/srv/data/x", str(wl))       # missing file refuses all
    wl.write_text("# comment\n/srv/data\nrelative/dir\n/srv/other/  # trailing\n\n")
    assert paths.read_whitelist(str(wl)) == ["/srv/data", "/srv/other"]
    assert paths.check_custom_dir("/srv/data/x", str(wl)) == "/srv/data/x"
    assert paths.check_custom_dir("/srv/other/a/b/", str(wl)) == "/srv/other/a/b"
    for bad, why in [("/srv/data", "strictly below"), ("/srv/database/x", "strictly below"),
                     ("/srv/data/../../etc", "'..'"), ("srv/data/x", "not absolute"),
                     ("/etc/x", "forbidden"), ("/usr/lib/x", "forbidden"),
                     ("/lib64/x", "forbidden"), ("/usr/local/sbin/x", "forbidden")]:
        with pytest.raises(UnsafePath, match=why):
            paths.check_custom_dir(bad, str(wl))


def test_custom_directory(store, tmp_path):
    data = tmp_path / "nas"
    (data / "vms").mkdir(parents=True)
    open(store.whitelist_file, "w").write(f"{data}\n")
    m = store.create("web", [DiskSpec(MiB)], directory=str(data / "vms"))
    assert m.disks[0].path == str(data / "vms" / "web" / "sda")
    assert store.load("web") == m
    store.remove("web")
    assert os.listdir(data / "vms") == []
    with pytest.raises(UnsafePath):
        store.create("db", [DiskSpec(MiB)], directory="/etc/vbdfs")
    assert store.instances() == []


def test_config_file_and_env(tmp_path):
    f = tmp_path / "vbdfs.toml"
    f.write_text('store = "/s"\nnode = "n1"\n')
    cfg = config.load(str(f), use_env=True, env={"VBDFS_NODE": "n2"})
    assert (cfg.store, cfg.mountpoint, cfg.node) == ("/s", "/run/vbdfs", "n2")
    assert config.load(str(f)).node == "n1"
    f.write_text('stor = "/s"\n')
    with pytest.raises(config.ConfigError, match="unknown setting 'stor'"):
        config.load(str(f))
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "missing.toml"))


def test_symlinks_cannot_lead_out_of_the_whitelist(store, tmp_path):
    nas = tmp_path / "nas"
    nas.mkdir()
    open(store.whitelist_file, "w").write(f"{nas}\n")
    (nas / "evil").symlink_to("/etc")
    with pytest.raises(UnsafePath, match="leads through a symlink to /etc"):
        store.create("web", [DiskSpec(MiB)], directory=str(nas / "evil"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (nas / "out").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="not strictly below"):
        store.create("web", [DiskSpec(MiB)], directory=str(nas / "out"))
    assert store.instances() == [] and not os.path.exists("/etc/web")


def test_symlinked_instance_dir_or_disk_is_refused(store, tmp_path):
    store.create("web", [DiskSpec(MiB)])
    target = tmp_path / "other"
    target.mkdir()
    disk = os.path.join(store.root, "web", "sda")
    os.rename(disk, target / "sda")
    os.symlink(target / "sda", disk)
    with pytest.raises(ManifestError, match="is a symlink"):
        store.load("web")


def test_store_given_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    via_link = Store(str(tmp_path / "link"), str(tmp_path / "wl"))
    via_link.create("web", [DiskSpec(MiB)])
    assert via_link.load("web").disks[0].path == str(real / "web" / "sda")
    Store(str(real), str(tmp_path / "wl")).remove("web")     # the other spelling manages it
