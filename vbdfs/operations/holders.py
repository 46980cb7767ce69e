"""What holds a mount's disks, and what holds a loop device.

Two questions with the same kind of answer, a list of short descriptions:

- mount_holders: why may the daemon not unmount? A loop device backed by a
  disk view under the mount, or a process with a view open (/proc/PID/fd).
  The daemon asks on a stop request (with the disks it has open, so a disk
  whose holder it cannot see, e.g. a process in another mount namespace,
  still counts); `vbdctl daemon-stop` asks before sending the signal.
- loop_users: may a loop device be detached? Not while a device stacks on
  it (/sys/block/loopN/holders: dm, md), a filesystem on it or on one of its
  partitions is mounted, a process has it open, or a Xen block backend uses
  it (xenstore, where xenstore-ls exists: blkback opens the device in the
  kernel, so no process shows it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from . import attach, inuse


class Under:
    """The paths strictly below a directory, as a container for inuse.open_by."""

    def __init__(self, directory: str):
        self.prefix = directory.rstrip("/") + "/"

    def __contains__(self, path) -> bool:
        return isinstance(path, str) and path.startswith(self.prefix)


class Either:
    """A path in either of two containers."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __contains__(self, path) -> bool:
        return path in self.a or path in self.b


def split_view(mountpoint: str, path: str) -> tuple[str, str] | None:
    """(instance, disk) of a view path MOUNTPOINT/INSTANCE/DISK, else None."""
    rest = path[len(mountpoint.rstrip("/")) + 1:] if path in Under(mountpoint) else ""
    parts = rest.split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def mount_holders(mountpoint: str, open_disks=()) -> dict[tuple[str, str], list[str]]:
    """{(instance, disk): [what holds it]} for the disks held through the mount.

    open_disks: (instance, disk) pairs known to be open (the daemon's handles);
    each is in the answer, with a note if no holder can be seen from here.
    """
    mp = os.path.normpath(mountpoint)
    found: dict[tuple[str, str], list[str]] = {}
    loops = [(split_view(mp, back), device, read_only)
             for device, back, read_only in attach.loop_list()]
    loops = [(key, device, read_only) for key, device, read_only in loops if key]
    # One pass over /proc for the views and the loop devices (it is the slow part).
    dev_paths = {f"/dev/{n}" for _, device, _ in loops for n in _sysfs_names(device)}
    opened = inuse.open_by(Either(Under(mp), dev_paths))
    for key, device, read_only in loops:
        users = loop_users(device, opened)
        found.setdefault(key, []).append(
            f"loop device {device}" + (" (read-only)" if read_only else "")
            + (f", used by {', '.join(users)}" if users else ""))
    for pid, comm, path, writing in opened:
        key = split_view(mp, path)
        if key:                        # (a loop device's path gives None)
            found.setdefault(key, []).append(
                f"process {pid} ({comm}), {'read-write' if writing else 'read-only'}")
    for key in open_disks:
        found.setdefault(tuple(key), ["open by a process not visible here (another "
                                      "mount namespace?) or closing"])
    return dict(sorted(found.items()))


def describe(held: dict[tuple[str, str], list[str]]) -> list[str]:
    return [f"{inst}/{disk}: {'; '.join(what)}" for (inst, disk), what in held.items()]


def _sysfs_names(device: str) -> list[str]:
    """The loop device and its partitions, as names in /sys/block/NAME."""
    name = os.path.basename(device)
    try:
        parts = [e for e in os.listdir(f"/sys/block/{name}") if e.startswith(name + "p")]
    except OSError:
        parts = []
    return [name] + sorted(parts)


def _sysfs_dir(loop: str, name: str) -> str:
    return f"/sys/block/{loop}" + ("" if name == loop else f"/{name}")


def loop_users(device: str, opened=None) -> list[str]:
    """What uses a loop device or its partitions; [] if nothing does.

    opened: inuse.open_by() over paths that include the device's, if already read.
    """
    loop = os.path.basename(device)
    names = _sysfs_names(device)
    out, devnums = [], {}
    for name in names:
        d = _sysfs_dir(loop, name)
        try:
            out += [f"device /dev/{h}" for h in sorted(os.listdir(f"{d}/holders"))]
            with open(f"{d}/dev") as f:
                devnums[f.read().strip()] = name
        except OSError:
            continue
    for majmin, mp, fstype, _ in mount_table():
        if majmin in devnums:
            out.append(f"filesystem {fstype} on /dev/{devnums[majmin]} mounted at {mp}")
    paths = {f"/dev/{n}" for n in names}
    for pid, comm, path, writing in inuse.open_by(paths) if opened is None else opened:
        if path in paths:
            out.append(f"process {pid} ({comm}) has {path} open")
    out += [f"Xen block backend {b}" for b in xen_backends(devnums)]
    return out


def mount_table() -> list[tuple[str, str, str, str]]:
    """(major:minor, mount point, fstype, source) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append((fields[2], attach._unescape(fields[4]), rfields[0],
                            attach._unescape(rfields[1])))
    return out


def xen_backends(devnums: dict[str, str]) -> list[str]:
    """Xen vbd backends whose physical-device is one of devnums (decimal major:minor)."""
    if shutil.which("xenstore-ls") is None:
        return []
    try:
        text = subprocess.run(["xenstore-ls", "-f", "/local/domain/0/backend"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in text.splitlines():
        path, _, value = line.partition(" = ")
        if path.endswith("/physical-device"):
            try:                       # blkback writes it in hex, "7:3"
                major, minor = (int(x, 16) for x in value.strip('"').split(":"))
            except ValueError:
                continue
            if f"{major}:{minor}" in devnums:
                out.append(path.removesuffix("/physical-device"))
    return out
