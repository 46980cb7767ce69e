"""Benchmark vbdfs against the backing file and qemu-storage-daemon's FUSE export.

Run as root through tools/bench. For each image format it builds identical
images (same random contents, same layout) for every target, then runs each
fio workload on every target in turn, so that noise on this shared machine
spreads over all of them, and prints MiB/s, IOPS and the ratios
vbdfs/qemu-storage-daemon and vbdfs/direct.

Targets:
  direct  fio on the raw backing file itself (raw only)
  vbdfs   fio on the disk file of a vbdfs mount
  qsd     fio on qemu-storage-daemon's `--export type=fuse` of the image

The "loop" workloads run on a direct-I/O loop device over the vbdfs disk file
and over the qemu-storage-daemon export instead: the path a guest's I/O takes.

Every run starts each target from the same page-cache state: the image's
pages are written back and evicted, and before a read run the image is then
read once, so reads measure the server over cached data. How pages came into
the cache otherwise decides the result: a file filled by 1 MiB writes is
cached in large folios, and ext4 (Linux 6.16 and later) then spends ~2x the
CPU on each 4 KiB buffered write into it, whichever server makes the write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from vbdfs.store import DiskSpec, Store  # noqa: E402

MiB = 1 << 20
WORKLOADS = [
    # name, fio rw, block size, iodepth
    ("seq-write 1M qd1", "write", "1M", 1),
    ("seq-read 1M qd1", "read", "1M", 1),
    ("rand-write 4K qd1", "randwrite", "4k", 1),
    ("rand-read 4K qd1", "randread", "4k", 1),
    ("rand-write 4K qd16", "randwrite", "4k", 16),
    ("rand-read 4K qd16", "randread", "4k", 16),
]
LOOP_WORKLOADS = [
    ("loop seq-write 1M qd16", "write", "1M", 16),
    ("loop seq-read 1M qd16", "read", "1M", 16),
    ("loop rand-write 4K qd16", "randwrite", "4k", 16),
    ("loop rand-read 4K qd16", "randread", "4k", 16),
]


def run(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def wait_for(pred, what, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def fio(path: str, rw: str, bs: str, depth: int, size: int, runtime: int) -> dict:
    out = subprocess.run(
        ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth}", "--ioengine=libaio", "--direct=1", f"--size={size}",
         "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--norandommap",
         "--randrepeat=0", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"mib_s": side["bw_bytes"] / MiB, "iops": side["iops"]}


def settle(image: str, rw: str) -> None:
    """Put a target's image in the page-cache state every run starts from
    (see the module's docstring): evicted, then read once for a read run."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if "read" in rw:
            while os.read(fd, 8 * MiB):
                pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def serving(argv: list[str], mountpoint: str, what: str, cwd: str = REPO):
    """Run a FUSE server until it has mounted mountpoint; SIGTERM it at the end."""
    proc = subprocess.Popen(argv, cwd=cwd)
    try:
        wait_for(lambda: os.path.ismount(mountpoint), what)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def vbdfs_mount(store: Store, mnt: str, extra_args=(), tree: str = REPO):
    """The vbdfs daemon of the source tree `tree` (another version, to compare)."""
    os.makedirs(mnt, exist_ok=True)
    return serving([sys.executable, "-m", "vbdfs.daemon", store.root, mnt, "-f", *extra_args],
                   mnt, "the vbdfs mount", cwd=tree)


def qsd_export(image: str, fmt: str, export: str):
    open(export, "w").close()      # a FUSE export mounts over a regular file
    return serving([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", f"driver={fmt},node-name=fmt0,file=file0",
        "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={export},writable=on"],
        export, "the qemu-storage-daemon export")


@contextlib.contextmanager
def loop_device(path: str):
    """A direct-I/O loop device over path (as a Dom0 attaches a disk for blkback)."""
    dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", path],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "--detach", dev)


def prepare_images(work: str, fmt: str, size: int) -> dict:
    """One random-filled source, converted to identical images for every target."""
    src = os.path.join(work, "source.raw")
    if not os.path.exists(src):
        run("dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size // MiB}",
            "status=none")
    images = {}
    for target in (["direct"] if fmt == "raw" else []) + ["vbdfs", "qsd"]:
        dst = os.path.join(work, f"{target}.{fmt}")
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, *(
            ["-o", "cluster_size=65536"] if fmt == "qcow2" else []), src, dst)
        images[target] = dst
    return images


