"""Every open of a store file refuses anything but a regular file inside the store.

Store entries can change under the daemon (other nodes, tools, mistakes): a
disk swapped for a symlink must not lead outside the store, and a FIFO must
not hang the daemon (issue 11, items 1 and 2). Calls that the old code let
block run in a worker thread with a timeout, so a regression fails instead
of hanging the suite.
"""

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import MiB, is_mounted, make_instance
from vbdfs.images import ImageError, open_image

PATTERN = b"outside!" * 512       # 4 KiB


def within(seconds, fn, *args):
    """fn(*args) in a worker thread: its result, or its exception raised here;
    AssertionError if it is still blocked after `seconds`."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} still blocked after "
                             f"{seconds} s")
    if "error" in out:
        raise out["error"]
    return out["value"], time.monotonic() - started


def read_4k(path):
    with open(path, "rb") as f:
        return f.read(4096)


def write_4k(path):
    with open(path, "r+b") as f:
        f.write(b"\xee" * 4096)


def release_fifo(path):
    """Let an opener stuck on the FIFO (the old code) go, so teardown can unmount."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside"
    path.write_bytes(PATTERN * 256)       # 1 MiB, as large as the disks
    return path


# --- the primitive, with openat2 and with the component walk it falls back to ---
@pytest.fixture(params=["openat2", "walk"])
def tree(request, tmp_path, monkeypatch, outside):
    from vbdfs.images import confined
    monkeypatch.setattr(confined, "_have_openat2", request.param == "openat2")
    root = tmp_path / "root"
    (root / "i1").mkdir(parents=True)
    (root / "i1" / "sda").write_bytes(b"inside")
    os.symlink(outside, root / "i1" / "link")
    os.symlink(tmp_path, root / "i2")
    os.mkfifo(root / "i1" / "fifo")
    (root / "i1" / "dir").mkdir()
    os.mknod(root / "i1" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return str(root)


@pytest.mark.root
@pytest.mark.parametrize("name,message", [
    ("i1/link", "i1/link is a symlink"),
    ("i2/outside", "i2 is a symlink"),                 # a directory on the way
    ("i1/fifo", "i1/fifo is a FIFO, not a regular file"),
    ("i1/dir", "i1/dir is a directory, not a regular file"),
    ("i1/null", "i1/null is a character device, not a regular file"),
    ("../outside", "is outside the store"),
])
def test_only_regular_files_below_the_root(tree, name, message):
    from vbdfs.images.confined import UnsafeFile, open_regular, stat_regular
    path = os.path.join(tree, name)
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY):
        with pytest.raises(UnsafeFile, match=message):
            within(5, open_regular, path, flags, tree)
    with pytest.raises(UnsafeFile, match=message):
        within(5, stat_regular, path, tree)


@pytest.mark.root
def test_fifo_or_device_is_never_opened_for_io(tree):
    """Refused before any open for I/O (O_PATH, then fstat): a writer that
    connected to a FIFO and left would show as POLLHUP to its reader (and opening
    a device node such as /dev/watchdog's has effects of its own)."""
    import select
    from vbdfs.images.confined import UnsafeFile, open_regular
    fifo = os.path.join(tree, "i1", "fifo")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY):
            with pytest.raises(UnsafeFile):
                open_regular(fifo, flags, tree)
        p = select.poll()
        p.register(reader, select.POLLIN)
        assert p.poll(0) == []
    finally:
        os.close(reader)


@pytest.mark.root
def test_regular_file_opens_blocking(tree):
    from vbdfs.images.confined import open_regular, stat_regular
    path = os.path.join(tree, "i1", "sda")
    fd = open_regular(path, os.O_RDWR, tree)
    try:
        assert os.read(fd, 10) == b"inside"
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    assert stat_regular(path, tree).st_size == 6
    with pytest.raises(FileNotFoundError):
        open_regular(os.path.join(tree, "i1", "sdz"), os.O_RDONLY, tree)


def test_qcow2_backing_swapped_for_a_symlink_after_the_check(tmp_path, monkeypatch, outside):
    """The backing file is checked, then swapped for a symlink out of the store
    before it is opened (the race, made certain by doing the swap right after
    the check resolves the name): the open itself must refuse it."""
    root = tmp_path / "store"
    (root / "i1").mkdir(parents=True)
    base = root / "i1" / "base"
    base.write_bytes(bytes(MiB))
    image = root / "i1" / "sda"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw",
                    str(image), str(MiB)], check=True)
    real_realpath = os.path.realpath
    swapped = []

    def realpath_then_swap(path, *a, **kw):
        result = real_realpath(path, *a, **kw)
        if str(path).endswith("/base") and not swapped:
            os.unlink(base)
            os.symlink(outside, base)
            swapped.append(path)
        return result
    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    try:
        with open_image(str(image), "qcow2", read_only=True, store_root=str(root)) as img:
            leaked = img.read(0, len(PATTERN))
    except ImageError as e:
        assert "is a symlink" in str(e)
    else:
        pytest.fail(f"opened through the swapped-in symlink (read {leaked[:16]!r}...)")
    assert swapped, "the swap never happened: the test proves nothing"
    assert outside.read_bytes() == PATTERN * 256


