"""vbdfs as a Ganeti ExtStorage provider, judged by a real Ganeti 3.0 cluster.

Each node of the cluster runs in its own namespaces (tests/ganeti_cluster.py) with
Ganeti's daemons, the `fake` hypervisor and a vbdfs daemon; every step here is a gnt-*
command run on the master, as an administrator would type it. The data checks go
around Ganeti: the loop devices Ganeti reports (global, so the test opens them
directly), the nodes' vbdfs mounts and the store's files (through /proc/PID/root), and
qemu-img as the judge of qcow2 images.

The two nodes share one store the way two hosts would: a GlusterFS volume (served from
node1's namespaces), mounted by each node's own client at the same path over the nodes'
network, so each node's vbdfs reads, writes and locks through its own client.

Every Ganeti command and the provider calls it caused (the provider's call log on each
node) are journalled; set VBDFS_GANETI_JOURNAL=FILE to keep the journal.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess

import pytest

from conftest import MiB, wait_for
from ganeti_cluster import EXTSTORAGE_DIR, MOUNTPOINT, Cluster
from test_failover_gluster import CONSISTENCY_OPTIONS

pytestmark = [pytest.mark.ganeti, pytest.mark.root, pytest.mark.fuse]

GNT_ADD = ("gnt-instance", "add", "-t", "ext", "-o", "noop", "--no-ip-check",
           "--no-name-check", "-B", "memory=64", "--no-wait-for-sync")


def needs_ganeti():
    if shutil.which("gnt-cluster") is None or not os.path.isdir("/usr/share/ganeti/os/noop"):
        pytest.fail("Ganeti is not installed (tools/setup installs ganeti and ganeti-os-noop)")


@pytest.fixture(scope="session")
def journal():
    """Every cluster's journal, written to $VBDFS_GANETI_JOURNAL at the end if set."""
    texts = []
    yield texts
    path = os.environ.get("VBDFS_GANETI_JOURNAL")
    if path:
        with open(path, "w") as f:
            f.write("\n".join(texts))


def make_cluster(tmp_path_factory, journal, node_count: int, mount_store=None):
    needs_ganeti()
    workdir = str(tmp_path_factory.mktemp(f"ganeti{node_count}"))
    store = os.path.join(workdir, "store")
    os.mkdir(store)
    cluster = Cluster(workdir, node_count)
    cluster.store = store
    try:
        cluster.start(store, mount_store)
        yield cluster
    finally:
        journal.append(f"# {node_count}-node cluster\n" + cluster.journal_text())
        cluster.stop()


# -- looking at instances, the store and the nodes ----------------------------------------

def disks_of(cluster: Cluster, name: str) -> list[tuple[str, str | None]]:
    """[(volume name, device on the primary or None)] per disk, from gnt-instance info.

    Slow (Ganeti attaches every disk to answer): tests find a volume's device with
    Node.loop_device_of, and ask Ganeti once in a while that it agrees.
    """
    info = cluster.gnt("gnt-instance", "info", name).stdout
    vols = re.findall(r"logical_id: \['vbdfs', '([^']+)'\]", info)
    devs = [None if d == "None" else d.split()[0]
            for d in re.findall(r"on primary: (.*)", info)]
    assert len(vols) == len(devs) and vols, info
    return list(zip(vols, devs))


def ganeti_agrees(cluster: Cluster, name: str, node) -> None:
    """Ganeti's devices for the instance are the loop devices over node's mount."""
    for vol, dev in disks_of(cluster, name):
        assert dev == node.loop_device_of(vol), (vol, dev)


def primary_of(cluster: Cluster, name: str) -> str:
    return cluster.gnt("gnt-instance", "list", "--no-headers", "-o", "pnode",
                       name).stdout.strip()


def store_files(cluster: Cluster) -> list[str]:
    """Every file under the store (as node1 sees it), relative, but the per-instance
    lock files (empty, kept by design: see test_cli_instances)."""
    root = cluster.nodes[0].host_path(cluster.store)
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if not rel.startswith(".vbdfs/locks/"):
                out.append(rel)
    return sorted(out)


