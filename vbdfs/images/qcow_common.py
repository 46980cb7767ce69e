"""What the two qcow engines share (qcow2.py, and qcow.py for version 1):
finding and opening the files an image names, reading through its backing
file, and its compressed clusters.

* A file an image names (backing file, external data file) is resolved
  relative to the image's directory and, with `store_root`, must resolve
  inside it; it is then opened by the name as written, below the root, so
  that confined.open_regular refuses any symlink on the way (also one
  swapped in after the check).
* Backing files are opened read-only, by the engine of the format the caller
  determined (never probed from content); chains loop nowhere and are at
  most MAX_CHAIN deep.
* The last decompressed cluster is kept: a guest reading a compressed
  cluster in small requests decompresses it once.

The engine provides `path`, `cs`, `cluster_bits`, `fd`, `backing`, `_zeros`,
`_cz` (start it at (None, b"")), `compression_type` and `_compressed_span()`.
"""

from __future__ import annotations

import os

from . import _engine, qcow2_compress
from .base import Image, ImageError
from .fileops import pread_full

MAX_CHAIN = 16
BACKING_FORMATS = ("raw", "qcow2", "qcow")


class QcowCommon:
    compression_type = qcow2_compress.ZLIB

    def _confined_target(self, name: str, store_root: str | None, what: str) -> str:
        """The file `name` (from the image) names, relative to the image's directory;
        with store_root, refused unless it resolves inside it (then opened as named,
        so that open_regular refuses any symlink on the way)."""
        me = os.path.realpath(self.path)
        target = os.path.realpath(os.path.join(os.path.dirname(me), name))
        if store_root is not None:
            root = os.path.realpath(store_root)
            if os.path.commonpath([root, target]) != root:
                raise ImageError(f"{self.path}: {what} {name!r} resolves to {target}, "
                                 f"outside the store {root}")
            # Opened as named, below the root: open_regular refuses any symlink
            # on the way, including one swapped in after the check above.
            target = os.path.normpath(os.path.join(os.path.dirname(self.path), name))
        return target

    def _open_backing_file(self, name: str, fmt: str, store_root: str | None,
                           chain: frozenset) -> Image:
        """Backing file `name` of format fmt, open read-only (errors name this image)."""
        if fmt not in BACKING_FORMATS:
            raise ImageError(f"{self.path}: backing file {name!r} has unsupported "
                             f"format {fmt!r}")
        target = self._confined_target(name, store_root, "backing file")
        chain = chain | {os.path.realpath(self.path)}
        if os.path.realpath(target) in chain:
            raise ImageError(f"{self.path}: backing chain loops back to {target}")
        if len(chain) >= MAX_CHAIN:
            raise ImageError(f"{self.path}: backing chain deeper than {MAX_CHAIN}")
        more = {} if fmt == "raw" else {"_chain": chain}    # a raw file names nothing
        try:
            return _engine(fmt)(target, read_only=True, store_root=store_root, **more)
        except FileNotFoundError:
            raise ImageError(f"{self.path}: backing file {name!r} ({target}) not found") \
                from None
        except (ImageError, OSError) as e:     # name the image the caller opened too
            raise ImageError(f"{self.path}: backing file {name!r}: {e}") from None

    def _backing_read(self, pos: int, n: int) -> bytes:
        """n bytes of the backing file at pos; zeros past its end, or without one."""
        if self.backing is None or pos >= self.backing.size:
            return self._zeros[:n] if n <= self.cs else bytes(n)
        data = self.backing.read(pos, n)
        return data if len(data) == n else data + bytes(n - len(data))

    def _decompress(self, e: int, g: int) -> bytes:
        """Guest cluster g, compressed as L2 entry e says (the engine's
        _compressed_span() decodes e into a checked (offset, length))."""
        if self._cz[0] == e:
            return self._cz[1]
        off, nbytes = self._compressed_span(e, g)
        where = f"compressed cluster at guest offset {g << self.cluster_bits:#x}"
        try:
            out = qcow2_compress.decompress(self.compression_type,
                                            pread_full(self.fd, nbytes, off), self.cs)
        except ValueError as err:
            raise ImageError(f"{self.path}: bad {where}: {err}") from None
        if len(out) != self.cs:
            raise ImageError(f"{self.path}: {where} is truncated")
        self._cz = (e, out)
        return out
