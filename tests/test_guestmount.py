"""vbdctl mount / umount: a guest's filesystem for backup tools, leaving nothing behind."""

import io
import json
import os
import struct
import subprocess
import tarfile

import pytest

from conftest import MiB, make_instance, vbdctl_runner

pytestmark = [pytest.mark.fuse, pytest.mark.root]

SIZE = 64 * MiB


def guest_disk(tmp_path, files: dict) -> bytes:
    """A disk image with an MBR, partition 1 at 1 MiB holding ext4 with files."""
    src = tmp_path / "guest-files"
    for name, data in files.items():
        (src / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    img = tmp_path / "guest.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
        f.seek(0x1BE)
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048,
                            SIZE // 512 - 2048))
        f.seek(510)
        f.write(b"\x55\xaa")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", str(src), str(img),
                    f"{SIZE // MiB - 2}M"], check=True)
    return img.read_bytes()


def loops_over(prefix):
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devs if (d.get("back-file") or "").startswith(prefix)]


def mounted_at(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def ctl(store, mounted):
    run = vbdctl_runner(store, mounted.path)
    run.mount = mounted
    return run


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_mount_tar_umount_leaves_nothing(store, ctl, tmp_path, fmt):
    files = {"etc/motd": b"hello from the guest\n", "srv/blob": os.urandom(300_000)}
    image = guest_disk(tmp_path, files)
    make_instance(store, "web", SIZE, fmt=fmt)
    view = ctl.mount.disk("web")
    with open(view, "r+b") as f:        # through the mount: qcow2 gets it too
        f.write(image)
    target = tmp_path / "guest"
    target.mkdir()

    r = ctl("mount", "web", "sda", str(target), "--partition", "1", "--output", "json",
            check=0)
    info = json.loads(r.stdout)
    assert info["read_only"] and info["source"].endswith("p1")
    assert mounted_at(target) and loops_over(view)
    # A backup tool reads the guest's files; nothing can write them.
    tar = subprocess.run(["tar", "-C", str(target), "-cf", "-", "etc", "srv"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for name, data in files.items():
            assert t.extractfile(name).read() == data
    with pytest.raises(OSError):
        (target / "new").write_bytes(b"x")
    # While mounted the disk is in use: convert refuses.
    r = ctl("convert", "web", "sda", "--to", "raw" if fmt == "qcow2" else "qcow2")
    assert r.returncode == 1 and "cannot convert" in r.stderr

    ctl("umount", str(target), check=0)
    assert not mounted_at(target)
    assert loops_over(view) == []
    with open(view, "rb") as f:           # the guest's disk is untouched
        assert f.read(len(image)) == image


def small_guest(store, ctl, tmp_path):
    """Instance web whose disk holds a one-file guest; (its view, an empty mount target)."""
    make_instance(store, "web", SIZE)
    view = ctl.mount.disk("web")
    with open(view, "r+b") as f:
        f.write(guest_disk(tmp_path, {"a": b"a"}))
    target = tmp_path / "guest"
    target.mkdir()
    return view, target


def test_mount_errors_leave_no_loop_device(store, ctl, tmp_path):
    view, target = small_guest(store, ctl, tmp_path)
    r = ctl("mount", "web", "sda", str(target))          # whole disk: a partition table
    assert r.returncode == 1 and "--partition" in r.stderr, r.stderr
    r = ctl("mount", "web", "sda", str(target), "--partition", "3")
    assert r.returncode == 1 and "no partition 3" in r.stderr and "partitions: 1" in r.stderr
    assert loops_over(view) == [] and not mounted_at(target)
    # umount touches only what vbdctl mount made.
    r = ctl("umount", str(tmp_path))
    assert r.returncode == 1 and "not a mount point" in r.stderr
    r = ctl("umount", ctl.mount.path)
    assert r.returncode == 1 and "not unmounting" in r.stderr
    assert os.path.ismount(ctl.mount.path)


def test_read_write_mount_writes_the_guest_disk(store, ctl, tmp_path):
    view, target = small_guest(store, ctl, tmp_path)
    ctl("mount", "web", "sda", str(target), "--partition", "1", "--read-write", check=0)
    (target / "restored").write_bytes(b"from backup")
    ctl("umount", str(target), check=0)
    assert loops_over(view) == []
    ctl("mount", "web", "sda", str(target), "--partition", "1", check=0)
    try:
        assert (target / "restored").read_bytes() == b"from backup"
    finally:
        ctl("umount", str(target), check=0)
