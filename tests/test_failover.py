"""Failover between two nodes sharing one store: checks first, then stop, swap, attach.

Two vbdfs daemons (node1, node2) over one store directory stand for two Dom0s
on shared storage. The Xen commands are replaced by scripts that record
their arguments (Xen does not run here). tests/test_failover_gluster.py runs
the same scenario with each node on its own GlusterFS client mount.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import MiB, make_instance, wait_for
from vbdfs.operations import failover as fo
from vbdfs.store import DiskSpec, leases


def vbdctl(store, node, *args):
    return subprocess.run([sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                           "--whitelist", store.whitelist_file, "--node", node,
                           "--mountpoint", "/nonexistent", *args],
                          capture_output=True, text=True, timeout=120)


def manifest_bytes(store, name="web") -> bytes:
    with open(store.manifest_path(name), "rb") as f:
        return f.read()


def nodes_of(store, name="web"):
    m = store.load(name)
    return m.primary, m.secondary


def rows(output: str) -> dict[str, str]:
    """The check table as {check: 'ok' | 'FAILED'}."""
    out = {}
    for line in output.splitlines()[1:]:
        for result in (" ok ", " FAILED "):
            if result in line + " ":
                name = line.split(result)[0].strip()
                out[name] = result.strip()
                break
    return out


def hold_open(path):
    """A process holding path open for writing, as a running domain's disk would be."""
    p = subprocess.Popen([sys.executable, "-c", "import os,time; "
                          f"fd=os.open({path!r}, os.O_RDWR); "
                          "print('open', flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    return p


def stop_script(tmp_path, pidfile=None):
    """A stand-in for `xl shutdown -w`: records its arguments, and ends the
    process in pidfile (the 'domain') if there is one."""
    log = tmp_path / "xl.log"
    script = tmp_path / "fake-xl"
    kill = f'[ -f {pidfile} ] && kill $(cat {pidfile}) && rm {pidfile}\n' if pidfile else ""
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{kill}exit 0\n')
    script.chmod(0o755)
    return str(script), log


def recorded(log):
    return log.read_text().splitlines() if log.exists() else []


def scenario(store, node1, node2, tmp_path, run=vbdctl):
    """The whole failover story; node1 and node2 are mounts with .path, .disk(), .proc."""
    make_instance(store, "web", 16 * MiB)
    store.create("db", [DiskSpec(size=8 * MiB, format="qcow2")])
    for name in ("web", "db"):
        r = run(store, "node1", "modify", name, "-n", "node1:node2", "-o", "debian")
        assert r.returncode == 0, r.stderr
    assert nodes_of(store) == ("node1", "node2")
    pidfile = tmp_path / "domain.pid"
    xl, log = stop_script(tmp_path, pidfile)

    def check(node, target, mount, name="web"):
        return run(store, node, "failover-check", name, "--target", target,
                      "--target-mountpoint", mount.path)

    def do_failover(node, target, mount, *extra, name="web"):
        return run(store, node, "failover", name, "--target", target,
                      "--target-mountpoint", mount.path,
                      "--stop-command", f"{xl} shutdown -w {{instance}}", *extra)

    # All is well: every check passes, one row each.
    r = check("node1", "node2", node2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(rows(r.stdout).values()) == {"ok"}
    assert {"nodes", "file sda", "image sda", "target mount", "lease sda",
            "attachments"} <= set(rows(r.stdout))
    # node2 reads the very bytes node1's file holds (for live migration).
    with open(os.path.join(store.root, "web", "sda"), "r+b") as f:
        f.write(b"boot sector")
    r = run(store, "node1", "migrate-check", "web", "--target", "node2",
            "--target-mountpoint", node2.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows(r.stdout)["same file sda"] == "ok"

    # node1 writes the disk (the domain runs there): the check names node1's lease.
    domain = hold_open(node1.disk("web"))
    try:
        r = check("node1", "node2", node2)
        assert r.returncode == 1
        assert rows(r.stdout)["lease sda"] == "FAILED"
        assert "vbdfs on node node1" in r.stdout
        # Claiming the domain is already stopped does not make it so: aborted, no change.
        before = manifest_bytes(store)
        r = run(store, "node1", "failover", "web", "--target", "node2",
                   "--target-mountpoint", node2.path, "--stop-command", "")
        assert r.returncode == 1 and "nothing changed" in r.stderr
        assert "node node1" in r.stdout
        assert manifest_bytes(store) == before
    finally:
        domain.kill()
        domain.wait()
    backing = os.path.join(store.root, "web", "sda")
    wait_for(lambda: not leases.is_write_locked(backing), what="node1's lease to end")
    r = check("node1", "node2", node2)
    assert r.returncode == 0, r.stdout

    # A VBD file deleted: the check names it, failover aborts, manifest untouched.
    sda = os.path.join(store.root, "web", "sda")
    os.rename(sda, sda + ".away")
    try:
        r = check("node1", "node2", node2)
        assert r.returncode == 1
        assert rows(r.stdout)["file sda"] == "FAILED" and sda in r.stdout
        # node2 cannot see it either, once its caches expire (on GlusterFS its client
        # caches entries for a second; a plain directory shows it at once).
        wait_for(lambda: rows(check("node1", "node2", node2).stdout)["target mount"]
                 == "FAILED", timeout=10, what="node2's mount to lose sda")
        before = manifest_bytes(store)
        r = do_failover("node1", "node2", node2)
        assert r.returncode == 1 and sda in r.stderr
        assert manifest_bytes(store) == before
        assert recorded(log) == []             # the domain was not even stopped
    finally:
        os.rename(sda + ".away", sda)
    wait_for(lambda: check("node1", "node2", node2).returncode == 0, timeout=10,
             what="the check to pass again")

    # The real thing: the domain runs on node1; failover stops it, then swaps.
    domain = hold_open(node1.disk("web"))
    pidfile.write_text(str(domain.pid))
    try:
        r = do_failover("node1", "node2", node2)
        assert r.returncode == 0, r.stdout + r.stderr
        assert recorded(log) == ["shutdown -w web"]
        assert domain.wait(timeout=10) == -signal.SIGTERM
    finally:
        domain.kill()
        domain.wait()
    assert nodes_of(store) == ("node2", "node1")
    assert nodes_of(store, "db") == ("node1", "node2")       # only web moved
    assert run(store, "node1", "failover-check", "web", "--target", "node2",
                  "--target-mountpoint", node2.path).returncode == 1   # already there

    # ... and back; and the qcow2 instance over to node2.
    r = check("node2", "node1", node1)
    assert r.returncode == 0, r.stdout
    r = do_failover("node2", "node1", node1)
    assert r.returncode == 0, r.stdout + r.stderr
    r = do_failover("node1", "node2", node2, name="db")
    assert r.returncode == 0, r.stdout + r.stderr
    assert nodes_of(store) == ("node1", "node2")
    assert nodes_of(store, "db") == ("node2", "node1")
    assert recorded(log) == ["shutdown -w web", "shutdown -w web", "shutdown -w db"]


@pytest.mark.fuse
@pytest.mark.root
def test_failover_two_nodes_one_store(store, mount, tmp_path):
    node1 = mount(["-o", "node=node1"])
    node2 = mount(["-o", "node=node2"])
    scenario(store, node1, node2, tmp_path)


def killed_primary(store, node1, node2, run=vbdctl):
    """node1's daemon dies with SIGKILL while a disk is open: its lease dies with it."""
    make_instance(store, "web", 16 * MiB)
    fo.modify(store, "web", "node1", "node2")
    backing = os.path.join(store.root, "web", "sda")
    domain = hold_open(node1.disk("web"))
    try:
        r = run(store, "node2", "failover-check", "web", "--target", "node2",
                   "--target-mountpoint", node2.path)
        assert r.returncode == 1 and "vbdfs on node node1" in r.stdout
        node1.proc.send_signal(signal.SIGKILL)
        node1.proc.wait(timeout=30)
        wait_for(lambda: not leases.is_write_locked(backing), what="node1's locks to vanish")
        r = run(store, "node2", "failover-check", "web", "--target", "node2",
                   "--target-mountpoint", node2.path)
        assert r.returncode == 0, r.stdout
        # node1 is gone, so there is no domain to stop there.
        r = run(store, "node2", "failover", "web", "--target", "node2",
                   "--target-mountpoint", node2.path, "--stop-command", "")
        assert r.returncode == 0, r.stdout + r.stderr
        assert nodes_of(store) == ("node2", "node1")
        fd = os.open(node2.disk("web"), os.O_RDWR)   # node2 may write now
        os.pwrite(fd, b"on node2", 0)
        os.close(fd)
    finally:
        domain.kill()
        domain.wait()


@pytest.mark.fuse
@pytest.mark.root
def test_killed_primary_daemon_fails_over(store, mount):
    killed_primary(store, mount(["-o", "node=node1"]), mount(["-o", "node=node2"]))


@pytest.mark.fuse
@pytest.mark.root
def test_failover_attach_and_back(store, mount, tmp_path):
    """--attach puts loop devices on the target; failing back detaches them first."""
    node1 = mount(["-o", "node=node1"])
    node2 = mount(["-o", "node=node2"])
    make_instance(store, "web", 16 * MiB, 8 * MiB)
    fo.modify(store, "web", "node1", "node2")
    r = vbdctl(store, "node1", "failover", "web", "--target", "node2", "--attach",
               "--target-mountpoint", node2.path, "--stop-command", "")
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads(open(os.path.join(store.state_dir("attachments"),
                                           "web.json")).read())["disks"]
    try:
        assert {d: rec["node"] for d, rec in records.items()} == {"sda": "node2",
                                                                   "sdb": "node2"}
        assert all(rec["path"].startswith(node2.path) for rec in records.values())
        assert leases.holder(store.state_dir("leases"), "web", "sda",
                             os.path.join(store.root, "web", "sda"))["node"] == "node2"
        # From node1 the attachment is node2's, which node1 cannot detach: refused.
        r = vbdctl(store, "node1", "failover", "web", "--target", "node1",
                   "--target-mountpoint", node1.path, "--stop-command", "")
        assert r.returncode == 1
        assert rows(r.stdout)["attachments"] == "FAILED" and "on node node2" in r.stdout
        assert nodes_of(store) == ("node2", "node1")
        # On node2 (the primary) the failover detaches its own devices, then swaps.
        r = vbdctl(store, "node2", "failover", "web", "--target", "node1",
                   "--target-mountpoint", node1.path, "--stop-command", "")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "detached sda" in r.stdout and "detached sdb" in r.stdout
        assert nodes_of(store) == ("node1", "node2")
        assert not os.path.exists(os.path.join(store.state_dir("attachments"), "web.json"))
    finally:
        for rec in records.values():
            subprocess.run(["losetup", "-d", rec["device"]], capture_output=True)


@pytest.mark.fuse
@pytest.mark.root
def test_missing_stop_program_changes_nothing(store, mount):
    node2 = mount(["-o", "node=node2"])
    make_instance(store, "web", 16 * MiB)
    fo.modify(store, "web", "node1", "node2")
    before = manifest_bytes(store)
    r = vbdctl(store, "node1", "failover", "web", "--target", "node2",
               "--target-mountpoint", node2.path,
               "--stop-command", "no-such-xl shutdown -w {instance}")
    assert r.returncode == 1
    assert "no-such-xl: program not found" in r.stderr
    assert rows(r.stdout)["stop command"] == "FAILED"
    assert rows(r.stdout)["target mount"] == "ok"
    assert manifest_bytes(store) == before
    # With --start, a missing start program is refused before anything too.
    r = vbdctl(store, "node1", "failover", "web", "--target", "node2", "--start",
               "--target-mountpoint", node2.path, "--stop-command", "",
               "--start-command", "no-such-xl create /etc/xen/{instance}.cfg")
    assert r.returncode == 1 and rows(r.stdout)["start command"] == "FAILED"
    assert manifest_bytes(store) == before


@pytest.mark.fuse
@pytest.mark.root
def test_lease_not_released_by_stop_leaves_manifest(store, mount, tmp_path):
    """The stop command 'succeeds' but the disk stays open: no swap."""
    node1 = mount(["-o", "node=node1"])
    node2 = mount(["-o", "node=node2"])
    make_instance(store, "web", 16 * MiB)
    fo.modify(store, "web", "node1", "node2")
    xl, log = stop_script(tmp_path)
    before = manifest_bytes(store)
    domain = hold_open(node1.disk("web"))
    try:
        with pytest.raises(fo.FailoverError, match="still held by vbdfs on node node1"):
            fo.failover(store, "web", "node2", node2.path, "node1",
                        stop_command=f"{xl} shutdown -w {{instance}}", lease_wait=1.0)
    finally:
        domain.kill()
        domain.wait()
    assert recorded(log) == ["shutdown -w web"]
    assert manifest_bytes(store) == before


@pytest.mark.fuse
@pytest.mark.root
def test_migrate_check(store, mount):
    node2 = mount(["-o", "node=node2"])
    make_instance(store, "web", 40 * MiB)
    store.create("db", [DiskSpec(size=8 * MiB, format="qcow2")])
    for name in ("web", "db"):
        fo.modify(store, name, "node1", "node2")
    with open(os.path.join(store.root, "web", "sda"), "r+b") as f:
        f.seek(33 * MiB)
        f.write(b"data seen by both nodes")
    r = vbdctl(store, "node1", "migrate-check", "web", "--target", "node2",
               "--target-mountpoint", node2.path, "--output", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    same = [c for c in report["checks"] if c["name"] == "same file sda"]
    assert report["ok"] and same and same[0]["ok"]
    assert "same mtime and allocation" in same[0]["detail"]
    assert vbdctl(store, "node1", "migrate-check", "db", "--target", "node2",
                  "--target-mountpoint", node2.path).returncode == 0


def test_same_file_detects_different_contents(store, tmp_path):
    """Through a 'target view' holding a copy that differs in one sample."""
    make_instance(store, "web", 4 * MiB)
    m = store.load("web")
    view = tmp_path / "view"
    (view / "web").mkdir(parents=True)
    data = bytearray(4 * MiB)
    (view / "web" / "sda").write_bytes(bytes(data))
    [r] = fo.check_same_file(store, m, str(view))
    assert r.ok, r.detail
    data[fo.sample_offsets(4 * MiB)[7] + 5] = 1       # one byte inside the 8th sample
    (view / "web" / "sda").write_bytes(bytes(data))
    [r] = fo.check_same_file(store, m, str(view))
    assert not r.ok and "contents differ" in r.detail


def test_sample_offsets():
    assert fo.sample_offsets(128 << 10) == [0, 64 << 10]
    big = fo.sample_offsets(10 << 30)
    assert len(big) == fo.SAMPLES and big[0] == 0 and big[-1] == (10 << 30) - fo.SAMPLE
    assert big == sorted(big)


def test_missing_backing_file_fails_the_image_check(store, tmp_path):
    make_instance(store, "base", 8 * MiB)
    store.create("web", [DiskSpec(size=8 * MiB, format="qcow2")])
    sda = os.path.join(store.root, "web", "sda")
    os.unlink(sda)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    "../base/sda", sda, "8M"], check=True)
    m = store.load("web")
    results = {r.name: r for r in fo.check_disks(store, m)}
    assert results["image sda"].ok
    assert os.path.join(store.root, "base", "sda") in results["image sda"].detail
    os.rename(os.path.join(store.root, "base", "sda"), os.path.join(store.root, "base", "x"))
    results = {r.name: r for r in fo.check_disks(store, m)}
    assert results["file sda"].ok and not results["image sda"].ok
    assert "backing file" in results["image sda"].detail


def test_modify(store):
    make_instance(store, "web", MiB)
    r = vbdctl(store, "node1", "modify", "web", "-n", "a:b", "-o", "debian")
    assert r.returncode == 0, r.stderr
    m = store.load("web")
    assert (m.primary, m.secondary, m.os) == ("a", "b", "debian")
    assert vbdctl(store, "node1", "modify", "web", "-n", "c").returncode == 0
    assert nodes_of(store) == ("c", "")
    assert store.load("web").os == "debian"
    before = manifest_bytes(store)
    assert vbdctl(store, "node1", "modify", "web", "-n", "a:a").returncode == 2
    assert vbdctl(store, "node1", "modify", "web", "-n", "bad name").returncode == 2
    assert vbdctl(store, "node1", "modify", "web").returncode == 2
    r = vbdctl(store, "node1", "modify", "nosuch", "-o", "x")
    assert r.returncode == 1 and "nosuch" in r.stderr
    assert manifest_bytes(store) == before
    assert not [n for n in os.listdir(os.path.join(store.root, "web")) if ".tmp" in n]


def test_check_nodes_target_must_be_secondary(store):
    make_instance(store, "web", MiB)
    fo.modify(store, "web", "node1", "node2")
    r = fo.check_nodes(store.load("web"), "node3")
    assert not r.ok and "not the secondary" in r.detail and "modify web -n node1:node3" in r.detail


@pytest.mark.fuse
@pytest.mark.root
def test_target_mount_of_another_node_is_refused(store, mount):
    """The mount given for node2 must be served by node2's daemon, not node1's."""
    make_instance(store, "web", 16 * MiB)
    fo.modify(store, "web", "node1", "node2")
    node1 = mount(["-o", "node=node1"])
    assert os.getxattr(node1.path, "user.vbdfs.node") == b"node1"
    assert os.getxattr(node1.path, "user.vbdfs.pid") == str(node1.proc.pid).encode()
    before = manifest_bytes(store)
    r = vbdctl(store, "node1", "failover-check", "web", "--target", "node2",
               "--target-mountpoint", node1.path)
    assert r.returncode == 1 and rows(r.stdout)["target mount"] == "FAILED"
    assert "served by node 'node1', not 'node2'" in r.stdout
    r = vbdctl(store, "node1", "failover", "web", "--target", "node2",
               "--target-mountpoint", node1.path, "--stop-command", "")
    assert r.returncode == 1 and manifest_bytes(store) == before


def test_stop_command_from_the_config_file(store, tmp_path, monkeypatch):
    """stop_command set once in vbdfs.toml; --stop-command still overrides it."""
    from vbdfs import config
    cfg_file = tmp_path / "vbdfs.toml"
    cfg_file.write_text('stop_command = "/nonexistent/stopper {instance}"\n')
    cfg = config.load(str(cfg_file))
    assert cfg.stop_command == "/nonexistent/stopper {instance}"
    assert cfg.start_command == fo.DEFAULT_START
    make_instance(store, "web", MiB)
    fo.modify(store, "web", "node1", "node2")
    before = manifest_bytes(store)
    env = dict(os.environ, VBDFS_CONFIG=str(cfg_file))
    r = subprocess.run([sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                        "--whitelist", store.whitelist_file, "--node", "node1",
                        "failover", "web", "--target", "node2",
                        "--target-mountpoint", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "/nonexistent/stopper" in r.stdout + r.stderr
    assert manifest_bytes(store) == before
