"""The sparse raw engine, called directly."""

import os

import pytest

from vbdfs.images import ImageError, Kind, OutOfRange, ReadOnlyImage, create_image, open_image

MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    image = create_image(str(tmp_path / "disk"), "raw", 256 * MiB)
    yield image
    image.close()


def test_create_is_sparse_and_sized(img):
    assert img.size == 256 * MiB
    assert os.path.getsize(img.path) == 256 * MiB
    assert img.allocated() == 0
    assert img.extents() == [(0, 256 * MiB, Kind.HOLE)]
    assert img.read(MiB, 4096) == bytes(4096)


def test_create_refuses_existing_file(tmp_path):
    (tmp_path / "disk").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        create_image(str(tmp_path / "disk"), "raw", MiB)
    assert (tmp_path / "disk").read_bytes() == b"keep me"


def test_write_read_and_extents(img):
    data = os.urandom(3 * 4096 + 17)
    img.write(MiB + 5, data)
    assert img.read(MiB + 5, len(data)) == data
    ext = img.extents()
    data_ext = [e for e in ext if e.kind is Kind.DATA]
    assert len(data_ext) == 1
    assert data_ext[0].offset <= MiB + 5 and data_ext[0].end >= MiB + 5 + len(data)
    assert sum(e.length for e in ext) == img.size
    assert 0 < img.allocated() <= 5 * 4096


def test_zero_write_deallocates(img):
    img.write(0, b"\xff" * (8 * MiB))
    img.flush()
    assert img.allocated() >= 8 * MiB
    img.write(0, bytes(8 * MiB))
    assert img.allocated() == 0
    assert img.read(0, 8 * MiB) == bytes(8 * MiB)


def test_zero_write_into_hole_allocates_nothing(img):
    for off, n in [(0, 64 * MiB), (100, 100), (4095, 2), (7 * MiB + 3, 70000)]:
        img.write(off, bytes(n))
    assert img.allocated() == 0


def test_unaligned_zero_keeps_neighbours(img):
    img.write(0, b"\x11" * 16384)
    img.zero(1000, 10000)
    got = img.read(0, 16384)
    assert got[:1000] == b"\x11" * 1000
    assert got[1000:11000] == bytes(10000)
    assert got[11000:] == b"\x11" * (16384 - 11000)
    assert img.allocated() < 16384   # the whole blocks in the middle were punched


def test_out_of_range(img):
    with pytest.raises(OutOfRange):
        img.write(img.size - 1, b"ab")
    with pytest.raises(OutOfRange):
        img.zero(img.size, 1)
    assert os.path.getsize(img.path) == img.size
    assert img.read(img.size - 2, 10) == bytes(2)   # reads end short like a file


def test_read_only(tmp_path):
    create_image(str(tmp_path / "d"), "raw", MiB).close()
    with open_image(str(tmp_path / "d"), "raw", read_only=True) as ro:
        with pytest.raises(ReadOnlyImage):
            ro.write(0, b"x")


def test_grow_keeps_data_and_sparseness(img):
    img.write(0, b"abc")
    img.resize(10 * 1024 * MiB)
    assert img.size == 10 * 1024 * MiB
    assert img.read(0, 3) == b"abc"
    assert img.allocated() <= 4096
    with pytest.raises(ImageError, match="shrinking"):
        img.resize(MiB)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ImageError, match="unknown image format"):
        open_image(str(tmp_path / "x"), "vmdk")


def test_is_zero():
    from vbdfs.images.base import is_zero
    assert is_zero(b"") and is_zero(bytes(4096)) and is_zero(bytes(5 * MiB + 3))
    assert is_zero(memoryview(bytes(100))[10:20]) and is_zero(bytearray(7))
    for n in (1, 4096, MiB, 5 * MiB + 3):
        for pos in {0, n // 2, n - 1}:
            data = bytearray(n)
            data[pos] = 1
            assert not is_zero(bytes(data)), (n, pos)
            assert not is_zero(memoryview(data))
