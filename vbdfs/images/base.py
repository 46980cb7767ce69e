"""The Image interface every format engine implements.

An Image is one image file seen as a flat array of `size` virtual bytes.
It knows nothing about instances, manifests or FUSE. All methods are
synchronous: the FUSE layer calls them straight from its handlers, which
measured faster on a 2-core Dom0 than handing each request to a thread.
"""

from __future__ import annotations

import collections
import enum


class ImageError(Exception):
    """The image cannot be used as asked: malformed, unsupported or misused.

    The message is meant for an administrator and names the file.
    """


class OutOfRange(ImageError):
    """A request reaches past the virtual size of the image."""


class ReadOnlyImage(ImageError):
    """A write was asked of an image opened (or forced) read-only."""


class Kind(enum.Enum):
    DATA = "data"   # may hold non-zero bytes
    ZERO = "zero"   # allocated or flagged, but reads as zeros
    HOLE = "hole"   # not allocated: reads as zeros (or falls through to a backing file)


# collections.namedtuple, not typing.NamedTuple: typing costs vbdctl ~4 ms of start-up.
class Extent(collections.namedtuple("Extent", "offset length kind")):
    __slots__ = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


SEEK_WINDOW_MIN = 256 << 10
SEEK_WINDOW_MAX = 1 << 30


class Image:
    """Base class: subclasses implement the I/O; this holds the shared checks."""

    format: str = "?"
    # Why the image can only be read, whatever the caller asked (a qcow2 marked
    # dirty or corrupt, a refcount width the engine cannot write), or None.
    # Set at open, or later when the engine finds corruption; shown to the
    # administrator by vbdctl and the mount, so it says what to do.
    read_only_reason: str | None = None

    def __init__(self, path: str, size: int, read_only: bool):
        self.path = path
        self.size = size
        self.read_only = read_only

    # --- the interface -------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    # read() and write() for a caller that serves one request at a time
    # (iopath's inline path). An engine that lets requests overlap (qcow2
    # reads and writes data outside its metadata lock) may skip the
    # bookkeeping that needs; the others are safe either way.
    def read_serial(self, offset: int, length: int) -> bytes:
        return self.read(offset, length)

    def write_serial(self, offset: int, data: bytes) -> None:
        self.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros, deallocating where possible."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable in the image file."""
        raise NotImplementedError

    def start_writeback(self) -> None:
        """Start writing completed writes to disk without waiting (see
        fileops.start_writeback); flush() is still what makes them durable."""

    def prefetch(self, offset: int, length: int) -> None:
        """Hint: read(offset, length) comes soon; start reading it from the
        store without waiting (posix_fadvise WILLNEED). A copy that asks ahead
        keeps many reads in flight where its preads alone wait for each."""

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Runs of data / zero / hole covering [offset, offset+length), merged."""
        raise NotImplementedError

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek(2)'s SEEK_DATA (data=True) or SEEK_HOLE on the virtual disk.

        The first offset at or after `offset` that may hold data, or that
        reads as zeros (holes and zero extents; the end of the disk counts).
        None if `offset` is outside the disk or no data follows it (ENXIO).
        """
        if offset < 0 or offset >= self.size:
            return None
        pos, window = offset, SEEK_WINDOW_MIN
        while pos < self.size:
            # Growing windows: the cost follows the distance to the answer, so
            # walking a fragmented disk with SEEK_DATA/SEEK_HOLE stays linear.
            n = min(window, self.size - pos)
            for e in self.extents(pos, n):
                if (e.kind is Kind.DATA) == data:
                    return e.offset
            pos += n
            window = min(window * 2, SEEK_WINDOW_MAX)
        return None if data else self.size

    def allocated(self) -> int:
        """Bytes the image file really occupies on its filesystem."""
        raise NotImplementedError

    def resize(self, new_size: int) -> None:
        raise NotImplementedError

    def reflink_to(self, fd: int) -> bool:
        """Make the empty file fd an instant copy of the image file, sharing its
        blocks (fileops.clone_file), after flushing: the image as of now. With
        no request in flight, it is a consistent point in time. False where it
        cannot be: the filesystem has no reflinks, or the image is more than
        its own file (a backing file, an external data file)."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    # --- helpers for subclasses ---------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise OutOfRange(f"{self.path}: negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise OutOfRange(
                f"{self.path}: range {offset}+{length} is past the virtual size {self.size}")

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyImage(f"{self.path}: image is open read-only")

    def clamp_read(self, offset: int, length: int) -> int:
        """Reads past the end return short, like a regular file."""
        if offset < 0 or length < 0:
            raise OutOfRange(f"{self.path}: negative offset or length ({offset}, {length})")
        return max(0, min(length, self.size - offset))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} size={self.size}{' ro' if self.read_only else ''}>"


def merge_extents(extents) -> list[Extent]:
    """Join adjacent extents of the same kind."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1].kind is e.kind and out[-1].end == e.offset:
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + e.length, last.kind)
        else:
            out.append(e)
    return out


_ZEROS = bytes(1 << 20)
_zeros_by_size: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    """bytes(n), cached: requests come in a handful of sizes (4 KiB ... 1 MiB)."""
    z = _zeros_by_size.get(n)
    if z is None:
        if len(_zeros_by_size) >= 64:
            _zeros_by_size.clear()
        z = _zeros_by_size[n] = bytes(n)
    return z


def is_zero(data) -> bool:
    """True if every byte of data (bytes-like) is zero. Cheap for the common non-zero case.

    zeros.startswith(data) is a memcmp, for bytes and memoryviews alike (the
    FUSE layer passes the request's buffer as a memoryview, uncopied); a
    memoryview == comparison goes element by element, 150x slower.
    """
    n = len(data)
    if n == 0:
        return True
    if data[0] or data[-1]:
        return False
    if n <= len(_ZEROS):
        return _zeros(n).startswith(data)
    for i in range(0, n, len(_ZEROS)):
        chunk = data[i:i + len(_ZEROS)]
        if not _zeros(len(chunk)).startswith(chunk):
            return False
    return True
