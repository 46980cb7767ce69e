"""qcow2 images (versions 2 and 3), read and write.

What this engine does, and the choices it makes:

* Mapping: guest cluster -> L1 entry -> L2 table -> host cluster. L2 tables
  are cached as native `array('Q')` in a bounded LRU; a dirty table is only
  written by `flush()` (or by a flush forced when it would be evicted).
* Allocation (see qcow2_refcount) reuses free clusters, lowest first, and
  otherwise appends at the end of the file, so sequential writes to a fresh
  image get contiguous host clusters. Every allocated cluster reads as zeros
  without being written. Freed clusters are punched out, and reused only
  after the flush that put their count 0 on disk (the argument is in
  qcow2_refcount); a flush is forced when many freed clusters wait for one,
  so a guest that never flushes cannot grow the file without bound.
* Copy-on-write: a standard cluster without the COPIED flag (refcount > 1,
  e.g. shared with an internal snapshot), a compressed cluster, a zero
  cluster or an unallocated one gets a new cluster; the part of it the write
  does not cover is filled from the old content, the backing file or, for
  fresh clusters, left as the zeros it already reads as. L2 tables shared
  with a snapshot are copied the same way.
* Zeroing (`zero()` and all-zero writes): version 3 sets the zero flag on
  whole clusters and frees their host clusters; version 2 unmaps them when
  there is no backing file and maps a fresh (zero-reading) cluster otherwise.
* Crash safety: `flush()` writes in this order, with an fsync after each
  step: guest data + refcount blocks (increments only), refcount table (and
  header if the table moved), L2 tables, L1 table (and header if it moved or
  the size changed), then the decrements of clusters that are no longer
  referenced. So on disk a refcount is never below its references, and a
  crash at any point leaves at worst leaked clusters.
* Concurrency: an image is safe for callers in many threads (the daemon's
  workers). One lock covers mapping, allocation, the L1/L2/refcount tables,
  the caches and the flush; the preads and pwrites of guest data in plain
  clusters (and backing file reads) run outside it, so requests overlap on a
  slow store. A write's new clusters are allocated under the lock, written
  outside it and then linked; qcow2_inflight keeps other writes off them
  meanwhile, and keeps replaced clusters from being freed while data I/O
  that may still use them runs. The rare paths (compressed clusters, zero
  writes, extended L2 entries, an external data file, resize) do their data
  I/O under the lock.
* Metadata overlap (qcow2_meta): every guest write in place, punch, free,
  allocation and metadata write first asks one map of where the metadata
  lies. A data pointer into metadata (compressed or not, COPIED or not) is
  caught before anything changes: the request fails (EIO through the
  mount); what was written before it is flushed (the cached state is
  consistent between changes); the image turns read-only with the reason;
  and, like qemu, the corrupt bit is set in a version 3 header, so nothing
  opens the image for writing before 'qemu-img check -r all'. That write is
  safe: it rewrites only the header's own fields, the header was never
  touched (its writes pass the check too), and a crash around it leaves the
  bit set or not. Version 2 headers have no such bit: read-only in memory.
  Metadata that overlaps other metadata is refused at a writable open.
* Refused at open (ImageError naming the feature): encryption, unknown
  incompatible bits or compression types, zstd compression without the
  zstandard module, internal snapshots together with an external data file,
  and every header value outside qemu's limits. Compressed clusters (zlib or
  zstd: qcow2_compress) are read, and rewritten plain when written to.
* Every refcount width (1 to 64 bits: qcow2_refcount), extended L2 entries
  (qcow2_subclusters) and external data files (`data_file`, opened like a
  backing file, below; data at its guest offset without refcounts) are
  read and written.
* The dirty bit is repaired on a writable open (qcow2_check.rebuild,
  crash-safe; `repaired` says what was done); an image it cannot repair, and
  one with the corrupt bit, opens read-only (writes raise ReadOnlyImage
  saying why).
* Unknown autoclear bits (e.g. bitmaps, which are not maintained here) are
  cleared before the first write (data_file_raw is kept: it stays true);
  unknown header fields and extensions are kept because header rewrites
  only patch fixed fields.
* Backing files: the name is resolved relative to the image's directory and,
  with `store_root`, must be a regular file inside it, reached through no
  symlink (the image itself too: confined.open_regular). The format comes from the
  backing-format header extension, or from the caller's `backing_format`
  when the image has no such extension; it is never probed from content,
  and an image with neither is refused. Chains are at most MAX_CHAIN deep
  and loops are refused. Backing images are opened read-only. (qcow_common
  holds these rules, shared with the version 1 engine.)
"""

from __future__ import annotations

import os
import threading
from array import array
from collections import OrderedDict

from . import qcow2_header as qh
from . import qcow2_meta as qm
from .base import Extent, Image, ImageError, Kind, ReadOnlyImage, is_zero, merge_extents
from .confined import open_regular
from .fileops import (advise_willneed, allocated_bytes, clone_file, fsync_dir, pread_full,
                      punch_hole, pwrite_full, start_writeback)
from .qcow2_inflight import InFlight
from .qcow2_refcount import Refcounts, load_be, to_be
from .qcow2_subclusters import SubclusterMixin
from .qcow_common import QcowCommon

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
L2_CACHE_BYTES = 16 << 20
# Freed clusters wait for a flush before they can be reused; one is forced when
# more than max(MIN_PENDING_FREE, min(1/8 of the file, MAX_PENDING_FREE)) wait.
MIN_PENDING_FREE = 4 << 20          # bytes (at least 16 clusters)
MAX_PENDING_FREE = 1 << 16          # clusters

# _map() kinds
_DATA, _ZERO, _UNALLOC, _COMPRESSED = range(4)


class _L2:
    __slots__ = ("offset", "entries", "dirty")

    def __init__(self, offset: int, entries: array, dirty: bool):
        self.offset = offset
        self.entries = entries
        self.dirty = dirty


