"""Concurrent requests through the mount: many in flight at once, in worker
threads (io=threads forces the concurrent path on this fast local store),
and every byte reads back (fio's crc32c verify)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import MiB, make_instance

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def fio_verify(path: str, cwd, *extra) -> dict:
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={path}", "--rw=randwrite", "--iodepth=64",
         "--ioengine=libaio", "--direct=1", "--size=96M", "--verify=crc32c",
         "--verify_fatal=1", "--do_verify=1", "--output-format=json", *extra],
        capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    return job


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("io", ["threads", "auto"])
def test_fio_verify_at_queue_depth_64(store, mount, tmp_path, fmt, io):
    """QD64 of mixed-size writes (4 KiB ... 192 KiB: partial qcow2 clusters and
    requests spanning two) with an fsync every 32, then every block read back
    and checked; the qcow2 image is clean for qemu-img."""
    path = make_instance(store, "web", 256 * MiB, fmt=fmt).disks[0].path
    m = mount(["-o", f"io={io}"])
    job = fio_verify(m.disk("web"), tmp_path, "--bsrange=4k-192k", "--fsync=32")
    assert job["write"]["io_bytes"] == 96 * MiB and job["read"]["io_bytes"] == 96 * MiB
    assert m.stop() == 0
    if fmt == "qcow2":
        r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_request_loop_with_queue_drained_between_bursts(store, mount, tmp_path):
    """Bursts of 16 reads, each waited for in full, so the kernel's queue
    empties between bursts, in worker threads: a request the fast request
    loop takes must not be the one another task was woken for (that task
    then blocked in read(2) on /dev/fuse, with the burst's answers waiting
    behind it: the old fuseloop hung here within a few hundred bursts)."""
    make_instance(store, "web", 64 * MiB)
    m = mount(["-o", "io=threads"])
    proc = subprocess.Popen(
        ["fio", "--name=bursts", f"--filename={m.disk('web')}", "--rw=randread", "--bs=4k",
         "--iodepth=16", "--iodepth_batch_submit=16", "--iodepth_batch_complete_min=16",
         "--ioengine=libaio", "--direct=1", "--size=64M", "--io_size=48M",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        m.stop()            # the stuck daemon goes, so fio can end
        proc.kill()
        proc.communicate()
        pytest.fail("the request loop hung: a burst's requests were never answered")
    assert proc.returncode == 0, out[-2000:] + err
    assert json.loads(out[out.index("{"):])["jobs"][0]["read"]["io_bytes"] == 48 * MiB
    assert m.stop() == 0
