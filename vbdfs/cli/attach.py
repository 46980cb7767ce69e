"""vbdctl attach, detach: an instance's disks as Dom0 block devices."""

from __future__ import annotations

from ..operations import attach


def register(sub) -> None:
    p = sub.add_parser("attach", help="attach disks as loop (or blktap) devices",
                       description="Attach DISK, or every disk with a Dom0 driver, over the "
                       "mount's raw view (MOUNTPOINT/INSTANCE/DISK). Prints one line per "
                       "disk: the disk and its device.")
    p.add_argument("--read-only", action="store_true", help="attach read-only")
    p.add_argument("--direct-io", choices=("on", "off"), default="on",
                   help="loop direct I/O (default on: no second copy in Dom0's page cache)")
    p.add_argument("--driver", choices=attach.LOOP_DRIVERS + attach.TAP_DRIVERS,
                   help="use this driver instead of the disk's")
    p.add_argument("instance")
    p.add_argument("disk", nargs="?", help="sda, sdb, ... or the index (default: all)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", help="detach disks attached on this node")
    p.add_argument("instance")
    p.add_argument("disk", nargs="?", help="sda, sdb, ... or the index (default: all)")
    p.set_defaults(func=cmd_detach)


def cmd_attach(ctx, args):
    for rec in attach.attach(ctx.store, ctx.mountpoint, ctx.node, args.instance, args.disk,
                             read_only=args.read_only, direct_io=args.direct_io == "on",
                             driver=args.driver):
        print(f"{rec['disk']} {rec['device']}")


def cmd_detach(ctx, args):
    for rec in attach.detach(ctx.store, ctx.node, args.instance, args.disk):
        print(f"{rec['disk']} {rec['device']} detached")
