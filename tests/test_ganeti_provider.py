"""The Ganeti ExtStorage provider, without Ganeti: vbdfs.ganeti.run called in
process with the environment noded would give (fast), and the installed shims
run the way noded runs them (env -i, minimal PATH, cwd = the provider dir).

Real mounts and loop devices throughout; every test detaches what it attached.
tests/test_ganeti_cluster.py drives the same provider through a real Ganeti.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import subprocess
import sys
import time

import pytest

from conftest import (MiB, Mount, assert_reads_went_on, make_dirty_qcow2, make_instance,
                      qemu_img, reads_meanwhile, vbdctl_runner, wait_for)
from vbdfs import ganeti
from vbdfs.operations.loops import backs
from vbdfs.store import Store, leases

VOL = "0f3c9a1e-5b7d-4c2a-9e8f-1a2b3c4d5e6f.ext.disk0"


def loops_backed_by(prefix: str) -> dict[str, str]:
    from vbdfs.operations.loops import loop_devices
    return {dev: back for dev, back in loop_devices().items() if back.startswith(prefix)}


class Node:
    """One node's view: its daemon (a Mount with -o node=NAME) and its config file."""

    def __init__(self, store: Store, tmp_path, name: str):
        self.name = name
        self.mount = Mount(store, str(tmp_path / f"mnt-{name}"), ["-o", f"node={name}"])
        self.config = str(tmp_path / f"{name}.toml")
        with open(self.config, "w") as f:
            f.write(f'store = "{store.root}"\nmountpoint = "{self.mount.path}"\n'
                    f'node = "{name}"\nfile_storage_paths = "{store.whitelist_file}"\n')

    def env(self, volume: str = VOL, **extra) -> dict:
        env = {"VBDFS_CONFIG": self.config, "VBDFS_GANETI_LOG": "", "VOL_NAME": volume,
               "EXTP_PROVIDER": "vbdfs", "EXTP_ACCESS": "kernelspace"}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def __call__(self, action: str, volume: str = VOL, check: int | None = 0, **extra):
        """Run an action in process; return (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        status = ganeti.run(action, self.env(volume, **extra), out, err)
        if check is not None:
            assert status == check, (action, status, out.getvalue(), err.getvalue())
        return status, out.getvalue(), err.getvalue()

    def view(self, volume: str = VOL) -> str:
        return self.mount.disk(volume)

    def lease(self, volume: str = VOL) -> str:
        return os.getxattr(self.view(volume), "user.vbdfs.lease").decode()

    def stop(self) -> None:
        for dev in loops_backed_by(self.mount.path + "/"):
            subprocess.run(["losetup", "--detach", dev])
        self.mount.stop()


@pytest.fixture
def nodes(store, tmp_path):
    """nodes(n) starts n daemons over the one store (n1, n2, ...); all stopped at the end."""
    made = []

    def start(n=1):
        for i in range(n):
            made.append(Node(store, tmp_path, f"n{len(made) + 1}"))
        return made[-n:] if n > 1 else made[-1]

    yield start
    for node in made:
        node.stop()


def pwrite_dev(device: str, offset: int, data: bytes, flush: bool = True) -> None:
    """Write as a guest does (O_DIRECT: no page cache in Dom0), then flush."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))             # page-aligned, as O_DIRECT needs
        buf.write(data)
        assert os.pwritev(fd, [buf], offset) == len(data)
        if flush:
            os.fsync(fd)           # through loop to the daemon: its flush()
    finally:
        os.close(fd)


def pread_dev(device: str, offset: int, n: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        assert os.preadv(fd, [buf], offset) == n
        return bytes(buf)
    finally:
        os.close(fd)


def block_size(device: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", device], check=True,
                              capture_output=True, text=True).stdout)


