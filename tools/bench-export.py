"""Benchmark `vbdctl export` against `qemu-img convert`, with verified outputs.

For each format (raw, qcow2) and each amount of data (default 50 MiB and
1 GiB), a store holds one instance with one disk of SIZE (default 20 GiB)
holding DATA of random data in 64 KiB pieces at random 4 KiB-aligned
offsets. Each round times, in turn, two copies of the disk into files of its
own format on the same filesystem:

  vbdctl  `vbdctl export INSTANCE DIR`: a process (start-up included) that
          finds the extents, copies and checksums the data and makes the
          export durable (fsyncs of the dump, config.ini and directories)
  qemu    `qemu-img convert -f FMT -O FMT IMAGE DUMP` (sparse: it skips
          zeros, -S 4k; qcow2 with qemu's defaults, which are what vbdfs
          creates: 64 KiB clusters, compat 1.1, 16-bit refcounts), then
          fsync(DUMP). qemu-img writes its output with cache=unsafe and does
          not flush it, so without the fsync it would not be a durable copy;
          its time without the fsync is printed too.

Rounds alternate the two so that noise spreads over both; round 0 warms up
and is not counted. Printed: the median seconds of each, and the speed ratio
vbdctl/qemu-img (in MiB/s, i.e. qemu-img's seconds / vbdctl's; 1.0 or more:
vbdctl at least as fast). After the last round both outputs are verified:
`qemu-img compare` against the source, the export's checksum against the
source's, `qemu-img check` for qcow2, and each output's allocation against
its source's (the copy must be as sparse). The page cache is warm (the source
was just read) unless --cold, which drops it before each copy (root).

vbdfs is byte-compiled first, as an installed package is, so that start-up
is what a user sees, not the compiling of every module on each run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vbdfs.images import open_image  # noqa: E402
from vbdfs.operations.transfer import SparseHash, checksum_text, copy_image  # noqa: E402
from vbdfs.store import DiskSpec, Store  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
VBDCTL = os.path.join(os.path.dirname(sys.executable), "vbdctl")


class BenchError(Exception):
    pass


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def make_disk(store: Store, name: str, fmt: str, size: int, data: int, seed: int) -> str:
    m = store.create(name, [DiskSpec(size=size, format=fmt)])
    rnd = random.Random(seed)
    piece = 64 << 10
    with open_image(m.disks[0].path, fmt, store_root=store.root) as img:
        for _ in range(data // piece):
            img.write(rnd.randrange(0, (size - piece) // 4096) * 4096, rnd.randbytes(piece))
        img.flush()
    return m.disks[0].path


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start(cold: bool) -> float:
    if cold:
        drop_caches()
    # Start each copy with the journal committed: otherwise the first one's
    # fsync also pays for the previous round's deletions.
    os.sync()
    return time.perf_counter()


def checksum(path: str, fmt: str) -> str:
    with open_image(path, fmt, read_only=True) as img:
        h = SparseHash(img.size)
        copy_image(img, lambda off, buf: None, h)
    return checksum_text(h.digest())


def verify(src: str, fmt: str, dump: str, expect_sum: str, who: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt, src, dump],
                       capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"{who}: {dump} differs from {src}: {r.stdout}{r.stderr}")
    if fmt == "qcow2":
        r = subprocess.run(["qemu-img", "check", "-q", "-f", fmt, dump],
                           capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"{who}: qemu-img check {dump}: {r.stdout}{r.stderr}")
    got = checksum(dump, fmt)
    if got != expect_sum:
        raise BenchError(f"{who}: {dump} checksum {got}, source {expect_sum}")


def bench(work: str, fmt: str, size: int, data: int, rounds: int, cold: bool) -> dict:
    store = Store(os.path.join(work, "store"))
    os.makedirs(store.root, exist_ok=True)
    name = f"bench-{fmt}-{data // MiB}m"
    src = make_disk(store, name, fmt, size, data, seed=1)
    out = os.path.join(work, "out")
    qdump = os.path.join(out, f"qemu.{fmt}")
    times = {"vbdctl": [], "qemu": [], "qemu-nofsync": []}
    inner = []
    try:
        for r in range(rounds + 1):
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            t = start(cold)
            res = subprocess.run([VBDCTL, "--store", store.root, "export", name, out,
                                  "--output", "json"], check=True, capture_output=True, text=True)
            vbdctl = time.perf_counter() - t
            t = start(cold)
            subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", fmt, src, qdump], check=True)
            bare = time.perf_counter() - t
            fsync(qdump)
            qemu = time.perf_counter() - t
            if r:
                times["vbdctl"].append(vbdctl)
                times["qemu"].append(qemu)
                times["qemu-nofsync"].append(bare)
                inner.append(json.loads(res.stdout)["seconds"])
        summary = json.loads(res.stdout)["disks"][0]
        dump = os.path.join(out, name, summary["dump"])
        source_sum = checksum(src, fmt)
        if summary["checksum"] != source_sum:
            raise BenchError(f"vbdctl: export says {summary['checksum']}, source is {source_sum}")
        verify(src, fmt, dump, source_sum, "vbdctl")
        verify(src, fmt, qdump, source_sum, "qemu-img")
        alloc = {"source": allocated(src), "vbdctl": allocated(dump), "qemu": allocated(qdump)}
        # As sparse as the source: at most its allocation plus a little metadata slack.
        if alloc["vbdctl"] > alloc["source"] + 2 * MiB:
            raise BenchError(f"vbdctl: {dump} allocates {alloc['vbdctl']} bytes, the source "
                             f"{alloc['source']}: not sparse")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        store.remove(name)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"format": fmt, "data_mib": data // MiB, "size_gib": size / GiB,
           "cache": "cold" if cold else "warm", "rounds": rounds, "median_s": med,
           "export_inner_s": statistics.median(inner),
           "ratio": med["qemu"] / med["vbdctl"],
           "ratio_nofsync": med["qemu-nofsync"] / med["vbdctl"],
           "spread_s": {k: (min(v), max(v)) for k, v in times.items()},
           "allocated_mib": {k: v / MiB for k, v in alloc.items()}}
    print(f"{fmt:5} {data // MiB:5} MiB in {size / GiB:g} GiB, {row['cache']}: "
          f"vbdctl {med['vbdctl']:.3f}s (export alone {row['export_inner_s']:.3f}s), "
          f"qemu-img+fsync {med['qemu']:.3f}s, qemu-img {med['qemu-nofsync']:.3f}s; "
          f"vbdctl/qemu-img {row['ratio']:.2f}x (vs qemu-img without fsync "
          f"{row['ratio_nofsync']:.2f}x); allocated MiB: source "
          f"{alloc['source'] / MiB:.1f}, vbdctl {alloc['vbdctl'] / MiB:.1f}, qemu-img "
          f"{alloc['qemu'] / MiB:.1f}; verified", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20, help="disk size in GiB (default 20)")
    p.add_argument("--data", default="50,1024", help="data in MiB, comma-separated "
                   "(default 50,1024)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--formats", default="raw,qcow2")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each copy")
    p.add_argument("--dir", help="work directory (default: a temp dir in /var/tmp)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args()
    compileall.compile_dir(os.path.join(os.path.dirname(HERE), "vbdfs"), quiet=1)
    work = a.dir or tempfile.mkdtemp(prefix="vbdfs-bench-export-", dir="/var/tmp")
    rows = []
    try:
        for data in (int(x) for x in a.data.split(",")):
            for fmt in a.formats.split(","):
                rows.append(bench(work, fmt, a.size * GiB, data * MiB, a.rounds, a.cold))
    except BenchError as e:
        sys.exit(f"bench-export: FAILED: {e}")
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nspeed ratio vbdctl/qemu-img (MiB/s; qemu-img seconds / vbdctl seconds), median "
          f"of {a.rounds} rounds, {'cold' if a.cold else 'warm'} page cache, both durable:")
    for r in rows:
        print(f"  {r['format']:5} {r['data_mib']:5} MiB  {r['ratio']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
