"""qcow2 images with zstd-compressed clusters (compression_type=zstd): read exactly
as qemu renders them, written over (compressed clusters rewritten plain) and then
judged by qemu-img check and compare; the message names zstd without its library."""

from __future__ import annotations

import json
import random
import sys

import pytest

from test_qcow2_interop import (KiB, MiB, assert_clean, assert_same_as, our_data_ranges,
                                pattern_file, qemu_data_ranges, qemu_img, qemu_io,
                                random_writes, render_raw)
from vbdfs.images import ImageError, open_image, qcow2_compress
from vbdfs.images.qcow2 import Qcow2Image


def compressed_clusters(path) -> int:
    return json.loads(qemu_img("check", "--output=json", path).stdout).get("compressed-clusters", 0)


def read_write_and_judge(path, tmp_path, seed):
    expect = render_raw(path, tmp_path)
    with Qcow2Image(str(path), read_only=True) as img:
        assert img.read(0, img.size) == expect
        assert our_data_ranges(img) == qemu_data_ranges(path)
    before = compressed_clusters(path)
    model = bytearray(expect)
    with Qcow2Image(str(path)) as img:
        random_writes(img, model, random.Random(seed), 300, max_len=20 * KiB)
        assert img.read(0, img.size) == model
    assert_clean(path)
    assert_same_as(path, model, tmp_path)
    assert compressed_clusters(path) < before          # overwritten ones became plain


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB, 2 * MiB])
def test_converted_with_zstd(tmp_path, cs):
    src = tmp_path / "src.raw"
    content = pattern_file(src, 8 * MiB, cs)
    path = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs},compression_type=zstd",
             src, path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert compressed_clusters(path) > 0
    assert render_raw(path, tmp_path) == content
    read_write_and_judge(path, tmp_path, cs)


def test_created_with_zstd_and_compressed_writes(tmp_path):
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd,cluster_size=65536",
             path, 32 * MiB)
    qemu_io(path, "write -c -P 0x55 0 64k", f"write -c -P 0x66 {MiB} 64k",
            f"write -c -P 0x77 {31 * MiB} 64k", "write -P 0x11 100000 3000",
            f"write -z {2 * MiB} 128k")
    assert compressed_clusters(path) == 3
    read_write_and_judge(path, tmp_path, 1)


def test_missing_zstd_library_is_named(tmp_path, monkeypatch):
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", path, MiB)
    monkeypatch.setitem(sys.modules, "zstandard", None)     # import zstandard now fails
    monkeypatch.setattr(qcow2_compress, "_module", None)
    with pytest.raises(ImageError, match="zstd.*'zstandard'.*not installed"):
        open_image(str(path), "qcow2")


def test_hostile_zstd_cluster_expands_to_one_cluster_at_most():
    import zstandard as zstd
    bomb = zstd.ZstdCompressor().compress(bytes(256 * MiB))
    assert len(bomb) < 64 * KiB
    out = qcow2_compress.decompress(qcow2_compress.ZSTD, bomb + b"garbage", 64 * KiB)
    assert out == bytes(64 * KiB)
    with pytest.raises(ValueError):
        qcow2_compress.decompress(qcow2_compress.ZSTD, b"not zstd at all" * 10, 64 * KiB)
