"""Failover and live migration between nodes sharing one store.

Ganeti's `failover` for file disks on shared storage: stop the domain on the
primary, release its disks there, make the secondary the primary, and start
it there. Everything that can be known in advance is checked first, and a
failed check aborts with nothing changed:

- the target is the instance's secondary (and not its primary);
- every disk file is where the manifest says, opens read-only through
  vbdfs.images as the manifest's format and size (headers validated), and
  its qcow2 backing chain is present inside the store;
- the target's vbdfs mount serves this store and shows the instance's
  disks with the manifest's sizes (its daemon reads the files the target
  node sees, through the target's own client of the shared filesystem);
- no write lease (vbdfs/store/leases.py) and no attachment is held by
  anyone the failover does not itself release;
- for `failover`, the stop and start commands' programs exist.

The target's view is reached through its vbdfs mount, given as a directory
(`target_mountpoint`): in production that is the mount on the node where
vbdctl runs; in tests two nodes share one host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import shutil
import time

from ..images import ImageError
from ..images.confined import UnsafeFile
from ..store import Store, StoreError, leases
from ..store.manifest import Manifest, ManifestError
from . import attach
from .tools import run_tool

DEFAULT_STOP = "xl shutdown -w {instance}"
DEFAULT_START = "xl create /etc/xen/{instance}.cfg"
LEASE_WAIT = 15.0          # seconds for leases to end after the domain stops


@dataclasses.dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FailoverError(StoreError):
    """Failover stopped; the message says what was done and what was not."""


class ChecksFailed(FailoverError):
    """A check failed before anything changed."""

    def __init__(self, instance: str, results: list[CheckResult]):
        self.results = results
        failed = "; ".join(f"{r.name}: {r.detail}" for r in results if not r.ok)
        super().__init__(f"instance {instance}: failover aborted, nothing changed: {failed}")


def all_ok(results: list[CheckResult]) -> bool:
    return all(r.ok for r in results)


# --- checks ---------------------------------------------------------------------
def check_nodes(m: Manifest, target: str) -> CheckResult:
    if target == m.primary:
        return CheckResult("nodes", False, f"{target} is already the primary node")
    if target != m.secondary:
        return CheckResult("nodes", False, f"{target} is not the secondary node "
                           f"({m.secondary or 'none'}); set it with "
                           f"vbdctl modify {m.name} -n {m.primary or 'PRIMARY'}:{target}")
    return CheckResult("nodes", True, f"primary {m.primary or '-'} -> {target}")


def check_disks(store: Store, m: Manifest) -> list[CheckResult]:
    """Per disk: the file is there, and opens as the manifest's format and size."""
    out = []
    for d in m.disks:
        try:
            st = store.stat_disk(d)
        except UnsafeFile as e:
            out.append(CheckResult(f"file {d.name}", False, str(e)))
            continue
        except OSError as e:
            out.append(CheckResult(f"file {d.name}", False, f"{d.path}: {e.strerror}"))
            continue
        out.append(CheckResult(f"file {d.name}", True, f"{d.path} ({st.st_size} bytes)"))
        try:
            with store.open_disk(d, read_only=True) as img:
                size, chain = img.size, _chain(img)
        except (OSError, ImageError) as e:
            out.append(CheckResult(f"image {d.name}", False, f"{d.format}: {e}"))
            continue
        if size != d.size:
            out.append(CheckResult(f"image {d.name}", False, f"{d.path} is {size} bytes as "
                                   f"{d.format}, the manifest says {d.size}"))
            continue
        detail = f"{d.format}, {size} bytes"
        if chain:
            detail += ", backing " + " -> ".join(chain)
        out.append(CheckResult(f"image {d.name}", True, detail))
    return out


def _chain(img) -> list[str]:
    out = []
    b = getattr(img, "backing", None)
    while b is not None:
        out.append(b.path)
        b = getattr(b, "backing", None)
    return out


