"""A disk the daemon serves, and the write leases behind it.

OpenDisk is one Image shared by every open file handle of a disk, with its
request path (iopath.DiskIO) and its write lease. DiskLeases takes and moves
those leases for the daemon:

* at open, a writer takes the disk's write lease (acquire);
* a Ganeti volume opened for writing starts with none and serves a cold
  image (read afresh each time, writes refused) until Ganeti's open script
  sets the lease, which moves between nodes during a live migration
  (set_lease; operations/volumes.py is the other side, README "Ganeti");
* a grow resizes in place under this node's exclusive lease, else under a
  lease of its own (grow).

Images are opened by the caller's `fresh_image(key, writable)` (fs.py: it
drops a Ganeti volume's cached pages first and maps failures to errnos).
The methods block (flushes, opens), so the daemon calls them in a thread;
one that replaces an OpenDisk's Image runs with no request in flight on it
and none starting (the caller holds the disk in DiskIO.paused). A lease
held elsewhere raises leases.LeaseBusy, for the caller to turn into EBUSY.
"""

from __future__ import annotations

from . import iopath
from .images import Image
from .images.cold import ColdImage
from .store import Store, leases


class OpenDisk:
    """One Image shared by every open file handle of a disk, its request path
    (DiskIO) and its write lease."""

    __slots__ = ("io", "opens", "writable", "lease")

    def __init__(self, image: Image, writable: bool, lease=None, io_mode: str = "auto"):
        self.io = iopath.DiskIO(image, io_mode)
        self.opens = 0
        self.writable = writable
        self.lease = lease

    def close(self) -> None:
        try:
            self.image.close()
        finally:
            if self.lease is not None:
                self.lease.release()
                self.lease = None

    @property
    def image(self) -> Image:
        return self.io.image

    @image.setter
    def image(self, image: Image) -> None:
        self.io.image = image        # only with no request in flight: see DiskIO.image

    @property
    def lease_mode(self) -> str:
        if self.lease is None:
            return "none"
        return "shared" if self.lease.shared else "exclusive"


class DiskLeases:
    """This daemon's write leases on the disks of one store (see the module docstring)."""

    def __init__(self, store: Store, node: str, fresh_image):
        self.store = store
        self.node = node
        self.fresh_image = fresh_image

    def acquire(self, key: tuple, path: str, shared: bool = False, by: str = "vbdfs"):
        """The write lease on disk key (image file at path); LeaseBusy if held elsewhere."""
        return leases.acquire(path, self.store.state_dir("leases"), key[0], key[1], self.node,
                              by=by, shared=shared, root=self.store.disk_root(path))

    def cold(self, key: tuple, writable: bool) -> ColdImage:
        return ColdImage(lambda read_only: self.fresh_image(key, not read_only), writable)

    def set_lease(self, od: OpenDisk, key: tuple, path: str, mode: str) -> None:
        """Move a Ganeti volume's lease on this node to mode (none, shared, exclusive).

        The image is served warm (cached) only by the one writer: exclusive,
        or shared after exclusive (a migration's source, still the writer).
        Every other way into a lease starts from the image as it is on disk
        now, and giving the lease up flushes first. See README "Ganeti".
        """
        if mode == od.lease_mode:
            return
        if mode == "none":
            old, od.image = od.image, self.cold(key, writable=False)
            old.close()                      # flushed: on disk before the lease goes
            od.lease.release()
            od.lease = None
            return
        if mode == "shared" and od.lease is not None:
            od.image.flush()                 # from exclusive: keep serving warm, on disk now
            od.lease.set_shared(True)
            return
        fresh = od.lease is None
        if fresh:
            od.lease = self.acquire(key, path, shared=mode == "shared")
        else:
            od.lease.set_shared(False, path)
        try:
            od.image.flush()
            new = self.cold(key, True) if mode == "shared" else self.fresh_image(key, True)
        except BaseException:
            if fresh:
                od.lease.release()
                od.lease = None
            else:
                od.lease.set_shared(True)
            raise
        old, od.image = od.image, new
        old.close()

    def grow(self, od: OpenDisk | None, key: tuple, path: str, size: int) -> None:
        """Grow a disk's image to size (the manifest's): in place if this
        daemon writes it, else under a lease of its own for the resize."""
        if od is not None and od.lease_mode == "exclusive" and not isinstance(od.image, ColdImage):
            od.image.resize(size)
            od.image.flush()
            return
        lease = self.acquire(key, path, by="vbdfs grow")
        try:
            with self.fresh_image(key, True) as img:
                img.resize(size)
                img.flush()
        finally:
            lease.release()
        if od is not None and isinstance(od.image, ColdImage):
            od.image.size = size              # it learns sizes only when it opens
        elif od is not None:
            old, od.image = od.image, self.fresh_image(key, False)   # a cached reader
            old.close()
