"""Image engines. open_image() and create_image() are the only entry points.

The format is always given by the caller (from the manifest), never guessed
from the file's content: a guest can write a qcow2 header into its raw disk
(CVE-2008-2004).
"""

from __future__ import annotations

from .base import Extent, Image, ImageError, Kind, OutOfRange, ReadOnlyImage

FORMATS = ("raw", "qcow2", "qcow")     # every format a disk may have ("qcow": version 1)
NEW_FORMATS = ("raw", "qcow2")          # the formats vbdfs creates (new disks, copies)

__all__ = ["Extent", "Image", "ImageError", "Kind", "OutOfRange", "ReadOnlyImage",
           "FORMATS", "NEW_FORMATS", "copy_format", "open_image", "create_image"]


def copy_format(fmt: str) -> str:
    """The format a copy of a `fmt` disk gets by default: its own if vbdfs creates
    it, else qcow2 (a legacy QCOW disk's successor: sparse and writable)."""
    return fmt if fmt in NEW_FORMATS else "qcow2"


def _engine(fmt: str):
    if fmt == "raw":
        from .raw import RawImage
        return RawImage
    if fmt == "qcow2":
        from .qcow2 import Qcow2Image
        return Qcow2Image
    if fmt == "qcow":
        from .qcow import QcowImage
        return QcowImage
    raise ImageError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})")


def open_image(path: str, fmt: str, read_only: bool = False, store_root: str | None = None,
               **options) -> Image:
    """Open an image. store_root: the directory (the store, or the instance's
    whitelisted custom directory) that the image and its backing files must be
    regular files inside, reached through no symlink (see confined.py). None
    only checks the image's last component: for files outside any store."""
    return _engine(fmt)(path, read_only=read_only, store_root=store_root, **options)


def create_image(path: str, fmt: str, size: int, **options) -> Image:
    """Create a new, sparse image (the file must not exist) and return it open."""
    return _engine(fmt).create(path, size, **options)
