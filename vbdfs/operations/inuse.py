"""Is an instance in use? Asked before remove, rename and grow.

An instance is in use on this node if any of these holds (each is checked,
and every finding is reported):

1. an attachment record is live (attach.live_records; another node's
   record always counts, it cannot be checked from here);
2. a loop device is backed by one of its disks: the view under any vbdfs
   mount of this store (from /proc/self/mountinfo) or under the configured
   mountpoint, or the image file itself (a hand-made `losetup`);
3. a process has one of those paths open: the symlinks /proc/PID/fd/*.
   That finds guests' qemu (qdisk), tapdisk, `dd`, and the vbdfs daemon
   itself, which keeps an image open only while its view is open;
4. someone holds a writer's locks on an image file (a vbdfs write lease, on
   any node, or qemu writing it): the OFD locks of DESIGN invariant 5.

Not seen: read-only users on other nodes that left no record, and files
mapped without an open descriptor.
"""

from __future__ import annotations

import os

from ..store import Manifest, Store, StoreError, leases
from . import attach


class InUse(StoreError):
    """The instance is attached or open; the message says by what."""


def disk_paths(store: Store, manifest: Manifest, mountpoint: str | None) -> dict[str, str]:
    """{path: disk name} for every path through which a disk can be opened."""
    mps = set(attach.vbdfs_mountpoints(store))
    if mountpoint:
        mps.add(os.path.normpath(os.path.abspath(mountpoint)))
    out = {}
    for d in manifest.disks:
        out[d.path] = d.name
        for mp in mps:
            out[attach.view_path(mp, manifest.name, d.name)] = d.name
    return out


def open_by(paths: dict[str, str]) -> list[tuple[int, str, str, bool]]:
    """(pid, command, path, for writing) for every open descriptor on one of paths."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:            # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in paths:
                found.append((int(entry), describe_process(entry), target,
                              _open_for_writing(entry, fd)))
    return found


def _open_for_writing(pid: str, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
    except (OSError, IndexError, ValueError):
        return True                # cannot tell: assume the worst
    return flags & os.O_ACCMODE != os.O_RDONLY


def describe_process(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if any(a == b"vbdfs.daemon" or a.endswith(b"/vbdfs") for a in argv[:3]):
            return "the vbdfs daemon: the disk is open through a mount"
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def users(store: Store, manifest: Manifest, mountpoint: str | None,
          node: str, writing_only: bool = False) -> list[tuple[str, str]]:
    """Why the instance is in use: (disk, reason) per finding; [] if unused.

    writing_only: only users that may write (what export must not race with).
    """
    out = []
    loops = attach.loop_list()
    records = attach.live_records(store, manifest.name, node,
                                  loops={dev: back for dev, back, _ in loops})
    for key, r in sorted(records.items()):
        disk = key.partition("@")[0]        # DISK@NODE: attached per node (Ganeti)
        if not (writing_only and r.get("read_only")):
            out.append((disk, f"disk {disk} is attached as {r.get('device')} on node "
                              f"{r.get('node')}"))
    paths = disk_paths(store, manifest, mountpoint)
    recorded = {r.get("device") for r in records.values()}
    for device, back, read_only in sorted(loops):
        if back in paths and device not in recorded and not (writing_only and read_only):
            out.append((paths[back], f"disk {paths[back]} is the backing file of {device} "
                                     f"({back})"))
    seen = set()
    how = "open for writing" if writing_only else "open"
    for pid, comm, path, writing in open_by(paths):
        if (pid, path) not in seen and (writing or not writing_only):
            seen.add((pid, path))
            out.append((paths[path], f"disk {paths[path]} is {how} by process {pid} "
                                     f"({comm}): {path}"))
    out += lease_holders(store, manifest)
    return out


def lease_holders(store: Store, manifest: Manifest) -> list[tuple[str, str]]:
    """(disk, reason) for every disk someone holds a write lease on, on any node."""
    out = []
    state = store.state_dir("leases")
    for d in manifest.disks:
        holder = leases.holder(state, manifest.name, d.name, d.path, store.disk_root(d.path))
        if holder is not None:
            out.append((d.name, f"disk {d.name} is being written by "
                                f"{leases.describe(holder)}: {d.path}"))
    return out


def refuse_if_used(store: Store, mountpoint: str | None, node: str, action: str,
                   disk: str | None = None):
    """A check(manifest) for Store.remove/rename/grow that raises InUse.

    With disk, only that disk's users count (growing sda while sdb is attached is fine).
    """
    def check(manifest: Manifest) -> None:
        name = None if disk is None else manifest.disk(disk).name
        reasons = [r for d, r in users(store, manifest, mountpoint, node)
                   if name is None or d == name]
        if reasons:
            what = f"instance {manifest.name}" + (f" disk {name}" if name else "")
            raise InUse(f"cannot {action} {what}: " + "; ".join(reasons))
    return check


def remove_instance(store: Store, mountpoint: str | None, node: str, name: str) -> None:
    """Remove an instance unless attached or open; drop its stale records."""
    store.remove(name, check=refuse_if_used(store, mountpoint, node, "remove"))
    with store.lock(name):
        attach.forget(store, name)


def rename_instance(store: Store, mountpoint: str | None, node: str, old: str, new: str):
    m = store.rename(old, new, check=refuse_if_used(store, mountpoint, node, "rename"))
    with store.lock_many(old, new):
        attach.forget(store, old)          # stale by now: live ones refused the rename
        attach.forget(store, new)
    return m


def grow_disk(store: Store, mountpoint: str | None, node: str, name: str, disk: str,
              new_size: int | None = None, growth: int | None = None):
    """Grow a disk that nothing has open: the daemon caches an open image's size
    (and for qcow2 its metadata), so growing under it is refused."""
    return store.grow(name, disk, new_size=new_size, growth=growth, node=node,
                      check=refuse_if_used(store, mountpoint, node, "grow", disk))
