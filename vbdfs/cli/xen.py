"""vbdctl xen-config: the `disk = [...]` setting of an instance's Xen domain config."""

from __future__ import annotations

from ..log import get_logger
from ..operations import attach, xen
from .common import VbdctlError

log = get_logger(__name__)


def register(sub) -> None:
    p = sub.add_parser("xen-config", help="print the domain config's disk = [...] setting",
                       description="Paths point at the mount's raw views "
                       "(MOUNTPOINT/INSTANCE/DISK), or the image itself for drivers that "
                       "decode qcow2.")
    p.add_argument("--style", choices=xen.STYLES, default="legacy",
                   help="legacy (file:/tap:, as Ganeti writes) or xl (key=value)")
    p.add_argument("--vdev-prefix", choices=sorted(xen.VDEV_LIMITS), default="sd",
                   help="guest device names: sd (at most 16 disks), hd (4) or xvd")
    p.add_argument("--read-only", action="store_true", help="give the guest read-only disks")
    p.add_argument("instance")
    p.set_defaults(func=cmd_xen_config)


def cmd_xen_config(ctx, args):
    m = ctx.store.load(args.instance)
    try:
        lines = xen.disk_lines(m, ctx.mountpoint, style=args.style,
                               vdev_prefix=args.vdev_prefix, read_only=args.read_only)
        text = xen.format_disk_config(lines)
    except xen.XenConfigError as e:
        raise VbdctlError(str(e)) from None
    try:
        attach.check_mount(ctx.store, ctx.mountpoint)
    except attach.AttachError as e:
        # The config may be meant for another node: say so, but print it.
        log.warning("%s; the paths below will not exist until it is", e)
    if not args.read_only:
        for d in m.disks:
            reason = ctx.store.read_only_reason(d)
            if reason:
                log.warning("instance %s disk %s is read-only: %s; use --read-only, or "
                            "repair the image before starting the domain", m.name, d.name,
                            reason)
    print(text)
