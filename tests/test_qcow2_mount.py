"""qcow2 disks served through the real mount as raw block devices."""

import errno
import hashlib
import json
import os
import subprocess
import time

import pytest

from conftest import (GiB, MiB, assert_reads_went_on, make_dirty_qcow2, make_instance,
                      qemu_img, reads_meanwhile)

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def sha256_file(path, chunk=4 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def backing(store, name, disk="sda"):
    return os.path.join(store.root, name, disk)


def test_qcow2_disk_reads_writes_and_stays_valid(store, mounted):
    make_instance(store, "web", GiB, fmt="qcow2")
    path = mounted.disk("web")
    assert os.path.getsize(path) == GiB
    assert os.getxattr(path, "user.vbdfs.format") == b"qcow2"
    chunks = [(0, os.urandom(MiB)), (123 * MiB + 4095, os.urandom(70000)), (GiB - 4096, os.urandom(4096))]
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in chunks:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
        for off, data in chunks:
            assert os.pread(fd, len(data), off) == data
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", GiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    # After fsync the image file alone holds everything: qemu-img agrees.
    assert qemu_img("check", "-U", backing(store, "web")).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", "-U", backing(store, "web")).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == GiB
    assert os.path.getsize(backing(store, "web")) < 4 * MiB + 2 * MiB   # sparse
    raw = os.path.join(os.path.dirname(mounted.path), "web.raw")
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", backing(store, "web"), raw)
    assert sha256_file(raw) == sha256_file(path)


def test_zeros_on_qcow2_allocate_nothing(store, mounted):
    make_instance(store, "web", GiB, fmt="qcow2")
    before = os.stat(backing(store, "web")).st_blocks
    subprocess.run(["dd", "if=/dev/zero", f"of={mounted.disk('web')}", "bs=1M", "count=64",
                    "conv=notrunc,fsync", "status=none"], check=True)
    assert os.stat(backing(store, "web")).st_blocks - before < 256   # < 128 KiB of metadata
    assert qemu_img("check", "-U", backing(store, "web")).returncode == 0


@pytest.mark.parametrize("opts", ["compat=0.10,cluster_size=4096",
                                  "compat=1.1,cluster_size=65536,preallocation=metadata",
                                  "compat=1.1,cluster_size=2097152"])
def test_qemu_made_images_read_as_qemu_renders_them(store, mounted, tmp_path, opts):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for off in (0, 5 * MiB + 123, 40 * MiB):
            f.seek(off)
            f.write(os.urandom(300000))
    make_instance(store, "web", 64 * MiB, fmt="qcow2")
    os.unlink(backing(store, "web"))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), backing(store, "web"))
    assert sha256_file(mounted.disk("web")) == sha256_file(src)


