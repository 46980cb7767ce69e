"""qcow2 disks the engine opens read-only say so everywhere (issue 11, item 6).

The image made by qemu with the corrupt bit (set in the header as qemu does
when it finds an overlap) is adopted with `reuse` and served by a real mount:
add warns, info and list show it, the disk file carries user.vbdfs.read_only
and mode 0400, the daemon logs it once, an open for writing fails with EROFS
at open, and attach refuses unless --read-only is given. The image is never
changed.

Two cases that used to be read-only no longer are (issue 12): a real crash of
qemu-io under lazy refcounts (the dirty bit) is repaired when the mount opens
the disk for writing, and logged; refcount_bits=8 is written like 16.
"""

import errno
import hashlib
import json
import os
import stat
import subprocess

import pytest

from conftest import MiB, vbdctl_runner, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.root]

XATTR = "user.vbdfs.read_only"


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def dirty(path):
    """A lazy-refcounts image whose qemu was killed after an allocating write."""
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p.stdin.write(b"write -P 0x5a 0 64k\n")
    p.stdin.flush()
    wait_for(lambda: b"wrote" in os.read(p.stdout.fileno(), 4096), what="qemu-io's write")
    p.kill()
    p.wait()
    with open(path, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1, "qemu left no dirty bit"


def refcount8(path):
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=8", path, "8M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", path],
                   check=True, capture_output=True)


def corrupt(path):
    qemu_img("create", "-f", "qcow2", path, "8M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", path],
                   check=True, capture_output=True)
    with open(path, "r+b") as f:       # incompatible_features bit 1: corrupt
        f.seek(72)
        f.write((2).to_bytes(8, "big"))


CASES = {"corrupt": (corrupt, "marked corrupt")}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def loops_backed_by(prefix):
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True,
                         check=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devs if (d.get("back-file") or "").startswith(prefix)]


@pytest.fixture
def ctl(store, mounted):
    run = vbdctl_runner(store, mounted.path)
    run.mount = mounted
    yield run
    for dev in loops_backed_by(mounted.path + "/"):
        subprocess.run(["losetup", "--detach", dev])


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_only_qcow2_says_so_everywhere(ctl, store, case):
    make, says = CASES[case]
    os.mkdir(os.path.join(store.root, "vm"), 0o700)
    image = os.path.join(store.root, "vm", "sda")
    make(image)
    before = sha(image)

    r = ctl("add", "-t", "file,reuse", "vm", check=0)
    assert "sda 8M qcow2 (loop, read-only)" in r.stdout, r.stdout
    warning, = r.stderr.splitlines()
    assert warning.startswith("vbdctl: warning: instance vm disk sda is read-only: ")
    assert says in warning

    info = json.loads(ctl("info", "vm", "--output", "json", check=0).stdout)
    assert says in info["disks"][0]["read_only"]
    assert f"sda is read-only: {info['disks'][0]['read_only']}" in ctl("info", "vm", check=0).stdout
    listed, = json.loads(ctl("list", "--output", "json", check=0).stdout)
    assert listed["read_only"] == {"sda": info["disks"][0]["read_only"]}
    header, row = ctl("list", check=0).stdout.splitlines()
    assert header.split()[-2] == "Read-only" and row.split()[-2] == "sda"

    view = ctl.mount.disk("vm")
    wait_for(lambda: os.path.exists(view), what="the disk in the mount")
    r = ctl("xen-config", "vm", check=0)
    assert "disk sda is read-only: " in r.stderr and says in r.stderr
    assert "read-only" not in ctl("xen-config", "--read-only", "vm", check=0).stderr
    assert says in os.getxattr(view, XATTR).decode()
    assert XATTR in os.listxattr(view)
    assert stat.S_IMODE(os.stat(view).st_mode) == 0o400
    for _ in range(3):
        with pytest.raises(OSError) as e:
            os.open(view, os.O_RDWR)
        assert e.value.errno == errno.EROFS
    fd = os.open(view, os.O_RDONLY)        # reading still works
    try:
        assert os.pread(fd, 4, 0) == b"\x5a" * 4
    finally:
        os.close(fd)
    log = ctl.mount.output()
    assert log.count("is read-only: ") == 1 and says in log, log

    r = ctl("attach", "vm", check=1)
    assert "sda can only be attached read-only (--read-only)" in r.stderr and says in r.stderr
    assert loops_backed_by(ctl.mount.path + "/") == []
    dev = ctl("attach", "--read-only", "vm", check=0).stdout.split()[1]
    with open(f"/sys/block/{os.path.basename(dev)}/ro") as f:
        assert f.read().strip() == "1"
    with open(dev, "rb") as f:
        assert f.read(4) == b"\x5a" * 4
    ctl("detach", "vm", check=0)
    assert sha(image) == before               # nothing of ours wrote to it


