"""Ganeti ExtStorage volumes: what the provider scripts do (vbdfs/ganeti.py translates).

One Ganeti volume (VOL_NAME `<uuid>.ext.disk<N>`) is one vbdfs instance of
the same name with one disk, sda. Its manifest says it is a Ganeti volume
(`ganeti`: the metadata Ganeti gave with setinfo, "" until then, so volumes
that no instance claimed can be found). The block device Ganeti gets is a
loop device over the mount's raw view, made by operations/attach.py.

Writing follows Ganeti's open and close, not the loop device: attach opens
the view read-write but the daemon gives the write lease only when open
asks for it (user.vbdfs.lease on the view: exclusive, shared or none), so a
migration's target can attach while the source still writes. The daemon's
side of this is in opendisk.py (DiskLeases.set_lease); README "Ganeti" tells
the handover.

attach runs before nearly every Ganeti operation, on every node involved.
Attached already, it answers from sysfs alone; so this module imports the
store and the rest only in the functions that need them (loading the store
doubled attach's ~40 ms).
"""

from __future__ import annotations

import errno
import os
import time

from .loops import backs, loop_list, view_path

MiB = 1 << 20

DISK = "sda"
ACCESS_MODES = ("kernelspace", "userspace")
# The parameters a user gives (--disk N:...,NAME=VALUE), for parameters.list.
PARAMETERS = {"format": "image format of the volume: raw or qcow2 (default raw)"}
LEASE_XATTR = "user.vbdfs.lease"
CLONE_XATTR = "user.vbdfs.clone_to"
RELEASE_WAIT = 10.0        # seconds detach waits for the daemon to see the device go


class VolumeError(Exception):
    """A volume action failed; the message says why (the caller names the volume)."""


def check_params(params: dict[str, str]) -> dict[str, str]:
    """The volume's parameters with defaults; VolumeError for unknown names or values."""
    from ..images import FORMATS
    # None: any value (Ganeti sets provider, and access through access_mode).
    allowed = {"format": FORMATS, "provider": None, "access": ACCESS_MODES}
    out = {"format": "raw", "access": "kernelspace"}
    for name, value in sorted(params.items()):
        if name not in allowed:
            raise VolumeError(f"unknown parameter {name!r} (known: "
                              f"{', '.join(sorted(PARAMETERS))})")
        if allowed[name] is not None and value not in allowed[name]:
            raise VolumeError(f"parameter {name}={value!r} is not one of "
                              f"{', '.join(allowed[name])}")
        out[name] = value
    return out


def access_mode(params: dict[str, str]) -> str:
    """Only the access parameter: what attach needs (without loading the engines)."""
    access = params.get("access", "kernelspace")
    if access not in ACCESS_MODES:
        raise VolumeError(f"parameter access={access!r} is not one of {', '.join(ACCESS_MODES)}")
    return access


def _view(mountpoint: str, volume: str) -> str:
    return view_path(mountpoint, volume, DISK)


# --- create, setinfo, remove -------------------------------------------------------
def create(store, volume: str, size_mib: int, params: dict[str, str]) -> None:
    from ..store import DiskSpec
    p = check_params(params)
    if size_mib <= 0:
        raise VolumeError(f"size {size_mib} MiB is not positive")
    store.create(volume, [DiskSpec(size_mib * MiB, p["format"])], ganeti="")


def setinfo(store, volume: str, metadata: str) -> None:
    from ..store.manifest import GANETI_METADATA_RE
    if not GANETI_METADATA_RE.match(metadata):
        raise VolumeError(f"metadata {metadata!r}: only letters, digits, '-', '_', '+', '.' "
                          "and at most 128 characters")
    with store.lock(volume):
        m = store.load(volume)
        _check_volume(m)
        store.save(m.replace(ganeti=metadata))


def remove(store, mountpoint: str, node: str, volume: str) -> None:
    """Remove the volume; gone already is done. Refused while attached or open
    anywhere (Ganeti detaches first; a snapshot `VOL.snap` is its own volume)."""
    from . import inuse
    if not store.exists(volume):
        return
    _check_volume(store.load(volume))
    inuse.remove_instance(store, mountpoint, node, volume)


def _check_volume(m) -> None:
    if m.ganeti is None or len(m.disks) != 1:
        raise VolumeError(f"instance {m.name} is not a Ganeti volume (made by vbdctl); "
                          "the provider leaves it alone")


