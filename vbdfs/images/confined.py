"""Opening files in a directory that others may write (the store), safely.

open_regular() is the one way vbdfs opens an image, backing file or manifest.
Other nodes, tools or mistakes can change store entries at any moment, so
nothing is checked before the open: the open itself refuses a symlink in any
component below the directory (openat2 with RESOLVE_BENEATH and
RESOLVE_NO_SYMLINKS, or a walk of O_NOFOLLOW opens where openat2 is missing).
It opens with O_PATH first, which never blocks and never opens a FIFO or a
device for I/O (opening /dev/watchdog's node would arm it), checks the type
on that descriptor (fstat), and only then opens that same inode for I/O
through /proc/self/fd: what was checked is what is used.
"""

from __future__ import annotations

import errno
import functools
import os
import stat

# linux/openat2.h
SYS_OPENAT2 = 437        # the same number on every architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


class UnsafeFile(OSError):
    """Not a regular file inside its directory; the message names the path and what it is."""

    def __init__(self, path: str, what: str):
        super().__init__(errno.EIO, f"{path} {what}", path)

    def __str__(self) -> str:
        return self.strerror


def open_regular(path: str, flags: int, root: str | None) -> int:
    """A descriptor of the regular file path, which must be below the directory root.

    No symlink is followed below root (root itself is the administrator's
    and may be reached through one). root None: only the last component is
    checked, for files outside any store (tests, an export being imported).
    """
    handle = _open(path, os.O_PATH, root)
    try:
        _check_type(path, os.fstat(handle).st_mode)
        try:    # the inode the handle holds, whatever the path names by now
            return os.open(f"/proc/self/fd/{handle}", flags | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(handle)
    # ESTALE: another client of a network filesystem (Gluster, NFS) replaced
    # the file since the lookup, and an inode cannot be looked up again. An
    # open by path can: the kernel retries it with a fresh lookup. Checked on
    # its descriptor like the first; non-blocking in case it is a FIFO by now.
    fd = _open(path, flags | os.O_NOCTTY | os.O_NONBLOCK, root)
    try:
        _check_type(path, os.fstat(fd).st_mode)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def stat_regular(path: str, root: str | None) -> os.stat_result:
    """path's stat by the same rules as open_regular(), without opening it for I/O."""
    fd = _open(path, os.O_PATH, root)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    _check_type(path, st.st_mode)
    return st


def _check_type(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        what = ("is a symlink; vbdfs follows no symlink in the store" if stat.S_ISLNK(mode)
                else f"is {kind}, not a regular file")
        raise UnsafeFile(path, what)


def _open(path: str, flags: int, root: str | None) -> int:
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if root is None:
        try:
            return os.open(path, flags)
        except OSError as e:
            raise _explain(e, path, None) from None
    rel = _relative(path, root)
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _open_beneath(dir_fd, rel, flags)
    except OSError as e:
        raise _explain(e, path, root) from None
    finally:
        os.close(dir_fd)


def _relative(path: str, root: str) -> str:
    """path relative to root, refused unless below it (compared as written: no
    symlink will be followed, so the spelling is where the open goes)."""
    norm, root_norm = os.path.normpath(path), os.path.normpath(root)
    if not os.path.isabs(path) or os.path.commonpath([norm, root_norm]) != root_norm \
            or norm == root_norm:
        raise UnsafeFile(path, f"is outside the store {root}")
    return os.path.relpath(norm, root_norm)


_have_openat2 = True    # cleared when the kernel has no openat2 (before 5.6)


def _open_beneath(dir_fd: int, rel: str, flags: int) -> int:
    global _have_openat2
    for _ in range(3):      # EAGAIN: a rename raced the lookup; the kernel asks to retry
        if not _have_openat2:
            break
        try:
            return _openat2(dir_fd, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                            | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                _have_openat2 = False
            elif e.errno == errno.EPERM:    # a seccomp filter, or an immutable file:
                break                       # the walk tells them apart
            elif e.errno != errno.EAGAIN:
                raise
    return _walk_beneath(dir_fd, rel, flags)


@functools.cache
def _syscall():
    """libc's syscall() and struct open_how, made on first use (ctypes is slow to import)."""
    import ctypes
    from .fileops import _libc

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]
    call = _libc().syscall
    call.restype = ctypes.c_long
    return ctypes, call, OpenHow


def _openat2(dir_fd: int, rel: str, flags: int, resolve: int) -> int:
    """openat2(2); Python (3.11) has no wrapper for it."""
    ctypes, call, OpenHow = _syscall()
    how = OpenHow(flags, 0, resolve)
    fd = call(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), os.fsencode(rel),
              ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _walk_beneath(dir_fd: int, rel: str, flags: int) -> int:
    """openat2's effect by hand: each directory opened with O_NOFOLLOW relative
    to the one before, so no component can be swapped for a symlink in between."""
    *dirs, last = rel.split("/")
    fd = dir_fd
    try:
        for name in dirs:
            parent = fd
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
            if parent != dir_fd:
                os.close(parent)
        return os.open(last, flags, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


def _explain(e: OSError, path: str, root: str | None) -> OSError:
    """An open's error, with the component to blame when it was a symlink or a
    non-directory on the way.

    The lstat calls here only word the message; the refusal was the open's.
    """
    if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
        return OSError(e.errno, e.strerror, path)
    norm = os.path.normpath(path)
    parts = os.path.relpath(norm, root).split("/") if root else [os.path.basename(norm)]
    base = root if root else os.path.dirname(norm)
    for i in range(len(parts)):
        p = os.path.join(base, *parts[:i + 1])
        try:
            mode = os.lstat(p).st_mode
        except OSError:
            break
        if stat.S_ISLNK(mode) or (i == len(parts) - 1 and not stat.S_ISREG(mode)):
            try:
                _check_type(p, mode)
            except UnsafeFile as u:
                return u
        if i < len(parts) - 1 and not stat.S_ISDIR(mode):
            return OSError(errno.ENOTDIR, f"{p} is not a directory", path)
    if e.errno == errno.EXDEV:
        return UnsafeFile(path, f"is outside the store {root}")
    return OSError(e.errno, e.strerror, path)