# --- through a real mount ---------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.root
def test_disk_swapped_for_a_symlink_after_a_read(store, mounted, outside):
    make_instance(store, "good", MiB)
    make_instance(store, "i1", MiB)
    disk = mounted.disk("i1")
    assert read_4k(disk) == bytes(4096)       # opened and closed once: manifest cached
    backing = os.path.join(store.root, "i1", "sda")
    os.unlink(backing)
    os.symlink(outside, backing)
    with pytest.raises(OSError) as e:
        leaked = read_4k(disk)
        pytest.fail(f"read through the symlink: {leaked[:16]!r}...")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        write_4k(disk)
    assert outside.read_bytes() == PATTERN * 256
    assert "i1/sda is a symlink" in mounted.output()
    assert read_4k(mounted.disk("good")) == bytes(4096)


@pytest.mark.fuse
@pytest.mark.root
def test_instance_directory_swapped_for_a_symlink(store, mounted, tmp_path):
    """A directory on the way is a symlink: the manifest and the disk, moved out
    of the store unchanged, would otherwise keep being served from there."""
    make_instance(store, "good", MiB)
    make_instance(store, "i1", MiB)
    disk = mounted.disk("i1")
    assert read_4k(disk) == bytes(4096)
    moved = tmp_path / "moved-i1"
    os.rename(os.path.join(store.root, "i1"), moved)
    (moved / "sda").write_bytes(PATTERN * 256)
    os.symlink(moved, os.path.join(store.root, "i1"))
    with pytest.raises(OSError) as e:
        leaked = read_4k(disk)
        pytest.fail(f"read through the symlinked directory: {leaked[:16]!r}...")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        write_4k(disk)
    assert (moved / "sda").read_bytes() == PATTERN * 256
    assert "/i1 is a symlink" in mounted.output()
    assert read_4k(mounted.disk("good")) == bytes(4096)


@pytest.mark.fuse
@pytest.mark.root
def test_fifo_disk_fails_alone_and_fast(store, mounted):
    make_instance(store, "good", MiB)
    make_instance(store, "x", MiB)
    fifo = os.path.join(store.root, "x", "sda")
    os.unlink(fifo)
    os.mkfifo(fifo)
    try:
        for opener in (read_4k, write_4k):
            for _ in range(3):
                with pytest.raises(OSError) as e:
                    within(10, opener, mounted.disk("x"))
                assert e.value.errno == errno.EIO
        data, took = within(10, read_4k, mounted.disk("good"))
        assert data == bytes(4096) and took < 5
    finally:
        release_fifo(fifo)
    assert mounted.output().count("x/sda is a FIFO, not a regular file") == 1, mounted.output()
    mounted.stop()
    assert not is_mounted(mounted.path)


@pytest.mark.fuse
@pytest.mark.root
def test_fifo_manifest_fails_alone_and_fast(store, mounted):
    make_instance(store, "good", MiB)
    make_instance(store, "y", MiB)
    fifo = store.manifest_path("y")
    os.unlink(fifo)
    os.mkfifo(fifo)
    try:
        for _ in range(3):
            with pytest.raises(OSError) as e:
                within(10, os.stat, os.path.join(mounted.path, "y"))
            assert e.value.errno == errno.EIO
        data, took = within(10, read_4k, mounted.disk("good"))
        assert data == bytes(4096) and took < 5
        listing, _ = within(10, os.listdir, mounted.path)
        assert listing == ["good"]
    finally:
        release_fifo(fifo)
    out = mounted.output()
    assert out.count("y/manifest.json is a FIFO, not a regular file") == 1, out
    mounted.stop()
    assert not is_mounted(mounted.path)


# --- vbdctl list and info ------------------------------------------------------------
def vbdctl(store, *args):
    """vbdctl, killed after 20 s: the old code blocked forever on a FIFO manifest."""
    return subprocess.run([sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                           "--whitelist", store.whitelist_file, *args],
                          capture_output=True, text=True, timeout=20)


@pytest.mark.root
def test_list_and_info_show_non_regular_disks_and_manifests_as_broken(store):
    make_instance(store, "good", MiB)
    broken = {"d": "is a directory", "n": "is a character device", "f": "is a FIFO",
              "m": "manifest.json is a FIFO"}
    for name in broken:
        make_instance(store, name, MiB)
    for name, make in (("d", os.mkdir), ("f", os.mkfifo),
                       ("n", lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)))):
        path = os.path.join(store.root, name, "sda")
        os.unlink(path)
        make(path)
    os.unlink(store.manifest_path("m"))
    os.mkfifo(store.manifest_path("m"))

    r = vbdctl(store, "list", "--output", "json")
    assert r.returncode == 1, r.stderr
    items = {i["name"]: i for i in json.loads(r.stdout)}
    assert sorted(items) == ["d", "f", "good", "m", "n"]
    assert "error" not in items["good"]
    for name, what in broken.items():
        assert what in items[name]["error"], items[name]
    r = vbdctl(store, "list")
    assert r.returncode == 1
    for line in r.stdout.splitlines()[1:]:
        assert ("ERROR" in line) == (line.split()[0] != "good"), r.stdout

    for name in ("d", "n", "f"):
        r = vbdctl(store, "info", name)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "BROKEN" in r.stdout
        assert f"disk sda is broken: {store.root}/{name}/sda {broken[name]}" in r.stderr
        r = vbdctl(store, "info", name, "--output", "json")
        assert r.returncode == 1
        assert broken[name] in json.loads(r.stdout)["disks"][0]["error"]
    r = vbdctl(store, "info", "m")
    assert r.returncode == 1 and "manifest.json is a FIFO" in r.stderr
    r = vbdctl(store, "info", "good")
    assert r.returncode == 0, r.stderr
