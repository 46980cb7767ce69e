"""Mount a guest's filesystem in Dom0 ("temporarily mounted", for backup tools).

mount: `losetup --partscan --find --show [--read-only]` over the mount's raw
view MOUNTPOINT/INSTANCE/DISK (raw whatever the image format, so qcow2 disks
work too; `partx --add` where the kernel found no partitions), then
`mount -o ro` (or rw) of the whole device or of partition N. A read-only mount whose filesystem needs journal recovery (a running or
crashed guest) is retried with `ro,norecovery`: the loop device is
read-only, so nothing is replayed into the guest's disk.

umount: the mounted device is read from /proc/self/mountinfo, its loop
device's backing file must be a view of this store's vbdfs mount; then
`umount` and `losetup --detach`.

Nothing is recorded: the mount table and `losetup --list` are the record,
and inuse sees the loop device, so remove/convert/grow refuse meanwhile.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time

from ..store import Store, StoreError
from . import attach
from .tools import run_tool


class GuestMountError(StoreError):
    """A guest mount or unmount failed; the message names the disk, device or directory."""


def _run(args: list[str], what: str) -> str:
    return run_tool(args, what, GuestMountError, timeout=120)


def _partitions(device: str) -> list[int]:
    base = os.path.basename(device)
    return sorted(int(p.rsplit("p", 1)[1]) for p in glob.glob(f"/sys/block/{base}/{base}p*"))


def _detach(device: str) -> None:
    subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


def mount_guest(store: Store, vbdfs_mountpoint: str, instance: str, disk: str, target: str,
                partition: int | None = None, read_write: bool = False) -> dict:
    m = store.load(instance)
    d = m.disk(disk)
    what = f"instance {instance} disk {d.name}"
    target = os.path.abspath(target)
    if not os.path.isdir(target):
        raise GuestMountError(f"{target} is not a directory")
    if os.path.ismount(target):
        raise GuestMountError(f"{target} is already a mount point")
    view = attach.view_path(attach.check_mount(store, vbdfs_mountpoint), instance, d.name)
    args = ["losetup", "--partscan", "--find", "--show"] + ([] if read_write else ["--read-only"])
    device = _run(args + [view], f"{what}: attaching a loop device").strip()
    try:
        if not _partitions(device):
            # A kernel without the partition table's parser (CONFIG_MSDOS_PARTITION
            # unset) scans nothing: let util-linux read the table and add them.
            subprocess.run(["partx", "--add", device], capture_output=True, timeout=60)
        source = device
        if partition is not None:
            source = f"{device}p{partition}"
            deadline = time.monotonic() + 5      # the kernel's partition scan is asynchronous
            while not os.path.exists(source) and time.monotonic() < deadline:
                if _partitions(device) and partition not in _partitions(device):
                    break                        # scanned, and there is no such partition
                time.sleep(0.05)
            if not os.path.exists(source):
                raise GuestMountError(f"{what} has no partition {partition} (partitions: "
                                      f"{', '.join(map(str, _partitions(device))) or 'none'})")
        opts = "rw" if read_write else "ro"
        r = subprocess.run(["mount", "-o", opts, source, target], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0 and not read_write:
            r = subprocess.run(["mount", "-o", "ro,norecovery", source, target],
                               capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            parts = _partitions(device) if partition is None else []
            hint = (f" (the disk has partitions {', '.join(map(str, parts))}: give "
                    "--partition N)") if parts else ""
            raise GuestMountError(f"{what}: mounting {source} on {target} failed: "
                                  f"{(r.stderr or r.stdout).strip()}{hint}")
    except BaseException:
        _detach(device)
        raise
    return {"instance": instance, "disk": d.name, "device": device, "source": source,
            "mountpoint": target, "read_only": not read_write}


def umount_guest(store: Store, target: str) -> dict:
    target = os.path.normpath(os.path.abspath(target))
    here = [source for mp, _fstype, source in attach.mounts() if mp == target]
    if not here:
        raise GuestMountError(f"{target} is not a mount point")
    source = here[-1]
    match = re.fullmatch(r"(/dev/loop\d+)(p\d+)?", source)
    back = attach.loop_devices().get(match.group(1)) if match else None
    views = [os.path.join(mp, "") for mp in attach.vbdfs_mountpoints(store)]
    if back is None or not any(back.startswith(v) for v in views):
        raise GuestMountError(f"{target} is a mount of {source}, not of a loop device over "
                              f"a vbdfs disk of the store {store.root}: not unmounting it")
    device = match.group(1)
    _run(["umount", target], f"unmounting {target}")
    # Another partition of the same disk may still be mounted: then leave the device.
    if any(re.fullmatch(re.escape(device) + r"(p\d+)?", s) for _, _, s in attach.mounts()):
        return {"mountpoint": target, "device": device, "detached": False}
    _run(["losetup", "--detach", device], f"detaching {device}")
    return {"mountpoint": target, "device": device, "detached": True, "disk": back}
