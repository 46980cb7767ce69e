"""Shared fixtures and helpers: a store, a real vbdfs mount of it in a child
process, and qemu-img / qemu-io as the judges of images."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from vbdfs.store import DiskSpec, Store

MiB = 1 << 20
GiB = 1 << 30


def pytest_collection_modifyitems(config, items):
    # Fail loudly, never skip: CI runs as root with /dev/fuse, and a test that
    # needs them must not count as passed when they are missing.
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.xfail(reason="needs root", run=False, strict=True))


@pytest.fixture
def store(tmp_path) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    return Store(str(root), whitelist_file=str(tmp_path / "file-storage-paths"))


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class Mount:
    """A vbdfs daemon (foreground child) serving store at path."""

    def __init__(self, store: Store, path: str, extra_args=(), prefix=()):
        # prefix: a command that runs the daemon, e.g. nsenter into another namespace
        self.store = store
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
        except FileExistsError:        # a dead mount a killed daemon left there
            pass
        self.log = open(path + ".log", "w+")
        # VBDFS_TEST_IO=threads runs every mount's disk I/O in worker threads.
        io = ("-o", f"io={os.environ['VBDFS_TEST_IO']}") if os.environ.get("VBDFS_TEST_IO") else ()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vbdfs.daemon", store.root, path, "-f",
             "-o", f"whitelist={store.whitelist_file}", *io, *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: os.path.ismount(path) or self.proc.poll() is not None,
                     what=f"vbdfs to mount {path}")
            if not os.path.ismount(path):
                raise AssertionError(f"vbdfs did not mount: {self.output()}")
        except BaseException:
            self.proc.kill()
            raise

    def disk(self, instance: str, disk: str = "sda") -> str:
        return os.path.join(self.path, instance, disk)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Not os.path.ismount: a killed daemon's mount answers ENOTCONN to stat.
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], check=False)
        return self.proc.returncode


@pytest.fixture
def mount(store, tmp_path):
    """Start a mount; call mount() for the mounted Mount object. Stopped at teardown."""
    mounts = []

    def start(extra_args=()):
        m = Mount(store, str(tmp_path / f"mnt{len(mounts)}"), extra_args)
        mounts.append(m)
        return m

    yield start
    for m in mounts:
        m.stop()


@pytest.fixture
def mounted(mount):
    return mount()


def vbdctl_runner(store: Store, mountpoint: str | None = None, text: bool = True):
    """vbdctl bound to a store (and a mount): run(*args, check=None, ...) -> CompletedProcess.

    check, if given, is the exit status the command must end with.
    """
    def run(*args, check=None, env=None, input=None, stdin=None):
        where = ["--mountpoint", mountpoint] if mountpoint else []
        r = subprocess.run([sys.executable, "-m", "vbdfs.cli", "--store", store.root, *where,
                            "--whitelist", store.whitelist_file, *args],
                           capture_output=True, text=text, timeout=120, env=env, input=input,
                           stdin=stdin)
        if check is not None:
            assert r.returncode == check, (r.returncode, r.stdout[-2000:], r.stderr)
        return r
    return run


def make_instance(store: Store, name: str, *sizes: int, fmt: str = "raw"):
    return store.create(name, [DiskSpec(size=s, format=fmt) for s in sizes])


# --- one disk's long operation must not hold up another ---------------------------

@contextlib.contextmanager
def reads_meanwhile(path):
    """Read 4 KiB of path over and over in a thread (the mount is direct_io:
    each read reaches the daemon); yield the list of each read's end time."""
    fd = os.open(path, os.O_RDONLY)
    stop = threading.Event()
    stamps: list[float] = []

    def read():
        while not stop.is_set():
            os.pread(fd, 4096, 0)
            stamps.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.2)
        yield stamps
    finally:
        stop.set()
        reader.join()
        os.close(fd)


def assert_reads_went_on(stamps, started: float, ended: float, what: str) -> None:
    """The reads went on while `what` ran from started to ended. Not gap-free:
    a repair's thread holds the GIL for whole C calls, and CI shares two
    cores; run in the request loop, the reads stopped for all of it."""
    took = ended - started
    assert took > 0.3, f"the {what} took {took:.2f} s: too fast to show anything"
    during = [t for t in stamps if started <= t <= ended]
    gaps = [b - a for a, b in zip([started] + during, during + [ended])]
    assert len(during) >= 20 and max(gaps) < took / 2, (
        f"another disk's reads stopped for {max(gaps):.2f} s of the {took:.2f} s {what} "
        f"({len(during)} reads meanwhile)")


# --- qemu as the judge of images ------------------------------------------------

def qemu_img(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    """qemu-img with its output captured; check: raise unless it succeeds."""
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check, cwd=cwd)


def mark_dirty(path) -> None:
    """Set a qcow2's dirty bit (incompatible_features bit 0), as if qemu had
    crashed under lazy refcounts: a writable open rebuilds its refcounts."""
    with open(path, "r+b") as f:
        f.seek(72)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features | 1))


def make_dirty_qcow2(src, path) -> None:
    """A qcow2 of src's contents in 512-byte clusters, marked dirty: its
    repair at a writable open takes ~1 s for 128 MiB."""
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on",
             src, path)
    mark_dirty(path)


def assert_judged_same(path, model: bytes, tmp_path) -> None:
    """qemu-img check finds the qcow2 image clean and compare finds it equal to model."""
    r = qemu_img("check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def qemu_io(path, *cmds, fmt="qcow2", cwd=None) -> None:
    """qemu-io running cmds on the image; fails the test on any error it reports."""
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [str(path)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), r


def qemu_random_writes(path, model: bytearray, rng, count: int) -> None:
    """Sector-aligned writes and zero writes by qemu-io (so qemu lays the image
    out), mirrored in model. Run in the image's directory, against which qemu
    resolves a relative data file name."""
    cmds = []
    for _ in range(count):
        off = rng.randrange(0, len(model) - 70000) // 512 * 512
        n = rng.randrange(1, 130) * 512
        if rng.random() < 0.3:
            cmds.append(f"write -z {off} {n}")
            model[off:off + n] = bytes(n)
        else:
            pat = rng.randrange(1, 255)
            cmds.append(f"write -P {pat} {off} {n}")
            model[off:off + n] = bytes([pat]) * n
    qemu_io(path.name, *cmds, cwd=path.parent)


def engine_random_writes(img, model: bytearray, rng, count: int, size=None,
                         zero_writes: float = 0.10, flushes: float = 0.05) -> None:
    """Writes of mixed sizes at unaligned offsets, zero writes and zero(), through
    an Image, mirrored in model; a flush now and then. size(rng) picks a length
    (default: a few typical ones); zero_writes and flushes are the shares of
    writes of zeros (besides the 15% of zero() calls) and of flushes."""
    for _ in range(count):
        off = rng.randrange(0, len(model) - 1)
        n = size(rng) if size else rng.choice([1, 100, 511, 4096, 9000, 70000, 300000])
        n = min(n, len(model) - off)
        r = rng.random()
        if r < 0.15:
            img.zero(off, n)
            data = bytes(n)
        else:
            data = bytes(n) if r < 0.15 + zero_writes else rng.randbytes(n)
            img.write(off, data)
        model[off:off + n] = data
        if rng.random() < flushes:
            img.flush()


def render_raw(path, tmp_path) -> bytes:
    """The image's contents as `qemu-img convert -O raw` renders them."""
    out = tmp_path / "rendered.raw"
    if out.exists():
        out.unlink()
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()