class Qcow2Image(SubclusterMixin, QcowCommon, Image):
    format = "qcow2"
    concurrent = True       # safe for callers in many threads (see the module docstring)

    def __init__(self, path: str, read_only: bool = False, store_root: str | None = None,
                 backing_format: str | None = None, _chain: frozenset = frozenset()):
        """Open an image. `backing_format` is used only when the image does not record
        its backing file's format itself; `store_root` confines it and its backing files."""
        self.fd = open_regular(path, os.O_RDONLY if read_only else os.O_RDWR, store_root)
        self.dfd = self.fd          # where guest data lives: see _open_data_file
        self.backing = None
        # Mapping, allocation, tables, caches and flushes: under _lock. Data I/O
        # of plain clusters runs without it, by the rules of qcow2_inflight.
        self._lock = threading.Lock()
        self._flight = InFlight(self._lock)
        try:
            self._open(path, read_only, store_root, backing_format, _chain)
        except BaseException:
            self._close_files()
            raise

    def _open(self, path, read_only, store_root, backing_format, chain) -> None:
        self.repaired = None
        unrepaired = None if read_only else self._repair_if_dirty(path)
        st = os.fstat(self.fd)
        head = os.pread(self.fd, 512, 0)
        bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
        cs = 1 << bits if qh.MIN_CLUSTER_BITS <= bits <= qh.MAX_CLUSTER_BITS else 512
        h = self.hdr = qh.Header(path, pread_full(self.fd, min(cs, st.st_size), 0)
                                 if cs > 512 else head, st.st_size)
        self.version = h.version
        self.cluster_bits = bits = h.cluster_bits
        self.cs = cs = h.cluster_size
        self.ext = bool(h.incompatible_features & qh.INCOMPAT_EXTL2)    # qcow2_subclusters
        self.l2_bits = bits - (4 if self.ext else 3)
        self.l2_mask = (1 << self.l2_bits) - 1
        self.read_only_reason = None
        if h.incompatible_features & qh.INCOMPAT_CORRUPT:
            self.read_only_reason = "the image is marked corrupt"
        elif unrepaired:
            self.read_only_reason = unrepaired
        super().__init__(path, h.size, read_only or self.read_only_reason is not None)

        self.l1 = load_be(self.fd, "Q", h.l1_size * 8, h.l1_table_offset)
        self.l1_offset = h.l1_table_offset
        self.l1_clusters = -(-h.l1_size * 8 // cs) if h.l1_table_offset else 0
        self.l1_dirty = False
        self._cache: OrderedDict[int, _L2] = OrderedDict()
        self._cache_max = max(8, L2_CACHE_BYTES // cs)
        self._cz = (None, b"")                 # last decompressed cluster
        self._file_end = st.st_size
        self._zeros = bytes(cs)
        self._pending_free: list[int] = []     # clusters to decref after L1/L2 reach disk
        self._free_min = max(16, MIN_PENDING_FREE >> bits)
        self._hdr_fields: dict = {}            # header fields to write with the L1
        self._dirty = False                    # anything written since the last flush
        self._begun = False                    # autoclear bits handled
        self._retired: list[tuple[int, int, int]] = []   # (kind, first, n): see _sync step 5
        self.meta = qm.MetadataMap()
        self.rc = None
        if h.data_file:
            self._open_data_file(h, store_root)
        if not self.read_only:
            self._map_metadata(h, st.st_size)
            self.rc = Refcounts(self.fd, path, bits, h.refcount_table_offset,
                                h.refcount_table_clusters, st.st_size, self.meta,
                                h.refcount_order)
        if h.backing_file:
            self.backing = self._open_backing(h, store_root, backing_format, chain)

    def _repair_if_dirty(self, path: str) -> str | None:
        """Rebuild the refcounts of an image left dirty by a crash under lazy
        refcounts, before anything else reads them (crash-safe: qcow2_check).
        `repaired` says what was done, for the caller to log; returns why the
        image stays read-only if it could not be repaired."""
        head = os.pread(self.fd, qh.V3_LEN, 0)
        if len(head) < qh.V3_LEN or head[72 + 7] & qh.INCOMPAT_DIRTY == 0 or \
                int.from_bytes(head[4:8], "big") != 3:
            return
        st = os.fstat(self.fd)
        bits = head[23]
        cs = 1 << bits if qh.MIN_CLUSTER_BITS <= bits <= qh.MAX_CLUSTER_BITS else 512
        h = qh.Header(path, pread_full(self.fd, min(cs, st.st_size), 0), st.st_size)
        if h.incompatible_features & qh.INCOMPAT_DIRTY and not (
                h.incompatible_features & qh.INCOMPAT_CORRUPT):
            from .qcow2_check import rebuild
            try:
                self.repaired = "the image was marked dirty; " + rebuild(self.fd, h, path)
            except ImageError as e:
                return f"the image is marked dirty and was not repaired: {e}"
        return None

    def _map_metadata(self, h: qh.Header, file_size: int) -> None:
        """Record where the metadata lies (the refcount structures are added by
        Refcounts); refuse metadata that overlaps other metadata."""
        m, bits = self.meta, self.cluster_bits
        m.add(qm.HEADER, 0)
        self._add_meta(qm.ACTIVE_L1, self.l1_offset, self.l1_clusters, "the L1 table")
        if h.nb_snapshots:
            nbytes, snapshots = qh.snapshot_l1_tables(
                h, lambda n, off: pread_full(self.fd, n, off))
            self._add_meta(qm.SNAPSHOT_TABLE, h.snapshots_offset, -(-nbytes // self.cs),
                           "the snapshot table")
            for i, (off, size) in enumerate(snapshots):
                self._add_meta(qm.INACTIVE_L1, off, -(-size * 8 // self.cs),
                               f"snapshot {i}'s L1 table", shared=qm.INACTIVE_L1)
        # Checked before use: a hostile L1 must not fill memory with bogus clusters.
        # (Messages are built on a hit only: an L1 can have millions of entries.)
        for i, e in enumerate(self.l1):
            if e & OFFSET_MASK:
                off = self._l2_offset(i, e)
                if off >> bits in m:
                    self._add_meta(qm.ACTIVE_L2, off, 1, f"the L2 table of L1 entry {i}")
                m.add(qm.ACTIVE_L2, off >> bits)
        l2s = qm.ACTIVE_L2 | qm.INACTIVE_L2     # a snapshot shares L2 tables
        for i, (off, size) in enumerate(snapshots if h.nb_snapshots else ()):
            for j, e in enumerate(load_be(self.fd, "Q", size * 8, off)):
                if e & OFFSET_MASK:
                    if e & L1_RESERVED or e & (self.cs - 1) or (
                            e & OFFSET_MASK) + self.cs > file_size:
                        raise ImageError(f"{self.path}: snapshot {i}: L1 entry {j} ({e:#x}) "
                                         f"is invalid or points outside the file")
                    if m.hit((e & OFFSET_MASK) >> bits, 1, l2s):
                        self._add_meta(qm.INACTIVE_L2, e & OFFSET_MASK, 1,
                                       f"snapshot {i}'s L2 table {j}", shared=l2s)
                    m.add(qm.INACTIVE_L2, (e & OFFSET_MASK) >> bits)

    def _add_meta(self, kind: int, offset: int, n: int, what: str, shared: int = 0) -> None:
        hit = self.meta.hit(offset >> self.cluster_bits, n, ignore=shared)
        if hit is not None:
            raise ImageError(f"{self.path}: {what} at {offset:#x} overlaps "
                             f"{qm.describe(hit[1])} (image is corrupt)")
        self.meta.add(kind, offset >> self.cluster_bits, n)

    def _open_data_file(self, h: qh.Header, store_root: str | None) -> None:
        """Guest data in an external data file (`data_file`): opened by the rules of
        backing files (relative to the image's directory, inside the store, no
        symlink). Its clusters have no refcounts; a new one goes at its guest
        offset, as qemu places them, which also keeps a `data_file_raw` file
        equal to the disk."""
        name = h.data_file
        if h.nb_snapshots:
            raise ImageError(f"{self.path}: internal snapshots with an external data file "
                             f"are not supported (qemu refuses them too)")
        target = self._confined_target(name, store_root, "external data file")
        try:
            self.dfd = open_regular(target, os.O_RDONLY if self.read_only else os.O_RDWR,
                                    store_root)
        except FileNotFoundError:
            raise ImageError(f"{self.path}: external data file {name!r} ({target}) not "
                             f"found") from None
        except OSError as e:
            raise ImageError(f"{self.path}: external data file {name!r}: {e}") from None
        self.data_file = target
        self._data_end = max(os.fstat(self.dfd).st_size, -(-self.size // self.cs) * self.cs)
        self._host = self._data_host      # host offsets are data file offsets

    def _data_host(self, e: int, g: int) -> int:
        """_host() for an external data file: offsets within the virtual size
        (0 is one: COPIED tells it from unallocated, as in qemu)."""
        off = e & OFFSET_MASK
        if e & L2_RESERVED or off & (self.cs - 1) or off >= self._data_end:
            raise ImageError(f"{self.path}: L2 entry for guest offset {g << self.cluster_bits:#x} "
                             f"({e:#x}) is invalid or points outside the data file")
        return off

    def _open_backing(self, h, store_root, backing_format, chain) -> Image:
        fmt = h.backing_format or backing_format
        if fmt is None:
            raise ImageError(f"{self.path}: the format of backing file {h.backing_file!r} is "
                             f"not recorded in the image (no backing-format extension) and "
                             f"was not given; refusing to guess it")
        return self._open_backing_file(h.backing_file, fmt, store_root, chain)

    # --- creation -------------------------------------------------------------
    @classmethod
    def create(cls, path: str, size: int, cluster_size: int = 65536, compat: str = "1.1",
               backing_file: str | None = None, backing_format: str | None = None,
               store_root: str | None = None) -> "Qcow2Image":
        """Create a new image (the file must not exist) and return it open for writing."""
        if not isinstance(size, int) or size < 0 or size % 512:
            raise ImageError(f"{path}: size {size!r} must be a non-negative multiple of 512")
        bits = cluster_size.bit_length() - 1
        if cluster_size != 1 << bits or not qh.MIN_CLUSTER_BITS <= bits <= qh.MAX_CLUSTER_BITS:
            raise ImageError(f"{path}: cluster size {cluster_size} must be a power of two "
                             f"from 512 to 2 MiB")
        versions = {"0.10": 2, "1.1": 3}
        if compat not in versions:
            raise ImageError(f"{path}: unknown compat {compat!r} (use 0.10 or 1.1)")
        if backing_file and backing_format not in ("raw", "qcow2"):
            raise ImageError(f"{path}: a backing file needs backing_format 'raw' or 'qcow2' "
                             f"(formats are never guessed), got {backing_format!r}")
        l1_size = qh.l1_entries_for(size, bits)
        if l1_size * 8 > qh.MAX_L1_BYTES:
            raise ImageError(f"{path}: size {size} needs an L1 table larger than qemu's limit")
        l1c = max(1, -(-l1_size * 8 // cluster_size))
        per_block = cluster_size // 2
        nrb = rtc = 1
        while True:      # blocks and table must also count themselves
            total = 1 + rtc + nrb + l1c
            need_rb = -(-total // per_block)
            need_rtc = -(-need_rb * 8 // cluster_size)
            if (need_rb, need_rtc) == (nrb, rtc):
                break
            nrb, rtc = need_rb, need_rtc
        rt = array("Q", [(1 + rtc + i) << bits for i in range(nrb)])
        rb = array("H", [1] * total)
        l1_off = (1 + rtc + nrb) << bits
        header = qh.build(bits, size, versions[compat], l1_off, l1_size, 1 << bits, rtc,
                          backing_file, backing_format if backing_file else None)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            pwrite_full(fd, header, 0)
            pwrite_full(fd, to_be(rt), 1 << bits)
            pwrite_full(fd, to_be(rb), (1 + rtc) << bits)
            os.ftruncate(fd, total << bits)     # the L1 table: zeros, left sparse
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        try:
            return cls(path, store_root=store_root)
        except BaseException:
            os.unlink(path)     # e.g. the backing file is refused: leave nothing behind
            raise

    # --- mapping ----------------------------------------------------------------
    def _l2(self, l1i: int) -> _L2 | None:
        """The cached L2 table of L1 entry l1i, loading it; None if unallocated."""
        t = self._cache.get(l1i)
        if t is not None:
            self._cache.move_to_end(l1i)
            return t
        e = self.l1[l1i]
        if not e & OFFSET_MASK:
            return None
        off = self._l2_offset(l1i, e)
        t = _L2(off, load_be(self.fd, "Q", self.cs, off), False)
        self._cache[l1i] = t
        if len(self._cache) > self._cache_max:
            self._evict()
        return t

    def _l2_offset(self, l1i: int, e: int) -> int:
        """The L2 table offset of allocated L1 entry e, checked against the file."""
        off = e & OFFSET_MASK
        if e & L1_RESERVED or off & (self.cs - 1) or off + self.cs > self._file_end:
            raise ImageError(f"{self.path}: L1 entry {l1i} ({e:#x}) is invalid or points "
                             f"outside the file")
        return off

    def _evict(self) -> None:
        l1i, t = next(iter(self._cache.items()))
        if t.dirty:
            self._sync()        # write it (and everything it depends on) in order
        del self._cache[l1i]

    def _host(self, e: int, g: int) -> int:
        """Host offset of a standard L2 entry, checked against the file."""
        off = e & OFFSET_MASK
        if e & L2_RESERVED or off & (self.cs - 1) or off >= self._file_end or (
                not off and e & COPIED):
            raise ImageError(f"{self.path}: L2 entry for guest offset {g << self.cluster_bits:#x} "
                             f"({e:#x}) is invalid or points outside the file")
        return off

    def _kind(self, e: int, g: int) -> tuple[int, int]:
        if not e:
            return _UNALLOC, 0
        if e & COMPRESSED:
            if self.dfd != self.fd:
                raise ImageError(f"{self.path}: compressed cluster in an image with an "
                                 f"external data file (guest offset "
                                 f"{g << self.cluster_bits:#x})")
            return _COMPRESSED, e
        if e & ZERO_FLAG:
            if self.version < 3:
                raise ImageError(f"{self.path}: zero cluster in a version 2 image "
                                 f"(guest offset {g << self.cluster_bits:#x})")
            if e & OFFSET_MASK:
                self._host(e & ~ZERO_FLAG, g)
            return _ZERO, 0
        off = self._host(e, g)
        if off or (e & COPIED and self.dfd != self.fd):   # a data file's offset 0 is COPIED
            return _DATA, off
        return _UNALLOC, 0

    def _map(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host offset or entry, length) of the longest uniform run at pos."""
        bits = self.cluster_bits
        g = pos >> bits
        l1i = g >> self.l2_bits
        tab_end = min(end, (l1i + 1) << (self.l2_bits + bits))
        t = self._l2(l1i)
        if t is None:
            return _UNALLOC, 0, tab_end - pos
        if self.ext:
            return self._x_map(t.entries, pos, g, tab_end)
        ents = t.entries
        i = g & self.l2_mask
        kind, host = self._kind(ents[i], g)
        cs = self.cs
        nxt = (g + 1) << bits
        if kind == _DATA:
            expect = host + cs
            host += pos & (cs - 1)
            while nxt < tab_end:
                i += 1
                g += 1
                k2, h2 = self._kind(ents[i], g)
                if k2 != _DATA or h2 != expect:
                    break
                expect += cs
                nxt += cs
        elif kind != _COMPRESSED:
            if kind == _UNALLOC and nxt < tab_end:
                # Most of a sparse disk is zero entries: skip them at C speed
                # (a Python loop over a 20 GiB disk's entries took ~90 ms).
                tail = memoryview(ents)[i + 1:i + 1 + ((tab_end - nxt + cs - 1) >> bits)].tobytes()
                skip = (len(tail) - len(tail.lstrip(b"\0"))) >> 3
                i += skip
                g += skip
                nxt += skip << bits
            while nxt < tab_end:
                i += 1
                g += 1
                e = ents[i]
                if (e or kind != _UNALLOC) and self._kind(e, g)[0] != kind:
                    break
                nxt += cs
        return kind, host, min(nxt, tab_end) - pos

    @property
    def compression_type(self) -> int:
        return self.hdr.compression_type

    def _compressed_span(self, e: int, g: int) -> tuple[int, int]:
        """(host offset, bytes to read) of compressed entry e (see qcow_common)."""
        x = 62 - (self.cluster_bits - 8)
        off = e & ((1 << x) - 1)
        nsect = ((e >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        if off >= self._file_end:
            raise ImageError(f"{self.path}: compressed cluster for guest offset "
                             f"{g << self.cluster_bits:#x} points outside the file")
        return off, nsect * 512 - (off & 511)

    # --- reading ---------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Mapped under the lock; data clusters and the backing file are read
        outside it (qcow2_inflight says why that is safe)."""
        with self._lock:
            length = self.clamp_read(offset, length)
            if not length:
                return b""
            end = offset + length
            kind, host, n = self._map(offset, end)
            if n == length and kind == _DATA:           # the common case: one pread
                parts = None
            else:
                parts = self._read_parts(offset, end, kind, host, n)
                if all(type(p) is bytes for p in parts):
                    return b"".join(parts)
            epoch = self._flight.begin()
        try:
            if parts is None:
                data = os.pread(self.dfd, n, host)
                if len(data) != n:      # rare: carry on from where the read stopped
                    data += pread_full(self.dfd, n - len(data), host + len(data))
                return data
            return b"".join(p if type(p) is bytes else p() for p in parts)
        finally:
            with self._lock:
                self._flight.end(epoch)

    def read_serial(self, offset: int, length: int) -> bytes:
        """read() for a caller that serves one request at a time: the data is
        read under the lock too, which saves the in-flight bookkeeping that
        only overlapping requests need (~1 us of a 4 KiB read's ~4)."""
        with self._lock:
            length = self.clamp_read(offset, length)
            return self._read_held(offset, length) if length else b""

    def _read_held(self, offset: int, length: int) -> bytes:
        """read(), data included, for a caller that holds the lock."""
        end = offset + length
        kind, host, n = self._map(offset, end)
        if n == length and kind == _DATA:
            return pread_full(self.dfd, n, host)
        parts = self._read_parts(offset, end, kind, host, n)
        return b"".join(p if type(p) is bytes else p() for p in parts)

    def _read_parts(self, pos: int, end: int, kind: int, host: int, n: int) -> list:
        """The pieces of a read: bytes, or functions that read them outside the lock."""
        parts = []
        shared = self._backing_shared()
        while True:
            if kind == _DATA:
                parts.append(lambda n=n, host=host: pread_full(self.dfd, n, host))
            elif kind == _ZERO:
                parts.append(bytes(n))
            elif kind == _UNALLOC:
                parts.append((lambda pos=pos, n=n: self._backing_read(pos, n)) if shared
                             else self._backing_read(pos, n))
            else:
                inoff = pos & (self.cs - 1)
                parts.append(self._decompress(host, pos >> self.cluster_bits)[inoff:inoff + n])
            pos += n
            if pos >= end:
                return parts
            kind, host, n = self._map(pos, end)

    def _backing_shared(self) -> bool:
        """Is there a backing file that may be read outside the lock (from many threads)?"""
        b = self.backing
        return b is not None and (b.format == "raw" or getattr(b, "concurrent", False))

    def prefetch(self, offset: int, length: int) -> None:
        with self._lock:        # _map walks the table caches
            length = self.clamp_read(offset, length)
            pos, end = offset, offset + length
            while pos < end:
                kind, host, n = self._map(pos, end)
                if kind == _DATA:
                    advise_willneed(self.dfd, host, n)
                elif kind == _UNALLOC and self.backing is not None and pos < self.backing.size:
                    self.backing.prefetch(pos, min(n, self.backing.size - pos))
                pos += n

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        with self._lock:
            return self._extents(offset, length)

    def _extents(self, offset: int, length: int | None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            kind, _, n = self._map(pos, end)
            if kind == _UNALLOC:
                out.extend(self._backing_extents(pos, n))
            else:
                out.append(Extent(pos, n, Kind.ZERO if kind == _ZERO else Kind.DATA))
            pos += n
        return merge_extents(out)

    def _backing_extents(self, pos: int, n: int) -> list[Extent]:
        b = self.backing
        inside = 0 if b is None else max(0, min(n, b.size - pos))
        out = b.extents(pos, inside) if inside else []
        if inside < n:
            out.append(Extent(pos + inside, n - inside, Kind.HOLE))
        return out

    def allocated(self) -> int:
        extra = allocated_bytes(self.dfd) if self.dfd != self.fd else 0
        return allocated_bytes(self.fd) + extra

    def reflink_to(self, fd: int) -> bool:
        if self.backing is not None or self.dfd != self.fd:
            return False
        with self._lock:
            self._flush()           # cached tables into the file: the copy is a whole image
            return clone_file(self.fd, fd)

    # --- writing -------------------------------------------------------------------
    def check_writable(self) -> None:
        if self.read_only:
            why = self.read_only_reason or "image is open read-only"
            raise ReadOnlyImage(f"{self.path}: read-only: {why}")
        if not self._begun:
            self._begin()

    def _begin(self) -> None:
        """Before the first change: drop autoclear bits we do not maintain (e.g. bitmaps)."""
        keep = qh.AUTOCLEAR_DATA_FILE_RAW if self.dfd != self.fd else 0   # kept true
        if self.hdr.autoclear_features & ~keep:
            self._write_header(autoclear_features=self.hdr.autoclear_features & keep)
            os.fsync(self.fd)
        self._begun = True

    def write(self, offset: int, data) -> None:
        """Planned under the lock: in-place writes, and new clusters allocated
        and marked in flight. Their data is written outside it, then the new
        clusters are linked under the lock again (qcow2_inflight). Zero writes
        and the rare layouts (extended L2, external data file) run whole under
        the lock."""
        self._write_request(offset, data, False)

    def write_serial(self, offset: int, data) -> None:
        """write() for a caller that serves one request at a time: whole under
        the lock, without the in-flight bookkeeping (see read_serial)."""
        self._write_request(offset, data, True)

    def _write_request(self, offset: int, data, serial: bool) -> None:
        n = len(data)
        zero = n and is_zero(data)
        with self._lock:
            self.check_writable()
            self.check_range(offset, n)
            if not n:
                return
            if self._flight.allocating:
                self._wait_clear(offset, n)
            try:
                if zero:
                    return self._zero(offset, n)
                if len(self._pending_free) >= self._free_min:
                    self._sync_if_many_frees()
                mv = memoryview(data).cast("B")
                if serial or self.ext or self.dfd != self.fd:
                    return self._write(offset, mv)
                writes, allocs = self._plan_write(offset, mv)
            except qm.MetadataOverlap as e:
                raise self._corrupted(e) from None
            epoch = self._flight.begin()
            if allocs:
                ranges = [(g, g + k) for g, k, _ in allocs]
                self._flight.allocate(ranges)
        written = False
        try:
            self._run_writes(writes)
            written = True
        finally:
            with self._lock:
                self._flight.end(epoch)
                if allocs:
                    try:
                        if written:     # else the new clusters leak: never a wrong mapping
                            self._link(allocs)
                    finally:
                        self._flight.linked(ranges)

    def zero(self, offset: int, length: int) -> None:
        with self._lock:
            self.check_writable()
            self.check_range(offset, length)
            if length:
                self._wait_clear(offset, length)
                try:
                    self._zero(offset, length)
                except qm.MetadataOverlap as e:
                    raise self._corrupted(e) from None

    def _wait_clear(self, offset: int, length: int) -> None:
        """Before changing [offset, offset+length): wait until no allocation in
        flight touches its clusters (qcow2_inflight); under the lock."""
        bits = self.cluster_bits
        if self._flight.wait_clear(offset >> bits, ((offset + length - 1) >> bits) + 1):
            self.check_writable()       # another request may have stopped writes meanwhile

    def _sync_if_many_frees(self) -> None:
        """Flush when many freed clusters wait for it: only a flush makes them
        reusable (see qcow2_refcount), so without one a guest that keeps writing
        and zeroing would grow the file without bound. Between requests and
        between L2 tables the cached state is consistent, so this is safe."""
        n = len(self._pending_free)
        if n >= self._free_min and n >= min(MAX_PENDING_FREE, self.rc.next_free >> 3):
            self._sync()

    def _write(self, offset: int, mv: memoryview) -> None:
        """Write with the data I/O under the lock too (zeroing, rare layouts)."""
        writes, allocs = self._plan_write(offset, mv)
        self._run_writes(writes)
        self._link(allocs)

    def _plan_write(self, offset: int, mv: memoryview) -> tuple[list, list]:
        """What writing mv at offset takes: (writes, allocations), for
        _run_writes and _link; the in-place pieces and the copy-on-write fills
        are in writes."""
        self._dirty = True
        writes: list = []
        allocs: list = []
        pos, end = offset, offset + len(mv)
        span = self.l2_bits + self.cluster_bits
        while pos < end:
            l1i = pos >> span
            tab_end = min(end, (l1i + 1) << span)
            e = self.l1[l1i]
            if e & OFFSET_MASK and not e & COPIED:
                self._check_shared_table(l1i, pos, tab_end)
            self._write_table(self._l2_for_write(l1i), pos, tab_end, mv, offset, writes, allocs)
            pos = tab_end
        return writes, allocs

    def _run_writes(self, writes: list) -> None:
        """The pwrites of a planned write: (data, lo, hi, host offset), where data
        is bytes or a function reading the old content for a fill (sliced [lo:hi];
        None: it reads as zeros already)."""
        fd = self.dfd
        if len(writes) == 1 and not callable(writes[0][0]):    # the common case: one in place
            pwrite_full(fd, writes[0][0], writes[0][3])
            return
        read: dict = {}
        for data, lo, hi, at in writes:
            if callable(data):
                if data not in read:
                    read[data] = data()
                data = read[data]
                if data is None:
                    continue
                data = data[lo:hi]
            pwrite_full(fd, data, at)

    def _link(self, allocs: list) -> None:
        """Point guest clusters [g, g+k) at the host clusters written for them,
        from host on; the old ones are released (freed at a flush)."""
        bits, mask, l2_bits = self.cluster_bits, self.l2_mask, self.l2_bits
        for g, k, host in allocs:
            t = self._l2_for_write(g >> l2_bits)   # ours (COPIED) already: at most reloaded
            ents = t.entries
            for x in range(k):
                i = (g + x) & mask
                self._release(ents[i])
                ents[i] = (host + (x << bits)) | COPIED
            t.dirty = True

    def _check_shared_table(self, l1i: int, pos: int, end: int) -> None:
        """Before a shared L2 table is copied for a write: refuse the write if it
        would hit metadata (_write_table checks too, but only after the copy)."""
        bits, ents = self.cluster_bits, self._l2(l1i).entries
        stride = 2 if self.ext else 1
        for g in range(pos >> bits, ((end - 1) >> bits) + 1):
            e = ents[stride * (g & self.l2_mask)]
            if e & (COMPRESSED | OFFSET_MASK):
                self._check_free(e, g, "writing")

    def _write_table(self, t: _L2, pos: int, end: int, mv: memoryview, base: int,
                     writes: list, allocs: list) -> None:
        """Plan writing mv[pos-base:end-base], which lies within the guest range of
        table t, into writes and allocs (see _plan_write). Extended L2 entries
        are written at once."""
        if self.ext:
            return self._x_write_table(t, pos, end, mv, base)
        bits, cs = self.cluster_bits, self.cs
        ents = t.entries
        external = self.dfd != self.fd
        while pos < end:
            g = pos >> bits
            i = g & self.l2_mask
            e = ents[i]
            run_end = min(end, (g + 1) << bits)
            if e & (COPIED | COMPRESSED) == COPIED:        # ours alone: in place
                host = self._host(e & ~ZERO_FLAG, g)
                if e & ZERO_FLAG:   # preallocated zero cluster: rest must read zeros
                    self._check_guest(host >> bits, 1, "writing", g)
                    buf = bytearray(cs)
                    lo = pos & (cs - 1)
                    buf[lo:lo + run_end - pos] = mv[pos - base:run_end - base]
                    pwrite_full(self.dfd, buf, host)    # rare: under the lock
                    ents[i] = e & ~ZERO_FLAG
                    t.dirty = True
                    pos = run_end
                    continue
                j, expect = i + 1, host + cs
                while run_end < end and expect < self._file_end and ents[j] & (
                        COPIED | COMPRESSED | ZERO_FLAG | OFFSET_MASK) == COPIED | expect:
                    run_end = min(end, run_end + cs)
                    j += 1
                    expect += cs
                self._check_guest(host >> bits, j - i, "writing", g)
                writes.append((mv[pos - base:run_end - base], 0, 0, host + (pos & (cs - 1))))
                pos = run_end
                continue
            # Needs new clusters: gather the run of clusters that all do.
            j = i + 1
            while run_end < end and ents[j] & (COPIED | COMPRESSED) != COPIED:
                run_end = min(end, run_end + cs)
                j += 1
            # The old mappings are freed below: refuse before changing anything
            # if one of them points into metadata.
            for x in range(i, j):
                if ents[x] & (COMPRESSED | OFFSET_MASK):
                    self._check_free(ents[x], g + x - i)
            h0, k = (g << bits, j - i) if external else self._alloc_some(j - i)
            if k < j - i:       # a smaller free run: write that much now
                j = i + k
                run_end = min(end, (g + k) << bits)
            # Fills read the old mapping, which stays valid until the link and
            # the flush after it (qcow2_inflight).
            lo = pos & (cs - 1)
            writes.append((mv[pos - base:run_end - base], 0, 0, h0 + lo))
            if lo:
                old = self._old_content(ents[i], g, external)
                self._fill(writes, old, 0, lo, h0)
            hi = run_end & (cs - 1)
            if hi:
                if not (lo and k == 1):     # same cluster as the head: reuse its content
                    old = self._old_content(ents[j - 1], g + k - 1, external)
                self._fill(writes, old, hi, cs, h0 + ((k - 1) << bits) + hi)
            allocs.append((g, k, h0))
            pos = run_end

    def _check_guest(self, first: int, n: int, action: str, g: int) -> None:
        """The overlap check for a change of guest cluster g's host clusters (the
        message is only built on a hit: this runs on every write)."""
        if self.meta.hit(first, n) is not None and self.dfd == self.fd:
            self.meta.check(first, n, f"{action} guest offset {g << self.cluster_bits:#x}")

    def _check_free(self, e: int, g: int, action: str = "freeing the old cluster of") -> None:
        """Refuse to replace (or punch) entry e if its clusters are metadata."""
        first, n = self._span(e)
        self._check_guest(first, n, action, g)

    def _old_content(self, e: int, g: int, external: bool):
        """The content of guest cluster g (entry e) for a copy-on-write fill:
        bytes or None (reads as zeros) read now, under the lock, or a function
        that reads it outside the lock where that touches only files that
        stay valid meanwhile (a data cluster, a backing file safe for many
        threads)."""
        if external:        # its place in the data file is not fresh: zeros are written
            old = self._content(e, g)
            return self._zeros if old is None else old
        kind, _ = self._kind(e, g)
        if kind == _DATA or kind == _UNALLOC and self._backing_shared():
            return lambda: self._content(e, g)
        return self._content(e, g)

    @staticmethod
    def _fill(writes: list, old, lo: int, hi: int, at: int) -> None:
        """Add the write of old[lo:hi] at host offset `at` (old: see _old_content)."""
        if callable(old):
            writes.append((old, lo, hi, at))
        elif old is not None:
            writes.append((old[lo:hi], 0, 0, at))

    def _content(self, e: int, g: int) -> bytes | None:
        """Current content of guest cluster g (entry e); None when it reads as zeros."""
        kind, host = self._kind(e, g)
        if kind == _ZERO:
            return None
        if kind == _COMPRESSED:
            return self._decompress(host, g)
        if kind == _DATA:
            return pread_full(self.dfd, self.cs, host)
        data = self._backing_read(g << self.cluster_bits, self.cs)
        return None if self.backing is None or is_zero(data) else data

    def _alloc(self, n: int) -> int:
        """n contiguous clusters at the end of the file (for metadata)."""
        c = self.rc.alloc(n)
        self._file_end = max(self._file_end, self.rc.next_free << self.cluster_bits)
        return c << self.cluster_bits

    def _alloc_some(self, n: int) -> tuple[int, int]:
        """1 to n contiguous clusters reading as zeros, free ones reused: (offset, count)."""
        c, k = self.rc.alloc_some(n)
        self._file_end = max(self._file_end, self.rc.next_free << self.cluster_bits)
        return c << self.cluster_bits, k

    def _span(self, e: int) -> tuple[int, int]:
        """(first cluster, count) of the host clusters an L2 entry holds."""
        bits = self.cluster_bits
        if e & COMPRESSED:
            x = 62 - (bits - 8)
            off = (e & ((1 << x) - 1)) & ~511
            nbytes = (((e >> x) & ((1 << (bits - 8)) - 1)) + 1) * 512
            return off >> bits, ((off + nbytes - 1) >> bits) - (off >> bits) + 1
        off = e & OFFSET_MASK
        return off >> bits, 1 if off else 0

    def _release(self, e: int) -> None:
        """Queue the host clusters of a replaced entry (checked with _check_free)
        for decref at the next flush."""
        if self.dfd != self.fd:
            return          # data file clusters have no refcounts
        first, n = self._span(e)
        if n == 1:
            self._pending_free.append(first)
        elif n:
            self._pending_free.extend(range(first, first + n))

    def _l2_for_write(self, l1i: int) -> _L2:
        """The L2 table of l1i, allocated or copied (if shared) so that it can be changed."""
        t = self._l2(l1i)
        e = self.l1[l1i]
        if t is not None and e & COPIED:
            return t
        host = self._alloc_some(1)[0]
        self.meta.add(qm.ACTIVE_L2, host >> self.cluster_bits)
        if t is None:
            t = _L2(host, array("Q", bytes(self.cs)), True)
            self._cache[l1i] = t
            if len(self._cache) > self._cache_max:
                self._evict()
        else:   # shared with a snapshot: copy on write
            self._retired.append((qm.ACTIVE_L2, t.offset >> self.cluster_bits, 1))
            t.offset, t.entries, t.dirty = host, array("Q", t.entries), True
        self.l1[l1i] = host | COPIED
        self.l1_dirty = True
        return t

    # --- zeroing ---------------------------------------------------------------------
    def _zero(self, offset: int, length: int) -> None:
        if self.ext:
            return self._x_zero(offset, length)
        self._dirty = True
        bits, cs = self.cluster_bits, self.cs
        pos, end = offset, offset + length
        while pos < end:
            g = pos >> bits
            cend = (g + 1) << bits
            if pos & (cs - 1) or end < cend:        # partial cluster: write zeros
                seg = min(end, cend) - pos
                if not self._reads_zero(g):
                    self._write(pos, memoryview(self._zeros)[:seg])
                pos += seg
                continue
            l1i = g >> self.l2_bits
            g_end = min(end >> bits, (l1i + 1) << self.l2_bits)
            self._sync_if_many_frees()
            self._zero_clusters(l1i, g, g_end)
            pos = g_end << bits

    def _reads_zero(self, g: int) -> bool:
        t = self._l2(g >> self.l2_bits)
        e = t.entries[g & self.l2_mask] if t is not None else 0
        if not e:
            return self.backing is None or (g << self.cluster_bits) >= self.backing.size
        return e & (COMPRESSED | ZERO_FLAG) == ZERO_FLAG

    def _zero_clusters(self, l1i: int, g0: int, g1: int) -> None:
        """Make whole guest clusters [g0, g1) of one L2 table read as zeros."""
        mask = self.l2_mask
        no_backing = self.backing is None
        if self.dfd != self.fd:
            return self._zero_data_file_clusters(l1i, g0, g1)
        if self.version >= 3:
            want = lambda e: ZERO_FLAG                           # noqa: E731
        elif no_backing:
            want = lambda e: 0                                   # noqa: E731
        else:
            want = None     # v2 over a backing file: map fresh clusters (they read zeros)
        t = self._l2(l1i)
        if t is None and no_backing:
            return
        if t is not None and want is not None and all(
                t.entries[g & mask] == want(0) or (no_backing and not t.entries[g & mask])
                for g in range(g0, g1)):
            return          # already zero: do not dirty (or copy) the table
        if t is not None:   # refuse before changing anything: see _write_table
            ents = t.entries
            for g in range(g0, g1):
                if ents[g & mask] & (COMPRESSED | OFFSET_MASK):
                    self._check_free(ents[g & mask], g, "zeroing")
        t = self._l2_for_write(l1i)
        ents = t.entries
        for g in range(g0, g1):
            i = g & mask
            e = ents[i]
            if want is not None:
                if e == ZERO_FLAG or (no_backing and not e):
                    continue
                self._release(e)
                ents[i] = want(e)
            elif e & (COPIED | COMPRESSED | ZERO_FLAG) == COPIED:
                host = self._host(e, g)
                if not punch_hole(self.dfd, host, self.cs):
                    pwrite_full(self.dfd, self._zeros, host)
            else:
                self._release(e)
                ents[i] = self._alloc_some(1)[0] | COPIED
        t.dirty = True

    def _zero_data_file_clusters(self, l1i: int, g0: int, g1: int) -> None:
        """With an external data file: punch the clusters there and map them (a
        raw data file stays equal to the disk)."""
        t = self._l2(l1i)
        mask, cs, bits = self.l2_mask, self.cs, self.cluster_bits
        if t is None and self.backing is None:
            return
        if t is not None and self.backing is None and all(
                t.entries[g & mask] in (0, ZERO_FLAG) for g in range(g0, g1)):
            return
        t = self._l2_for_write(l1i)
        for g in range(g0, g1):
            e = t.entries[g & mask]
            host = self._host(e & ~ZERO_FLAG, g) if e & (OFFSET_MASK | COPIED) else g << bits
            if not punch_hole(self.dfd, host, cs):
                pwrite_full(self.dfd, self._zeros, host)
            t.entries[g & mask] = host | COPIED
        t.dirty = True

    # --- durability --------------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self.read_only and self.fd >= 0:
            self._sync()

    def start_writeback(self) -> None:
        # Guest data only: cached metadata waits for flush() and its ordering.
        if not self.read_only and self.fd >= 0:
            start_writeback(self.fd)
            if self.dfd != self.fd:
                start_writeback(self.dfd)

    def _sync(self) -> None:
        """Write cached metadata in crash-safe order (see the module docstring)."""
        try:
            self._sync_steps()
        except qm.MetadataOverlap as e:     # half-way through: keep what is on disk
            raise self._corrupted(e, save=False) from None

    def _sync_steps(self) -> None:
        rc, fd, bits = self.rc, self.fd, self.cluster_bits
        dirty_l2 = [t for t in self._cache.values() if t.dirty]
        if not (self._dirty or dirty_l2 or self.l1_dirty or self._hdr_fields
                or self._pending_free or self._retired or rc.dirty or rc.table_dirty
                or self._flight.any_ready()):
            return
        old_rt = rc.grow_table_if_needed()
        # 1. guest data and refcount increments (including new metadata clusters)
        rc.extend_file()
        rc.write_blocks()
        if self.dfd != fd:
            os.fsync(self.dfd)
        os.fsync(fd)
        # 2. the refcount table that points at any new refcount block
        if rc.table_dirty:
            rc.write_table()
            os.fsync(fd)
            if old_rt:
                self._write_header(refcount_table_offset=rc.table_offset,
                                   refcount_table_clusters=rc.table_clusters)
                os.fsync(fd)
                self._retired.append((qm.REFCOUNT_TABLE, old_rt[0] >> bits, old_rt[1]))
        # 3. L2 tables, 4. the L1 table and the header fields that go with it
        if dirty_l2:
            for t in dirty_l2:
                self.meta.check(t.offset >> bits, 1, "writing an L2 table", ignore=qm.ACTIVE_L2)
                pwrite_full(fd, to_be(t.entries), t.offset)
                t.dirty = False
            os.fsync(fd)
        if self.l1_dirty:
            self.meta.check(self.l1_offset >> bits, self.l1_clusters, "writing the L1 table",
                            ignore=qm.ACTIVE_L1)
            pwrite_full(fd, to_be(self.l1), self.l1_offset)
            self.l1_dirty = False
            os.fsync(fd)
        if self._hdr_fields:
            self._write_header(**self._hdr_fields)
            self._hdr_fields = {}
            os.fsync(fd)
        # 5. only now drop the references that were replaced, once no data I/O
        # that may still use them runs (qcow2_inflight). Metadata that no table
        # on disk points at any more leaves the overlap map first.
        for kind, first, n in self._retired:
            self.meta.remove(kind, first, n)
            self._pending_free.extend(range(first, first + n))
        self._retired = []
        self._flight.hold(self._pending_free)
        self._pending_free = []
        pending = self._flight.ready()
        if pending:
            self._check_frees(pending)
            freed = sorted(c for c in pending if rc.decref(c) == 0)
            rc.write_blocks()
            os.fsync(fd)
            rc.freed(freed)     # punched out, and reusable from now on
        self._dirty = False

    def _write_header(self, **fields) -> None:
        self.meta.check(0, 1, "writing the header", ignore=qm.HEADER)
        pwrite_full(self.fd, self.hdr.patch(**fields), 0)

    def _check_frees(self, pending: list[int]) -> None:
        """Refuse, before changing any count, frees the refcounts cannot cover or
        that would leave metadata at refcount 0.

        That means the image was corrupt (a count below its references, or a
        data pointer into metadata that got past the checks before it). What is
        on disk is consistent (at worst leaked clusters), so stop writing.
        """
        rc = self.rc
        need: dict[int, int] = {}
        for c in pending:
            need[c] = need.get(c, 0) + 1
        bad = next((c for c, k in need.items() if rc.get(c) < k), None)
        if bad is not None:
            self._stop(f"refcount underflow at cluster {bad}: the image is corrupt "
                       f"(run 'qemu-img check -r all')")
            raise ImageError(f"{self.path}: {self.read_only_reason}; further writes refused")
        for c, k in need.items():
            if c in self.meta and rc.get(c) == k:
                self.meta.check(c, 1, "freeing cluster")

    def _corrupted(self, e: qm.MetadataOverlap, save: bool = True) -> ImageError:
        """A change would have hit metadata (`e` says which): it was refused before
        anything changed. Keep what was written before it (`save`: the cached
        state is consistent between changes), then stop writing for good and, as
        qemu does, set the corrupt bit so that nothing opens the image for
        writing before 'qemu-img check -r all' repaired it. Version 2 images
        have no such bit: they are marked in memory only."""
        if save:
            try:
                self._sync()
            except (OSError, ImageError):
                pass        # marked below all the same
        if not self.read_only:
            self._stop(f"the image is corrupt: {e}", mark=True)
        return ImageError(f"{self.path}: {e}: the image is corrupt; it is marked corrupt "
                          f"and further writes are refused (repair with "
                          f"'qemu-img check -r all')")

    def _stop(self, reason: str, mark: bool = False) -> None:
        self.read_only = True
        self.read_only_reason = reason
        if mark and self.version >= 3:
            try:
                self._write_header(incompatible_features=self.hdr.incompatible_features
                                   | qh.INCOMPAT_CORRUPT)
                os.fsync(self.fd)
            except (OSError, ImageError):
                pass        # the image is still refused for writing in this process

    def resize(self, new_size: int) -> None:
        with self._lock:        # writes in flight lie below the old size: no wait
            self.check_writable()
            try:
                self._resize(new_size)
            except qm.MetadataOverlap as e:
                raise self._corrupted(e, save=False) from None

    def _resize(self, new_size: int) -> None:
        if new_size < self.size:
            raise ImageError(f"{self.path}: shrinking a disk is not supported "
                             f"({self.size} -> {new_size} bytes)")
        if new_size % 512:
            raise ImageError(f"{self.path}: size {new_size} is not a multiple of 512")
        if new_size == self.size:
            return
        need = qh.l1_entries_for(new_size, self.cluster_bits)
        if need * 8 > qh.MAX_L1_BYTES:
            raise ImageError(f"{self.path}: size {new_size} needs an L1 table larger than "
                             f"qemu's limit")
        if need > len(self.l1):
            self._flush()   # the old L1 on disk must be complete before we copy it
            self.l1.extend([0] * (need - len(self.l1)))
            fields = {"l1_size": need}
            if need * 8 > self.l1_clusters * self.cs:   # move it to a bigger place
                bits = self.cluster_bits
                n = -(-need * 8 // self.cs)
                host = self._alloc(n)
                if self.l1_offset:              # freed after the header moves
                    self._retired.append((qm.ACTIVE_L1, self.l1_offset >> bits,
                                          self.l1_clusters))
                self.meta.add(qm.ACTIVE_L1, host >> bits, n)
                self.l1_offset, self.l1_clusters = host, n
                fields["l1_table_offset"] = host
            self.l1_dirty = True
            self._hdr_fields.update(fields)     # a bigger L1 is valid under the old size
        # Like qemu: the new area reads zeros, not the backing file's bytes past the
        # old end. Zero it before the new size reaches the header, so a crash leaves
        # the old size or the new one with zeros (a sync forced meanwhile by a cache
        # eviction writes only the L1 change).
        old_size = self.size
        top = min(new_size, self.backing.size if self.backing is not None else 0)
        if top > old_size:
            self._zero(old_size, top - old_size)
        self._hdr_fields["size"] = new_size
        self.size = new_size
        if self.dfd != self.fd:
            self._data_end = max(self._data_end, -(-new_size // self.cs) * self.cs)
        self._sync()

    def close(self) -> None:
        with self._lock:
            if self.fd < 0:
                return
            try:
                self._flush()
            finally:
                self._close_files()

    def _close_files(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.dfd >= 0 and self.dfd != self.fd:
            os.close(self.dfd)
        self.dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