# --- attach and detach ----------------------------------------------------------------
def attached_device(mountpoint: str, volume: str) -> str | None:
    """This node's loop device for the volume: one over this node's view of it.
    A name that is no single path component is left to the store to refuse."""
    if "/" in volume or volume.startswith(".") or "\0" in volume:
        return None
    view = _view(mountpoint, volume)
    st = None
    for device, back, read_only in loop_list():
        if back == view and not read_only:
            try:
                st = st or os.stat(view)
            except OSError:            # no mount, or not served: nothing attached here
                return None
            if backs(device, st):
                return device
    return None


def attach(store_fn, mountpoint: str, node: str, volume: str,
           access: str = "kernelspace") -> list[str]:
    """The lines Ganeti reads: the block device, then for userspace access the
    view for KVM (which then reads a qcow2 volume as raw, through vbdfs).
    Attached already on this node: the same device again. store_fn() gives
    the Store, needed only to attach."""
    device = attached_device(mountpoint, volume)
    if device is None:
        from . import attach as attach_mod
        store = store_fn()
        mp = attach_mod.check_mount(store, mountpoint)
        try:
            made = attach_mod.attach(store, mp, node, volume, DISK, per_node=True)
            device = made[0]["device"]
        except attach_mod.AttachError:
            device = attached_device(mountpoint, volume)     # a concurrent attach won
            if device is None:
                raise
    lines = [device]
    if access == "userspace":
        lines.append("kvm:" + _view(mountpoint, volume))
    return lines


def detach(store, mountpoint: str, node: str, volume: str) -> None:
    """Detach this node's loop device; not attached here (or no volume) is done.
    A migration's two nodes attach a volume at once: records are per node.

    The kernel tells the daemon that the loop device let the view go only
    after losetup returns (FUSE sends releases asynchronously), and until
    then the daemon holds the lease: wait for that, so that the remove or
    the other node's open that follows finds the volume free.
    """
    from .attach import detach_per_node
    if not store.exists(volume) or detach_per_node(store, node, volume, DISK) is None:
        return
    deadline = time.monotonic() + RELEASE_WAIT
    while lease_mode(mountpoint, volume) != "none" and time.monotonic() < deadline:
        time.sleep(0.01)


# --- open and close: the write lease -------------------------------------------------
def open_volume(store, mountpoint: str, node: str, volume: str, exclusive: bool,
                access: str = "kernelspace") -> None:
    """Let this node write the volume: alone (exclusive) or, during a live
    migration, alongside the other node (shared)."""
    attach(lambda: store, mountpoint, node, volume, access)
    _set_lease(store, mountpoint, volume, "exclusive" if exclusive else "shared")


def close_volume(store, mountpoint: str, volume: str) -> None:
    """This node stops writing: flush, give the lease up. Not attached: nothing held."""
    if attached_device(mountpoint, volume) is None:
        return
    _set_lease(store, mountpoint, volume, "none")


def lease_mode(mountpoint: str, volume: str) -> str:
    """This node's lease on the volume: none, shared or exclusive."""
    try:
        return os.getxattr(_view(mountpoint, volume), LEASE_XATTR).decode()
    except OSError:                    # no mount, not served: no lease of this node's
        return "none"


def _set_lease(store, mountpoint: str, volume: str, mode: str) -> None:
    from ..store import leases
    from .attach import check_mount
    mp = check_mount(store, mountpoint)
    try:
        os.setxattr(_view(mp, volume), LEASE_XATTR, mode.encode())
    except OSError as e:
        if e.errno == errno.EBUSY:
            m = store.load(volume)
            holder = leases.holder(store.state_dir("leases"), volume, DISK, m.disks[0].path)
            raise VolumeError(f"cannot open for writing ({mode}): it is being written by "
                              f"{leases.describe(holder)}") from None
        if e.errno == errno.ENXIO and mode == "none":
            return                     # the daemon has it open nowhere: nothing to let go
        if e.errno == errno.ENXIO:
            raise VolumeError("not attached read-write on this node") from None
        raise VolumeError(f"setting its lease to {mode} through {mp}: {e.strerror}") from None


