"""qcow2 refcounts (every width: 1 to 64 bits) and the cluster allocator.

A refcount block is held in memory as a native array of one entry per
cluster, whatever the width on disk (chosen at open, like qemu's get/set
functions): 8, 16, 32 and 64-bit blocks load with one byteswap ('B', 'H',
'I'/'L', 'Q'), 1, 2 and 4-bit blocks are unpacked into one byte per entry
when loaded and packed when written. So the allocator's search is one
array.index at every width, and 16 bits (the default) costs what it did.
A count above the width's maximum is refused (RefcountOverflow) before
anything changes.

Refcount blocks are cached in a bounded LRU and written by the image's flush,
before any L2/L1 entry that points at a newly counted cluster (crash
invariant: on disk a refcount is never lower than the number of references).
A dirty block evicted early is simply written early: until the flush's
free step, blocks only hold increments, and a refcount that reaches disk too
soon is at worst a leak.

Allocation reuses free clusters, as qemu does: a cursor (the lowest cluster
that may be free) moves forward over counted clusters, and a free lowers it
again. A cluster may be reused only once no table on disk points at it, and
that is what a refcount of 0 in memory means here: decrements are applied
only in the flush's last step, after the L2/L1 tables (and header) that
dropped the references are on disk, and are written and fsync'd in that same
step, before anything can allocate again. So a reused cluster has no
reference on disk and a count of 0 there; its new data and its count of 1
then reach disk before the L2 entry that points at it, like any allocation,
and a crash at any point leaves at worst a leak, never two references to one
cluster. A reused cluster is punched out (or zeroed) first unless it is
already a hole, so every allocated cluster reads as zeros without a write.
(This holds for images that were consistent when opened. In a corrupt one,
where an L2 entry points at a cluster counted 0, reuse can make two guest
clusters share storage, as in qemu: the guest's own data, never metadata,
which the overlap check keeps out of every write.)

When nothing below it is free, allocation appends at `next_free`. It starts
past both the end of the file and the highest counted cluster (qemu can
leave counted clusters past the end after a crash: leaks), so every cluster
from `next_free` on has refcount 0 and appending never looks at refcounts.
Multi-cluster metadata (a moved L1 or refcount table) is always appended.

The refcount table is checked at open: every block must be cluster aligned,
inside the file, used once, and not overlap other metadata (otherwise
updating one count would overwrite it). Every allocation and every write of
a block or the table passes the image's overlap check (qcow2_meta).
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import OrderedDict

from . import qcow2_meta as qm
from .base import ImageError
from .fileops import data_runs, pread_full, punch_hole, pwrite_full

_SWAP = sys.byteorder == "little"    # on-disk tables are big endian
RC_CACHE_BYTES = 4 << 20              # refcount blocks kept in memory


def load_be(fd: int, typecode: str, nbytes: int, offset: int) -> array:
    """Read a big-endian table into a native array."""
    a = array(typecode, pread_full(fd, nbytes, offset))
    if _SWAP:
        a.byteswap()
    return a


class RefcountOverflow(ImageError):
    """A count would not fit the image's refcount width (nothing was changed)."""


def _wide_typecode(nbytes: int) -> str:
    return next(tc for tc in "BHILQ" if array(tc).itemsize == nbytes)


