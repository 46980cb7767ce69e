"""The qcow2 engine called directly: semantics, sparseness, and a randomized model test."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from conftest import assert_judged_same, qemu_img

from vbdfs.images import ImageError, Kind, OutOfRange, ReadOnlyImage, create_image, open_image
from vbdfs.images.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def img(tmp_path):
    image = create_image(str(tmp_path / "disk.qcow2"), "qcow2", 256 * MiB)
    yield image
    image.close()


def test_create_is_sparse_and_sized(img):
    assert img.size == 256 * MiB
    assert img.format == "qcow2"
    assert img.allocated() <= 5 * 64 * KiB
    assert img.extents() == [(0, 256 * MiB, Kind.HOLE)]
    assert img.read(MiB, 4096) == bytes(4096)


def test_create_refuses_existing_file_and_bad_options(tmp_path):
    p = tmp_path / "d"
    p.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        Qcow2Image.create(str(p), MiB)
    assert p.read_bytes() == b"keep me"
    for kw, match in [({"cluster_size": 1000}, "power of two"),
                      ({"cluster_size": 4 * MiB}, "power of two"),
                      ({"compat": "2.0"}, "unknown compat"),
                      ({"backing_file": "x"}, "backing_format")]:
        with pytest.raises(ImageError, match=match):
            Qcow2Image.create(str(tmp_path / "n"), MiB, **kw)
        assert not (tmp_path / "n").exists()
    with pytest.raises(ImageError, match="multiple of 512"):
        Qcow2Image.create(str(tmp_path / "n"), 1000)


def test_create_with_refused_backing_leaves_nothing(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(ImageError, match="outside the store"):
        Qcow2Image.create(str(tmp_path / "store" / "n"), MiB, backing_file="../elsewhere",
                          backing_format="raw", store_root=str(tmp_path / "store"))
    assert not (tmp_path / "store" / "n").exists()


def test_write_read_unaligned_and_reopen(img):
    data = os.urandom(3 * 65536 + 17)
    img.write(MiB - 5, data)
    assert img.read(MiB - 5, len(data)) == data
    assert img.read(MiB - 10, 5) == bytes(5)
    img.close()
    with open_image(img.path, "qcow2", read_only=True) as ro:
        assert ro.read(MiB - 5, len(data)) == data
        with pytest.raises(ReadOnlyImage):
            ro.write(0, b"x")


def test_out_of_range(img):
    with pytest.raises(OutOfRange):
        img.write(img.size - 1, b"ab")
    with pytest.raises(OutOfRange):
        img.zero(img.size, 1)
    with pytest.raises(OutOfRange):
        img.read(-1, 1)
    assert img.read(img.size - 2, 10) == bytes(2)     # reads end short like a file
    assert img.read(img.size, 10) == b""


def test_all_zero_writes_allocate_nothing(img):
    before = img.allocated()
    for off, n in [(0, 64 * MiB), (100, 100), (4095, 2), (7 * MiB + 3, 70000)]:
        img.write(off, bytes(n))
    img.flush()
    assert img.allocated() == before
    assert img.extents() == [(0, img.size, Kind.HOLE)]


def test_zero_frees_space_and_reads_zero(img):
    img.write(0, b"\xff" * (8 * MiB))
    img.flush()
    assert img.allocated() >= 8 * MiB
    img.zero(1000, 8 * MiB - 2000)          # unaligned edges keep their neighbours
    img.flush()
    got = img.read(0, 8 * MiB)
    assert got[:1000] == b"\xff" * 1000 and got[-1000:] == b"\xff" * 1000
    assert got[1000:-1000] == bytes(8 * MiB - 2000)
    assert img.allocated() < MiB
    kinds = [e.kind for e in img.extents(0, 8 * MiB)]
    assert kinds == [Kind.DATA, Kind.ZERO, Kind.DATA]   # v3: zero flag on whole clusters


def test_v2_zero_without_and_with_backing(tmp_path):
    p = tmp_path / "v2.qcow2"
    with Qcow2Image.create(str(p), 8 * MiB, compat="0.10", cluster_size=4096) as v2:
        v2.write(0, b"\x01" * MiB)
        v2.zero(4096, MiB - 8192)
        assert [e.kind for e in v2.extents(0, 2 * MiB)] == [Kind.DATA, Kind.HOLE, Kind.DATA,
                                                             Kind.HOLE]
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x02" * (2 * MiB))
    ov = tmp_path / "ov.qcow2"
    with Qcow2Image.create(str(ov), 8 * MiB, compat="0.10", cluster_size=4096,
                           backing_file="base.raw", backing_format="raw") as img:
        img.zero(4096, 8192)
        img.write(3 * 4096, bytes(4096))        # all-zero write: same path
        img.flush()
        assert img.read(0, 5 * 4096) == b"\x02" * 4096 + bytes(3 * 4096) + b"\x02" * 4096
        assert img.allocated() < 64 * KiB        # the zero clusters were not written
    assert_judged_same(ov, b"\x02" * 4096 + bytes(3 * 4096) + b"\x02" * (2 * MiB - 4 * 4096)
                      + bytes(6 * MiB), tmp_path)


@pytest.mark.parametrize("compat,cs", [("1.1", 65536), ("0.10", 4096)])
@pytest.mark.parametrize("flush_each", [False, True])
def test_freed_clusters_are_reused(tmp_path, compat, cs, flush_each):
    """Data then zeros into the same clusters, 2,000 times: the file used to grow by
    a cluster each time (131 MB for an 8 MiB disk). Freed clusters are reused once a
    flush put their count 0 on disk; without flushes from the guest, one is forced
    when 4 MiB (or 1/8 of the file) of freed clusters wait for it."""
    size = 8 * MiB
    path = tmp_path / "r.qcow2"
    model = bytearray(size)
    with Qcow2Image.create(str(path), size, cluster_size=cs, compat=compat) as img:
        start = os.path.getsize(path)
        for i in range(300 if flush_each else 2000):       # flushes cost fsyncs
            off = (i % 3) * cs
            data = bytes([i % 255 + 1]) * cs
            img.write(off, data)
            img.write(off, bytes(cs))
            model[off:off + cs] = bytes(cs)
            if i % 5 == 0:
                img.write(off + 10, data[:50])
                model[off + 10:off + 60] = data[:50]
            if flush_each:
                img.flush()
        assert img.read(0, size) == model
    grown = os.path.getsize(path) - start
    assert grown <= (8 * cs if flush_each else 4 * MiB + 8 * cs), grown
    assert_judged_same(path, model, tmp_path)


def test_reused_cluster_with_old_bytes_reads_zeros_around_a_write(tmp_path):
    """A free cluster may still hold old bytes (qemu leaves them there): reused for a
    partial write, the rest of it must read zeros, as a fresh cluster does."""
    path = tmp_path / "old.qcow2"
    Qcow2Image.create(str(path), 8 * MiB).close()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", str(path)],
                   check=True, capture_output=True)
    host = json.loads(qemu_img("map", "--output=json", path).stdout)[0]["offset"]
    # Unmap guest cluster 0 and drop the count of its cluster, behind the engine's back:
    # a consistent image with one free cluster full of 0xaa.
    data = bytearray(path.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    rb = int.from_bytes(data[0x10000:0x10008], "big")
    data[l2:l2 + 8] = bytes(8)
    data[rb + 2 * (host >> 16):rb + 2 * (host >> 16) + 2] = bytes(2)
    path.write_bytes(data)
    assert qemu_img("check", path, check=False).returncode == 0
    with Qcow2Image(str(path)) as img:
        img.write(3 * 65536 + 100, b"new")
        img.write(6 * 65536 - 10, b"across two clusters")     # a free run of one, then more
    model = bytearray(8 * MiB)
    model[3 * 65536 + 100:3 * 65536 + 103] = b"new"
    model[6 * 65536 - 10:6 * 65536 + 10] = b"across two clusters"[:20]
    runs = json.loads(qemu_img("map", "--output=json", path).stdout)
    assert any(r.get("offset") == host for r in runs), runs        # it was reused
    assert_judged_same(path, model, tmp_path)


def test_resize_grows_and_refuses_shrink(img):
    img.write(0, b"abc")
    img.resize(10 * 1024 * MiB)
    assert img.size == 10 * 1024 * MiB
    img.write(img.size - 3, b"end")
    assert img.read(0, 3) == b"abc" and img.read(img.size - 3, 3) == b"end"
    with pytest.raises(ImageError, match="shrinking"):
        img.resize(MiB)
    img.close()
    with Qcow2Image(img.path, read_only=True) as ro:
        assert ro.size == 10 * 1024 * MiB
        assert ro.read(ro.size - 3, 3) == b"end"
    assert qemu_img("check", img.path, check=False).returncode == 0


def test_sequential_writes_are_contiguous(img):
    chunk = os.urandom(MiB)
    for i in range(32):
        img.write(i * MiB, chunk)
    img.close()
    runs = json.loads(qemu_img("map", "--output=json", img.path).stdout)
    data = [r for r in runs if r["data"]]
    # 32 MiB of data in one host run (qemu merges runs with contiguous offsets)
    assert len(data) == 1 and data[0]["length"] == 32 * MiB, data


def test_l2_cache_is_bounded(tmp_path):
    p = tmp_path / "c.qcow2"
    model = bytearray(64 * MiB)
    rng = random.Random(1)
    with Qcow2Image.create(str(p), len(model), cluster_size=4096) as img:   # 2 MiB per L2
        img._cache_max = 3
        for _ in range(300):
            off = rng.randrange(0, len(model) - 10000)
            data = rng.randbytes(rng.randrange(1, 10000))
            img.write(off, data)
            model[off:off + len(data)] = data
            assert len(img._cache) <= 3
        assert img.read(0, len(model)) == model
    assert_judged_same(p, model, tmp_path)


MODEL_VARIANTS = [("1.1", 512), ("1.1", 4096), ("1.1", 65536), ("0.10", 512),
                  ("0.10", 65536)]


@pytest.mark.parametrize("compat,cs", MODEL_VARIANTS)
@pytest.mark.parametrize("backing", [False, True])
def test_randomized_against_model(tmp_path, compat, cs, backing):
    """Thousands of random writes, zeroes, reads, flushes and reopens against a
    bytearray, through read/write and read_serial/write_serial alike."""
    size = 64 * MiB
    rng = random.Random(f"{compat}-{cs}-{backing}")
    path = str(tmp_path / "m.qcow2")
    kw = {}
    model = bytearray(size)
    if backing:
        base = bytearray(rng.randbytes(8 * MiB)) + bytes(8 * MiB)   # 16 MiB, then nothing
        base[2 * MiB:3 * MiB] = bytes(MiB)
        (tmp_path / "base.raw").write_bytes(base)
        model[:len(base)] = base
        kw = {"backing_file": "base.raw", "backing_format": "raw"}
    img = Qcow2Image.create(path, size, cluster_size=cs, compat=compat, **kw)
    if cs == 512:
        img._cache_max = 16         # force evictions of dirty tables too
    try:
        for step in range(3000):
            r = rng.random()
            big = rng.random() < 0.05
            n = rng.randrange(1, 2 * MiB if big else 3 * cs + 100)
            off = rng.randrange(0, size - n)
            if rng.random() < 0.3:          # cluster aligned, to hit the whole-cluster paths
                off -= off % cs
            # Both entry points: the one for overlapping callers, and the
            # one for a caller serving one request at a time (iopath inline).
            serial = rng.random() < 0.5
            write = img.write_serial if serial else img.write
            if r < 0.55:
                data = rng.randbytes(n)
                write(off, data)
                model[off:off + n] = data
            elif r < 0.65:
                write(off, bytes(n))
                model[off:off + n] = bytes(n)
            elif r < 0.75:
                img.zero(off, n)
                model[off:off + n] = bytes(n)
            elif r < 0.97:
                read = img.read_serial if serial else img.read
                assert read(off, n) == model[off:off + n], f"step {step}"
            elif r < 0.99:
                img.flush()
            else:
                img.close()
                img = Qcow2Image(path)
                if cs == 512:
                    img._cache_max = 16
        assert img.read(0, size) == model
        ext = img.extents()
        for e in ext:
            if e.kind is not Kind.DATA:
                assert model[e.offset:e.end] == bytes(e.length)
    finally:
        img.close()
    assert_judged_same(path, model, tmp_path)


def test_refcount_cache_is_bounded(tmp_path):
    """Refcount blocks live in a bounded LRU too; evicted dirty blocks are written."""
    p = tmp_path / "rc.qcow2"
    model = bytearray(32 * MiB)
    rng = random.Random(2)
    img = Qcow2Image.create(str(p), len(model), cluster_size=512)    # 128 KiB per block
    try:
        for step in range(400):
            img.rc.cache_max = 3
            off = rng.randrange(0, len(model) - 70000)
            data = rng.randbytes(rng.randrange(1, 70000)) if step % 5 else bytes(30000)
            img.write(off, data)
            model[off:off + len(data)] = data
            assert len(img.rc.blocks) <= 3
            if step % 50 == 49:
                img.close()
                img = Qcow2Image(str(p))
        assert img.read(0, len(model)) == model
    finally:
        img.close()
    assert_judged_same(p, model, tmp_path)


def _overlay(tmp_path, compat, cs, old_size, written):
    """A qemu-made overlay of old_size over a random 2.5 MiB raw file; returns (path, model)."""
    base = random.Random(cs).randbytes(5 * MiB // 2)
    (tmp_path / "base.raw").write_bytes(base)
    path = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cs}",
             "-b", "base.raw", "-F", "raw", path, old_size)
    model = bytearray(base[:old_size])
    if written:     # the last, partial cluster is allocated in the overlay
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 {old_size - 1536} 1k",
                        str(path)], check=True, capture_output=True)
        model[old_size - 1536:old_size - 512] = b"\x33" * 1024
    return path, model


@pytest.mark.parametrize("written", [False, True])
@pytest.mark.parametrize("compat,cs", [("1.1", 65536), ("1.1", 512), ("0.10", 65536),
                                       ("0.10", 512)])
def test_grow_over_larger_backing_reads_zeros(tmp_path, compat, cs, written):
    """Like qemu-img resize: the new area must not show the backing file's bytes past
    the old end (the old end here is not cluster aligned; with 512-byte clusters the
    L1 table also moves)."""
    old, new = MiB + 512, 3 * MiB
    path, model = _overlay(tmp_path, compat, cs, old, written)
    model += bytes(new - old)
    with Qcow2Image(str(path)) as img:
        img.resize(new)
        assert img.read(0, new) == model
    with Qcow2Image(str(path), read_only=True) as img:
        assert img.size == new and img.read(0, new) == model
    assert_judged_same(path, model, tmp_path)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_grow_over_backing_is_crash_safe(tmp_path, compat, monkeypatch):
    """Crash the resize at its Nth pwrite: the image is clean (or leaks) and reads as
    either the old disk or the grown one with zeros, never backing bytes past the old end."""
    old, new = MiB + 512, 3 * MiB
    src, model = _overlay(tmp_path, compat, 512, old, True)
    grown = model + bytes(new - old)
    work = tmp_path / "work.qcow2"
    real_pwrite, count = os.pwrite, [0, 0]

    class Crash(BaseException):
        pass

    def pwrite(fd, data, off):
        count[0] += 1
        if count[0] == count[1]:
            raise Crash
        return real_pwrite(fd, data, off)

    def attempt(n):
        work.write_bytes(src.read_bytes())
        count[:] = [0, n]
        img = Qcow2Image(str(work))
        img._cache_max, img.rc.cache_max = 4, 2         # evictions force syncs mid-resize
        monkeypatch.setattr(os, "pwrite", pwrite)
        try:
            img.resize(new)
            done = True
        except Crash:
            done = False
        finally:
            monkeypatch.setattr(os, "pwrite", real_pwrite)
            img._close_files()                           # no flush: the "crash"
        return done

    assert attempt(0)                   # no crash: count the pwrites
    total = count[0]
    assert total > 20
    for n in [*range(1, total, max(1, total // 40)), total - 1, total, 0]:    # 0: no crash
        assert attempt(n) == (n == 0)
        r = qemu_img("check", work, check=False)
        assert r.returncode in (0, 3), f"crash at pwrite {n}:\n{r.stdout}"
        with Qcow2Image(str(work), read_only=True) as img:
            assert img.size == (old if n else new), n
            assert img.read(0, img.size) == (model if n else grown), n