def test_backing_chain_inside_the_store(store, mounted, tmp_path):
    base = os.path.join(store.root, "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 8M", base], check=True, capture_output=True)
    make_instance(store, "web", 64 * MiB, fmt="qcow2")
    os.unlink(backing(store, "web"))
    qemu_img("create", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", backing(store, "web"))
    with open(mounted.disk("web"), "r+b") as f:
        assert f.read(4096) == b"\xab" * 4096      # falls through to the base
        f.seek(4 * MiB)
        f.write(b"overlay")
    with open(mounted.disk("web"), "rb") as f:
        f.seek(4 * MiB)
        assert f.read(8) == b"overlay\xab"
    assert qemu_img("check", backing(store, "web")).returncode == 0
    # The base is untouched: the write went copy-on-write into the overlay.
    out = subprocess.run(["qemu-io", "-r", "-c", "read -P 0xab 4M 4k", base],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in out.stdout and out.returncode == 0


def test_backing_file_outside_the_store_is_refused(store, mounted, tmp_path):
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"secret" * 1000)
    make_instance(store, "evil", 64 * MiB, fmt="qcow2")
    make_instance(store, "good", MiB)
    os.unlink(backing(store, "evil"))
    qemu_img("create", "-f", "qcow2", "-b", str(outside), "-F", "raw", backing(store, "evil"),
             "64M")
    before = open(backing(store, "evil"), "rb").read()
    with pytest.raises(OSError) as e:
        open(mounted.disk("evil"), "rb").read(10)
    assert e.value.errno == errno.EIO
    with open(mounted.disk("good"), "r+b") as f:      # the others keep working
        f.write(b"fine")
    assert open(backing(store, "evil"), "rb").read() == before
    assert "evil disk sda unavailable" in mounted.output()


@pytest.mark.parametrize("patch", ["l1_size", "cluster_bits", "incompatible"])
def test_malformed_qcow2_is_eio_and_others_serve(store, mounted, patch):
    import struct
    make_instance(store, "bad", 64 * MiB, fmt="qcow2")
    make_instance(store, "good", MiB, fmt="qcow2")
    with open(backing(store, "bad"), "r+b") as f:
        if patch == "l1_size":
            f.seek(36); f.write(struct.pack(">I", 0x7fffffff))
        elif patch == "cluster_bits":
            f.seek(20); f.write(struct.pack(">I", 22))
        else:
            f.seek(72); f.write(struct.pack(">Q", 1 << 40))
    before = open(backing(store, "bad"), "rb").read()
    for _ in range(2):
        with pytest.raises(OSError) as e:
            open(mounted.disk("bad"), "r+b")
        assert e.value.errno == errno.EIO
    with open(mounted.disk("good"), "r+b") as f:
        f.write(b"fine")
    assert open(backing(store, "bad"), "rb").read() == before
    assert mounted.output().count("instance bad disk sda unavailable") == 1   # logged once


def test_ext4_on_loop_over_qcow2_disk(store, mounted, tmp_path):
    make_instance(store, "web", 2 * GiB, fmt="qcow2")
    disk = mounted.disk("web")
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", disk],
                          capture_output=True, text=True, check=True).stdout.strip()
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
        subprocess.run(["mount", loop, str(fsmnt)], check=True)
        try:
            subprocess.run(["cp", "-a", os.path.dirname(os.__file__) + "/email", str(fsmnt)],
                           check=True)
            (fsmnt / "big").write_bytes(os.urandom(16 * MiB))
        finally:
            subprocess.run(["umount", str(fsmnt)], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert mounted.stop() == 0       # close: every cached table reaches the file
    check = qemu_img("check", backing(store, "web"), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "web.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", backing(store, "web"), str(raw))
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_write_into_metadata_is_eio_and_changes_nothing(store, mounted):
    """A hostile image maps guest cluster 0, as a compressed cluster, onto its own
    header. Writing that cluster and fsyncing used to free and punch out the header
    (the image never opened again). Now the write fails with EIO, the image only
    gets its corrupt bit, still reads, and the other disks keep serving."""
    import struct
    make_instance(store, "bad", 16 * MiB, fmt="qcow2")
    make_instance(store, "good", MiB, fmt="qcow2")
    path = backing(store, "bad")
    os.unlink(path)
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", path],
                   check=True, capture_output=True)
    with open(path, "r+b") as f:
        l1 = struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0]
        l2 = struct.unpack(">Q", os.pread(f.fileno(), 8, l1))[0] & 0x00FFFFFFFFFFFE00
        os.pwrite(f.fileno(), struct.pack(">Q", 1 << 62), l2)    # compressed, at offset 0
    before = open(path, "rb").read()
    fd = os.open(mounted.disk("bad"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"\xee" * 65536, 0)
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4, 65536) == b"\x5a" * 4
    finally:
        os.close(fd)
    with open(mounted.disk("good"), "r+b") as f:      # the others keep working
        f.write(b"fine")
        f.flush()
        os.fsync(f.fileno())
    want = bytearray(before)
    want[79] |= 2                                      # the corrupt bit, as qemu sets it
    assert open(path, "rb").read() == want
    info = qemu_img("info", "-U", path)
    assert "corrupt: true" in info.stdout
    assert qemu_img("check", "-U", path, check=False).returncode in (0, 2, 3)
    assert "would hit image metadata: the header" in mounted.output()


def test_a_disk_repaired_at_open_holds_up_no_other_disk(store, mounted, tmp_path):
    """A writable open of a qcow2 marked dirty rebuilds its refcounts: here
    ~1 s (128 MiB in 512-byte clusters, a quarter of a million to count).
    The daemon opens in a thread, so another disk's reads go on meanwhile;
    opened in the request loop, they stopped for the whole repair."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(128 * MiB))
    make_instance(store, "dirty", 128 * MiB, fmt="qcow2")
    os.unlink(backing(store, "dirty"))
    make_dirty_qcow2(src, backing(store, "dirty"))
    make_instance(store, "other", MiB)

    with reads_meanwhile(mounted.disk("other")) as stamps:   # opened before: only reads follow
        started = time.monotonic()
        with open(mounted.disk("dirty"), "r+b") as f:   # the repair happens in this open
            opened = time.monotonic()
            assert f.read(4096) == open(src, "rb").read(4096)
        time.sleep(0.1)
    assert "refcounts rebuilt" in mounted.output()
    assert_reads_went_on(stamps, started, opened, "repair")
    assert qemu_img("check", backing(store, "dirty")).returncode == 0
