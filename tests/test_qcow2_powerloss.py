"""Power-loss safety of the qcow2 engine, enumerated: not a killed process (which
keeps its page cache) but the states a power cut can leave on disk.

A workload runs against a real image file while every change the engine makes
to it is recorded at the lowest level it uses: os.pwrite, os.ftruncate, hole
punching (fileops.fallocate) and os.fsync. The fsyncs cut the record into
windows. A power cut inside a window leaves everything up to the window's
fsync plus any subset of the window's changes, each write possibly torn at
512-byte sectors (what a disk writes atomically); so for every window the
test builds: each prefix of it, each prefix followed by a torn next write,
and random subsets with random tears. Every distinct state must

* open (writable, or read-only with a reason),
* pass `qemu-img check` without corruption (leaks are allowed: exit 0 or 3),
* read, byte for byte, what the guest had written at its last completed
  flush(), except where it wrote since: there each byte holds a value it
  had at the flush or after one of the writes since (and the virtual size is
  one the disk had), and
* for the snapshot workload, still hold the snapshot's contents.

Workloads: random unaligned writes (also with tiny caches, so dirty L2 tables
and refcount blocks are evicted mid-workload), zero writes (v3 zero flags, v2
unmaps), v2 zeroing over a backing file (in-place punches), clusters freed and
then allocated again, grows (the L1 table moves), copy-on-write of clusters
and L2 tables shared with an internal snapshot (made by qemu-img snapshot -c),
refcount growth (512-byte clusters: a new refcount block every 128 KiB,
and the refcount table moves), extended L2 entries over a backing file, and
the repair of a dirty image (lazy refcounts after a killed qemu-io) at open,
whose dirty states are judged after their own repair. The number of states checked is printed (pytest -s) and asserted.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import subprocess

import pytest

from vbdfs.images import fileops, qcow2
from vbdfs.images.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
RANDOM_SUBSETS = 4        # per window, besides the prefixes and torn prefixes


# --- recording ---------------------------------------------------------------------------
class Recorder:
    """The engine's changes to one file descriptor, in order:
    ("w", offset, bytes) | ("t", size) | ("p", offset, length) | ("f",)."""

    def __init__(self, monkeypatch):
        self.fd = None
        self.ops: list[tuple] = []
        real_pwrite, real_fsync = os.pwrite, os.fsync
        real_ftruncate, real_fallocate = os.ftruncate, fileops.fallocate

        def pwrite(fd, data, offset):
            n = real_pwrite(fd, data, offset)
            if fd == self.fd:       # what reached the page cache, no more
                self.ops.append(("w", offset, bytes(memoryview(data)[:n])))
            return n

        def fsync(fd):
            real_fsync(fd)
            if fd == self.fd:
                self.ops.append(("f",))

        def ftruncate(fd, size):
            real_ftruncate(fd, size)
            if fd == self.fd:
                self.ops.append(("t", size))

        def fallocate(fd, mode, offset, length):
            real_fallocate(fd, mode, offset, length)
            if fd == self.fd:
                assert mode & fileops.FALLOC_FL_PUNCH_HOLE, "unexpected fallocate mode"
                self.ops.append(("p", offset, length))

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(fileops, "fallocate", fallocate)

    def last_fsync(self) -> int:
        return max((i for i, op in enumerate(self.ops) if op[0] == "f"), default=-1)


class Trace:
    """A workload's record: the file before, the engine's changes, and the guest's
    view: each guest op (file-op index at its start, offset, data, new size) and
    each completed flush (index of its last fsync, number of guest ops before it)."""

    def __init__(self, base: bytes, size: int):
        self.base = base
        self.size0 = size
        self.ops: list[tuple] = []
        self.guest: list[tuple[int, int, bytes, int]] = []
        self.acks: list[tuple[int, int]] = [(-1, 0)]
        self.initial: bytes | None = None      # the guest's contents before, if not zeros


def run_workload(path, steps, monkeypatch, small_caches=False) -> Trace:
    """Apply steps ("w", off, data) | ("z", off, n) | ("r", size) | ("f",) through Qcow2Image."""
    base = path.read_bytes()
    rec = Recorder(monkeypatch)
    real_open = qcow2.open_regular

    def opening(*args):     # recorded from the open on: a dirty image is repaired there
        fd = real_open(*args)
        if rec.fd is None:
            rec.fd = fd
        return fd
    monkeypatch.setattr(qcow2, "open_regular", opening)
    img = Qcow2Image(str(path))
    if small_caches:    # dirty L2 tables and refcount blocks evicted (written) all the time
        img._cache_max, img.rc.cache_max = 4, 2
    rec.fd = img.fd
    trace = Trace(base, img.size)
    size = img.size
    try:
        for step in steps:
            start = len(rec.ops)
            if step[0] == "w":
                img.write(step[1], step[2])
                trace.guest.append((start, step[1], step[2], size))
            elif step[0] == "z":
                img.zero(step[1], step[2])
                trace.guest.append((start, step[1], bytes(step[2]), size))
            elif step[0] == "r":
                img.resize(step[1])
                size = step[1]
                trace.guest.append((start, 0, b"", size))
                trace.acks.append((rec.last_fsync(), len(trace.guest)))   # resize syncs
            else:
                img.flush()
                trace.acks.append((rec.last_fsync(), len(trace.guest)))
        img.close()
        trace.acks.append((rec.last_fsync(), len(trace.guest)))
    finally:
        rec.fd = None
        monkeypatch.undo()
    trace.ops = rec.ops
    return trace


# --- building the states a power cut can leave ------------------------------------------------
def apply(buf: bytearray, op, sectors=None) -> None:
    """Apply one recorded change; for a write, only the given pieces (indices of its
    512-byte-aligned pieces in the file) if sectors is not None."""
    kind = op[0]
    if kind == "w":
        off, data = op[1], op[2]
        for lo, hi in pieces(off, len(data)) if sectors is not None else [(off, off + len(data))]:
            if sectors is not None and (lo // SECTOR) not in sectors:
                continue
            if len(buf) < hi:
                buf.extend(bytes(hi - len(buf)))
            buf[lo:hi] = data[lo - off:hi - off]
    elif kind == "t":
        if op[1] < len(buf):
            del buf[op[1]:]
        else:
            buf.extend(bytes(op[1] - len(buf)))
    elif kind == "p":
        lo, hi = op[1], min(op[1] + op[2], len(buf))
        if hi > lo:
            buf[lo:hi] = bytes(hi - lo)


def pieces(off: int, n: int):
    """[lo, hi) pieces of a write, split at 512-byte file sector boundaries."""
    out, pos, end = [], off, off + n
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append((pos, nxt))
        pos = nxt
    return out


def window_states(pending, rng):
    """Choices for one window: lists of (op, sectors or None) to apply after the durable part."""
    def torn(op):
        secs = [lo // SECTOR for lo, _ in pieces(op[1], len(op[2]))]
        if len(secs) < 2:
            return None
        keep = set(s for s in secs if rng.random() < 0.5)
        if not keep or len(keep) == len(secs):
            keep = {secs[rng.randrange(len(secs))]}
        return keep

    out = []
    for k in range(len(pending) + 1):                       # power cut after k changes
        out.append([(op, None) for op in pending[:k]])
        if k < len(pending) and pending[k][0] == "w":         # ... and the next one torn
            t = torn(pending[k])
            if t is not None:
                out.append(out[-1] + [(pending[k], t)])
    for _ in range(RANDOM_SUBSETS if len(pending) > 1 else 0):  # any subset, torn or not
        choice = []
        for op in pending:
            if rng.random() < 0.5:
                continue
            t = torn(op) if op[0] == "w" and rng.random() < 0.3 else None
            choice.append((op, t))
        out.append(choice)
    return out


# --- checking one state -----------------------------------------------------------------------
class Checker:
    def __init__(self, tmp_path, snapshot: tuple[str, bytes] | None = None,
                 repair_dirty: bool = False):
        self.path = tmp_path / "state.qcow2"
        self.snapshot = snapshot
        self.repair_dirty = repair_dirty    # a dirty state is judged after its repair
        self.seen: set[bytes] = set()
        self.checked = 0

    def check(self, state: bytes, acked: bytearray, acked_size: int, since, what: str):
        digest = hashlib.sha256(state).digest()
        if digest in self.seen:
            return
        self.seen.add(digest)
        self.checked += 1
        with open(self.path, "wb") as f:
            f.write(state)
        if self.repair_dirty and state[79] & 1:     # the dirty bit: repaired on open
            with Qcow2Image(str(self.path)) as img:
                assert img.repaired or img.read_only_reason, f"{what}: dirty, not repaired"
        # qemu-img check runs while this process reads the state itself.
        qemu = subprocess.Popen(["qemu-img", "check", "-f", "qcow2", "-U", str(self.path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            with Qcow2Image(str(self.path), read_only=True) as img:
                sizes = {acked_size} | {g[3] for g in since}
                assert img.size in sizes, f"{what}: size {img.size}, expected one of {sizes}"
                got = img.read(0, img.size)
            self._compare(got, acked, since, what)
        finally:
            out = qemu.communicate()[0]
        assert qemu.returncode in (0, 3), f"{what}: qemu-img check:\n{out}"
        with Qcow2Image(str(self.path)) as img:     # and opens for writing, or says why not
            assert not img.read_only or img.read_only_reason, f"{what}: read-only, no reason"
        if self.snapshot is not None:
            name, content = self.snapshot
            out = self.path.with_suffix(".snap")
            subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-l",
                            f"snapshot.name={name}", str(self.path), str(out)], check=True)
            assert out.read_bytes() == content, f"{what}: the snapshot's contents changed"
            out.unlink()

    @staticmethod
    def _compare(got: bytes, acked: bytearray, since, what: str) -> None:
        """got must be acked outside what was written since; inside, each byte a value
        it had at the ack or after one of the writes since."""
        n = len(got)
        if len(acked) < n:          # grown since: the new area read zeros at the ack
            acked = acked + bytes(n - len(acked))
        touched = sorted((off, off + len(data)) for _, off, data, _ in since if data)
        pos = 0
        spans = []
        for lo, hi in touched:
            lo, hi = lo // SECTOR * SECTOR, -(-hi // SECTOR) * SECTOR
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        for lo, hi in spans + [[n, n]]:
            lo, hi = min(lo, n), min(hi, n)
            assert got[pos:lo] == acked[pos:lo], \
                f"{what}: acknowledged data lost in [{pos:#x}, {lo:#x})"
            for b in range(lo, hi, SECTOR):
                e = min(b + SECTOR, hi)
                versions = [bytes(acked[b:e])]
                cur = bytearray(acked[b:e])
                for _, off, data, _ in since:
                    if data and off < e and off + len(data) > b:
                        s, t = max(off, b), min(off + len(data), e)
                        cur[s - b:t - b] = data[s - off:t - off]
                        versions.append(bytes(cur))
                block = got[b:e]
                if block in versions:
                    continue
                for i in range(e - b):
                    assert any(v[i] == block[i] for v in versions), \
                        f"{what}: byte {b + i:#x} holds {block[i]:#x}, a value it never had"
            pos = hi
        assert pos >= n


def enumerate_states(trace: Trace, checker: Checker, seed, only=None) -> None:
    """Check the states of every window (those for which only(i, pending) is true)."""
    rng = random.Random(seed)
    ops = trace.ops
    fsyncs = [i for i, op in enumerate(ops) if op[0] == "f"] + [len(ops)]
    durable = bytearray(trace.base)
    acked_guest = 0          # guest ops covered by the last completed flush
    acked_model = bytearray(trace.initial or bytes(trace.size0))
    acked_size = trace.size0
    prev = -1
    for w, f in enumerate(fsyncs):
        pending = [op for op in ops[prev + 1:f] if op[0] != "f"]
        # the last flush completed at or before the durable point
        upto = max(n for last, n in trace.acks if last <= prev)
        while acked_guest < upto:
            _, off, data, size = trace.guest[acked_guest]
            if len(acked_model) < size:
                acked_model.extend(bytes(size - len(acked_model)))
            acked_model[off:off + len(data)] = data
            acked_size = size
            acked_guest += 1
        since = [g for g in trace.guest[acked_guest:] if g[0] < f]
        for choice in window_states(pending, rng) if only is None or only(w, pending) else ():
            state = bytearray(durable)
            for op, secs in choice:
                apply(state, op, secs)
            checker.check(bytes(state), acked_model, acked_size, since,
                          f"power cut after fsync #{prev} with {len(choice)} of "
                          f"{len(pending)} later changes")
        for op in pending:
            apply(durable, op)
        prev = f


# --- workloads ---------------------------------------------------------------------------------
def random_writes(rng, size, count, max_len, zero_share=0.25, flush_share=0.3):
    steps = []
    for _ in range(count):
        n = rng.choice([1, 511, 512, 4096, 4097, rng.randrange(1, max_len)])
        off = rng.randrange(0, size - n)
        r = rng.random()
        if r < zero_share / 2:
            steps.append(("z", off, n))
        elif r < zero_share:
            steps.append(("w", off, bytes(n)))
        else:
            steps.append(("w", off, rng.randbytes(n)))
        if rng.random() < flush_share:
            steps.append(("f",))
    return steps


def zero_heavy(rng, size, count):
    steps = []
    for _ in range(count):
        off = rng.randrange(0, size - 64 * KiB) // 4096 * 4096
        n = rng.choice([4096, 8192, 20000, 64 * KiB])
        steps.append(("w", off, rng.randbytes(n)))
        steps.append(rng.choice([("z", off, n), ("w", off + 100, bytes(n - 200)),
                                 ("z", off + 4096, 4096)]))
        if rng.random() < 0.5:
            steps.append(("f",))
    return steps


def free_then_allocate(rng, size, rounds):
    """Clusters freed (zeroed, then flushed), then new data elsewhere: an engine that
    reuses freed clusters puts it there."""
    steps = []
    for _ in range(rounds):
        a = rng.randrange(0, size // 2 - 64 * KiB) // 4096 * 4096
        b = rng.randrange(size // 2, size - 64 * KiB) + rng.randrange(4096)
        steps += [("w", a, rng.randbytes(64 * KiB)), ("f",), ("z", a, 64 * KiB), ("f",),
                  ("w", b, rng.randbytes(40000)), ("w", a + 8192, rng.randbytes(5000))]
        if rng.random() < 0.5:
            steps.append(("f",))
    return steps


def grows(rng):
    steps = random_writes(rng, MiB, 12, 20000)
    steps += [("r", 3 * MiB), ("w", 3 * MiB - 5000, rng.randbytes(5000)), ("f",)]
    steps += random_writes(rng, 3 * MiB, 8, 20000)
    steps += [("r", 16 * MiB)]                       # the L1 table outgrows its cluster
    steps += [("w", 16 * MiB - 700, rng.randbytes(700)), ("w", 9 * MiB, rng.randbytes(9000))]
    steps += random_writes(rng, 16 * MiB, 8, 20000)
    return steps


def refcount_growth(rng):
    steps = []
    for i in range(48):          # 3 MiB: a new refcount block every 128 KiB of file
        steps.append(("w", i * 64 * KiB + rng.randrange(512), rng.randbytes(64 * KiB)))
        if i % 6 == 5:
            steps.append(("f",))
    return steps


def refcount_table_growth(rng):
    steps = []
    for i in range(19):          # 9.5 MiB: the 64-entry table covers 8 MiB of file
        steps.append(("w", i * 512 * KiB, rng.randbytes(512 * KiB)))
        if i % 2 == 1:
            steps.append(("f",))
    return steps


def around_header_rewrite(trace):
    """Windows near the first rewrite of the header (the refcount table's move)."""
    fsyncs = [i for i, op in enumerate(trace.ops) if op[0] == "f"]
    first = next(i for i, op in enumerate(trace.ops) if op[0] == "w" and op[1] == 0)
    k = sum(1 for f in fsyncs if f < first)
    return lambda w, pending: k - 2 <= w <= k + 1


WORKLOADS = {
    # name: (compat, cluster size, virtual size, steps(rng))
    "random-v3-4k": ("1.1", 4096, 2 * MiB, lambda r: random_writes(r, 2 * MiB, 50, 20000)),
    "random-v2-512": ("0.10", 512, 2 * MiB, lambda r: random_writes(r, 2 * MiB, 40, 6000)),
    "random-512-small-caches": ("1.1", 512, 2 * MiB,
                                lambda r: random_writes(r, 2 * MiB, 30, 6000, flush_share=0.1)),
    "zero-v3": ("1.1", 4096, 2 * MiB, lambda r: zero_heavy(r, 2 * MiB, 20)),
    "zero-v2": ("0.10", 4096, 2 * MiB, lambda r: zero_heavy(r, 2 * MiB, 20)),
    "free-then-allocate-v3": ("1.1", 4096, 4 * MiB,
                              lambda r: free_then_allocate(r, 4 * MiB, 8)),
    "grow-512": ("1.1", 512, MiB, grows),
    "refcount-growth-512": ("1.1", 512, 4 * MiB, refcount_growth),
    "refcount-table-growth-512": ("1.1", 512, 10 * MiB, refcount_table_growth),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_power_loss_states(tmp_path, monkeypatch, name):
    compat, cs, size, make = WORKLOADS[name]
    path = tmp_path / "img.qcow2"
    Qcow2Image.create(str(path), size, cluster_size=cs, compat=compat).close()
    trace = run_workload(path, make(random.Random(name)), monkeypatch,
                         small_caches=name.endswith("small-caches"))
    checker = Checker(tmp_path)
    only = around_header_rewrite(trace) if name.startswith("refcount-table") else None
    enumerate_states(trace, checker, name, only)
    report(name, trace, checker)
    assert checker.checked >= 50


def test_power_loss_states_snapshot_cow(tmp_path, monkeypatch):
    """Clusters and L2 tables shared with an internal snapshot are copied, never
    written in place, in every state a power cut can leave."""
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(path), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2M",
                    "-c", "write -P 0x6b 3M 64k", str(path)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "before", str(path)], check=True)
    content = bytearray(4 * MiB)
    content[:2 * MiB] = b"\x5a" * (2 * MiB)
    content[3 * MiB:3 * MiB + 64 * KiB] = b"\x6b" * (64 * KiB)
    rng = random.Random("snap")
    steps = random_writes(rng, 4 * MiB, 40, 12000)
    trace = run_workload(path, steps, monkeypatch)
    trace.initial = bytes(content)
    checker = Checker(tmp_path, snapshot=("before", bytes(content)))
    enumerate_states(trace, checker, "snap")
    report("snapshot-cow", trace, checker)
    assert checker.checked >= 100


