"""qcow2 images with an external data file (data_file, data_file_raw) against qemu.

qemu-img makes the image (its data file named relative to the image's
directory); qemu-io writes some of it; the engine reads it as the model says,
takes random writes (unaligned, mixed sizes, zero writes), and qemu-img check
and compare judge the result. A raw data file stays equal to the disk. A data
file outside the store, or reached through a symlink, is refused by name.
"""

from __future__ import annotations

import os
import random

import pytest

from conftest import engine_random_writes, qemu_img, qemu_random_writes
from vbdfs.images.base import ImageError
from vbdfs.images.qcow2 import Qcow2Image
from vbdfs.images.qcow2_check import check_file

KiB, MiB = 1 << 10, 1 << 20
SIZE = 24 * MiB


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
@pytest.mark.parametrize("ext", [False, True], ids=["standard", "extended_l2"])
def test_external_data_file_reads_and_writes_like_qemu(tmp_path, raw, ext):
    path = tmp_path / "disk.qcow2"
    opts = f"data_file=disk.data,data_file_raw={'on' if raw else 'off'}"
    opts += ",extended_l2=on" if ext else ""
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path.name, SIZE, cwd=tmp_path)
    rng = random.Random(raw * 2 + ext)
    model = bytearray(SIZE)
    qemu_random_writes(path, model, rng, 15)
    with Qcow2Image(str(path), store_root=str(tmp_path)) as img:
        assert img.read(0, SIZE) == model
        engine_random_writes(img, model, rng, 200)
    r = qemu_img("check", path.name, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "model.raw").write_bytes(model)
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", path.name, "model.raw", cwd=tmp_path,
                 check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_file(str(path))["summary"] == "clean"
    if raw:     # the raw data file is the disk
        assert (tmp_path / "disk.data").read_bytes().ljust(SIZE, b"\0") == model
    with open(path, "rb") as f:     # data_file_raw stays set (and true)
        f.seek(88)
        assert int.from_bytes(f.read(8), "big") == (2 if raw else 0)


def test_data_file_outside_the_store_refused(tmp_path):
    store = tmp_path / "store"
    (store / "vm").mkdir(parents=True)
    outside = tmp_path / "outside.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=../../outside.data",
             "sda", MiB, cwd=store / "vm")
    assert outside.exists()
    with pytest.raises(ImageError, match="external data file '../../outside.data' resolves "
                                         "to .* outside the store"):
        Qcow2Image(str(store / "vm" / "sda"), store_root=str(store))
    with pytest.raises(ImageError, match="outside the store"):
        Qcow2Image(str(store / "vm" / "sda"), read_only=True, store_root=str(store))


def test_data_file_through_a_symlink_refused(tmp_path):
    (tmp_path / "vm").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=real.data", "sda", MiB,
             cwd=tmp_path / "vm")
    qemu_img("amend", "-o", "data_file=link.data", "sda", cwd=tmp_path / "vm")
    os.symlink("real.data", tmp_path / "vm" / "link.data")
    with pytest.raises(ImageError, match="external data file 'link.data'.*symlink"):
        Qcow2Image(str(tmp_path / "vm" / "sda"), store_root=str(tmp_path))


def test_data_file_missing_named(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=gone.data", "sda", MiB,
             cwd=tmp_path)
    os.unlink(tmp_path / "gone.data")
    with pytest.raises(ImageError, match="external data file 'gone.data' .* not found"):
        Qcow2Image(str(tmp_path / "sda"), store_root=str(tmp_path))
