"""A kernel loop device over a vbdfs disk, with a real ext4 on it."""

import os
import subprocess

import pytest

from conftest import GiB, MiB, make_instance

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def loop_devices_of(path):
    out = sh("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [path]]


def test_ext4_on_loop_over_vbdfs(store, mounted, tmp_path):
    make_instance(store, "web", 2 * GiB)
    disk = mounted.disk("web")
    loop = sh("losetup", "--find", "--show", "--direct-io=on", disk).stdout.strip()
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/dio") as f:
            assert f.read().strip() == "1"      # direct I/O really on
        sh("mkfs.ext4", "-q", "-F", loop)
        sh("mount", loop, str(fsmnt))
        try:
            sh("cp", "-a", os.path.join(os.path.dirname(os.__file__), "json"), str(fsmnt / "tree"))
            with open(fsmnt / "big", "wb") as f:
                f.write(os.urandom(20 * MiB))
        finally:
            sh("umount", str(fsmnt))
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        sh("losetup", "--detach", loop)
    assert loop_devices_of(disk) == []
    # The disk stayed sparse: ext4's metadata and our 20 MiB, not 2 GiB.
    used = os.stat(os.path.join(store.root, "web", "sda")).st_blocks * 512
    assert 20 * MiB <= used < 200 * MiB
    # And the backing file holds the same filesystem: fsck it directly.
    fsck = subprocess.run(["e2fsck", "-fn", os.path.join(store.root, "web", "sda")],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
