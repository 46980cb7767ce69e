"""Export and import instances: sparse copies, verified by checksum.

Every copy here is driven by the source image's extents(): only DATA runs
are read, all-zero chunks inside them are skipped, and holes and zero runs
are never written, so a 20 GiB disk holding 50 MiB costs 50 MiB of I/O and
the copy is as sparse as its source (DESIGN invariant 3). Sources are the
backing files, read through the Image interface (the store is the source of
truth and supports SEEK_DATA); kernel drivers are not involved.

The checksum ("sha256-runs") of a disk commits to its whole virtual
contents yet costs time proportional to its data: split the disk into
4 KiB blocks (the last may be short) and join adjacent non-zero blocks into
runs; the checksum is the SHA-256 of, for each run in order, its offset and
length (two 8-byte big-endian integers) followed by the SHA-256 of its
bytes, and finally the disk's size (8 bytes, big-endian). Zero blocks are
implied by the offsets, so the value does not depend on the image format or
on what is allocated. To check a raw file without vbdfs:

    import hashlib, struct, sys
    h, run, start, off = hashlib.sha256(), None, 0, 0
    with open(sys.argv[1], "rb") as f:
        while b := f.read(4096):
            if b.count(0) == len(b):
                if run: h.update(struct.pack(">QQ", start, off - start) + run.digest())
                run = None
            elif run: run.update(b)
            else: run, start = hashlib.sha256(b), off
            off += len(b)
    if run: h.update(struct.pack(">QQ", start, off - start) + run.digest())
    h.update(struct.pack(">Q", off)); print(h.hexdigest())

Export directory (Ganeti's layout, `gnt-backup` style): DEST/INSTANCE/ holds
config.ini ([export] and [instance] as Ganeti writes them, disk sizes in
MiB, plus a [vbdfs] section with each disk's exact size, format, driver and
checksum), manifest.json (the instance's manifest as it was) and one dump
per disk, sda.raw or sda.qcow2. It is written as DEST/INSTANCE.new and
renamed at the end, so an interrupted export never looks complete.

Stream format (`vbdctl export INSTANCE -`, read by `vbdctl import -`):

    header   one line of JSON, at most 1 MiB, ending in "\\n":
             {"vbdfs_stream": 1, "checksum": "sha256-runs",
              "manifest": {...the manifest...},
              "disks": [{"name": "sda", "size": BYTES, "format": "raw",
                         "driver": "loop"}, ...]}
    records  for each disk in order, then once at the end; each record is a
             20-byte frame struct ">4sQQ" (type, a, b) and a payload:
             b"DATA"  a = offset, b = length (1..4 MiB), then `length` bytes
                      of the disk's contents at `offset`. Offsets are
                      multiples of 4 KiB and increase; lengths too, except
                      a record ending at the disk's end. Whatever no DATA
                      record covers reads as zeros.
             b"DISK"  a = disk index, b = 32, then the disk's sha256-runs
                      digest (32 raw bytes): this disk is complete.
             b"END."  a = b = 0, no payload: the stream is complete.

The importer reads the whole stream, checking each record's bounds and each
disk's digest as it goes, into a hidden staging directory; only then does
the instance appear (Store.create_staged), so a corrupt or truncated stream
leaves nothing behind.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import io
import json
import os
import queue
import shutil
import struct
import threading
import time

from ..images import Image, ImageError, Kind, copy_format, create_image, open_image
from ..images.base import is_zero
from ..images.confined import open_regular
from ..images.fileops import fsync_dir
from ..store import DiskSpec, Manifest, ManifestError, Store, StoreError, check_instance_name
from ..store.manifest import MAX_DISKS
from ..store.names import disk_name
from . import inuse

CHUNK = 4 << 20          # largest read, write and stream record
PREFETCH = 32 << 20      # data asked of the source ahead of the reads (copy_image)
WRITEBACK_STEP = 4 << 20 # start the disk writing after each this much copied
FIRST_BATCH = 256 << 10  # the hashing worker's first batch (SparseHash.run)
GRAIN = 4096             # zero blocks of this size (aligned) are neither hashed nor copied
CHECKSUM = "sha256-runs"
CONFIG = "config.ini"
MANIFEST_COPY = "manifest.json"
STREAM_VERSION = 1
FRAME = struct.Struct(">4sQQ")
MAX_HEADER = 1 << 20

_ZEROS = bytes(GRAIN)
_RUN = struct.Struct(">QQ")
_SIZE = struct.Struct(">Q")


class TransferError(StoreError):
    """An export, import or convert failed; the message names the instance or disk."""


# --- the checksum -------------------------------------------------------------
class SparseHash:
    """The sha256-runs checksum of a disk (see the module docstring).

    Fed with run(offset, data) for every non-zero GRAIN block, in increasing
    order (feed() finds them); adjacent blocks join into one run. The data
    must not change afterwards: it is hashed by a worker thread (hashlib
    releases the GIL), overlapping the copy's reads and writes.
    """

    def __init__(self, size: int):
        self.size = size
        self.outer = hashlib.sha256()
        self.cur = None
        self.start = self.end = 0
        self._batch = []               # runs not yet handed to the worker
        self._batched = 0
        self._handover = FIRST_BATCH   # bytes to batch before handing over
        self._queue = None
        self._worker = None

    def run(self, offset: int, data) -> None:
        # Runs go to the worker in batches of about CHUNK bytes: a queue
        # hand-off per 64 KiB run cost more than a tenth of the copy. The
        # first batches are smaller, so that the worker starts early: it
        # idled while the first CHUNK was read, ~7 ms of a 50 MiB export.
        self._batch.append((offset, data))
        self._batched += len(data)
        if self._batched >= self._handover:
            self._hand_over()
            self._handover = min(2 * self._handover, CHUNK)

    def _hand_over(self) -> None:
        if self._worker is None:
            self._queue = queue.Queue(maxsize=8)       # bounds the data held
            self._worker = threading.Thread(target=self._work, daemon=True)
            self._worker.start()
        self._queue.put(self._batch)
        self._batch, self._batched = [], 0

    def _work(self) -> None:
        while (batch := self._queue.get()) is not None:
            for offset, data in batch:
                if self.cur is not None and offset == self.end:
                    self.cur.update(data)
                else:
                    self._close()
                    self.cur = hashlib.sha256(data)
                    self.start = offset
                self.end = offset + len(data)

    def _close(self) -> None:
        if self.cur is not None:
            self.outer.update(_RUN.pack(self.start, self.end - self.start) + self.cur.digest())
            self.cur = None

    def digest(self) -> bytes:
        if self._batch:
            self._hand_over()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self._close()
        final = self.outer.copy()
        final.update(_SIZE.pack(self.size))
        return final.digest()


def checksum_text(digest: bytes) -> str:
    return f"{CHECKSUM}:{digest.hex()}"


# --- the sparse copier ----------------------------------------------------------
def zero_blocks(data: bytes) -> list[int]:
    """Offsets of data's all-zero GRAIN blocks (the last block may be short).

    A block can only be zero if its first byte is: a strided slice picks
    those bytes out at C speed, and only blocks starting with a zero are
    compared whole. Random or compressed data costs next to nothing; a
    bytes.find(_ZEROS) over every byte cost more and held the GIL, which
    stalled the hashing and writeback threads. Neighbouring candidates are
    compared as one span first: in a qcow2 extent the zeros are whole runs
    (a cluster's unwritten parts), and one memcmp per run instead of one
    compare per block halved this function's time on such extents.
    """
    firsts = data[::GRAIN]
    candidates = firsts.count(0)
    if not candidates:
        return []
    n = len(data)
    if candidates == len(firsts) and is_zero(data):
        return list(range(0, n, GRAIN))
    out = []
    view = memoryview(data)
    i = firsts.find(0)
    while i >= 0:
        j = len(firsts) - len(firsts[i:].lstrip(b"\0"))   # blocks i..j-1 start with a zero
        pos, end = i * GRAIN, min(j * GRAIN, n)
        if j - i > 1 and is_zero(view[pos:end]):
            out.extend(range(pos, end, GRAIN))
        else:
            for p in range(pos, end, GRAIN):
                e = min(p + GRAIN, n)
                if data[p:e] == (_ZEROS if e - p == GRAIN else bytes(e - p)):
                    out.append(p)
        i = firsts.find(0, j)
    return out


def feed(put, hasher: SparseHash, offset: int, buf) -> int:
    """Hash and put(offset, data) the non-zero GRAIN blocks of buf (offset is
    GRAIN-aligned), joined into runs; return the bytes put. Zero blocks are
    neither hashed nor copied: a qcow2 DATA extent is whole clusters whose
    unwritten parts read as zeros, and copying them would allocate them."""
    data = buf if type(buf) is bytes else bytes(buf)
    mv = memoryview(data)              # slices of it are put without copying
    n = len(data)
    done = start = 0
    for zero in zero_blocks(data) + [n]:
        if zero > start:
            run = mv[start:zero]
            hasher.run(offset + start, run)
            put(offset + start, run)
            done += zero - start
        start = zero + GRAIN
    return done


def _pieces(src: Image) -> list[tuple[int, int]]:
    """(offset, length) of src's DATA extents, widened to whole GRAIN blocks
    (so the runs, and the checksum, do not depend on the image's layout) and
    cut at CHUNK boundaries: what copy_image reads, in order."""
    out = []
    done = 0
    for ext in src.extents(0, src.size):
        if ext.kind is not Kind.DATA:
            continue
        pos = max(ext.offset // GRAIN * GRAIN, done)
        end = min(-(-ext.end // GRAIN) * GRAIN, src.size)
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            out.append((pos, n))
            pos += n
        done = max(done, pos)
    return out


def copy_image(src: Image, put, hasher: SparseHash, progress=None) -> int:
    """Hash src's contents and put() their non-zero runs; return the bytes put.

    Only DATA extents are read (see _pieces). Each read is announced
    PREFETCH bytes ahead (Image.prefetch), so that a source not in the page
    cache has many reads in flight, as qemu-img's parallel requests do:
    one pread at a time made a cold 1 GiB export 0.69x qemu-img. progress(n),
    if given, is called with the virtual bytes covered, holes included.
    """
    pieces = _pieces(src)
    written = 0
    done = 0                       # everything below this is hashed and copied
    hinted = ahead = 0             # pieces[:hinted] announced, ahead bytes not yet read
    for pos, n in pieces:
        while hinted < len(pieces) and ahead < PREFETCH:
            off, length = pieces[hinted]
            src.prefetch(off, length)
            ahead += length
            hinted += 1
        ahead -= n
        if progress and pos > done:
            progress(pos - done)
        buf = src.read(pos, n)
        if len(buf) != n:
            raise ImageError(f"{src.path}: short read at {pos}")
        written += feed(put, hasher, pos, buf)
        done = pos + n
        if progress:
            progress(n)
    if progress and src.size > done:
        progress(src.size - done)
    return written


@contextlib.contextmanager
def writer(dst: Image):
    """put() for copy_image: write into dst while a helper thread starts the
    disk writing every WRITEBACK_STEP bytes, so that the disk works while
    the copy does and the final flush waits for the last pages only
    (measured on a 50 MiB export: its fsync went from ~60 ms to ~3 ms).
    The helper, not the copier, pays for submitting the I/O."""
    kick = threading.Event()
    done = False

    def start_writebacks() -> None:
        while True:
            kick.wait()
            kick.clear()
            if done:
                return
            dst.start_writeback()

    pending = 0

    def put(offset: int, data) -> None:
        nonlocal pending
        dst.write(offset, data)
        pending += len(data)
        if pending >= WRITEBACK_STEP:
            kick.set()
            pending = 0

    helper = threading.Thread(target=start_writebacks, daemon=True)
    helper.start()
    try:
        yield put
    finally:
        done = True
        kick.set()
        helper.join()


# --- is a disk being written? ------------------------------------------------------

def writers(store: Store, manifest: Manifest, mountpoint: str | None, node: str) -> list[str]:
    """Why a disk of the instance may be written right now ([] if nothing writes it):
    read-write attachments (another node's always count), read-write loop
    devices, processes holding a disk open for writing (the vbdfs daemon holds
    an image open read-write exactly while its view is), and write leases."""
    return [reason for _, reason in inuse.users(store, manifest, mountpoint, node,
                                                 writing_only=True)]


# --- export -----------------------------------------------------------------------
@contextlib.contextmanager
def _new_export_dir(path: str):
    """Create path (DEST/INSTANCE.new) and hold an flock on it while exporting.

    A leftover from a killed export holds no lock and is replaced; one whose
    lock is held belongs to a running export, which we leave alone.
    """
    if os.path.lexists(path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise TransferError(f"{path} exists and is not a directory we can use: "
                                f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TransferError(f"{path}: another export is writing it") from None
        shutil.rmtree(path)
        os.close(fd)
    os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _check_writers(store, m, mountpoint, node, force, action) -> list[str]:
    reasons = writers(store, m, mountpoint, node)
    if reasons and not force:
        raise TransferError(
            f"cannot {action} instance {m.name}: " + "; ".join(reasons) + ". Its image may "
            "change while it is copied (and a qcow2 image's metadata may not be on disk "
            "yet), so the copy could be inconsistent: shut the instance down or detach it "
            "first, or use --force to copy it anyway")
    return reasons


def _open_source(store: Store, m: Manifest, d) -> Image:
    try:
        return store.open_disk(d, read_only=True)
    except (OSError, ImageError) as e:
        raise TransferError(f"instance {m.name} disk {d.name}: {e}") from None


def export_instance(store: Store, name: str, dest_dir: str, fmt: str | None = None,
                    force: bool = False, mountpoint: str | None = None, node: str = "",
                    progress=None) -> dict:
    """Write DEST_DIR/NAME/ (see the module docstring); return a summary.

    fmt: the dumps' format (default: each disk's own). progress(n, total).
    """
    dest_dir = os.path.abspath(dest_dir)
    if not os.path.isdir(dest_dir):
        raise TransferError(f"export destination {dest_dir} is not a directory")
    with store.lock(name):
        m = store.load(name)
        warnings = _check_writers(store, m, mountpoint, node, force, "export")
        final = os.path.join(dest_dir, name)
        if os.path.lexists(final):
            raise TransferError(f"{final} already exists: remove it or export elsewhere")
        total = sum(d.size for d in m.disks)
        tick = (lambda n: progress(n, total)) if progress else None
        started = time.monotonic()
        disks = []
        with _new_export_dir(final + ".new") as tmp:
            for d in m.disks:
                dfmt = fmt or copy_format(d.format)
                dump = f"{d.name}.{dfmt}"
                with _open_source(store, m, d) as src:
                    try:
                        dst = create_image(os.path.join(tmp, dump), dfmt, d.size)
                    except (OSError, ImageError) as e:
                        raise TransferError(f"instance {name} disk {d.name}: {e}") from None
                    with dst:
                        h = SparseHash(src.size)
                        with writer(dst) as put:
                            data = copy_image(src, put, h, tick)
                        dst.flush()
                        allocated = dst.allocated()
                disks.append({"name": d.name, "index": d.index, "format": dfmt,
                              "source_format": d.format, "driver": d.driver, "size": d.size,
                              "dump": dump, "data_bytes": data, "allocated": allocated,
                              "checksum": checksum_text(h.digest())})
            _write_file(os.path.join(tmp, MANIFEST_COPY), m.to_json().encode())
            _write_file(os.path.join(tmp, CONFIG), _config_ini(m, disks, node).encode())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(dest_dir)
    return {"instance": name, "export": final, "disks": disks, "forced_over": warnings,
            "seconds": round(time.monotonic() - started, 3)}


def _write_file(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _config_ini(m: Manifest, disks: list[dict], node: str) -> str:
    """Ganeti's config.ini (lib/backend.py FinalizeExport), plus a [vbdfs] section."""
    c = configparser.RawConfigParser()
    c["export"] = {"version": "0", "timestamp": str(int(time.time())),
                   "source": m.primary or node, "os": m.os, "compression": "none"}
    ins = {"name": m.name, "disk_template": "file", "disk_count": str(len(disks)),
           "nic_count": "0"}
    vb = {"version": "1", "checksum": CHECKSUM}
    for i, d in enumerate(disks):
        ins[f"disk{i}_ivname"] = f"disk/{i}"
        ins[f"disk{i}_size"] = str(-(-d["size"] // (1 << 20)))   # MiB, as Ganeti records it
        ins[f"disk{i}_dump"] = d["dump"]
        ins[f"disk{i}_name"] = d["name"]
        vb[f"disk{i}_bytes"] = str(d["size"])
        vb[f"disk{i}_format"] = d["format"]
        vb[f"disk{i}_driver"] = d["driver"]
        vb[f"disk{i}_checksum"] = d["checksum"]
    c["instance"] = ins
    c["vbdfs"] = vb
    out = io.StringIO()
    c.write(out)
    return out.getvalue()


# --- import -------------------------------------------------------------------------
def _target(spec: dict, fmt: str | None, driver: str | None) -> tuple[str, str]:
    return fmt or spec["format"], driver or spec["driver"]


def read_export(export_dir: str) -> tuple[Manifest, list[dict]]:
    """The manifest and per-disk specs of an export directory, checked."""
    where = os.path.join(export_dir, CONFIG)
    c = configparser.RawConfigParser()
    try:
        with open(where, encoding="utf-8") as f:
            c.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise TransferError(f"{export_dir} is not a readable export: {e}") from None
    try:
        with open(open_regular(os.path.join(export_dir, MANIFEST_COPY), os.O_RDONLY,
                               export_dir), "rb") as f:
            m = Manifest.from_json(f.read(1 << 20), where=os.path.join(export_dir, MANIFEST_COPY))
        count = c.getint("instance", "disk_count")
        if not c.has_section("vbdfs"):
            raise TransferError(f"{where} has no [vbdfs] section: the export carries no "
                                "checksums, so it cannot be verified")
        if c.get("vbdfs", "checksum") != CHECKSUM:
            raise TransferError(f"{where}: unknown checksum {c.get('vbdfs', 'checksum')!r}")
        if count != len(m.disks) or not 0 < count <= MAX_DISKS:
            raise TransferError(f"{where}: disk_count {count} does not match the manifest's "
                                f"{len(m.disks)} disks")
        specs = []
        for i, d in enumerate(m.disks):
            dump = c.get("instance", f"disk{i}_dump")
            if os.path.basename(dump) != dump or dump.startswith("."):
                raise TransferError(f"{where}: disk {i} dump {dump!r} is not a file name")
            spec = {"name": disk_name(i), "dump": os.path.join(export_dir, dump),
                    "size": c.getint("vbdfs", f"disk{i}_bytes"),
                    "format": c.get("vbdfs", f"disk{i}_format"),
                    "driver": c.get("vbdfs", f"disk{i}_driver"),
                    "checksum": c.get("vbdfs", f"disk{i}_checksum")}
            if spec["size"] != d.size or spec["format"] not in ("raw", "qcow2"):
                raise TransferError(f"{where}: disk {spec['name']}: size or format does not "
                                    "match the manifest")
            specs.append(spec)
    except (configparser.Error, ValueError, OSError) as e:
        raise TransferError(f"{where}: {e}") from None
    return m, specs


def import_instance(store: Store, export_dir: str, name: str | None = None,
                    directory: str | None = None, fmt: str | None = None,
                    driver: str | None = None, node: str = "", progress=None) -> dict:
    """Create an instance from an export directory, verifying every disk's checksum."""
    export_dir = os.path.abspath(export_dir)
    m, specs = read_export(export_dir)
    name = name or m.name
    check_instance_name(name)
    total = sum(s["size"] for s in specs)
    tick = (lambda n: progress(n, total)) if progress else None
    started = time.monotonic()
    disks = []

    def fill(staged: str) -> list[DiskSpec]:
        out = []
        for s in specs:
            tfmt, tdrv = _target(s, fmt, driver)
            what = f"import of {export_dir}: disk {s['name']} ({os.path.basename(s['dump'])})"
            try:
                src = open_image(s["dump"], s["format"], read_only=True,
                                 store_root=export_dir)
            except (OSError, ImageError) as e:
                raise TransferError(f"{what}: {e}") from None
            with src:
                if src.size != s["size"]:
                    raise TransferError(f"{what}: the dump holds {src.size} bytes, "
                                        f"config.ini says {s['size']}")
                with create_image(os.path.join(staged, s["name"]), tfmt, s["size"]) as dst:
                    h = SparseHash(src.size)
                    try:
                        with writer(dst) as put:
                            data = copy_image(src, put, h, tick)
                    except ImageError as e:
                        raise TransferError(f"{what}: {e}") from None
                    got = checksum_text(h.digest())
                    if got != s["checksum"]:
                        raise TransferError(f"{what}: checksum mismatch (expected "
                                            f"{s['checksum']}, got {got}): the dump is "
                                            "damaged; nothing was imported")
                    dst.flush()
                    allocated = dst.allocated()
            disks.append({"name": s["name"], "format": tfmt, "driver": tdrv, "size": s["size"],
                          "data_bytes": data, "allocated": allocated, "checksum": got})
            out.append(DiskSpec(size=s["size"], format=tfmt, driver=tdrv))
        return out

    store.create_staged(name, fill, directory=directory, os_name=m.os, primary=node)
    return {"instance": name, "source": export_dir, "disks": disks,
            "seconds": round(time.monotonic() - started, 3)}


# --- the stream -----------------------------------------------------------------------
def export_stream(store: Store, name: str, out, force: bool = False,
                  mountpoint: str | None = None, node: str = "", progress=None) -> dict:
    """Write the instance to the binary file `out` in the stream format."""
    with store.lock(name):
        m = store.load(name)
        warnings = _check_writers(store, m, mountpoint, node, force, "export")
        total = sum(d.size for d in m.disks)
        tick = (lambda n: progress(n, total)) if progress else None
        header = {"vbdfs_stream": STREAM_VERSION, "checksum": CHECKSUM,
                  "manifest": m.to_dict(),
                  "disks": [{"name": d.name, "size": d.size, "format": d.format,
                             "driver": d.driver} for d in m.disks]}
        out.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        started = time.monotonic()
        disks = []

        def put(offset, data):
            out.write(FRAME.pack(b"DATA", offset, len(data)))
            out.write(data)

        for d in m.disks:
            with _open_source(store, m, d) as src:
                h = SparseHash(src.size)
                data = copy_image(src, put, h, tick)
            digest = h.digest()
            out.write(FRAME.pack(b"DISK", d.index, 32) + digest)
            disks.append({"name": d.name, "format": d.format, "size": d.size,
                          "data_bytes": data, "checksum": checksum_text(digest)})
        out.write(FRAME.pack(b"END.", 0, 0))
        out.flush()
    return {"instance": name, "export": "-", "disks": disks, "forced_over": warnings,
            "seconds": round(time.monotonic() - started, 3)}


def _read_exact(f, n: int, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise TransferError(f"{what}: the stream ends early (truncated)")
    return buf


def import_stream(store: Store, f, name: str | None = None, directory: str | None = None,
                  fmt: str | None = None, driver: str | None = None, node: str = "",
                  progress=None) -> dict:
    """Create an instance from a stream read from the binary file f, verifying it."""
    line = f.readline(MAX_HEADER + 1)
    if not line.endswith(b"\n"):
        raise TransferError("import from stream: no header line (not a vbdfs stream, "
                            "or truncated)")
    try:
        header = json.loads(line)
        if header.get("vbdfs_stream") != STREAM_VERSION or header.get("checksum") != CHECKSUM:
            raise TransferError(f"import from stream: unsupported stream version "
                                f"{header.get('vbdfs_stream')!r}")
        m = Manifest.from_dict(header["manifest"], where="stream header")
        specs = header["disks"]
        if (not isinstance(specs, list) or len(specs) != len(m.disks) or any(
                s.get("name") != d.name or s.get("size") != d.size or s.get("format") != d.format
                or s.get("driver") != d.driver for s, d in zip(specs, m.disks))):
            raise TransferError("import from stream: the header's disks do not match "
                                "its manifest")
    except (ValueError, AttributeError, KeyError, TypeError, ManifestError) as e:
        raise TransferError(f"import from stream: bad header: {e}") from None
    except RecursionError:
        raise TransferError("import from stream: bad header: nested too deeply") from None
    name = name or m.name
    check_instance_name(name)
    # Refuse what the header promises before reading a byte of data.
    store.check_specs(name, [DiskSpec(size=d.size, format=d.format, driver=d.driver)
                             for d in m.disks])
    total = sum(d.size for d in m.disks)
    started = time.monotonic()
    disks = []

    def fill(staged: str) -> list[DiskSpec]:
        out = []
        for d in m.disks:
            what = f"import from stream: disk {d.name}"
            tfmt, tdrv = fmt or copy_format(d.format), driver or d.driver
            h, pos, data = SparseHash(d.size), 0, 0
            with create_image(os.path.join(staged, d.name), tfmt, d.size) as dst, \
                    writer(dst) as put:
                while True:
                    kind, a, b = FRAME.unpack(_read_exact(f, FRAME.size, what))
                    if kind == b"DATA":
                        # Aligned, in order, inside the disk: the checksum's runs then
                        # come out the same however the sender cut its records.
                        if (a < pos or a % GRAIN or not 0 < b <= CHUNK or a + b > d.size
                                or (b % GRAIN and a + b != d.size)):
                            raise TransferError(f"{what}: bad record at offset {a}, length {b}")
                        buf = _read_exact(f, b, what)
                        data += feed(put, h, a, buf)
                        if progress:
                            progress(a + b - pos, total)
                        pos = a + b
                    elif kind == b"DISK" and a == d.index and b == 32:
                        if progress:
                            progress(d.size - pos, total)
                        want = _read_exact(f, 32, what)
                        if h.digest() != want:
                            raise TransferError(f"{what}: checksum mismatch (expected "
                                                f"{checksum_text(want)}, got "
                                                f"{checksum_text(h.digest())}): the stream "
                                                "is damaged; nothing was imported")
                        break
                    else:
                        raise TransferError(f"{what}: unexpected record {kind!r}")
                dst.flush()
                allocated = dst.allocated()
            disks.append({"name": d.name, "format": tfmt, "driver": tdrv, "size": d.size,
                          "data_bytes": data, "allocated": allocated,
                          "checksum": checksum_text(h.digest())})
            out.append(DiskSpec(size=d.size, format=tfmt, driver=tdrv))
        if _read_exact(f, FRAME.size, "import from stream") != FRAME.pack(b"END.", 0, 0):
            raise TransferError("import from stream: no end record after the last disk")
        return out

    store.create_staged(name, fill, directory=directory, os_name=m.os, primary=node)
    return {"instance": name, "source": "-", "disks": disks,
            "seconds": round(time.monotonic() - started, 3)}