def test_power_loss_states_dirty_repair(tmp_path, monkeypatch):
    """A lazy-refcounts image left dirty by a killed qemu-io: the repair at the
    writable open, then random writes. Every state a power cut leaves, dirty or
    not, is repaired (if dirty) and then passes qemu-img check and holds the
    data."""
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "lazy_refcounts=on,cluster_size=4096", str(path), "2M"], check=True)
    qemu = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        for i, cmd in enumerate([b"write -P 0x5a 0 256k\n", b"write -P 0x6b 1M 100k\n"]):
            qemu.stdin.write(cmd)       # one at a time: qemu-io reads its next command
            qemu.stdin.flush()          # only after answering this one
            while out.count(b"wrote") <= i:
                assert select.select([qemu.stdout], [], [], 10)[0], out
                out += os.read(qemu.stdout.fileno(), 4096)
    finally:
        qemu.kill()
        qemu.wait()
    assert path.read_bytes()[79] & 1, "qemu left no dirty bit"
    content = bytearray(2 * MiB)
    content[:256 * KiB] = b"\x5a" * (256 * KiB)
    content[MiB:MiB + 100 * KiB] = b"\x6b" * (100 * KiB)
    trace = run_workload(path, random_writes(random.Random("dirty"), 2 * MiB, 20, 12000),
                         monkeypatch)
    trace.initial = bytes(content)
    checker = Checker(tmp_path, repair_dirty=True)
    enumerate_states(trace, checker, "dirty")
    report("dirty-repair", trace, checker)
    assert checker.checked >= 50


