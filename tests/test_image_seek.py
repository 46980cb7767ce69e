"""Image.seek: lseek(2)'s SEEK_DATA/SEEK_HOLE on a virtual disk, from its extents."""

import pytest

from conftest import GiB, MiB
from vbdfs.images import Kind, create_image

KiB = 1 << 10


@pytest.fixture(params=["raw", "qcow2"])
def fragmented(request, tmp_path):
    """64 KiB of data every 128 KiB over the first 256 MiB of a 3 GiB disk, and at its end."""
    img = create_image(str(tmp_path / f"disk.{request.param}"), request.param, 3 * GiB)
    for off in range(0, 256 * MiB, 128 * KiB):
        img.write(off, b"\1" * (64 * KiB))
    img.write(3 * GiB - 64 * KiB, b"\2" * (64 * KiB))
    yield img
    img.close()


def walk(img):
    runs, pos = [], 0
    while (data := img.seek(pos, True)) is not None:
        pos = img.seek(data, False)
        runs.append((data, pos - data))
    return runs


def test_seek_agrees_with_extents(fragmented):
    assert walk(fragmented) == [(e.offset, e.length) for e in fragmented.extents()
                                if e.kind is Kind.DATA]
    assert fragmented.seek(3 * GiB - 1, False) == 3 * GiB     # the end counts as a hole
    assert fragmented.seek(3 * GiB, True) is None
    assert fragmented.seek(-1, False) is None


def test_walking_a_fragmented_disk_maps_each_extent_a_few_times(fragmented):
    # A walk is one seek per boundary: if each seek mapped a fixed large window,
    # walking the disk would map its fragments once per boundary (quadratic).
    mapped = 0
    extents = fragmented.extents

    def counting(offset=0, length=None):
        nonlocal mapped
        out = extents(offset, length)
        mapped += len(out)
        return out
    fragmented.extents = counting
    runs = walk(fragmented)
    assert len(runs) == 2049
    assert mapped < 16 * len(runs)
