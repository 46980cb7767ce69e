"""Extended L2 entries (extended_l2=on, 32 subclusters per cluster) against qemu.

Images made by qemu-img, with subclusters written and zeroed by qemu-io,
read exactly as the model says; random writes (unaligned, mixed sizes, zero
writes and zero()) through the engine then pass qemu-img check and compare
identical to the model; with a backing file too, and over an internal
snapshot (shared clusters are copied). Hostile bitmaps are refused by name.
"""

from __future__ import annotations

import random
import struct
import subprocess

import pytest

from conftest import assert_judged_same, engine_random_writes, qemu_img, qemu_random_writes
from vbdfs.images.base import ImageError
from vbdfs.images.qcow2 import Qcow2Image
from vbdfs.images.qcow2_check import check_file

KiB, MiB = 1 << 10, 1 << 20
SIZE = 24 * MiB


@pytest.mark.parametrize("cluster", [16 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backing"])
def test_extended_l2_reads_and_writes_like_qemu(tmp_path, cluster, backing):
    path = tmp_path / "ext.qcow2"
    rng = random.Random(cluster + backing)
    model = bytearray(SIZE)
    opts = f"extended_l2=on,cluster_size={cluster}"
    if backing:
        base = bytearray(rng.randbytes(SIZE))
        for k in range(0, SIZE, 3 * MiB):           # zero stretches in the backing file
            base[k:k + MiB] = bytes(MiB)
        (tmp_path / "base.raw").write_bytes(base)
        model[:] = base
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw",
                 path, SIZE)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, SIZE)
    qemu_random_writes(path, model, rng, 20)
    rendered = tmp_path / "rendered.raw"
    qemu_img("convert", "-O", "raw", path, rendered)
    assert rendered.read_bytes() == model
    with Qcow2Image(str(path)) as img:
        assert img.read(0, SIZE) == model
        engine_random_writes(img, model, rng, 200)
        assert img.read(0, SIZE) == model
    assert_judged_same(path, model, tmp_path)
    assert check_file(str(path))["summary"] == "clean"


def test_extended_l2_copies_clusters_shared_with_a_snapshot(tmp_path):
    path = tmp_path / "snap.qcow2"
    rng = random.Random(7)
    model = bytearray(SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", path,
             SIZE)
    qemu_random_writes(path, model, rng, 40)
    qemu_img("snapshot", "-c", "s1", path)
    snap = bytes(model)
    with Qcow2Image(str(path)) as img:
        engine_random_writes(img, model, rng, 150)
    assert_judged_same(path, model, tmp_path)
    out = tmp_path / "snap.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", path, out)
    assert out.read_bytes() == snap


def test_hostile_subcluster_bitmap_refused(tmp_path):
    path = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, SIZE)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", str(path)],
                   check=True, capture_output=True)
    data = bytearray(path.read_bytes())
    l2 = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 40)[0])[0] \
        & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2 + 8, 1 | 1 << 32)       # allocated and zero
    path.write_bytes(data)
    with Qcow2Image(str(path), read_only=True) as img:
        with pytest.raises(ImageError, match="both allocated and zero"):
            img.read(0, 512)


def test_extended_l2_compressed_clusters(tmp_path):
    """qemu-img convert -c makes compressed clusters in an extended-L2 image: read,
    then rewritten plain (the whole cluster) when written."""
    rng = random.Random(11)
    src = tmp_path / "src.raw"
    model = bytearray(SIZE)
    for k in range(0, SIZE, 2 * MiB):
        model[k:k + 300 * KiB] = bytes([k >> 20 | 1]) * (300 * KiB)     # compressible
    src.write_bytes(model)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=64k", src,
             path)
    with Qcow2Image(str(path)) as img:
        assert img.read(0, SIZE) == model
        engine_random_writes(img, model, rng, 150)
    assert_judged_same(path, model, tmp_path)
