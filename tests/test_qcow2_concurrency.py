"""Qcow2Image with many callers at once (the daemon's worker threads): 16
threads on one image writing, zeroing, reading and flushing, one of them
growing it, against a model; qemu-img judges the result.

So that the right result is well defined while requests overlap, each
thread owns a disjoint set of byte ranges ("chunks": random lengths, so
clusters are shared by several owners and every write has neighbours in
its clusters) and checks what it reads there; and a few shared clusters
are written whole (and zeroed) by every thread at once, so that several
writes race to allocate one cluster: its content must always be made of
those writes, and in the end be exactly one of them.

The data I/O the engine does outside its lock is slowed down (a random
sleep before some preads and pwrites, as a slow store would add it), so
that requests really overlap there: a read still running when its cluster
is freed and reused, or a write racing another one's allocation.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from vbdfs.images import qcow2
from vbdfs.images.qcow2 import Qcow2Image

MiB = 1 << 20
THREADS = 16
OPS = 600           # per thread
SECTOR = 512
GROW = 2 * MiB


def _slowly(fn):
    def slow(*args):
        if random.random() < 0.3:
            time.sleep(random.random() * 0.002)
        return fn(*args)
    return slow


class _SlowOS:
    """The os module, with slow preads (the engine's one-pread fast path)."""
    pread = staticmethod(_slowly(os.pread))

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.fixture
def slow_store(monkeypatch):
    monkeypatch.setattr(qcow2, "os", _SlowOS())
    monkeypatch.setattr(qcow2, "pread_full", _slowly(qcow2.pread_full))
    monkeypatch.setattr(qcow2, "pwrite_full", _slowly(qcow2.pwrite_full))


def _tagged(tag: int, n: int) -> bytes:
    """n bytes of one 8-byte tag: every aligned word tells which write it came from."""
    return tag.to_bytes(8, "little") * (n // 8)


class Disk:
    """The image, the model and the layout the threads share."""

    def __init__(self, image: Qcow2Image, initial: bytes, seed: int, shared_n: int):
        self.image = image
        self.cs = cs = image.cs
        size = image.size
        self.model = bytearray(initial)
        rng = random.Random(seed)
        self.shared = sorted(rng.sample(range(size // cs), shared_n))
        self.written = {c: {0} for c in self.shared}    # tags written (0: zeros)
        self.initial = {c: initial[c * cs:(c + 1) * cs] for c in self.shared}
        self.chunks: list[list[tuple[int, int]]] = [[] for _ in range(THREADS)]
        taken = set(self.shared)
        pos = 0
        while pos < size:
            g = pos // cs
            if g in taken:
                pos = (g + 1) * cs
                continue
            n = rng.randrange(1, 3 * cs // SECTOR // 2 + 2) * SECTOR
            nxt = next((c * cs for c in self.shared if c * cs > pos), size)
            n = min(n, nxt - pos)
            self.chunks[rng.randrange(THREADS)].append((pos, n))
            pos += n
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def check_shared(self, c: int, data: bytes, whole: bool) -> None:
        """A shared cluster holds only words of writes made to it (or its first
        content); at the end (whole), exactly one of them."""
        with self.lock:
            tags = set(self.written[c])
        cs, init = self.cs, self.initial[c]
        if whole:
            if data != init and not any(data == _tagged(t, cs) for t in tags):
                self.errors.append(f"shared cluster {c}: not one write whole")
            return
        words = memoryview(data).cast("Q")
        for i, w in enumerate(words):
            if w not in tags and data[i * 8:i * 8 + 8] != init[i * 8:i * 8 + 8]:
                self.errors.append(f"shared cluster {c}: word {i} ({w:#x}) was never "
                                   f"written there")
                return


def worker(d: Disk, t: int, seed: int) -> None:
    r = random.Random(seed)
    img, cs = d.image, d.cs
    for op in range(OPS):
        if t == 0 and op == OPS // 2:
            old = img.size
            img.resize(old + GROW)
            with d.lock:
                d.model.extend(bytes(GROW))
            d.chunks[0].extend((old + i, 64 << 10) for i in range(0, GROW, 64 << 10))
        what = r.random()
        if what < 0.25:     # a shared cluster, whole: every thread races for it
            c = r.choice(d.shared)
            if r.random() < 0.3:
                img.zero(c * cs, cs)
            elif r.random() < 0.5:
                tag = (t + 1) << 32 | op
                with d.lock:
                    d.written[c].add(tag)
                img.write(c * cs, _tagged(tag, cs))
            else:
                d.check_shared(c, img.read(c * cs, cs), whole=False)
            continue
        if what < 0.3:
            img.flush()
            continue
        start, n = r.choice(d.chunks[t])
        a = start + r.randrange(n // SECTOR) * SECTOR
        b = a + r.randrange(1, (start + n - a) // SECTOR + 1) * SECTOR
        if what < 0.7:
            data = r.randbytes(b - a)
            d.model[a:b] = data     # only this thread writes these bytes
            img.write(a, data)
        elif what < 0.8:
            d.model[a:b] = bytes(b - a)
            if r.random() < 0.5:
                img.zero(a, b - a)
            else:
                img.write(a, bytes(b - a))
        else:
            got = img.read(a, b - a)
            if got != d.model[a:b]:
                d.errors.append(f"thread {t}: read {a:#x}+{b - a:#x} differs from the model")


def run_threads(d: Disk, seed: int) -> None:
    def guarded(t):
        try:
            worker(d, t, seed * 1000 + t)
        except Exception as e:      # noqa: BLE001  (reported below, with the others)
            d.errors.append(f"thread {t}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.parametrize("cluster_size,size,backing", [
    (65536, 8 * MiB, False),
    (4096, 4 * MiB, False),     # requests spanning L2 tables (2 MiB each)
    (65536, 8 * MiB, True),     # partial clusters filled from the backing file
])
def test_many_threads_on_one_image(tmp_path, slow_store, cluster_size, size, backing):
    path = str(tmp_path / "disk.qcow2")
    seed = cluster_size + backing
    initial = bytes(size)
    kw = {}
    if backing:
        initial = random.Random(seed).randbytes(size)
        (tmp_path / "base.raw").write_bytes(initial)
        kw = {"backing_file": "base.raw", "backing_format": "raw"}
    Qcow2Image.create(path, size, cluster_size=cluster_size, **kw).close()
    image = Qcow2Image(path)
    d = Disk(image, initial, seed, shared_n=4)

    run_threads(d, seed)
    image.close()
    assert not d.errors, d.errors[:10]

    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, str(out)],
                   check=True)
    content = out.read_bytes()
    assert len(content) == size + GROW
    cs = cluster_size
    for c in d.shared:
        d.check_shared(c, content[c * cs:(c + 1) * cs], whole=True)
        d.model[c * cs:(c + 1) * cs] = content[c * cs:(c + 1) * cs]
    assert not d.errors, d.errors[:10]
    bad = next((i for i in range(0, len(content), cs)
                if content[i:i + cs] != d.model[i:i + cs]), None)
    assert bad is None, f"content differs from the model at {bad:#x}"


class _Gate:
    """Holds the first data pread or pwrite the engine makes that `match`es
    (fd, offset) until opened: a request caught in the middle of its data I/O."""

    def __init__(self, match):
        self.match = match
        self.reached = threading.Event()
        self.opened = threading.Event()

    def wrap(self, fn):
        def gated(fd, x, off):
            if not self.reached.is_set() and self.match(off):
                self.reached.set()
                assert self.opened.wait(10), "the gate was never opened"
            return fn(fd, x, off)
        return gated


def test_a_cluster_freed_under_a_read_is_not_reused_before_it_ends(tmp_path, monkeypatch):
    """A read is in its pread when the guest zeroes that cluster and a flush
    frees it: the cluster must not be reused (and overwritten) before the
    read ends, and is reused after."""
    path = str(tmp_path / "disk.qcow2")
    cs = 65536
    Qcow2Image.create(path, 4 * MiB, cluster_size=cs).close()
    image = Qcow2Image(path)
    image.write(0, _tagged(1, cs))
    image.flush()
    host = image._map(0, cs)[1]
    gate = _Gate(lambda off: off == host)
    monkeypatch.setattr(qcow2, "os", type("GatedOS", (_SlowOS,), {
        "pread": staticmethod(gate.wrap(os.pread))})())
    got = []
    reader = threading.Thread(target=lambda: got.append(image.read(0, cs)))
    reader.start()
    assert gate.reached.wait(10)
    image.zero(0, cs)
    image.flush()                       # its count may drop to 0 now...
    image.write(5 * cs, _tagged(2, cs))     # ...but this must not land in it
    assert image._map(5 * cs, cs)[1] != host
    gate.opened.set()
    reader.join()
    assert got == [_tagged(1, cs)]
    image.flush()                       # the read has ended: now it is free
    image.write(6 * cs, _tagged(3, cs))
    assert image._map(6 * cs, cs)[1] == host
    image.close()
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("backing", [False, True])
def test_two_writes_to_one_unallocated_cluster(tmp_path, monkeypatch, backing):
    """The first half of a new cluster is being written (allocated, not yet
    linked) when a write to its second half comes: that one waits, then
    writes in place; one allocation, nothing lost (with a backing file, the
    first write's copy-on-write fill would otherwise overwrite the second)."""
    path = str(tmp_path / "disk.qcow2")
    cs, half = 65536, 32768
    kw = {}
    base = bytes(4 * MiB)
    if backing:
        base = random.Random(1).randbytes(4 * MiB)
        (tmp_path / "base.raw").write_bytes(base)
        kw = {"backing_file": "base.raw", "backing_format": "raw"}
    Qcow2Image.create(path, 4 * MiB, cluster_size=cs, **kw).close()
    image = Qcow2Image(path)
    gate = _Gate(lambda off: threading.current_thread().name == "first")
    monkeypatch.setattr(qcow2, "pwrite_full", gate.wrap(qcow2.pwrite_full))
    first = threading.Thread(target=image.write, args=(3 * cs, b"A" * half), name="first")
    first.start()
    assert gate.reached.wait(10)
    second = threading.Thread(target=image.write, args=(3 * cs + half, b"B" * half))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the second write did not wait for the first's allocation"
    gate.opened.set()
    first.join()
    second.join()
    assert image.read(3 * cs, cs) == b"A" * half + b"B" * half
    assert image.read(2 * cs, cs) == base[2 * cs:3 * cs]
    image.close()
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr       # no cluster allocated twice (leaked)
