"""Attach an instance's disks as Dom0 block devices, and detach them.

A kernel driver always opens the mount's view, MOUNTPOINT/INSTANCE/DISK,
never the image file: the view is raw whatever the format, and it goes
through the daemon, which holds the image's metadata.

- loop: util-linux `losetup --find --show`, which allocates a new
  /dev/loopN through /dev/loop-control when all are busy (no limit of 8).
  Direct I/O is on by default: without it the loop driver keeps a second
  copy of every block in Dom0's page cache and acknowledges writes that
  only reached that cache.
- blktap/blktap2: `tap-ctl create -a aio:VIEW` where tap-ctl exists. It
  was removed from Xen 4.13 and Debian ships none, so elsewhere the
  error says so and names the alternatives.
- qdisk: Xen's qemu opens the disk itself; nothing to attach in Dom0.

Each attachment is recorded in STORE/.vbdfs/attachments/INSTANCE.json
(replaced atomically, under the instance lock) with the node that made it,
so `info` shows it and `remove` refuses. A record's key is the disk's name,
or DISK@NODE for a disk that several nodes attach at once (a Ganeti volume
during a live migration: per_node). Records of this node are checked
against the kernel (sysfs's loop devices, tap-ctl list) and stale ones are
ignored and dropped; records of another node cannot be checked here and
count as live.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

from ..store import Manifest, Store, StoreError
from ..store.store import write_atomic
from .loops import loop_devices, loop_dio, loop_list, view_path  # noqa: F401 (re-exported)
from .tools import run_tool

LOOP_DRIVERS = ("loop",)
BUSY_WAIT = 2.0          # seconds a detached loop device may stay busy before we say so
TAP_DRIVERS = ("blktap", "blktap2")


class AttachError(StoreError):
    """An attach or detach failed; the message names the instance, disk or device."""


# --- the mount ---------------------------------------------------------------
def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount, in mount order."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append((_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def vbdfs_mountpoints(store: Store) -> list[str]:
    """Where a vbdfs daemon serves this store (its fsname is the store root)."""
    root = store.root                  # already resolved
    return [mp for mp, fstype, source in mounts()
            if fstype == "fuse.vbdfs" and os.path.realpath(source) == root]


def check_mount(store: Store, mountpoint: str) -> str:
    """The mountpoint, if the top mount there is vbdfs serving this store."""
    mp = os.path.normpath(os.path.abspath(mountpoint))
    top = [(fstype, source) for m, fstype, source in mounts() if m == mp]
    if not top:
        raise AttachError(f"{mp} is not a mount point: start the vbdfs daemon "
                          f"(vbdfs {store.root} {mp})")
    fstype, source = top[-1]
    if fstype != "fuse.vbdfs":
        raise AttachError(f"{mp} is a {fstype} mount, not vbdfs")
    if os.path.realpath(source) != store.root:
        raise AttachError(f"{mp} is a vbdfs mount of {source}, not of the store {store.root}")
    try:
        os.statvfs(mp)        # not stat: the kernel may answer that from its cache
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise AttachError(f"the vbdfs daemon serving {mp} is gone: start it again "
                              "(it cleans up the dead mount), then run `vbdctl recover`"
                              ) from None
        raise
    return mp


# --- the kernel's view --------------------------------------------------------
def _run(args: list[str], what: str) -> str:
    return run_tool(args, what, AttachError)


def tap_ctl() -> str | None:
    return shutil.which("tap-ctl")


def tap_devices() -> list[dict]:
    """`tap-ctl list` as dicts (pid, minor, state, args); [] without tap-ctl."""
    if tap_ctl() is None:
        return []
    out = []
    for line in _run(["tap-ctl", "list"], "listing tap devices").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields:
            out.append(fields)
    return out


# --- records -------------------------------------------------------------------
def _records_path(store: Store, instance: str) -> str:
    return os.path.join(store.state_dir("attachments"), instance + ".json")


def read_records(store: Store, instance: str) -> dict[str, dict]:
    """{disk name: record} as stored, live or not."""
    try:
        with open(_records_path(store, instance), "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AttachError(f"instance {instance}: attachment records unreadable: {e}") from None
    disks = raw.get("disks") if isinstance(raw, dict) else None
    if not isinstance(disks, dict):
        raise AttachError(f"instance {instance}: attachment records malformed")
    return disks


def write_records(store: Store, instance: str, records: dict[str, dict]) -> None:
    """Replace the records (the caller holds the instance lock); none left: no file."""
    path = _records_path(store, instance)
    if not records:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    write_atomic(path, (json.dumps({"instance": instance, "disks": records}, indent=2,
                                   sort_keys=True) + "\n").encode())


def is_live(record: dict, node: str, loops: dict[str, str] | None = None,
            taps: list[dict] | None = None) -> bool:
    if record.get("node") != node:
        return True                    # another node's device: cannot check it from here
    if record.get("driver") in LOOP_DRIVERS:
        loops = loop_devices() if loops is None else loops
        return loops.get(record.get("device")) == record.get("path")
    if record.get("driver") in TAP_DRIVERS:
        taps = tap_devices() if taps is None else taps
        return any(t.get("args") == "aio:" + record.get("path", "") for t in taps)
    return False


def live_records(store: Store, instance: str, node: str,
                 loops: dict[str, str] | None = None) -> dict[str, dict]:
    """The attachment records still true (loops: loop_devices(), if already listed)."""
    records = read_records(store, instance)
    if not records:
        return {}
    loops = loop_devices() if loops is None else loops
    taps = tap_devices() if any(r.get("driver") in TAP_DRIVERS for r in records.values()) else []
    return {k: r for k, r in records.items() if is_live(r, node, loops, taps)}


def forget(store: Store, instance: str) -> None:
    """Drop an instance's records (after remove; the caller holds the lock)."""
    write_records(store, instance, {})