# --- grow and snapshot --------------------------------------------------------------
def grow(store, mountpoint: str, volume: str, new_mib: int) -> int:
    """Grow the volume to new_mib MiB, running or not; return the new size in bytes.

    The manifest takes the new size first (under the instance lock), then a
    truncate through the mount has the daemon resize the image: in place if
    it writes the disk, under a lease of its own otherwise. Then this node's
    loop device is told (LOOP_SET_CAPACITY). Growing to the size it has is done.
    """
    from ..store import leases
    from .attach import AttachError, check_mount
    from .tools import run_tool
    new = new_mib * MiB
    mp = check_mount(store, mountpoint)
    view = _view(mp, volume)
    with store.lock(volume):
        m = store.load(volume)
        _check_volume(m)
        d = m.disks[0]
        if new < d.size:
            raise VolumeError(f"cannot shrink from {d.size // MiB} to {new_mib} MiB")
        if new > d.size:
            store.save(m.replace(disks=[d.replace(size=new)]))
        try:
            os.truncate(view, new)     # the same size: the daemon does nothing
        except OSError as e:
            if new > d.size:
                store.save(m)          # as it was: the image did not grow
            if e.errno == errno.EBUSY:
                holder = leases.holder(store.state_dir("leases"), volume, DISK, d.path)
                raise VolumeError(f"cannot grow: it is being written by "
                                  f"{leases.describe(holder)}") from None
            raise VolumeError(f"growing through {view}: {e.strerror}") from None
    device = attached_device(mp, volume)
    if device is not None:
        run_tool(["losetup", "--set-capacity", device], f"refreshing the size of {device}",
                 AttachError)
    return new


def snapshot(store, mountpoint: str, volume: str, snap_name: str, node: str) -> None:
    """A copy of the volume as the volume snap_name, in its format and with its owner.

    Where the store's filesystem has reflinks (XFS, btrfs) the copy is
    instant and a consistent point in time, even while the guest writes:
    if this node's daemon writes the volume, it makes the copy between two
    of the volume's requests (user.vbdfs.clone_to). Elsewhere only its data
    runs are copied (sparse), and nobody may write the volume meanwhile. If
    this node opened it exclusively (Ganeti's export stops the guest but
    leaves its disks open), the daemon flushes it first and the copy trusts
    the guest to be stopped (with `gnt-backup export --noshutdown` it is
    not, and the copy is what it is). Otherwise the copy holds the write
    lease, so a writer elsewhere is refused.
    """
    from ..images import ImageError, create_image
    from ..images.fileops import fsync_path
    from ..store import DiskSpec, leases
    from .transfer import SparseHash, copy_image, writer
    m = store.load(volume)
    _check_volume(m)
    d = m.disks[0]
    with store.lock(volume):
        lease = None
        served_here = lease_mode(mountpoint, volume) == "exclusive"
        if not served_here:
            try:
                lease = leases.acquire(d.path, store.state_dir("leases"), volume, DISK, node,
                                       by="vbdfs snapshot", root=store.disk_root(d.path))
            except leases.LeaseBusy as e:
                raise VolumeError(f"cannot snapshot while it is written: {e}") from None
        try:
            def fill(staged: str) -> list[DiskSpec]:
                target = os.path.join(staged, DISK)
                view = _view(mountpoint, volume) if served_here else None
                if not _reflink_copy(store, d, target, view):
                    if view is not None:
                        fsync_path(view)       # the daemon's flush: tables and data on disk
                    with store.open_disk(d, read_only=True) as src, \
                            create_image(target, d.format, d.size) as dst:
                        with writer(dst) as put:
                            copy_image(src, put, SparseHash(d.size))
                        dst.flush()
                return [DiskSpec(d.size, d.format, d.driver)]
            try:
                store.create_staged(snap_name, fill, ganeti=m.ganeti)
            except ImageError as e:
                raise VolumeError(f"snapshot {snap_name}: {e}") from None
        finally:
            if lease is not None:
                lease.release()


def _reflink_copy(store, d, target: str, view: str | None) -> bool:
    """Make target (a new file) an instant copy of disk d's image by reflink;
    False, and no target, where that cannot be done. view: the disk in this
    node's mount, whose daemon writes it and so must make the copy."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if view is not None:
            try:
                os.setxattr(view, CLONE_XATTR, os.fsencode(target))
                done = True
            except OSError as e:
                # No reflinks, not open there after all, or a daemon from
                # before clone_to (EPERM): copy instead.
                if e.errno not in (errno.EOPNOTSUPP, errno.ENXIO, errno.EPERM):
                    raise
                done = False
        else:
            with store.open_disk(d, read_only=True) as src:
                done = src.reflink_to(fd)
        if done:
            os.fsync(fd)
    finally:
        os.close(fd)
    if not done:
        os.unlink(target)
    return done


def verify(params: dict[str, str]) -> None:
    check_params(params)
