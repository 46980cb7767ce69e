"""DiskIO (vbdfs/iopath.py) in-process, on real images, with trio: requests
overlap in worker threads, qcow2 ones too (and never block the loop's
thread on the engine's lock), a flush waits for the writes before it, the
thread count stays bounded.

Latency is injected in the image (a sleep around the real call), as a slow
store would add it; the images and their files are real.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time

import pytest
import trio

from vbdfs import iopath
from vbdfs.images.qcow2 import Qcow2Image
from vbdfs.images.raw import RawImage

MiB = 1 << 20
DELAY = 0.05


class SlowRaw(RawImage):
    """A raw image on a store where every read and write takes DELAY seconds."""

    def read(self, offset, length):
        time.sleep(DELAY)
        return super().read(offset, length)

    def write(self, offset, data):
        time.sleep(DELAY)
        super().write(offset, data)
        self.log.append(("write done", offset))

    def flush(self):
        self.log.append(("flush",))
        super().flush()


class GuardedQcow2(Qcow2Image):
    """Counts the callers inside the engine at once (trio's ConflictDetector
    idea); a short sleep inside widens the window for a second one."""

    inside = 0
    most = 0

    def _enter(self):
        self.inside += 1
        self.most = max(self.most, self.inside)
        time.sleep(0.001)

    def read(self, offset, length):
        self._enter()
        try:
            return super().read(offset, length)
        finally:
            self.inside -= 1

    def write(self, offset, data):
        self._enter()
        try:
            super().write(offset, data)
        finally:
            self.inside -= 1

    def flush(self):
        self._enter()
        try:
            super().flush()
        finally:
            self.inside -= 1


class HeldQcow2(Qcow2Image):
    """A qcow2 image whose flush holds the engine's lock until `release` is set."""

    def __init__(self, path):
        super().__init__(path)
        self.holding = threading.Event()
        self.release = threading.Event()

    def _sync(self):
        if not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(10)
        super()._sync()


@pytest.fixture
def slow_disk(tmp_path):
    """slow_disk(mode): a 16 MiB SlowRaw image and its DiskIO in that mode
    (closed at teardown)."""
    images = []

    def make(mode):
        RawImage.create(str(tmp_path / "disk.raw"), 16 * MiB).close()
        image = SlowRaw(str(tmp_path / "disk.raw"))
        image.log = []
        images.append(image)
        return image, iopath.DiskIO(image, mode)
    yield make
    for image in images:
        image.close()


def test_threads_overlap_slow_requests(slow_disk):
    image, io = slow_disk("threads")
    n = 16

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(io.write, i * 4096, bytes([i + 1]) * 4096)
        results = {}

        async def read(i):
            results[i] = await io.read(i * 4096, 4096)
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(read, i)
        return results

    start = time.monotonic()
    results = trio.run(main)
    elapsed = time.monotonic() - start
    assert all(bytes(results[i]) == bytes([i + 1]) * 4096 for i in range(n))
    # Serially: 2 * 16 * 50 ms = 1.6 s. Overlapped: a few DELAYs.
    assert elapsed < 2 * n * DELAY / 4, elapsed


def test_inline_mode_serves_one_at_a_time(slow_disk):
    """The control for the test above: io=inline has no overlap."""
    image, io = slow_disk("inline")

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(io.read, i * 4096, 4096)

    start = time.monotonic()
    trio.run(main)
    assert time.monotonic() - start >= 8 * DELAY


def test_flush_waits_for_the_writes_before_it(slow_disk):
    image, io = slow_disk("threads")

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(io.write, i * 4096, b"x" * 4096)
            await trio.testing.wait_all_tasks_blocked()    # the writes are in threads
            await io.flush()
            image.log.append(("flush answered",))

    import trio.testing  # noqa: F401  (trio.testing is a submodule)
    trio.run(main)
    kinds = [entry[0] for entry in image.log]
    assert kinds[:4] == ["write done"] * 4, kinds
    assert kinds[4:] == ["flush", "flush answered"], kinds