def qemu_img_check(path: str) -> None:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- no mount needed --------------------------------------------------------------
def test_bad_parameters_are_refused_and_leave_nothing(store, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'store = "{store.root}"\nmountpoint = "{tmp_path}/none"\n')
    base = {"VBDFS_CONFIG": str(cfg), "VBDFS_GANETI_LOG": "", "VOL_NAME": VOL,
            "EXTP_PROVIDER": "vbdfs", "EXTP_ACCESS": "kernelspace", "VOL_SIZE": "64"}
    for extra, says in [({"EXTP_FORMAT": "vmdk"}, "format='vmdk' is not one of raw, qcow2"),
                        ({"EXTP_FOO": "1"}, "unknown parameter 'foo'"),
                        ({"EXTP_ACCESS": "magic"}, "access='magic'"),
                        ({"VOL_SIZE": "12x"}, "VOL_SIZE='12x' is not a size in MiB"),
                        ({"VOL_SIZE": "0"}, "not positive")]:
        out, err = io.StringIO(), io.StringIO()
        assert ganeti.run("create", {**base, **extra}, out, err) == 1
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and VOL in lines[0] and says in lines[0], lines
        assert out.getvalue() == ""
        assert os.listdir(store.root) in ([], [".vbdfs"])
        assert store.instances() == []
    out, err = io.StringIO(), io.StringIO()
    assert ganeti.run("verify", {**base, "EXTP_FORMAT": "qcow2"}, out, err) == 0
    assert ganeti.run("verify", {**base, "EXTP_BOGUS": "x"}, out, err) == 1


def test_setinfo_claims_a_volume_and_list_shows_orphans(store, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'store = "{store.root}"\nmountpoint = "{tmp_path}/none"\n')
    env = {"VBDFS_CONFIG": str(cfg), "VBDFS_GANETI_LOG": "", "EXTP_PROVIDER": "vbdfs"}
    err = io.StringIO()
    for vol in (VOL, "1111.ext.disk0"):
        assert ganeti.run("create", {**env, "VOL_NAME": vol, "VOL_SIZE": "8"},
                          io.StringIO(), err) == 0, err.getvalue()
    assert ganeti.run("setinfo", {**env, "VOL_NAME": VOL, "VOL_METADATA": "originstname+web1"},
                      io.StringIO(), err) == 0, err.getvalue()
    ctl = vbdctl_runner(store)
    rows = {line.split()[0]: line.split()[-1]
            for line in ctl("list", check=0).stdout.splitlines()[1:]}
    assert rows == {VOL: "originstname+web1", "1111.ext.disk0": "unclaimed"}
    listed = {i["name"]: i["ganeti"] for i in json.loads(ctl("list", "--output", "json",
                                                             check=0).stdout)}
    assert listed == {VOL: "originstname+web1", "1111.ext.disk0": ""}
    assert "Ganeti volume of originstname+web1" in ctl("info", VOL, check=0).stdout
    # A vbdctl instance is not the provider's to touch.
    ctl("add", "--disk", "0:size=8M", "plain", check=0)
    assert ganeti.run("setinfo", {**env, "VOL_NAME": "plain", "VOL_METADATA": "x"},
                      io.StringIO(), err) == 1
    assert "not a Ganeti volume" in err.getvalue()
    assert ganeti.run("setinfo", {**env, "VOL_NAME": VOL, "VOL_METADATA": "a b"},
                      io.StringIO(), io.StringIO()) == 1


# --- with a mount and loop devices ----------------------------------------------------