def test_power_loss_states_extended_l2(tmp_path, monkeypatch):
    """Subclusters (extended_l2=on, 16 KiB clusters: 512-byte subclusters) over a
    backing file: allocation and zero bits, partial subclusters completed."""
    base = tmp_path / "base.raw"
    content = random.Random("extbase").randbytes(2 * MiB)
    base.write_bytes(content)
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "extended_l2=on,cluster_size=16k", "-b", "base.raw", "-F", "raw",
                    str(path), "2M"], check=True, cwd=tmp_path)
    trace = run_workload(path, random_writes(random.Random("ext"), 2 * MiB, 40, 20000),
                         monkeypatch)
    trace.initial = content
    checker = Checker(tmp_path)         # beside base.raw: it stays the states' backing
    enumerate_states(trace, checker, "ext")
    report("extended-l2-backing", trace, checker)
    assert checker.checked >= 50


def report(name, trace, checker):
    count = {k: sum(1 for op in trace.ops if op[0] == k) for k in "wtpf"}
    print(f"\npower loss {name}: {checker.checked} distinct states checked "
          f"({count['w']} writes, {count['t']} truncates, {count['p']} punches, "
          f"{count['f']} fsyncs; {len(trace.guest)} guest ops)")


def test_power_loss_states_v2_zeroing_over_a_backing_file(tmp_path, monkeypatch):
    """Version 2 has no zero flag: over a backing file, zeroing maps fresh clusters
    or punches the image's own ones in place."""
    base = tmp_path / "base.raw"
    content = random.Random("base").randbytes(2 * MiB)
    base.write_bytes(content)
    path = tmp_path / "img.qcow2"
    Qcow2Image.create(str(path), 2 * MiB, cluster_size=4096, compat="0.10",
                      backing_file="base.raw", backing_format="raw").close()
    trace = run_workload(path, zero_heavy(random.Random("v2b"), 2 * MiB, 20), monkeypatch)
    trace.initial = content
    checker = Checker(tmp_path)         # the states sit beside base.raw: it stays their backing
    enumerate_states(trace, checker, "v2b")
    report("zero-v2-backing", trace, checker)
    assert checker.checked >= 50
