"""Linux file primitives the standard library lacks: punch hole, zero range, SEEK_DATA runs."""

from __future__ import annotations

import errno
import functools
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


@functools.cache
def _libc():
    """The C library, loaded on first use: importing ctypes costs vbdctl
    ~4 ms of start-up, and most commands never need it."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:   # not glibc: ask the linker (slower: find_library runs ldconfig)
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.fallocate.restype = ctypes.c_int
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    libc.sync_file_range.restype = ctypes.c_int
    return libc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc().fallocate(fd, mode, offset, length) != 0:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) keeping the size. False if unsupported."""
    if length <= 0:
        return True
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise


FICLONE = 0x40049409      # linux/fs.h: _IOW(0x94, 9, int)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Make dst_fd's file an instant copy of src_fd's, sharing its blocks
    (FICLONE: XFS, btrfs, NFS 4.2 where the server can). False where the
    filesystem cannot (ext4, tmpfs, most FUSE filesystems, two filesystems)."""
    import fcntl
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing fd's dirty pages to disk without waiting for them.

    A hint, not a barrier (fsync still decides durability): a long copy
    that calls this as it goes keeps the disk busy while it works, so its
    final fsync waits for the last pages only instead of all of them.
    (posix_fadvise DONTNEED starts writeback too, but it also walks every
    cached page of the file each time: quadratic over a long copy.)
    """
    try:
        _libc().sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
    except OSError:     # no C library to call: then fsync does all the work, as before
        pass


def advise_willneed(fd: int, offset: int, length: int) -> None:
    """Start reading [offset, offset+length) into the page cache without
    waiting. A hint: a filesystem that cannot (or an error) just reads later."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def drop_cache(path: str) -> None:
    """Forget this node's cached pages of a file, so the next reads come from
    the storage. On shared storage another node may have written the file:
    a Gluster client keeps a file's pages across opens, and a node that
    becomes the writer read its own old writes back (the Ganeti migration
    test, Gluster 10.3). Pages are per file, so any descriptor will do."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def data_runs(fd: int, start: int, end: int):
    """Yield (offset, length) of the data runs of fd within [start, end).

    Uses SEEK_DATA/SEEK_HOLE; a filesystem without them reports all data,
    which is correct, only not sparse.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # no data after pos
                return
            if e.errno == errno.EINVAL:  # no SEEK_DATA support
                yield pos, end - pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread that retries short reads; pads with zeros past end of file."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_full(fd: int, data, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def fsync_path(path: str, flags: int = 0) -> None:
    """fsync the file at path (through a FUSE mount: the server's flush)."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fsync_path(path, os.O_DIRECTORY)

def write_atomic(path: str, data: bytes) -> None:
    """Replace path with data: write a temp file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:        # a killed writer's leftover; O_EXCL then refuses whatever is put there instead
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)
