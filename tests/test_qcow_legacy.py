"""Legacy QCOW (version 1) images: made by qemu-img/qemu-io, read by vbdfs exactly as
`qemu-img convert -O raw` renders them; hostile headers refused; served read-only
through the mount; adopted, exported and converted to qcow2/raw by vbdctl."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
import struct

import pytest

from conftest import MiB, qemu_img, qemu_io, render_raw, vbdctl_runner, wait_for
from vbdfs.images import ImageError, ReadOnlyImage, open_image
from vbdfs.images.base import Kind

KiB = 1 << 10
qemu_io = functools.partial(qemu_io, fmt="qcow")


def mixed_raw(path, size, seed=7):
    """Random data, compressible text and zeros, at unaligned places."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 3 * MiB + 123, size - 70000):
            f.seek(off)
            f.write(rnd.randbytes(70000))
        for off in (MiB + 777, 9 * MiB + 4096):
            f.seek(off)
            f.write(b"vbdfs legacy qcow " * 20000)


def convert_compressed(src, dst):
    """qemu-img convert -c -O qcow. qemu 7.2 writes every cluster, then exits 1
    without a message (its final zero-length compressed write, which qcow refuses):
    qemu-img compare is the judge of the result instead."""
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow", src, dst, check=False)
    r = qemu_img("compare", "-f", "raw", "-F", "qcow", src, dst, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.getsize(dst) < os.stat(src).st_blocks * 512 // 2     # it did compress


def assert_reads_as(img, expect: bytes):
    assert img.size == len(expect)
    assert img.read(0, img.size) == expect
    rnd = random.Random(1)
    for _ in range(200):
        off = rnd.randrange(img.size)
        n = rnd.randrange(1, 300000)
        assert img.read(off, n) == expect[off:off + n]
    # Every non-zero byte lies in a data extent.
    data = bytearray(len(expect))
    for e in img.extents():
        if e.kind is Kind.DATA:
            data[e.offset:e.end] = expect[e.offset:e.end]
    assert bytes(data) == expect


def make_plain(tmp_path):
    p = tmp_path / "plain.qcow"
    qemu_img("create", "-f", "qcow", p, "20M")
    qemu_io(p, "write -P 0xab 0 64k", "write -P 0x11 1000000 3000",
            "write -P 0x22 1536k 1m",              # crosses an L2 table's 2 MiB span
            "write -P 0x33 20479k 1k", "write -z 5m 64k", "write -P 0x44 5243392 512")
    return p


def make_compressed(tmp_path):
    src, p = tmp_path / "mixed.raw", tmp_path / "compressed.qcow"
    mixed_raw(src, 12 * MiB)
    convert_compressed(src, p)
    qemu_io(p, "write -P 0x55 3146728 5000")        # partly over a compressed cluster
    return p


def make_backed(tmp_path):
    base, p = tmp_path / "base.raw", tmp_path / "top.qcow"
    mixed_raw(base, 10 * MiB, seed=3)
    qemu_img("create", "-f", "qcow", "-b", "base.raw", "-F", "raw", p, "12M")
    qemu_io(p, "write -P 0x66 1048676 9000", "write -P 0x77 11m 4k")
    return p


@pytest.mark.parametrize("make", [make_plain, make_compressed, make_backed])
def test_qemu_made_images_read_as_qemu_renders_them(tmp_path, make):
    path = make(tmp_path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format"] == "qcow"
    expect = render_raw(path, tmp_path)
    before = hashlib.sha256(path.read_bytes()).digest()
    with open_image(str(path), "qcow", store_root=str(tmp_path)) as img:
        assert_reads_as(img, expect)
        assert img.read_only and "convert it to qcow2" in img.read_only_reason
        for attempt in (lambda: img.write(0, b"x"), lambda: img.zero(0, 512),
                        lambda: img.resize(img.size * 2)):
            with pytest.raises(ReadOnlyImage, match="legacy QCOW"):
                attempt()
    assert hashlib.sha256(path.read_bytes()).digest() == before


def test_qcow_backing_file_format_is_never_guessed(tmp_path):
    lower = make_plain(tmp_path)
    top = tmp_path / "top.qcow"
    qemu_img("create", "-f", "qcow", "-b", lower.name, "-F", "qcow", top)
    qemu_io(top, "write -P 0x99 4k 4k")
    with pytest.raises(ImageError, match="never guesses"):
        open_image(str(top), "qcow", store_root=str(tmp_path))
    # Given by the caller, the chain reads exactly.
    with open_image(str(top), "qcow", store_root=str(tmp_path), backing_format="qcow") as img:
        assert_reads_as(img, render_raw(top, tmp_path))


def test_qcow_backing_file_outside_the_store_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "secret.raw").write_bytes(b"secret" * 1000)
    top = store / "top.qcow"
    qemu_img("create", "-f", "qcow", "-b", "../secret.raw", "-F", "raw", top, "1M")
    with pytest.raises(ImageError, match="outside the store"):
        open_image(str(top), "qcow", store_root=str(store))
    os.symlink("../secret.raw", store / "link.raw")
    top.unlink()
    qemu_img("create", "-f", "qcow", "-b", "link.raw", "-F", "raw", top, "1M")
    with pytest.raises(ImageError, match="outside the store|symlink"):
        open_image(str(top), "qcow", store_root=str(store))


# --- hostile headers ------------------------------------------------------------------
# field: (offset, struct format) in the 48-byte header
FIELDS = {"magic": (0, ">I"), "version": (4, ">I"), "backing_offset": (8, ">Q"),
          "backing_len": (16, ">I"), "size": (24, ">Q"), "cluster_bits": (32, ">B"),
          "l2_bits": (33, ">B"), "crypt_method": (36, ">I"), "l1_offset": (40, ">Q")}


@pytest.mark.parametrize("field, value, says", [
    ("magic", 0x12345678, "bad magic"),
    ("version", 2, "not a QCOW version 1 image"),
    ("cluster_bits", 8, "cluster_bits 8 out of range"),
    ("cluster_bits", 17, "cluster_bits 17 out of range"),
    ("l2_bits", 5, "l2_bits 5 out of range"),
    ("l2_bits", 14, "l2_bits 14 out of range"),
    ("size", 1, "too small"),
    ("size", 1 << 62, "L1 table too large"),
    ("size", (1 << 64) - 1, "L1 table too large"),
    ("l1_offset", 0, "overlaps the header"),
    ("l1_offset", 1 << 40, "outside the file"),
    ("crypt_method", 1, "AES-encrypted QCOW images are not supported"),
    ("crypt_method", 7, "invalid encryption method 7"),
    ("backing_offset", 1 << 30, "backing file name lies outside the file"),
    ("backing_len", 5000, "backing file name length 5000 out of range"),
])
def test_hostile_headers_are_refused_by_name(tmp_path, field, value, says):
    p = tmp_path / "evil.qcow"
    (tmp_path / "base.raw").write_bytes(bytes(4 * MiB))
    qemu_img("create", "-f", "qcow", "-b", "base.raw", "-F", "raw", p, "4M")
    off, fmt = FIELDS[field]
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))
    before = p.read_bytes()
    with pytest.raises(ImageError, match=says) as e:
        open_image(str(p), "qcow", store_root=str(tmp_path))
    assert str(p) in str(e.value)
    assert p.read_bytes() == before


