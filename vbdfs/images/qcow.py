"""Legacy QCOW (version 1) images, as qemu's 'qcow' driver and blktap's
`tap:qcow` wrote them: read-only.

The format (qemu's block/qcow.c is the reference): a 48-byte big-endian
header (magic, version 1, backing file offset and length, mtime, virtual size,
cluster_bits, l2_bits, crypt_method, L1 offset), an L1 table of
ceil(size / 2^(cluster_bits + l2_bits)) entries holding L2 table offsets, and
L2 tables of 2^l2_bits entries. An L2 entry is 0 (unallocated: the backing
file, or zeros), a host offset, or, with bit 63 set, a compressed cluster:
offset in the low 63 - cluster_bits bits, byte count above them, raw deflate
with a 4 KiB window (zlib windowBits -12). No refcounts, no flags, no
snapshots, no zero clusters.

blktap writes a "XEN\\xfb" extension right after the header when the L1 sits
on a 4 KiB boundary; without its L1_BIG_ENDIAN flag (old tapdisks) the L1
table was written in the host's byte order (little endian on x86), which
blktap itself swapped on the next open. Such an image is read as blktap
would read it.

Choices:
* Read-only. The disk is served, with `read_only_reason` saying why writes
  fail and how to get a writable disk (`vbdctl convert --to qcow2`).
* Refused by name: encryption (AES, crypt_method 1), and every header value
  outside qemu's limits (cluster 512 B-64 KiB, L2 tables 512 B-64 KiB) or
  outside the file; the L1 table is bounded like qcow2's (32 MiB). L2 and
  cluster offsets are checked against the file when used.
* Backing files are resolved like qcow2's, by the same code (qcow_common:
  relative to the image, inside the store, no symlink, no loop, at most
  MAX_CHAIN deep). A version 1 header has no place for the backing file's
  format, and vbdfs never guesses a format from content (CVE-2008-2004): the
  format is the caller's `backing_format`, or raw, which reads the file's
  bytes and follows nothing. A backing file that starts with a qcow magic is
  then refused rather than read as raw bytes it is not (blktap, too, read a
  non-qcow backing file as raw).
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections import OrderedDict

from .base import Extent, Image, ImageError, Kind, ReadOnlyImage, merge_extents
from .confined import open_regular
from .fileops import allocated_bytes, pread_full
from .qcow_common import QcowCommon

MAGIC = b"QFI\xfb"
XEN_MAGIC = b"XEN\xfb"
XEN_L1_BIG_ENDIAN = 0x02
HEADER = struct.Struct(">4sIQIIQBBHIQ")     # 48 bytes
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16  # qemu's limits
MIN_L2_BITS, MAX_L2_BITS = 6, 13            # L2 tables of 512 B .. 64 KiB
MAX_L1_BYTES = 32 << 20                     # as qcow2 (qemu's QCOW_MAX_L1_SIZE)
MAX_BACKING_NAME = 1023
L2_CACHE_BYTES = 16 << 20
COMPRESSED = 1 << 63
CRYPT_AES = 1

READ_ONLY_REASON = ("legacy QCOW (version 1) images are served read-only; to write the "
                    "disk, convert it to qcow2 (vbdctl convert INSTANCE DISK --to qcow2)")

_DATA, _UNALLOC, _COMPRESSED = range(3)


class QcowImage(QcowCommon, Image):
    format = "qcow"

    def __init__(self, path: str, read_only: bool = True, store_root: str | None = None,
                 backing_format: str | None = None, _chain: frozenset = frozenset()):
        """Open an image (always read-only). `backing_format` names the backing
        file's format, which a version 1 header does not record (default raw)."""
        self.fd = open_regular(path, os.O_RDONLY, store_root)
        self.backing = None
        try:
            self._open(path, store_root, backing_format, _chain)
        except BaseException:
            self.close()
            raise

    def _open(self, path, store_root, backing_format, chain) -> None:
        self._file_end = file_size = os.fstat(self.fd).st_size
        head = pread_full(self.fd, HEADER.size + 16, 0)
        fail = lambda why: self._fail(path, why)     # noqa: E731
        if file_size < HEADER.size:
            fail("file too short for a QCOW header")
        (magic, version, backing_offset, backing_len, _mtime, size, cluster_bits, l2_bits,
         _pad, crypt_method, l1_offset) = HEADER.unpack_from(head)
        if magic != MAGIC:
            fail("not a QCOW image (bad magic)")
        if version != 1:
            fail(f"not a QCOW version 1 image (version {version}; versions 2 and 3 "
                 f"are format qcow2)")
        if crypt_method == CRYPT_AES:
            fail("AES-encrypted QCOW images are not supported (crypt_method 1)")
        if crypt_method:
            fail(f"invalid encryption method {crypt_method} in the header")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            fail(f"cluster_bits {cluster_bits} out of range "
                 f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
        if not MIN_L2_BITS <= l2_bits <= MAX_L2_BITS:
            fail(f"l2_bits {l2_bits} out of range ({MIN_L2_BITS}..{MAX_L2_BITS})")
        if size <= 1:
            fail(f"virtual size {size} is too small")
        shift = cluster_bits + l2_bits
        l1_size = -(-size // (1 << shift))
        if l1_size * 8 > MAX_L1_BYTES:
            fail(f"L1 table too large ({l1_size} entries, limit {MAX_L1_BYTES // 8}): "
                 f"virtual size {size} is too large")
        if l1_offset < HEADER.size or l1_offset + l1_size * 8 > file_size:
            fail(f"L1 table ({l1_offset:#x}+{l1_size * 8}) overlaps the header or lies "
                 f"outside the file (size {file_size})")
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.l2_bits = l2_bits
        self.l2_mask = (1 << l2_bits) - 1
        self.l2_bytes = 8 << l2_bits
        self.offset_mask = (1 << (63 - cluster_bits)) - 1
        self.read_only_reason = READ_ONLY_REASON
        super().__init__(path, size // 512 * 512, True)     # qemu counts whole sectors

        # blktap's extension: an L1 without the big-endian flag is little endian.
        big_endian = not (l1_offset % 4096 == 0 and head[48:52] == XEN_MAGIC
                          and not struct.unpack_from(">I", head, 60)[0] & XEN_L1_BIG_ENDIAN)
        self.l1 = _load(self.fd, l1_size * 8, l1_offset, big_endian)
        self._cache: OrderedDict[int, array] = OrderedDict()
        self._cache_max = max(8, L2_CACHE_BYTES // self.l2_bytes)
        self._cz = (None, b"")          # last decompressed cluster
        self._zeros = bytes(self.cs)

        if backing_offset:
            if not 0 < backing_len <= MAX_BACKING_NAME:
                fail(f"backing file name length {backing_len} out of range "
                     f"(1..{MAX_BACKING_NAME})")
            if backing_offset + backing_len > file_size:
                fail("backing file name lies outside the file")
            raw = pread_full(self.fd, backing_len, backing_offset)
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                fail("backing file name is not valid UTF-8")
            if "\0" in name:
                fail("invalid backing file name")
            self.backing_file = name
            self.backing = self._open_backing(name, store_root, backing_format, chain)
        else:
            self.backing_file = None

    @staticmethod
    def _fail(path: str, why: str):
        raise ImageError(f"{path}: {why}")

    def _open_backing(self, name, store_root, fmt, chain) -> Image:
        img = self._open_backing_file(name, fmt or "raw", store_root, chain)
        if fmt is None and img.read(0, 4) == MAGIC:
            img.close()
            raise ImageError(
                f"{self.path}: backing file {name!r}: it starts with a qcow header, but a "
                f"QCOW version 1 image does not record its backing file's format and vbdfs "
                f"never guesses one from content; rebase or convert the chain to qcow2 "
                f"with qemu-img, giving the backing format (-F)")
        return img

    @classmethod
    def create(cls, path: str, size: int, **options) -> "QcowImage":
        raise ImageError(f"{path}: vbdfs does not create QCOW version 1 images (a legacy "
                         f"format, served read-only); use qcow2")

    # --- mapping ---------------------------------------------------------------
    def _l2(self, l1i: int) -> array | None:
        t = self._cache.get(l1i)
        if t is not None:
            self._cache.move_to_end(l1i)
            return t
        off = self.l1[l1i]
        if not off:
            return None
        if off + self.l2_bytes > self._file_end:
            raise ImageError(f"{self.path}: L1 entry {l1i} ({off:#x}) points outside the file")
        t = self._cache[l1i] = _load(self.fd, self.l2_bytes, off, True)
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return t

    def _kind(self, e: int, g: int) -> int:
        if not e:
            return _UNALLOC
        if e & COMPRESSED:
            return _COMPRESSED
        if e & 511 or e >= self._file_end:
            raise ImageError(f"{self.path}: L2 entry for guest offset "
                             f"{g << self.cluster_bits:#x} ({e:#x}) is invalid or points "
                             f"outside the file")
        return _DATA

    def _map(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host offset or entry, length) of the longest uniform run at pos."""
        bits = self.cluster_bits
        g = pos >> bits
        l1i = g >> self.l2_bits
        tab_end = min(end, (l1i + 1) << (self.l2_bits + bits))
        t = self._l2(l1i)
        if t is None:
            return _UNALLOC, 0, tab_end - pos
        i = g & self.l2_mask
        e = t[i]
        kind = self._kind(e, g)
        nxt = (g + 1) << bits
        if kind == _COMPRESSED:
            return kind, e, min(nxt, tab_end) - pos
        host = e + (pos & (self.cs - 1)) if kind == _DATA else 0
        expect = e + self.cs
        while nxt < tab_end:
            i += 1
            g += 1
            e2 = t[i]
            if kind == _DATA:
                if e2 != expect or self._kind(e2, g) != _DATA:
                    break
                expect += self.cs
            elif e2:
                break
            nxt += self.cs
        return kind, host, min(nxt, tab_end) - pos

    def _compressed_span(self, e: int, g: int) -> tuple[int, int]:
        """(host offset, byte count) of compressed entry e (see qcow_common)."""
        off = e & self.offset_mask
        n = (e >> (63 - self.cluster_bits)) & (self.cs - 1)
        if off + n > self._file_end:
            raise ImageError(f"{self.path}: compressed cluster at guest offset "
                             f"{g << self.cluster_bits:#x} lies outside the file")
        return off, n

    # --- the interface -------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        length = self.clamp_read(offset, length)
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            kind, host, n = self._map(pos, end)
            if kind == _DATA:
                parts.append(pread_full(self.fd, n, host))
            elif kind == _UNALLOC:
                parts.append(self._backing_read(pos, n))
            else:
                inoff = pos & (self.cs - 1)
                parts.append(self._decompress(host, pos >> self.cluster_bits)[inoff:inoff + n])
            pos += n
        return b"".join(parts)

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            kind, _, n = self._map(pos, end)
            if kind != _UNALLOC:
                out.append(Extent(pos, n, Kind.DATA))
            else:
                b = self.backing
                inside = 0 if b is None else max(0, min(n, b.size - pos))
                if inside:
                    out.extend(b.extents(pos, inside))
                if inside < n:
                    out.append(Extent(pos + inside, n - inside, Kind.HOLE))
            pos += n
        return merge_extents(out)

    def check_writable(self) -> None:
        raise ReadOnlyImage(f"{self.path}: read-only: {self.read_only_reason}")

    def write(self, offset: int, data) -> None:
        self.check_writable()

    def zero(self, offset: int, length: int) -> None:
        self.check_writable()

    def resize(self, new_size: int) -> None:
        self.check_writable()

    def flush(self) -> None:
        pass                            # nothing is ever written

    def allocated(self) -> int:
        return allocated_bytes(self.fd)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _load(fd: int, nbytes: int, offset: int, big_endian: bool) -> array:
    """A table of 64-bit entries, in native order."""
    a = array("Q", pread_full(fd, nbytes, offset))
    if big_endian == (sys.byteorder == "little"):
        a.byteswap()
    return a
