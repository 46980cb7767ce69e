"""Decompressing qcow2 compressed clusters: zlib (type 0) or zstd (type 1).

The compression type is the header's compression_type field (byte 104 of a
version 3 header, with incompatible feature bit 3 set when it is not zlib).
zlib clusters are raw deflate streams with a 4 KiB window (windowBits -12);
zstd clusters hold one or more zstd frames. Either may be followed by
unrelated bytes up to the end of its last 512-byte sector, so decompression
stops once a cluster's worth of output is there, and never produces more:
a hostile cluster cannot expand beyond one cluster in memory.

zstd needs the `zstandard` package (README "Dependencies"); it is imported
only when an image uses zstd.
"""

from __future__ import annotations

import io
import zlib

ZLIB, ZSTD = 0, 1
NAMES = {ZLIB: "zlib", ZSTD: "zstd"}


class CompressionError(Exception):
    """The compression type cannot be used (unknown, or its library is missing)."""


def check(ctype: int) -> None:
    """Raise CompressionError unless clusters of this type can be decompressed here."""
    if ctype == ZSTD:
        _zstd()
    elif ctype != ZLIB:
        raise CompressionError(f"unknown compression type {ctype} (known: 0 zlib, 1 zstd)")


def decompress(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """The first cluster_size bytes data decompresses to; may be fewer if data is
    short or damaged (the caller checks the length). Raises ValueError if it is
    not a stream of this type at all."""
    if ctype == ZLIB:
        try:
            return zlib.decompressobj(-12).decompress(data, cluster_size)
        except zlib.error as e:
            raise ValueError(str(e)) from None
    zstd = _zstd()
    reader = zstd.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    try:
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstd.ZstdError as e:
        if not out:
            raise ValueError(str(e)) from None
    return bytes(out)


_module = None


def _zstd():
    global _module
    if _module is None:
        try:
            import zstandard
        except ImportError:
            raise CompressionError("the image's clusters are compressed with zstd, and the "
                                   "Python module 'zstandard' (zstd) is not installed") \
                from None
        _module = zstandard
    return _module
