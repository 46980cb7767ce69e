"""qcow2 refcounts (16-bit only) and the cluster allocator.

Refcount blocks are cached in a bounded LRU and written by the image's flush,
before any L2/L1 entry that points at a newly counted cluster (crash
invariant: on disk a refcount is never lower than the number of references).
A dirty block evicted early is simply written early: until the flush's
free step, blocks only hold increments, and a refcount that reaches disk too
soon is at worst a leak.

Allocation only ever appends at the end of the file: a cluster handed out in
this session has never been written, so it reads as zeros without a write,
and a freed cluster cannot be reused while an old on-disk L2 entry might still
point at it. Free space left by frees is punched out of the file instead.
The append point starts past both the end of the file and the highest
counted cluster (qemu can leave counted clusters past the end after a crash:
leaks), so every cluster from `next_free` on has refcount 0 and allocation
never has to look at refcounts.

The refcount table is checked at open: every block must be cluster aligned,
inside the file, used once, and not overlap the header, the L1, an L2 table
or the refcount table itself (otherwise updating one count would overwrite
other metadata).
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import OrderedDict

from .base import ImageError
from .fileops import pread_full, pwrite_full

_SWAP = sys.byteorder == "little"    # on-disk tables are big endian
RC_CACHE_BYTES = 4 << 20              # refcount blocks kept in memory


def load_be(fd: int, typecode: str, nbytes: int, offset: int) -> array:
    """Read a big-endian table into a native array."""
    a = array(typecode, pread_full(fd, nbytes, offset))
    if _SWAP:
        a.byteswap()
    return a


def to_be(a: array) -> bytes:
    if not _SWAP:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


class Refcounts:
    def __init__(self, fd: int, path: str, cluster_bits: int, table_offset: int,
                 table_clusters: int, file_size: int, meta: set):
        """`meta` holds the clusters of the header, the L1 and the L2 tables; the
        refcount table and blocks are added to it."""
        self.fd = fd
        self.path = path
        self.cluster_bits = cluster_bits
        self.cs = cs = 1 << cluster_bits
        self.per_block = self.cs // 2                    # 16-bit entries
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = load_be(fd, "Q", table_clusters * self.cs, table_offset)
        self.capacity = len(self.table)                  # entries the on-disk table holds
        self.blocks: OrderedDict[int, array] = OrderedDict()   # LRU
        self.cache_max = max(8, RC_CACHE_BYTES // cs)
        self.dirty: set[int] = set()
        self.table_dirty = False
        self.meta = meta                                 # cluster indices holding metadata
        self.file_size = file_size
        first = table_offset >> cluster_bits
        meta.update(range(first, first + table_clusters))
        seen = set()
        for r, off in enumerate(self.table):
            if not off:
                continue
            c = off >> cluster_bits
            why = ("is not cluster aligned" if off & (cs - 1) else
                   "lies outside the file" if off + cs > file_size else
                   "is used twice" if c in seen else
                   "overlaps the header, L1/L2 or refcount table" if c in meta else None)
            if why:
                raise ImageError(f"{path}: refcount block {r} at {off:#x} {why} "
                                 f"(image is corrupt)")
            seen.add(c)
        meta.update(seen)
        self.next_free = self._first_free(-(-file_size // cs))

    def _first_free(self, eof: int) -> int:
        """max(eof, highest counted cluster + 1): one read per block covering clusters past eof."""
        pb = self.per_block
        for r in range(len(self.table) - 1, eof // pb - 1, -1):
            if self.table[r]:
                used = pread_full(self.fd, self.cs, self.table[r]).rstrip(b"\0")
                if used:
                    return max(eof, r * pb + (len(used) + 1) // 2)
        return eof

    # --- lookup ---------------------------------------------------------------
    def _block(self, r: int) -> array | None:
        b = self.blocks.get(r)
        if b is not None:
            self.blocks.move_to_end(r)
            return b
        if r >= len(self.table) or not self.table[r]:
            return None
        b = self.blocks[r] = load_be(self.fd, "H", self.cs, self.table[r])   # checked at open
        if len(self.blocks) > self.cache_max:
            self._evict()
        return b

    def _evict(self) -> None:
        r, b = self.blocks.popitem(last=False)
        if r in self.dirty:     # safe to write early: see the module docstring
            pwrite_full(self.fd, to_be(b), self.table[r])
            self.dirty.discard(r)

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
        # Everything from next_free on has refcount 0 (see __init__): just count them.
        for r in range(start // pb, (end - 1) // pb + 1):
            lo, hi = max(start, r * pb) - r * pb, min(end, (r + 1) * pb) - r * pb
            self._block(r)[lo:hi] = array("H", [1]) * (hi - lo)
            self.dirty.add(r)
        self.next_free = end
        return start

    def _new_block(self, r: int) -> None:
        """Create the refcount block for range r at the end of the file."""
        c = self.next_free
        home = c // self.per_block
        if home != r and self._block(home) is None:
            self._new_block(home)      # the block's own cluster needs a counted home first
            return
        self.next_free = c + 1
        while len(self.table) <= r:
            self.table.append(0)
        self.table[r] = c << self.cluster_bits
        self.table_dirty = True
        self.meta.add(c)
        self.blocks[r] = array("H", bytes(self.cs))
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
        if b[i] == 0:
            self.meta.discard(cluster)
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
        self.meta.update(range(start, start + clusters))
        self.table_dirty = True
        return old

    def write_blocks(self) -> bool:
        for r in sorted(self.dirty):
            pwrite_full(self.fd, to_be(self.blocks[r]), self.table[r])
        wrote = bool(self.dirty)
        self.dirty.clear()
        return wrote

    def write_table(self) -> None:
        padded = array("Q", self.table)
        padded.extend([0] * (self.capacity - len(padded)))
        pwrite_full(self.fd, to_be(padded), self.table_offset)
        self.table_dirty = False

    def extend_file(self) -> None:
        """Make the file cover every counted cluster, so no refcount points past its end."""
        end = self.next_free * self.cs
        if os.fstat(self.fd).st_size < end:
            os.ftruncate(self.fd, end)
        self.file_size = max(self.file_size, end)