@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_lifecycle_attach_open_grow_close_detach_remove(store, nodes, fmt):
    n = nodes()
    n("create", VOL_SIZE=64, EXTP_FORMAT=fmt)
    wait_for(lambda: os.path.exists(n.view()), what="the volume in the mount")
    _, out1, _ = n("attach")
    _, out2, _ = n("attach")                       # attached already: the same device
    _, out3, _ = n("attach")
    device = out1.splitlines()[0]
    assert out1 == out2 == out3 == device + "\n"
    assert os.path.exists(device) and os.stat(device).st_mode & 0o170000 == 0o060000
    assert loops_backed_by(n.mount.path + "/") == {device: n.view()}
    _, user, _ = n("attach", EXTP_ACCESS="userspace")
    assert user.splitlines() == [device, "kvm:" + n.view()]

    assert n.lease() == "none"
    with pytest.raises(OSError):                   # attached is not open: no writes yet
        pwrite_dev(device, 0, b"x" * 4096)
    n("open", VOL_OPEN_EXCLUSIVE="True")
    n("open", VOL_OPEN_EXCLUSIVE="True")           # again: nothing changes
    assert n.lease() == "exclusive"
    holder = leases.holder(store.state_dir("leases"), VOL, "sda", store.load(VOL).disks[0].path)
    assert holder["node"] == "n1"
    data = os.urandom(MiB)
    pwrite_dev(device, 5 * MiB, data)
    n("setinfo", VOL_METADATA="originstname+inst1")

    # Online grow: the image, the mount and the loop device all see it.
    n("grow", VOL_SIZE=64, VOL_NEW_SIZE=96)
    assert store.load(VOL).disks[0].size == 96 * MiB
    assert os.stat(n.view()).st_size == 96 * MiB
    assert block_size(device) == 96 * MiB
    pwrite_dev(device, 95 * MiB, data)            # the new end is writable
    assert pread_dev(device, 5 * MiB, MiB) == data
    assert pread_dev(device, 95 * MiB, MiB) == data
    n("grow", VOL_SIZE=64, VOL_NEW_SIZE=96)        # again (a retried job): done
    status, _, err = n("grow", VOL_SIZE=96, VOL_NEW_SIZE=32, check=1)
    assert VOL in err and "shrink" in err

    n("close")
    assert n.lease() == "none"
    assert leases.holder(store.state_dir("leases"), VOL, "sda",
                         store.load(VOL).disks[0].path) is None
    with pytest.raises(OSError):                   # closed: this node writes no more
        pwrite_dev(device, 0, b"y" * 4096)
    assert pread_dev(device, 95 * MiB, MiB) == data

    # Grow while attached but not open (a stopped instance's grow-disk).
    n("grow", VOL_SIZE=96, VOL_NEW_SIZE=128)
    assert block_size(device) == 128 * MiB and os.stat(n.view()).st_size == 128 * MiB
    if fmt == "qcow2":
        qemu_img_check(store.load(VOL).disks[0].path)
    status, _, err = n("remove", check=1)          # attached: refused
    assert "attached" in err and VOL in err
    n("detach")
    n("detach")                                    # not attached: done
    assert loops_backed_by(n.mount.path + "/") == {}
    n("grow", VOL_SIZE=128, VOL_NEW_SIZE=160)      # detached: the daemon resizes it alone
    assert store.load(VOL).disks[0].size == 160 * MiB
    n("remove")
    n("remove")                                    # gone: done
    assert store.instances() == []
    assert sorted(os.listdir(store.root)) == [".vbdfs"]


@pytest.mark.fuse
@pytest.mark.root
def test_attach_needs_the_stores_mount(store, nodes, tmp_path):
    n = nodes()
    n("create", VOL_SIZE=16)
    (tmp_path / "other").mkdir()
    other = Node(Store(str(tmp_path / "other")), tmp_path, "x")   # vbdfs of another store
    try:
        _, _, err = n("attach", check=1, VBDFS_MOUNTPOINT=other.mount.path)
        assert err.count("\n") == 1 and VOL in err and "not of the store" in err
    finally:
        other.stop()
    _, out, err = n("attach", check=1, VBDFS_MOUNTPOINT=str(tmp_path / "nothing"))
    assert out == "" and "is not a mount point: start the vbdfs daemon" in err
    # A hostile volume name never reaches a path: even an attached device's view.
    device = n("attach")[1].strip()
    for name in (f"../{os.path.basename(n.mount.path)}/{VOL}", f"{VOL}/../{VOL}", ".."):
        _, out, err = n("attach", name, check=1)
        assert out == "" and "instance name" in err, err
    n("detach")
    assert device not in loops_backed_by(n.mount.path + "/")
    n("remove")


