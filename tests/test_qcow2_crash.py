"""Crash safety: kill a writer at random moments; qemu-img check must never find corruption
and every write acknowledged by flush() must read back.

The writer is a child process. Before each operation it announces it on a pipe
("I seq slot start length kind"); after each flush() it acknowledges every
operation so far ("A seq"). Slots are unaligned, cross cluster boundaries, and
are written, partly overwritten and zeroed again and again, so the kill lands
in copy-on-write, allocation, refcount-table growth and the free path.

A second variant crashes the child at its Nth pwrite (os._exit), which puts
the crash inside flush() between two metadata writes on purpose.

With THREADS > 1 the child runs its operations in that many threads at once
(on distinct slots, which share clusters at their edges), as the daemon's
worker threads do; a flush waits for all of them before it acknowledges.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from vbdfs.images.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
SLOT = 100_003                # unaligned on purpose
NSLOTS = 160

CHILD = r"""
import os, random, sys
from vbdfs.images.qcow2 import Qcow2Image

path, seed, slot, nslots, start_seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
crash_at = int(os.environ.get("CRASH_AT_PWRITE", "0"))
if crash_at:
    real_pwrite, count = os.pwrite, [0]
    def pwrite(fd, data, off):
        count[0] += 1
        if count[0] >= crash_at:
            os._exit(99)                     # die before this write reaches the file
        return real_pwrite(fd, data, off)
    os.pwrite = pwrite
out = sys.stdout
img = Qcow2Image(path)
if os.environ.get("SMALL_CACHES"):          # evictions (dirty L2 and refcount blocks) all the time
    img._cache_max, img.rc.cache_max = 4, 2
rng = random.Random(seed)
seq = start_seq
threads = int(os.environ.get("THREADS", "1"))
if threads > 1:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    pool = ThreadPoolExecutor(threads)
busy = {}       # slot -> its operation running in the pool

def op(seq, off, length, kind):
    if kind == "w":
        img.write(off, payload(seed, seq, length))
    elif kind == "z":
        img.zero(off, length)
    else:
        img.write(off, bytes(length))

def settle(block):
    done = wait(busy.values(), return_when=FIRST_COMPLETED)[0] if block else \
        [f for f in busy.values() if f.done()]
    for s in [s for s, f in busy.items() if f in done]:
        busy.pop(s).result()        # an error ends the child (the test fails)

while True:
    seq += 1
    if threads > 1:
        settle(False)
        while len(busy) >= threads:
            settle(True)
        s = rng.choice([x for x in range(nslots) if x not in busy])
    else:
        s = rng.randrange(nslots)
    start = rng.randrange(slot)
    length = rng.randrange(1, slot - start + 1)
    kind = rng.choice("wwwwzZ")
    out.write(f"I {seq} {s} {start} {length} {kind}\n"); out.flush()
    off = s * slot + start
    if threads > 1:
        busy[s] = pool.submit(op, seq, off, length, kind)
    else:
        op(seq, off, length, kind)
    if rng.random() < 0.25:
        while busy:
            settle(True)
        img.flush()
        out.write(f"A {seq}\n"); out.flush()
"""

PAYLOAD = """
import random
def payload(seed, seq, n):
    return random.Random(f"{seed}/{seq}").randbytes(n)
