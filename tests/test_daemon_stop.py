"""Stopping the daemon never pulls a disk in use (issue 11, item 4).

A stop signal while a loop device or a process holds a disk: the daemon logs
which disk and what holds it, keeps serving, and exits once they are gone.
`vbdctl daemon-stop` refuses at once; --force pulls; --detach (the systemd
unit's ExecStop) detaches recorded loop devices nothing uses. Every test
detaches its loop devices in a finally block.
"""

import mmap
import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import MiB, is_mounted, make_instance, vbdctl_runner, wait_for
from vbdfs.operations import attach

pytestmark = [pytest.mark.fuse, pytest.mark.root]

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "vbdfs.service")


def losetup(*args):
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def read_direct(path, n=4096):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        os.preadv(fd, [buf], 0)
        return bytes(buf)
    finally:
        os.close(fd)


def write_pattern(path, data):
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def holder(path):
    """A process that keeps path open until killed."""
    p = subprocess.Popen([sys.executable, "-c", f"f = open({path!r}, 'rb'); print('ok', "
                          "flush=True); import time; time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ok"
    return p


def detach_quietly(*devs):
    for d in devs:
        if d:
            subprocess.run(["losetup", "--detach", d], capture_output=True)


def test_stop_signal_waits_for_loop_device_and_process(store, mount):
    make_instance(store, "web", 8 * MiB, 8 * MiB)
    m = mount()
    data = os.urandom(4096)
    write_pattern(m.disk("web", "sda"), data)
    dev = losetup("--find", "--show", "--direct-io=on", m.disk("web", "sda"))
    reader = None
    try:
        reader = holder(m.disk("web", "sdb"))
        m.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "in use: web/sdb" in m.output(), what="the holders in the log")
        out = m.output()
        assert f"in use: web/sda: loop device {dev}" in out
        assert f"in use: web/sdb: process {reader.pid} (python" in out
        # Still serving: the loop device and the mount read the disk.
        assert m.proc.poll() is None and is_mounted(m.path)
        assert read_direct(dev) == data
        with open(m.disk("web", "sda"), "rb") as f:
            assert f.read(4096) == data
        # SIGHUP and SIGINT are stop requests too; none pulls the disk.
        m.proc.send_signal(signal.SIGHUP)
        m.proc.send_signal(signal.SIGINT)
        detach_quietly(dev)
        dev = None
        wait_for(lambda: "1 disk(s) in use" in m.output(), what="the re-check")
        assert m.proc.poll() is None                  # sdb is still open
        assert read_direct(m.disk("web", "sdb"))      # and served
        reader.kill()
        reader.wait()
        assert m.proc.wait(timeout=15) == 0
        assert not is_mounted(m.path)
    finally:
        detach_quietly(dev)
        if reader:
            reader.kill()


def test_stop_signal_without_users_unmounts_at_once(store, mount):
    make_instance(store, "web", 8 * MiB)
    m = mount()
    with open(m.disk("web"), "rb") as f:
        f.read(512)
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=10) == 0
    assert not is_mounted(m.path)
    assert "not unmounting" not in m.output()


def test_daemon_stop_refuses_then_force_pulls(store, mount):
    make_instance(store, "web", 8 * MiB)
    m = mount()
    ctl = vbdctl_runner(store, m.path)
    dev = losetup("--find", "--show", "--direct-io=on", m.disk("web"))
    try:
        r = ctl("daemon-stop", check=1)
        assert r.stderr.count("\n") == 1
        assert f"disks in use: web/sda: loop device {dev}" in r.stderr
        assert "--force" in r.stderr
        assert m.proc.poll() is None and read_direct(dev)
        r = ctl("daemon-stop", "--force", check=0)
        assert f"pulled web/sda: loop device {dev}" in r.stdout
        assert m.proc.wait(timeout=15) == 0
        assert not is_mounted(m.path)
        assert "forced stop" in m.output() and "web/sda" in m.output()
        with pytest.raises(OSError):                  # pulled, as asked
            read_direct(dev)
    finally:
        detach_quietly(dev)


def test_daemon_stop_without_users(store, mount):
    make_instance(store, "web", 8 * MiB)
    m = mount()
    r = vbdctl_runner(store, m.path)("daemon-stop", check=0)
    assert f"(pid {m.proc.pid}) stopped" in r.stdout
    assert m.proc.wait(timeout=5) == 0 and not is_mounted(m.path)
    r = vbdctl_runner(store, m.path)("daemon-stop", check=1)
    assert "is not a mount point" in r.stderr


def unit_lines():
    with open(UNIT) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def unit_exec_stop_args():
    """The ExecStop command of the unit, as vbdctl arguments."""
    line = [l for l in unit_lines() if l.startswith("ExecStop=")][0]
    argv = shlex.split(line.partition("=")[2].lstrip("-"))
    assert argv[0] == "/usr/local/sbin/vbdctl"
    return argv[1:]


def test_unit_exec_stop_detaches_unused_and_spares_used(store, mount):
    """The unit's ExecStop, as run at shutdown once the domains are down."""
    make_instance(store, "web", 8 * MiB, 8 * MiB)
    m = mount()
    ctl = vbdctl_runner(store, m.path)
    devs = dict(l.split() for l in ctl("attach", "web", check=0).stdout.splitlines())
    user = None
    try:
        user = holder(devs["sdb"])                    # a "domain" still using sdb
        r = ctl(*unit_exec_stop_args(), check=1)
        assert f"detached web/sda {devs['sda']}; not stopping" in r.stderr
        assert f"web/sdb: loop device {devs['sdb']}, used by process {user.pid}" in r.stderr
        assert m.disk("web", "sda") not in [back for _, back, _ in attach.loop_list()]
        assert m.proc.poll() is None and read_direct(devs["sdb"])
        user.kill()
        user.wait()
        r = ctl(*unit_exec_stop_args(), check=0)
        assert f"detached web/sdb {devs['sdb']}" in r.stdout
        assert m.proc.wait(timeout=10) == 0 and not is_mounted(m.path)
        assert not os.path.exists(os.path.join(store.state_dir("attachments"), "web.json"))
    finally:
        if user:
            user.kill()
        detach_quietly(*devs.values())