@pytest.mark.fuse
@pytest.mark.root
def test_live_migration_hands_a_qcow2_volume_over(store, nodes):
    """Ganeti's order: close(target) [attach there first], open(False) on source
    and target, the guest moves, close(source), open(True) on target, detach(source).
    Both nodes write in turn; qemu-img check and every write must survive."""
    a, b = nodes(2)
    a("create", VOL_SIZE=256, EXTP_FORMAT="qcow2")
    wait_for(lambda: os.path.exists(a.view()) and os.path.exists(b.view()),
             what="the volume in both mounts")
    dev_a = a("attach")[1].strip()
    a("open", VOL_OPEN_EXCLUSIVE="True")
    # attach tells A's device from one over B's view by the kernel's numbers, not the
    # path (nodes in mount namespaces see one path for two files).
    assert backs(dev_a, os.stat(a.view())) and not backs(dev_a, os.stat(b.view()))
    written = {}

    def write(dev, offset, seed):
        data = bytes([seed]) * 4096 + os.urandom(60 * 1024)
        pwrite_dev(dev, offset, data)
        written[offset] = data

    for i in range(8):                              # allocates clusters and L2 tables
        write(dev_a, i * 16 * MiB, i + 1)
    # Another node cannot take the volume while A writes it alone.
    _, _, err = b("open", VOL_OPEN_EXCLUSIVE="True", check=1)
    assert "n1" in err and VOL in err
    assert b.lease() == "none"

    b("close")                                     # Ganeti's first step: attaches B
    dev_b = b("attach")[1].strip()
    a("open", VOL_OPEN_EXCLUSIVE="False")
    b("open", VOL_OPEN_EXCLUSIVE="False")
    assert (a.lease(), b.lease()) == ("shared", "shared")
    # The guest still runs on A: A allocates more (B's view of the tables is now old).
    for i in range(8, 12):
        write(dev_a, i * 16 * MiB, i + 1)
    # The guest resumes on B before Ganeti closes A: B reads A's last writes and
    # allocates clusters of its own without reusing A's.
    for off, data in written.items():
        assert pread_dev(dev_b, off, len(data)) == data
    for i in range(12, 14):
        write(dev_b, i * 16 * MiB + 64 * 1024, i + 1)
    write(dev_b, 0, 99)                             # overwrite A's first cluster
    a("close")
    b("open", VOL_OPEN_EXCLUSIVE="True")
    assert (a.lease(), b.lease()) == ("none", "exclusive")
    holder = leases.holder(store.state_dir("leases"), VOL, "sda", store.load(VOL).disks[0].path)
    assert holder["node"] == "n2"
    for i in range(14, 16):
        write(dev_b, i * 16 * MiB, i + 1)
    with pytest.raises(OSError):                    # A is fenced off
        pwrite_dev(dev_a, 200 * MiB, b"z" * 4096)
    a("detach")
    for off, data in written.items():
        assert pread_dev(dev_b, off, len(data)) == data, off
    b("close")
    b("detach")
    path = store.load(VOL).disks[0].path
    qemu_img_check(path)
    with open(path + ".raw", "wb"):
        pass
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, path + ".raw"],
                   check=True)
    with open(path + ".raw", "rb") as f:
        for off, data in written.items():
            f.seek(off)
            assert f.read(len(data)) == data, off
    os.unlink(path + ".raw")
    a("remove")


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshot_is_a_sparse_copy_removed_by_remove(store, nodes, fmt):
    n = nodes()
    n("create", VOL_SIZE=1024, EXTP_FORMAT=fmt)
    n("setinfo", VOL_METADATA="originstname+inst1")
    dev = n("attach")[1].strip()
    n("open", VOL_OPEN_EXCLUSIVE="True")
    data = os.urandom(2 * MiB)
    # Not flushed: a qcow2 volume's new tables are in the daemon's cache only.
    pwrite_dev(dev, 300 * MiB, data, flush=False)
    # Open for writing on another node: no point in time to copy.
    other = nodes()
    other("attach")
    _, _, err = other("snapshot", VOL_SNAPSHOT_NAME=VOL + ".snap", VOL_SNAPSHOT_SIZE=1024,
                      check=1)
    assert "while it is written" in err and "n1" in err
    other("detach")
    assert store.instances() == [VOL]
    # Ganeti's export stops the guest, leaves the disk open here, snapshots.
    n("snapshot", VOL_SNAPSHOT_NAME=VOL + ".snap", VOL_SNAPSHOT_SIZE=1024)
    snap = store.load(VOL + ".snap")
    assert snap.ganeti == "originstname+inst1" and snap.disks[0].size == 1024 * MiB
    assert snap.disks[0].format == fmt
    assert os.stat(snap.disks[0].path).st_blocks * 512 < 3 * MiB   # sparse
    if fmt == "qcow2":
        qemu_img_check(snap.disks[0].path)
    sdev = n("attach", VOL + ".snap")[1].strip()
    n("open", VOL + ".snap", VOL_OPEN_EXCLUSIVE="True")
    assert pread_dev(sdev, 300 * MiB, len(data)) == data
    assert pread_dev(sdev, 0, MiB) == bytes(MiB)
    n("detach", VOL + ".snap")
    n("remove", VOL + ".snap")
    assert store.instances() == [VOL]
    n("detach")
    n("remove")