"""
exec(PAYLOAD)   # the parent regenerates the child's data from (seed, seq)


def run_child(path, seed, start_seq, kill_after=None, crash_at=None, timeout=30.0,
              small_caches=False, nslots=NSLOTS, threads=1):
    """Run the writer until killed; return (intents, last acknowledged seq)."""
    env = dict(os.environ, THREADS=str(threads))
    if small_caches:
        env["SMALL_CACHES"] = "1"
    if crash_at:
        env["CRASH_AT_PWRITE"] = str(crash_at)
    proc = subprocess.Popen(
        [sys.executable, "-c", PAYLOAD + CHILD, str(path), seed, str(SLOT), str(nslots),
         str(start_seq)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    buf = b""
    deadline = time.monotonic() + (kill_after if kill_after is not None else timeout)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.01)
            if ready:
                buf += os.read(proc.stdout.fileno(), 1 << 16)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        buf += proc.stdout.read()
        err = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
    if crash_at:
        assert proc.returncode == 99, f"child did not reach its crash point: {err}"
    else:
        assert proc.returncode == -signal.SIGKILL, f"child died on its own: {err}"
    intents, acked = [], start_seq
    for line in buf.decode().splitlines():
        f = line.split()
        if f[0] == "I":
            intents.append((int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5]))
        elif f[0] == "A":
            acked = int(f[1])
    return intents, acked


def verify_and_advance(path, seed, model, intents, acked, nslots=NSLOTS):
    """Apply acknowledged ops to the model; check them; adopt what is on disk for the rest."""
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode in (0, 3), f"qemu-img check found corruption:\n{r.stdout}{r.stderr}"
    unsure = set()
    for seq, s, start, length, kind in intents:
        if seq > acked:
            unsure.add(s)            # may be torn: no promise was made
            continue
        off = s * SLOT + start
        model[off:off + length] = payload(seed, seq, length) if kind == "w" else bytes(length)
    with Qcow2Image(str(path), read_only=True) as img:
        for s in range(nslots):
            got = img.read(s * SLOT, SLOT)
            want = model[s * SLOT:(s + 1) * SLOT]
            if s in unsure:
                model[s * SLOT:(s + 1) * SLOT] = got
            else:
                assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
                    f"acknowledged data lost in slot {s}"
    return r.returncode


@pytest.mark.parametrize("compat,cs,threads", [
    ("1.1", 65536, 1), ("1.1", 4096, 1), ("0.10", 512, 1), ("1.1", 4096, 8), ("1.1", 65536, 8)])
def test_sigkill_at_random_moments(tmp_path, compat, cs, threads):
    path = tmp_path / "crash.qcow2"
    Qcow2Image.create(str(path), 64 * MiB, cluster_size=cs, compat=compat).close()
    model = bytearray(64 * MiB)
    rng = random.Random(cs)
    seq = 0
    acked_total = 0
    for it in range(6):
        seed = f"{cs}-{it}"
        intents, acked = run_child(path, seed, seq, kill_after=rng.uniform(0.3, 1.5),
                                   threads=threads)
        assert intents, "the child wrote nothing before the kill"
        acked_total += sum(1 for i in intents if i[0] <= acked)
        verify_and_advance(path, seed, model, intents, acked)
        seq = intents[-1][0]
    assert acked_total > 20       # the test really checked acknowledged writes


@pytest.mark.parametrize("cs,small_caches,threads", [
    (4096, False, 1), (512, False, 1), (512, True, 1), (4096, False, 8), (512, True, 8)])
def test_crash_at_nth_pwrite(tmp_path, cs, small_caches, threads):
    """Crash points chosen by pwrite count: they fall inside flush() often."""
    path = tmp_path / "crash.qcow2"
    Qcow2Image.create(str(path), 64 * MiB, cluster_size=cs).close()
    model = bytearray(64 * MiB)
    rng = random.Random(cs + 1)
    seq = 0
    for it in range(8):
        seed = f"n{cs}-{it}"
        intents, acked = run_child(path, seed, seq, crash_at=rng.randrange(5, 400),
                                   small_caches=small_caches, threads=threads)
        verify_and_advance(path, seed, model, intents, acked)
        if intents:
            seq = intents[-1][0]
    # after all that, a writable open and flush leave an image qemu calls clean or leaky only
    with Qcow2Image(str(path)) as img:
        img.write(0, b"after the storm")
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode in (0, 3), r.stdout


def test_crash_at_nth_pwrite_while_reusing(tmp_path):
    """Six slots only: the same clusters are freed and reused again and again, so
    crashes land between a free reaching the file and the cluster's reuse (a reused
    cluster still pointed at from disk would show as corruption or lost data)."""
    cs, nslots = 4096, 6
    path = tmp_path / "crash.qcow2"
    Qcow2Image.create(str(path), 64 * MiB, cluster_size=cs).close()
    model = bytearray(64 * MiB)
    rng = random.Random("reuse")
    seq = 0
    for it in range(10):
        seed = f"r{it}"
        intents, acked = run_child(path, seed, seq, crash_at=rng.randrange(5, 600),
                                   nslots=nslots)
        verify_and_advance(path, seed, model, intents, acked, nslots=nslots)
        if intents:
            seq = intents[-1][0]
    # Without reuse, every copy-on-write took a new cluster at the end of the file.
    assert os.path.getsize(path) < 2 * MiB, os.path.getsize(path)
