"""After a daemon crash: clean the dead mount, re-attach the loop devices on it.

FUSE cannot outlive its server (libfuse 3.14 has no takeover): once the
daemon dies, every file opened through its mount fails with ENOTCONN, and a
loop device over a disk view stays bound to that dead file whatever is
mounted at the path later. So recovery is:

1. The daemon, started on a mount point where a dead vbdfs mount of its
   store was left (statfs fails with ENOTCONN), unmounts that lazily
   (fusermount3 -u -z) and mounts afresh: clean_dead_mount. Files still open
   on the dead mount, loop devices included, stay bound to it.
2. `vbdctl recover` (recover()) takes every loop device left on a dead
   connection of this store. Once the dead mount is unmounted, a loop
   device's backing file reads "/INSTANCE/DISK" (the path inside the lost
   mount), so a device counts if all of these hold:
   - its backing file is /INSTANCE/DISK, or MOUNTPOINT/INSTANCE/DISK under a
     dead vbdfs mount of this store still mounted elsewhere;
   - INSTANCE has DISK in this store, and the device's size is the disk's;
   - the file is on a dead FUSE connection: LOOP_GET_STATUS64, which asks
     the filesystem for the file's attributes, fails with ENOTCONN (or
     names a device no mount has, while the kernel still has them cached),
     and a direct read of the device fails.
   Then:
   - read-only: re-point it at the new mount's view with LOOP_CHANGE_FD
     (allowed only for read-only devices), even while in use. Kernels that
     ask the old file's filesystem for its size refuse that once the dead
     connection's cached attributes expired (6.18 does, within a second);
     then it is handled like a writable one;
   - unused: detach it and attach the view again, on the same device number
     if it is still free;
   - in use (mounted, open, stacked on, a Xen backend): leave it and name
     what uses it. Stop that, then run recover again.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time

from ..store import Store, StoreError
from . import attach, holders
from .tools import run_tool

LOOP_GET_STATUS64 = 0x4C05
LOOP_CHANGE_FD = 0x4C06
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit,
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags, names, key, init.
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")


class RecoverError(StoreError):
    """Recovery cannot start; the message says what to do first."""


# --- the mount point -------------------------------------------------------
def top_mount(mountpoint: str) -> tuple[str, str, str] | None:
    """(major:minor, fstype, source) of the top mount at mountpoint, or None."""
    mp = os.path.normpath(os.path.abspath(mountpoint))
    tops = [(dev, fstype, source) for dev, m, fstype, source in holders.mount_table() if m == mp]
    return tops[-1] if tops else None


def is_dead(path: str) -> bool:
    """Is path a FUSE mount whose daemon is gone? statfs asks the daemon every
    time; stat may be answered from the kernel's attribute cache."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def clean_dead_mount(store_root: str, mountpoint: str) -> str | None:
    """Unmount a dead vbdfs mount of this store left at mountpoint; say what was done.

    None if the mount point is not dead. Anything but a dead fuse.vbdfs mount
    of this store is left alone: RecoverError.
    """
    if not is_dead(mountpoint):
        return None
    top = top_mount(mountpoint)
    if top is None or top[1] != "fuse.vbdfs":
        what = f"a dead {top[1]} mount" if top else "not reachable"
        raise RecoverError(f"mount point {mountpoint} is {what} (Transport endpoint is not "
                           f"connected), not vbdfs's: unmount it yourself")
    if os.path.realpath(top[2]) != os.path.realpath(store_root):
        raise RecoverError(f"mount point {mountpoint} is a dead vbdfs mount of {top[2]}, "
                           f"not of {store_root}: unmount it yourself")
    run_tool(["fusermount3", "-u", "-z", mountpoint], f"unmounting the dead mount {mountpoint}",
             RecoverError)
    return (f"mount point {mountpoint} held a dead vbdfs mount (connection {top[0]}, its "
            "daemon died): unmounted it lazily; loop devices still on it fail until "
            "`vbdctl recover` re-attaches them")


# --- loop devices ----------------------------------------------------------------
def on_dead_fuse(device: str) -> bool:
    """Is the loop device's backing file on a FUSE connection whose daemon is gone?"""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError as e:
        return e.errno == errno.ENOTCONN
    finally:
        os.close(fd)
    dev = LOOP_INFO64.unpack(info)[0]    # attributes still cached: is it mounted, alive?
    if os.major(dev) != 0:
        return False
    mounted = [m for m in holders.mount_table() if m[0] == f"0:{os.minor(dev)}"]
    return not mounted or (mounted[-1][2] == "fuse.vbdfs" and is_dead(mounted[-1][1]))


def reads_fail(device: str) -> bool:
    """Does a direct read of the device's first block fail (a dead connection)?"""
    buf = mmap.mmap(-1, 4096)           # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        os.preadv(fd, [buf], 0)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
        buf.close()