def test_hostile_tables_fail_the_read_not_the_process(tmp_path):
    p = make_plain(tmp_path)
    with open(p, "rb") as f:
        head = f.read(48)
    l1 = struct.unpack(">Q", head[40:48])[0]
    with open(p, "rb") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0]
    size = p.stat().st_size

    def patched(at, value):
        q = tmp_path / "evil.qcow"
        data = bytearray(p.read_bytes())
        data[at:at + 8] = struct.pack(">Q", value)
        q.write_bytes(bytes(data))
        return open_image(str(q), "qcow")

    with patched(l1, size + (1 << 20)) as img:           # L2 table past the end
        with pytest.raises(ImageError, match="points outside the file"):
            img.read(0, 512)
        assert img.read(4 * MiB, 512) == bytes(512)       # other tables still serve
    with patched(l2, 4096 * 3 + 7) as img:                # unaligned data cluster
        with pytest.raises(ImageError, match="invalid or points outside"):
            img.read(0, 512)
    with patched(l2, (1 << 63) | (100 << 51) | 4096) as img:   # compressed: not deflate
        with pytest.raises(ImageError, match="bad compressed cluster|truncated"):
            img.read(0, 512)
    with patched(l2, (1 << 63) | (4000 << 51) | (size - 10)) as img:
        with pytest.raises(ImageError, match="outside the file"):
            img.read(0, 512)


def test_encrypted_images_are_refused_by_name(tmp_path):
    secret = ["--object", "secret,id=s0,data=pw"]
    p1 = tmp_path / "aes.qcow"
    qemu_img("create", "-f", "qcow", *secret, "-o", "encrypt.format=aes,encrypt.key-secret=s0",
             p1, "8M")
    with pytest.raises(ImageError, match="AES-encrypted"):
        open_image(str(p1), "qcow")
    for how in ("aes", "luks"):
        p2 = tmp_path / f"{how}.qcow2"
        qemu_img("create", "-f", "qcow2", *secret, "-o",
                 f"encrypt.format={how},encrypt.key-secret=s0", p2, "8M")
        with pytest.raises(ImageError, match=f"{how.upper()}-encrypted"):
            open_image(str(p2), "qcow2")


