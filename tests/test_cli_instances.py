"""vbdctl add, info, remove, grow, rename, xen-config: lifecycle, path safety, bad input.

Every refusal is checked twice: the exit status and message, and that the
store (and any custom directory) is exactly as before. Of STORE/.vbdfs only
the attachment records are compared: an attempt may create its instance's
(empty) lock file and the state directories, which is harmless and by design.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import GiB, MiB



@pytest.fixture
def env(store, tmp_path):
    """Whitelist allowing tmp/allowed/*, and a vbdctl bound to the store."""
    allowed = tmp_path / "allowed"
    (allowed / "vms").mkdir(parents=True)
    with open(store.whitelist_file, "w") as f:
        f.write(f"# test whitelist\n{allowed}\nrelative/ignored\n")

    def run(*args, check=None):
        r = subprocess.run([sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                            "--mountpoint", str(tmp_path / "mnt"),
                            "--whitelist", store.whitelist_file, *args],
                           capture_output=True, text=True, timeout=120)
        if check is not None:
            assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
        return r
    run.allowed = str(allowed / "vms")
    return run


def snapshot(*roots):
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath == root and ".vbdfs" in dirnames:
                dirnames.remove(".vbdfs")
                for rec in os.listdir(os.path.join(root, ".vbdfs", "attachments")) \
                        if os.path.isdir(os.path.join(root, ".vbdfs", "attachments")) else []:
                    p = os.path.join(root, ".vbdfs", "attachments", rec)
                    out[p] = open(p, "rb").read()
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                content = open(p, "rb").read() if n.endswith(".json") else None
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return out


def qemu_img_info(path):
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)


# --- add, info, list ------------------------------------------------------------
def test_add_raw_and_qcow2_info_list(env, store):
    r = env("add", "-t", "file", "--disk", "0:size=5G", "--disk", "1:size=10G,format=qcow2",
            "-n", "node1:node2", "-o", "debootstrap+default", "web", check=0)
    assert "sda 5G raw" in r.stdout and "sdb 10G qcow2" in r.stdout
    info = json.loads(env("info", "web", "--output", "json", check=0).stdout)
    assert (info["name"], info["os"], info["primary"], info["secondary"]) == \
        ("web", "debootstrap+default", "node1", "node2")
    sda, sdb = info["disks"]
    assert (sda["disk"], sda["format"], sda["driver"], sda["size"]) == ("sda", "raw", "loop", 5 * GiB)
    assert (sdb["disk"], sdb["format"], sdb["size"]) == ("sdb", "qcow2", 10 * GiB)
    assert sda["path"] == os.path.join(store.root, "web", "sda")
    assert sda["allocated"] == 0 and sda["attachment"] is None     # sparse
    assert os.path.getsize(sda["path"]) == 5 * GiB
    qi = qemu_img_info(sdb["path"])
    assert (qi["format"], qi["virtual-size"]) == ("qcow2", 10 * GiB)
    text = env("info", "web", check=0).stdout
    assert "sda" in text and "qcow2" in text and "5G" in text
    items = json.loads(env("list", "--output", "json", check=0).stdout)
    assert [(i["name"], i["disks"], i["size"]) for i in items] == [("web", 2, 15 * GiB)]


def test_add_defaults_from_template_and_bare_mib(env, store):
    env("add", "-t", "file,driver=qdisk,format=qcow2", "--disk", "0:size=64",
        "--disk", "1:size=1.5,format=raw,driver=blktap", "db", check=0)
    m = store.load("db")
    assert [(d.format, d.driver, d.size) for d in m.disks] == \
        [("qcow2", "qdisk", 64 * MiB), ("raw", "blktap", 2 * MiB)]   # rounded up to a MiB
    assert m.primary == socket.gethostname() and m.secondary == ""   # default: this node


def test_add_in_whitelisted_custom_path(env, store):
    r = env("add", "-t", f"file:path={env.allowed}", "--disk", "0:size=8M", "web", check=0)
    # A warning from the store, logged as vbdctl set logging up (vbdfs/log.py
    # loads logging at the first message): the prefix, once, on stderr.
    assert r.stderr == (f"vbdctl: {store.whitelist_file}:3: ignoring relative path "
                        "'relative/ignored'\n"), r.stderr
    m = store.load("web")
    assert m.disks[0].path == os.path.join(env.allowed, "web", "sda")
    assert os.listdir(store.instance_dir("web")) == ["manifest.json"]
    env("remove", "web", check=0)
    assert os.listdir(env.allowed) == [] and store.instances() == []


@pytest.mark.parametrize("size, says", [("5X", "unknown unit 'X'"), ("-1G", "'-1G' is negative"),
                                        ("0", "'0' is zero"), ("abc", "'abc' is not a number"),
                                        ("1G5", "'1G5' is not a number"), ("", "bad option")])
def test_bad_sizes_are_usage_errors(env, store, size, says):
    before = snapshot(store.root)
    r = env("add", "--disk", "0:size=1G", "--disk", f"1:size={size}", "web")
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert snapshot(store.root) == before


@pytest.mark.parametrize("disks, says", [
    (["0:size=1G", "0:size=2G"], "disk index 0 is given twice"),
    (["0:size=1G", "2:size=1G"], "1 missing"),
    (["1:size=1G"], "0 missing"),
    ([], "at least one --disk"),
    (["0"], "disk 0: no size"),
    (["0:size=1G,format=vmdk"], "unknown format 'vmdk'"),
    (["0:size=1G,colour=red"], "bad option 'colour=red'"),
    (["a:size=1G"], "INDEX"),
])
def test_bad_disk_lists_are_usage_errors(env, store, disks, says):
    before = snapshot(store.root)
    r = env("add", *[a for d in disks for a in ("--disk", d)], "web")
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert snapshot(store.root) == before


@pytest.mark.parametrize("name, says", [("a/b", "contains '/'"), ("..", "contains '..'"),
                                        ("a..b", "contains '..'"), ("has space", "characters"),
                                        ("x" * 300, "300 characters")])
def test_bad_instance_names(env, store, name, says):
    before = snapshot(store.root)
    r = env("add", "--disk", "0:size=1M", name)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert snapshot(store.root) == before


@pytest.mark.parametrize("path, says", [
    ("/etc/vbdfs-test", "under the forbidden directory /etc"),
    ("/usr/lib/vbdfs-test", "forbidden directory /usr/lib"),
    ("/var/tmp", "not strictly below any directory listed"),
    ("{allowed}/../..", "contains '..'"),
    ("relative/ignored/x", "not absolute"),
    ("{top}", "not strictly below"),          # the whitelisted directory itself
])
def test_paths_outside_whitelist_refused(env, store, tmp_path, path, says):
    path = path.format(allowed=env.allowed, top=tmp_path / "allowed")
    before = snapshot(store.root, tmp_path / "allowed")
    r = env("add", "-t", f"file:path={path}", "--disk", "0:size=1M", "web")
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert snapshot(store.root, tmp_path / "allowed") == before


@pytest.mark.parametrize("content", [None, "", "# only comments\nrelative/path\n"])
def test_missing_or_empty_whitelist_refuses_custom_paths(env, store, content):
    os.unlink(store.whitelist_file)
    if content is not None:
        open(store.whitelist_file, "w").write(content)
    r = env("add", "-t", f"file:path={env.allowed}", "--disk", "0:size=1M", "web")
    assert r.returncode == 1 and "lists no allowed directory" in r.stderr
    assert store.instances() == [] and os.listdir(env.allowed) == []
    env("add", "--disk", "0:size=1M", "web", check=0)   # the store itself needs no whitelist


def test_add_existing_instance_changes_nothing(env, store):
    env("add", "--disk", "0:size=1M", "web", check=0)
    before = snapshot(store.root)
    r = env("add", "--disk", "0:size=2M", "web")
    assert r.returncode == 1 and "instance web already exists" in r.stderr
    assert snapshot(store.root) == before


def test_failed_add_leaves_nothing(env, store):
    # The second disk cannot be created (a 2**62-byte raw file is past the file-size
    # limit of ext4 and tmpfs: EFBIG after the file exists): nothing may be left.
    r = env("add", "--disk", "0:size=1M", "--disk", f"1:size={1 << 42}T", "web")
    assert r.returncode == 2 and "too large" in r.stderr
    r = env("add", "--disk", "0:size=1M", "--disk", f"1:size={(1 << 62) >> 20}", "web")
    assert r.returncode == 1 and "instance web" in r.stderr, r.stderr
    assert sorted(os.listdir(store.root)) == [".vbdfs"]


# --- reuse ------------------------------------------------------------------------
def _place(store, name, files):
    d = os.path.join(store.root, name)
    os.makedirs(d, exist_ok=True)
    for fname, size in files.items():
        with open(os.path.join(d, fname), "wb") as f:
            f.truncate(size)
    return d


def test_reuse_detects_format_once(env, store):
    d = _place(store, "web", {"sda": 64 * MiB})
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(d, "sdb"), "1G"],
                   check=True)
    r = env("add", "-t", "file,reuse", "--disk", "0", "--disk", "1", "web", check=0)
    m = store.load("web")
    assert [(d.name, d.format, d.size) for d in m.disks] == \
        [("sda", "raw", 64 * MiB), ("sdb", "qcow2", GiB)]
    assert "sdb 1G qcow2" in r.stdout
    # A guest writes a qcow2 header into its raw disk: the recorded format stands.
    with open(os.path.join(d, "sda"), "r+b") as f:
        f.write(b"QFI\xfb\0\0\0\3")
    assert store.load("web").disks[0].format == "raw"
    assert json.loads(env("info", "web", "--output", "json", check=0).stdout)["disks"][0]["format"] == "raw"


def test_reuse_without_disk_options_adopts_all(env, store):
    _place(store, "web", {"sda": 4 * MiB, "sdb": 8 * MiB})
    env("add", "-t", "file:reuse", "web", check=0)
    assert [d.size for d in store.load("web").disks] == [4 * MiB, 8 * MiB]


@pytest.mark.parametrize("files, disks, says", [
    ({"sda": MiB}, ["0", "1"], "missing {d}/sdb"),
    ({"sda": MiB, "disk1.img": MiB}, ["0"], "misnamed (disks must be named sda, sdb, ... by index): {d}/disk1.img"),
    ({"sda": MiB, "sdc": MiB}, None, "not among the 1 disks to reuse: {d}/sdc"),
    ({"sdb": MiB}, None, "no disk files"),
    ({"sda": MiB}, ["0:size=2M"], "is 1048576 bytes, but disk 0 was given as 2097152"),
    ({"sda": 0}, ["0"], "is empty"),
])
def test_reuse_refusals_name_the_file(env, store, files, disks, says):
    d = _place(store, "web", files)
    before = snapshot(store.root)
    args = [a for x in disks for a in ("--disk", x)] if disks else []
    r = env("add", "-t", "file,reuse", *args, "web")
    assert r.returncode == 1 and says.format(d=d) in r.stderr, r.stderr
    assert snapshot(store.root) == before and store.instances() == []


def test_reuse_refuses_symlinks_and_missing_dir(env, store, tmp_path):
    d = _place(store, "web", {})
    os.symlink("/etc/passwd", os.path.join(d, "sda"))
    r = env("add", "-t", "file,reuse", "web")
    assert r.returncode == 1 and "is not a regular file" in r.stderr
    r = env("add", "-t", "file,reuse", "nothing")
    assert r.returncode == 1 and "nothing to reuse" in r.stderr
    assert store.instances() == []


# --- grow ---------------------------------------------------------------------------
def test_grow_raw_and_qcow2(env, store):
    env("add", "--disk", "0:size=1G", "--disk", "1:size=1G,format=qcow2", "web", check=0)
    r = env("grow", "web", "sda", "+1G", check=0)
    assert "instance web disk sda grown to 2G" in r.stdout
    env("grow", "web", "1", "512", check=0)       # bare number: MiB; disk by index
    env("grow", "--absolute", "web", "sdb", "2G", check=0)
    m = store.load("web")
    assert [d.size for d in m.disks] == [2 * GiB, 2 * GiB]
    assert os.path.getsize(m.disks[0].path) == 2 * GiB
    assert os.stat(m.disks[0].path).st_blocks == 0          # still sparse
    assert qemu_img_info(m.disks[1].path)["virtual-size"] == 2 * GiB
    chk = subprocess.run(["qemu-img", "check", m.disks[1].path], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.parametrize("args, code, says", [
    (["web", "sda", "-1G"], 2, "'-1G' is negative"),
    (["web", "sda", "+0"], 2, "is zero"),
    (["web", "sda", "lots"], 2, "not a number"),
    (["--absolute", "web", "sda", "512M"], 1, "cannot shrink"),
    (["--absolute", "web", "sda", "1G"], 1, "already"),
    (["web", "sdc", "+1G"], 1, "instance web has no disk sdc (it has sda)"),
    (["nope", "sda", "+1G"], 1, "instance nope does not exist"),
])
def test_grow_refusals(env, store, args, code, says):
    env("add", "--disk", "0:size=1G", "web", check=0)
    before = snapshot(store.root)
    r = env("grow", *args)
    assert r.returncode == code and says in r.stderr, r.stderr
    assert snapshot(store.root) == before


# --- rename ----------------------------------------------------------------------------
def test_rename_in_store_and_custom_path(env, store):
    env("add", "--disk", "0:size=1M", "web", check=0)
    env("add", "-t", f"file:path={env.allowed}", "--disk", "0:size=1M", "--disk", "1:size=1M",
        "db", check=0)
    with open(store.load("db").disks[1].path, "r+b") as f:
        f.write(b"kept")
    env("rename", "web", "www", check=0)
    env("rename", "db", "db2", check=0)
    assert store.instances() == ["db2", "www"]
    assert store.load("www").disks[0].path == os.path.join(store.root, "www", "sda")
    m = store.load("db2")
    assert [d.path for d in m.disks] == [os.path.join(env.allowed, "db2", n) for n in ("sda", "sdb")]
    assert open(m.disks[1].path, "rb").read(4) == b"kept"
    assert sorted(os.listdir(env.allowed)) == ["db2"]
    assert not os.path.exists(os.path.join(store.root, "db2", ".manifest.json.rename"))


def test_rename_refusals_change_nothing(env, store, tmp_path):
    env("add", "--disk", "0:size=1M", "web", check=0)
    env("add", "-t", f"file:path={env.allowed}", "--disk", "0:size=1M", "db", check=0)
    before = snapshot(store.root, env.allowed)
    for args, says in [(("web", "db"), "already exists"), (("web", "a/b"), "contains '/'"),
                       (("web", "web"), "same"), (("nope", "x"), "does not exist")]:
        r = env("rename", *args)
        assert r.returncode == 1 and says in r.stderr, (args, r.stderr)
    # The custom directory's new name must not exist either.
    os.mkdir(os.path.join(env.allowed, "db3"))
    r = env("rename", "db", "db3")
    assert r.returncode == 1 and os.path.join(env.allowed, "db3") + " already exists" in r.stderr
    os.rmdir(os.path.join(env.allowed, "db3"))
    # Path safety holds for rename and remove too: whitelist emptied, both refused.
    open(store.whitelist_file, "w").write("")
    for args in (("rename", "db", "db9"), ("remove", "db")):
        r = env(*args)
        assert r.returncode == 1 and "lists no allowed directory" in r.stderr, r.stderr
    assert snapshot(store.root, env.allowed) == before


# --- remove ---------------------------------------------------------------------------------
def test_remove_refused_while_open_by_a_process(env, store):
    env("add", "--disk", "0:size=1M", "--disk", "1:size=1M", "web", check=0)
    path = store.load("web").disks[1].path
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import sys,time; f=open({path!r},'rb'); print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        before = snapshot(store.root)
        for args in (("remove", "web"), ("rename", "web", "www"), ("grow", "web", "sdb", "+1M")):
            r = env(*args)
            assert r.returncode == 1, r.stderr
            assert f"disk sdb is open by process {holder.pid}" in r.stderr, r.stderr
        assert snapshot(store.root) == before
        env("grow", "web", "sda", "+1M", check=0)      # another disk of it is free to grow
    finally:
        holder.kill()
        holder.wait()
    env("remove", "web", check=0)
    assert store.instances() == []


def test_remove_refused_with_another_nodes_attachment(env, store):
    env("add", "--disk", "0:size=1M", "web", check=0)
    rec = {"instance": "web", "disks": {"sda": {"disk": "sda", "driver": "loop", "device": "/dev/loop7",
                                                 "node": "elsewhere", "path": "/run/vbdfs/web/sda"}}}
    with open(os.path.join(store.state_dir("attachments"), "web.json"), "w") as f:
        json.dump(rec, f)
    r = env("remove", "web")
    assert r.returncode == 1 and "attached as /dev/loop7 on node elsewhere" in r.stderr
    info = json.loads(env("info", "web", "--output", "json", check=0).stdout)
    assert info["disks"][0]["attachment"]["node"] == "elsewhere"
    r = env("detach", "web")
    assert r.returncode == 1 and "detach it there" in r.stderr
    # The same record made by this node, for a device that no longer exists, is stale.
    rec["disks"]["sda"]["node"] = "here"
    rec["disks"]["sda"]["device"] = "/dev/loop-none"
    with open(os.path.join(store.state_dir("attachments"), "web.json"), "w") as f:
        json.dump(rec, f)
    env("--node", "here", "remove", "web", check=0)
    assert os.listdir(store.state_dir("attachments")) == []


def test_remove_missing_instance(env, store):
    r = env("remove", "nope")
    assert r.returncode == 1 and "instance nope does not exist" in r.stderr


# --- xen-config -------------------------------------------------------------------------------
def test_xen_config_lines(env, store, tmp_path):
    env("add", "--disk", "0:size=1M", "--disk", "1:size=1M,driver=blktap", "web", check=0)
    r = env("xen-config", "web", check=0)
    mnt = tmp_path / "mnt"
    assert r.stdout.strip() == (f"disk = [ 'file:{mnt}/web/sda,sda,w', "
                                f"'tap:aio:{mnt}/web/sdb,sdb,w' ]")
    assert "not a mount point" in r.stderr         # warned, still printed
    r = env("xen-config", "--style", "xl", "--vdev-prefix", "xvd", "--read-only", "web", check=0)
    assert f"vdev=xvda, access=ro, backendtype=phy, target={mnt}/web/sda" in r.stdout


def test_xen_config_27_disks_needs_xvd(env, store):
    env("add", *[a for i in range(27) for a in ("--disk", f"{i}:size=1M")], "web", check=0)
    r = env("xen-config", "web")
    assert r.returncode == 1 and "27 disks" in r.stderr and "'xvd'" in r.stderr
    assert r.stdout == ""
    r = env("xen-config", "--vdev-prefix", "xvd", "web", check=0)
    assert r.stdout.count(",w'") == 27 and "xvdaa" in r.stdout


def test_xen_config_usage(env):
    assert env("xen-config", "--style", "xm", "web").returncode == 2
    assert env("xen-config", "--vdev-prefix", "vd", "web").returncode == 2


# --- locking -------------------------------------------------------------------------------------
def test_same_instance_serialized_others_in_parallel(env, store):
    env("add", "--disk", "0:size=1M", "web", check=0)
    with store.lock("web"):
        grow = subprocess.Popen([sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                                 "--whitelist", store.whitelist_file, "grow", "web", "sda", "+1M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            env("add", "--disk", "0:size=1M", "db", check=0)   # another instance: not blocked
            time.sleep(1.0)
            assert grow.poll() is None                           # still waiting for web's lock
            assert store.load("web").disks[0].size == MiB
        except BaseException:
            grow.kill()
            raise
    out, err = grow.communicate(timeout=60)
    assert grow.returncode == 0, err
    assert "instance web is locked by another process; waiting" in err
    assert store.load("web").disks[0].size == 2 * MiB