@pytest.fixture
def reflink_store(tmp_path):
    """A store on XFS with reflinks: a filesystem in a loop-mounted file."""
    from conftest import GiB
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(2 * GiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            (mnt / "store").mkdir()
            yield Store(str(mnt / "store"), whitelist_file=str(tmp_path / "file-storage-paths"))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshot_on_a_reflink_store_is_a_point_in_time_while_the_guest_writes(
        reflink_store, tmp_path, fmt):
    """`gnt-backup export --noshutdown`: the guest writes on while its disk is
    snapshotted. On XFS the daemon makes a reflink copy between two requests,
    so the snapshot holds exactly the writes up to some point: the guest's
    writes land in random order, each block once, stamped with its sequence
    number, and the snapshot must hold writes 0..K-1 and no other (K at least
    the writes answered before the snapshot began). A copy made while the
    guest writes held later writes without some earlier ones."""
    import random
    import struct
    import threading
    n = Node(reflink_store, tmp_path, "n1")
    try:
        n("create", VOL_SIZE=256, EXTP_FORMAT=fmt)
        dev = n("attach")[1].strip()
        n("open", VOL_OPEN_EXCLUSIVE="True")
        blocks = random.Random(7).sample(range(256 * MiB // 4096), 256 * MiB // 4096)
        answered = 0
        stop = threading.Event()

        def guest():
            nonlocal answered
            fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            try:
                for seq, block in enumerate(blocks):
                    if stop.is_set():
                        return
                    buf[:] = struct.pack(">QQ", seq + 1, block) * 256
                    assert os.pwritev(fd, [buf], block * 4096) == 4096
                    answered = seq + 1
            finally:
                os.close(fd)

        writer = threading.Thread(target=guest)
        writer.start()
        try:
            wait_for(lambda: answered >= 3000, what="the guest's first writes")
            before = answered
            n("snapshot", VOL_SNAPSHOT_NAME=VOL + ".snap", VOL_SNAPSHOT_SIZE=256)
            after = answered
            wait_for(lambda: answered >= after + 500, what="the guest to write on")
        finally:
            stop.set()
            writer.join()
        snap = reflink_store.load(VOL + ".snap").disks[0]
        if fmt == "qcow2":
            qemu_img_check(snap.path)
        sdev = n("attach", VOL + ".snap")[1].strip()
        n("open", VOL + ".snap", VOL_OPEN_EXCLUSIVE="True")
        seqs = set()
        for off in range(0, 256 * MiB, 4 * MiB):
            data = pread_dev(sdev, off, 4 * MiB)
            for at in range(0, len(data), 4096):
                seq, block = struct.unpack_from(">QQ", data, at)
                if seq:
                    assert block == (off + at) // 4096 and seq <= len(blocks)
                    seqs.add(seq)
        k = len(seqs)
        assert seqs == set(range(1, k + 1)), (
            f"not a point in time: {k} writes, the latest {max(seqs)}, answered before "
            f"{before}, after {after}")
        assert before <= k <= after + 1
        n("detach", VOL + ".snap")
        n("remove", VOL + ".snap")
        # Stopped and detached: the provider clones it itself, sharing every block.
        n("detach")
        st = os.statvfs(reflink_store.root)
        n("snapshot", VOL_SNAPSHOT_NAME=VOL + ".snap", VOL_SNAPSHOT_SIZE=256)
        used = (st.f_bfree - os.statvfs(reflink_store.root).f_bfree) * st.f_frsize
        assert used < MiB and 4096 * k > 8 * MiB, used          # no data block copied
        snap = reflink_store.load(VOL + ".snap").disks[0].path
        vol = reflink_store.load(VOL).disks[0].path
        assert subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, vol, snap],
                              capture_output=True).returncode == 0
        n("remove", VOL + ".snap")
        n("remove")
    finally:
        n.stop()


@pytest.mark.fuse
@pytest.mark.root
def test_clone_to_takes_only_an_empty_file_inside_the_store(store, nodes, tmp_path):
    """user.vbdfs.clone_to names a file the daemon (root) writes: one outside
    the store, or one with contents, is refused and left as it was; where the
    store has no reflinks (ext4 here) the answer is EOPNOTSUPP."""
    import errno
    n = nodes()
    n("create", VOL_SIZE=64)
    n("attach")
    n("open", VOL_OPEN_EXCLUSIVE="True")
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    full = os.path.join(store.root, "full")
    with open(full, "wb") as f:
        f.write(b"keep")
    empty = os.path.join(store.root, "empty")
    open(empty, "wb").close()
    for target, code in ((str(outside), errno.EINVAL), (full, errno.EEXIST),
                         (os.path.join(store.root, "missing"), errno.EINVAL),
                         (empty, errno.EOPNOTSUPP)):
        with pytest.raises(OSError) as e:
            os.setxattr(n.view(), "user.vbdfs.clone_to", target.encode())
        assert e.value.errno == code, target
    assert outside.read_bytes() == b"" and open(full, "rb").read() == b"keep"
    assert os.path.getsize(empty) == 0
    n("detach")
    n("remove")


@pytest.mark.fuse
@pytest.mark.root
def test_an_import_of_zeros_stays_sparse(store, nodes):
    """Ganeti's import streams the whole disk, zeros included (dd to the device)."""
    n = nodes()
    n("create", VOL_SIZE=256)
    dev = n("attach")[1].strip()
    n("open", VOL_OPEN_EXCLUSIVE="True")
    src = os.path.join(os.path.dirname(store.root), "image")
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(os.urandom(4 * MiB))
    subprocess.run(["dd", f"if={src}", f"of={dev}", "bs=1M", "oflag=direct", "status=none"],
                   check=True)
    allocated = os.stat(store.load(VOL).disks[0].path).st_blocks * 512
    assert 4 * MiB <= allocated <= 4 * MiB + 4 * MiB // 100 + MiB
    n("detach")
    n("remove")


# --- the scripts as noded runs them --------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("action", ["lease", "grow open", "grow closed"])
def test_a_lease_move_or_a_grow_holds_up_no_other_disk(store, nodes, tmp_path, action):
    """A lease move to exclusive, or a grow, opens the image writable: a dirty
    qcow2 has its refcounts rebuilt then (here ~1 s). The daemon does it in a
    thread, so another disk's reads go on meanwhile; done in the request
    loop, they stopped for all of it."""
    n = nodes()
    n("create", VOL_SIZE=128, EXTP_FORMAT="qcow2")
    make_instance(store, "other", MiB)
    wait_for(lambda: os.path.exists(n.view()) and os.path.exists(n.mount.disk("other")),
             what="the disks in the mount")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(128 * MiB))
    path = store.load(VOL).disks[0].path
    os.unlink(path)
    make_dirty_qcow2(src, path)

    # Opened for writing, a Ganeti volume serves a cold image until its open
    # script sets the lease (its reads open it read-only: no repair yet).
    held = os.open(n.view(), os.O_RDWR) if action != "grow closed" else None
    try:
        with reads_meanwhile(n.mount.disk("other")) as stamps:
            started = time.monotonic()
            if action == "lease":
                os.setxattr(n.view(), "user.vbdfs.lease", b"exclusive")
            else:
                n("grow", VOL_SIZE=128, VOL_NEW_SIZE=160)
            ended = time.monotonic()
            time.sleep(0.1)
            if action == "lease":
                assert n.lease() == "exclusive"
    finally:
        if held is not None:
            with open(src, "rb") as f:
                assert os.pread(held, 4096, 0) == f.read(4096)
            os.close(held)
    assert "refcounts rebuilt" in n.mount.output()
    assert_reads_went_on(stamps, started, ended, action)
    qemu_img_check(path)
    info = json.loads(qemu_img("info", "--output", "json", path).stdout)
    assert info["virtual-size"] == (128 if action == "lease" else 160) * MiB


