"""An Image that keeps nothing between calls.

Each call opens the image file afresh (so a qcow2 image's tables are read
from disk again), does its work and closes it (so a write is flushed before
the call returns). The daemon serves a Ganeti volume this way while another
node may be writing it: before the volume's open on this node, and on the
target of a live migration until Ganeti opens it there exclusively. A cached
engine there could map a read or place a new cluster by tables the other node
has changed since. It is slow (an open per request) and meant for those
short windows only.
"""

from __future__ import annotations

from .base import Image


class ColdImage(Image):
    def __init__(self, opener, writable: bool):
        """opener(read_only) -> a freshly opened Image of the disk."""
        self._opener = opener
        with opener(True) as img:
            super().__init__(img.path, img.size, not writable)
        self.format = img.format

    def _open(self, read_only: bool) -> Image:
        img = self._opener(read_only)
        self.size = img.size
        return img

    def read(self, offset: int, length: int) -> bytes:
        with self._open(True) as img:
            return img.read(offset, length)

    def write(self, offset: int, data) -> None:
        self.check_writable()
        with self._open(False) as img:     # closing flushes
            img.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.check_writable()
        with self._open(False) as img:
            img.zero(offset, length)

    def flush(self) -> None:
        pass                               # every write was flushed when it was made

    def extents(self, offset: int = 0, length: int | None = None):
        with self._open(True) as img:
            return img.extents(offset, length)

    def allocated(self) -> int:
        with self._open(True) as img:
            return img.allocated()

    def resize(self, new_size: int) -> None:
        raise NotImplementedError("a cold image is not resized; open the image itself")

    def close(self) -> None:
        pass