def test_writable_disks_carry_no_read_only_mark(ctl, store):
    ctl("add", "--disk", "0:size=8M,format=qcow2", "--disk", "1:size=8M", "vm", check=0)
    info = json.loads(ctl("info", "vm", "--output", "json", check=0).stdout)
    assert [d["read_only"] for d in info["disks"]] == [None, None]
    assert "read-only" not in ctl("info", "vm", check=0).stdout
    listed, = json.loads(ctl("list", "--output", "json", check=0).stdout)
    assert listed["read_only"] == {}
    for disk in ("sda", "sdb"):
        view = ctl.mount.disk("vm", disk)
        wait_for(lambda: os.path.exists(view), what="the disk in the mount")
        assert stat.S_IMODE(os.stat(view).st_mode) == 0o600
        assert XATTR not in os.listxattr(view)
        with pytest.raises(OSError) as e:
            os.getxattr(view, XATTR)
        assert e.value.errno == errno.ENODATA
        fd = os.open(view, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 512, MiB)
        finally:
            os.close(fd)
    assert "read-only" not in ctl.mount.output()


def qemu_check(path):
    return subprocess.run(["qemu-img", "check", "-U", path], capture_output=True, text=True)


def test_dirty_image_is_repaired_when_opened_for_writing(ctl, store):
    """qemu-io SIGKILLed mid-write under lazy refcounts: adopted, checked like
    qemu-img check, opened writable through the mount, repaired (logged once),
    qemu-img check clean afterwards, the data intact."""
    os.mkdir(os.path.join(store.root, "vm"), 0o700)
    image = os.path.join(store.root, "vm", "sda")
    dirty(image)
    before = qemu_check(image)
    assert before.returncode == 2, before          # qemu: refcounts too low (corruptions)
    r = ctl("add", "-t", "file,reuse", "vm", check=0)
    assert "read-only" not in r.stdout + r.stderr
    report, = json.loads(ctl("check", "vm", "--output", "json", check=1).stdout)
    assert report["verdict"] == "corruptions"
    assert f"{report['corruptions']} errors were found" in before.stdout
    assert "refcount=0 reference=1" in ctl("check", "vm", "sda", check=1).stdout

    view = ctl.mount.disk("vm")
    wait_for(lambda: os.path.exists(view), what="the disk in the mount")
    assert stat.S_IMODE(os.stat(view).st_mode) == 0o600
    assert XATTR not in os.listxattr(view)
    fd = os.open(view, os.O_RDWR)
    try:
        r = ctl("check", "--repair", "vm", check=1)     # the disk is open: refused
        assert "cannot repair instance vm" in r.stderr and "open" in r.stderr
        assert os.pread(fd, 65536, 0) == b"\x5a" * 65536
        os.pwrite(fd, b"\x77" * 4096, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    log = ctl.mount.output()
    assert log.count("the image was marked dirty; refcounts rebuilt") == 1, log
    wait_for(lambda: qemu_check(image).returncode == 0, what="qemu-img check clean")
    with open(image, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1 == 0
    data = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 64k",
                           "-c", "read -P 0x77 3M 4k", image], capture_output=True, text=True)
    assert data.returncode == 0 and "Pattern verification failed" not in data.stdout, data
    assert json.loads(ctl("check", "vm", "--output", "json", check=0).stdout)[0][
        "verdict"] == "clean"


def test_narrow_refcounts_are_writable_through_the_mount(ctl, store):
    os.mkdir(os.path.join(store.root, "vm"), 0o700)
    image = os.path.join(store.root, "vm", "sda")
    refcount8(image)
    ctl("add", "-t", "file,reuse", "vm", check=0)
    view = ctl.mount.disk("vm")
    wait_for(lambda: os.path.exists(view), what="the disk in the mount")
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(100000), 2 * MiB + 3)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert qemu_check(image).returncode == 0
