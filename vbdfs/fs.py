"""The vbdfs filesystem: the store seen as raw block devices.

    /                      one directory per instance in the store
    /INSTANCE/             one file per disk
    /INSTANCE/sda          the disk's virtual contents, whatever its format

This module only translates FUSE requests into store and Image calls. Image
methods are synchronous; reads, writes, flushes, fallocate and lseek go
through the disk's DiskIO (iopath.py), which calls them straight from the
handler or, on a slow store, in a worker thread. A handler that touches an
open Image must go through it too: a qcow2 engine must never be entered by
two requests at once. Opening an image runs in a thread and closing one
writes back through DiskIO first; a Ganeti lease move and a grow run in a
thread while the disk's requests wait (DiskIO.paused). One of these at a
time per disk (its turn): they may take long (a repair, a flush) and must
not hold up the other disks.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat

import pyfuse3
import trio

from . import iopath
from .images import Image, ImageError, OutOfRange, ReadOnlyImage
from .images.confined import UnsafeFile, open_regular, stat_regular
from .images.fileops import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                             drop_cache)
from .opendisk import DiskLeases, OpenDisk
from .store import Manifest, Store, leases
from .store.names import InvalidName

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
# Short caches so instances created or removed by vbdctl show up quickly.
ATTR_TIMEOUT = 1.0
XATTR_FORMAT = b"user.vbdfs.format"
XATTR_LOGICAL_ID = b"user.vbdfs.logical_id"
XATTR_ALLOCATED = b"user.vbdfs.allocated"
# Present only on a disk whose image opens read-only; its value says why.
XATTR_READ_ONLY = b"user.vbdfs.read_only"
XATTRS = (XATTR_FORMAT, XATTR_LOGICAL_ID, XATTR_ALLOCATED)
# On the mount's root: which node's daemon serves it (failover-check asks).
XATTR_NODE = b"user.vbdfs.node"
XATTR_PID = b"user.vbdfs.pid"
ROOT_XATTRS = (XATTR_NODE, XATTR_PID)
_FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
# On a Ganeti volume's disk: this node's write lease, "none", "shared" or
# "exclusive"; the ExtStorage open and close scripts set it (README "Ganeti").
XATTR_LEASE = b"user.vbdfs.lease"
LEASE_MODES = ("none", "shared", "exclusive")
# Set on an open disk to the path of an empty file in the store: the daemon
# makes it a reflink copy of the image between two of the disk's requests
# (operations/volumes.py's snapshot; EOPNOTSUPP where that cannot be done).
XATTR_CLONE_TO = b"user.vbdfs.clone_to"


def contained(handler):
    """Turn any error of one request into an errno for that request.

    pyfuse3 ends its main loop on any exception but FUSEError, which would
    unmount every disk on the node: a broken image, a full store or an NFS
    ESTALE must cost one request, not all guests. (read and write do the same
    inline, to keep the hot path to one call.)
    """
    @functools.wraps(handler)
    async def wrapper(*args):
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class VbdFs(pyfuse3.Operations):
    enable_writeback_cache = False
    # write() gets the request's data in place (a memoryview), not a copy:
    # one copy of every written byte fewer (patches/pyfuse3-*-zero-copy-write).
    zero_copy_write = True
    # The kernel's default, 12 asynchronous requests in flight, would cap a
    # guest's queue depth at 12 (patches/pyfuse3-*-max-background; iopath.py).
    max_background = iopath.MAX_BACKGROUND

    def __init__(self, store: Store, node: str = "", io_mode: str = "auto"):
        super().__init__()
        self.store = store
        self.node = node
        self.io_mode = io_mode                     # see iopath.py
        self._inode_of: dict[tuple, int] = {(): ROOT}
        self._key_of: dict[int, tuple] = {ROOT: ()}
        self._manifests: dict[str, tuple] = {}   # name -> (stat key, Manifest | error text)
        self._open: dict[int, OpenDisk] = {}      # fh (= disk inode) -> OpenDisk
        self._opening: dict[int, trio.Lock] = {}   # disk inode -> its opens and releases, in turn
        self._logged: set[tuple] = set()           # errors already logged once
        self._read_only: dict[tuple, tuple] = {}    # key -> (image file stat key, reason)
        self._root_stat = os.stat(store.root)
        self.leases = DiskLeases(store, node, self._fresh_image)

    # --- inodes and manifests -------------------------------------------
    def _inode(self, key: tuple) -> int:
        ino = self._inode_of.get(key)
        if ino is None:
            ino = len(self._key_of) + ROOT
            self._inode_of[key] = ino
            self._key_of[ino] = key
        return ino

    def _key(self, inode: int) -> tuple:
        try:
            return self._key_of[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _manifest(self, name: str) -> Manifest:
        """The instance's manifest, re-read when the file changes; ENOENT if
        unusable, EIO if it is no regular file (a FIFO, a symlink: see confined.py)."""
        try:
            path = self.store.manifest_path(name)
            st = stat_regular(path, self.store.root)
        except (InvalidName, FileNotFoundError, NotADirectoryError):
            self._manifests.pop(name, None)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except UnsafeFile as e:
            self._manifests.pop(name, None)
            self._log_once((name,), f"unavailable: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._manifests.get(name)
        if cached is None or cached[0] != key:
            try:
                value = self.store.load(name)
            except Exception as e:      # untrusted input: whatever breaks, skip it
                value = str(e) or type(e).__name__
                # Logged once per version of the file; the mount serves the others.
                log.error("instance %s skipped: %s", name, value)
            cached = self._manifests[name] = (key, value)
        if isinstance(cached[1], str):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return cached[1]

    def _disk(self, key: tuple):
        name, disk = key
        try:
            return self._manifest(name).disk(disk)
        except LookupError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    # --- attributes ------------------------------------------------------
    def _dir_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        st = self._root_stat
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o700
        a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = st.st_mtime_ns
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        return a

    def _disk_attr(self, inode: int, key: tuple) -> pyfuse3.EntryAttributes:
        disk = self._disk(key)
        try:
            st = self.store.stat_disk(disk)
        except UnsafeFile as e:
            self._log_once(key, f"unavailable: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            self._log_once(key, f"image file {disk.path}: {e.strerror}")
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        od = self._open.get(inode)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        # 0400 for a disk that can only be read: ls -l shows it (root may still
        # open it for writing, and gets EROFS from open()).
        a.st_mode = stat.S_IFREG | (0o400 if self._read_only_reason(od, key, st) else 0o600)
        a.st_nlink = 1
        a.st_uid = a.st_gid = 0
        a.st_size = od.image.size if od else disk.size
        a.st_blocks = st.st_blocks          # the real allocation: du tells the truth
        a.st_blksize = 4096
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        return a

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        key = self._key(inode)
        if len(key) == 2:
            return self._disk_attr(inode, key)
        if len(key) == 1:
            self._manifest(key[0])
        return self._dir_attr(inode)

    @contained
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @contained
    async def lookup(self, parent_inode, name, ctx=None):
        key = self._key(parent_inode)
        name = os.fsdecode(name)
        if len(key) == 0:
            self._manifest(name)
            child = (name,)
        elif len(key) == 1:
            child = (key[0], name)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._attr(self._inode(child))

    @contained
    async def setattr(self, inode, attr, fields, fh, ctx):
        key = self._key(inode)
        current = self._attr(inode)
        if fields.update_size and len(key) == 2:
            async with iopath.Held(self._disk_turn(inode)):
                await self._size_to(inode, key, attr.st_size)
            current = self._attr(inode)
        elif fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return current   # times follow the backing file; touch is harmless

    async def _size_to(self, inode: int, key: tuple, size: int) -> None:
        """A truncate of a disk (in its turn): only a grow, and only to the
        size the manifest already records (vbdctl or the Ganeti provider wrote
        it, under the instance lock): O_TRUNC or ftruncate from a careless
        tool must not destroy a disk. Like an open, in a thread: a grow
        flushes, and may open the image afresh (a repair of a dirty qcow2)."""
        od = self._open.get(inode)
        current = self._attr(inode).st_size     # in the turn: after any grow before it
        if od is None:
            image_size = await trio.to_thread.run_sync(self._image_size, key)
        else:
            image_size = od.image.size
        if size == image_size:
            if size != current:
                raise pyfuse3.FUSEError(errno.EPERM)
            return
        if size != self._disk(key).size or size < current:
            raise pyfuse3.FUSEError(errno.EPERM)
        grow = functools.partial(self.leases.grow, od, key, self._disk(key).path, size)
        try:
            if od is None:
                await trio.to_thread.run_sync(grow)
            else:
                async with od.io.paused():  # it may resize or swap the Image
                    await trio.to_thread.run_sync(grow)
        except leases.LeaseBusy as e:
            log.warning("instance %s disk %s not grown: %s", key[0], key[1], e)
            raise pyfuse3.FUSEError(errno.EBUSY) from None

    # --- directories -----------------------------------------------------
    @contained
    async def opendir(self, inode, ctx):
        key = self._key(inode)
        if len(key) == 2:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @contained
    async def readdir(self, fh, start_id, token):
        key = self._key(fh)
        if len(key) == 0:
            names = []
            for name in self.store.instances():
                try:
                    self._manifest(name)
                except pyfuse3.FUSEError:
                    continue
                names.append((name,))
        else:
            names = [(key[0], d.name) for d in self._manifest(key[0]).disks]
        for i in range(start_id, len(names)):
            child = names[i]
            try:
                attr = self._attr(self._inode(child))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(child[-1]), attr, i + 1):
                break

    @contained
    async def releasedir(self, fh):
        pass

    @contained
    async def statfs(self, ctx):
        sv = os.statvfs(self.store.root)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = sv.f_bsize, sv.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        s.f_files, s.f_ffree, s.f_favail = sv.f_files, sv.f_ffree, sv.f_favail
        s.f_namemax = 255
        return s

    # --- extended attributes --------------------------------------------
    @contained
    async def listxattr(self, inode, ctx):
        key = self._key(inode)
        if len(key) == 2:
            disk = self._disk(key)
            reason = self._read_only_reason(self._open.get(inode), key, os.stat(disk.path))
            return list(XATTRS) + ([XATTR_READ_ONLY] if reason else [])
        return list(ROOT_XATTRS) if len(key) == 0 else []

    @contained
    async def getxattr(self, inode, name, ctx):
        key = self._key(inode)
        if key == () and name in ROOT_XATTRS:
            return (self.node if name == XATTR_NODE else str(os.getpid())).encode()
        if len(key) == 2 and name == XATTR_LEASE:
            od = self._open.get(inode)
            return (od.lease_mode if od else "none").encode()
        if len(key) != 2 or name not in XATTRS + (XATTR_READ_ONLY,):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        disk = self._disk(key)
        if name == XATTR_READ_ONLY:
            reason = self._read_only_reason(self._open.get(inode), key, os.stat(disk.path))
            if reason is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return reason.encode()
        if name == XATTR_FORMAT:
            return disk.format.encode()
        if name == XATTR_LOGICAL_ID:
            return json.dumps(disk.logical_id).encode()
        od = self._open.get(inode)
        allocated = od.image.allocated() if od else self.store.stat_disk(disk).st_blocks * 512
        return str(allocated).encode()

    @contained
    async def setxattr(self, inode, name, value, ctx):
        key = self._key(inode)
        if name == XATTR_CLONE_TO and len(key) == 2:
            await self._clone_to(inode, value)
            return
        if name != XATTR_LEASE or len(key) != 2:
            raise pyfuse3.FUSEError(errno.EPERM)
        mode = value.decode("ascii", "replace")
        if mode not in LEASE_MODES:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self._manifest(key[0]).ganeti is None:
            raise pyfuse3.FUSEError(errno.EPERM)   # other disks' leases follow their opens
        # In the disk's turn (no open or release in between) and in a thread:
        # a move flushes, and opens the image afresh (a repair of a dirty
        # qcow2), while the disk's requests wait and the other disks' run.
        async with iopath.Held(self._disk_turn(inode)):
            od = self._open.get(inode)
            if od is None or not od.writable:
                raise pyfuse3.FUSEError(errno.ENXIO)  # not attached read-write here
            set_lease = functools.partial(self.leases.set_lease, od, key,
                                          self._disk(key).path, mode)
            try:
                async with od.io.paused():    # none may run on the Image it swaps
                    await trio.to_thread.run_sync(set_lease)
            except leases.LeaseBusy as e:
                log.warning("instance %s disk %s: no %s lease: %s", key[0], key[1], mode, e)
                raise pyfuse3.FUSEError(errno.EBUSY) from None

    async def _clone_to(self, inode: int, value: bytes) -> None:
        if inode not in self._open:
            raise pyfuse3.FUSEError(errno.ENXIO)   # not open here: the caller copies the file
        path = os.fsdecode(value)
        try:
            fd = open_regular(path, os.O_WRONLY, self.store.root)
        except (UnsafeFile, OSError) as e:
            log.warning("clone of %s refused: %s", "/".join(self._key(inode)), e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            if os.fstat(fd).st_size:
                raise pyfuse3.FUSEError(errno.EEXIST)      # only into an empty file
            # In the disk's turn: no release, lease move or grow swaps its Image meanwhile.
            async with iopath.Held(self._disk_turn(inode)):
                od = self._open.get(inode)
                if od is None:
                    raise pyfuse3.FUSEError(errno.ENXIO)
                # Most of the writing back before the pause, by the request path.
                await od.io.flush()
                # None of the disk's requests runs until the copy is made.
                async with od.io.paused():
                    if not await trio.to_thread.run_sync(od.image.reflink_to, fd):
                        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        finally:
            os.close(fd)

    @contained
    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # --- the namespace is the store's: no changes through the mount -------
    @contained
    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @contained
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @contained
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @contained
    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @contained
    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @contained
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # --- disk I/O ----------------------------------------------------------
    @contained
    async def open(self, inode, flags, ctx):
        key = self._key(inode)
        if len(key) != 2:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            # With atomic O_TRUNC the kernel passes it here instead of a setattr.
            raise pyfuse3.FUSEError(errno.EPERM)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        async with iopath.Held(self._disk_turn(inode)):
            od = self._open.get(inode)
            if od is None or (writable and not od.writable):
                # In a thread: opening reads the image's metadata, each read a
                # round trip on a network store, and repairs a dirty qcow2,
                # seconds for a large one. Meanwhile the other disks are served.
                new = await trio.to_thread.run_sync(self._open_disk, key, writable)
                old, self._open[inode] = od, new
                if old is not None:      # upgrade a read-only Image to read-write
                    new.opens = old.opens
                    await old.io.idle()  # its requests in flight end on it first
                    old.close()          # read-only: nothing to write back
                od = new
            if writable and od.image.read_only_reason:
                # Refused here, not at the first write: losetup, attach and guests
                # learn it at once (the engine may also find corruption while open).
                raise pyfuse3.FUSEError(errno.EROFS)
            od.opens += 1
        # direct_io: no page cache in front of the disk (the backing file has
        # one), and the kernel then skips its security.capability GETXATTR
        # round trip before every write: 4 KiB random writes went 6k -> 10k IOPS.
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=True)

    def _disk_turn(self, inode: int) -> trio.Lock:
        """The lock that takes a disk's opens, releases, lease moves and grows
        one at a time: they wait in threads, and each must find what the one
        before it left."""
        lock = self._opening.get(inode)
        if lock is None:
            lock = self._opening[inode] = trio.Lock()
        return lock

    def _open_disk(self, key: tuple, writable: bool) -> OpenDisk:
        """Open the image; a writer first takes the disk's write lease.

        A Ganeti volume opened for writing takes no lease: Ganeti attaches it
        on a migration's target while the source writes, and Ganeti's open
        script gives the lease (setxattr user.vbdfs.lease). Until then it
        reads afresh each time and refuses writes (EROFS).
        """
        lease = None
        if writable and self._manifest(key[0]).ganeti is not None:
            return OpenDisk(self.leases.cold(key, writable=False), True, io_mode=self.io_mode)
        if writable:
            # Lease first, manifest after (in _open_image): vbdctl convert holds
            # the lease across its image swap and manifest rename, so a disk
            # opened for writing is never paired with its old format.
            disk = self._disk(key)
            try:
                lease = self.leases.acquire(key, disk.path)
            except leases.LeaseBusy as e:
                log.warning("instance %s disk %s not opened for writing: %s", key[0], key[1], e)
                raise pyfuse3.FUSEError(errno.EBUSY) from None
            except FileNotFoundError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except UnsafeFile as e:
                self._log_once(key, f"unavailable: {e}")
                raise pyfuse3.FUSEError(errno.EIO) from None
        try:
            image = self._fresh_image(key, writable)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if writable and image.read_only_reason:
            image.close()
            lease.release()
            raise pyfuse3.FUSEError(errno.EROFS)
        return OpenDisk(image, writable, lease, self.io_mode)

    def _open_image(self, key: tuple, writable: bool) -> Image:
        disk = self._disk(key)
        try:
            image = self.store.open_disk(disk, read_only=not writable)
        except FileNotFoundError:
            log.error("instance %s disk %s: image file %s is missing", key[0], key[1], disk.path)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except PermissionError:
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except (ImageError, OSError) as e:
            self._log_once(key, f"unavailable: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        self._note_read_only(key, image.read_only_reason)
        if getattr(image, "repaired", None):
            log.warning("instance %s disk %s: %s", key[0], key[1], image.repaired)
        if image.size != disk.size:
            log.warning("instance %s disk %s: image is %d bytes, manifest says %d; "
                        "serving the image's size", key[0], key[1], image.size, disk.size)
        return image

    def _fresh_image(self, key: tuple, writable: bool) -> Image:
        """The image as the storage has it now. A Ganeti volume's lease moves
        between nodes while both have it attached (live migration), and another
        node may have written it since this one last read it: drop our cached
        pages first. Other disks keep theirs (a warm cache after every open;
        their write lease is only ever taken at open, by one node)."""
        if self._manifest(key[0]).ganeti is not None:
            try:
                drop_cache(self._disk(key).path)
            except OSError:
                pass              # _open_image reports a missing or unreadable file
        return self._open_image(key, writable)

    def _image_size(self, key: tuple) -> int:
        """The size of a disk not open here, as its image says (in a thread)."""
        with self._fresh_image(key, False) as img:
            return img.size

    def _log_once(self, key: tuple, message: str, level: int = logging.ERROR) -> None:
        """Log an instance's or disk's error once, not at every request that meets it."""
        if (key, message) not in self._logged:
            self._logged.add((key, message))
            log.log(level, "instance %s %s", " disk ".join(key), message)

    def _note_read_only(self, key: tuple, reason: str | None) -> None:
        if reason:
            self._log_once(key, f"is read-only: {reason}", logging.WARNING)

    def _read_only_reason(self, od: OpenDisk | None, key: tuple, st) -> str | None:
        """Why the disk can only be read, or None. From its open Image, else
        from a read-only open, remembered until the image file changes."""
        if od is not None:
            return od.image.read_only_reason
        if not stat.S_ISREG(st.st_mode):
            return None          # opening it would fail (or block): nothing to say here
        version = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._read_only.get(key)
        if cached is None or cached[0] != version:
            try:
                with self._open_image(key, False) as image:
                    reason = image.read_only_reason
            except pyfuse3.FUSEError:
                reason = None    # unusable: _open_image logged why; open() will fail
            cached = self._read_only[key] = (version, reason)
        return cached[1]

    async def read(self, fh, off, size):
        try:
            return await self._open[fh].io.read(off, size)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:          # ImageError, or a bug: this request fails, not the daemon
            log.error("read of %s failed: %r", self._key_of.get(fh), e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh, off, buf):
        od = self._open[fh]
        image = od.image
        n = len(buf)
        if off + n > image.size:
            # A block device has no room past its end; the backing file never grows.
            if off >= image.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            n = image.size - off
            buf = memoryview(buf)[:n]
        try:
            await od.io.write(off, buf)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except OutOfRange:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except ReadOnlyImage:
            raise pyfuse3.FUSEError(errno.EROFS) from None
        except Exception as e:          # ImageError, or a bug: this request fails, not the daemon
            log.error("write to %s failed: %r", self._key_of.get(fh), e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        return n

    @contained
    async def fallocate(self, fh, mode, off, length):
        # The loop device turns a guest's discard into PUNCH_HOLE|KEEP_SIZE and
        # write-zeroes into ZERO_RANGE or PUNCH_HOLE: both give the space back
        # (Image.zero). Reserving space (mode 0 or KEEP_SIZE alone) is refused,
        # as qemu's export refuses it inside a disk: a thin disk cannot promise
        # it. Nothing may change the size: that is `vbdctl grow`'s job.
        od = self._open[fh]
        image = od.image
        if mode & ~_FALLOC_MODES or not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = off + length
        if end > image.size:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            end = image.size    # as in a file: past the end there is nothing to free
        try:
            if off < end:
                await od.io.zero(off, end - off)
        except ReadOnlyImage:
            raise pyfuse3.FUSEError(errno.EROFS) from None

    @contained
    async def lseek(self, fh, off, whence):
        # SEEK_DATA / SEEK_HOLE (the kernel answers the others): holes and
        # zero extents are holes, so cp --sparse and qemu-img map skip them.
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        pos = await self._open[fh].io.seek(off, whence == os.SEEK_DATA)
        if pos is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return pos

    @contained
    async def flush(self, fh):
        # close(): make everything written so far reach the backing file durably.
        await self._open[fh].io.flush()

    @contained
    async def fsync(self, fh, datasync):
        await self._open[fh].io.flush()

    @contained
    async def release(self, fh):
        async with iopath.Held(self._disk_turn(fh)):
            od = self._open[fh]
            od.opens -= 1
            if od.opens == 0:
                if od.writable:
                    try:
                        # Closing writes back what the image holds: the long part
                        # first, through the request path (in a thread, on a slow store).
                        await od.io.flush()
                    except (OSError, ImageError):
                        pass                # close() below meets it again and says so
                await od.io.idle()
                # Then out of _open and closed at once, lease and all: a detach
                # that sees the disk released here finds its image closed.
                del self._open[fh]
                try:
                    od.close()
                except (OSError, ImageError) as e:
                    log.error("closing %s failed: %s", self._key_of.get(fh), e)

    def close_all(self) -> None:
        """Flush and close every open image (at unmount)."""
        for fh, od in list(self._open.items()):
            try:
                od.close()
            except (OSError, ImageError) as e:
                log.error("closing %s failed: %s", self._key_of.get(fh), e)
        self._open.clear()

    def open_disks(self) -> list[tuple[str, str]]:
        """(instance, disk) of every disk with an open handle (the daemon's stop asks)."""
        return [self._key_of[fh] for fh in self._open]
