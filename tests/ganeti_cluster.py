"""Real Ganeti clusters for the ExtStorage provider's tests, each node in its own namespaces.

A node is a process tree under `unshare --pid --fork --kill-child --mount --uts --net`:
its PID 1 is a tiny reaper, and everything the node runs (Ganeti's daemons, sshd, its vbdfs
daemon, every gnt-* command) is started inside with nsenter. Inside, the node has:

- tmpfs over /var/lib/ganeti, /var/log/ganeti, /run and /srv, and overlays over /etc and
  /root, so that /etc/hosts, /etc/ganeti, /etc/vbdfs, /etc/ssh and /root/.ssh are its own
  and the host's files are never written;
- a fresh sysfs (Ganeti finds bridges in /sys/class/net, which shows the mounting
  process's network namespace);
- eth0 with an address in 192.0.2.0/24 (TEST-NET-1, only ever inside namespaces made
  here): a veth whose other end is in the other node, or dangling on a single node;
  the cluster IP is added to it by Ganeti; br0, an empty bridge for instance NICs;
- its host name (UTS), resolved through its /etc/hosts;
- a vbdfs daemon serving the store at /run/vbdfs (the provider's default mountpoint,
  the same path on every node, as Ganeti expects of shared storage), configured in its
  /etc/vbdfs/vbdfs.toml, and the provider installed by `vbdctl ganeti-install` into
  /srv/ganeti/extstorage/vbdfs;
- sshd on its own address only, with the master's root key authorised (`gnt-node add`
  logs in with it; the cluster is made with --no-ssh-init, so Ganeti leaves keys alone);
- where GlusterFS is installed, tmpfs over /var/lib/glusterd and /var/log/glusterfs, so
  a node can serve a volume (Node.serve_glusterfs) or mount one without touching the
  host's.

The cluster (Cluster.init) has the fake hypervisor, the ext disk template only, and an
instance policy that allows the tests' small disks and memory.

Mounts made inside stay inside (the namespace is created with private propagation); the
host reaches a node's files through /proc/PID/root. Loop devices are global, so stop()
detaches those over the node's vbdfs mount (found by the mount's device number) before
it stops the daemon and kills the namespace, which ends every process in it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from conftest import wait_for

DOMAIN = "vbdfs.test"
NET = "192.0.2"                      # TEST-NET-1, inside our namespaces only
CLUSTER_NAME = f"cluster.{DOMAIN}"
CLUSTER_IP = f"{NET}.100"
BRIDGE = "br0"
MOUNTPOINT = "/run/vbdfs"
CONFIG = "/etc/vbdfs/vbdfs.toml"
EXTSTORAGE_DIR = "/srv/ganeti/extstorage"       # first in Debian's ExtStorage search path
ES_LOG_DIR = "/var/log/ganeti/extstorage"
CALLS_LOG = f"{ES_LOG_DIR}/vbdfs-calls.log"     # one line per provider call (the provider's)
# Ganeti's daemons inherit the environment of the command that starts them; give them
# what an init system would, so the provider sees what it will see in production.
GANETI_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}

# PID 1 of a node: reaps orphans (Ganeti daemonises), exits on SIGTERM.
_REAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""

_NODE_SETUP = """
set -euo pipefail
mount -t sysfs sysfs /sys
for d in /var/lib/ganeti /var/log/ganeti /run /srv; do
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
# GlusterFS's state and logs, where installed (a node may serve or mount a volume)
for d in /var/lib/glusterd /var/log/glusterfs; do
    if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 tmpfs "$d"; fi
done
mkdir -p /run/lock /run/ganeti /run/sshd {mountpoint} {es_log} {es_dir}
# Overlays, not tmpfs: the node still reads the host's files (a Python installed under
# /root, say), and writes only its own copy, kept on the node's /run (a tmpfs: an
# overlay's upper layer cannot be on another overlay, as / is in a container).
for d in etc root; do
    mkdir -p /run/overlay/$d-upper /run/overlay/$d-work
    mount -t overlay overlay \
        -o lowerdir=/$d,upperdir=/run/overlay/$d-upper,workdir=/run/overlay/$d-work /$d
