"""Sparse over a disk's life: discard through a loop device, SEEK_DATA/SEEK_HOLE
through the mount."""

import errno
import hashlib
import json
import os
import random
import subprocess

import pytest

from conftest import GiB, MiB, make_instance, wait_for
from vbdfs.images import Kind, open_image
from vbdfs.images.fileops import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                  FALLOC_FL_ZERO_RANGE, fallocate)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def image_of(store, name, disk="sda"):
    return os.path.join(store.root, name, disk)


def allocated(path):
    return os.stat(path).st_blocks * 512


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def assert_qemu_check_clean(image, fmt):
    if fmt == "qcow2":
        r = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


class Loop:
    """A direct-I/O loop device over a path; detached on exit."""

    def __init__(self, path):
        self.dev = sh("losetup", "--find", "--show", "--direct-io=on", path).stdout.strip()

    def __enter__(self):
        return self.dev

    def __exit__(self, *exc):
        sh("losetup", "--detach", self.dev)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("how", ["fstrim", "mount-o-discard"])
def test_deleted_files_give_space_back(store, mounted, tmp_path, fmt, how):
    make_instance(store, "web", GiB, fmt=fmt)
    image = image_of(store, "web")
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    with Loop(mounted.disk("web")) as loop:
        queue = f"/sys/block/{os.path.basename(loop)}/queue"
        with open(f"{queue}/discard_max_bytes") as f:
            assert int(f.read()) > 0        # the loop device offers discard at all
        sh("mkfs.ext4", "-q", "-F", loop)
        sh("mount", *(["-o", "discard"] if how == "mount-o-discard" else []), loop, str(fsmnt))
        try:
            sh("sync", "-f", str(fsmnt))
            # The guest's data: the filesystem as created, plus the file it keeps.
            baseline = allocated(image)
            keep = os.urandom(16 * MiB)
            (fsmnt / "keep").write_bytes(keep)
            for i in range(3):
                (fsmnt / f"junk{i}").write_bytes(os.urandom(16 * MiB))
            sh("sync", "-f", str(fsmnt))
            assert allocated(image) >= baseline + 60 * MiB
            for i in range(3):
                os.unlink(fsmnt / f"junk{i}")
            if how == "fstrim":
                sh("sync", "-f", str(fsmnt))        # fstrim frees what the journal committed
                sh("fstrim", str(fsmnt))
            # sync commits the journal (with -o discard, that sends the discards)
            # and flushes the loop device down to the image (qcow2 frees clusters then).
            target = (baseline + len(keep)) * 1.05 + MiB

            def given_back():
                sh("sync", "-f", str(fsmnt))
                return allocated(image) <= target
            wait_for(given_back, what=f"allocation {allocated(image)} <= {target:.0f}")
        finally:
            sh("umount", str(fsmnt))
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        sh("mount", "-o", "ro", loop, str(fsmnt))
        try:
            assert (fsmnt / "keep").read_bytes() == keep
        finally:
            sh("umount", str(fsmnt))
    assert_qemu_check_clean(image, fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_blkdiscard_reads_back_zeros(store, mounted, fmt):
    make_instance(store, "web", 64 * MiB, fmt=fmt)
    disk = mounted.disk("web")
    data = os.urandom(16 * MiB)
    with open(disk, "r+b") as f:
        f.write(data)
    # Neither range is aligned to a qcow2 cluster (64 KiB): partial clusters too.
    discard = (3 * 4096, MiB + 37 * 4096)
    zeroout = (8 * MiB + 5 * 4096, 2 * MiB + 4096)
    with Loop(disk) as loop:
        sh("blkdiscard", "-o", str(discard[0]), "-l", str(discard[1]), loop)
        sh("blkdiscard", "-z", "-o", str(zeroout[0]), "-l", str(zeroout[1]), loop)
        sh("blockdev", "--flushbufs", loop)
        expect = bytearray(data)
        for off, n in (discard, zeroout):
            expect[off:off + n] = bytes(n)
        for path in (loop, disk):
            fd = os.open(path, os.O_RDONLY)
            try:
                assert os.pread(fd, len(data), 0) == expect, path
            finally:
                os.close(fd)
    assert_qemu_check_clean(image_of(store, "web"), fmt)


def test_discard_on_overlay_hides_the_backing_file(store, mounted):
    base = os.path.join(store.root, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
    sh("qemu-io", "-c", "write -P 0xab 0 4M", base)
    make_instance(store, "web", 16 * MiB, fmt="qcow2")
    os.unlink(image_of(store, "web"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2",
       image_of(store, "web"))
    fd = os.open(mounted.disk("web"), os.O_RDWR)
    try:
        fallocate(fd, PUNCH, MiB, MiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 3 * MiB + 512, 4096)
        os.fsync(fd)
        assert os.pread(fd, MiB, MiB) == bytes(MiB)
        assert os.pread(fd, 4096, 3 * MiB + 512) == bytes(4096)
        assert os.pread(fd, 512, 3 * MiB) == b"\xab" * 512
        assert os.pread(fd, MiB, 0) == b"\xab" * MiB
    finally:
        os.close(fd)
    assert_qemu_check_clean(image_of(store, "web"), "qcow2")
    out = subprocess.run(["qemu-io", "-r", "-c", "read -P 0 1M 1M", image_of(store, "web")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "verification failed" not in out.stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_fallocate_never_reserves_nor_resizes(store, mounted, fmt):
    make_instance(store, "web", 16 * MiB, fmt=fmt)
    disk = mounted.disk("web")
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x01" * MiB, 15 * MiB)
        for mode, off, n, err in [
                (0, 0, MiB, "EOPNOTSUPP"),                      # reserve space: a thin disk cannot
                (FALLOC_FL_KEEP_SIZE, 0, MiB, "EOPNOTSUPP"),
                (0, 16 * MiB, MiB, "EOPNOTSUPP"),               # grow
                (FALLOC_FL_ZERO_RANGE, 15 * MiB, 2 * MiB, "EFBIG"),   # would grow the disk
                (FALLOC_FL_PUNCH_HOLE, 0, MiB, "EOPNOTSUPP")]:  # punch without KEEP_SIZE
            with pytest.raises(OSError) as e:
                fallocate(fd, mode, off, n)
            assert e.value.errno == getattr(errno, err), (mode, off)
        # Deallocating past the end frees what lies inside, as in a file.
        fallocate(fd, PUNCH, 15 * MiB + 4096, 4 * MiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 15 * MiB, 4096)
        assert os.pread(fd, MiB, 15 * MiB) == bytes(MiB)
        assert os.fstat(fd).st_size == 16 * MiB
    finally:
        os.close(fd)
    assert os.path.getsize(disk) == 16 * MiB
    assert_qemu_check_clean(image_of(store, "web"), fmt)


def qemu_map_data(path, fmt):
    """(offset, length) of the runs qemu-img reports as data, merged."""
    out = sh("qemu-img", "map", "-U", "--output=json", "-f", fmt, path).stdout
    runs = []
    for e in json.loads(out):
        if not e["data"]:
            continue
        if runs and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
        else:
            runs.append((e["start"], e["length"]))
    return runs


def seek_map(path):
    """(offset, length) of the data runs of path, walked with SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        runs, pos = [], 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO     # no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert data < hole <= size
            runs.append((data, hole - data))
            pos = hole
        return runs
    finally:
        os.close(fd)


def extents_map(path, fmt, store):
    with open_image(path, fmt, read_only=True, store_root=store.root) as img:
        return [(e.offset, e.length) for e in img.extents() if e.kind is Kind.DATA]


@pytest.mark.parametrize("layout", ["raw", "qcow2", "qcow2-over-qcow2", "qcow2-over-raw"])
@pytest.mark.parametrize("seed", [1, 2])
def test_seek_data_hole_agree_with_extents(store, mounted, layout, seed):
    rng = random.Random(seed)
    size = 48 * MiB
    fmt = layout.split("-")[0]
    make_instance(store, "web", size, fmt=fmt)
    if "-over-" in layout:
        base_fmt = layout.split("-")[-1]
        base = os.path.join(store.root, f"base.{base_fmt}")
        sh("qemu-img", "create", "-q", "-f", base_fmt, base, str(size))
        for _ in range(6):
            off = rng.randrange(0, size // 4096) * 4096
            n = min(rng.randrange(1, 300) * 4096, size - off)
            sh("qemu-io", "-f", base_fmt, "-c", f"write -P 0x5a {off} {n}", base)
        os.unlink(image_of(store, "web"))
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"../base.{base_fmt}", "-F", base_fmt,
           image_of(store, "web"))
    disk = mounted.disk("web")
    fd = os.open(disk, os.O_RDWR)
    try:
        for _ in range(40):
            off = rng.randrange(0, size // 4096) * 4096
            n = min(rng.randrange(1, 200) * 4096, size - off)
            if rng.random() < 0.3:
                fallocate(fd, PUNCH, off, n)     # holes, and zero clusters over a backing file
            else:
                os.pwrite(fd, rng.randbytes(n), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    ours = seek_map(disk)
    assert ours == extents_map(image_of(store, "web"), fmt, store)
    assert ours == qemu_map_data(image_of(store, "web"), fmt)
    # Readers through the mount see the same holes.
    assert ours == qemu_map_data(disk, "raw")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_cp_sparse_copy_allocates_what_the_disk_does(store, mounted, tmp_path, fmt):
    make_instance(store, "web", 3 * GiB, fmt=fmt)
    disk = mounted.disk("web")
    chunk = 64 * 1024       # whole qcow2 clusters: the data extents hold no zeros
    fd = os.open(disk, os.O_RDWR)
    try:
        for off in (0, 5 * MiB, 5 * MiB + chunk, 700 * MiB, 2 * GiB + 512 * MiB, 3 * GiB - chunk):
            os.pwrite(fd, os.urandom(chunk), off)
        os.fsync(fd)
        # The end of the search window is no boundary: data 1.5 GiB on is found.
        assert os.lseek(fd, 701 * MiB, os.SEEK_DATA) == 2 * GiB + 512 * MiB
        assert os.lseek(fd, 2 * GiB + 512 * MiB, os.SEEK_HOLE) == 2 * GiB + 512 * MiB + chunk
        assert os.lseek(fd, 3 * GiB - chunk, os.SEEK_HOLE) == 3 * GiB
        with pytest.raises(OSError):
            os.lseek(fd, 3 * GiB, os.SEEK_DATA)
    finally:
        os.close(fd)
    data = sum(n for _, n in qemu_map_data(image_of(store, "web"), fmt))
    assert data == 6 * chunk
    copy = tmp_path / "copy"
    sh("cp", "--sparse=always", disk, str(copy))
    assert allocated(copy) == data
    runs = qemu_map_data(disk, "raw")
    assert runs == qemu_map_data(str(copy), "raw")
    with open(disk, "rb") as a, open(copy, "rb") as b:     # the holes read zeros in both
        for off, n in runs:
            a.seek(off)
            b.seek(off)
            assert a.read(n) == b.read(n)
