"""Loop devices as the kernel shows them, and the mount path they are made over.

Only os here: the Ganeti provider's attach, called before nearly every Ganeti
operation, answers from these without loading the store (see volumes.attach).
"""

from __future__ import annotations

import fcntl
import os
import struct


def view_path(mountpoint: str, instance: str, disk: str) -> str:
    """A disk's raw view in a vbdfs mount: MOUNTPOINT/INSTANCE/DISK."""
    return os.path.join(os.path.normpath(os.path.abspath(mountpoint)), instance, disk)


def loop_list(sysfs: str = "/sys/block") -> list[tuple[str, str, bool]]:
    """Every loop device in use: (device, backing file, read-only).

    Read from sysfs, where losetup reads it too (a bound loop device has
    loop/backing_file): running `losetup --list` cost every in-use check a
    fork and an exec.
    """
    out = []
    for name in os.listdir(sysfs):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"{sysfs}/{name}/loop/backing_file", encoding="utf-8",
                      errors="surrogateescape") as f:
                back = f.read().removesuffix("\n")
            with open(f"{sysfs}/{name}/ro") as f:
                read_only = f.read().strip() == "1"
        except OSError:                # not bound, or detached meanwhile (sysfs
            continue                   # answers ENODEV for a device going away)
        out.append((f"/dev/{name}", back.removesuffix(" (deleted)"), read_only))
    return sorted(out)


def loop_devices() -> dict[str, str]:
    """Every loop device in use: {device: backing file}."""
    return {device: back for device, back, _ in loop_list()}


LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 begins with lo_device and lo_inode (__u64 each); 232 bytes in all.
_LOOP_INFO64 = struct.Struct("=QQ216x")


def backs(device: str, st: os.stat_result) -> bool:
    """True if the loop device's backing file is the file st describes.

    sysfs gives a path only, and a path means different files in different
    mount namespaces (nodes in containers, the cluster tests): the kernel's
    device and inode numbers tell them apart."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:                    # not bound (any more)
        return False
    finally:
        os.close(fd)
    dev, ino = _LOOP_INFO64.unpack(info)
    return (dev, ino) == (st.st_dev, st.st_ino)


def loop_dio(device: str) -> bool | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return None