def bench_format(work: str, fmt: str, size: int, runtime: int, only: set, args) -> dict:
    images = prepare_images(work, fmt, size)
    store = Store(os.path.join(work, f"store-{fmt}"))
    os.makedirs(store.root, exist_ok=True)
    if os.path.exists(store.instance_dir("bench")):
        store.remove("bench")
    disk = store.create("bench", [DiskSpec(size=size, format=fmt)]).disks[0]
    os.replace(images["vbdfs"], disk.path)
    mnt = os.path.join(work, f"mnt-{fmt}")
    export = os.path.join(work, f"qsd-{fmt}.export")
    paths = {"vbdfs": os.path.join(mnt, "bench", "sda"), "qsd": export}
    if "direct" in images:
        paths["direct"] = images["direct"]
    backing = {**images, "vbdfs": disk.path}     # target -> its image file
    results = {}
    vbdfs = vbdfs_mount(store, mnt, [f"-o{o}" for o in args.options], args.tree)
    with vbdfs, qsd_export(images["qsd"], fmt, export):
        for name, rw, bs, depth in WORKLOADS:
            if only and not any(o in name for o in only):
                continue
            row = results[name] = {}
            for target in ("direct", "vbdfs", "qsd"):
                if target in paths:
                    settle(backing[target], rw)
                    row[target] = fio(paths[target], rw, bs, depth, size, runtime)
            print(format_row(fmt, name, row), flush=True)
        loop_work = [w for w in LOOP_WORKLOADS if not only or any(o in w[0] for o in only)]
        if loop_work:
            with loop_device(paths["vbdfs"]) as vloop, loop_device(paths["qsd"]) as qloop:
                for name, rw, bs, depth in loop_work:
                    row = results[name] = {}
                    for target, dev in (("vbdfs", vloop), ("qsd", qloop)):
                        settle(backing[target], rw)
                        row[target] = fio(dev, rw, bs, depth, size, runtime)
                    print(format_row(fmt, name, row), flush=True)
    store.remove("bench")
    return results


def ratio(a, b) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def format_row(fmt: str, name: str, row: dict, targets=("direct", "vbdfs", "qsd")) -> str:
    """One workload's line: each target's MiB/s (1M workloads) or IOPS, and
    the ratios. row: target -> fio's numbers (see fio()) for that target."""
    metric = "mib_s" if "1M" in name else "iops"
    unit = "MiB/s" if metric == "mib_s" else "IOPS"
    cells = [f"{fmt:5} {name:23}"]
    for target in targets:
        v = row.get(target)
        cells.append(f"{target} {v[metric]:9.0f}" if v else f"{target} {'-':>9}")
    v = row["vbdfs"][metric]
    cells.append(f"{unit:5}  vbdfs/qsd {ratio(v, row['qsd'][metric])}")
    cells.append(f"vbdfs/direct {ratio(v, row['direct'][metric])}" if "direct" in row else "")
    return "  ".join(cells).rstrip()


def add_common_options(p: argparse.ArgumentParser, workdir_help: str) -> None:
    """The options tools/bench and tools/bench-slow share."""
    p.add_argument("--only", default="", help="comma-separated workload name filters")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options for the vbdfs daemon (e.g. io=threads)")
    p.add_argument("--tree", default=REPO, help="run the vbdfs daemon of this source tree "
                   "(e.g. an unpacked `git archive` of another version, to compare)")
    p.add_argument("--workdir", help=workdir_help)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="raw,qcow2", help="comma-separated: raw,qcow2")
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (>= 1024)")
    p.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    add_common_options(p, "where to put images (default: a temp dir under /var/tmp)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it mounts FUSE filesystems)", file=sys.stderr)
        return 1
    for tool in ("fio", "qemu-img", "qemu-storage-daemon"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing (run tools/setup)", file=sys.stderr)
            return 1
    work = args.workdir or tempfile.mkdtemp(prefix="vbdfs-bench-", dir="/var/tmp")
    only = {o for o in args.only.split(",") if o}
    print(f"bench: {args.size} MiB images in {work}, {args.runtime}s per job, fio libaio O_DIRECT")
    all_results = {}
    try:
        for fmt in args.formats.split(","):
            all_results[fmt] = bench_format(work, fmt, args.size * MiB, args.runtime, only, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