def check_target_mount(store: Store, m: Manifest, mountpoint: str,
                       target: str) -> CheckResult:
    """The target's mount is vbdfs serving this store for node target, and shows
    every disk, sized right."""
    name = "target mount"
    try:
        mp = attach.check_mount(store, mountpoint)
        served_by = os.getxattr(mp, "user.vbdfs.node").decode()
        entries = set(os.listdir(os.path.join(mp, m.name)))
    except (StoreError, OSError) as e:
        return CheckResult(name, False, str(e))
    if served_by != target:
        return CheckResult(name, False, f"{mp} is served by node {served_by!r}, "
                           f"not {target!r} (see the daemon's -o node=)")
    problems = []
    for d in m.disks:
        try:
            if d.name not in entries:
                raise FileNotFoundError
            size = os.stat(attach.view_path(mp, m.name, d.name)).st_size
        except FileNotFoundError:
            problems.append(f"{d.name} missing (its daemon cannot see {d.path})")
            continue
        except OSError as e:
            problems.append(f"{d.name}: {e.strerror}")
            continue
        if size != d.size:
            problems.append(f"{d.name} is {size} bytes there, the manifest says {d.size}")
    if problems:
        return CheckResult(name, False, f"{mp}: " + "; ".join(problems))
    return CheckResult(name, True, f"{mp} (node {target}) serves {store.root} with all "
                       f"{len(m.disks)} disk(s)")


def check_leases(store: Store, m: Manifest, releasing: str | None = None) -> list[CheckResult]:
    """No disk is being written, except by node `releasing` (the failover stops it)."""
    state = store.state_dir("leases")
    out = []
    for d in m.disks:
        rec = leases.holder(state, m.name, d.name, d.path, store.disk_root(d.path))
        if rec is None:
            out.append(CheckResult(f"lease {d.name}", True, "not held"))
        elif releasing is not None and rec.get("node") == releasing:
            out.append(CheckResult(f"lease {d.name}", True, f"held by {leases.describe(rec)}: "
                                   "released when the domain stops"))
        else:
            out.append(CheckResult(f"lease {d.name}", False, f"held by {leases.describe(rec)}"))
    return out


def check_attachments(store: Store, m: Manifest, node: str,
                      releasing: str | None = None) -> CheckResult:
    """No live attachment, except this node's when it is the one failing over (`releasing`)."""
    try:
        records = attach.live_records(store, m.name, node)
    except StoreError as e:
        return CheckResult("attachments", False, str(e))
    busy = [f"{k} as {r.get('device')} on node {r.get('node')}"
            for k, r in sorted(records.items())
            if not (releasing is not None and r.get("node") == releasing == node)]
    if busy:
        return CheckResult("attachments", False, "attached: " + ", ".join(busy)
                           + " (detach there first)")
    if records:
        return CheckResult("attachments", True, f"{', '.join(sorted(records))} attached "
                           "here: detached by the failover")
    return CheckResult("attachments", True, "none")


def check_command(what: str, template: str, fields: dict) -> CheckResult:
    name = f"{what} command"
    if not template:
        return CheckResult(name, True, "none")
    try:
        argv = format_command(template, fields)
    except (ValueError, KeyError, IndexError) as e:
        return CheckResult(name, False, f"{template!r}: cannot format: {e}")
    if shutil.which(argv[0]) is None:
        return CheckResult(name, False, f"{argv[0]}: program not found (for {template!r}; "
                           f"give --{what}-command)")
    return CheckResult(name, True, shlex.join(argv))


def format_command(template: str, fields: dict) -> list[str]:
    """Split first, then format each word: an instance name never becomes two words."""
    argv = [w.format(**fields) for w in shlex.split(template)]
    if not argv:
        raise ValueError("empty command")
    return argv


