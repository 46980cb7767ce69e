"""After a daemon crash (issue 11, item 5).

SIGKILL the daemon under an ext4 filesystem on a loop device, a loop device
a process holds open, an unused one and a read-only one; start the daemon
again on the same (dead) mount point; `vbdctl recover` re-attaches what it
can and names what holds the rest. And nothing fsync'd is lost across
SIGKILLs. Every test detaches its loop devices in a finally block.
"""

import json
import mmap
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import MiB, Mount, is_mounted, make_instance, vbdctl_runner, wait_for
from vbdfs.operations import attach, recover
from vbdfs.store import DiskSpec, Store

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def direct(dev, off=0, data=None, n=4096):
    """Read n bytes at off, or write data there, with O_DIRECT; then fsync."""
    fd = os.open(dev, (os.O_RDWR if data else os.O_RDONLY) | os.O_DIRECT)
    buf = mmap.mmap(-1, n if data is None else len(data))
    try:
        if data is None:
            os.preadv(fd, [buf], off)
            return bytes(buf)
        buf[:] = data
        os.pwritev(fd, [buf], off)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def holder(path):
    p = subprocess.Popen([sys.executable, "-c", f"f = open({path!r}, 'rb'); print('ok', "
                          "flush=True); import time; time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ok"
    return p


def reattached(line, devs, disk):
    """Check a `re-attached` line of recover; follow the device if its number changed
    (another user of loop devices may take the number between detach and attach)."""
    words = line.split()
    assert words[:3] == [devs[disk], f"vm/{disk}:", "re-attached"], line
    if words[3:4] == ["as"]:
        devs[disk] = words[4]
    else:
        assert len(words) == 3, line


def stop(process):
    process.kill()
    process.wait()


def kill(m):
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    assert recover.is_dead(m.path)


def restart(store, path):
    """A daemon on a mount point a killed one left dead. Mount() may return before
    it mounted (a dead mount can still look mounted): wait for its log line."""
    m = Mount(store, path)
    wait_for(lambda: "INFO: serving" in m.output() or m.proc.poll() is not None,
             what="the daemon to serve")
    assert m.proc.poll() is None, m.output()
    return m


def cleanup(devices, *mounts, under=None):
    for mp in mounts:
        if os.path.ismount(mp):
            subprocess.run(["umount", "-l", mp])
    if under:
        devices = set(devices) | {d for d, back, _ in attach.loop_list()
                                  if back.startswith(under)}
    for dev in devices:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


def test_restart_on_a_dead_mount_point(store, tmp_path):
    make_instance(store, "web", 8 * MiB)
    m = Mount(store, str(tmp_path / "mnt"))
    try:
        data = os.urandom(4096)
        with open(m.disk("web"), "r+b") as f:
            f.write(data)
            os.fsync(f.fileno())
        kill(m)
        m2 = restart(store, m.path)                     # the dead mount is cleaned
        try:
            assert "held a dead vbdfs mount" in m2.output()
            with open(m2.disk("web"), "rb") as f:
                assert f.read(4096) == data
        finally:
            m2.stop()
    finally:
        m.stop()
    # A dead vbdfs mount of another store is not ours to clean.
    other = Store(str(tmp_path / "other"), store.whitelist_file)
    os.mkdir(other.root)
    m = Mount(other, str(tmp_path / "mnt"))
    try:
        kill(m)
        r = subprocess.run([sys.executable, "-m", "vbdfs.daemon", store.root, m.path, "-f"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert f"is a dead vbdfs mount of {other.root}, not of {store.root}" in r.stderr
        assert recover.is_dead(m.path)
    finally:
        m.stop()


def test_recover_after_sigkill(store, tmp_path):
    """ext4 on sda (mounted), sdb used by a process, sdc unused, sdd read-only and in use."""
    store.create("vm", [DiskSpec(size=64 * MiB), DiskSpec(size=8 * MiB),
                        DiskSpec(size=8 * MiB, format="qcow2"), DiskSpec(size=8 * MiB)])
    fs = tmp_path / "fs"
    fs.mkdir()
    m = Mount(store, str(tmp_path / "mnt"))
    ctl = vbdctl_runner(store, m.path)
    devs, users, m2 = {}, [], None
    try:
        for disk in ("sda", "sdb", "sdc"):
            devs[disk] = ctl("attach", "vm", disk, check=0).stdout.split()[1]
        devs["sdd"] = ctl("attach", "--read-only", "vm", "sdd", check=0).stdout.split()[1]
        sh("mkfs.ext4", "-q", devs["sda"])
        sh("mount", devs["sda"], str(fs))
        (fs / "kept").write_bytes(b"synced before the crash\n" * 100)
        sh("sync", "-f", str(fs / "kept"))
        blocks = {d: os.urandom(4096) for d in ("sdb", "sdc")}
        for d, data in blocks.items():
            direct(devs[d], 8192, data)
        users.append(holder(devs["sdb"]))
        users.append(holder(devs["sdd"]))

        kill(m)
        with pytest.raises(OSError):
            direct(devs["sdc"])                       # the dead connection

        m2 = restart(store, m.path)
        r = ctl("recover")
        assert r.returncode == 1, r.stderr            # something is left: status 1
        out = {line.split()[1].split(":")[0]: line for line in r.stdout.splitlines()}
        assert set(out) == {"vm/sda", "vm/sdb", "vm/sdc", "vm/sdd"}, r.stdout + r.stderr
        reattached(out["vm/sdc"], devs, "sdc")
        # Read-only: re-pointed in place where the kernel allows it; 6.18 asks
        # the dead file for its size and refuses, then it is held like sdb.
        repointed = out["vm/sdd"] == f"{devs['sdd']} vm/sdd: re-pointed"
        assert repointed or f"process {users[1].pid} (python" in out["vm/sdd"], out["vm/sdd"]
        assert f"in use, left alone: filesystem ext4 on {devs['sda']} mounted at {fs}" \
            in out["vm/sda"]
        assert f"process {users[0].pid} (python" in out["vm/sdb"]
        assert f"has {devs['sdb']} open" in out["vm/sdb"]
        # Unused and read-only devices work again, on the same device.
        assert direct(devs["sdc"], 8192) == blocks["sdc"]
        direct(devs["sdc"], 0, b"w" * 4096)
        if repointed:
            assert direct(devs["sdd"], 0) == direct(m2.disk("vm", "sdd"), 0)
            stop(users.pop(1))
        with pytest.raises(OSError):
            direct(devs["sdb"])                       # still on the dead connection

        # Release the holders; recover again: everything is back.
        sh("umount", str(fs))
        while users:
            stop(users.pop())
        r = ctl("recover", check=0)
        lines = sorted(r.stdout.splitlines(), key=lambda l: l.split()[1])
        assert len(lines) == 3 - repointed, r.stdout
        for line, d in zip(lines, ("sda", "sdb", "sdd")):
            reattached(line, devs, d)
        assert direct(devs["sdd"], 0) == direct(m2.disk("vm", "sdd"), 0)
        assert open(f"/sys/block/{devs['sdd'][5:]}/ro").read().strip() == "1"
        assert direct(devs["sdb"], 8192) == blocks["sdb"]
        sh("mount", devs["sda"], str(fs))             # the journal replays
        assert (fs / "kept").read_bytes() == b"synced before the crash\n" * 100
        sh("umount", str(fs))
        assert ctl("recover", check=0).stdout.startswith("no loop device is left")
        assert json.loads(ctl("recover", "--output", "json", check=0).stdout) == []
        # The attachment records still describe the devices: detach works.
        ctl("detach", "vm", check=0)
        assert not [d for d, back, _ in attach.loop_list() if back.startswith(m.path + "/")]
    finally:
        for u in users:
            u.kill()
            u.wait()
        cleanup(devs.values(), str(fs), under=str(tmp_path))
        if m2:
            m2.stop()
        m.stop()


def test_recover_needs_a_live_mount(store, tmp_path):
    make_instance(store, "web", 8 * MiB)
    m = Mount(store, str(tmp_path / "mnt"))
    try:
        kill(m)
        r = vbdctl_runner(store, m.path)("recover", check=1)
        assert "the vbdfs daemon serving" in r.stderr and "start it again" in r.stderr
        r = vbdctl_runner(store, m.path)("attach", "web", check=1)
        assert "vbdctl recover" in r.stderr
    finally:
        m.stop()


ROUNDS = 20
BLOCK = 4096


def test_nothing_fsynced_is_lost_across_sigkills(store, tmp_path):
    """20 rounds: fsync'd writes, then unsynced ones, SIGKILL, restart, read back."""
    store.create("vm", [DiskSpec(size=4 * MiB), DiskSpec(size=4 * MiB, format="qcow2")])
    path = str(tmp_path / "mnt")
    rng = random.Random(11)
    nblocks = 4 * MiB // BLOCK
    # Per disk and block: the contents it may hold (acknowledged, or a later unsynced write).
    may = {d: {} for d in ("sda", "sdb")}
    m = None
    try:
        for _ in range(ROUNDS):
            m = restart(store, path)
            for disk, model in may.items():
                fd = os.open(m.disk("vm", disk), os.O_RDWR)
                try:
                    for b, ok in model.items():
                        got = os.pread(fd, BLOCK, b * BLOCK)
                        assert got in ok, f"{disk} block {b} lost its fsync'd contents"
                        model[b] = {got}
                    for b in rng.sample(range(nblocks), 6):
                        data = rng.randbytes(BLOCK) if rng.random() < 0.8 else bytes(BLOCK)
                        os.pwrite(fd, data, b * BLOCK)
                        model[b] = {data}
                    os.fsync(fd)
                    for b in rng.sample(range(nblocks), 3):    # not acknowledged
                        data = rng.randbytes(BLOCK)
                        os.pwrite(fd, data, b * BLOCK)
                        model[b] = model.get(b, {bytes(BLOCK)}) | {data}
                finally:
                    os.close(fd)
            fd = os.open(m.disk("vm", "sdb"), os.O_RDWR)       # open while killed
            os.pwrite(fd, b"x" * BLOCK, 0)
            may["sdb"][0] = may["sdb"].get(0, {bytes(BLOCK)}) | {b"x" * BLOCK}
            kill(m)
            with pytest.raises(OSError):               # its flush reaches no daemon
                os.close(fd)
        m = restart(store, path)
        for disk, model in may.items():
            with open(m.disk("vm", disk), "rb") as f:
                for b, ok in model.items():
                    f.seek(b * BLOCK)
                    assert f.read(BLOCK) in ok
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", store.load("vm").disks[1].path],
                           capture_output=True, text=True)
        assert r.returncode in (0, 3), r.stdout + r.stderr      # leaks at worst
    finally:
        if m:
            m.stop()
    assert not is_mounted(path)
