"""vbdctl export / import / convert and the stream: sparse, verified, all-or-nothing.

Contents are compared with `qemu-img compare` (an outside judge that reads
sparse files by block status, so 20 GiB disks stay cheap) and checksums with
an independent implementation of the documented sha256-runs algorithm.
"""

import configparser
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import GiB, MiB, make_instance, vbdctl_runner, wait_for
from vbdfs.images import open_image
from vbdfs.operations import transfer
from vbdfs.store import DiskSpec

PIECE = 64 << 10


@pytest.fixture
def ctl(store, tmp_path):
    return vbdctl_runner(store, str(tmp_path / "mnt0"), text=False)


def fill(store, name, data=50 * MiB, seed=1, disk=0):
    """Random 64 KiB pieces at random 4 KiB-aligned offsets, plus one short tail write."""
    d = store.load(name).disks[disk]
    rnd = random.Random(seed)
    with open_image(d.path, d.format) as img:
        for _ in range(data // PIECE):
            img.write(rnd.randrange(0, (d.size - PIECE) // 4096) * 4096, rnd.randbytes(PIECE))
        img.write(d.size - 100, b"\xff" * 100)          # the very end, a partial block
        img.flush()
    return d


def allocated(path):
    return os.stat(path).st_blocks * 512


def same(a, fa, b, fb):
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stdout + r.stderr


def reference_checksum(path):
    """sha256-runs of a raw file, written from the module docstring's definition."""
    h, run, start, off = hashlib.sha256(), None, 0, 0
    with open(path, "rb") as f:
        while b := f.read(4096):
            if b.count(0) == len(b):
                if run:
                    h.update(struct.pack(">QQ", start, off - start) + run.digest())
                run = None
            elif run:
                run.update(b)
            else:
                run, start = hashlib.sha256(b), off
            off += len(b)
    if run:
        h.update(struct.pack(">QQ", start, off - start) + run.digest())
    h.update(struct.pack(">Q", off))
    return "sha256-runs:" + h.hexdigest()


def store_entries(store):
    return sorted(e for e in os.listdir(store.root) if e != ".vbdfs")


# --- checksum -------------------------------------------------------------------
def test_checksum_matches_the_documented_algorithm(store, tmp_path, ctl):
    make_instance(store, "small", 24 * MiB + 1024)      # size not a multiple of 4 KiB
    d = store.load("small").disks[0]
    with open_image(d.path, "raw") as img:
        img.write(10 * MiB, os.urandom(10 * MiB))        # more than one batch for the hasher
        img.write(0, b"\1" * 4096)
        img.write(4096, bytes(4096) + b"\2" * 5000)     # zero block inside written data
        img.write(3 * MiB + 17, b"abc")
        img.write(img.size - 10, b"z" * 10)
    out = tmp_path / "exp"
    out.mkdir()
    r = ctl("export", "small", str(out), "--output", "json", check=0)
    got = json.loads(r.stdout)["disks"][0]["checksum"]
    assert got == reference_checksum(d.path)
    # Flipping any byte, even in a hole, changes it.
    with open(d.path, "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"\1")
    assert reference_checksum(d.path) != got


# --- export / import, raw and qcow2 -------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_import_20g_sparse_verified(store, tmp_path, ctl, fmt):
    make_instance(store, "web", 20 * GiB, 256 * MiB, fmt=fmt)
    src = fill(store, "web")
    out = tmp_path / "exp"
    out.mkdir()
    t = time.monotonic()
    r = ctl("export", "web", str(out), "--output", "json", check=0)
    assert time.monotonic() - t < 15          # proportional to 50 MiB, not 20 GiB
    summary = json.loads(r.stdout)
    exp = out / "web"
    assert sorted(os.listdir(out)) == ["web"]     # no .new left
    assert sorted(os.listdir(exp)) == sorted(["config.ini", "manifest.json",
                                              f"sda.{fmt}", f"sdb.{fmt}"])
    dump = str(exp / f"sda.{fmt}")
    assert allocated(dump) <= allocated(src.path) + MiB
    assert same(src.path, fmt, dump, fmt)[0]
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", dump], check=True)

    r = ctl("import", str(exp), "--name", "web2", "--output", "json", check=0)
    imported = json.loads(r.stdout)
    new = store.load("web2")
    assert [(d.format, d.size) for d in new.disks] == [(fmt, 20 * GiB), (fmt, 256 * MiB)]
    assert [d["checksum"] for d in imported["disks"]] == \
        [d["checksum"] for d in summary["disks"]]
    assert same(src.path, fmt, new.disks[0].path, fmt)[0]
    assert abs(allocated(new.disks[0].path) - allocated(src.path)) <= MiB
    if fmt == "raw":     # an outside check of the checksum on the (small) second disk
        assert imported["disks"][1]["checksum"] == reference_checksum(new.disks[1].path)


def test_export_in_the_other_format_and_import_as_another(store, tmp_path, ctl):
    make_instance(store, "q", 20 * GiB, fmt="qcow2")
    src = fill(store, "q", data=8 * MiB)
    out = tmp_path / "exp"
    out.mkdir()
    ctl("export", "q", str(out), "--format", "raw", check=0)
    dump = str(out / "q" / "sda.raw")
    assert same(src.path, "qcow2", dump, "raw")[0]
    assert allocated(dump) <= allocated(src.path) + MiB
    ctl("import", str(out / "q"), "--name", "q2", "-t", "file:format=qcow2,driver=qdisk",
        check=0)
    d = store.load("q2").disks[0]
    assert (d.format, d.driver) == ("qcow2", "qdisk")
    assert same(src.path, "qcow2", d.path, "qcow2")[0]


def test_config_ini_is_ganeti_style(store, tmp_path, ctl):
    m = store.create("db", [DiskSpec(
        size=3 * MiB + 512)], os_name="debootstrap+default", primary="node1")
    out = tmp_path / "exp"
    out.mkdir()
    ctl("export", "db", str(out), check=0)
    c = configparser.ConfigParser()
    assert c.read(out / "db" / "config.ini")
    e, i = c["export"], c["instance"]
    assert e["version"] == "0" and e["compression"] == "none"
    assert e["source"] == "node1" and e["os"] == "debootstrap+default"
    assert abs(int(e["timestamp"]) - time.time()) < 60
    assert (i["name"], i["disk_template"], i["disk_count"]) == ("db", "file", "1")
    assert (i["disk0_ivname"], i["disk0_size"], i["disk0_dump"], i["disk0_name"]) == \
        ("disk/0", "4", "sda.raw", "sda")        # MiB, rounded up
    assert c["vbdfs"]["disk0_bytes"] == str(3 * MiB + 512)
    assert json.loads((out / "db" / "manifest.json").read_text()) == m.to_dict()


# --- all or nothing ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["data", "hole"])
def test_flipped_byte_in_dump_fails_import_naming_the_disk(store, tmp_path, ctl, where):
    make_instance(store, "web", 64 * MiB, 20 * GiB)
    fill(store, "web", data=2 * MiB, disk=1)
    out = tmp_path / "exp"
    out.mkdir()
    ctl("export", "web", str(out), check=0)
    dump = out / "web" / "sdb.raw"
    with open(dump, "r+b") as f:
        if where == "data":
            pos = os.lseek(f.fileno(), 0, os.SEEK_DATA) + 1234
            f.seek(pos)
            old = f.read(1)
            f.seek(pos)
            f.write(bytes([old[0] ^ 0x40]))
        else:
            f.seek(10 * GiB + 7)
            f.write(b"\1")
    before = store_entries(store)
    r = ctl("import", str(out / "web"), "--name", "copy")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "disk sdb" in err and "checksum mismatch" in err, err
    assert store_entries(store) == before         # no instance, no staging leftovers
    assert "copy" not in store.instances()


def test_killed_export_never_looks_complete(store, tmp_path, ctl):
    make_instance(store, "big", 20 * GiB)
    fill(store, "big", data=400 * MiB)
    out = tmp_path / "exp"
    out.mkdir()
    cmd = [sys.executable, "-m", "vbdfs.cli", "--store", store.root,
           "--whitelist", store.whitelist_file, "export", "big", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dump = out / "big.new" / "sda.raw"
    wait_for(lambda: dump.exists() and allocated(dump) > 20 * MiB, timeout=15,
             what="the export to be under way")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "big").exists()
    assert allocated(dump) < 400 * MiB            # it really was killed half-way
    # The next export replaces the dead one's leftovers.
    ctl("export", "big", str(out), check=0)
    assert sorted(os.listdir(out)) == ["big"]
    assert same(store.load("big").disks[0].path, "raw", str(out / "big" / "sda.raw"), "raw")[0]


def test_import_refuses_an_existing_name_and_unverifiable_exports(store, tmp_path, ctl):
    make_instance(store, "a", 4 * MiB)
    out = tmp_path / "exp"
    out.mkdir()
    ctl("export", "a", str(out), check=0)
    before = store_entries(store)
    r = ctl("import", str(out / "a"))
    assert r.returncode == 1 and b"already exists" in r.stderr
    ini = out / "a" / "config.ini"
    c = configparser.ConfigParser()
    c.read(ini)
    c.remove_section("vbdfs")                 # a plain Ganeti export: nothing to verify with
    with open(ini, "w") as f:
        c.write(f)
    r = ctl("import", str(out / "a"), "--name", "b")
    assert r.returncode == 1 and b"cannot be verified" in r.stderr
    assert store_entries(store) == before
    r = ctl("export", "a", str(out))
    assert r.returncode == 1 and b"already exists" in r.stderr


# --- the stream ------------------------------------------------------------------------------
def test_stream_round_trip_is_identical(store, tmp_path):
    store.create("web", [DiskSpec(
        size=20 * GiB, format=f, driver=drv) for f, drv in (("raw", "loop"), ("qcow2", "qdisk"))],
        os_name="debian", primary="node1")
    fill(store, "web", data=20 * MiB, disk=0)
    fill(store, "web", data=20 * MiB, disk=1, seed=2)
    base = [sys.executable, "-m", "vbdfs.cli", "--store", store.root,
            "--whitelist", store.whitelist_file]
    r = subprocess.run(f"{' '.join(base)} export web - | {' '.join(base)} import - "
                       "--name web2 --output json", shell=True, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    a, b = store.load("web"), store.load("web2")
    assert [(d.format, d.driver, d.size) for d in a.disks] == \
        [(d.format, d.driver, d.size) for d in b.disks]
    assert b.os == "debian"
    for da, db in zip(a.disks, b.disks):
        assert same(da.path, da.format, db.path, db.format)[0]
        assert abs(allocated(da.path) - allocated(db.path)) <= MiB
    subprocess.run(["qemu-img", "check", "-q", b.disks[1].path], check=True)


def test_stream_corruption_and_truncation_leave_nothing(store, ctl):
    make_instance(store, "web", 20 * GiB, 64 * MiB)
    fill(store, "web", data=4 * MiB, disk=1)
    stream = ctl("export", "web", "-", check=0).stdout
    assert stream.startswith(b'{"checksum": "sha256-runs"')
    before = store_entries(store)
    # A flipped byte in sdb's data.
    header_end = stream.index(b"\n") + 1
    first_sdb = stream.index(b"DATA", stream.index(b"DISK", header_end))
    bad = bytearray(stream)
    bad[first_sdb + transfer.FRAME.size + 100] ^= 1
    r = ctl("import", "-", "--name", "x", input=bytes(bad))
    assert r.returncode == 1 and b"disk sdb" in r.stderr and b"checksum mismatch" in r.stderr
    # Cut short.
    r = ctl("import", "-", "--name", "x", input=stream[:len(stream) // 2])
    assert r.returncode == 1 and b"truncated" in r.stderr
    # Not a stream at all.
    r = ctl("import", "-", "--name", "x", input=b"hello\n")
    assert r.returncode == 1
    assert store_entries(store) == before
    ctl("import", "-", "--name", "x", input=stream, check=0)
    assert store.instances() == ["web", "x"]


# --- consistency: read-write users -------------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.root
def test_export_refuses_a_disk_open_read_write_unless_forced(store, tmp_path, ctl, mount):
    make_instance(store, "web", 64 * MiB)
    m = mount()
    out = tmp_path / "exp"
    out.mkdir()
    with open(m.disk("web"), "r+b") as f:
        f.write(b"x" * 4096)
        f.flush()
        r = ctl("--mountpoint", m.path, "export", "web", str(out))
        assert r.returncode == 1
        err = r.stderr.decode()
        assert "open for writing" in err and "--force" in err and "disk sda" in err, err
        assert os.listdir(out) == []
        r = ctl("--mountpoint", m.path, "export", "web", str(out), "--force", check=0)
        assert b"warning (--force)" in r.stderr
    # Read-only users do not count.
    shutil.rmtree(out / "web")
    with open(m.disk("web"), "rb"):
        ctl("--mountpoint", m.path, "export", "web", str(out), check=0)


# --- convert --------------------------------------------------------------------------------
def test_convert_round_trip_keeps_contents_and_sparseness(store, ctl):
    make_instance(store, "web", 20 * GiB)
    d = fill(store, "web", data=16 * MiB)
    keep = d.path + ".orig"
    subprocess.run(["cp", "--sparse=always", d.path, keep], check=True)
    r = ctl("convert", "web", "sda", "--to", "qcow2", "--output", "json", check=0)
    s = json.loads(r.stdout)
    assert (s["from"], s["to"]) == ("raw", "qcow2")
    d2 = store.load("web").disks[0]
    assert d2.format == "qcow2" and d2.path == d.path
    subprocess.run(["qemu-img", "check", "-q", d.path], check=True)
    assert same(keep, "raw", d.path, "qcow2")[0]
    # Data plus qcow2 metadata: 40 L2 tables of 64 KiB map 20 GiB.
    assert allocated(d.path) <= allocated(keep) + 4 * MiB
    ctl("convert", "web", "0", "--to", "raw", check=0)
    assert store.load("web").disks[0].format == "raw"
    assert same(keep, "raw", d.path, "raw")[0]
    assert abs(allocated(d.path) - allocated(keep)) <= MiB
    assert [e for e in os.listdir(os.path.dirname(d.path)) if e.startswith(".")] == []
    r = ctl("convert", "web", "sda", "--to", "raw")
    assert r.returncode == 1 and b"already raw" in r.stderr


def test_convert_removes_the_old_images_own_data_file_only(store, ctl, tmp_path):
    """A qcow2 disk with an external data file next to it, converted to raw: the
    data file goes with the old image. One that another disk names too, or one
    outside the disk's directory (another instance's disk), stays."""
    make_instance(store, "web", 8 * MiB)
    fill(store, "web", data=1 * MiB)
    web_before = open(store.load("web").disks[0].path, "rb").read()
    vm = os.path.join(store.root, "vm")
    os.mkdir(vm, 0o700)

    def qemu(*args):
        subprocess.run(list(args), check=True, capture_output=True, cwd=vm)
    # sda owns sda.data; sdb and sdc share shared.data; sdd's data file is web's disk.
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=sda.data", "sda", "8M")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=shared.data", "sdb", "8M")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=shared.data", "sdc", "8M")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=sdd.data", "sdd", "8M")
    qemu("qemu-img", "amend", "-o", "data_file=../web/sda", "sdd")
    os.unlink(os.path.join(vm, "sdd.data"))
    for disk in ("sda", "sdb"):
        qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 300k", disk)
        qemu("qemu-img", "convert", "-O", "raw", disk, f"../{disk}.expected")
    ctl("add", "-t", "file,reuse", "vm", check=0)

    r = ctl("convert", "vm", "sda", "--to", "raw", "--output", "json", check=0)
    assert not os.path.exists(os.path.join(vm, "sda.data"))
    assert json.loads(r.stdout)["removed"] == [os.path.join(vm, "sda.data")]
    assert same(os.path.join(store.root, "sda.expected"), "raw", os.path.join(vm, "sda"),
                "raw")[0]
    for disk in ("sdb", "sdd"):
        r = ctl("convert", "vm", disk, "--to", "raw", "--output", "json", check=0)
        assert json.loads(r.stdout)["removed"] == []
    assert os.path.exists(os.path.join(vm, "shared.data"))
    assert same(os.path.join(store.root, "sdb.expected"), "raw", os.path.join(vm, "sdb"),
                "raw")[0]
    assert open(store.load("web").disks[0].path, "rb").read() == web_before
    # sdc still reads its data file.
    with open_image(os.path.join(vm, "sdc"), "qcow2", read_only=True,
                    store_root=store.root) as img:
        assert img.read(0, 4096) == bytes(4096)
    assert sorted(os.listdir(vm)) == ["manifest.json", "sda", "sdb", "sdc", "sdd",
                                      "shared.data"]


@pytest.mark.fuse
@pytest.mark.root
def test_convert_refuses_while_open_and_the_mount_serves_the_result(store, ctl, mount):
    make_instance(store, "web", 64 * MiB)
    fill(store, "web", data=1 * MiB)
    m = mount()
    view = m.disk("web")
    with open(view, "rb") as f:
        before = f.read()
        r = ctl("--mountpoint", m.path, "convert", "web", "sda", "--to", "qcow2")
        assert r.returncode == 1 and b"cannot convert" in r.stderr
    assert store.load("web").disks[0].format == "raw"
    ctl("--mountpoint", m.path, "convert", "web", "sda", "--to", "qcow2", check=0)
    wait_for(lambda: open(view, "rb").read() == before, what="the mount to serve the qcow2")


# --- progress ----------------------------------------------------------------------------------
def test_progress_bar_only_on_a_terminal(store, tmp_path, ctl):
    import fcntl
    import pty
    import termios
    make_instance(store, "web", 20 * GiB)
    fill(store, "web", data=4 * MiB)
    out = tmp_path / "exp"
    out.mkdir()
    r = ctl("export", "web", str(out), check=0)
    assert r.stderr == b""                       # piped: quiet
    shutil.rmtree(out / "web")
    pid, fd = pty.fork()
    if pid == 0:                                 # the child: vbdctl on a terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-m", "vbdfs.cli", "--store", store.root,
                                  "--whitelist", store.whitelist_file, "export", "web",
                                  str(out)])
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, seen
    assert b"export web:" in seen and b"%|" in seen, seen


def test_feed_fast_path_matches_block_by_block():
    """feed() finds the same runs whether or not a buffer holds a zero block."""
    from vbdfs.operations.transfer import GRAIN, SparseHash, feed

    def runs_of(buf, offset=0):
        got = []
        h = SparseHash(offset + len(buf))
        feed(lambda off, data: got.append((off, bytes(data))), h, offset, buf)
        return got, h.digest()

    solid = os.urandom(8 * GRAIN)
    tail_zero = os.urandom(3 * GRAIN) + bytes(100)           # partial zero block at the end
    holed = os.urandom(GRAIN) + bytes(GRAIN) + os.urandom(GRAIN)
    unaligned_zeros = os.urandom(GRAIN + 10) + bytes(GRAIN) + os.urandom(GRAIN - 10)
    assert runs_of(solid, 8192)[0] == [(8192, solid)]
    assert runs_of(tail_zero)[0] == [(0, tail_zero[:3 * GRAIN])]
    assert [off for off, _ in runs_of(holed)[0]] == [0, 2 * GRAIN]
    assert runs_of(unaligned_zeros)[0] == [(0, unaligned_zeros)]   # no aligned zero block


def test_zero_blocks_agrees_with_a_block_by_block_scan():
    """zero_blocks() only compares blocks whose first byte is zero: blocks that
    start or end with zeros but hold data elsewhere must not pass for zero."""
    import random
    from vbdfs.operations.transfer import GRAIN, SparseHash, feed, zero_blocks

    def naive(buf):
        return [p for p in range(0, len(buf), GRAIN)
                if buf[p:p + GRAIN] == bytes(len(buf[p:p + GRAIN]))]

    rnd = random.Random(5)
    kinds = [lambda: bytes(GRAIN),                                   # zero
             lambda: rnd.randbytes(GRAIN),                           # data
             lambda: bytes(GRAIN - 1) + b"\1",                       # zero but the last byte
             lambda: bytes(GRAIN // 2) + b"\1" + bytes(GRAIN // 2 - 1),
             lambda: b"\0" + rnd.randbytes(GRAIN - 1)]
    for _ in range(300):
        buf = b"".join(rnd.choice(kinds)() for _ in range(rnd.randrange(1, 12)))
        buf += rnd.choice([b"", bytes(rnd.randrange(1, GRAIN)), b"\0\0\3"])  # short last block
        assert zero_blocks(buf) == naive(buf), buf
        got = []
        feed(lambda off, data: got.append((off, bytes(data))), SparseHash(len(buf)), 0, buf)
        zeros = set(naive(buf))
        assert b"".join(d for _, d in got) == b"".join(
            buf[p:p + GRAIN] for p in range(0, len(buf), GRAIN) if p not in zeros)
    assert zero_blocks(bytes(5 * GRAIN + 7)) == [0, GRAIN, 2 * GRAIN, 3 * GRAIN, 4 * GRAIN, 5 * GRAIN]
    # Runs of zero-led blocks are compared as one span first: a span with data
    # in one block, or in its short tail, must fall back to block by block.
    z, one = bytes(GRAIN), b"\0" * (GRAIN - 1) + b"\1"
    assert zero_blocks(b"\1" + bytes(GRAIN - 1) + z * 3 + one + z) == \
        [GRAIN, 2 * GRAIN, 3 * GRAIN, 5 * GRAIN]
    assert zero_blocks(z * 3 + b"\0\0\1") == [0, GRAIN, 2 * GRAIN]
    assert zero_blocks(rnd.randbytes(GRAIN) + z * 4 + bytes(9)) == \
        [GRAIN, 2 * GRAIN, 3 * GRAIN, 4 * GRAIN, 5 * GRAIN]


def _header_with(stream: bytes, change) -> bytes:
    head, rest = stream.split(b"\n", 1)
    header = json.loads(head)
    change(header)
    return json.dumps(header).encode() + b"\n" + rest


@pytest.mark.parametrize("what, change, says", [
    ("nested", None, b"nested too deeply"),
    ("huge disk", lambda h: [d.update(size=1 << 70) for d in h["disks"] + h["manifest"]["disks"]],
     b"bad size"),
    ("no disks", lambda h: (h.update(disks=[]), h["manifest"].update(disks=[])), b"no disks"),
    ("partial sector", lambda h: [d.update(size=5000) for d in h["disks"] + h["manifest"]["disks"]],
     b"512-byte sectors"),
])
def test_hostile_stream_headers_are_clear_errors(store, ctl, what, change, says):
    make_instance(store, "web", MiB)
    stream = ctl("export", "web", "-", check=0).stdout
    bad = b"[" * 200000 + b"\n" if change is None else _header_with(stream, change)
    before = store_entries(store)
    r = ctl("import", "-", "--name", "evil", input=bad)
    assert r.returncode == 1, r.stderr
    assert says in r.stderr and b"Traceback" not in r.stderr, r.stderr
    assert store_entries(store) == before


def test_killed_import_leftovers_are_cleared_by_the_next(store, ctl):
    make_instance(store, "web", MiB)
    stream = ctl("export", "web", "-", check=0).stdout
    os.mkdir(os.path.join(store.root, ".web2.staged-abc123"))        # a SIGKILLed import's
    ctl("import", "-", "--name", "web2", input=stream, check=0)
    assert store_entries(store) == ["web", "web2"]
    assert not [e for e in os.listdir(store.root) if ".staged-" in e]


def test_sigterm_during_import_cleans_up(store, tmp_path):
    make_instance(store, "web", 64 * MiB)
    fill(store, "web", data=8 * MiB)
    base = [sys.executable, "-m", "vbdfs.cli", "--store", store.root,
            "--whitelist", store.whitelist_file]
    stream = subprocess.run(base + ["export", "web", "-"], capture_output=True,
                            check=True).stdout
    imp = subprocess.Popen(base + ["import", "-", "--name", "web2"], stdin=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    imp.stdin.write(stream[:len(stream) // 2])          # half a stream, then the sender stalls
    imp.stdin.flush()
    wait_for(lambda: any(".staged-" in e for e in os.listdir(store.root)),
             what="the import to start staging")
    imp.send_signal(signal.SIGTERM)
    assert imp.wait(timeout=30) == 1
    assert b"interrupted" in imp.stderr.read()
    assert store_entries(store) == ["web"]
    assert not [e for e in os.listdir(store.root) if ".staged-" in e]


def test_export_to_a_reader_that_quits_is_an_error(store):
    make_instance(store, "web", 64 * MiB)
    fill(store, "web", data=16 * MiB)
    base = f"{sys.executable} -m vbdfs.cli --store {store.root} --whitelist {store.whitelist_file}"
    r = subprocess.run(f"{base} export web - | head -c 5000 > /dev/null; "
                       "echo status=${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, timeout=60)
    assert "status=1" in r.stdout, r.stdout + r.stderr
    assert "closed the stream early" in r.stderr
    r = subprocess.run(f"{base} list | head -1; echo status=${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert "status=0" in r.stdout          # list | head is fine


def test_copy_announces_reads_ahead_so_a_cold_source_is_read_in_parallel(tmp_path):
    """copy_image asks the source for each piece (Image.prefetch) before it
    reads it, up to PREFETCH ahead, and never for holes; a prefetched raw
    range then reads without waiting for the disk (RWF_NOWAIT)."""
    from vbdfs.images import Kind
    from vbdfs.images.fileops import drop_cache
    from vbdfs.images.raw import RawImage

    class Recorded(RawImage):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = []

        def prefetch(self, offset, length):
            self.calls.append(("prefetch", offset, length))
            super().prefetch(offset, length)

        def read(self, offset, length):
            self.calls.append(("read", offset, length))
            return super().read(offset, length)

    path = str(tmp_path / "src")
    rnd = random.Random(3)
    with RawImage.create(path, 4 * GiB) as img:
        pieces = sorted(rnd.sample(range(0, 4 * GiB // PIECE, 17), 800))
        for p in pieces:
            img.write(p * PIECE, rnd.randbytes(PIECE))
    src = Recorded(path, read_only=True)
    with src:
        transfer.copy_image(src, lambda off, data: None, transfer.SparseHash(src.size))
        reads = [c[1:] for c in src.calls if c[0] == "read"]
        assert len(reads) == len(pieces)
        announced, asked, got, left = set(), 0, 0, len(pieces) * PIECE
        for kind, off, n in src.calls:
            if kind == "prefetch":
                assert src.extents(off, n) == [(off, n, Kind.DATA)]     # data only
                announced.add((off, n))
                asked += n
            else:
                assert (off, n) in announced            # announced before it is read
                assert asked - got >= min(transfer.PREFETCH, left)     # and well ahead
                got += n
                left -= n

        first = pieces[0] * PIECE
        drop_cache(path)
        view = memoryview(bytearray(PIECE))
        assert src.read_nowait(first, PIECE, view) is None      # evicted: would wait
        src.prefetch(first, PIECE)
        wait_for(lambda: src.read_nowait(first, PIECE, view) is not None, 10,
                 "the prefetched range in the page cache")
