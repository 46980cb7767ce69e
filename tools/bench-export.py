"""Benchmark `vbdctl export` against `cp --sparse=always` and `qemu-img convert`.

A store holds one instance with one disk of SIZE (default 20 GiB) and DATA
(default 50 MiB) of random data in 64 KiB pieces at random 4 KiB-aligned
offsets, raw and then qcow2. Each round times, in turn:

  vbdfs  `vbdctl export` as a process (start-up, extents scan, checksum,
         dump, config.ini, fsyncs, rename) - a durable, verified export
  cp     `cp --sparse=always IMAGE DUMP`, then fsync(DUMP)
  qemu   `qemu-img convert -O FMT IMAGE DUMP`, then fsync(DUMP)
         (neither fsyncs by itself; the fsync makes all three durable copies)

Rounds alternate the tools so that noise spreads over all of them; the
median of each is printed with the ratio other/vbdfs (above 1.0: vbdfs is
faster), the export's own time without process start-up, and each dump's
allocation against its source's. The page cache is warm unless --cold.
"""

from __future__ import annotations

import argparse
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
from vbdfs.store import DiskSpec, Store  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
VBDCTL = os.path.join(os.path.dirname(sys.executable), "vbdctl")


def allocated(path: str) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) \
        else os.stat(path).st_blocks * 512


def make_disk(store: Store, fmt: str, size: int, data: int, seed: int) -> str:
    m = store.create(f"bench-{fmt}", [DiskSpec(size=size, format=fmt)])
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


def timed(args: list[str], out: str | None, cold: bool) -> float:
    if cold:
        drop_caches()
    # Start each copy with the journal committed: otherwise the first one's
    # fsync also pays for the previous round's deletions.
    os.sync()
    t = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    if out is not None:                  # make the copy durable, as the export is
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t


def bench(work: str, fmt: str, size: int, data: int, rounds: int, cold: bool) -> None:
    store = Store(os.path.join(work, "store"))
    os.makedirs(store.root, exist_ok=True)
    src = make_disk(store, fmt, size, data, seed=1)
    name = f"bench-{fmt}"
    out = os.path.join(work, "out")
    times = {"vbdfs": [], "cp": [], "qemu": []}
    inner = []
    for r in range(rounds + 1):          # round 0 warms up and is not counted
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        t = {}
        t["vbdfs"] = timed([VBDCTL, "--store", store.root, "export", name, out,
                            "--output", "json"], None, cold)
        t["cp"] = timed(["cp", "--sparse=always", src, os.path.join(out, "cp")],
                        os.path.join(out, "cp"), cold)
        t["qemu"] = timed(["qemu-img", "convert", "-f", fmt, "-O", fmt, src,
                           os.path.join(out, "qemu")], os.path.join(out, "qemu"), cold)
        # The export's own time, without interpreter start-up, from a second run.
        shutil.rmtree(os.path.join(out, name))
        res = subprocess.run([VBDCTL, "--store", store.root, "export", name, out,
                              "--output", "json"], check=True, capture_output=True, text=True)
        if r:
            for k, v in t.items():
                times[k].append(v)
            inner.append(json.loads(res.stdout)["seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    dump = os.path.join(out, name, f"sda.{fmt}")
    print(f"{fmt}: {size // GiB} GiB disk, {data // MiB} MiB data, {rounds} rounds, "
          f"{'cold' if cold else 'warm'} cache (median seconds)")
    for k in ("vbdfs", "cp", "qemu"):
        ratio = "" if k == "vbdfs" else f"   {k}/vbdfs = {med[k] / med['vbdfs']:.2f}x"
        print(f"  {k:6} {med[k]:7.3f}s{ratio}")
    faster = min(med["cp"], med["qemu"])
    print(f"  vbdfs vs the faster of cp and qemu-img: {faster / med['vbdfs']:.2f}x "
          f"(export alone, without process start-up: {statistics.median(inner):.3f}s, "
          f"{faster / statistics.median(inner):.2f}x)")
    print(f"  allocation: source {allocated(src) / MiB:.1f} MiB, vbdfs dump "
          f"{allocated(dump) / MiB:.1f} MiB, cp {allocated(os.path.join(out, 'cp')) / MiB:.1f} "
          f"MiB, qemu-img {allocated(os.path.join(out, 'qemu')) / MiB:.1f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    store.remove(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20, help="disk size in GiB (default 20)")
    p.add_argument("--data", type=int, default=50, help="data in MiB (default 50)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--formats", default="raw,qcow2")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each copy")
    p.add_argument("--dir", help="work directory (default: a temp dir in /var/tmp)")
    a = p.parse_args()
    work = a.dir or tempfile.mkdtemp(prefix="vbdfs-bench-export-", dir="/var/tmp")
    try:
        for fmt in a.formats.split(","):
            bench(work, fmt, a.size * GiB, a.data * MiB, a.rounds, a.cold)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
