"""vbdctl attach/detach with a real vbdfs mount, loop devices, ext4; and tap-ctl.

Every test detaches what it attached in a finally block, by device, and
only devices backed by its own paths.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import GiB, MiB, Mount, vbdctl_runner, wait_for
from vbdfs.store import Store

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def loops_backed_by(prefix):
    out = sh("losetup", "--json", "--list").stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return {d["name"]: d for d in devs if (d.get("back-file") or "").startswith(prefix)}


@pytest.fixture
def ctl(store, mounted, tmp_path):
    """vbdctl bound to the store and the running mount; cleans up loop devices."""
    run = vbdctl_runner(store, mounted.path)
    run.mount = mounted
    yield run
    for fs in (tmp_path / "fs0", tmp_path / "fs1"):
        if os.path.ismount(fs):
            subprocess.run(["umount", "-l", str(fs)])
    for dev in loops_backed_by(mounted.path + "/"):
        subprocess.run(["losetup", "--detach", dev])


def devices(stdout):
    return dict(line.split()[:2] for line in stdout.splitlines())


def test_end_to_end_raw_and_qcow2(ctl, store, tmp_path):
    ctl("add", "--disk", "0:size=1G", "--disk", "1:size=1G,format=qcow2", "web", check=0)
    mnt = ctl.mount
    for disk in ("sda", "sdb"):
        wait_for(lambda: os.path.exists(mnt.disk("web", disk)), what=f"{disk} in the mount")
        assert os.path.getsize(mnt.disk("web", disk)) == GiB
    devs = devices(ctl("attach", "web", check=0).stdout)
    assert sorted(devs) == ["sda", "sdb"]
    live = loops_backed_by(mnt.path + "/")
    assert {d: live[dev]["back-file"] for d, dev in devs.items()} == \
        {d: mnt.disk("web", d) for d in devs}
    assert all(live[dev]["dio"] for dev in devs.values())          # direct I/O on
    info = json.loads(ctl("info", "web", "--output", "json", check=0).stdout)
    assert {d["disk"]: d["attachment"]["device"] for d in info["disks"]} == devs
    # Attached: remove (and a second attach) refused, nothing changed.
    r = ctl("remove", "web")
    assert r.returncode == 1 and f"disk sda is attached as {devs['sda']}" in r.stderr
    r = ctl("attach", "web", "sdb")
    assert r.returncode == 1 and f"already attached as {devs['sdb']}" in r.stderr
    assert store.instances() == ["web"]
    payload = os.urandom(3 * MiB)
    for i, (disk, dev) in enumerate(sorted(devs.items())):
        fs = tmp_path / f"fs{i}"
        fs.mkdir()
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, str(fs))
        try:
            (fs / "data").write_bytes(payload)
        finally:
            sh("umount", str(fs))
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = ctl("detach", "web", check=0).stdout
    assert sorted(out.splitlines()) == [f"sda {devs['sda']} detached", f"sdb {devs['sdb']} detached"]
    assert loops_backed_by(mnt.path + "/") == {}
    # The data reached the images: read each ext4 straight from the store's files.
    sda, sdb = (d.path for d in store.load("web").disks)
    chk = subprocess.run(["qemu-img", "check", sdb], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    sh("qemu-img", "convert", "-O", "raw", sdb, str(tmp_path / "sdb.raw"))
    for image in (sda, str(tmp_path / "sdb.raw")):
        fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        sh("debugfs", "-R", f"dump /data {tmp_path}/data.out", image)
        assert (tmp_path / "data.out").read_bytes() == payload
        os.unlink(tmp_path / "data.out")
    ctl("remove", "web", check=0)
    assert os.listdir(store.root) == [".vbdfs"]
    assert os.listdir(store.state_dir("attachments")) == []
    assert loops_backed_by(mnt.path + "/") == {} and loops_backed_by(store.root + "/") == {}


def test_detach_busy_device_and_stale_records(ctl, store, tmp_path):
    ctl("add", "--disk", "0:size=256M", "web", check=0)
    dev = devices(ctl("attach", "web", "sda", check=0).stdout)["sda"]
    fs = tmp_path / "fs0"
    fs.mkdir()
    sh("mkfs.ext4", "-q", "-F", dev)
    sh("mount", dev, str(fs))
    try:
        r = ctl("detach", "web")
        assert r.returncode == 1 and f"{dev} is busy" in r.stderr
        assert json.loads(ctl("info", "web", "--output", "json", check=0).stdout)[
            "disks"][0]["attachment"]["device"] == dev
    finally:
        sh("umount", str(fs))
    # The kernel detaches it once unmounted (autoclear); the record is then stale.
    wait_for(lambda: dev not in loops_backed_by(ctl.mount.path + "/"), what="autoclear")
    info = json.loads(ctl("info", "web", "--output", "json", check=0).stdout)
    assert info["disks"][0]["attachment"] is None
    # A record left by a device detached by hand does not block either.
    dev = devices(ctl("attach", "web", check=0).stdout)["sda"]
    sh("losetup", "--detach", dev)
    ctl("remove", "web", check=0)
    assert store.instances() == []


def test_read_only_and_buffered(ctl, store):
    ctl("add", "--disk", "0:size=64M", "--disk", "1:size=64M", "web", check=0)
    a = devices(ctl("attach", "--read-only", "web", "sda", check=0).stdout)["sda"]
    b = devices(ctl("attach", "--direct-io", "off", "web", "1", check=0).stdout)["sdb"]
    live = loops_backed_by(ctl.mount.path + "/")
    assert live[a]["ro"] and not live[b]["ro"]
    assert live[a]["dio"] and not live[b]["dio"]
    # vbdctl reads loop devices from sysfs itself: it must agree with losetup.
    from vbdfs.operations.attach import loop_list
    ours = {dev: (back, ro) for dev, back, ro in loop_list()}
    assert {d: ours[d] for d in live} == {d: (x["back-file"], bool(x["ro"])) for d, x in live.items()}
    r = subprocess.run(["dd", "if=/dev/zero", f"of={a}", "bs=4k", "count=1", "oflag=direct"],
                       capture_output=True, text=True)
    assert r.returncode != 0                                    # read-only really
    ctl("detach", "web", "sda", check=0)
    assert set(loops_backed_by(ctl.mount.path + "/")) == {b}
    ctl("detach", "web", check=0)
    r = ctl("detach", "web", "sda")
    assert r.returncode == 1 and "disk sda is not attached" in r.stderr


def test_more_than_eight_loop_devices(ctl, store):
    n = 10
    ctl("add", *[a for i in range(n) for a in ("--disk", f"{i}:size=4M")], "many", check=0)
    devs = devices(ctl("attach", "many", check=0).stdout)
    assert len(set(devs.values())) == n
    assert all(stat.S_ISBLK(os.stat(d).st_mode) for d in devs.values())
    assert len(loops_backed_by(ctl.mount.path + "/")) == n
    ctl("detach", "many", check=0)
    assert loops_backed_by(ctl.mount.path + "/") == {}


def test_remove_refused_while_view_open(ctl, store):
    ctl("add", "--disk", "0:size=4M", "web", check=0)
    view = ctl.mount.disk("web")
    wait_for(lambda: os.path.exists(view), what="the view")
    holder = subprocess.Popen([sys.executable, "-c", f"f=open({view!r},'rb'); print('ok', flush=True); "
                               "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        r = ctl("remove", "web")
        assert r.returncode == 1
        assert f"disk sda is open by process {holder.pid}" in r.stderr and view in r.stderr
        assert "the vbdfs daemon" in r.stderr        # which holds the image for the view
        # A loop device made by hand over the image file counts too.
        dev = sh("losetup", "--find", "--show", store.load("web").disks[0].path).stdout.strip()
        try:
            r = ctl("remove", "web")
            assert f"disk sda is the backing file of {dev}" in r.stderr
        finally:
            sh("losetup", "--detach", dev)
    finally:
        holder.kill()
        holder.wait()
    ctl("remove", "web", check=0)


def test_attach_needs_the_right_mount(ctl, store, tmp_path, mount):
    ctl("add", "--disk", "0:size=4M", "web", check=0)
    base = [sys.executable, "-m", "vbdfs.cli", "--store", store.root,
            "--whitelist", store.whitelist_file]
    plain = tmp_path / "plain"
    plain.mkdir()
    r = subprocess.run(base + ["--mountpoint", str(plain), "attach", "web"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{plain} is not a mount point" in r.stderr
    # A vbdfs mount of another store at that mountpoint is refused too.
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = Mount(Store(str(other_root), store.whitelist_file), str(tmp_path / "othermnt"))
    try:
        r = subprocess.run(base + ["--mountpoint", other.path, "attach", "web"],
                           capture_output=True, text=True)
        assert r.returncode == 1 and f"vbdfs mount of {other_root}, not of the store" in r.stderr
    finally:
        other.stop()
    assert loops_backed_by(str(tmp_path)) == {}
    assert not os.path.exists(os.path.join(store.state_dir("attachments"), "web.json"))


def test_blktap_without_tap_ctl(ctl, store):
    if subprocess.run(["which", "tap-ctl"], capture_output=True).returncode == 0:
        pytest.fail("tap-ctl is installed: this test expects the Debian 12 / Xen >= 4.13 case")
    ctl("add", "--disk", "0:size=4M,driver=blktap", "--disk", "1:size=4M", "web", check=0)
    r = ctl("attach", "web")
    assert r.returncode == 1
    assert "disk sda uses the blktap driver, but tap-ctl is not installed" in r.stderr
    assert "Xen 4.13" in r.stderr and "--driver loop" in r.stderr and "qdisk" in r.stderr
    assert loops_backed_by(ctl.mount.path + "/") == {}      # sdb was not left attached
    devs = devices(ctl("attach", "--driver", "loop", "web", check=0).stdout)
    assert sorted(devs) == ["sda", "sdb"]
    ctl("detach", "web", check=0)


def test_blktap_with_a_tap_ctl(ctl, store, tmp_path):
    """A stand-in tap-ctl that keeps its state in a file: checks the commands we run."""
    state = tmp_path / "taps"
    fake = tmp_path / "bin" / "tap-ctl"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/tap-ctl.log
case "$1" in
create) echo "pid=4242 minor=3 state=0 args=$3" >> {state}; echo /dev/xen/blktap-2/tapdev3 ;;
list) cat {state} 2>/dev/null ;;
destroy) : > {state} ;;
esac
""")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    ctl("add", "--disk", "0:size=4M,driver=blktap2", "--disk", "1:size=4M,driver=qdisk", "web",
        check=0)
    out = ctl("attach", "web", check=0, env=env).stdout     # the qdisk disk is skipped
    assert out.split() == ["sda", "/dev/xen/blktap-2/tapdev3"]
    r = ctl("remove", "web", env=env)
    assert r.returncode == 1 and "attached as /dev/xen/blktap-2/tapdev3" in r.stderr
    ctl("detach", "web", check=0, env=env)
    log = (tmp_path / "tap-ctl.log").read_text().splitlines()
    assert log[0] == f"create -a aio:{ctl.mount.disk('web')}"
    assert "destroy -p 4242 -m 3" in log
    r = ctl("attach", "web", "sdb", env=env)
    assert r.returncode == 1 and "qdisk driver" in r.stderr
    ctl("remove", "web", check=0, env=env)
