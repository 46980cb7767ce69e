"""Stop the daemon serving a mount, the safe way (`vbdctl daemon-stop`).

The daemon itself refuses to unmount while a disk is open or attached (see
vbdfs/daemon.py); this asks first, so that the administrator gets the
answer at once instead of a daemon that quietly waits:

1. find the daemon: the mount must be vbdfs serving this store, and its root
   names the daemon's pid (xattr user.vbdfs.pid);
2. with detach, detach this node's recorded loop devices on the mount that
   nothing uses (what a host shutdown wants once the domains are down);
3. list what still holds a disk (holders.mount_holders); if anything does,
   refuse, unless forced;
4. send SIGTERM (forced: SIGUSR1, which unmounts whatever is open) and wait
   for the daemon to exit.
"""

from __future__ import annotations

import os
import signal
import time

from ..store import Store, StoreError
from . import attach, holders, recover

XATTR_PID = "user.vbdfs.pid"


class StopError(StoreError):
    """The daemon was not stopped; the message says why and what to do."""


def daemon_pid(mountpoint: str) -> int:
    try:
        return int(os.getxattr(mountpoint, XATTR_PID))
    except (OSError, ValueError) as e:
        raise StopError(f"{mountpoint}: cannot read the daemon's pid ({XATTR_PID}): {e}") from None


def running(pid: int) -> bool:
    """Is pid alive? (an exited child its parent has not reaped yet is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def detach_unused(store: Store, mountpoint: str, node: str) -> list[str]:
    """Detach this node's recorded loop devices on the mount that nothing uses."""
    done = []
    for instance in store.instances():
        try:
            records = attach.read_records(store, instance)
        except StoreError:
            continue
        for disk, r in sorted(records.items()):
            device = r.get("device")
            if (r.get("node") != node or r.get("driver") not in attach.LOOP_DRIVERS
                    or r.get("path") not in holders.Under(mountpoint)
                    or attach.loop_devices().get(device) != r.get("path")
                    or holders.loop_users(device)):
                continue
            try:
                attach.detach(store, node, instance, disk)
                done.append(f"{instance}/{disk} {device}")
            except StoreError:
                pass                   # opened meanwhile: it still holds the mount
    return done


def stop_daemon(store: Store, mountpoint: str, node: str, force: bool = False,
                detach: bool = False, timeout: float = 30.0) -> dict:
    """Stop the daemon; {"pid", "detached", "pulled"}. StopError if it keeps serving."""
    mp = os.path.normpath(os.path.abspath(mountpoint))
    if recover.is_dead(mp):
        raise StopError(f"the vbdfs daemon serving {mp} is gone (crashed?): start it again "
                        "(it cleans up the dead mount), then run `vbdctl recover`")
    mp = attach.check_mount(store, mp)
    pid = daemon_pid(mp)
    real = os.path.realpath(mp)
    detached = detach_unused(store, real, node) if detach else []
    held = holders.describe(holders.mount_holders(real))
    if held and not force:
        done = f"detached {', '.join(detached)}; " if detached else ""
        raise StopError(f"{done}not stopping the vbdfs daemon (pid {pid}) serving {mp}: disks in "
                        "use: " + " | ".join(held) + ". Stop the domains or detach the disks "
                        "first; --force pulls them from their users")
    try:
        os.kill(pid, signal.SIGUSR1 if force else signal.SIGTERM)
    except ProcessLookupError:
        raise StopError(f"the vbdfs daemon (pid {pid}) serving {mp} is not running "
                        "(another pid namespace?)") from None
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            raise StopError(f"the vbdfs daemon (pid {pid}) still serves {mp} after {timeout:g}s: "
                            "a disk is still open (its log names it); it stops once that "
                            "is closed")
        time.sleep(0.05)
    return {"pid": pid, "detached": detached, "pulled": held}
