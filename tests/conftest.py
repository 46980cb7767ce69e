"""Shared fixtures: a store, and a real vbdfs mount of it in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
