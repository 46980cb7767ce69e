"""The qcow2 header: parse and validate an untrusted one, build a new one.

Everything here treats the file as hostile (a guest or a downloaded image may
have crafted it): every offset and size is checked against qemu's own limits
before anything is read through it. Layout from qemu docs/interop/qcow2.rst.

Header rewrites patch fixed fields in place (see `Header.patch`), so unknown
v3 header fields (header_length > 104) and unknown header extensions survive
every rewrite without this module having to understand them.
"""

from __future__ import annotations

import struct

from . import qcow2_compress
from .base import ImageError

MAGIC = b"QFI\xfb"
V2_LEN = 72
V3_LEN = 104
MIN_CLUSTER_BITS = 9            # 512 B
MAX_CLUSTER_BITS = 21           # 2 MiB: qemu's implementation limit
MAX_L1_BYTES = 32 << 20         # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20    # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS      # qemu's QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOT_EXTRA = 1024       # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
SNAPSHOT_ENTRY_MIN = 40         # fixed part of one snapshot table entry
MAX_BACKING_NAME = 1023

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_EXTL2 = 1 << 4
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
MIN_EXTL2_CLUSTER_BITS = 14     # qemu: subclusters need clusters of 16 KiB or more
_INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file",   # by bit number
                   3: "compression type", 4: "extended L2 entries"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441
EXT_BITMAPS = 0x23852875

# Persistent dirty bitmaps (qemu's limits, block/qcow2.h and qcow2-bitmap.c).
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
BITMAP_ENTRY_MIN = 24           # fixed part of one bitmap directory entry
MAX_BITMAP_TABLE = 0x8000000    # entries
MAX_BITMAP_NAME = 1023
BITMAP_FLAGS = 0x7              # in_use, auto, extra_data_compatible
BITMAP_TYPE_DIRTY = 1

# Fixed fields a rewrite may change: name -> (struct format, byte offset).
_FIELDS = {
    "size": (">Q", 24),
    "l1_size": (">I", 36),
    "l1_table_offset": (">Q", 40),
    "refcount_table_offset": (">Q", 48),
    "refcount_table_clusters": (">I", 56),
    "incompatible_features": (">Q", 72),
    "autoclear_features": (">Q", 88),
}

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


