"""How a disk's reads, writes and flushes run: inline on the daemon's one
trio thread, or handed to a bounded pool of worker threads so that requests
overlap while they wait for a slow store.

The daemon option io= chooses, for all disks:

  inline   every request runs on the request loop's thread, one at a time.
           Fastest on a local store: handing a 4 KiB page-cache read to a
           thread costs more than the read.
  threads  every read, write and flush runs in a worker thread.
  auto     (default) inline when the request would not wait for the store,
           in a worker thread when it would and other requests are queued or
           in flight (a lone request gains nothing from a thread). "Would
           wait" is:
           - for raw images, EAGAIN from preadv2/pwritev2 with RWF_NOWAIT,
             tried inline first. Local filesystems have it for reads; FUSE
             clients (GlusterFS) answer EOPNOTSUPP, as ext4 does for
             buffered writes. Without it:
           - for reads, the disk's observed latency: a moving average of
             each read's time in the image over SLOW_NS sends reads to
             threads, under FAST_NS brings them back inline;
           - writes run inline: buffered writes to one file are serialised
             by the kernel's inode lock on a FUSE client, or absorbed by the
             page cache (or GlusterFS's write-behind), so threads overlap
             them little. Measured on the delayed GlusterFS store
             (tools/bench-slow), 4 KiB writes at QD16: inline 1.6x
             qemu-storage-daemon, latency-chosen threads 0.7x (threads
             queued on the inode lock look slow, and stay in threads).
           Flushes run in a thread (fsync waits for the store).

Raw images need no lock: their requests are independent preads and
pwrites. A qcow2 image takes the same decisions: its engine is safe for
many threads (Qcow2Image holds a metadata lock around mapping, allocation
and flushes, and runs data I/O outside it, see qcow2_inflight). The loop's
thread must never wait for that lock while a worker thread holds it (a
flush's fsync, a slow read of an L2 table). So while a qcow2 disk has a
request in a worker thread, its new requests join them in threads if the
disk is slow (they overlap there), and otherwise wait, without blocking the
loop, until those have ended, then run inline. (Sending them all to
threads kept a fast disk at queue depth 16 in threads for good, since one
of its requests was always in flight: 0.76x the inline speed.) A request
served inline runs to its end without yielding, so inline requests never
contend, and it calls the Image's read_serial/write_serial: a qcow2 engine
then keeps its lock across the data I/O and skips the in-flight bookkeeping
that only overlapping requests need.
Engines not safe for two callers (legacy qcow, and a cold image, which
opens its file afresh per call) are entered by one request at a time: a
per-disk lock held across the whole request, thread hand-off included.

Bounds: at most THREADS worker threads for the daemon, and pyfuse3 runs at
most MAX_TASKS request tasks (each holds one request and its buffer, up to
1 MiB), whatever the guests' queue depth. The kernel sends a FUSE server at
most max_background asynchronous requests at once (direct I/O from fio or a
loop device, readahead); its default, 12, capped a guest's queue depth at 12
and so, on a slow store, the IOPS at 12 / latency. The daemon asks for
MAX_BACKGROUND at mount (VbdFs.max_background); requests past MAX_TASKS wait
in the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
import time

import outcome
import trio

from . import fuseloop

MODES = ("auto", "inline", "threads")
THREADS = 16
MAX_TASKS = 2 * THREADS
# Requests the kernel may have in flight to the daemon (FUSE max_background,
# set at mount: see VbdFs); those past MAX_TASKS wait in the kernel.
MAX_BACKGROUND = MAX_TASKS
# Reads of a disk averaging over SLOW_NS go to threads, back under FAST_NS
# inline. A thread hand-off costs the loop's thread ~11 us of CPU (see
# in_thread), and the request some latency: worth it only for requests that
# wait far longer.
SLOW_NS = 200_000
FAST_NS = 50_000

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_threads = 0            # worker threads started (they live as long as the daemon)
_handed_off = 0         # requests in (or queued for) a worker thread, all disks


def _worker() -> None:
    while True:
        token, task, fn, args = _jobs.get()
        result = outcome.capture(fn, *args)
        # Let go of the arguments before the task resumes: pyfuse3 receives
        # the next request into a write's buffer again only if nothing else
        # still holds (a view of) it; otherwise it allocates a new one.
        del fn, args
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)
        del task, result


async def in_thread(fn, *args):
    """fn(*args) in a worker thread; this task waits, others run.

    A plain queue and THREADS threads, not trio.to_thread.run_sync: measured
    here, that cost ~50 us of the loop thread's CPU per call (its limiter
    and thread cache), this ~11 us. Not cancellable: a write must finish
    before it is answered.
    """
    global _threads, _handed_off
    _handed_off += 1
    try:
        if _threads < THREADS and _handed_off > _threads:
            threading.Thread(target=_worker, name=f"vbdfs-io-{_threads}", daemon=True).start()
            _threads += 1
        _jobs.put((trio.lowlevel.current_trio_token(), trio.lowlevel.current_task(), fn, args))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    finally:
        _handed_off -= 1


_buffer = memoryview(bytearray(0))


def _scratch(size: int) -> memoryview:
    """One reused buffer for the reads served inline with RWF_NOWAIT: a new
    bytearray per read is zeroed first, which cost 1 MiB reads ~15% (A/B
    against io=inline's pread). Safe only because the handler returns the
    view and pyfuse3 sends the reply before any other task runs (no await
    in between); a read that goes to a thread gets its own bytes."""
    global _buffer
    if len(_buffer) < size:
        _buffer = memoryview(bytearray(size))
    return _buffer


def others_waiting() -> bool:
    """Would a thread let this request overlap with another one?"""
    return _handed_off > 0 or fuseloop.requests_waiting()


class Latency:
    """A moving average of one kind of request's time in the image (ns)."""

    __slots__ = ("average", "slow")

    def __init__(self):
        self.average = 0.0
        self.slow = False

    def timed(self, fn, *args):
        start = time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            self.note(time.perf_counter_ns() - start)

    def note(self, ns: int) -> None:
        self.average += (ns - self.average) / 8
        if self.slow:
            self.slow = self.average > FAST_NS
        else:
            self.slow = self.average > SLOW_NS


class DiskIO:
    """One open disk's request path: its Image and the mode to call it in."""

    def __init__(self, image, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown I/O mode {mode!r} (known: {', '.join(MODES)})")
        self.mode = mode
        self.image = image
        self.latency = Latency()            # of reads
        self._tickets = 0
        self._active: dict[int, bool] = {}      # requests not done: ticket -> is a write
        self._done: trio.Event | None = None    # set when one of them ends
        self._pause: trio.Event | None = None   # set when paused() ends

    @property
    def image(self):
        return self._image

    @image.setter
    def image(self, image) -> None:
        """Serve another Image of the same disk. The caller swaps only with no
        request in flight (inside paused()), so none runs on the old one."""
        self._image = image
        # The Ganeti lease moves a disk between a cached Image and a cold one.
        # A qcow2 engine of its own locks its metadata (see the docstring).
        concurrent = getattr(image, "concurrent", False)
        self.lock = None if image.format == "raw" or concurrent else trio.Lock()
        self.engine_lock = concurrent and image.format != "raw"
        # RWF_NOWAIT: tried where the Image offers it (raw), until the
        # filesystem says it has none.
        self.read_nowait = self.write_nowait = hasattr(image, "read_nowait")

    async def read(self, off: int, size: int):
        if self._pause is not None:
            await self._unpaused()
        if self.mode == "inline":
            return self.image.read_serial(off, size)
        if self.lock is not None:
            return await self._locked(False, self.image.read, off, size)
        if self.engine_lock and self._active and await self._joins_threads():
            return await self._thread(False, self.latency.timed, self.image.read, off, size)
        if self.mode == "auto" and self.read_nowait:
            try:
                data = self.image.read_nowait(off, size, _scratch(size))
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self.read_nowait = False
            else:
                if data is not None:
                    return data
                if others_waiting():
                    return await self._thread(False, self.image.read, off, size)
                return self.image.read(off, size)
        if self.mode == "threads" or self.latency.slow and others_waiting():
            return await self._thread(False, self.latency.timed, self.image.read, off, size)
        # What _run would do, spelt out: the common case of a fast qcow2 disk
        # (an extra coroutine and Latency.timed cost ~1 us per 4 KiB read).
        start = time.perf_counter_ns()
        try:
            return self.image.read_serial(off, size)
        finally:
            self.latency.note(time.perf_counter_ns() - start)

    async def write(self, off: int, data) -> None:
        if self._pause is not None:
            await self._unpaused()
        if self.mode == "inline":
            return self.image.write_serial(off, data)
        if self.lock is not None:
            return await self._locked(True, self.image.write, off, data)
        if self.engine_lock and self._active and await self._joins_threads():
            return await self._thread(True, self.image.write, off, data)
        if self.mode == "auto" and self.write_nowait:
            try:
                n = self.image.write_nowait(off, data)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self.write_nowait = False
            else:
                if n == len(data):
                    return
                off, data = off + n, memoryview(data)[n:]
                if others_waiting():
                    return await self._thread(True, self.image.write, off, data)
                return self.image.write(off, data)
        if self.mode == "threads":
            return await self._thread(True, self.image.write, off, data)
        return self.image.write_serial(off, data)   # as _run would, without its coroutine

    async def zero(self, off: int, length: int) -> None:
        """Deallocate a range (fallocate: a guest's discard or write-zeroes):
        run as a write."""
        if self._pause is not None:
            await self._unpaused()
        if self.mode == "inline":
            return self.image.zero(off, length)
        if self.lock is not None:
            return await self._locked(True, self.image.zero, off, length)
        if self.engine_lock and self._active and await self._joins_threads():
            return await self._thread(True, self.image.zero, off, length)
        return await self._run(True, self.image.zero, off, length)

    async def seek(self, off: int, data: bool):
        """SEEK_DATA / SEEK_HOLE: reads a qcow2 image's metadata (under its lock)."""
        if self._pause is not None:
            await self._unpaused()
        if self.mode == "inline":
            return self.image.seek(off, data)
        if self.lock is not None:
            return await self._locked(False, self.image.seek, off, data)
        if self.engine_lock and self._active and await self._joins_threads():
            return await self._thread(False, self.image.seek, off, data)
        return self.image.seek(off, data)

    async def flush(self) -> None:
        """Make every write answered before this flush durable: wait for the
        writes still in flight that started before it, then flush the image."""
        if self._pause is not None:
            await self._unpaused()
        if self.mode == "inline":
            return self.image.flush()
        ticket = self._begin(False)
        try:
            await self._wait(lambda: any(w and t < ticket for t, w in self._active.items()))
            if self.lock is not None:
                async with Held(self.lock):
                    return await in_thread(self.image.flush)
            return await in_thread(self.image.flush)
        finally:
            self._end(ticket)

    async def idle(self) -> None:
        """Wait until no request of this disk is in flight: then its Image
        can be closed."""
        await self._wait(lambda: self._active)

    @contextlib.asynccontextmanager
    async def paused(self):
        """Hold back this disk's new requests, wait for those in flight, and
        let them go at exit: meanwhile the Image may be swapped in a thread
        (a Ganeti lease move, a grow) while the other disks are served."""
        await self._unpaused()          # one pause at a time
        self._pause = trio.Event()
        try:
            await self.idle()
            yield
        finally:
            pause, self._pause = self._pause, None
            pause.set()
            self._wake()                # those waiting in _joins_threads look again

    async def _unpaused(self) -> None:
        while self._pause is not None:  # another pause may have begun before we ran
            await self._pause.wait()

    # --- how a request runs -----------------------------------------------------
    async def _joins_threads(self) -> bool:
        """A qcow2 disk with requests in worker threads, one of which may hold
        the engine's lock: does this request go to a thread too? Yes in mode
        threads or while the disk is slow; else it waits until they have
        ended, and runs inline (see the module's docstring)."""
        if self.mode == "threads" or self.latency.slow:
            return True
        # Nor past a pause that began meanwhile: the Image may change in it.
        await self._wait(lambda: self._active or self._pause is not None)
        return False

    async def _run(self, is_write: bool, fn, *args):
        """In a thread in mode threads. In auto, a write inline (see the
        module's docstring); a read inline (timed) while the disk is fast, in
        a thread when it is slow and another request can overlap."""
        if self.mode == "threads":
            return await self._thread(is_write, fn, *args)
        if is_write:
            return fn(*args)
        if self.latency.slow and others_waiting():
            return await self._thread(False, self.latency.timed, fn, *args)
        return self.latency.timed(fn, *args)

    async def _thread(self, is_write: bool, fn, *args):
        ticket = self._begin(is_write)
        try:
            return await in_thread(fn, *args)
        finally:
            self._end(ticket)

    async def _locked(self, is_write: bool, fn, *args):
        """The whole request under the disk's lock (engines not safe for two callers)."""
        ticket = self._begin(is_write)
        try:
            async with Held(self.lock):
                return await self._run(is_write, fn, *args)
        finally:
            self._end(ticket)

    # --- bookkeeping of the requests that await -----------------------------------
    # (one that runs inline ends before any other request of the disk begins)
    def _begin(self, is_write: bool) -> int:
        ticket = self._tickets
        self._tickets += 1
        self._active[ticket] = is_write
        return ticket

    def _end(self, ticket: int) -> None:
        del self._active[ticket]
        self._wake()

    def _wake(self) -> None:
        if self._done is not None:
            self._done.set()
            self._done = None

    async def _wait(self, pending) -> None:
        while pending():
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()


class Held:
    """`async with lock`, without a trio checkpoint when the lock is free: an
    inline request must not yield (that would cost the fast request loop its
    speed, see fuseloop.py), nor a release that another task (a stop) must
    find done."""

    __slots__ = ("lock",)

    def __init__(self, lock: trio.Lock):
        self.lock = lock

    async def __aenter__(self):
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc):
        self.lock.release()
