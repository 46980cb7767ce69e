"""Store.adopt/rename/grow/remove(check) and size parsing, in-process."""

import os

import pytest

from conftest import GiB, MiB
from vbdfs.store import (DiskSpec, ManifestError, SizeError, StoreError, parse_growth,
                         parse_size)
from vbdfs.store import store as store_mod


@pytest.mark.parametrize("text, size", [("5G", 5 * GiB), ("512M", 512 * MiB), ("1T", 1 << 40),
                                        ("100", 100 * MiB), ("1.5G", 1536 * MiB),
                                        ("0.1", MiB), ("2gib", 2 * GiB), ("3 MB", 3 * MiB),
                                        ("1.1G", 1127 * MiB)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, says", [("5X", "unknown unit 'X'"), ("-1G", "negative"),
                                        ("0", "zero"), ("0.0G", "zero"), ("", "not a number"),
                                        ("1e3", "not a number"), ("G", "not a number"),
                                        ("5K", "unknown unit 'K'"), ("1.G", "not a number"),
                                        (f"{1 << 50}T", "too large")])
def test_parse_size_refuses(text, says):
    with pytest.raises(SizeError, match=f"size '{text}'.*{says}" if text else says):
        parse_size(text)


def test_parse_growth():
    assert parse_growth("+1G") == parse_growth("1G") == GiB
    with pytest.raises(SizeError, match="negative: disks can only grow"):
        parse_growth("-1G")


@pytest.fixture
def custom(store, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "vms").mkdir(parents=True)
    open(store.whitelist_file, "w").write(f"{allowed}\n")
    return str(allowed / "vms")


def tree(*roots):
    out = set()
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            if ".vbdfs" in dirs:
                dirs.remove(".vbdfs")
            out |= {os.path.join(dirpath, n) for n in dirs + files}
    return out


def test_rename_failure_at_commit_rolls_back(store, custom, monkeypatch):
    store.create("db", [DiskSpec(MiB)], directory=custom)
    before, manifest = tree(store.root, custom), open(store.manifest_path("db")).read()
    real_rename = os.rename

    def failing(src, dst):
        if dst == os.path.join(store.root, "db2"):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)
    monkeypatch.setattr(store_mod.os, "rename", failing)
    with pytest.raises(StoreError, match="cannot rename db to db2: .*Input/output"):
        store.rename("db", "db2")
    monkeypatch.undo()
    # The custom directory was moved back, the journal is gone, the manifest untouched.
    assert tree(store.root, custom) == before
    assert open(store.manifest_path("db")).read() == manifest
    assert store.load("db").disks[0].path == os.path.join(custom, "db", "sda")


def test_interrupted_rename_is_explained(store):
    store.create("web", [DiskSpec(MiB)])
    # Simulate a crash after the directory rename, before the journal replaced the manifest.
    m = store.load("web")
    m2 = store_mod.Manifest(name="www", disks=[
        m.disks[0].replace(path=os.path.join(store.root, "www", "sda"))])
    store_mod.write_atomic(os.path.join(store.instance_dir("web"), store_mod.RENAME_JOURNAL),
                           m2.to_json().encode())
    os.rename(store.instance_dir("web"), store.instance_dir("www"))
    with pytest.raises(store_mod.ManifestError, match="a rename was interrupted"):
        store.load("www")


