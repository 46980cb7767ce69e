"""The vbdfs command: arguments, start-up errors, clean unmount."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import wait_for
from vbdfs.daemon import UsageError, parse_options

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
