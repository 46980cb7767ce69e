"""Write leases: one writer per image, between vbdfs daemons and with qemu."""

import errno
import os
import signal
import subprocess

import pytest

from conftest import MiB, make_instance, wait_for
from vbdfs.store import leases


def test_lease_excludes_a_second_writer(tmp_path):
    img = tmp_path / "disk"
    img.write_bytes(bytes(MiB))
    state = str(tmp_path / "state")
    lease = leases.acquire(str(img), state, "web", "sda", "node1")
    assert leases.is_write_locked(str(img))
    with pytest.raises(leases.LeaseBusy, match="node node1"):
        leases.acquire(str(img), state, "web", "sda", "node2")   # another open, same process
    rec = leases.holder(state, "web", "sda", str(img))
    assert rec["node"] == "node1" and rec["pid"] == os.getpid()
    lease.release()
    assert not leases.is_write_locked(str(img))
    assert leases.holder(state, "web", "sda", str(img)) is None
    leases.acquire(str(img), state, "web", "sda", "node2").release()


def qemu_io_write(path):
    return subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", path],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.fuse
@pytest.mark.root
def test_qemu_refuses_an_image_vbdfs_writes(store, mounted):
    make_instance(store, "web", 16 * MiB)
    backing = os.path.join(store.root, "web", "sda")
    fd = os.open(mounted.disk("web"), os.O_RDWR)
    try:
        r = qemu_io_write(backing)
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stdout + r.stderr
    finally:
        os.close(fd)
    wait_for(lambda: not leases.is_write_locked(backing), what="the lease to end")
    r = qemu_io_write(backing)          # the lease ended with the last close
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.fuse
@pytest.mark.root
def test_vbdfs_refuses_an_image_qemu_writes(store, mounted, tmp_path):
    make_instance(store, "web", 16 * MiB)
    backing = os.path.join(store.root, "web", "sda")
    export = tmp_path / "export"
    export.touch()
    qsd = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f0,filename={backing}",
        "--blockdev", "driver=raw,node-name=r0,file=f0",
        "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={export},writable=on"])
    try:
        wait_for(lambda: os.path.ismount(export), what="the qemu-storage-daemon export")
        with pytest.raises(OSError) as e:
            os.open(mounted.disk("web"), os.O_RDWR)
        assert e.value.errno == errno.EBUSY
        with open(mounted.disk("web"), "rb") as f:     # reading is still allowed
            assert f.read(4) == bytes(4)
        assert "not opened for writing" in mounted.output()
    finally:
        qsd.send_signal(signal.SIGTERM)
        qsd.wait(timeout=30)
    wait_for(lambda: not leases.is_write_locked(backing), what="qemu's locks to end")
    os.close(os.open(mounted.disk("web"), os.O_RDWR))  # free again


@pytest.mark.fuse
@pytest.mark.root
def test_two_nodes_one_store(store, mount):
    make_instance(store, "web", 16 * MiB)
    node1 = mount(["-o", "node=node1"])
    node2 = mount(["-o", "node=node2"])
    fd = os.open(node1.disk("web"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.open(node2.disk("web"), os.O_RDWR)
        assert e.value.errno == errno.EBUSY
        assert "vbdfs on node node1" in node2.output()
        rec = leases.holder(store.state_dir("leases"), "web", "sda",
                            os.path.join(store.root, "web", "sda"))
        assert rec["node"] == "node1" and rec["pid"] == node1.proc.pid
    finally:
        os.close(fd)
    # The kernel sends FUSE's RELEASE after close() returns: the lease ends just after.
    backing = os.path.join(store.root, "web", "sda")
    wait_for(lambda: not leases.is_write_locked(backing), what="node1's lease to end")
    fd = os.open(node2.disk("web"), os.O_RDWR)        # node1 closed: node2 may write
    os.close(fd)


@pytest.mark.fuse
@pytest.mark.root
def test_killed_daemon_loses_its_leases(store, mount):
    make_instance(store, "web", 16 * MiB)
    node1 = mount(["-o", "node=node1"])
    node2 = mount(["-o", "node=node2"])
    backing = os.path.join(store.root, "web", "sda")
    # A child holds the disk open for writing through node1, as a loop device would.
    holder = subprocess.Popen(["python3", "-c", "import os,sys,time; "
                               f"fd=os.open({node1.disk('web')!r}, os.O_RDWR); "
                               "print('open', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert leases.is_write_locked(backing)
        node1.proc.send_signal(signal.SIGKILL)
        node1.proc.wait(timeout=30)
        wait_for(lambda: not leases.is_write_locked(backing), what="node1's locks to vanish")
        assert leases.holder(store.state_dir("leases"), "web", "sda", backing) is None
        fd = os.open(node2.disk("web"), os.O_RDWR)
        os.pwrite(fd, b"node2 now", 0)
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_vbdctl_operations_respect_a_write_lease(store, tmp_path):
    """A writer anywhere (here: a lease held in this process, as another node's
    daemon would) stops grow, convert and remove, and says who writes."""
    from vbdfs.operations import convert, inuse
    from vbdfs.store import StoreError
    make_instance(store, "web", 16 * MiB, fmt="qcow2")
    backing = os.path.join(store.root, "web", "sda")
    before = open(backing, "rb").read()
    lease = leases.acquire(backing, store.state_dir("leases"), "web", "sda", "node7")
    try:
        reasons = [r for _, r in inuse.users(store, store.load("web"), None, "here")]
        assert any("written by vbdfs on node node7" in r for r in reasons), reasons
        with pytest.raises(StoreError, match="node node7"):
            store.grow("web", "sda", growth=MiB)
        with pytest.raises(StoreError, match="node node7"):
            convert.convert_disk(store, "web", "sda", "raw")
        with pytest.raises(StoreError, match="written by vbdfs on node node7"):
            store.remove("web", check=inuse.refuse_if_used(store, None, "here", "remove"))
        from vbdfs.operations import transfer
        with pytest.raises(StoreError, match="node node7"):
            transfer.export_instance(store, "web", str(tmp_path))
        assert os.listdir(tmp_path) == ["store"]          # no export left behind
    finally:
        lease.release()
    assert open(backing, "rb").read() == before
    assert store.load("web").disks[0].size == 16 * MiB
    store.grow("web", "sda", growth=MiB)                  # free again
    assert store.load("web").disks[0].size == 17 * MiB
    assert not leases.is_write_locked(backing)            # grow let go of its lease


def test_interrupted_convert_is_refused_not_served(store):
    from vbdfs.store import ManifestError
    from vbdfs.store.store import CONVERT_JOURNAL
    make_instance(store, "web", MiB)
    journal = os.path.join(store.instance_dir("web"), CONVERT_JOURNAL)
    open(journal, "w").write(open(store.manifest_path("web")).read())
    with pytest.raises(ManifestError, match="convert of this instance was interrupted"):
        store.load("web")
    os.unlink(journal)
    assert store.load("web").name == "web"
