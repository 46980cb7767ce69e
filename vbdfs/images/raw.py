"""Sparse raw images: the file's bytes are the disk's bytes.

Holes stay holes: creation only sets the size, all-zero writes punch holes
instead of allocating (like qemu's detect-zeroes=unmap), and extents() reports
the file's own data/hole map.
"""

from __future__ import annotations

import os

from .base import Extent, Image, ImageError, Kind, is_zero, merge_extents
from .confined import open_regular
from .fileops import (advise_willneed, allocated_bytes, clone_file, data_runs, pread_full,
                      punch_hole, pwrite_full, start_writeback)


class RawImage(Image):
    format = "raw"

    def __init__(self, path: str, read_only: bool = False, store_root: str | None = None):
        self.fd = open_regular(path, os.O_RDONLY if read_only else os.O_RDWR, store_root)
        try:
            st = os.fstat(self.fd)
            # Punching a hole smaller than a filesystem block does nothing:
            # zero the unaligned edges with writes instead.
            self.block = max(512, st.st_blksize)
            super().__init__(path, st.st_size, read_only)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def create(cls, path: str, size: int) -> "RawImage":
        if size < 0:
            raise ImageError(f"{path}: negative size")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)   # sparse: no data block is written
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(path)

    def read(self, offset: int, length: int) -> bytes:
        length = self.clamp_read(offset, length)
        if length == 0:
            return b""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:         # rare: carry on from where the read stopped
            data += pread_full(self.fd, length - len(data), offset + len(data))
        return data

    def read_nowait(self, offset: int, length: int, buf: memoryview):
        """Read into buf (at least `length` bytes long) if the page cache holds
        it all: the bytes read (a view of buf), else None (reading would wait
        for the store). OSError EOPNOTSUPP where the filesystem has no
        RWF_NOWAIT (FUSE clients such as GlusterFS's)."""
        length = self.clamp_read(offset, length)
        view = buf[:length]
        try:
            n = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        return view if n == length else None

    def write_nowait(self, offset: int, data) -> int:
        """Write what can be written without waiting for the store; how many
        bytes that was (0: all of it would wait). OSError EOPNOTSUPP where the
        filesystem has no RWF_NOWAIT for writes (ext4's buffered writes)."""
        self.check_writable()
        self.check_range(offset, len(data))
        if is_zero(data):
            return 0            # punching a hole may wait: write() does it
        try:
            return os.pwritev(self.fd, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0

    def write(self, offset: int, data) -> None:
        self.check_writable()
        n = len(data)
        self.check_range(offset, n)
        if is_zero(data):
            self._zero(offset, n)
            return
        written = os.pwrite(self.fd, data, offset)
        if written != n:
            pwrite_full(self.fd, memoryview(data)[written:], offset + written)

    def zero(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        start_al = -(-offset // self.block) * self.block
        end_al = end // self.block * self.block
        if start_al >= end_al:          # no whole block inside: plain write
            self._write_zeros_if_data(offset, end)
            return
        self._write_zeros_if_data(offset, start_al)
        if not punch_hole(self.fd, start_al, end_al - start_al):
            pwrite_full(self.fd, bytes(end_al - start_al), start_al)
        self._write_zeros_if_data(end_al, end)

    def _write_zeros_if_data(self, start: int, end: int) -> None:
        """Zero a sub-block edge; a hole already reads zeros, so leave it unallocated."""
        if start >= end:
            return
        if any(True for _ in data_runs(self.fd, start, end)):
            pwrite_full(self.fd, bytes(end - start), start)

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def start_writeback(self) -> None:
        if not self.read_only:
            start_writeback(self.fd)

    def prefetch(self, offset: int, length: int) -> None:
        advise_willneed(self.fd, offset, length)

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        end = offset + length
        out = []
        pos = offset
        for data, n in data_runs(self.fd, offset, end):
            if data > pos:
                out.append(Extent(pos, data - pos, Kind.HOLE))
            out.append(Extent(data, n, Kind.DATA))
            pos = data + n
        if pos < end:
            out.append(Extent(pos, end - pos, Kind.HOLE))
        return merge_extents(out)

    def allocated(self) -> int:
        return allocated_bytes(self.fd)

    def reflink_to(self, fd: int) -> bool:
        return clone_file(self.fd, fd)     # it writes back our dirty pages first

    def resize(self, new_size: int) -> None:
        self.check_writable()
        if new_size < self.size:
            raise ImageError(f"{self.path}: shrinking a disk is not supported "
                             f"({self.size} -> {new_size} bytes)")
        os.ftruncate(self.fd, new_size)
        os.fsync(self.fd)
        self.size = new_size

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1