def test_grow_image_first_then_manifest(store, monkeypatch):
    store.create("web", [DiskSpec(MiB)])
    path = store.load("web").disks[0].path
    monkeypatch.setattr(store_mod.Store, "save", lambda self, m: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(StoreError, match="instance web disk sda: .*No space left"):
        store.grow("web", "sda", new_size=2 * MiB)
    monkeypatch.undo()
    # The crash window: image larger than the manifest says (the daemon serves the image's size).
    assert os.path.getsize(path) == 2 * MiB and store.load("web").disks[0].size == MiB
    store.grow("web", "sda", new_size=2 * MiB)      # finishing it again works
    assert store.load("web").disks[0].size == 2 * MiB


def test_remove_check_runs_under_lock_and_refuses(store):
    store.create("web", [DiskSpec(MiB)])
    seen = []

    def check(m):
        seen.append(m.name)
        raise StoreError("busy")
    with pytest.raises(StoreError, match="busy"):
        store.remove("web", check=check)
    assert seen == ["web"] and store.instances() == ["web"]


def test_adopt_leaves_files_alone_on_error(store):
    d = store.instance_dir("web")
    os.mkdir(d)
    with open(os.path.join(d, "sda"), "wb") as f:
        f.truncate(MiB)
    os.link(os.path.join(d, "sda"), os.path.join(store.root, "elsewhere"))
    with pytest.raises(StoreError, match="has 2 hard links"):
        store.adopt("web")
    assert os.listdir(d) == ["sda"] and os.path.getsize(os.path.join(d, "sda")) == MiB
    os.unlink(os.path.join(store.root, "elsewhere"))
    m = store.adopt("web", driver="qdisk")
    assert [(x.format, x.driver, x.size) for x in m.disks] == [("raw", "qdisk", MiB)]


@pytest.mark.parametrize("version, says", [
    (1, "cannot reuse .* as qcow: .*cluster_bits 0 out of range"),   # probed as qcow (v1)
    (4, "qcow version 4 image; only versions 1 .*2 and 3"),
])
def test_bad_or_unknown_qcow_is_refused_at_adoption(store, version, says):
    d = store.instance_dir("web")
    os.mkdir(d)
    with open(os.path.join(d, "sda"), "wb") as f:
        f.write(b"QFI\xfb" + version.to_bytes(4, "big") + bytes(504))
    with pytest.raises(StoreError, match=says):
        store.adopt("web")
    assert store.instances() == []


def test_lock_many_is_ordered(store):
    with store.lock_many("b", "a", "b"):
        with pytest.raises(store_mod.LockBusy, match="instance a is locked"):
            with store.lock("a", wait=False):
                pass


def _converted(store, name="web", fmt="qcow2"):
    """The manifest a convert of sda to fmt writes as its journal."""
    m = store.load(name)
    return m.replace(disks=[m.disks[0].replace(format=fmt)])


def test_convert_killed_before_the_swap(store):
    """Journal written, copy still beside the disk: the disk is as it was, whatever its bytes say."""
    from vbdfs.store.store import CONVERT_JOURNAL
    store.create("web", [DiskSpec(MiB)])
    sda = store.load("web").disks[0].path
    with open(sda, "r+b") as f:
        f.write(b"QFI\xfb")                      # a guest wrote a qcow2 magic into its raw disk
    tmp = os.path.join(os.path.dirname(sda), ".sda.convert-4242")
    open(tmp, "wb").close()
    journal = os.path.join(store.instance_dir("web"), CONVERT_JOURNAL)
    text = _converted(store).to_json()
    open(journal, "w").write(text)
    with pytest.raises(ManifestError, match=f"not swapped yet .*delete {journal} and {tmp}"):
        store.load("web")


def test_convert_killed_after_the_swap(store):
    from vbdfs.store.store import CONVERT_JOURNAL
    store.create("web", [DiskSpec(MiB)])
    journal = os.path.join(store.instance_dir("web"), CONVERT_JOURNAL)
    text = _converted(store).to_json()
    open(journal, "w").write(text)
    with pytest.raises(ManifestError, match="converted image is in place: move"):
        store.load("web")


def test_remove_after_a_convert_killed_mid_copy_leaves_nothing(store):
    store.create("web", [DiskSpec(MiB)])
    sda = store.load("web").disks[0].path
    open(os.path.join(os.path.dirname(sda), ".sda.convert-4242"), "wb").write(b"x" * 4096)
    open(os.path.join(store.instance_dir("web"), ".manifest.json.tmp.4242"), "w").write("{")
    store.remove("web")
    assert os.listdir(store.root) == [".vbdfs"]
    store.create("web", [DiskSpec(MiB)])              # the name is usable again


@pytest.mark.parametrize("custom", [False, True], ids=["store", "custom_dir"])
def test_remove_takes_the_external_data_files_only_its_disks_use(store, tmp_path, custom):
    """An adopted qcow2 disk's external data file, next to it, goes with the
    instance (it used to stay, with its directory). One that a disk of
    another instance names too stays, as does that instance."""
    import subprocess
    if custom:
        nas = tmp_path / "nas" / "vms"
        nas.mkdir(parents=True)
        open(store.whitelist_file, "w").write(f"{nas.parent}\n")
        vm = nas / "vm"
    else:
        nas, vm = None, os.path.join(store.root, "vm")
    os.mkdir(vm, 0o700)
    other = os.path.join(os.path.dirname(vm), "other")      # below the same root as vm
    os.mkdir(other, 0o700)

    def qemu_img(*args, cwd):
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=cwd)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=sda.data", "sda", "8M", cwd=vm)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=shared.data", "sdb", "8M", cwd=vm)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=sda.data", "sda", "8M", cwd=other)
    qemu_img("amend", "-o", "data_file=../vm/shared.data", "sda", cwd=other)
    os.unlink(os.path.join(other, "sda.data"))
    store.adopt("vm", directory=str(nas) if custom else None)
    store.adopt("other", directory=str(nas) if custom else None)

    store.remove("vm")
    assert sorted(os.listdir(vm)) == ["shared.data"]          # other's disk names it
    assert store.instances() == ["other"]
    with store.open_disk(store.load("other").disks[0], read_only=True) as img:
        assert img.read(0, 4096) == bytes(4096)


def test_rename_killed_after_moving_a_data_directory(store, tmp_path):
    """The old manifest's disks are gone: load refuses with a way out, remove orphans nothing."""
    from vbdfs.store.store import RENAME_JOURNAL
    nas = tmp_path / "nas" / "vms"
    nas.mkdir(parents=True)
    open(store.whitelist_file, "w").write(f"{nas.parent}\n")
    m = store.create("rn", [DiskSpec(MiB)], directory=str(nas))
    journal = os.path.join(store.instance_dir("rn"), RENAME_JOURNAL)
    open(journal, "w").write(m.to_json().replace('"rn"', '"rn2"').replace("/rn/", "/rn2/"))
    os.rename(nas / "rn", nas / "rn2")
    with pytest.raises(ManifestError, match="rename of this instance was interrupted"):
        store.load("rn")
    with pytest.raises(ManifestError):
        store.remove("rn")
    assert os.path.exists(nas / "rn2" / "sda")
