"""DiskIO (vbdfs/iopath.py) in-process, on real images, with trio: requests
overlap in worker threads, a qcow2 image is entered by one request at a
time, a flush waits for the writes before it, the thread count stays bounded.

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


def test_qcow2_is_entered_by_one_request_at_a_time(tmp_path):
    """64 tasks writing overlapping and adjacent ranges, reading and
    flushing through io=threads: never two in the engine; the content
    equals a model and qemu-img check finds the image clean."""
    path = str(tmp_path / "disk.qcow2")
    size = 8 * MiB
    Qcow2Image.create(path, size).close()
    image = GuardedQcow2(path)
    io = iopath.DiskIO(image, "threads")
    model = bytearray(size)
    rng = random.Random(14)

    async def worker(seed):
        r = random.Random(seed)
        for _ in range(12):
            what = r.random()
            off = r.randrange(0, size // 512 - 300) * 512
            n = r.choice([512, 4096, 65536, 70000 // 512 * 512, 131072])
            if what < 0.6:
                data = bytes([r.randrange(1, 256)]) * n if r.random() < 0.8 else bytes(n)
                # The model takes the write when it is issued; overlapping
                # writes in flight together are serialised by the lock in
                # issue order (trio's Lock is FIFO), so the model matches.
                model[off:off + n] = data
                await io.write(off, data)
            elif what < 0.9:
                await io.read(off, n)
            else:
                await io.flush()

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(worker, rng.random())
        await io.flush()

    trio.run(main)
    assert image.most == 1
    assert bytes(image.read(0, size)) == bytes(model)
    image.close()
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
