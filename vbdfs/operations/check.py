"""vbdctl check: qcow2 refcounts checked (and repaired) the way qemu-img check does.

The verdicts (clean / leaks / corruptions) are qcow2_check's. Repair rebuilds
the refcounts crash-safely (see qcow2_check); it is refused while the disk is
in use (attached, open, or leased for writing anywhere), under the instance
lock and with the disk's write lease held, so nothing opens it meanwhile.
"""

from __future__ import annotations

import os

from ..images import ImageError
from ..images.qcow2_check import check_file
from ..store import Store, StoreError, leases
from . import inuse


class CheckError(StoreError):
    """The check could not run; the message names the instance and disk."""


def check_instance(store: Store, name: str, disk: str | None = None, repair: bool = False,
                   mountpoint: str | None = None, node: str = "") -> list[dict]:
    """One result per disk (all disks, or `disk`)."""
    out = []
    with store.lock(name):
        m = store.load(name)
        disks = [m.disk(disk)] if disk is not None else list(m.disks)
        if repair:
            inuse.refuse_if_used(store, mountpoint, node, "repair",
                                 None if disk is None else disks[0].name)(m)
        for d in disks:
            what = f"instance {name} disk {d.name}"
            r = {"instance": name, "disk": d.name, "format": d.format}
            if d.format != "qcow2":
                r.update(verdict="clean", summary="clean", leaks=0, corruptions=0, errors=[],
                         repaired=None, note=f"{d.format} images have no metadata to check")
                out.append(r)
                continue
            root = store.disk_root(d.path)
            lease = None
            try:
                if repair:
                    lease = leases.acquire(d.path, store.state_dir("leases"), name, d.name,
                                           node or os.uname().nodename, by="vbdctl check",
                                           root=root)
                r.update(check_file(d.path, repair=repair, store_root=root))
            except leases.LeaseBusy as e:
                raise CheckError(f"{what}: cannot repair: {e}") from None
            except (ImageError, OSError) as e:
                raise CheckError(f"{what}: {e}") from None
            finally:
                if lease is not None:
                    lease.release()
            out.append(r)
    return out