def test_worker_threads_stay_bounded(slow_disk):
    image, io = slow_disk("threads")
    peak = [0]

    async def main():
        async def sample():
            while True:
                peak[0] = max(peak[0], sum(t.name.startswith("vbdfs-io-")
                                           for t in threading.enumerate()))
                await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as requests:
                for i in range(200):
                    requests.start_soon(io.read, (i % 64) * 4096, 4096)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert 1 < peak[0] <= iopath.THREADS


def test_qcow2_requests_overlap(tmp_path):
    """64 tasks writing adjacent ranges (each its own bytes, sharing clusters
    with the others), reading them back and flushing through io=threads:
    several are in the engine at once (each sleeps a little in there, as on
    a slow store), the content equals a model and qemu-img check finds the
    image clean."""
    path = str(tmp_path / "disk.qcow2")
    size = 8 * MiB
    Qcow2Image.create(path, size).close()
    image = GuardedQcow2(path)
    io = iopath.DiskIO(image, "threads")
    model = bytearray(size)
    rng = random.Random(14)
    tasks = 64                  # task i owns sectors i, i + tasks, i + 2 * tasks...

    async def worker(i, seed):
        r = random.Random(seed)
        for _ in range(12):
            what = r.random()
            off = (r.randrange(size // 512 // tasks) * tasks + i) * 512
            if what < 0.6:
                data = bytes([r.randrange(1, 256)]) * 512 if r.random() < 0.8 else bytes(512)
                model[off:off + 512] = data
                await io.write(off, data)
            elif what < 0.9:
                assert bytes(await io.read(off, 512)) == bytes(model[off:off + 512])
            else:
                await io.flush()

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, i, rng.random())
        await io.flush()

    trio.run(main)
    assert image.most > 1
    assert bytes(image.read(0, size)) == bytes(model)
    image.close()
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_qcow2_requests_never_block_the_loop_on_the_engine_lock(tmp_path):
    """io=auto on a fast qcow2 disk: while one of the disk's requests is in a
    worker thread (it may hold the engine's lock: an inline request would
    block the loop's thread on it), other requests wait without blocking the
    loop. Here a flush holds the lock for 0.5 s; reads meanwhile must leave
    the loop running."""
    path = str(tmp_path / "disk.qcow2")
    Qcow2Image.create(path, 8 * MiB).close()
    image = HeldQcow2(path)
    image.write(0, b"x" * 65536)
    io = iopath.DiskIO(image, "auto")
    ticks = []

    async def main():
        async def tick():
            while True:
                ticks.append(time.monotonic())
                await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            nursery.start_soon(io.flush)
            while not image.holding.is_set():
                await trio.sleep(0.001)
            threading.Timer(0.5, image.release.set).start()
            start = time.monotonic()
            for i in range(4):
                assert bytes(await io.read(i * 4096, 4096)) == b"x" * 4096
            nursery.cancel_scope.cancel()
        return start

    start = trio.run(main)
    during = [t for t in ticks if start <= t < start + 0.45]
    assert len(during) >= 10, f"the loop's thread stalled ({len(during)} ticks in 0.45 s)"
    image.close()


class ThreadNotingQcow2(HeldQcow2):
    """Notes which thread each read runs on (inline ones call read_serial)."""

    def read(self, offset, length):
        self.readers.append(threading.get_ident())
        return super().read(offset, length)

    def read_serial(self, offset, length):
        self.readers.append(threading.get_ident())
        return super().read_serial(offset, length)


def test_fast_qcow2_disk_returns_inline_after_a_thread(tmp_path):
    """io=auto, a fast qcow2 disk at queue depth 16: reads arriving while a
    flush is in a worker thread wait for it, then run inline. Sent to threads
    instead, they kept the disk in threads for as long as one of them was in
    flight, that is for good at this depth (~11 us of the loop's CPU per
    hand-off)."""
    path = str(tmp_path / "disk.qcow2")
    Qcow2Image.create(path, 8 * MiB).close()
    image = ThreadNotingQcow2(path)
    image.readers = []
    image.write(0, b"x" * MiB)
    io = iopath.DiskIO(image, "auto")
    loop_thread = threading.get_ident()

    async def reader(r):
        for _ in range(100):
            off = r.randrange(MiB // 4096) * 4096
            assert bytes(await io.read(off, 4096)) == b"x" * 4096

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.flush)
            while not image.holding.is_set():
                await trio.sleep(0.001)
            threading.Timer(0.1, image.release.set).start()
            for i in range(16):
                nursery.start_soon(reader, random.Random(i))

    trio.run(main)
    image.close()
    assert len(image.readers) == 1600
    in_threads = sum(t != loop_thread for t in image.readers)
    assert in_threads == 0, f"{in_threads} of 1600 reads ran in worker threads"


def flush_held(engine):
    """engine with a flush that waits for `release` (in a worker thread)."""
    class FlushHeld(engine):
        def flush(self):
            self.log.append("flush in")
            assert self.release.wait(10)
            super().flush()
            self.log.append("flush out")
    return FlushHeld


@pytest.mark.parametrize("engine", [RawImage, Qcow2Image], ids=["raw", "qcow2"])
@pytest.mark.parametrize("mode", iopath.MODES)
def test_a_paused_disk_holds_back_its_requests_only(tmp_path, mode, engine):
    """paused() waits for the disk's requests in flight (a flush in a worker
    thread), holds back every kind of request of that disk, those that came
    before it and waited too, while the Image is swapped and while a second
    pause that queued behind it runs; another disk's requests go on. Then
    they run, on the new Image (the old one is closed: there they fail)."""
    import trio.testing  # noqa: F401  (trio.testing is a submodule)
    paths = [str(tmp_path / f"{n}.img") for n in "ab"]
    for path in paths:
        engine.create(path, 8 * MiB).close()
    a = flush_held(engine)(paths[0])
    a.log, a.release = [], threading.Event()
    a.write(0, b"x" * 65536)
    b = engine(paths[1])
    io_a, io_b = iopath.DiskIO(a, mode), iopath.DiskIO(b, mode)
    phase = ["before"]
    done = []                  # (request, phase it ended in)
    swapped = []

    async def request(name, call, *args):
        await call(*args)
        done.append((name, phase[0]))

    def requests(nursery, tag):
        nursery.start_soon(request, f"read {tag}", io_a.read, 0, 4096)
        nursery.start_soon(request, f"write {tag}", io_a.write, 4096, b"y" * 4096)
        nursery.start_soon(request, f"zero {tag}", io_a.zero, 8192, 4096)
        nursery.start_soon(request, f"seek {tag}", io_a.seek, 0, True)
        nursery.start_soon(request, f"flush {tag}", io_a.flush)

    async def pause(first):
        async with io_a.paused():
            assert not io_a._active
            phase[0] = "in pause"
            if mode != "inline":            # the flushes begun before have ended
                assert a.log.count("flush out") == a.log.count("flush in") >= 1
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.05)          # any request let through ends meanwhile
            await io_b.write(0, b"b" * 4096)               # the other disk runs
            assert bytes(await io_b.read(0, 4096)) == b"b" * 4096
            await io_b.flush()
            if first:
                a.release.set()                     # its close flushes
                a.close()
                swapped.append(engine(paths[0]))
                io_a.image = swapped[0]
            await trio.sleep(0.05)
            phase[0] = "after"

    async def main():
        async with trio.open_nursery() as nursery:
            if mode != "inline":
                nursery.start_soon(io_a.flush)          # in flight in a worker thread
                while not a.log:
                    await trio.sleep(0.001)
                requests(nursery, "early")              # a qcow2's wait for the flush
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(pause, True)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(pause, False)            # queued behind the first
            requests(nursery, "late")
            await trio.testing.wait_all_tasks_blocked()
            if mode != "inline":
                assert phase == ["before"]              # the pause waits for the flush
                a.release.set()

    trio.run(main)
    assert len(done) == (10 if mode != "inline" else 5)
    assert [r for r, p in done if p == "in pause"] == []
    assert {r for r, p in done if r.endswith("late")} == {
        f"{r} late" for r in ("read", "write", "zero", "seek", "flush")}
    assert bytes(swapped[0].read(4096, 4096)) == b"y" * 4096
    swapped[0].close()
    b.close()