class RefcountCodec:
    """Refcount blocks of one width, on disk <-> a native array of one entry per cluster."""

    def __init__(self, order: int):
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        self.typecode = _wide_typecode(max(1, self.bits // 8))
        if self.bits < 8:
            w, k = self.bits, 8 // self.bits
            # qemu packs narrow counts from the lowest bits of each byte up.
            self._unpack = [bytes((v >> (w * j)) & self.max for j in range(k))
                            for v in range(256)]
            self._pack = {u: v for v, u in enumerate(self._unpack)}

    def entries_per_cluster(self, cs: int) -> int:
        return cs * 8 >> self.order

    def load(self, raw: bytes) -> array:
        if self.bits < 8:
            return array("B", b"".join(map(self._unpack.__getitem__, raw)))
        a = array(self.typecode, raw)
        if _SWAP and self.bits > 8:
            a.byteswap()
        return a

    def dump(self, a: array) -> bytes:
        if self.bits < 8:
            raw, k = a.tobytes(), 8 // self.bits
            return bytes(map(self._pack.__getitem__,
                             (raw[i:i + k] for i in range(0, len(raw), k))))
        return to_be(a) if self.bits > 8 else a.tobytes()

    def used_entries(self, raw: bytes) -> int:
        """Entries up to the last non-zero one in a raw block."""
        used = len(raw.rstrip(b"\0"))
        return -(-used * 8 >> self.order) if used else 0


def to_be(a: array) -> bytes:
    if not _SWAP:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


class Refcounts:
    def __init__(self, fd: int, path: str, cluster_bits: int, table_offset: int,
                 table_clusters: int, file_size: int, meta: qm.MetadataMap,
                 refcount_order: int = 4):
        """`meta` holds the image's other metadata; the refcount table and blocks
        are added to it."""
        self.fd = fd
        self.path = path
        self.cluster_bits = cluster_bits
        self.cs = cs = 1 << cluster_bits
        self.codec = codec = RefcountCodec(refcount_order)
        self.per_block = codec.entries_per_cluster(cs)
        self._ones = array(codec.typecode, [1])
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = load_be(fd, "Q", table_clusters * self.cs, table_offset)
        self.capacity = len(self.table)                  # entries the on-disk table holds
        self.blocks: OrderedDict[int, array] = OrderedDict()   # LRU
        block_bytes = self.per_block * self._ones.itemsize     # in memory
        self.cache_max = max(2 if block_bytes > cs else 8, RC_CACHE_BYTES // block_bytes)
        self.dirty: set[int] = set()
        self.table_dirty = False
        self.meta = meta
        self.file_size = file_size
        first = table_offset >> cluster_bits
        hit = meta.hit(first, table_clusters)
        if hit:
            raise ImageError(f"{path}: the refcount table at {table_offset:#x} overlaps "
                             f"{qm.describe(hit[1])} (image is corrupt)")
        meta.add(qm.REFCOUNT_TABLE, first, table_clusters)
        for r, off in enumerate(self.table):
            if not off:
                continue
            c = off >> cluster_bits
            hit = meta.hit(c)
            why = ("is not cluster aligned" if off & (cs - 1) else
                   "lies outside the file" if off + cs > file_size else
                   None if hit is None else
                   "is used twice" if hit[1] == qm.REFCOUNT_BLOCK else
                   f"overlaps {qm.describe(hit[1])}")
            if why:
                raise ImageError(f"{path}: refcount block {r} at {off:#x} {why} "
                                 f"(image is corrupt)")
            meta.add(qm.REFCOUNT_BLOCK, c)
        self.next_free = self._first_free(-(-file_size // cs))
        self.cursor = 0         # the lowest cluster that may be free

    def _first_free(self, eof: int) -> int:
        """max(eof, highest counted cluster + 1): one read per block covering clusters past eof."""
        pb = self.per_block
        for r in range(len(self.table) - 1, eof // pb - 1, -1):
            if self.table[r]:
                used = self.codec.used_entries(pread_full(self.fd, self.cs, self.table[r]))
                if used:
                    return max(eof, r * pb + used)
        return eof

    # --- lookup ---------------------------------------------------------------
    def _block(self, r: int) -> array | None:
        b = self.blocks.get(r)
        if b is not None:
            self.blocks.move_to_end(r)
            return b
        if r >= len(self.table) or not self.table[r]:
            return None
        b = self.blocks[r] = self.codec.load(pread_full(self.fd, self.cs, self.table[r]))
        if len(self.blocks) > self.cache_max:
            self._evict()
        return b

    def _evict(self) -> None:
        r, b = self.blocks.popitem(last=False)
        if r in self.dirty:     # safe to write early: see the module docstring
            self._write_block(r, b)
            self.dirty.discard(r)

    def _write_block(self, r: int, b: array) -> None:
        off = self.table[r]
        self.meta.check(off >> self.cluster_bits, 1, f"writing refcount block {r}",
                        ignore=qm.REFCOUNT_BLOCK)
        pwrite_full(self.fd, self.codec.dump(b), off)

    def get(self, cluster: int) -> int:
        b = self._block(cluster // self.per_block)
        return 0 if b is None else b[cluster % self.per_block]

    # --- allocation -------------------------------------------------------------
    def alloc(self, n: int) -> int:
        """Reserve n contiguous fresh clusters at the end of the file; return the first index."""
        pb = self.per_block
        while True:     # a new block takes the cluster at next_free: start again after it
            start = self.next_free
            end = start + n
            missing = next((r for r in range(start // pb, (end - 1) // pb + 1)
                            if self._block(r) is None), None)
            if missing is None:
                break
            self._new_block(missing)
        self.meta.check(start, n, "allocating clusters")
        self._count(start, n)       # everything from next_free on has refcount 0
        self.next_free = end
        if self.cursor == start:
            self.cursor = end
        return start

    def alloc_some(self, n: int) -> tuple[int, int]:
        """Reserve 1 to n contiguous clusters, reusing free ones first: (first index, count).

        They read as zeros. A free cluster that is metadata is refused (the image
        is corrupt): see qcow2_meta.
        """
        found = self._find_free(n) if self.cursor < self.next_free else None
        if found is None:
            return self.alloc(n), n
        start, k = found
        self.meta.check(start, k, "reusing free clusters")
        cs = self.cs
        if next(data_runs(self.fd, start * cs, (start + k) * cs), None) is not None:
            if not punch_hole(self.fd, start * cs, k * cs):
                pwrite_full(self.fd, bytes(k * cs), start * cs)
        self._count(start, k)
        self.cursor = start + k
        return start, k

    def _find_free(self, n: int) -> tuple[int, int] | None:
        """The first run (start, 1..n clusters) of refcount 0 from the cursor up to
        next_free, within existing blocks; moves the cursor up to it."""
        pb = self.per_block
        c = self.cursor
        while c < self.next_free:
            r = c // pb
            base = r * pb
            b = self._block(r)
            hi = min(pb, self.next_free - base)
            try:
                i = b.index(0, c - base, hi) if b is not None else None
            except ValueError:
                i = None
            if i is None:       # all counted (or no block: not ours to place)
                c = base + pb
                continue
            j, stop = i + 1, min(hi, i + n)
            while j < stop and b[j] == 0:
                j += 1
            self.cursor = base + i
            return base + i, j - i
        self.cursor = self.next_free
        return None

    def _count(self, start: int, n: int) -> None:
        """Set refcount 1 on clusters [start, start+n), which have refcount 0 now."""
        pb = self.per_block
        end = start + n
        for r in range(start // pb, (end - 1) // pb + 1):
            lo, hi = max(start, r * pb) - r * pb, min(end, (r + 1) * pb) - r * pb
            self._block(r)[lo:hi] = self._ones * (hi - lo)
            self.dirty.add(r)

    def freed(self, clusters: list[int]) -> None:
        """Clusters whose count 0 is now on disk (sorted): punch them out; reusable."""
        if not clusters:
            return
        for start, n in runs(clusters):
            punch_hole(self.fd, start << self.cluster_bits, n << self.cluster_bits)
        self.cursor = min(self.cursor, clusters[0])

    def _new_block(self, r: int) -> None:
        """Create the refcount block for range r at the end of the file."""
        c = self.next_free
        home = c // self.per_block
        if home != r and self._block(home) is None:
            self._new_block(home)      # the block's own cluster needs a counted home first
            return
        self.meta.check(c, 1, f"placing refcount block {r}")
        self.next_free = c + 1
        if self.cursor == c:
            self.cursor = c + 1
        while len(self.table) <= r:
            self.table.append(0)
        self.table[r] = c << self.cluster_bits
        self.table_dirty = True
        self.meta.add(qm.REFCOUNT_BLOCK, c)
        self.blocks[r] = array(self.codec.typecode, bytes(self.per_block * self._ones.itemsize))
        self.dirty.add(r)
        if len(self.blocks) > self.cache_max:
            self._evict()
        self._block(home)[c % self.per_block] = 1
        self.dirty.add(home)

    def decref(self, cluster: int) -> int:
        """Drop one reference (the caller has checked, with get(), that there is one)."""
        b = self._block(cluster // self.per_block)
        i = cluster % self.per_block
        if b is None or b[i] == 0:
            raise ImageError(f"{self.path}: refcount underflow at cluster {cluster} "
                             f"(image is corrupt; run qemu-img check -r all)")
        b[i] -= 1
        self.dirty.add(cluster // self.per_block)
        return b[i]

    # --- writing (called by the image's flush, in crash-safe order) -----------------
    def grow_table_if_needed(self) -> tuple[int, int] | None:
        """Move the table to a bigger place at the end of the file if it outgrew the old one.

        Returns the old (offset, clusters) for the caller to free once the header
        points at the new table.
        """
        if len(self.table) <= self.capacity:
            return None
        old = (self.table_offset, self.table_clusters)
        per_cluster = self.cs // 8
        clusters = -(-(len(self.table) * 2) // per_cluster)
        start = self.alloc(clusters)
        # alloc() may have created blocks (table entries) of its own; the
        # doubling leaves room for them, but check rather than assume.
        if len(self.table) > clusters * per_cluster:
            raise ImageError(f"{self.path}: refcount table growth did not converge")
        if clusters * self.cs > 8 << 20:
            raise ImageError(f"{self.path}: refcount table would exceed 8 MiB")
        self.table_offset = start << self.cluster_bits
        self.table_clusters = clusters
        self.capacity = clusters * per_cluster
        self.meta.add(qm.REFCOUNT_TABLE, start, clusters)
        self.table_dirty = True
        return old

    def write_blocks(self) -> bool:
        for r in sorted(self.dirty):
            self._write_block(r, self.blocks[r])
        wrote = bool(self.dirty)
        self.dirty.clear()
        return wrote

    def write_table(self) -> None:
        padded = array("Q", self.table)
        padded.extend([0] * (self.capacity - len(padded)))
        self.meta.check(self.table_offset >> self.cluster_bits, self.table_clusters,
                        "writing the refcount table", ignore=qm.REFCOUNT_TABLE)
        pwrite_full(self.fd, to_be(padded), self.table_offset)
        self.table_dirty = False

    def extend_file(self) -> None:
        """Make the file cover every counted cluster, so no refcount points past its end."""
        end = self.next_free * self.cs
        if os.fstat(self.fd).st_size <= end - self.cs:   # a partial last cluster is fine
            os.ftruncate(self.fd, end)
        self.file_size = max(self.file_size, end)


def runs(clusters):
    """Coalesce sorted cluster indices into (start, count) runs."""
    start = prev = None
    for c in clusters:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = c
    if start is not None:
        yield start, prev - start + 1