@pytest.mark.fuse
@pytest.mark.root
def test_installed_scripts_run_like_noded(store, nodes, tmp_path):
    n = nodes()
    provider = tmp_path / "extstorage" / "vbdfs"
    ctl = vbdctl_runner(store)
    listed = ctl("ganeti-install", "--dir", str(provider), "--config", n.config,
                 check=0).stdout.split()
    assert sorted(os.path.basename(p) for p in listed) == sorted(
        list(ganeti.ACTIONS) + ["parameters.list"])
    assert (provider / "parameters.list").read_text() == \
        "format image format of the volume: raw or qcow2 (default raw)\n"
    for action in ganeti.ACTIONS:
        assert os.access(provider / action, os.X_OK)
    log = tmp_path / "calls.log"

    def script(action, check=0, **extra):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VOL_NAME": VOL,
               "EXTP_PROVIDER": "vbdfs", "EXTP_ACCESS": "kernelspace",
               "VBDFS_GANETI_LOG": str(log), **{k: str(v) for k, v in extra.items()}}
        r = subprocess.run([str(provider / action)], cwd=provider, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == check, (action, r.stdout, r.stderr)
        return r

    script("create", VOL_SIZE=32, EXTP_FORMAT="qcow2")
    device = script("attach").stdout
    times = []
    for _ in range(5):                             # attached already: fast, the same device
        started = time.monotonic()
        assert script("attach").stdout == device
        times.append(time.monotonic() - started)
    print(f"attach of an attached volume, through the shim: "
          f"{sorted(times)[2] * 1000:.0f} ms (median of 5)")
    script("open", VOL_OPEN_EXCLUSIVE="True")
    script("close")
    r = script("create", check=1, VOL_SIZE=32, EXTP_FORMAT="vmdk", VOL_NAME="2222.ext.disk0")
    assert r.stdout == "" and r.stderr.count("\n") == 1 and "2222.ext.disk0" in r.stderr
    script("detach")
    script("remove")
    assert store.instances() == []
    assert loops_backed_by(n.mount.path + "/") == {}
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [c[1] for c in calls] == ["create"] + ["attach"] * 6 + ["open", "close", "create",
                                                                    "detach", "remove"]
    assert [c[2] for c in calls].count("2222.ext.disk0") == 1
    assert [c[-1] for c in calls].count("exit=1") == 1 and calls[9][-1] == "exit=1"


def test_loop_list_skips_a_device_that_vanishes_while_read(tmp_path):
    """Regression: sysfs answers ENODEV for a loop device being torn down (another
    node's test, a detach); attach's listing then failed the Ganeti open."""
    from vbdfs.operations.loops import loop_list
    (tmp_path / "loop0" / "loop" / "backing_file").mkdir(parents=True)   # reads fail: EISDIR
    (tmp_path / "loop1" / "loop").mkdir(parents=True)
    (tmp_path / "loop1" / "loop" / "backing_file").write_text("/x/y\n")
    (tmp_path / "loop1" / "ro").write_text("0\n")
    assert loop_list(str(tmp_path)) == [("/dev/loop1", "/x/y", False)]
