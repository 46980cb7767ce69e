"""Write leases on disk images: one writer per image, across processes and nodes.

A lease is a set of OFD byte-range locks on the image file, laid out the way
qemu locks images (block/file-posix.c): byte 100+i is read-locked by whoever
holds permission i, byte 200+i by whoever does not share permission i. So
qemu-img and qemu-storage-daemon refuse to write an image vbdfs writes, vbdfs
refuses one qemu writes, and two vbdfs daemons (nodes) exclude each other.
OFD locks go away with the process that held them (a killed daemon's leases
end with it), and NFS, CephFS and GlusterFS propagate them between hosts.

Next to the locks, a record STORE/.vbdfs/leases/INSTANCE/DISK.json says who
holds the lease (node, pid, since) for vbdctl's messages. The locks are the
truth; a record whose locks are gone is stale.

A lease is exclusive (the one writer) or shared: a shared lease holds the
write permission but shares it, as qemu does with share-rw=on, so two
shared holders coexist and exclude every exclusive one. Ganeti's live
migration needs that: both nodes have the disk open for writing while the
hypervisor moves the guest (see README "Ganeti"). set_shared() switches a
lease's mode on its own descriptor, so a downgrade never lets go in between.
"""

from __future__ import annotations

import json
import os
import time

from ..images.confined import UnsafeFile, open_regular
from ..images.fileops import write_atomic
from ..log import get_logger
from .locks import LockBusy, ofd_lock, ofd_test, ofd_unlock

log = get_logger(__name__)

PERM_BASE = 100
SHARED_BASE = 200
# qemu's BLK_PERM_* bit numbers.
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
WRITER_PERMS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED)   # what a writer holds
WRITER_UNSHARED = (WRITE, RESIZE)                           # what it lets nobody else do
SHARED_UNSHARED = (RESIZE,)                                 # a shared writer shares WRITE


class LeaseBusy(Exception):
    """Another process or node writes the image (or forbids writing it)."""


class Lease:
    def __init__(self, fd: int, record_path: str | None, record: dict | None = None,
                 shared: bool = False):
        self.fd = fd
        self.record_path = record_path
        self.record = record
        self.shared = shared

    def _write_record(self) -> None:
        # The record only names the holder for messages; the locks are the
        # lease. A full or read-only store must not fail the open over it.
        if not self.record_path:
            return
        self.record["shared"] = self.shared
        try:
            os.makedirs(os.path.dirname(self.record_path), mode=0o700, exist_ok=True)
            write_atomic(self.record_path, json.dumps(self.record).encode())
        except OSError as e:
            log.warning("lease on %s taken, but its record %s could not be written: %s",
                        self.record["image"], self.record_path, e.strerror)

    def set_shared(self, shared: bool, image_path: str = "") -> None:
        """Downgrade to shared (always works) or upgrade to exclusive (LeaseBusy
        if another holder, shared or not, is there; the lease stays shared)."""
        if shared == self.shared:
            return
        if shared:
            ofd_unlock(self.fd, SHARED_BASE + WRITE, 1)
            self.shared = True
            return
        try:
            ofd_lock(self.fd, exclusive=False, start=SHARED_BASE + WRITE, length=1)
        except LockBusy:
            raise LeaseBusy(f"{image_path} is open for writing elsewhere") from None
        if _conflicts(self.fd, unshared=WRITER_UNSHARED):
            ofd_unlock(self.fd, SHARED_BASE + WRITE, 1)
            raise LeaseBusy(f"{image_path} is open for writing elsewhere (shared)")
        self.shared = False
        self._write_record()

    def release(self) -> None:
        if self.fd < 0:
            return
        # Shared holders share one record path: drop it only if it names us.
        if self.record_path and _read_json(self.record_path) == self.record:
            try:
                os.unlink(self.record_path)
            except FileNotFoundError:
                pass
        os.close(self.fd)        # drops every OFD lock of this descriptor
        self.fd = -1


def _conflicts(fd: int, unshared=WRITER_UNSHARED) -> list[str]:
    """What others hold that a writer cannot live with (our own locks are ignored)."""
    found = []
    for i in WRITER_PERMS:
        if not ofd_test(fd, exclusive=True, start=SHARED_BASE + i, length=1):
            found.append(f"another process does not share permission {i}")
    for i in unshared:
        if not ofd_test(fd, exclusive=True, start=PERM_BASE + i, length=1):
            found.append(f"another process holds permission {i}")
    return found


def record_path(state_dir: str, instance: str, disk: str) -> str:
    return os.path.join(state_dir, instance, disk + ".json")


def acquire(image_path: str, state_dir: str | None = None, instance: str = "",
            disk: str = "", node: str = "", by: str = "vbdfs", shared: bool = False,
            root: str | None = None) -> Lease:
    """Take a write lease on image_path, or raise LeaseBusy naming the holder.

    node and by (the program: the daemon, or `vbdctl grow`) go in the record.
    shared: share the write permission with other shared holders (not resizing).
    root: the directory the image must be a regular file inside (as for open_image).
    """
    unshared = SHARED_UNSHARED if shared else WRITER_UNSHARED
    fd = open_regular(image_path, os.O_RDONLY, root)
    try:
        # Lock first, then look for conflicts: of two racing writers at least
        # one sees the other (qemu does the same).
        for i in WRITER_PERMS:
            ofd_lock(fd, exclusive=False, start=PERM_BASE + i, length=1)
        for i in unshared:
            ofd_lock(fd, exclusive=False, start=SHARED_BASE + i, length=1)
        if _conflicts(fd, unshared):
            rec = read_record(state_dir, instance, disk) if state_dir else None
            raise LeaseBusy(f"{image_path} is being written by {describe(rec)}")
    except BaseException:
        os.close(fd)
        raise
    lease = Lease(fd, record_path(state_dir, instance, disk) if state_dir else None,
                  {"node": node, "by": by, "pid": os.getpid(), "since": int(time.time()),
                   "image": image_path}, shared)
    lease._write_record()
    return lease


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None



def is_write_locked(image_path: str, root: str | None = None) -> bool:
    """True if some process holds a writer's locks on the image (vbdfs or qemu)."""
    fd = open_regular(image_path, os.O_RDONLY, root)
    try:
        return not ofd_test(fd, exclusive=True, start=PERM_BASE + WRITE, length=1)
    finally:
        os.close(fd)


def read_record(state_dir: str, instance: str, disk: str) -> dict | None:
    rec = _read_json(record_path(state_dir, instance, disk))
    return rec if isinstance(rec, dict) else None


def holder(state_dir: str, instance: str, disk: str, image_path: str,
           root: str | None = None) -> dict | None:
    """The live lease on a disk: its record if the locks are held, else None.

    A lock held with no matching record is reported as {"node": None}: a
    writer that is not vbdfs (qemu, or a vbdfs that lost its record).
    Nothing can hold a lease on a path that is missing or not a regular file.
    """
    try:
        locked = is_write_locked(image_path, root)
    except (FileNotFoundError, UnsafeFile):
        return None
    if not locked:
        return None
    return read_record(state_dir, instance, disk) or {"node": None, "pid": None, "since": None}



def describe(rec: dict | None) -> str:
    """Who holds a lease, for messages: from its record, or a writer without one."""
    if not rec or rec.get("node") is None:
        return "another process (qemu?)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since") or 0))
    return (f"{rec.get('by') or 'vbdfs'} on node {rec['node']} "
            f"(pid {rec.get('pid')}, since {since})")