# --- attach and detach ------------------------------------------------------------
def _select(manifest: Manifest, disk: str | None):
    if disk is None:
        return list(manifest.disks)
    return [manifest.disk(disk)]


def record_key(disk: str, node: str, per_node: bool) -> str:
    return f"{disk}@{node}" if per_node else disk


def attach(store: Store, mountpoint: str, node: str, instance: str, disk: str | None = None,
           read_only: bool = False, direct_io: bool = True,
           driver: str | None = None, per_node: bool = False) -> list[dict]:
    """Attach one disk, or every disk with a Dom0 driver; return the new records.

    All or nothing: if one disk fails, the ones attached by this call are detached.
    per_node: other nodes may have the disk attached too (records keyed DISK@NODE).
    """
    if driver is not None and driver not in LOOP_DRIVERS + TAP_DRIVERS:
        raise AttachError(f"cannot attach with driver {driver!r} "
                          f"(one of {', '.join(LOOP_DRIVERS + TAP_DRIVERS)})")
    with store.lock(instance):
        m = store.load(instance)
        mp = check_mount(store, mountpoint)
        disks = _select(m, disk)
        if driver is None:
            if disk is not None and disks[0].driver == "qdisk":
                raise AttachError(f"instance {instance} disk {disks[0].name} uses the qdisk "
                                  "driver: Xen's qemu opens it itself, there is nothing to "
                                  "attach in Dom0 (use --driver loop for Dom0 access)")
            disks = [d for d in disks if d.driver != "qdisk"]
            if not disks:
                raise AttachError(f"instance {instance}: every disk uses the qdisk driver; "
                                  "nothing to attach in Dom0 (use --driver loop)")
        records = live_records(store, instance, node)
        for d in disks:
            if record_key(d.name, node, per_node) in records:
                r = records[record_key(d.name, node, per_node)]
                raise AttachError(f"instance {instance} disk {d.name} is already attached "
                                  f"as {r.get('device')} on node {r.get('node')}")
        made = []
        try:
            for d in disks:
                view = view_path(mp, instance, d.name)
                if not os.path.exists(view):
                    raise AttachError(f"instance {instance} disk {d.name}: {view} does not "
                                      "exist (is the daemon serving this instance?)")
                reason = read_only_reason(view)
                if reason and not read_only:
                    raise AttachError(f"instance {instance} disk {d.name} can only be "
                                      f"attached read-only (--read-only): {reason}")
                rec = _attach_one(instance, d.name, d.driver if driver is None else driver,
                                  view, read_only, direct_io)
                rec["node"] = node
                made.append(rec)
                records[record_key(d.name, node, per_node)] = rec
            write_records(store, instance, records)
        except BaseException:
            for rec in reversed(made):
                try:
                    _detach_one(instance, rec)
                except AttachError:
                    pass
            raise
        return made