def failover_checks(store: Store, instance: str, target: str, target_mountpoint: str,
                    node: str, releasing: str | None = None) -> list[CheckResult]:
    """Everything that must hold for the instance to start on target; changes nothing."""
    try:
        m = store.load(instance)
    except (StoreError, ManifestError, OSError) as e:
        return [CheckResult("manifest", False, str(e))]
    return ([CheckResult("manifest", True, store.manifest_path(instance)),
             check_nodes(m, target)]
            + check_disks(store, m)
            + [check_target_mount(store, m, target_mountpoint, target)]
            + check_leases(store, m, releasing)
            + [check_attachments(store, m, node, releasing)])


# --- failover -------------------------------------------------------------------
def failover(store: Store, instance: str, target: str, target_mountpoint: str, node: str,
             stop_command: str = DEFAULT_STOP, start_command: str = DEFAULT_START,
             do_attach: bool = False, do_start: bool = False, log=lambda msg: None,
             lease_wait: float = LEASE_WAIT) -> list[CheckResult]:
    """Check everything, then stop, detach, swap the nodes, and attach/start if asked.

    Runs on the primary node (or anywhere when nothing is attached). The
    stop command runs here: give `ssh {primary} xl shutdown -w {instance}`
    to run it elsewhere. Returns the check results; raises ChecksFailed
    (nothing changed) or FailoverError (says how far it got).
    """
    m = store.load(instance)
    fields = {"instance": instance, "primary": m.primary, "target": target}
    # The primary's leases are expected if stopping the domain, or detaching this
    # node's devices (when this node is the primary), will end them.
    own = node == m.primary and any(r.get("node") == node for r in
                                    attach.live_records(store, instance, node).values())
    releasing = m.primary if stop_command or own else None
    results = failover_checks(store, instance, target, target_mountpoint, node, releasing)
    results.append(check_command("stop", stop_command, fields))
    if do_start:
        results.append(check_command("start", start_command, fields))
    if not all_ok(results):
        raise ChecksFailed(instance, results)

    if stop_command:
        argv = format_command(stop_command, fields)
        _run(argv, f"instance {instance}: stopping the domain", "nothing else changed")
        log(f"stopped the domain: {shlex.join(argv)}")
    done = attach.detach(store, node, instance)
    for rec in done:
        log(f"detached {rec['disk']} ({rec['device']}) on node {node}")
    held = _wait_for_leases(store, m, lease_wait)
    if held:
        raise FailoverError(f"instance {instance}: the domain is stopped and its disks "
                            f"detached here, but {'; '.join(held)}; manifest unchanged "
                            f"(primary still {m.primary})")
    with store.lock(instance):
        now = store.load(instance)
        if (now.primary, now.secondary) != (m.primary, m.secondary):
            raise FailoverError(f"instance {instance}: its nodes changed during the failover "
                                f"(now {now.primary}:{now.secondary}); manifest unchanged")
        now.primary, now.secondary = m.secondary, m.primary
        store.save(now)
    log(f"primary is now {target}, secondary {m.primary}")
    if do_attach:
        try:
            for rec in attach.attach(store, target_mountpoint, target, instance):
                log(f"attached {rec['disk']} as {rec['device']} on node {target}")
        except StoreError as e:
            raise FailoverError(f"{e}; the failover itself is done ({target} is primary): "
                                f"attach on {target} again") from None
    if do_start:
        argv = format_command(start_command, fields)
        _run(argv, f"instance {instance}: starting the domain on {target}",
             f"the failover itself is done ({target} is primary)")
        log(f"started the domain: {shlex.join(argv)}")
    return results


def _wait_for_leases(store: Store, m: Manifest, wait: float) -> list[str]:
    """The leases still held after `wait` seconds (FUSE releases asynchronously)."""
    deadline = time.monotonic() + wait
    while True:
        held = [f"{r.name} is still {r.detail}" for r in check_leases(store, m) if not r.ok]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def _run(argv: list[str], what: str, state: str) -> None:
    """Run a domain command; a failure says what state the failover is in."""
    try:
        run_tool(argv, what, FailoverError, timeout=600)
    except FailoverError as e:
        raise FailoverError(f"{e}; {state}") from None


