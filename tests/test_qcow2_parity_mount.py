"""qemu-made qcow2 images with the less common options, through a real mount (issue 12).

Each image is made by qemu-img with a combination of options (extended L2
entries, zstd compression, 1- and 64-bit refcounts, compat=1.1, an external
raw data file, cluster sizes 4 KiB to 2 MiB), written by qemu-io (plain,
zero and, where it can, compressed writes), adopted with `vbdctl add -t
file,reuse`, and then:
* the disk in the mount reads exactly as `qemu-img convert -O raw` renders it;
* after a few hundred random writes through the mount (mixed sizes,
  unaligned, zero writes) and fsync, `qemu-img check` finds no errors and
  `qemu-img compare` finds the image identical to the model.
"""

import json
import os
import random
import subprocess

import pytest

from conftest import MiB, vbdctl_runner, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.root]

SIZE = 32 * MiB
ZSTD = "compression_type=zstd"
COMBOS = {
    "extl2_zstd_rc64_16k": f"extended_l2=on,{ZSTD},refcount_bits=64,compat=1.1,cluster_size=16k",
    "extl2_zstd_rc64_2M": f"extended_l2=on,{ZSTD},refcount_bits=64,compat=1.1,cluster_size=2M",
    "zstd_rc64_4k": f"{ZSTD},refcount_bits=64,compat=1.1,cluster_size=4k",
    "extl2_rc1_64k": "extended_l2=on,refcount_bits=1,cluster_size=64k",
    "extl2_data_file_raw_256k": "extended_l2=on,cluster_size=256k,data_file=sda.data,"
                                "data_file_raw=on",
}


def run(*argv, cwd=None):
    r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r
    return r


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_qemu_made_image_through_the_mount(store, mounted, combo):
    vm = os.path.join(store.root, "vm")
    os.mkdir(vm, 0o700)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", COMBOS[combo], "sda", SIZE, cwd=vm)
    rng = random.Random(combo)
    model = bytearray(SIZE)
    compressed, kept = [], []
    # Compressed clusters (whole, aligned), where qemu can write them: not with a
    # data file, nor with 1-bit refcounts (clusters share host clusters); first,
    # as qemu compresses only into unallocated clusters.
    if "data_file" not in COMBOS[combo] and "refcount_bits=1," not in COMBOS[combo]:
        cs = {"4k": 4096, "16k": 16384, "64k": 65536, "2M": 2 * MiB}[combo.rsplit("_", 1)[1]]
        for k in range(3):
            off = (k * 7 * MiB + cs) // cs * cs
            compressed += ["-c", f"write -c -P {k + 100} {off} {cs}"]
            model[off:off + cs] = bytes([k + 100]) * cs
            kept.append((off, off + cs))
    cmds = []
    for _ in range(30):
        off = rng.randrange(0, SIZE - 300000) // 512 * 512
        n = rng.randrange(1, 500) * 512
        if any(a < off + n and off < b for a, b in kept):
            continue        # qemu keeps them compressed for the engine to read
        if rng.random() < 0.3:
            cmds += ["-c", f"write -z {off} {n}"]
            model[off:off + n] = bytes(n)
        else:
            pat = rng.randrange(1, 255)
            cmds += ["-c", f"write -P {pat} {off} {n}"]
            model[off:off + n] = bytes([pat]) * n
    run("qemu-io", "-f", "qcow2", *compressed, *cmds, "sda", cwd=vm)
    if compressed:      # the image really holds compressed clusters, of its type
        info = json.loads(run("qemu-img", "info", "--output=json", "sda", cwd=vm).stdout)
        ctype = info["format-specific"]["data"].get("compression-type")
        assert ctype == ("zstd" if ZSTD in COMBOS[combo] else "zlib"), info
        checked = run("qemu-img", "check", "sda", cwd=vm).stdout
        assert " 0.00% compressed clusters" not in checked, checked
    run("qemu-img", "convert", "-O", "raw", "sda", "../rendered.raw", cwd=vm)
    rendered = os.path.join(store.root, "rendered.raw")
    with open(rendered, "rb") as f:
        assert f.read() == model
    os.unlink(rendered)

    ctl = vbdctl_runner(store, mounted.path)
    r = ctl("add", "-t", "file,reuse", "vm", check=0)
    assert "read-only" not in r.stdout + r.stderr, r
    view = mounted.disk("vm")
    wait_for(lambda: os.path.exists(view), what="the disk in the mount")
    fd = os.open(view, os.O_RDWR)
    try:
        assert os.pread(fd, SIZE, 0) == model
        for i in range(300):
            off = rng.randrange(0, SIZE - 1)
            n = min(rng.choice([1, 512, 4096, 5000, 65536, 200000]), SIZE - off)
            data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            if i % 100 == 99:
                os.fsync(fd)
        os.fsync(fd)
        assert os.pread(fd, SIZE, 0) == model
    finally:
        os.close(fd)
    with open(os.path.join(store.root, "model.raw"), "wb") as f:
        f.write(model)
    # The daemon may still hold the image for a moment after close (RELEASE is async).
    wait_for(lambda: subprocess.run(["qemu-img", "check", "sda"], cwd=vm,
                                    capture_output=True).returncode == 0,
             what="qemu-img check without errors")
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", "sda", "../model.raw", cwd=vm)
