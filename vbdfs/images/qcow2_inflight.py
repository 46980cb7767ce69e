"""What a qcow2 image's data I/O outside its metadata lock may not overlap.

Qcow2Image maps, allocates and links under one lock and runs the data
preads and pwrites of plain clusters without it, so that requests overlap
while they wait for a slow store (as qemu's qcow2 driver drops its lock
around data I/O). Two rules keep that safe; this module holds their
bookkeeping, always under the image's lock:

* Allocations in flight: a write that needs new host clusters allocates
  them under the lock, writes its data (and the copy-on-write fill of a
  partial cluster) without it, then links them in the L2 table under the
  lock again. Until that link, no other write or zero may touch those guest
  clusters: it would see them unallocated and allocate a second time, or a
  fill would overwrite its data. It waits (wait_clear), then maps again.
  Reads need not wait: they read the old mapping, which stays valid.
* Frees: a host cluster whose L2 entry was replaced (overwritten by a
  copy-on-write, zeroed, discarded) may still be read or written by a data
  operation that mapped it before. Its refcount is dropped, and the cluster
  reused, only once every data operation that began before the release has
  ended. Operations are counted per epoch: each flush hands over the
  clusters released since the last one tagged with a new epoch (hold), and
  a tag is ready once no operation of an older epoch is running (ready).
  This comes on top of the rule that a freed cluster is reused only after
  its count 0 is on disk (qcow2_refcount).
"""

from __future__ import annotations

import threading


class InFlight:
    def __init__(self, lock: threading.Lock):
        self.changed = threading.Condition(lock)    # an allocation was linked
        self.epoch = 0
        self.running: dict[int, int] = {}           # epoch -> data operations running
        self.allocating: list[tuple[int, int]] = []  # guest clusters [first, end)
        self.held: list[tuple[int, list[int]]] = []  # (epoch, clusters) to free

    def begin(self) -> int:
        """A data operation starts: its epoch, for end()."""
        e = self.epoch
        running = self.running
        running[e] = running.get(e, 0) + 1
        return e

    def end(self, e: int) -> None:
        running = self.running
        n = running[e] - 1
        if n:
            running[e] = n
        else:
            del running[e]

    def allocate(self, ranges: list[tuple[int, int]]) -> None:
        """Guest clusters [first, end) get new host clusters, not yet linked."""
        self.allocating.extend(ranges)

    def linked(self, ranges: list[tuple[int, int]]) -> None:
        for r in ranges:
            self.allocating.remove(r)
        self.changed.notify_all()

    def wait_clear(self, first: int, end: int) -> bool:
        """Wait until no allocation in flight touches guest clusters [first, end);
        whether it had to."""
        waited = False
        while any(a < end and first < b for a, b in self.allocating):
            self.changed.wait()
            waited = True
        return waited

    def hold(self, clusters: list[int]) -> None:
        """Clusters released since the last flush: free them once ready()."""
        if clusters:
            self.epoch += 1
            self.held.append((self.epoch, clusters))

    def any_ready(self) -> bool:
        return bool(self.held) and (not self.running or self.held[0][0] <= min(self.running))

    def ready(self) -> list[int]:
        """The held clusters no running data operation can still use."""
        oldest = min(self.running) if self.running else self.epoch
        out: list[int] = []
        while self.held and self.held[0][0] <= oldest:
            out.extend(self.held.pop(0)[1])
        return out
