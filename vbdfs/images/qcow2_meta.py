"""Which clusters of a qcow2 image hold metadata: the one overlap check.

A hostile image can point a guest cluster (an L2 entry, possibly compressed,
possibly without the COPIED flag) at the header, an L1 or L2 table, a
refcount block or table, or the snapshot table. Writing, punching or freeing
that "data" would destroy the image's own metadata, and a reused free cluster
that is still metadata would be overwritten. So every change of a cluster
asks this map first, as qemu's qcow2_pre_write_overlap_check does: guest
writes in place, punches, frees (a data pointer that is replaced or zeroed),
allocations, and the writes of metadata itself (which ignore their own kind).

The map is built when an image is opened for writing, from the header, the
active L1, the refcount table and blocks, the snapshot table and every
snapshot's L1 and L2 tables; metadata this session creates is added when it
is allocated, and metadata it retires is removed only once no table on disk
points at it any more. A dict from cluster index to a bitmask of kinds keeps
a lookup O(1); a range is tested at C speed.
"""

from __future__ import annotations

from .base import ImageError

HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7

_NAMES = {HEADER: "the header", ACTIVE_L1: "the L1 table", ACTIVE_L2: "an L2 table",
          REFCOUNT_TABLE: "the refcount table", REFCOUNT_BLOCK: "a refcount block",
          SNAPSHOT_TABLE: "the snapshot table", INACTIVE_L1: "a snapshot's L1 table",
          INACTIVE_L2: "a snapshot's L2 table"}


class MetadataOverlap(ImageError):
    """A change would have hit metadata: the image is corrupt (nothing was changed)."""


def describe(kinds: int) -> str:
    return " and ".join(name for bit, name in _NAMES.items() if kinds & bit)


class MetadataMap:
    def __init__(self):
        self._kinds: dict[int, int] = {}

    def hit(self, first: int, n: int = 1, ignore: int = 0) -> tuple[int, int] | None:
        """(cluster, kinds) of the first cluster in [first, first+n) holding metadata
        other than `ignore`, or None."""
        kinds = self._kinds
        if n == 1:
            k = kinds.get(first, 0) & ~ignore
            return (first, k) if k else None
        if kinds.keys().isdisjoint(range(first, first + n)):
            return None
        for c in range(first, first + n):
            k = kinds.get(c, 0) & ~ignore
            if k:
                return c, k
        return None

    def check(self, first: int, n: int, what: str, ignore: int = 0) -> None:
        """Raise MetadataOverlap if `what` (a change of clusters [first, first+n))
        would touch metadata other than `ignore`."""
        h = self.hit(first, n, ignore)
        if h is not None:
            raise MetadataOverlap(f"{what} would hit image metadata: {describe(h[1])} "
                                  f"(cluster {h[0]})")

    def add(self, kind: int, first: int, n: int = 1) -> None:
        kinds = self._kinds
        if n == 1:
            kinds[first] = kinds.get(first, 0) | kind
            return
        for c in range(first, first + n):
            kinds[c] = kinds.get(c, 0) | kind

    def remove(self, kind: int, first: int, n: int = 1) -> None:
        kinds = self._kinds
        for c in range(first, first + n):
            k = kinds.get(c, 0) & ~kind
            if k:
                kinds[c] = k
            else:
                kinds.pop(c, None)

    def __contains__(self, cluster: int) -> bool:
        return cluster in self._kinds