done
hostname {fqdn}
ip link set lo up
ip link add {bridge} type bridge
ip link set {bridge} up
"""


def children(pid: int) -> list[int]:
    """Child pids of pid (this kernel may lack /proc/PID/task/*/children: read stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields start after the last ')'
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry))
    return out


class CommandFailed(AssertionError):
    pass


def loop_devices_on(dev: int) -> list[str]:
    """Loop devices whose backing file is on the filesystem with device number dev.

    losetup (the kernel's LOOP_GET_STATUS64), not sysfs: sysfs gives a path only, and
    every node names its disks by the same path in its own namespace."""
    r = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-MAJ:MIN"],
                       capture_output=True, text=True, check=True)
    found = []
    for info in json.loads(r.stdout or '{"loopdevices": []}')["loopdevices"]:
        back = info.get("back-maj:min") or ""
        if back and os.makedev(*map(int, back.split(":"))) == dev:
            found.append(info["name"])
    return sorted(found)


class Node:
    """One Ganeti node: a set of namespaces with Ganeti's directories and a vbdfs daemon."""

    def __init__(self, index: int, workdir: str):
        self.index = index
        self.short = f"node{index}"
        self.name = f"{self.short}.{DOMAIN}"
        self.address = f"{NET}.{index}"
        self.workdir = os.path.join(workdir, self.short)
        os.makedirs(self.workdir)
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = None
        self.pid_ns = self.mnt_ns = None
        self.mounts: list[str] = []          # made by mount(), unmounted by stop
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--net",
             "--mount-proc", "--propagation", "private", sys.executable, "-c", _REAPER],
            stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: self._init_pid() is not None, what=f"{self.short}'s namespaces")
            self.pid = self._init_pid()
            self.pid_ns = os.readlink(f"/proc/{self.pid}/ns/pid")
            self.mnt_ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
            self.sh(_NODE_SETUP.format(
                mountpoint=MOUNTPOINT, es_log=ES_LOG_DIR, es_dir=EXTSTORAGE_DIR,
                fqdn=self.name, bridge=BRIDGE))
        except BaseException:
            self._kill_namespace()
            raise

    def _pids_in_namespace(self, kind: str = "pid") -> list[int]:
        ns = self.pid_ns if kind == "pid" else self.mnt_ns
        found = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/{kind}") == ns:
                    found.append(int(entry))
            except OSError:
                pass
        return found

    def _init_pid(self) -> int | None:
        """The host pid of the node's PID 1 (the reaper), once unshare has started it."""
        for child in children(self.proc.pid):
            try:
                if os.readlink(f"/proc/{child}/ns/pid") != os.readlink("/proc/self/ns/pid"):
                    return child
            except OSError:
                pass
        return None

    # -- running things inside -------------------------------------------------------

    def prefix(self, *, pid_ns: bool = True, keep_env: bool = False) -> list[str]:
        ns = ["-m", "-u", "-n"] + (["-p"] if pid_ns else [])
        env = [] if keep_env else ["env", "-i", *(f"{k}={v}" for k, v in GANETI_ENV.items())]
        return ["nsenter", "-t", str(self.pid), *ns, "--", *env]

    def run(self, *args: str, check: bool = True, timeout: float = 300, input=None,
            keep_env: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in the node (a clean environment plus env, unless keep_env)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        if extra and keep_env:
            extra.insert(0, "env")
        r = subprocess.run([*self.prefix(keep_env=keep_env), *extra, *args],
                           capture_output=True,
                           text=True, timeout=timeout, input=input, cwd="/",
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise CommandFailed(f"{self.short}: {shlex.join(args)} exited {r.returncode}:\n"
                                f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("bash", "-c", script, **kw)

    def host_path(self, path: str) -> str:
        """Where the host reaches a path as this node sees it."""
        return f"/proc/{self.pid}/root{path}"

    def mount(self, *args: str, target: str) -> None:
        """mount ARGS TARGET in the node; stop() unmounts it before the node ends."""
        self.run("mount", *args, target)
        self.mounts.append(target)

    def serve_glusterfs(self, volume: str, brick: str, options=()) -> str:
        """glusterd in this node and a started one-brick volume on its address; the
        volume's mount source (HOST:/VOLUME). glusterd and the brick process live in
        the node's namespaces, so they end with it."""
        self.run("glusterd")
        wait_for(lambda: self.run("gluster", "--mode=script", "pool", "list",
                                  check=False).returncode == 0,
                 timeout=60, what=f"glusterd on {self.short}")
        self.run("gluster", "--mode=script", "volume", "create", volume,
                 f"{self.address}:{brick}", "force")
        for option in options:
            self.run("gluster", "--mode=script", "volume", "set", volume, option, "off")
        self.run("gluster", "--mode=script", "volume", "start", volume)
        return f"{self.address}:/{volume}"

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run("install", "-D", "-m", oct(mode)[2:], "/dev/stdin", path, input=text)

    def read_file(self, path: str) -> str:
        with open(self.host_path(path)) as f:
            return f.read()

    # -- network ---------------------------------------------------------------------

    def up(self, hosts: str) -> None:
        """Address eth0 (which must exist by now) and install /etc/hosts."""
        self.write_file("/etc/hosts", hosts)
        self.sh(f"ip addr add {self.address}/24 dev eth0 && ip link set eth0 up")

    # -- vbdfs: config, daemon, provider -------------------------------------------------

    def serve_store(self, store_root: str) -> None:
        """Configure vbdfs for store_root, start its daemon and install the provider."""
        # Ganeti's whitelist of storage directories, which vbdfs also enforces.
        self.write_file("/etc/ganeti/file-storage-paths", store_root + "\n")
        self.write_file(CONFIG, f'store = "{store_root}"\nmountpoint = "{MOUNTPOINT}"\n'
                                f'node = "{self.name}"\n')
        self.start_vbdfs()
        # keep_env: the scripts must run this checkout's vbdfs (PYTHONPATH) with this Python.
        self.run(sys.executable, "-m", "vbdfs.cli", "ganeti-install", "--dir",
                 f"{EXTSTORAGE_DIR}/vbdfs", "--config", CONFIG, keep_env=True)

    def start_vbdfs(self, extra_args=()) -> None:
        """The node's vbdfs daemon, as configured in CONFIG (its store at MOUNTPOINT)."""
        self.daemon_log = open(os.path.join(self.workdir, "vbdfs.log"), "a+")
        # keep_env: the daemon is this checkout's vbdfs (PYTHONPATH), not Ganeti's child.
        self.daemon = subprocess.Popen(
            [*self.prefix(keep_env=True), sys.executable, "-m", "vbdfs.daemon", "-f",
             "-o", f"config={CONFIG}", *extra_args],
            stdout=self.daemon_log, stderr=subprocess.STDOUT, cwd="/",
            stdin=subprocess.DEVNULL)
        wait_for(lambda: self.vbdfs_mounted() or self.daemon.poll() is not None,
                 timeout=30, what=f"vbdfs to mount on {self.short}")
        if not self.vbdfs_mounted():
            raise AssertionError(f"vbdfs did not mount on {self.short}: {self.vbdfs_output()}")

    def vbdfs_mounted(self) -> bool:
        try:
            return os.path.ismount(self.host_path(MOUNTPOINT))
        except OSError:
            return False

    def vbdfs_output(self) -> str:
        if self.daemon_log is None:
            return ""
        self.daemon_log.flush()
        with open(self.daemon_log.name) as f:
            return f.read()

    def vbdfs_dev(self) -> int | None:
        """The device number of the node's vbdfs mount (its loop devices' backing dev)."""
        if not self.vbdfs_mounted():
            return None
        return os.stat(self.host_path(MOUNTPOINT)).st_dev

    def loop_devices(self) -> list[str]:
        dev = self.vbdfs_dev()
        return [] if dev is None else loop_devices_on(dev)

    def loop_device_of(self, volume: str) -> str | None:
        """The loop device over the volume's disk in this node's mount, if any."""
        for dev in self.loop_devices():
            with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
                if f.read().strip() == f"{MOUNTPOINT}/{volume}/sda":
                    return dev
        return None

    def stop_vbdfs(self) -> None:
        if self.daemon is None:
            return
        # nsenter forks into the PID namespace and does not pass signals on: signal the
        # daemon itself, nsenter's child.
        if self.daemon.poll() is None:
            for pid in children(self.daemon.pid):
                os.kill(pid, signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in children(self.daemon.pid):
                    os.kill(pid, signal.SIGKILL)
                self.daemon.kill()
                self.daemon.wait()
        self.daemon_log.close()
        self.daemon = None

    # -- what the provider was asked to do ---------------------------------------------

    def calls_log_size(self) -> int:
        try:
            return os.path.getsize(self.host_path(CALLS_LOG))
        except OSError:
            return 0

    def calls_since(self, offset: int) -> list[str]:
        try:
            with open(self.host_path(CALLS_LOG)) as f:
                f.seek(offset)
                return f.read().splitlines()
        except OSError:
            return []

    # -- teardown ------------------------------------------------------------------------

    def stop(self) -> None:
        """Detach the node's loop devices, stop its vbdfs daemon, end its namespaces.

        Then check: a loop device still busy (a guest's) is detached by the kernel only
        when its last user has gone with the namespace.
        """
        fuse_dev = None
        try:
            if self.proc.poll() is None:
                fuse_dev = self.vbdfs_dev()
                for dev in self.loop_devices():
                    subprocess.run(["losetup", "-d", dev], check=False)
                self.stop_vbdfs()
                # Lazy: a GlusterFS client's plain unmount took 45 s and more here; the
                # client goes with the namespace anyway, once nothing uses the mount.
                for target in reversed(self.mounts):
                    subprocess.run(["nsenter", "-t", str(self.pid), "-m", "--", "umount",
                                    "-l", target], check=False, capture_output=True,
                                   timeout=60)
        finally:
            self._kill_namespace()
        if fuse_dev is not None:
            wait_for(lambda: not loop_devices_on(fuse_dev), timeout=30,
                     what=f"{self.short}'s loop devices to go: {loop_devices_on(fuse_dev)}")

    def _kill_namespace(self) -> None:
        # unshare ignores SIGTERM while it waits; SIGKILL ends it, --kill-child then
        # kills the reaper, and the kernel every process left in the PID namespace.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        wait_for(lambda: not self._pids_in_namespace(), timeout=30,
                 what=f"{self.short}'s processes to end")
        # Processes outside the PID namespace that keep its mount namespace alive
        # (a network filesystem's client whose unmount failed): end them too.
        for pid in self._pids_in_namespace("mnt"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self._pids_in_namespace("mnt"), timeout=30,
                 what=f"{self.short}'s mount namespace to empty")
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()


def hosts_file(nodes: list[Node]) -> str:
    lines = ["127.0.0.1 localhost"]
    lines += [f"{n.address} {n.name} {n.short}" for n in nodes]
    lines.append(f"{CLUSTER_IP} {CLUSTER_NAME} cluster")
    return "\n".join(lines) + "\n"


# Small disks and 64 MiB instances must be allowed: Ganeti's default policy wants
# disks of at least 1 GiB and 128 MiB of memory.
IPOLICY_BOUNDS = ("min:disk-size=1,cpu-count=1,disk-count=1,memory-size=32,nic-count=0,"
                  "spindle-use=1/max:disk-size=1048576,cpu-count=8,disk-count=16,"
                  "memory-size=32768,nic-count=8,spindle-use=12")
IPOLICY_STD = "disk-size=64,cpu-count=1,disk-count=1,memory-size=64,nic-count=1,spindle-use=1"


class Cluster:
    """A Ganeti cluster of one or two namespaced nodes; nodes[0] is the master."""

    def __init__(self, workdir: str, node_count: int = 1):
        self.workdir = workdir
        self.nodes: list[Node] = []
        self.journal: list[tuple[str, int, float, list[tuple[str, str]]]] = []
        try:
            for i in range(1, node_count + 1):
                self.nodes.append(Node(i, workdir))
            self._wire()
            hosts = hosts_file(self.nodes)
            for n in self.nodes:
                n.up(hosts)
            self._start_ssh()
        except BaseException:
            self.stop()
            raise

    def start(self, store_root: str, mount_store=None) -> None:
        """vbdfs on every node over store_root, then the cluster with all nodes in it.

        mount_store(node, store_root), if given, first mounts the shared store in
        each node (else the nodes share the host's directory store_root)."""
        for n in self.nodes:
            if mount_store is not None:
                mount_store(n, store_root)
            n.serve_store(store_root)
        self.init()
        for n in self.nodes[1:]:
            self.add_node(n)

    @property
    def master(self) -> Node:
        return self.nodes[0]

    def _wire(self) -> None:
        first = self.nodes[0]
        if len(self.nodes) == 1:
            # eth0 needs a carrier for the cluster IP; its peer stays in the node.
            first.sh("ip link add eth0 type veth peer name eth0-peer && "
                     "ip link set eth0-peer up")
            return
        for other in self.nodes[1:]:
            # One cable: node1's eth0 to node2's eth0 (only two nodes are supported).
            subprocess.run(["nsenter", "-t", str(first.pid), "-n", "ip", "link", "add",
                            "eth0", "type", "veth", "peer", "name", "eth0", "netns",
                            str(other.pid)], check=True)

    def init(self) -> None:
        """gnt-cluster init on the master: fake hypervisor, ext disks only."""
        self.master.run(
            "gnt-cluster", "init", "--enabled-hypervisors=fake",
            "--enabled-disk-templates=ext", f"--nic-parameters=link={BRIDGE}",
            "--master-netdev=eth0", "--no-etc-hosts", "--no-ssh-init",
            f"--ipolicy-bounds-specs={IPOLICY_BOUNDS}", f"--ipolicy-std-specs={IPOLICY_STD}",
            CLUSTER_NAME, timeout=300)

    def _start_ssh(self) -> None:
        """sshd on every node's own address, the master's root key authorised everywhere.

        The nodes use the host's host keys (read through the /etc overlay): Ganeti
        records the master's as the cluster's and expects it on every node.
        """
        master = self.master
        master.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/.ssh/id_ed25519")
        key = master.read_file("/root/.ssh/id_ed25519.pub")
        for node in self.nodes:
            node.write_file("/root/.ssh/authorized_keys", key, mode=0o600)
            node.run("chmod", "700", "/root/.ssh")
            # No PAM: its session modules expect a logind and a settable loginuid.
            node.run("/usr/sbin/sshd", "-o", f"ListenAddress={node.address}", "-o", "UsePAM=no",
                     "-o", "PidFile=/run/sshd.pid", "-o", "PermitRootLogin=prohibit-password")

    def add_node(self, node: Node) -> None:
        """gnt-node add: over ssh, with the key _start_ssh authorised."""
        master = self.master
        master.run("gnt-node", "add", "--no-ssh-key-check", node.name, timeout=300)

    def gnt(self, *args: str, check: bool = True, timeout: float = 300):
        """A Ganeti command on the master, journalled with the provider calls it caused."""
        marks = [n.calls_log_size() for n in self.nodes]
        start = time.monotonic()
        r = self.master.run(*args, check=False, timeout=timeout)
        seconds = time.monotonic() - start
        # Both nodes' calls in time order (the lines start with an ISO time).
        calls = sorted(((n.short, line) for n, mark in zip(self.nodes, marks)
                        for line in n.calls_since(mark)), key=lambda c: c[1].split()[0])
        self.journal.append((shlex.join(args), r.returncode, seconds, calls))
        if check and r.returncode != 0:
            raise CommandFailed(f"{shlex.join(args)} exited {r.returncode}:\n"
                                f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r

    def note(self, text: str, seconds: float = 0.0, lines=()) -> None:
        """A journal entry for something the test timed itself."""
        self.journal.append((text, 0, seconds, [("test", line) for line in lines]))

    def remove_all_instances(self) -> None:
        """What a failed test left: its instances go, so the next test starts clean."""
        names = self.master.run("gnt-instance", "list", "--no-headers", "-o", "name").stdout
        for name in names.split():
            self.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0",
                     "--ignore-failures", name, check=False)

    def journal_text(self) -> str:
        """Each Ganeti command, its wall time, and the provider calls it caused."""
        out = []
        for command, status, seconds, calls in self.journal:
            out.append(f"{command}  [exit {status}, {seconds:.2f} s]")
            out += [f"    {node}: {line}" for node, line in calls]
        return "\n".join(out) + "\n"

    def stop(self) -> None:
        errors = []
        for n in reversed(self.nodes):
            try:
                n.stop()
            except Exception as e:                # stop the others all the same
                errors.append(e)
        if errors:
            raise errors[0]