# --- blktap's layout ----------------------------------------------------------------------
def blktap_image(path, data: bytes, big_endian_flag: bool):
    """What blktap's qcow-create and tapdisk wrote: header, XEN extension at 48, the L1
    table at 4 KiB; 4 KiB clusters, 4 KiB L2 tables; one data cluster at guest 2 MiB + 12 KiB.
    Old tapdisks (no L1_BIG_ENDIAN flag) wrote the L1 in the host's order."""
    size, l1_off, l2_off, data_off = 8 * MiB, 4096, 8192, 12288
    head = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 0, 0, 0, size, 12, 9, 0, 0, l1_off)
    ext = struct.pack(">4sIII", b"XEN\xfb", 0, 512, 2 if big_endian_flag else 0)
    l1 = struct.pack(">4Q" if big_endian_flag else "<4Q", 0, l2_off, 0, 0)
    l2 = bytearray(4096)
    l2[3 * 8:4 * 8] = struct.pack(">Q", data_off)
    img = bytearray(data_off + 4096)
    img[0:48], img[48:64] = head, ext
    img[l1_off:l1_off + 32] = l1
    img[l2_off:l2_off + 4096] = l2
    img[data_off:data_off + 4096] = data
    path.write_bytes(bytes(img))


def test_blktap_images_with_either_l1_byte_order(tmp_path):
    data = random.Random(5).randbytes(4096)
    expect = bytearray(8 * MiB)
    expect[2 * MiB + 12288:2 * MiB + 16384] = data
    for flag in (True, False):
        p = tmp_path / f"tap-{flag}.qcow"
        blktap_image(p, data, flag)
        with open_image(str(p), "qcow") as img:
            assert img.read(0, img.size) == bytes(expect)
        if flag:    # qemu ignores the extension: it must read this one the same
            assert render_raw(p, tmp_path) == bytes(expect)


# --- through the store and the mount ---------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.root
def test_adopted_qcow_disk_served_read_only_exported_and_converted(store, mount, tmp_path):
    d = os.path.join(store.root, "old")
    os.mkdir(d)
    src = tmp_path / "mixed.raw"
    mixed_raw(src, 12 * MiB)
    convert_compressed(src, os.path.join(d, "sda"))
    base = os.path.join(store.root, "bases", "base.raw")
    os.mkdir(os.path.dirname(base))
    mixed_raw(base, 8 * MiB, seed=9)
    qemu_img("create", "-f", "qcow", "-b", "../bases/base.raw", "-F", "raw",
             os.path.join(d, "sdb"), "8M")
    qemu_io(os.path.join(d, "sdb"), "write -P 0x5a 1048579 70000")
    expect = [render_raw(os.path.join(d, n), tmp_path) for n in ("sda", "sdb")]

    ctl = vbdctl_runner(store, str(tmp_path / "mnt0"))
    r = ctl("add", "-t", "file:reuse", "old", check=0)
    assert [(x.format, x.size) for x in store.load("old").disks] == \
        [("qcow", 12 * MiB), ("qcow", 8 * MiB)], r.stdout
    m = mount()
    for name, want in zip(("sda", "sdb"), expect):
        with open(m.disk("old", name), "rb") as f:
            assert f.read() == want
    with pytest.raises(OSError) as e:       # refused at open or at the first write
        with open(m.disk("old", "sda"), "r+b", buffering=0) as f:
            f.write(b"guest data")
    assert e.value.errno == errno.EROFS
    mctl = vbdctl_runner(store, m.path)
    _, dev = mctl("attach", "old", "sda", "--read-only", check=0).stdout.split()
    try:
        with open(dev, "rb") as f:
            assert f.read(MiB) == expect[0][:MiB]
    finally:
        mctl("detach", "old", "sda", check=0)
    with open(m.disk("old", "sda"), "rb") as f:
        assert f.read(4096) == expect[0][:4096]

    out = tmp_path / "exports"
    out.mkdir()
    ctl("export", "old", str(out), check=0)
    for name, want in zip(("sda", "sdb"), expect):
        dump = out / "old" / f"{name}.qcow2"          # a qcow disk's copy is qcow2
        assert render_raw(dump, tmp_path) == want

    ctl("convert", "old", "sda", "--to", "qcow2", check=0)
    ctl("convert", "old", "sdb", "--to", "raw", check=0)
    assert [x.format for x in store.load("old").disks] == ["qcow2", "raw"]
    assert qemu_img("check", os.path.join(d, "sda"), check=False).returncode == 0
    assert render_raw(os.path.join(d, "sda"), tmp_path) == expect[0]
    assert open(os.path.join(d, "sdb"), "rb").read() == expect[1]
    wait_for(lambda: open(m.disk("old", "sda"), "rb").read() == expect[0],
             what="the mount to serve the converted disk")
    with open(m.disk("old", "sda"), "r+b") as f:      # now writable
        f.write(b"guest data")
    assert ctl("convert", "old", "sda", "--to", "qcow").returncode == 2


def test_qcow2_overlay_on_a_qcow_base(tmp_path):
    """An image farm's usual upgrade: new qcow2 overlays on the old v1 bases."""
    base = make_compressed(tmp_path)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow", top)
    qemu_io(top, "write -P 0x42 3145000 9000", fmt="qcow2")
    expect = render_raw(top, tmp_path)
    from vbdfs.images.qcow2 import Qcow2Image
    with Qcow2Image(str(top), store_root=str(tmp_path)) as img:
        assert_reads_as(img, expect)
        img.write(100, b"written through the overlay")
        expect = expect[:100] + b"written through the overlay" + expect[127:]
    assert qemu_img("check", top, check=False).returncode == 0
    assert render_raw(top, tmp_path) == expect
