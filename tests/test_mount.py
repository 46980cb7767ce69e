"""The real filesystem: a vbdfs daemon mounted over a store."""

import errno
import hashlib
import json
import os
import subprocess

import pytest

from conftest import GiB, MiB, make_instance, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def allocated(path):
    return os.stat(path).st_blocks * 512


def test_layout_and_attributes(store, mounted):
    make_instance(store, "web", 10 * GiB, 64 * MiB)
    assert sorted(os.listdir(mounted.path)) == ["web"]
    assert os.listdir(os.path.join(mounted.path, "web")) == ["sda", "sdb"]
    st = os.stat(mounted.disk("web"))
    assert st.st_size == 10 * GiB
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 0, 0)
    backing = os.stat(os.path.join(store.root, "web", "sda"))
    assert st.st_mtime_ns == backing.st_mtime_ns
    # A 10 GiB disk costs ~nothing on the store, and du through the mount says so.
    assert allocated(mounted.disk("web")) == backing.st_blocks * 512 < MiB
    du = subprocess.run(["du", "-s", "--block-size=1", os.path.join(mounted.path, "web")],
                        capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) < MiB


def test_bytes_through_mount_equal_backing_file(store, mounted):
    make_instance(store, "web", 256 * MiB)
    data = os.urandom(5 * MiB + 123)
    fd = os.open(mounted.disk("web"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB + 7)
        os.fsync(fd)
        assert os.pread(fd, len(data), 3 * MiB + 7) == data
    finally:
        os.close(fd)
    with open(os.path.join(store.root, "web", "sda"), "rb") as f:
        backing = f.read()
    with open(mounted.disk("web"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(backing).digest()
    assert backing[3 * MiB + 7:3 * MiB + 7 + len(data)] == data


def test_zeros_allocate_nothing(store, mounted):
    make_instance(store, "web", GiB)
    subprocess.run(["dd", "if=/dev/zero", f"of={mounted.disk('web')}", "bs=1M", "count=64",
                    "conv=notrunc,fsync", "status=none"], check=True)
    assert allocated(os.path.join(store.root, "web", "sda")) == 0
    # ... and zeros over data give the space back.
    subprocess.run(["dd", "if=/dev/urandom", f"of={mounted.disk('web')}", "bs=1M", "count=16",
                    "conv=notrunc,fsync", "status=none"], check=True)
    assert allocated(os.path.join(store.root, "web", "sda")) >= 16 * MiB
    subprocess.run(["dd", "if=/dev/zero", f"of={mounted.disk('web')}", "bs=1M", "count=16",
                    "conv=notrunc,fsync", "status=none"], check=True)
    assert allocated(os.path.join(store.root, "web", "sda")) == 0


def test_cp_sparse_copy_is_identical_and_sparse(store, mounted, tmp_path):
    make_instance(store, "web", GiB)
    fd = os.open(mounted.disk("web"), os.O_WRONLY)
    chunks = [(0, os.urandom(MiB)), (300 * MiB, os.urandom(MiB)), (GiB - MiB, os.urandom(MiB))]
    for off, data in chunks:
        os.pwrite(fd, data, off)
    os.close(fd)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", mounted.disk("web"), str(copy)], check=True)
    assert os.path.getsize(copy) == GiB
    assert allocated(copy) <= 3 * MiB + MiB
    with open(copy, "rb") as f:
        for off, data in chunks:
            f.seek(off)
            assert f.read(len(data)) == data
    cmp = subprocess.run(["cmp", str(copy), mounted.disk("web")])
    assert cmp.returncode == 0


def test_xattrs(store, mounted):
    make_instance(store, "web", 64 * MiB)
    path = mounted.disk("web")
    assert os.getxattr(path, "user.vbdfs.format") == b"raw"
    assert json.loads(os.getxattr(path, "user.vbdfs.logical_id")) == \
        ["loop", "raw", os.path.join(store.root, "web", "sda")]
    assert os.getxattr(path, "user.vbdfs.allocated") == b"0"
    with open(path, "r+b") as f:
        f.write(os.urandom(MiB))
    assert int(os.getxattr(path, "user.vbdfs.allocated")) >= MiB
    assert sorted(os.listxattr(path)) == ["user.vbdfs.allocated", "user.vbdfs.format",
                                          "user.vbdfs.logical_id"]
    with pytest.raises(OSError) as e:
        os.getxattr(path, "user.other")
    assert e.value.errno == errno.ENODATA


def test_statfs_is_the_stores(store, mounted):
    a, b = os.statvfs(mounted.path), os.statvfs(store.root)
    assert a.f_blocks * a.f_frsize == b.f_blocks * b.f_frsize
    assert abs(a.f_bavail * a.f_frsize - b.f_bavail * b.f_frsize) < 256 * MiB


def test_instances_appear_and_vanish_without_remount(store, mounted):
    assert os.listdir(mounted.path) == []
    make_instance(store, "web", MiB)
    wait_for(lambda: os.listdir(mounted.path) == ["web"], what="web to appear")
    assert os.path.getsize(mounted.disk("web")) == MiB
    store.remove("web")
    wait_for(lambda: os.listdir(mounted.path) == [], what="web to vanish")
    wait_for(lambda: not os.path.exists(mounted.disk("web")), what="web/sda to vanish")


def test_unknown_instance_or_disk_is_enoent(store, mounted):
    make_instance(store, "web", MiB)
    for path in [os.path.join(mounted.path, "nosuch"), os.path.join(mounted.path, "web", "sdb"),
                 os.path.join(mounted.path, "web", "manifest.json"),
                 os.path.join(mounted.path, ".vbdfs")]:
        with pytest.raises(FileNotFoundError):
            os.stat(path)


def test_write_past_end_is_enospc_and_backing_does_not_grow(store, mounted):
    make_instance(store, "web", MiB)
    fd = os.open(mounted.disk("web"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, MiB)
        assert e.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 4096, MiB - 100) == 100   # short write up to the end
    finally:
        os.close(fd)
    assert os.path.getsize(os.path.join(store.root, "web", "sda")) == MiB
    dd = subprocess.run(["dd", "if=/dev/urandom", f"of={mounted.disk('web')}", "bs=64k",
                         "count=32", "conv=notrunc"], capture_output=True, text=True)
    assert dd.returncode != 0 and "No space left on device" in dd.stderr
    assert os.path.getsize(os.path.join(store.root, "web", "sda")) == MiB


def test_truncate_and_namespace_changes_are_refused(store, mounted):
    make_instance(store, "web", MiB)
    with open(mounted.disk("web"), "r+b") as f:
        f.write(b"keep")
    with pytest.raises(PermissionError):
        open(mounted.disk("web"), "wb")            # O_TRUNC would wipe the disk
    with pytest.raises(PermissionError):
        os.truncate(mounted.disk("web"), 10)
    with pytest.raises(PermissionError):
        os.unlink(mounted.disk("web"))
    with pytest.raises(PermissionError):
        os.mkdir(os.path.join(mounted.path, "new"))
    with open(mounted.disk("web"), "rb") as f:
        assert f.read(4) == b"keep"
    assert os.path.getsize(mounted.disk("web")) == MiB


def test_bad_manifest_skips_only_that_instance(store, mounted):
    make_instance(store, "good", MiB)
    make_instance(store, "bad", MiB)
    with open(store.manifest_path("bad"), "w") as f:
        f.write("{ this is not json")
    wait_for(lambda: os.listdir(mounted.path) == ["good"], what="bad to be skipped")
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.disk("bad"))
    with open(mounted.disk("good"), "r+b") as f:
        f.write(b"still serving")
    assert "instance bad skipped" in mounted.output()
    assert "not valid JSON" in mounted.output()


def test_data_survives_remount(store, mount):
    make_instance(store, "web", 16 * MiB)
    m = mount()
    data = os.urandom(MiB)
    with open(m.disk("web"), "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert m.stop() == 0
    assert not os.path.ismount(m.path)
    m2 = mount()
    with open(m2.disk("web"), "rb") as f:
        assert f.read(MiB) == data


def test_fio_verify_at_queue_depth_16(store, mounted, tmp_path):
    """Many requests in flight (the fast request loop's case): every block reads back."""
    make_instance(store, "web", 256 * MiB)
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={mounted.disk('web')}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--ioengine=libaio", "--direct=1", "--size=64M",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB and job["read"]["io_bytes"] == 64 * MiB
    # The daemon still answers and shuts down cleanly after the storm.
    assert os.listdir(mounted.path) == ["web"]
    assert mounted.stop() == 0