def disk_on(node, vol: str) -> str:
    """The volume's disk in node's vbdfs mount, as the host reaches it."""
    return node.host_path(f"{MOUNTPOINT}/{vol}/sda")


def backing_file(cluster: Cluster, vol: str) -> str:
    return cluster.nodes[0].host_path(f"{cluster.store}/{vol}/sda")


def lease_modes(cluster: Cluster, vol: str) -> dict[str, str]:
    """Each node's write lease on the volume, as its vbdfs mount reports it."""
    return {n.short: os.getxattr(disk_on(n, vol), "user.vbdfs.lease").decode()
            for n in cluster.nodes}


def write_locked(image: str) -> bool:
    """Does anyone hold a writer's lock on the image file? (qemu's lock layout: byte 101
    is the write permission; a test for an exclusive lock there finds any writer.)"""
    fd = os.open(image, os.O_RDONLY)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 101, 1, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, lock)
        return struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def blockdev_size(dev: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                              text=True, check=True).stdout)


def write_at(dev: str, offset: int, data: bytes) -> None:
    """Write and fsync through a device: acknowledged once this returns."""
    fd = os.open(dev, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def no_loop_devices(cluster: Cluster) -> bool:
    return all(not n.loop_devices() for n in cluster.nodes)


# == one node ==================================================================================

@pytest.fixture(scope="module")
def one_node(tmp_path_factory, journal):
    """One cluster for TestOneNode and TestKvm (cluster init is the slow part)."""
    yield from make_cluster(tmp_path_factory, journal, 1)


@pytest.fixture(scope="class")
def two_nodes(tmp_path_factory, journal):
    """Two nodes, each with its own GlusterFS client of one volume as the store, at the
    same path (test_failover_gluster's layout). node1 also serves the volume, from its
    own namespaces (so a glusterd on the host, or another test's, is no obstacle)."""
    if shutil.which("glusterd") is None or shutil.which("mount.glusterfs") is None:
        pytest.fail("GlusterFS is not installed (tools/setup installs glusterfs-server "
                    "and glusterfs-client)")
    source = []

    def mount_store(node, path):
        if not source:
            brick = os.path.join(os.path.dirname(path), "brick")
            os.mkdir(brick)
            source.append(node.serve_glusterfs("vbdfs", brick, CONSISTENCY_OPTIONS))
        node.mount("-t", "glusterfs", source[0], target=path)
    yield from make_cluster(tmp_path_factory, journal, 2, mount_store)


class TestOneNode:
    @pytest.fixture
    def cluster(self, one_node):
        yield one_node
        one_node.remove_all_instances()

    def test_diagnose_reports_the_provider_valid(self, cluster):
        out = cluster.gnt("gnt-storage", "diagnose").stdout
        assert "Provider: vbdfs" in out
        assert re.search(r"status: valid \(path: /srv/ganeti/extstorage/vbdfs\) "
                         r"\[parameters: [^]]*format", out), out
        assert "invalid" not in out

    def test_lifecycle_raw_and_qcow2_disks(self, cluster):
        """add (two disks), shutdown, startup, grow while running, remove."""
        node = cluster.master
        before = store_files(cluster)
        cluster.gnt(*GNT_ADD, "-n", node.name,
                    "--disk", "0:size=64M,provider=vbdfs,format=qcow2",
                    "--disk", "1:size=32M,provider=vbdfs,format=raw", "life")
        (qvol, qdev), (rvol, rdev) = disks_of(cluster, "life")
        for vol, dev, fmt, size in ((qvol, qdev, "qcow2", 64 * MiB),
                                    (rvol, rdev, "raw", 32 * MiB)):
            assert dev and dev.startswith("/dev/loop"), dev
            assert blockdev_size(dev) == size
            assert os.stat(disk_on(node, vol)).st_size == size
            info = qemu_img("info", "-U", "--output=json", backing_file(cluster, vol))
            assert f'"format": "{fmt}"' in info.stdout, info.stdout + info.stderr
            assert lease_modes(cluster, vol) == {node.short: "exclusive"}
        assert set(node.loop_devices()) == {qdev, rdev}

        # Data written now survives a stop and start.
        data = random.Random(1).randbytes(MiB)
        write_at(qdev, 3 * MiB, data)
        cluster.gnt("gnt-instance", "shutdown", "--timeout=0", "life")
        assert node.loop_devices() == []
        assert lease_modes(cluster, qvol) == {node.short: "none"}
        cluster.gnt("gnt-instance", "startup", "life")
        qdev, rdev = node.loop_device_of(qvol), node.loop_device_of(rvol)
        assert read_at(qdev, 3 * MiB, MiB) == data

        # Grow while running: the image, the mount and the loop device all see it.
        assert cluster.gnt("gnt-instance", "list", "--no-headers", "-o", "status",
                           "life").stdout.strip() == "running"
        cluster.gnt("gnt-instance", "grow-disk", "life", "0", "32M")
        cluster.gnt("gnt-instance", "grow-disk", "life", "1", "16M")
        for vol, dev, size in ((qvol, qdev, 96 * MiB), (rvol, rdev, 48 * MiB)):
            assert os.stat(disk_on(node, vol)).st_size == size
            assert blockdev_size(dev) == size
        info = qemu_img("info", "-U", "--output=json", backing_file(cluster, qvol)).stdout
        assert f'"virtual-size": {96 * MiB}' in info
        write_at(qdev, 95 * MiB, data)            # the new space is usable at once
        assert read_at(disk_on(node, qvol), 95 * MiB, MiB) == data
        assert cluster.gnt("gnt-instance", "list", "--no-headers", "-o", "disk.sizes",
                           "life").stdout.strip() == "96,48"

        cluster.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", "life")
        assert store_files(cluster) == before
        assert node.loop_devices() == []

    @pytest.mark.parametrize("fmt", ["raw", "qcow2"])
    def test_export_and_import(self, cluster, fmt):
        """gnt-backup export then import: the same bytes, and the import stays sparse."""
        node = cluster.master
        before = store_files(cluster)
        name, copy = f"exp-{fmt}", f"imp-{fmt}"
        cluster.gnt(*GNT_ADD, "-n", node.name,
                    "--disk", f"0:size=16M,provider=vbdfs,format={fmt}", name)
        [(vol, dev)] = disks_of(cluster, name)
        rng = random.Random(fmt)
        data_bytes = 0
        for offset, length in ((0, MiB), (6 * MiB + 4096, 2 * MiB), (16 * MiB - 4096, 4096)):
            write_at(dev, offset, rng.randbytes(length))
            data_bytes += length
        digest = sha256_of(dev)

        cluster.gnt("gnt-backup", "export", "-n", node.name, "--shutdown-timeout=0", name)
        # export stops the instance for its snapshot and starts it again
        ganeti_agrees(cluster, name, node)
        dev = node.loop_device_of(vol)
        assert cluster.gnt("gnt-instance", "list", "--no-headers", "-o", "status",
                           name).stdout.strip() == "running"
        assert sha256_of(dev) == digest
        cluster.gnt("gnt-backup", "import", "-t", "ext", "-n", node.name,
                    "--disk", f"0:size=16M,provider=vbdfs,format={fmt}",
                    f"--src-node={node.name}", f"--src-dir=/var/lib/ganeti/export/{name}",
                    "--net", "0:mac=generate",        # the original still has its MAC
                    "--no-ip-check", "--no-name-check", copy)
        [(ivol, idev)] = disks_of(cluster, copy)
        assert ivol != vol
        assert sha256_of(idev) == digest
        # Imported through Ganeti (dd of every byte, zeros included): still sparse.
        allocated = os.stat(backing_file(cluster, ivol)).st_blocks * 512
        assert abs(allocated - data_bytes) <= data_bytes // 100 + MiB, (allocated, data_bytes)
        # The snapshot the export read is gone again.
        assert not [f for f in store_files(cluster) if ".snap" in f]

        for n in (name, copy):
            cluster.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", n)
        assert store_files(cluster) == before
        assert node.loop_devices() == []

    def test_attach_as_noded_runs_it_is_idempotent(self, cluster):
        """The attach script run the way noded runs it (no arguments, cwd the provider
        directory, noded's environment plus Ganeti's variables), again and again on an
        attached volume: the same device each time and nothing new attached. The
        wall times, script start-up included, go to the journal."""
        node = cluster.master
        cluster.gnt(*GNT_ADD, "-n", node.name,
                    "--disk", "0:size=16M,provider=vbdfs,format=qcow2", "att")
        [(vol, dev)] = disks_of(cluster, "att")
        loops = node.loop_devices()
        for access, expected in (("kernelspace", [dev]),
                                 ("userspace", [dev, f"kvm:{MOUNTPOINT}/{vol}/sda"])):
            env = {"VOL_NAME": vol, "EXTP_PROVIDER": "vbdfs", "EXTP_ACCESS": access,
                   "EXTP_FORMAT": "qcow2"}
            times = []
            for _ in range(10):
                r = node.run("bash", "-c", f"cd {EXTSTORAGE_DIR}/vbdfs && "
                             "s=$(date +%s%N) && ./attach && e=$(date +%s%N) && "
                             "echo $(( (e - s) / 1000 )) >&2", env=env)
                assert r.stdout.splitlines() == expected, r.stdout
                times.append(int(r.stderr.split()[-1]) / 1000)
            cluster.note(f"attach ({access}) run as noded runs it, 10 times on an attached "
                         f"volume: ms min {min(times):.1f} median {sorted(times)[5]:.1f} "
                         f"max {max(times):.1f}", sum(times) / 1000)
        assert node.loop_devices() == loops

    @pytest.mark.parametrize("disks", [
        ["0:size=16M,provider=vbdfs,format=vmdk"],
        # Ganeti creates disk 0, then rolls it back (detach, remove) when disk 1 fails.
        ["0:size=16M,provider=vbdfs,format=qcow2", "1:size=16M,provider=vbdfs,format=vmdk"],
    ], ids=["one-disk", "second-disk"])
    def test_unknown_format_is_refused_and_leaves_nothing(self, cluster, disks):
        node = cluster.master
        before = store_files(cluster)
        r = cluster.gnt(*GNT_ADD, "-n", node.name,
                        *[arg for d in disks for arg in ("--disk", d)], "bad", check=False)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        # The provider's one line, shown by Ganeti: the bad value and the good ones.
        assert re.search(r"format.*vmdk.*raw.*qcow2", out), out
        assert "bad" not in cluster.gnt("gnt-instance", "list", "--no-headers",
                                        "-o", "name").stdout.split()
        assert store_files(cluster) == before
        assert node.loop_devices() == []


# == KVM: Ganeti's kvm hypervisor on a vbdfs qcow2 volume ======================================

# A boot sector: writes the 26 bytes after its code to the boot disk's second sector
# through the BIOS (int 13h, AH=03h), then halts. Seen there, the guest booted from the
# volume (a qcow2 image that qemu reads as raw, through vbdfs) and wrote to it.
KVM_MARKER = b"VBDFS-KVM-BOOTED-AND-WROTE"
BOOT_CODE = bytes.fromhex(
    "31c0"      # xor ax, ax
    "8ed8"      # mov ds, ax
    "8ec0"      # mov es, ax
    "b80103"    # mov ax, 0x0301: write one sector
    "b90200"    # mov cx, 0x0002: cylinder 0, sector 2
    "b600"      # mov dh, 0: head 0 (dl: the boot drive, from the BIOS)
    "bb167c"    # mov bx, 0x7c16: from the marker below
    "cd13"      # int 0x13
    "f4"        # hlt
    "ebfd")     # jmp hlt
BOOT_SECTOR = (BOOT_CODE + KVM_MARKER).ljust(510, b"\0") + b"\x55\xaa"
assert len(BOOT_CODE) == 0x16


def kvm_or_skip() -> None:
    """Skip, saying why, where Ganeti's kvm hypervisor cannot run a guest here."""
    if shutil.which("kvm") is None:
        pytest.skip("KVM cannot run: no kvm binary (tools/setup installs qemu-system-x86)")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        pytest.skip(f"KVM cannot run: /dev/kvm: {e.strerror}")
    try:
        import fcntl
        version = fcntl.ioctl(fd, 0xAE00)              # KVM_GET_API_VERSION
    except OSError as e:
        pytest.skip(f"KVM cannot run: KVM_GET_API_VERSION on /dev/kvm: {e.strerror}")
    finally:
        os.close(fd)
    if version != 12:
        pytest.skip(f"KVM cannot run: /dev/kvm speaks API {version}, not 12")


class TestKvm:
    @pytest.fixture
    def cluster(self, one_node):
        kvm_or_skip()
        # Boot from the disk: no kernel, no VNC, no serial console.
        one_node.gnt("gnt-cluster", "modify", "--enabled-hypervisors=fake,kvm",
                     "-H", "kvm:kernel_path=,initrd_path=,vnc_bind_address=,serial_console=false")
        yield one_node
        one_node.remove_all_instances()
        one_node.gnt("gnt-cluster", "modify", "--enabled-hypervisors=fake")

    @pytest.mark.parametrize("access", ["kernelspace", "userspace"])
    def test_kvm_guest_boots_from_a_qcow2_volume(self, cluster, access):
        node = cluster.master
        before = store_files(cluster)
        name = f"kvm-{access}"
        cluster.gnt(*GNT_ADD, "-H", "kvm", "--no-nics", "--no-start", "-n", node.name,
                    "--disk", f"0:size=16M,provider=vbdfs,format=qcow2,access={access}", name)
        [(vol, _)] = disks_of(cluster, name)
        out = cluster.gnt("gnt-instance", "activate-disks", name).stdout
        dev = out.strip().rsplit(":", 1)[1]
        assert dev == node.loop_device_of(vol), out
        write_at(dev, 0, BOOT_SECTOR)
        cluster.gnt("gnt-instance", "startup", name)

        pids = node.run("pgrep", "-f", f"^/usr/bin/kvm -name {name} ").stdout.split()
        assert len(pids) == 1, pids
        cmdline = node.read_file(f"/proc/{pids[0]}/cmdline").split("\0")
        drive = next(a for a in cmdline if a.startswith("file="))
        assert ",format=raw," in drive, drive
        path = drive[len("file="):].split(",")[0]
        if access == "kernelspace":       # the loop device (through Ganeti's symlink)
            assert node.run("readlink", "-f", path).stdout.strip() == dev, drive
        else:                             # the raw view in the vbdfs mount
            assert path == f"{MOUNTPOINT}/{vol}/sda", drive
        disk = disk_on(node, vol)
        wait_for(lambda: read_at(disk, 512, len(KVM_MARKER)) == KVM_MARKER, timeout=60,
                 what="the guest to boot and write its marker")
        assert cluster.gnt("gnt-instance", "list", "--no-headers", "-o", "status",
                           name).stdout.strip() == "running"

        cluster.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", name)
        assert node.run("pgrep", "-f", f"^/usr/bin/kvm -name {name} ",
                        check=False).returncode == 1
        assert store_files(cluster) == before
        assert node.loop_devices() == []


# == two nodes, one shared store: GlusterFS, a client per node ====================================

class TestTwoNodes:
    volumes: dict[str, list[str]] = {}          # instance -> its volumes
    @pytest.fixture
    def cluster(self, two_nodes):
        yield two_nodes
        two_nodes.remove_all_instances()

    def add(self, cluster, name, size, fmt, node):
        """A one-disk instance on node: (its volume, its device)."""
        cluster.gnt(*GNT_ADD, "-n", node.name,
                    "--disk", f"0:size={size},provider=vbdfs,format={fmt}", name)
        [(vol, dev)] = disks_of(cluster, name)
        self.volumes[name] = [vol]
        return vol, dev

    def remove(self, cluster, name, files_before):
        """Remove the instance: it leaves no store file and no loop device behind."""
        cluster.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", name)
        assert store_files(cluster) == files_before
        assert no_loop_devices(cluster)

    def check_one_writer(self, cluster, name, where):
        """The instance runs on `where`, whose node alone holds each disk's write lease."""
        assert primary_of(cluster, name) == where.name
        for vol in self.volumes[name]:
            modes = lease_modes(cluster, vol)
            assert modes[where.short] == "exclusive", modes
            assert [m for m in modes.values() if m != "none"] == ["exclusive"], modes
            # and the store agrees: the image file is write-locked (OFD locks, as qemu's)
            assert write_locked(backing_file(cluster, vol))
            assert where.loop_device_of(vol)
        for n in cluster.nodes:
            if n is not where:
                assert n.loop_devices() == []

    @pytest.mark.parametrize("fmt", ["raw", "qcow2"])
    def test_failover_both_ways(self, cluster, fmt):
        n1, n2 = cluster.nodes
        before = store_files(cluster)
        name = f"fo-{fmt}"
        vol, dev = self.add(cluster, name, "32M", fmt, n1)
        self.check_one_writer(cluster, name, n1)
        data = random.Random(fmt).randbytes(MiB)
        write_at(dev, 5 * MiB, data)
        for target in (n2, n1):
            cluster.gnt("gnt-instance", "failover", "-f", "--shutdown-timeout=0",
                        f"--target-node={target.name}", name)
            self.check_one_writer(cluster, name, target)
            assert read_at(target.loop_device_of(vol), 5 * MiB, MiB) == data
        ganeti_agrees(cluster, name, n1)
        self.remove(cluster, name, before)

    @pytest.mark.parametrize("fmt", ["raw", "qcow2"])
    def test_live_migration_both_ways_keeps_every_acknowledged_write(self, cluster, fmt):
        """Written on A, migrated, written on B, and back again: every write reads back
        and (qcow2) qemu-img check passes. Each node has had the image open before the
        other's writes, so a stale cached L1/L2/refcount table would show."""
        n1, n2 = cluster.nodes
        before = store_files(cluster)
        name = f"mig-{fmt}"
        vol, _ = self.add(cluster, name, "64M", fmt, n1)
        rng = random.Random(f"migrate-{fmt}")
        written: dict[int, bytes] = {}
        where = n1
        for round_ in range(4):
            self.check_one_writer(cluster, name, where)
            dev = where.loop_device_of(vol)
            # New clusters (allocations) and an overwrite of the previous round's data.
            for i in range(3):
                offset = (round_ * 3 + i) * 4 * MiB + rng.randrange(0, 64) * 4096
                written[offset] = rng.randbytes(192 * 1024)
                write_at(dev, offset, written[offset])
            if round_:
                offset = sorted(written)[(round_ - 1) * 3]
                written[offset] = rng.randbytes(len(written[offset]))
                write_at(dev, offset, written[offset])
            for offset, data in written.items():
                assert read_at(dev, offset, len(data)) == data, (round_, offset)
            target = n2 if where is n1 else n1
            cluster.gnt("gnt-instance", "migrate", "-f", f"--target-node={target.name}",
                        name)
            where = target
        self.check_one_writer(cluster, name, where)
        ganeti_agrees(cluster, name, where)
        cluster.gnt("gnt-instance", "shutdown", "--timeout=0", name)
        assert lease_modes(cluster, vol) == {n1.short: "none", n2.short: "none"}
        assert not write_locked(backing_file(cluster, vol))
        image = backing_file(cluster, vol)
        if fmt == "qcow2":
            check = qemu_img("check", image)
            assert check.returncode == 0, check.stdout + check.stderr
        # qemu-img reads the image file itself: every acknowledged write is there.
        raw = os.path.join(cluster.workdir, f"{name}.raw")
        r = qemu_img("convert", "-U", "-f", fmt, "-O", "raw", image, raw)
        assert r.returncode == 0, r.stderr
        try:
            for offset, data in written.items():
                assert read_at(raw, offset, len(data)) == data, offset
        finally:
            os.unlink(raw)
        self.remove(cluster, name, before)
