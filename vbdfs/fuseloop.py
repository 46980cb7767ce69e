"""How pyfuse3's request loop reads requests: in a receiving thread where
pyfuse3 has one, else with a faster wait when requests are already queued.

With a pyfuse3 that can read requests in a thread of its own
(patches/pyfuse3-*-receive-thread.patch: `main(receive_thread=True)`), the
daemon uses it: reading a request copies its data out of the kernel (1 MiB
for a large write), and in that thread, which needs no GIL, the copy
overlaps with the loop's thread writing the previous request's data into
the backing file. Through a loop device (1 MiB writes at queue depth 16)
that was ~1.35x the speed at the same CPU per MiB; a lone request is still
read by the loop's thread itself. The fast wait below is then not installed
(the patched pyfuse3 takes queued requests without a trio checkpoint itself).

Otherwise:

pyfuse3 runs each FUSE request through a full trio scheduling cycle: take a
lock, register /dev/fuse with epoll, park, let the scheduler poll, wake up,
read one request. Under load (queue depth 16 from fio or a guest) that cycle
cost more than the I/O itself: profiling showed the daemon's single thread
spending most of its time there.

install() replaces pyfuse3's `_wait_fuse_readable` with a wrapper that, when
a task that just served a request finds another one already waiting (poll
with timeout 0), lets it read that request at once. Measured with
tools/bench on raw images: 4 KiB random I/O at queue depth 16 went from
~0.6x to ~1x qemu-storage-daemon's FUSE export.

Why it is safe, also with handlers that await (requests handed to worker
threads, see iopath.py): a request is read by exactly one task, because
every read follows, with no await in between, a poll that found a request
queued. The fast path reads right after its poll. The slow path is pyfuse3's
own (one task at a time waits under its lock for the fd to become readable)
plus a poll after it wakes: a task woken for a request that another task's
fast path took in the meantime finds nothing queued, and waits again instead
of blocking the whole thread in read(2) on /dev/fuse.

After a streak of fast reads the task takes the slow path once, so the other
trio tasks (signal handling, finished thread hand-offs) get to run under
sustained load.
"""

from __future__ import annotations

import logging
import os
import select

import pyfuse3
import trio

log = logging.getLogger(__name__)

MAX_STREAK = 64
# The patched pyfuse3 (see above) reads requests in a thread of its own.
RECEIVE_THREAD = hasattr(pyfuse3, "requests_received")

_original = None
_poll = None
_streak = 0


async def _wait_fuse_readable():
    global _streak
    if _streak < MAX_STREAK and _poll.poll(0):
        _streak += 1
        return True
    _streak = 0
    while True:
        ready = await _original()
        if not ready or _poll.poll(0):
            return ready
        # Woken for a request another task's fast path has read since: wait again.


def requests_waiting() -> bool:
    """True if a request is queued that no task has taken yet (in the kernel,
    or read ahead by pyfuse3's receiving thread)."""
    if RECEIVE_THREAD and pyfuse3.requests_received():
        return True
    return bool(_poll is not None and _poll.poll(0))


def main_options() -> dict:
    """pyfuse3.main()'s keyword arguments for how requests are read."""
    return {"receive_thread": True} if RECEIVE_THREAD else {}


def _session_fd():
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def install() -> bool:
    """Call after pyfuse3.init(). False (and pyfuse3 untouched) if it cannot apply."""
    global _original, _poll
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = _session_fd()
    if fd is not None and _poll is None:
        _poll = select.poll()
        _poll.register(fd, select.POLLIN)
    if RECEIVE_THREAD:
        return True
    if original is None or fd is None:
        log.info("fast request loop not installed (pyfuse3 internals changed?)")
        return False
    if original is _wait_fuse_readable:
        return True
    _original = original
    pyfuse3._wait_fuse_readable = _wait_fuse_readable
    return True