def _attach_one(instance: str, disk: str, driver: str, view: str, read_only: bool,
                direct_io: bool) -> dict:
    what = f"instance {instance} disk {disk}"
    rec = {"disk": disk, "driver": driver, "path": view, "read_only": read_only,
           "since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    if driver in LOOP_DRIVERS:
        args = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
        if read_only:
            args.append("--read-only")
        device = _run(args + [view], f"{what}: attaching a loop device").strip()
        if not device.startswith("/dev/"):
            raise AttachError(f"{what}: losetup printed {device!r}, not a device")
        if not read_only and _loop_read_only(device):
            # losetup falls back to read-only when open() says EROFS: the disk
            # became read-only since the check above. Not what was asked.
            _run(["losetup", "--detach", device], f"{what}: detaching {device}")
            raise AttachError(f"{what} can only be attached read-only (--read-only): "
                              f"{read_only_reason(view) or 'the mount refused writing'}")
        rec.update(device=device, direct_io=loop_dio(device))
        return rec
    if tap_ctl() is None:
        raise AttachError(f"{what} uses the {driver} driver, but tap-ctl is not installed: "
                          "blktap was removed from Xen 4.13 and Debian has no package. "
                          "Attach it with --driver loop, or give the disk the qdisk driver "
                          "(Xen's qemu then opens it itself)")
    if read_only:
        raise AttachError(f"{what}: read-only attachment is not supported with {driver}")
    device = _run(["tap-ctl", "create", "-a", "aio:" + view], f"{what}: tap-ctl create").strip()
    rec.update(device=device)
    return rec


def read_only_reason(view: str) -> str | None:
    """Why the mount serves this disk read-only only (its user.vbdfs.read_only), or None."""
    try:
        return os.getxattr(view, "user.vbdfs.read_only").decode(errors="replace")
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _loop_read_only(device: str, sysfs: str = "/sys/block") -> bool:
    with open(f"{sysfs}/{os.path.basename(device)}/ro") as f:
        return f.read().strip() == "1"


def _detach_one(instance: str, rec: dict) -> None:
    what = f"instance {instance} disk {rec.get('disk')}"
    device, path = rec.get("device"), rec.get("path")
    if rec.get("driver") in LOOP_DRIVERS:
        # Only detach the device if it still is ours: its number may have been reused.
        if loop_devices().get(device) != path:
            return
        _run(["losetup", "--detach", device], f"{what}: detaching {device}")
        # Busy, the kernel set autoclear: it goes once its last user closes it.
        # udev's probe of a new device is such a user for a moment: wait that out.
        deadline = time.monotonic() + BUSY_WAIT
        while loop_devices().get(device) == path:
            if time.monotonic() > deadline:
                raise AttachError(f"{what}: {device} is busy (mounted or open?); it will "
                                  "detach when its last user closes it")
            time.sleep(0.05)
        return
    for t in tap_devices():
        if t.get("args") == "aio:" + path:
            _run(["tap-ctl", "destroy", "-p", t["pid"], "-m", t["minor"]],
                 f"{what}: tap-ctl destroy")


def detach_per_node(store: Store, node: str, instance: str, disk: str) -> dict | None:
    """Detach this node's device of a disk attached per_node; None if it has none."""
    with store.lock(instance):
        records = read_records(store, instance)
        rec = records.get(record_key(disk, node, True))
        if rec is None:
            return None
        _detach_one(instance, rec)
        del records[record_key(disk, node, True)]
        write_records(store, instance, records)
        return rec


def detach(store: Store, node: str, instance: str, disk: str | None = None) -> list[dict]:
    """Detach one disk or all attached ones of this node; return the records dropped."""
    with store.lock(instance):
        records = read_records(store, instance)
        if disk is not None:
            name = store.load(instance).disk(disk).name
            if name not in records:
                raise AttachError(f"instance {instance} disk {name} is not attached")
            names = [name]
        else:
            names = sorted(records)
        foreign = [n for n in names if records[n].get("node") != node]
        done = []
        try:
            for name in names:
                if name not in foreign:
                    _detach_one(instance, records[name])
                    done.append(records.pop(name))
        finally:
            write_records(store, instance, records)
        if foreign:
            raise AttachError(f"instance {instance}: " + ", ".join(
                f"disk {n} is attached on node {records[n].get('node')}" for n in foreign)
                + "; detach it there")
        return done
