"""The failover scenario on real shared storage: a GlusterFS volume, one client per node.

Layout on this one machine (all over loopback; started and torn down here):

- glusterd and a one-brick volume. Gluster refuses 127.0.0.1 and
  `localhost` as a brick's host, so the brick is 127.0.0.2 (still lo).
  open-behind and stat-prefetch are turned off (see CONSISTENCY_OPTIONS).
- node1: a `mount -t glusterfs` client at T/store, its vbdfs daemon
  (node=node1) at T/nodes/mnt0; vbdctl for node1 runs here.
- node2: its own mount namespace (`unshare -m`) in which a second,
  separate glusterfs client is mounted at the same path T/store, in place
  of the first. Its daemon (node=node2) and its vbdctl run in that namespace, so
  everything node2 reads, writes and locks goes through its own client,
  as on a second host. Manifests hold absolute paths, and Ganeti mounts
  shared storage at the same path on every node: so do we.
- T/nodes is a shared bind mount, so each node's vbdfs mount (mnt0, mnt1)
  propagates to the other namespace and the check can list the target's
  mount, as the tests on a plain directory do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import MiB, Mount, make_instance, wait_for
from test_failover import killed_primary, scenario
from vbdfs.operations.attach import mounts
from vbdfs.store import Store, leases

pytestmark = [pytest.mark.fuse, pytest.mark.root]

HOST = "127.0.0.2"
# Measured here (Gluster 10.3): with these on, a manifest replaced by rename through
# one client is read through another as its old contents (open-behind) or fails
# with ESTALE (stat-prefetch, i.e. md-cache). A vbdfs store needs them off.
CONSISTENCY_OPTIONS = ("performance.open-behind", "performance.stat-prefetch")


def run(*args, check=True, timeout=60):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def _running_glusterd() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if entry.isdigit() and f.read().strip() == "glusterd":
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A started one-brick volume; its name. Skipped only if glusterd cannot run here."""
    if shutil.which("glusterd") is None or shutil.which("mount.glusterfs") is None:
        pytest.skip("glusterd cannot start: glusterfs-server/glusterfs-client are not "
                    "installed (tools/setup installs them)")
    if os.geteuid() != 0:
        pytest.skip("glusterd cannot start: needs root")
    others = _running_glusterd()
    if others:
        pytest.skip(f"glusterd cannot start: one is already running (pid {others[0]}) and "
                    "this test starts, owns and stops its own")
    tmp = tmp_path_factory.mktemp("gluster")
    log = tmp / "glusterd.log"
    glusterd = subprocess.Popen(["glusterd", "-N", f"--log-file={log}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    name = f"vbdfs-test-{os.getpid()}"
    created = False
    try:
        deadline = time.monotonic() + 30
        while run("gluster", "--mode=script", "pool", "list", check=False).returncode != 0:
            if glusterd.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                pytest.skip(f"glusterd cannot start here (exit status {glusterd.poll()}): "
                            f"{tail}")
            time.sleep(0.2)
        brick = tmp / "brick"
        brick.mkdir()
        run("gluster", "--mode=script", "volume", "create", name, f"{HOST}:{brick}", "force")
        created = True
        for option in CONSISTENCY_OPTIONS:
            run("gluster", "--mode=script", "volume", "set", name, option, "off")
        run("gluster", "--mode=script", "volume", "start", name)
        yield name
    finally:
        if created:
            run("gluster", "--mode=script", "volume", "stop", name, "force", check=False)
            run("gluster", "--mode=script", "volume", "delete", name, check=False)
        glusterd.terminate()
        try:
            glusterd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            glusterd.kill()
            glusterd.wait()


def glusterfs_mount(volume: str, path: str, nsenter=()) -> None:
    run(*nsenter, "mount", "-t", "glusterfs", f"{HOST}:/{volume}", path)


class NsMount(Mount):
    """A vbdfs daemon in node2's mount namespace (entered with nsenter)."""

    def __init__(self, store: Store, path: str, ns_pid: int, extra_args=()):
        super().__init__(store, path, extra_args, prefix=("nsenter", "-t", str(ns_pid), "-m"))


@pytest.fixture
def cluster(volume, tmp_path):
    """(store, node1 Mount, node2 Mount, vbdctl runner for node names)."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    nodes = str(tmp_path / "nodes")
    os.makedirs(nodes)
    cleanup = []
    try:
        glusterfs_mount(volume, str(store_dir))
        cleanup.append(lambda: run("umount", "-l", str(store_dir), check=False))
        for entry in os.listdir(store_dir):         # the previous test's store
            shutil.rmtree(store_dir / entry)
        run("mount", "--bind", nodes, nodes)
        cleanup.append(lambda: run("umount", "-l", nodes, check=False))
        run("mount", "--make-shared", nodes)
        ns = subprocess.Popen(["unshare", "-m", "--propagation", "unchanged",
                               "sleep", "infinity"])
        cleanup.append(lambda: (ns.kill(), ns.wait()))
        wait_for(lambda: os.readlink(f"/proc/{ns.pid}/ns/mnt") != os.readlink(
                 "/proc/self/ns/mnt") and os.readlink(f"/proc/{ns.pid}/exe").endswith("sleep"),
                 what="node2's namespace")
        nsenter = ("nsenter", "-t", str(ns.pid), "-m")
        # In node2's namespace, node1's client goes (the host keeps it) and node2's
        # own client takes its place at the same path.
        run(*nsenter, "umount", str(store_dir))
        glusterfs_mount(volume, str(store_dir), nsenter)
        cleanup.append(lambda: run(*nsenter, "umount", str(store_dir), check=False))
        # node2 really has its own client: another mount, the same files.
        dev2 = run(*nsenter, "stat", "-c", "%d", str(store_dir)).stdout.strip()
        assert int(dev2) != os.stat(store_dir).st_dev
        assert [m for m in mounts() if m[0] == str(store_dir)][-1][1] == "fuse.glusterfs"

        store = Store(str(store_dir), whitelist_file=str(tmp_path / "file-storage-paths"))
        node1 = Mount(store, os.path.join(nodes, "mnt0"), ["-o", "node=node1"])
        cleanup.append(node1.stop)
        node2 = NsMount(store, os.path.join(nodes, "mnt1"), ns.pid, ["-o", "node=node2"])
        cleanup.append(node2.stop)

        def vbdctl(store, node, *args):
            prefix = nsenter if node == "node2" else ()
            return subprocess.run([*prefix, sys.executable, "-m", "vbdfs.cli",
                                   "--store", store.root, "--whitelist", store.whitelist_file,
                                   "--node", node, "--mountpoint", "/nonexistent", *args],
                                  capture_output=True, text=True, timeout=120)
        yield store, node1, node2, vbdctl
    finally:
        for step in reversed(cleanup):
            step()


def test_gluster_locks_cross_clients(cluster):
    """The premise: a lease taken through node1's client is seen through node2's."""
    store, node1, node2, vbdctl = cluster
    make_instance(store, "web", 16 * MiB)
    fd = os.open(node1.disk("web"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.open(node2.disk("web"), os.O_RDWR)
        assert e.value.errno == 16           # EBUSY: node2's daemon saw node1's lock
        assert "vbdfs on node node1" in node2.output()
    finally:
        os.close(fd)
    backing = os.path.join(store.root, "web", "sda")
    wait_for(lambda: not leases.is_write_locked(backing), what="node1's lease to end")
    os.close(os.open(node2.disk("web"), os.O_RDWR))


def test_gluster_failover_scenario(cluster, tmp_path):
    store, node1, node2, vbdctl = cluster
    scenario(store, node1, node2, tmp_path, run=vbdctl)


def test_gluster_killed_primary_daemon_fails_over(cluster):
    store, node1, node2, vbdctl = cluster
    killed_primary(store, node1, node2, run=vbdctl)