# --- modify -------------------------------------------------------------------------
def modify(store: Store, instance: str, primary: str | None = None,
           secondary: str | None = None, os_name: str | None = None) -> Manifest:
    """Change an instance's nodes or OS under its lock; the manifest is replaced atomically."""
    with store.lock(instance):
        m = store.load(instance)
        if primary is not None:
            m.primary, m.secondary = primary, secondary or ""
        if os_name is not None:
            m.os = os_name
        store.save(m)
    return m


# --- live migration -----------------------------------------------------------------
SAMPLE = 64 << 10
SAMPLES = 16


def sample_offsets(size: int) -> list[int]:
    """The start, the end and evenly spread 64 KiB samples in between."""
    if size <= SAMPLE * SAMPLES:
        return list(range(0, size, SAMPLE))
    step = (size - SAMPLE) // (SAMPLES - 1)
    return [i * step for i in range(SAMPLES - 1)] + [size - SAMPLE]


def digest(read, size: int) -> str:
    h = hashlib.sha256()
    for off in sample_offsets(size):
        h.update(read(off, min(SAMPLE, size - off)))
    return h.hexdigest()


def check_same_file(store: Store, m: Manifest, mountpoint: str) -> list[CheckResult]:
    """Per disk: the target's view reads the same as the image here.

    The image is read here through vbdfs.images; the target's view through
    its mount (its daemon reading its own client's copy of the file). The
    start, the end and 14 samples between are hashed on both sides. mtime
    and allocation (which the mount passes through) are reported too.
    """
    out = []
    mp = os.path.normpath(os.path.abspath(mountpoint))
    for d in m.disks:
        name = f"same file {d.name}"
        view = attach.view_path(mp, m.name, d.name)
        try:
            st_here = store.stat_disk(d)
            with store.open_disk(d, read_only=True) as img:
                here = digest(img.read, img.size)
            st_there = os.stat(view)
            fd = os.open(view, os.O_RDONLY | os.O_CLOEXEC)
            try:
                there = digest(lambda off, n: os.pread(fd, n, off), st_there.st_size)
            finally:
                os.close(fd)
        except (OSError, ImageError) as e:
            out.append(CheckResult(name, False, str(e)))
            continue
        same_meta = (st_here.st_mtime_ns == st_there.st_mtime_ns
                     and st_here.st_blocks == st_there.st_blocks)
        meta = ("same mtime and allocation" if same_meta
                else "mtime or allocation differ (written meanwhile, or a copy?)")
        if here != there:
            out.append(CheckResult(name, False, f"contents differ: sha256 of "
                                   f"{len(sample_offsets(d.size))} samples is {here[:16]} "
                                   f"here, {there[:16]} through {view}; {meta}"))
        else:
            out.append(CheckResult(name, True, f"sha256 of {len(sample_offsets(d.size))} "
                                   f"samples {here[:16]} on both; {meta}; "
                                   f"here dev {st_here.st_dev} inode {st_here.st_ino}"))
    return out


def migrate_checks(store: Store, instance: str, target: str,
                   target_mountpoint: str) -> list[CheckResult]:
    """Before a live migration: the target sees the very files the primary writes.

    No lease check: the domain runs (and writes) on the primary during migration.
    """
    try:
        m = store.load(instance)
    except (StoreError, ManifestError, OSError) as e:
        return [CheckResult("manifest", False, str(e))]
    results = ([CheckResult("manifest", True, store.manifest_path(instance)),
                check_nodes(m, target)]
               + check_disks(store, m)
               + [check_target_mount(store, m, target_mountpoint, target)])
    if results[-1].ok:
        results += check_same_file(store, m, target_mountpoint)
    return results
