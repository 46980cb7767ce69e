"""Hostile qcow2 headers and tables: each refused with a clear ImageError, nothing changed.

Images are made by qemu-img and then patched with struct, the way an attacker
(or a bit flip) would.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tracemalloc

import pytest

from conftest import qemu_img
from vbdfs.images import ImageError, ReadOnlyImage, open_image
from vbdfs.images.qcow2 import Qcow2Image

MiB = 1 << 20


@pytest.fixture
def good(tmp_path):
    """A qemu-made v3 image with some data: 64 KiB clusters, 16 MiB."""
    path = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 16 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", str(path)],
                   check=True, capture_output=True)
    return path


def patched(good, tmp_path, name, *patches):
    """A copy of the good image with (struct format, offset, value) patches applied."""
    path = tmp_path / name
    data = bytearray(good.read_bytes())
    for fmt, off, value in patches:
        struct.pack_into(fmt, data, off, value)
    path.write_bytes(data)
    return path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(path, match, **kw):
    before = sha(path)
    for read_only in (True, False):
        with pytest.raises(ImageError, match=match) as exc:
            Qcow2Image(str(path), read_only=read_only, **kw)
        assert str(path) in str(exc.value)           # the message names the file
    assert sha(path) == before                       # and nothing was changed


def assert_good_still_opens(good):
    with open_image(str(good), "qcow2") as img:
        assert img.read(0, 4) == b"\x5a" * 4


HEADER_CASES = [
    ("huge_l1", [(">I", 36, 0x7FFFFFFF)], "L1 table too large"),
    ("l1_unaligned", [(">Q", 40, 0x30000 + 512)], "L1 table offset .* not cluster aligned"),
    ("l1_past_eof", [(">Q", 40, 1 << 40)], "L1 table .* outside the file"),
    ("l1_too_small", [(">Q", 24, 1 << 50)], "L1 table too (small|large)"),
    ("cluster_bits_8", [(">I", 20, 8)], "cluster_bits 8 out of range"),
    ("cluster_bits_22", [(">I", 20, 22)], "cluster_bits 22 out of range"),
    ("refcount_table_past_eof", [(">Q", 48, 1 << 40)], "refcount table .* outside the file"),
    ("refcount_table_huge", [(">I", 56, 1 << 20)], "refcount table too large"),
    ("refcount_table_unaligned", [(">Q", 48, 0x10000 + 8)], "refcount table .* aligned"),
    ("unknown_incompat_bit", [(">Q", 72, 1 << 10)], "incompatible feature bit 10"),
    ("external_data_file", [(">Q", 72, 1 << 2)], "external data file"),
    ("unknown_compression_type", [(">Q", 72, 1 << 3), (">B", 104, 2)],
     "unknown compression type 2"),
    ("compression_bit_with_zlib", [(">Q", 72, 1 << 3)], "compression_type is zlib"),
    ("extended_l2_small_clusters", [(">Q", 72, 1 << 4), (">I", 20, 13)],
     "extended L2 entries need clusters of at least 16384"),
    ("encrypted_aes", [(">I", 32, 1)], "encrypt"),
    ("encrypted_luks", [(">I", 32, 2)], "encrypt"),
    ("bad_magic", [(">4s", 0, b"QFI\0")], "bad magic"),
    ("version_4", [(">I", 4, 4)], "unsupported qcow2 version 4"),
    ("version_1", [(">I", 4, 1)], "unsupported qcow2 version 1"),
    ("header_length_short", [(">I", 100, 96)], "header_length"),
    ("header_length_odd", [(">I", 100, 108)], "header_length"),
    ("header_length_huge", [(">I", 100, 1 << 20)], "header_length"),
    ("too_many_snapshots", [(">I", 60, 65537)], "too many snapshots"),
    ("snapshots_unaligned", [(">I", 60, 1), (">Q", 64, 0x10000 + 8)], "snapshot table"),
    ("snapshots_past_eof", [(">I", 60, 1), (">Q", 64, 1 << 40)], "snapshot table"),
    ("backing_name_too_long", [(">Q", 8, 0x1000), (">I", 16, 2000)],
     "backing file name too long"),
    ("refcount_order_7", [(">I", 96, 7)], "refcount_order 7"),
]


@pytest.mark.parametrize("name,patches,match", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header_refused(good, tmp_path, name, patches, match):
    path = patched(good, tmp_path, name, *patches)
    assert_refused(path, match)
    assert_good_still_opens(good)


def test_truncated_files_refused(good, tmp_path):
    for n in (0, 3, 50, 100):
        path = tmp_path / f"short{n}"
        path.write_bytes(good.read_bytes()[:n])
        assert_refused(path, "too short|bad magic")
    assert_good_still_opens(good)


def test_backing_outside_store_refused(tmp_path, good):
    store = tmp_path / "store"
    (store / "inst").mkdir(parents=True)
    path = store / "inst" / "sda"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../../etc/shadow", "-F", "raw",
             path, MiB)
    assert_refused(path, r"backing file '\.\./\.\./etc/shadow' resolves to .* outside the store",
                   store_root=str(store))
    # absolute names and symlinks that leave the store are refused the same way
    link = store / "inst" / "link"
    os.symlink("/etc/hostname", link)
    for i, name in enumerate(["/etc/hostname", "link"]):
        p = store / "inst" / f"sd{i}"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", p, MiB)
        assert_refused(p, "outside the store", store_root=str(store))
    assert_good_still_opens(good)


def test_backing_missing_loop_and_depth(tmp_path, good):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, MiB)
    assert_refused(a, "loops", store_root=str(tmp_path))
    missing = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nowhere.raw", "-F", "raw", missing, MiB)
    assert_refused(missing, "not found")
    chain = tmp_path / "c0.raw"
    chain.write_bytes(b"")
    prev, fmt = chain.name, "raw"
    for i in range(1, 18):
        p = tmp_path / f"c{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F", fmt, p, MiB)
        prev, fmt = p.name, "qcow2"
        if i == 15:     # 15 qcow2 layers over a raw file: 16 images, the limit
            with Qcow2Image(str(p), read_only=True) as img:
                assert img.read(0, 10) == bytes(10)
    assert_refused(tmp_path / "c17.qcow2", "deeper than 16")
    assert_good_still_opens(good)


def test_backing_format_never_guessed(tmp_path, good):
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * 4096)
    path = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", path, MiB)
    # Rename the backing-format extension to an unknown type: the format is gone.
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack(">I", 0xE2792ACA))
    struct.pack_into(">I", data, at, 0x0BADF00D)
    path.write_bytes(data)
    assert_refused(path, "format of backing file 'base.raw' is not recorded")
    with Qcow2Image(str(path), read_only=True, backing_format="raw") as img:
        assert img.read(0, 4096) == b"B" * 4096
    # a backing format we do not know is refused by name
    struct.pack_into(">I", data, at, 0xE2792ACA)
    data[at + 8:at + 11] = b"vmd"
    path.write_bytes(data)
    assert_refused(path, "unsupported format 'vmd'")
    assert_good_still_opens(good)


def _l2_entry_offset(path):
    data = path.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    return l2_off


@pytest.mark.parametrize("entry,match", [
    ((1 << 63) | (1 << 40), "outside the file"),
    ((1 << 63) | 0x50000 + 512, "invalid"),
    ((1 << 63), "invalid"),
])
def test_bad_l2_entry_fails_at_access(good, tmp_path, entry, match):
    l2 = _l2_entry_offset(good)
    path = patched(good, tmp_path, "badl2", (">Q", l2, entry))
    before = sha(path)
    with Qcow2Image(str(path)) as img:      # opening is fine: tables are checked on use
        with pytest.raises(ImageError, match=match):
            img.read(0, 512)
        with pytest.raises(ImageError, match=match):
            img.write(100, b"x")
        with pytest.raises(ImageError, match=match):
            img.extents(0, 65536)
        assert img.read(65536, 4) == b"\x5a" * 4     # the rest of the disk still works
    assert sha(path) == before
    assert_good_still_opens(good)


COMPRESSED, COPIED, ZERO_FLAG = 1 << 62, 1 << 63, 1
# A compressed descriptor of a 64 KiB-cluster image: offset in bits 0..53,
# (sectors - 1) in bits 54..61.
def _compressed(offset, sectors):
    return COMPRESSED | (sectors - 1) << 54 | offset


# In the qemu-made images: header 0x0, refcount table 0x10000, refcount block
# 0x20000, L1 0x30000, L2 0x40000, data 0x50000 and 0x60000; with a snapshot
# also its L1 at 0x70000 and the snapshot table at 0x80000.
OVERLAP_CASES = [
    ("compressed_on_header", _compressed(0, 1), "the header"),
    ("compressed_over_block_and_l1", _compressed(0x2FE00, 4), "a refcount block"),
    ("l1_without_copied", 0x30000, "the L1 table"),
    ("refcount_block", 0x20000, "a refcount block"),
    ("refcount_table", 0x10000, "the refcount table"),
    ("own_l2_table", 0x40000, "an L2 table"),
    ("preallocated_zero_on_l1", 0x30000 | ZERO_FLAG, "the L1 table"),
    ("copied_on_refcount_block", COPIED | 0x20000, "a refcount block"),
    ("snapshot_table", 0x80000, "the snapshot table"),
    ("snapshot_l1", 0x70000, "a snapshot's L1 table"),
]


def hostile_image(good, tmp_path, entry, snapshot):
    """The good image (with an internal snapshot if asked) whose guest cluster 0
    maps to `entry`."""
    if snapshot:
        qemu_img("snapshot", "-c", "s1", good)
        assert struct.unpack_from(">IQ", good.read_bytes(), 60) == (1, 0x80000)
    return patched(good, tmp_path, "hostile", (">Q", _l2_entry_offset(good), entry))


def assert_only_marked_corrupt(path, before):
    """Nothing but the corrupt bit changed; qemu-img still opens the image."""
    want = bytearray(before)
    want[79] |= 2
    assert path.read_bytes() == want
    info = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True)
    assert info.returncode == 0 and "corrupt: true" in info.stdout, info.stdout + info.stderr
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode in (0, 2, 3), check.stdout + check.stderr   # 1: could not check


@pytest.mark.parametrize("op", ["write", "zero"])
@pytest.mark.parametrize("name,entry,what", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_data_pointer_into_metadata_is_refused(good, tmp_path, name, entry, what, op):
    """A guest cluster mapped onto metadata: writing or zeroing it (then flushing)
    used to free and punch the header, the L1 table or a refcount block, or to
    leave them at refcount 0. Now the request fails, nothing changes but the
    corrupt bit (set as qemu does), and the image stays readable."""
    path = hostile_image(good, tmp_path, entry, snapshot=name.startswith("snapshot"))
    before = path.read_bytes()
    img = Qcow2Image(str(path))
    try:
        with pytest.raises(ImageError, match=f"guest offset 0x0 would hit image metadata: "
                                             f"{what}.*the image is corrupt") as exc:
            if op == "write":
                img.write(0, b"\xee" * 65536)
            else:
                img.zero(0, 65536)
        assert str(path) in str(exc.value)
        assert img.read_only and "corrupt" in img.read_only_reason
        with pytest.raises(ReadOnlyImage, match="corrupt"):
            img.write(65536, b"x")
        img.flush()
        assert img.read(65536, 4) == b"\x5a" * 4       # the rest still reads
    finally:
        img.close()
    assert_only_marked_corrupt(path, before)
    with Qcow2Image(str(path)) as again:                # read-only from now on
        assert again.read_only and "marked corrupt" in again.read_only_reason


def test_free_cluster_that_is_metadata_is_not_reused(good, tmp_path):
    """The L1 table counted 0 (in-use metadata that looks free): allocation, which
    reuses free clusters now, must not hand it out for guest data."""
    path = patched(good, tmp_path, "l1_free", (">H", 0x20000 + 2 * 3, 0))
    before = path.read_bytes()
    with Qcow2Image(str(path)) as img:
        with pytest.raises(ImageError, match="would hit image metadata: the L1 table "
                                             r"\(cluster 3\)"):
            img.write(4 * MiB, b"new data")
        assert img.read(0, 4) == b"\x5a" * 4
    assert_only_marked_corrupt(path, before)


def test_writes_before_the_hit_are_kept(good, tmp_path):
    """The refused request changes nothing; what the guest wrote before it (not yet
    flushed) still reaches the file, so the repaired image holds it."""
    path = hostile_image(good, tmp_path, 0x30000, snapshot=False)
    with Qcow2Image(str(path)) as img:
        img.write(5 * 65536 + 7, b"kept")
        with pytest.raises(ImageError, match="the L1 table"):
            img.write(0, b"\xee" * 65536)
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(path)], capture_output=True)
    with Qcow2Image(str(path)) as img:
        assert not img.read_only
        assert img.read(5 * 65536 + 7, 4) == b"kept"
        assert img.read(65536, 4) == b"\x5a" * 4


@pytest.mark.parametrize("case,match", [
    ("l1_on_itself", "the L2 table of L1 entry 0 at 0x30000 overlaps the L1 table"),
    ("two_l1_entries_one_l2", "the L2 table of L1 entry 1 at 0x40000 overlaps an L2 table"),
    ("l2_on_refcount_table", "the refcount table at 0x10000 overlaps an L2 table"),
    ("snapshot_l1_on_refcount_table", "the refcount table at 0x10000 overlaps a snapshot's L1"),
])
def test_metadata_overlapping_metadata_refused_for_writing(good, tmp_path, case, match):
    qemu_img("snapshot", "-c", "s1", good)
    l1 = 0x30000
    patches = {"l1_on_itself": [(">Q", l1, l1)],
               "two_l1_entries_one_l2": [(">I", 36, 2), (">Q", l1 + 8, 0x40000)],
               "l2_on_refcount_table": [(">Q", l1, 0x10000)],
               "snapshot_l1_on_refcount_table": [(">Q", 0x80000, 0x10000)]}[case]
    path = patched(good, tmp_path, case, *patches)
    before = sha(path)
    with pytest.raises(ImageError, match=match):
        Qcow2Image(str(path))
    with Qcow2Image(str(path), read_only=True) as img:
        img.read(0, 4)
    assert sha(path) == before


def test_bad_l1_entry_fails_at_access(good, tmp_path):
    l1_off = struct.unpack_from(">Q", good.read_bytes(), 40)[0]
    path = patched(good, tmp_path, "badl1", (">Q", l1_off, (1 << 63) | (1 << 45)))
    with Qcow2Image(str(path), read_only=True) as img:
        with pytest.raises(ImageError, match="L1 entry 0"):
            img.read(0, 512)


def test_corrupt_bit_forces_read_only(good, tmp_path):
    path = patched(good, tmp_path, "corrupt", (">Q", 72, 2))
    before = sha(path)
    with Qcow2Image(str(path)) as img:
        assert img.read_only
        assert img.read(0, 4) == b"\x5a" * 4
        with pytest.raises(ReadOnlyImage, match="marked corrupt"):
            img.write(0, b"x")
        with pytest.raises(ReadOnlyImage, match="marked corrupt"):
            img.resize(32 * MiB)
    assert sha(path) == before


def test_dirty_bit_repaired_on_writable_open_only(good, tmp_path):
    """A dirty image reads as it is when opened read-only (nothing changes) and is
    repaired (bit cleared, refcounts rebuilt) when opened for writing."""
    path = patched(good, tmp_path, "dirty", (">Q", 72, 1))
    before = sha(path)
    with Qcow2Image(str(path), read_only=True) as img:
        assert img.read(0, 4) == b"\x5a" * 4 and img.read_only_reason is None
    assert sha(path) == before
    with Qcow2Image(str(path)) as img:
        assert not img.read_only and "marked dirty" in img.repaired
        img.write(0, b"x")
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] == 0
    assert qemu_img("check", path).returncode == 0


def test_other_refcount_widths_writable(tmp_path):
    path = tmp_path / "r32.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=32", path, MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4k", str(path)],
                   check=True, capture_output=True)
    with Qcow2Image(str(path)) as img:
        assert img.read(0, 4096) == b"\x07" * 4096
        img.write(65536, b"x" * 512)
    assert qemu_img("check", path).returncode == 0


def _layout(path):
    """(refcount table offset, first refcount block offset, L1 offset, first L2 offset)."""
    data = path.read_bytes()
    rt, l1 = struct.unpack_from(">Q", data, 48)[0], struct.unpack_from(">Q", data, 40)[0]
    return rt, struct.unpack_from(">Q", data, rt)[0], l1, _l2_entry_offset(path)


@pytest.mark.parametrize("case,match", [
    ("all_same_block", "refcount block 1 at .* is used twice"),
    ("unaligned", "refcount block 1 at .* is not cluster aligned"),
    ("past_eof", "refcount block 1 at .* lies outside the file"),
    ("on_l1", "refcount block 1 at .* overlaps"),
    ("on_l2", "refcount block 1 at .* overlaps"),
    ("on_refcount_table", "refcount block 1 at .* overlaps"),
])
def test_bad_refcount_table_refused_for_writing(good, tmp_path, case, match):
    """A refcount block used twice, misplaced or on other metadata is refused at a
    writable open (the all-same-block case used to make one 4 KiB write run for
    minutes, loading the block again and again). Reading needs no refcounts."""
    rt, rb, l1, l2 = _layout(good)
    data = bytearray(good.read_bytes())
    if case == "all_same_block":    # every entry -> one block in which every cluster is used
        struct.pack_into(">8192Q", data, rt, *[rb] * 8192)
        struct.pack_into(">32768H", data, rb, *[1] * 32768)
    else:
        bad = {"unaligned": rb + 512, "past_eof": 1 << 40, "on_l1": l1, "on_l2": l2,
               "on_refcount_table": rt}[case]
        struct.pack_into(">Q", data, rt + 8, bad)
    path = tmp_path / "badrt.qcow2"
    path.write_bytes(data)
    before = sha(path)
    with pytest.raises(ImageError, match=match) as exc:
        Qcow2Image(str(path))
    assert str(path) in str(exc.value)
    with Qcow2Image(str(path), read_only=True) as img:
        assert img.read(0, 4) == b"\x5a" * 4
    assert sha(path) == before


def test_counted_clusters_past_eof_are_never_reused(good, tmp_path):
    """Clusters qemu counted but never wrote (a crash leak) lie past the end of the
    file: allocation starts after the highest of them and never hands one out."""
    rt, rb, _, _ = _layout(good)
    data = bytearray(good.read_bytes())
    eof = -(-len(data) // 65536)
    for c in [*range(eof, eof + 40), 5000]:
        struct.pack_into(">H", data, rb + 2 * c, 1)
    path = tmp_path / "leaky.qcow2"
    path.write_bytes(data)
    with Qcow2Image(str(path)) as img:
        assert img.rc.next_free == 5001
        img.write(MiB, b"\x77" * 4096)
        img.write(8 * MiB, os.urandom(3 * 65536))
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 3 and "41 leaked clusters" in r.stdout, r.stdout   # leaks only
    with Qcow2Image(str(path), read_only=True) as img:
        assert img.read(MiB, 4096) == b"\x77" * 4096
        assert img.read(0, 4) == b"\x5a" * 4


def test_l1_checked_at_writable_open(tmp_path):
    """Every L1 entry is checked before it is remembered as metadata: millions of
    bogus entries used to cost hundreds of MiB per open."""
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, 4096 * MiB)     # 8 L1 entries
    l1_off = struct.unpack_from(">Q", big.read_bytes(), 40)[0]
    # Room past the metadata, so the unaligned entry points at plain file space.
    spare = -(-big.stat().st_size // 65536) * 65536
    os.truncate(big, spare + 2 * 65536)
    for i, e, what in [(3, 1 << 45, "outside"), (5, spare + 512, "unaligned")]:
        path = patched(big, tmp_path, f"l1_{what}", (">Q", l1_off + 8 * i, (1 << 63) | e))
        before = sha(path)
        with pytest.raises(ImageError, match=f"L1 entry {i} .* invalid or points outside"):
            Qcow2Image(str(path))
        assert sha(path) == before


def test_huge_hostile_l1_is_cheap_to_refuse(tmp_path):
    """The reviewer's image: a 32 MiB L1 of distinct entries, nearly all past the end."""
    path = tmp_path / "bigl1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 64 * MiB)
    n = (32 * MiB) // 8
    end = -(-path.stat().st_size // 65536) * 65536
    with open(path, "r+b") as f:
        f.seek(end)
        for k in range(0, n, 1 << 16):     # entry i -> cluster i + 1
            f.write(struct.pack(f">{1 << 16}Q", *((i + 1) << 16 for i in range(k, k + (1 << 16)))))
        f.seek(36)
        f.write(struct.pack(">I", n))
        f.seek(40)
        f.write(struct.pack(">Q", end))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="L1 entry [0-9]+ .* (outside the file|overlaps)"):
            Qcow2Image(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * MiB, peak        # the 32 MiB table (read, then swapped), no more


def test_refcount_underflow_stops_writing_consistently(good, tmp_path):
    """A free the refcounts cannot cover (corrupt image) fails before any count changes,
    and the image turns read-only instead of failing again on every later flush."""
    data = good.read_bytes()
    rt, rb, _, l2 = _layout(good)
    host0, host1 = (struct.unpack_from(">Q", data, l2 + 8 * i)[0] & 0x00FFFFFFFFFFFE00
                    for i in (0, 1))
    path = patched(good, tmp_path, "under", (">H", rb + 2 * (host1 >> 16), 0))
    img = Qcow2Image(str(path))
    try:
        img.zero(0, 2 * 65536)          # frees host0 (count 1), then host1 (count 0)
        with pytest.raises(ImageError, match=f"refcount underflow at cluster {host1 >> 16}"):
            img.flush()
        assert img.read_only and img._pending_free == []
        assert img.rc.get(host0 >> 16) == 1          # nothing half applied
        with pytest.raises(ReadOnlyImage, match="refcount underflow"):
            img.write(0, b"x")
        img.flush()                                   # nothing more to do, no error
        assert img.read(0, 2 * 65536) == bytes(2 * 65536)
    finally:
        img.close()
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 3, r.stdout      # the zeroing is on disk; host0 merely leaks