class Header:
    """The parsed, validated header of one image. Attribute names follow the spec."""

    def __init__(self, path: str, raw: bytes, file_size: int):
        self.path = path
        if len(raw) < V2_LEN:
            self.fail("file too short for a qcow2 header")
        (magic, self.version, self.backing_file_offset, self.backing_file_size,
         self.cluster_bits, self.size, self.crypt_method, self.l1_size,
         self.l1_table_offset, self.refcount_table_offset,
         self.refcount_table_clusters, self.nb_snapshots,
         self.snapshots_offset) = _V2.unpack_from(raw, 0)
        if magic != MAGIC:
            self.fail("not a qcow2 image (bad magic)")
        if self.version not in (2, 3):
            self.fail(f"unsupported qcow2 version {self.version} (only 2 and 3)")
        if self.version == 2:
            self.incompatible_features = self.compatible_features = 0
            self.autoclear_features = 0
            self.refcount_order = 4
            self.header_length = V2_LEN
        else:
            if len(raw) < V3_LEN:
                self.fail("file too short for a version 3 header")
            (self.incompatible_features, self.compatible_features,
             self.autoclear_features, self.refcount_order,
             self.header_length) = _V3.unpack_from(raw, V2_LEN)
        self.file_size = file_size
        self._validate(raw)
        # The bytes this header occupies on disk; rewrites patch fields in it.
        self.raw = bytearray(raw[:self.header_length])
        self.extensions = self._parse_extensions(raw)
        self.backing_file = self._backing_name(raw)

    # --- validation ---------------------------------------------------------
    def fail(self, why: str):
        raise ImageError(f"{self.path}: {why}")

    def _validate(self, raw: bytes) -> None:
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            self.fail(f"cluster_bits {self.cluster_bits} out of range "
                      f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
        cs = self.cluster_size = 1 << self.cluster_bits
        if self.version == 3:
            if self.header_length < V3_LEN or self.header_length % 8:
                self.fail(f"bad header_length {self.header_length} "
                          f"(must be >= {V3_LEN} and a multiple of 8)")
            if self.header_length > cs or self.header_length > len(raw):
                self.fail(f"header_length {self.header_length} exceeds the first cluster")
        self._check_features(raw)
        if self.crypt_method != 0:
            how = {1: "AES", 2: "LUKS"}.get(self.crypt_method, "unknown")
            self.fail(f"{how}-encrypted images are not supported (crypt_method "
                      f"{self.crypt_method})")
        if self.refcount_order > 6:
            self.fail(f"refcount_order {self.refcount_order} is invalid (max 6)")
        if self.size > (1 << 63) - 1:
            self.fail(f"virtual size {self.size} is too large")

        # L1 table: bounded, big enough for the virtual size, inside the file.
        if self.l1_size * 8 > MAX_L1_BYTES:
            self.fail(f"L1 table too large ({self.l1_size} entries, "
                      f"qemu's limit is {MAX_L1_BYTES // 8})")
        need = l1_entries_for(self.size, self.cluster_bits)
        if self.l1_size < need:
            self.fail(f"L1 table too small for the virtual size "
                      f"({self.l1_size} entries, need {need})")
        self._check_table("L1 table", self.l1_table_offset, self.l1_size * 8)

        # Refcount table.
        rt_bytes = self.refcount_table_clusters * cs
        if rt_bytes > MAX_REFTABLE_BYTES:
            self.fail(f"refcount table too large ({self.refcount_table_clusters} clusters, "
                      f"qemu's limit is {MAX_REFTABLE_BYTES} bytes)")
        if self.refcount_table_clusters == 0:
            self.fail("image has no refcount table")
        self._check_table("refcount table", self.refcount_table_offset, rt_bytes)

        # Snapshot table: only bounds here; snapshot_l1_tables() reads it for writing.
        if self.nb_snapshots > MAX_SNAPSHOTS:
            self.fail(f"too many snapshots ({self.nb_snapshots}, max {MAX_SNAPSHOTS})")
        self._check_table("snapshot table", self.snapshots_offset,
                          self.nb_snapshots * SNAPSHOT_ENTRY_MIN)

        # Backing file name: short, and inside the first cluster.
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_NAME:
                self.fail(f"backing file name too long ({self.backing_file_size} bytes, "
                          f"max {MAX_BACKING_NAME})")
            if self.backing_file_offset + self.backing_file_size > min(cs, len(raw)):
                self.fail("backing file name lies outside the header cluster")

    def _check_table(self, what: str, offset: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        if offset % self.cluster_size:
            self.fail(f"{what} offset {offset:#x} is not cluster aligned")
        if offset == 0 or offset + nbytes > self.file_size:
            self.fail(f"{what} ({offset:#x}+{nbytes}) lies outside the file "
                      f"(size {self.file_size})")

    def _check_features(self, raw: bytes) -> None:
        bits = self.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT
                                              | INCOMPAT_EXTL2 | INCOMPAT_DATA_FILE)
        if self.incompatible_features & INCOMPAT_EXTL2 and \
                self.cluster_bits < MIN_EXTL2_CLUSTER_BITS:
            self.fail(f"extended L2 entries need clusters of at least "
                      f"{1 << MIN_EXTL2_CLUSTER_BITS} bytes (cluster_bits {self.cluster_bits})")
        self.compression_type = ctype = raw[104] if self.header_length > 104 else 0
        if ctype and not bits & INCOMPAT_COMPRESSION:
            self.fail(f"compression_type {ctype} set without its feature bit")
        if bits & INCOMPAT_COMPRESSION:
            if not ctype:
                self.fail("compression type feature bit set, but compression_type is zlib")
            try:
                qcow2_compress.check(ctype)
            except qcow2_compress.CompressionError as e:
                self.fail(str(e))
            bits &= ~INCOMPAT_COMPRESSION
        if bits:
            names = self._feature_names(raw)
            first = (bits & -bits).bit_length() - 1
            name = _INCOMPAT_NAMES.get(first) or names.get(first) or "unknown"
            self.fail(f"unsupported incompatible feature bit {first} ({name}); "
                      f"incompatible_features={self.incompatible_features:#x}")

    def _feature_names(self, raw: bytes) -> dict[int, str]:
        """Names of incompatible bits from the image's feature name table, for messages."""
        names = {}
        try:
            for etype, data in self._parse_extensions(raw):
                if etype == EXT_FEATURE_TABLE:
                    for i in range(0, len(data) - 47, 48):
                        if data[i] == 0:
                            names[data[i + 1]] = data[i + 2:i + 48].rstrip(b"\0").decode(
                                "ascii", "replace")
        except ImageError:
            pass
        return names

    # --- extensions and backing name -------------------------------------------
    def _parse_extensions(self, raw: bytes) -> list[tuple[int, bytes]]:
        if self.version == 2 and self.backing_file_offset and self.backing_file_offset < V2_LEN:
            self.fail("backing file name overlaps the header")
        out = []
        pos = self.header_length
        end = min(self.cluster_size, len(raw))
        if self.backing_file_offset:
            end = min(end, self.backing_file_offset)
        while pos + 8 <= end:
            etype, elen = struct.unpack_from(">II", raw, pos)
            if etype == EXT_END:
                break
            data_end = pos + 8 + elen
            if data_end > end:
                self.fail(f"header extension {etype:#x} runs past the header area")
            out.append((etype, bytes(raw[pos + 8:data_end])))
            pos = pos + 8 + (elen + 7) // 8 * 8
        return out

    def _backing_name(self, raw: bytes) -> str | None:
        if not self.backing_file_offset:
            return None
        name = raw[self.backing_file_offset:self.backing_file_offset + self.backing_file_size]
        if not name or b"\0" in name:
            self.fail("invalid backing file name")
        try:
            return name.decode()
        except UnicodeDecodeError:
            self.fail("backing file name is not valid UTF-8")

    @property
    def data_file(self) -> str | None:
        """The external data file's name (relative to the image's directory), or None."""
        if not self.incompatible_features & INCOMPAT_DATA_FILE:
            return None
        for etype, data in self.extensions:
            if etype == EXT_DATA_FILE:
                name = data.rstrip(b"\0")
                if not name or b"\0" in name or len(name) > MAX_BACKING_NAME:
                    self.fail("invalid external data file name")
                try:
                    return name.decode()
                except UnicodeDecodeError:
                    self.fail("external data file name is not valid UTF-8")
        self.fail("the image uses an external data file but does not record its name")

    @property
    def backing_format(self) -> str | None:
        for etype, data in self.extensions:
            if etype == EXT_BACKING_FORMAT:
                return data.decode("ascii", "replace")
        return None

    # --- rewriting ---------------------------------------------------------------
    def patch(self, **fields) -> bytes:
        """Set fixed fields in the on-disk header bytes; return the bytes to write at 0.

        Only named fields change: unknown header fields and extensions stay as
        they were on disk.
        """
        for name, value in fields.items():
            fmt, off = _FIELDS[name]
            if off >= len(self.raw):
                if value:
                    raise ImageError(f"{self.path}: cannot set {name} in a version "
                                     f"{self.version} header")
                continue
            struct.pack_into(fmt, self.raw, off, value)
            setattr(self, name, value)
        return bytes(self.raw)


_SNAPSHOT = struct.Struct(">QIHHIIQII")


def snapshot_l1_tables(hdr: Header, read) -> tuple[int, list[tuple[int, int]]]:
    """Walk the snapshot table: (its length in bytes, [(l1_table_offset, l1_size)]).

    Needed only to write an image: the snapshot table and every snapshot's
    tables are metadata that writes must not hit. `read(n, offset)` reads
    the file. Entries are checked against qemu's limits as they are read.
    """
    pos = hdr.snapshots_offset
    tables = []
    for i in range(hdr.nb_snapshots):
        if pos + SNAPSHOT_ENTRY_MIN > hdr.file_size:
            hdr.fail(f"snapshot {i} lies outside the file")
        (l1_offset, l1_size, id_len, name_len, _, _, _, _,
         extra) = _SNAPSHOT.unpack(read(SNAPSHOT_ENTRY_MIN, pos))
        if extra > MAX_SNAPSHOT_EXTRA:
            hdr.fail(f"snapshot {i} has {extra} bytes of extra data (max {MAX_SNAPSHOT_EXTRA})")
        end = pos + SNAPSHOT_ENTRY_MIN + extra + id_len + name_len
        if end > hdr.file_size:
            hdr.fail(f"snapshot {i} runs past the end of the file")
        pos = end + (-end % 8)      # entries start 8-byte aligned
        if end - hdr.snapshots_offset > MAX_SNAPSHOTS_BYTES:
            hdr.fail(f"snapshot table larger than qemu's limit of {MAX_SNAPSHOTS_BYTES} bytes")
        if l1_size * 8 > MAX_L1_BYTES:
            hdr.fail(f"snapshot {i}: L1 table too large ({l1_size} entries)")
        hdr._check_table(f"snapshot {i}'s L1 table", l1_offset, l1_size * 8)
        tables.append((l1_offset, l1_size))
    return (end - hdr.snapshots_offset if tables else 0), tables


_BITMAPS_EXT = struct.Struct(">IIQQ")
_BITMAP = struct.Struct(">QIIBBHI")


def bitmap_tables(hdr: Header, read) -> tuple[int, int, list[tuple[str, int, int]]]:
    """Walk the persistent bitmaps' directory: (its offset, its length in bytes,
    [(bitmap name, bitmap table offset, table entries)]); (0, 0, []) if none.

    As for qemu, bitmaps exist only while the bitmaps autoclear bit says they
    are consistent: a program that does not maintain them (vbdfs's engine
    too) clears the bit at its first write, and their clusters are leaks from
    then on. `read(n, offset)` reads the file. Every value is checked against
    qemu's limits and the file before it is used; a bad one raises ImageError.
    """
    if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        return 0, 0, []
    ext = [data for etype, data in hdr.extensions if etype == EXT_BITMAPS]
    if not ext:
        return 0, 0, []
    if len(ext) > 1 or len(ext[0]) != _BITMAPS_EXT.size:
        hdr.fail("malformed bitmaps header extension")
    nb, reserved, dir_len, dir_off = _BITMAPS_EXT.unpack(ext[0])
    if reserved or not 0 < nb <= MAX_BITMAPS:
        hdr.fail(f"bitmaps extension: {nb} bitmaps or reserved field {reserved:#x} "
                 f"invalid (1..{MAX_BITMAPS} bitmaps, reserved 0)")
    if not nb * BITMAP_ENTRY_MIN <= dir_len <= MAX_BITMAP_DIRECTORY:
        hdr.fail(f"bitmap directory length {dir_len} invalid for {nb} bitmaps "
                 f"(max {MAX_BITMAP_DIRECTORY})")
    hdr._check_table("bitmap directory", dir_off, dir_len)
    raw = read(dir_len, dir_off)
    cs = hdr.cluster_size
    out, pos, total = [], 0, 0
    for i in range(nb):
        if pos + BITMAP_ENTRY_MIN > dir_len:
            hdr.fail(f"bitmap {i} lies outside the bitmap directory")
        (table_off, table_size, flags, btype, gran_bits, name_len,
         extra) = _BITMAP.unpack_from(raw, pos)
        end = pos + BITMAP_ENTRY_MIN + extra + name_len
        if end > dir_len:
            hdr.fail(f"bitmap {i} runs past the end of the bitmap directory")
        name = raw[end - name_len:end].decode("utf-8", "replace")
        what = f"bitmap {i} ({name!r})"
        if flags & ~BITMAP_FLAGS or btype != BITMAP_TYPE_DIRTY or not 9 <= gran_bits <= 31 \
                or not 0 < name_len <= MAX_BITMAP_NAME:
            hdr.fail(f"{what}: invalid directory entry (flags {flags:#x}, type {btype}, "
                     f"granularity bits {gran_bits}, name length {name_len})")
        if not 0 < table_size <= MAX_BITMAP_TABLE or table_size * cs > 1 << 29:
            hdr.fail(f"{what}: bitmap table size {table_size} out of range")
        hdr._check_table(f"{what}'s bitmap table", table_off, table_size * 8)
        # Tables that do not overlap fit in the file: this bounds the work of
        # a hostile directory whose many entries name the same large table.
        total += table_size * 8
        if total > hdr.file_size:
            hdr.fail("the bitmap tables together are larger than the file")
        out.append((name, table_off, table_size))
        pos = end + (-end % 8)      # entries start 8-byte aligned
    if pos != dir_len:
        hdr.fail(f"bitmap directory length {dir_len} does not match its {nb} entries")
    return dir_off, dir_len, out


def data_file_of(path: str, root: str) -> str | None:
    """The external data file name the qcow2 image at path records, or None (also
    for anything that is not a readable qcow2 image: the caller probes later)."""
    import os
    from .confined import open_regular
    try:
        fd = open_regular(path, os.O_RDONLY, root)
    except OSError:
        return None
    try:
        head = os.pread(fd, 1 << 16, 0)
        return Header(path, head, os.fstat(fd).st_size).data_file
    except (ImageError, OSError, ValueError):
        return None
    finally:
        os.close(fd)


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map `size` virtual bytes."""
    per_l1 = 1 << (cluster_bits * 2 - 3)   # bytes mapped by one L2 table
    return -(-size // per_l1)


def build(cluster_bits: int, size: int, version: int, l1_offset: int, l1_size: int,
          rt_offset: int, rt_clusters: int, backing_file: str | None = None,
          backing_format: str | None = None) -> bytes:
    """The first cluster of a new image: header, extensions, backing name."""
    cs = 1 << cluster_bits
    hlen = V2_LEN if version == 2 else V3_LEN
    out = bytearray(_V2.pack(MAGIC, version, 0, 0, cluster_bits, size, 0, l1_size,
                             l1_offset, rt_offset, rt_clusters, 0, 0))
    if version == 3:
        out += _V3.pack(0, 0, 0, 4, hlen)
    if backing_format:
        fmt = backing_format.encode()
        out += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt
        out += bytes(-len(fmt) % 8)
    out += struct.pack(">II", EXT_END, 0)
    if backing_file:
        name = backing_file.encode()
        if len(name) > MAX_BACKING_NAME:
            raise ImageError(f"backing file name too long ({len(name)} bytes)")
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out += name
    if len(out) > cs:
        raise ImageError(f"header does not fit in one {cs}-byte cluster")
    return bytes(out)
