"""The vbdfs command: arguments, start-up errors, clean unmount."""

import os
import signal
import subprocess
import sys

import pyfuse3
import pytest

from conftest import wait_for
from vbdfs import daemon, fuseloop, iopath
from vbdfs.daemon import UsageError, parse_options
from vbdfs.operations import holders

VBDFS = [sys.executable, "-m", "vbdfs.daemon"]


def run(args, **kw):
    return subprocess.run(VBDFS + args, capture_output=True, text=True, timeout=30, **kw)


def test_options():
    o = parse_options(["rw,nosuid,nodev,_netdev,allow_other", "node=n1,x-systemd.automount"])
    assert o["fuse"] == {"allow_other"} and o["node"] == "n1"
    with pytest.raises(UsageError, match="unknown mount option 'bogus'"):
        parse_options(["bogus"])


def test_missing_store_is_one_line_and_status_1(tmp_path):
    (tmp_path / "mnt").mkdir()
    r = run([str(tmp_path / "nostore"), str(tmp_path / "mnt"), "-f"])
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "store" in r.stderr and "does not exist" in r.stderr


def test_missing_mountpoint(tmp_path):
    r = run([str(tmp_path), str(tmp_path / "nomnt"), "-f"])
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_usage_error_is_status_2(tmp_path):
    r = run([str(tmp_path)])
    assert r.returncode == 2
    r = run([str(tmp_path), str(tmp_path), "-o", "bogus"])
    assert r.returncode == 2 and "bogus" in r.stderr


@pytest.mark.fuse
@pytest.mark.root
def test_busy_mountpoint(store, mounted):
    r = run([store.root, mounted.path, "-f"])
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "busy" in r.stderr
    assert os.path.ismount(mounted.path)      # the first mount is untouched


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(store, mount, sig):
    m = mount()
    m.proc.send_signal(sig)
    assert m.proc.wait(timeout=30) == 0
    assert not os.path.ismount(m.path)


@pytest.mark.fuse
@pytest.mark.root
def test_daemonizes_without_f(store, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run([store.root, str(mnt)])
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)            # mounted before the parent returned
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    wait_for(lambda: not os.path.ismount(mnt), what="unmount")


@pytest.mark.fuse
@pytest.mark.root
def test_mount_t_fuse_vbdfs(store, tmp_path):
    """mount(8) runs vbdfs through mount.fuse3 with fstab-style options.

    mount(8) resets PATH, so name the venv's vbdfs in the PROGRAM#SOURCE form;
    an installed /usr/local/sbin/vbdfs works with -t fuse.vbdfs as well.
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    program = os.path.join(os.path.dirname(sys.executable), "vbdfs")
    r = subprocess.run(["mount", "-t", "fuse", f"{program}#{store.root}", str(mnt),
                        "-o", f"nodev,nosuid,_netdev,whitelist={store.whitelist_file}"],
                       capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        with open("/proc/mounts") as f:
            line = [l for l in f if f" {mnt} " in l][0]
        assert line.split()[:3] == [store.root, str(mnt), "fuse.vbdfs"]
    finally:
        subprocess.run(["umount", str(mnt)])


FUSE_CONNECTIONS = "/sys/fs/fuse/connections"


@pytest.fixture
def fuse_connections():
    """Mounts, when called, the fusectl filesystem, where the kernel shows each
    FUSE connection's limits (unmounted after the test if it was missing)."""
    mounted_here = []

    def mount_fusectl():
        if not os.path.ismount(FUSE_CONNECTIONS):
            subprocess.run(["mount", "-t", "fusectl", "none", FUSE_CONNECTIONS], check=True)
            mounted_here.append(FUSE_CONNECTIONS)

    yield mount_fusectl
    for path in mounted_here:
        subprocess.run(["umount", path], check=True)


def connection_of(mountpoint: str) -> str:
    [dev] = [dev for dev, where, _, _ in holders.mount_table() if where == mountpoint]
    major, minor = (int(n) for n in dev.split(":"))
    return os.path.join(FUSE_CONNECTIONS, str(major << 20 | minor))     # the kernel's dev_t


@pytest.mark.fuse
@pytest.mark.root
def test_raises_its_mounts_max_background(store, mount, fuse_connections):
    # The kernel's default (12) caps a guest's queue depth at 12 requests in
    # flight. The daemon asks for more at mount (not through fusectl, which a
    # host may lack: where it is missing, as here, the daemon starts before
    # it is mounted), and libfuse derives the congestion threshold.
    m = mount()
    fuse_connections()
    conn = connection_of(m.path)
    with open(os.path.join(conn, "max_background")) as f:
        assert int(f.read()) == iopath.MAX_BACKGROUND > 12
    with open(os.path.join(conn, "congestion_threshold")) as f:
        assert int(f.read()) == iopath.MAX_BACKGROUND * 3 // 4
    assert f"FUSE max_background {iopath.MAX_BACKGROUND}" in m.output()


def test_says_so_when_pyfuse3_cannot_raise_max_background(monkeypatch, caplog):
    # A stock pyfuse3 does not pass Operations.max_background on.
    monkeypatch.delattr(pyfuse3.Operations, "max_background")
    daemon.report_background_limit()
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "max_background stays at the kernel's default" in warning
    assert "max-background.patch" in warning


@pytest.mark.fuse
@pytest.mark.root
def test_reads_requests_in_pyfuse3s_receiving_thread(store, mount):
    """tools/setup builds pyfuse3 with patches/pyfuse3-*-receive-thread.patch,
    and the daemon must use it: sequential writes through a loop device
    depend on it (README Performance). The thread runs no Python; before any
    I/O it is the daemon's only task besides the main one (iopath's worker
    threads start at the first hand-off)."""
    assert fuseloop.RECEIVE_THREAD, "pyfuse3 lacks the receive-thread patch: run tools/setup"
    m = mount()
    pid = m.proc.pid

    def tasks():
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    wait_for(lambda: len(tasks()) > 1, what="the receiving thread to start")
    assert len(tasks()) == 2 and pid in tasks(), tasks()
