"""Convert one disk between raw and qcow2, in place and sparse.

Under the instance's lock, with nothing using the disk (no attachment, no
loop device, no open file: the daemon would keep serving the old image):

1. copy the old image into a hidden temp file next to it (same directory,
   so the rename below is atomic), extents-driven like an export, hashing
   the contents (transfer.SparseHash);
2. re-read the new image and check it hashes the same;
3. write the new manifest as a journal (.manifest.json.convert), rename the
   new image over the old one, then the journal over the manifest.

Between the two renames (both fsynced, microseconds apart) a crash leaves an
image whose format the manifest does not name yet; the journal next to the
manifest holds the right one: move it over manifest.json to finish.

4. remove what the old image owned besides its file: a qcow2 disk's external
   data file, if it is its own (Store.owned_data_files). A crash before that
   leaves the file behind: space, nothing the disk needs.
"""

from __future__ import annotations

import os
import time

from ..images import NEW_FORMATS, ImageError, create_image, open_image
from ..images.fileops import fsync_dir
from ..log import get_logger
from ..store import Store, leases
from ..store.store import CONVERT_JOURNAL, convert_temps, write_atomic
from . import inuse
from .transfer import SparseHash, TransferError, checksum_text, copy_image, writer

log = get_logger(__name__)


def convert_disk(store: Store, name: str, disk: str, to: str, mountpoint: str | None = None,
                 node: str = "", progress=None) -> dict:
    if to not in NEW_FORMATS:
        raise TransferError(f"cannot convert to {to!r} (one of {', '.join(NEW_FORMATS)})")
    with store.lock(name):
        m = store.load(name)
        d = m.disk(disk)
        what = f"instance {name} disk {d.name}"
        if d.format == to:
            raise TransferError(f"{what} is already {to}")
        inuse.refuse_if_used(store, mountpoint, node, "convert", d.name)(m)
        started = time.monotonic()
        # A killed convert's copy (no journal, or load() would have refused): ours now.
        for stale in convert_temps(d):
            os.unlink(stale)
        tmp = os.path.join(os.path.dirname(d.path), f".{d.name}.convert-{os.getpid()}")
        journal = os.path.join(store.instance_dir(name), CONVERT_JOURNAL)
        tick = (lambda n: progress(n, 2 * d.size)) if progress else None
        swapped = False
        held = []         # write leases on the old image and, once made, the new one
        try:
            # Nobody (daemon on any node, qemu) may write the disk while it is
            # copied, nor open it between the swap and the manifest's rename.
            root = store.disk_root(d.path)
            held.append(leases.acquire(d.path, store.state_dir("leases"), name, d.name,
                                       node or os.uname().nodename, by="vbdctl convert",
                                       root=root))
            with store.open_disk(d, read_only=True) as src, \
                    create_image(tmp, to, d.size) as dst:
                owned = store.owned_data_files(m, [d])
                h = SparseHash(d.size)
                with writer(dst) as put:
                    data = copy_image(src, put, h, tick)
                dst.flush()
            # Read back what the engine wrote: the swap happens only if it hashes the same.
            with open_image(tmp, to, read_only=True, store_root=root) as new:
                check = SparseHash(d.size)
                copy_image(new, lambda off, buf: None, check, tick)
                allocated = new.allocated()
            if check.digest() != h.digest():
                raise TransferError(f"{what}: the converted image does not read back the "
                                    "same contents; the disk was left as it was")
            new_m = m.replace(disks=[x.replace(format=to) if x is d else x for x in m.disks])
            held.append(leases.acquire(tmp, root=root))
            write_atomic(journal, new_m.to_json().encode())
            os.rename(tmp, d.path)
            swapped = True
            fsync_dir(os.path.dirname(d.path))   # the image swap is on disk before the manifest's
            os.rename(journal, store.manifest_path(name))
            fsync_dir(store.instance_dir(name))
        except BaseException as e:
            if swapped:         # the image is the new one: the journal must survive
                raise TransferError(f"{what}: the image is now {to} but the manifest was "
                                    f"not replaced ({e}): move {journal} over "
                                    f"{store.manifest_path(name)}") from None
            for p in (journal, tmp):   # journal first: a journal without its temp means swapped
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            if isinstance(e, leases.LeaseBusy):
                raise TransferError(f"{what}: cannot convert: {e}") from None
            if isinstance(e, (OSError, ImageError)):
                raise TransferError(f"{what}: convert to {to} failed: {e}") from None
            raise
        finally:
            for lease in held:
                lease.release()
        removed = _remove_owned(owned, what)     # the manifest no longer names it
    return {"instance": name, "disk": d.name, "from": d.format, "to": to, "size": d.size,
            "data_bytes": data, "allocated": allocated, "checksum": checksum_text(h.digest()),
            "removed": removed, "seconds": round(time.monotonic() - started, 3)}


def _remove_owned(paths: list[str], what: str) -> list[str]:
    """Remove the old image's own data file once the new image is in place; a
    failure leaves only space behind, so it is logged, not raised."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        except OSError as e:
            log.warning("%s: converted, but the old external data file %s was not removed: %s",
                        what, path, e)
            continue
        removed.append(path)
    return removed