def _loop_setting(device: str, name: str) -> str:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/{name}") as f:
            return f.read().strip()
    except OSError:
        return ""


def _relative(back: str, mountpoints: set[str]) -> tuple[str, str] | None:
    """(instance, disk) of a backing file on a dead connection: under one of its
    mount points, or "/INSTANCE/DISK" once that was unmounted."""
    for mp in mountpoints:
        key = holders.split_view(mp, back)
        if key:
            return key
    parts = back.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and not parts[0] and all(parts[1:]) else None


def recover(store: Store, mountpoint: str, node: str) -> list[dict]:
    """Re-attach the loop devices left on dead connections; one result per device.

    Each result: device, instance, disk, action ("re-attached", "re-pointed",
    "held", "failed"), new_device, and why (what holds it, or the error).
    """
    try:
        mp = attach.check_mount(store, mountpoint)
    except StoreError as e:
        raise RecoverError(f"{e}; recovery re-attaches disks over a live mount") from None
    dead_mounts = {m for _, m, fstype, source in holders.mount_table()
                   if fstype == "fuse.vbdfs" and os.path.realpath(source) == store.root
                   and is_dead(m)}
    results = []
    for device, back, read_only in attach.loop_list():
        key = _relative(back, dead_mounts)
        if key is None or _disk_size(store, *key) != _loop_size(device):
            continue
        if on_dead_fuse(device) and reads_fail(device):
            results.append(_recover_one(store, mp, node, device, key, read_only))
    return results


def _disk_size(store: Store, instance: str, disk: str) -> int | None:
    try:
        d = store.load(instance).disk(disk)
    except Exception:                  # no such instance or disk, or a broken manifest
        return None
    return d.size if d.name == disk else None


def _loop_size(device: str) -> int | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/size") as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def _recover_one(store: Store, mp: str, node: str, device: str, key: tuple[str, str],
                 read_only: bool) -> dict:
    instance, disk = key
    view = attach.view_path(mp, instance, disk)
    result = {"device": device, "instance": instance, "disk": disk, "new_device": None}
    if not os.path.exists(view):
        return dict(result, action="failed", why=f"{view} does not exist on the new mount")
    note = ""
    if read_only:
        try:
            _change_fd(device, view)
            return dict(result, action="re-pointed", new_device=device)
        except OSError as e:
            note = f" (re-pointing it failed: {e.strerror})"
    users = holders.loop_users(device)
    if users:
        return dict(result, action="held", why="; ".join(users) + note)
    try:
        new = _reattach(device, view)
    except StoreError as e:
        return dict(result, action="failed", why=str(e))
    _update_records(store, node, instance, disk, device, new, view)
    return dict(result, action="re-attached", new_device=new)


def _change_fd(device: str, view: str) -> None:
    new = os.open(view, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, LOOP_CHANGE_FD, new)
        finally:
            os.close(fd)
    finally:
        os.close(new)


def _reattach(device: str, view: str) -> str:
    """Detach device and attach view again, with the same settings; the new device."""
    args = [f"--direct-io={'on' if _loop_setting(device, 'dio') == '1' else 'off'}"]
    with open(f"/sys/block/{os.path.basename(device)}/ro") as f:
        if f.read().strip() == "1":
            args.append("--read-only")
    if _loop_setting(device, "partscan") == "1":
        args.append("--partscan")
    for name in ("offset", "sizelimit"):
        if _loop_setting(device, name) not in ("", "0"):
            args.append(f"--{name}={_loop_setting(device, name)}")
    run_tool(["losetup", "--detach", device], f"detaching {device}", RecoverError)
    deadline = time.monotonic() + 5
    while device in attach.loop_devices():
        if time.monotonic() > deadline:    # opened meanwhile: autoclear, not detached
            raise RecoverError(f"{device} was opened meanwhile; it detaches when closed")
        time.sleep(0.05)
    try:
        run_tool(["losetup", *args, device, view], f"attaching {view} to {device}",
                 RecoverError)
        return device
    except RecoverError:               # taken meanwhile: any free device will do
        return run_tool(["losetup", "--find", "--show", *args, view],
                        f"attaching {view}", RecoverError).strip()


def _update_records(store: Store, node: str, instance: str, disk: str, old: str, new: str,
                    view: str) -> None:
    """Point this node's attachment record of the disk at the new device."""
    try:
        with store.lock(instance):
            records = attach.read_records(store, instance)
            r = records.get(disk)
            if r and r.get("node") == node and r.get("device") == old:
                r.update(device=new, path=view)
                attach.write_records(store, instance, records)
    except (StoreError, OSError):
        pass                           # a hand-made device, or an instance gone: no record
