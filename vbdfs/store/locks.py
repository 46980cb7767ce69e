"""Open file description (OFD) locks.

OFD locks belong to an open file, not a process, so two opens in one process
conflict like two processes do, closing another descriptor does not drop
them, and a killed process loses them. NFS, CephFS and GlusterFS propagate
them between hosts. qemu uses the same kind for image locking.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding).
_FLOCK = "hhqqi4x"


class LockBusy(Exception):
    pass


def ofd_lock(fd: int, exclusive: bool = True, start: int = 0, length: int = 0,
             wait: bool = False) -> None:
    """Lock [start, start+length) (length 0: to end of file). LockBusy if held elsewhere."""
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, ltype, os.SEEK_SET, start, length, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LockBusy(os.strerror(e.errno)) from None
        raise


def ofd_unlock(fd: int, start: int = 0, length: int = 0) -> None:
    """Drop this descriptor's lock on [start, start+length); the rest stay."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, start,
                                                  length, 0))


def ofd_test(fd: int, exclusive: bool = True, start: int = 0, length: int = 0) -> bool:
    """True if the lock could be taken now (F_OFD_GETLK)."""
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                      struct.pack(_FLOCK, ltype, os.SEEK_SET, start, length, 0))
    return struct.unpack(_FLOCK, res)[0] == fcntl.F_UNLCK
