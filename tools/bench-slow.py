"""Benchmark vbdfs against qemu-storage-daemon on a slow (network) store.

Run as root through tools/bench-slow. By default it builds the slow store
itself, in private mount and network namespaces so that it meets no other
glusterd: glusterd (started here, stopped at the end), a one-brick GlusterFS
volume on 127.0.0.2, Gluster's debug/delay-gen translator on the brick
delaying every READ and WRITE by --delay microseconds, and a glusterfs
client mount. With --store DIR it uses that directory instead (an NFS mount,
say) and adds no delay.

On the store it puts two copies of one random-filled raw image: one served
by vbdfs, one by qemu-storage-daemon's `--export type=fuse`. Before each fio
run it drops the page cache, so reads go to the store. It prints the median
of --rounds runs for each target and the ratio vbdfs/qemu-storage-daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import (MiB, add_common_options, fio, format_row, qsd_export, run,  # noqa: E402
                   vbdfs_mount)

from vbdfs.store import DiskSpec, Store  # noqa: E402

HOST = "127.0.0.2"      # Gluster refuses 127.0.0.1 and localhost for a brick
WORKLOADS = [
    # name, fio rw, block size, iodepth
    ("rand-read 4K qd1", "randread", "4k", 1),
    ("rand-read 4K qd16", "randread", "4k", 16),
    ("rand-write 4K qd16", "randwrite", "4k", 16),
    ("seq-read 1M qd1", "read", "1M", 1),
]


def gluster(*args, check=True):
    r = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                       timeout=120)
    if check and r.returncode:
        raise SystemExit(f"bench-slow: gluster {' '.join(args)}: {r.stdout}{r.stderr}".strip())
    return r


GLUSTER_STATE = ("/var/lib/glusterd", "/run/gluster", "/var/log/glusterfs")
NAMESPACED = "VBDFS_BENCH_SLOW_NAMESPACED"
FUSE_CONNECTIONS = "/sys/fs/fuse/connections"


def reexec_in_namespaces(net: bool) -> None:
    """Run this script again in its own mount namespace (and network
    namespace, to build the GlusterFS store): glusterd is one per machine
    (its port, its state directories), and a test's or another user's may be
    running; the fusectl mount below is ours alone."""
    os.environ[NAMESPACED] = "1"
    os.execvp("unshare", ["unshare", "--mount", *(["--net"] if net else []),
                          "--propagation", "private",
                          sys.executable, os.path.abspath(__file__), *sys.argv[1:]])


def fuse_connections() -> None:
    """Mount fusectl where a systemd host has it (sys-fs-fuse-connections.mount)
    if it is missing, as in a container: vbdfs versions before the
    max-background pyfuse3 patch (--tree) raised their mount's max_background
    there."""
    if not os.listdir(FUSE_CONNECTIONS) and not os.path.ismount(FUSE_CONNECTIONS):
        run("mount", "-t", "fusectl", "none", FUSE_CONNECTIONS)


def private_gluster_state(work: str) -> None:
    """Empty Gluster state directories, seen in our mount namespace only."""
    run("ip", "link", "set", "lo", "up")
    for i, path in enumerate(GLUSTER_STATE):
        private = os.path.join(work, f"gluster-state-{i}")
        os.makedirs(private, exist_ok=True)
        os.makedirs(path, exist_ok=True)
        run("mount", "--bind", private, path)


@contextlib.contextmanager
def glusterd(work: str):
    """glusterd for this run (in our namespaces), stopped at the end."""
    log = os.path.join(work, "glusterd.log")
    proc = subprocess.Popen(["glusterd", "-N", f"--log-file={log}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while gluster("pool", "list", check=False).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench-slow: glusterd did not start (see {log})")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gluster_volume(work: str, name: str, delay_us: int):
    """A started one-brick volume mounted at WORK/gluster, every READ and WRITE
    on its brick delayed by delay_us (Gluster's own fault injection); yields
    the mount path."""
    brick = os.path.join(work, "brick")
    os.makedirs(brick, exist_ok=True)
    gluster("volume", "create", name, f"{HOST}:{brick}", "force")
    mnt = os.path.join(work, "gluster")
    os.makedirs(mnt, exist_ok=True)
    try:
        # A vbdfs store needs these off (see tests/test_failover_gluster.py).
        for option in ("performance.open-behind", "performance.stat-prefetch"):
            gluster("volume", "set", name, option, "off")
        # Before the start: a translator added to a running brick's graph
        # stays out of it until the brick restarts (measured: no delay).
        for option, value in (("debug.delay-gen", "posix"),
                              ("delay-gen.delay-percentage", "100"),
                              ("delay-gen.delay-duration", str(delay_us)),
                              ("delay-gen.enable", "READ,WRITE")):
            gluster("volume", "set", name, option, value)
        gluster("volume", "start", name)
        run("mount", "-t", "glusterfs", f"{HOST}:/{name}", mnt)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt])
    finally:
        gluster("volume", "stop", name, "force", check=False)
        gluster("volume", "delete", name, check=False)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def prepare(work: str, store_dir: str, size: int, fmt: str) -> tuple[Store, str]:
    """The vbdfs store (with instance `bench`) and the qemu-storage-daemon
    image, both on store_dir, both holding the same random bytes in the same
    layout (qcow2: converted by qemu-img, 64 KiB clusters, as tools/bench)."""
    src = os.path.join(work, "source.raw")
    if not os.path.exists(src):
        run("dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size // MiB}",
            "status=none")
    store = Store(os.path.join(store_dir, "vbdfs-bench-store"))
    os.makedirs(store.root, exist_ok=True)
    if os.path.exists(store.instance_dir("bench")):
        store.remove("bench")
    disk = store.create("bench", [DiskSpec(size=size, format=fmt)]).disks[0]
    qsd_dir = os.path.join(store_dir, "vbdfs-bench-qsd")
    os.makedirs(qsd_dir, exist_ok=True)
    qsd_image = os.path.join(qsd_dir, f"disk.{fmt}")
    for dst in (disk.path, qsd_image):
        if fmt == "raw":
            run("dd", f"if={src}", f"of={dst}", "bs=4M", "conv=fsync", "status=none")
        else:
            run("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", "cluster_size=65536",
                src, dst)
            run("sync", dst)
    return store, qsd_image


def bench_store(work: str, store_dir: str, size: int, args, options: list[str]) -> dict:
    store, qsd_image = prepare(work, store_dir, size, args.format)
    mnt = os.path.join(work, "mnt")
    export = os.path.join(work, "qsd.export")
    paths = {"vbdfs": os.path.join(mnt, "bench", "sda"), "qsd": export}
    only = {o for o in args.only.split(",") if o}
    results = {}
    try:
        with vbdfs_mount(store, mnt, options, args.tree), \
                qsd_export(qsd_image, args.format, export):
            for name, rw, bs, depth in WORKLOADS:
                if only and not any(o in name for o in only):
                    continue
                runs = {"vbdfs": [], "qsd": []}
                for _ in range(args.rounds):
                    for target in runs:       # alternate: noise spreads over both
                        drop_caches()
                        runs[target].append(fio(paths[target], rw, bs, depth, size,
                                                args.runtime))
                metric = "mib_s" if bs == "1M" else "iops"
                row = results[name] = {t: statistics.median(r[metric] for r in rs)
                                       for t, rs in runs.items()}
                row["rounds"] = {t: [round(r[metric], 1) for r in rs] for t, rs in runs.items()}
                medians = {t: {metric: row[t]} for t in runs}
                spread = "  ".join(f"{t} {'/'.join(f'{v:.0f}' for v in row['rounds'][t])}"
                                   for t in runs)
                print(f"{format_row(args.format, name, medians, targets=runs)}  ({spread})",
                      flush=True)
    finally:
        store.remove("bench")
        with contextlib.suppress(OSError):
            os.unlink(qsd_image)
    return results


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/bench-slow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="use this directory (a slow store) instead of building "
                   "the delayed GlusterFS volume")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="image format of both disks (default raw)")
    p.add_argument("--delay", type=int, default=1000,
                   help="delay-gen delay-duration in microseconds (default 1000)")
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (default 1024)")
    p.add_argument("--runtime", type=int, default=6, help="seconds per fio job (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is shown")
    add_common_options(p, "where to put local files (default: a temp dir in /var/tmp)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench-slow: run as root (it mounts filesystems, drops caches)", file=sys.stderr)
        return 1
    tools = ["fio", "qemu-img", "qemu-storage-daemon"]
    if not args.store:
        tools += ["glusterd", "gluster", "mount.glusterfs"]
    for tool in tools:
        if not shutil.which(tool):
            print(f"bench-slow: {tool} is missing (run tools/setup)", file=sys.stderr)
            return 1
    if os.environ.get(NAMESPACED) != "1":
        reexec_in_namespaces(net=not args.store)
    fuse_connections()
    work = args.workdir or tempfile.mkdtemp(prefix="vbdfs-bench-slow-", dir="/var/tmp")
    size = args.size * MiB
    options = [f"-o{o}" for o in args.options]
    where = args.store or f"GlusterFS on {HOST}, delay-gen {args.delay} us on READ and WRITE"
    print(f"bench-slow: {args.size} MiB {args.format} image on {where}; {args.runtime}s "
          f"per job, median of {args.rounds}, page cache dropped before each run; vbdfs from "
          f"{args.tree}, options: {','.join(args.options) or '(none)'}", flush=True)
    try:
        if args.store:
            results = bench_store(work, args.store, size, args, options)
        else:
            private_gluster_state(work)
            volume = f"vbdfs-bench-slow-{os.getpid()}"
            with glusterd(work), gluster_volume(work, volume, args.delay) as mnt:
                results = bench_store(work, mnt, size, args, options)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
