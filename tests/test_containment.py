"""One broken disk, manifest or full store costs one request, never the daemon.

pyfuse3 ends its main loop (and so unmounts every disk on the node) on any
exception but FUSEError; these are the ways one was found to escape.
"""

import errno
import os
import subprocess

import pytest

from conftest import MiB, make_instance, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def still_serving(mounted, instance="good"):
    assert mounted.proc.poll() is None, mounted.output()
    assert os.path.ismount(mounted.path)
    with open(mounted.disk(instance), "r+b") as f:
        f.write(b"alive")
    with open(mounted.disk(instance), "rb") as f:
        assert f.read(5) == b"alive"


def test_symlinked_disk_file_is_skipped(store, mounted):
    make_instance(store, "good", MiB)
    make_instance(store, "loopy", MiB)
    backing = os.path.join(store.root, "loopy", "sda")
    os.unlink(backing)
    os.symlink(backing, backing)               # would be ELOOP, if it were followed
    wait_for(lambda: os.listdir(mounted.path) == ["good"], what="loopy to be skipped")
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.disk("loopy"))
    assert "is a symlink" in mounted.output()
    still_serving(mounted)


def _call(handler, *args):
    import trio
    return trio.run(handler, *args)


def test_handler_errors_become_errnos(store, monkeypatch):
    """In-process: an OSError keeps its errno, anything else is EIO, never an escape."""
    import pyfuse3
    from vbdfs.fs import VbdFs
    make_instance(store, "web", MiB)
    ops = VbdFs(store, node="n1")
    web = _call(ops.lookup, pyfuse3.ROOT_INODE, b"web", None).st_ino
    real_stat = store.stat_disk

    def looping_stat(disk):
        if disk.path.endswith("/web/sda"):
            raise OSError(errno.ELOOP, "Too many levels of symbolic links")
        return real_stat(disk)
    monkeypatch.setattr(store, "stat_disk", looping_stat)
    with pytest.raises(pyfuse3.FUSEError) as e:
        _call(ops.lookup, web, b"sda", None)
    assert e.value.errno == errno.ELOOP
    monkeypatch.setattr(store, "stat_disk", real_stat)

    def broken_statvfs(path):
        raise RuntimeError("a bug")
    monkeypatch.setattr(os, "statvfs", broken_statvfs)
    with pytest.raises(pyfuse3.FUSEError) as e:
        _call(ops.statfs, None)
    assert e.value.errno == errno.EIO


def test_manifest_nested_too_deeply(store, mounted):
    make_instance(store, "good", MiB)
    os.mkdir(os.path.join(store.root, "evil"))
    with open(os.path.join(store.root, "evil", "manifest.json"), "w") as f:
        f.write("[" * 200000)
    wait_for(lambda: os.listdir(mounted.path) == ["good"], what="evil to be skipped")
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mounted.path, "evil"))
    assert "nested too deeply" in mounted.output()
    still_serving(mounted)


def test_full_store_still_opens_for_writing(tmp_path, mount, store):
    """The lease record cannot be written on a full store; the lease (locks) still holds."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        from vbdfs.store import Store
        full = Store(str(small), store.whitelist_file)
        make_instance(full, "good", MiB)
        make_instance(full, "other", MiB)
        with open(small / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        store.root = full.root                 # the mount fixture serves store.root
        m = mount()
        fd = os.open(m.disk("good"), os.O_RDWR)   # lease record: ENOSPC, open: fine
        try:
            assert os.pread(fd, 4, 0) == bytes(4)
            from vbdfs.store import leases
            assert leases.is_write_locked(os.path.join(full.root, "good", "sda"))
        finally:
            os.close(fd)
        assert "could not be written" in m.output()
        assert m.proc.poll() is None and os.path.ismount(m.path)
        assert sorted(os.listdir(m.path)) == ["good", "other"]
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
