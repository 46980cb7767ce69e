"""vbdctl daemon-stop, recover: stop the daemon safely; recover after a crash."""

from __future__ import annotations

from ..operations import recover, stop
from .common import add_output_option, emit_json


def register(sub) -> None:
    p = sub.add_parser("daemon-stop", help="stop the vbdfs daemon unless a disk is in use",
                       description="Stop the daemon serving MOUNTPOINT. Refused (status 1, "
                       "naming each disk and what holds it) while a disk is open or attached, "
                       "unless --force. This is how to stop vbdfs: the systemd unit refuses "
                       "`systemctl stop` and `restart`.")
    p.add_argument("--force", action="store_true",
                   help="unmount even while disks are in use: their users get I/O errors")
    p.add_argument("--detach", action="store_true",
                   help="first detach this node's recorded loop devices on the mount that "
                        "nothing uses (what the systemd unit does at shutdown)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit (default 30)")
    p.set_defaults(func=cmd_daemon_stop)

    p = sub.add_parser("recover", help="re-attach loop devices left on a crashed daemon's mount",
                       description="After the daemon died and was started again: re-attach "
                       "every loop device still bound to the dead mount that nothing uses "
                       "(read-only ones are re-pointed even while in use), and list the "
                       "others with what uses them. Exit status 1 if any is left.")
    add_output_option(p)
    p.set_defaults(func=cmd_recover)


def cmd_daemon_stop(ctx, args):
    r = stop.stop_daemon(ctx.store, ctx.mountpoint, ctx.node, force=args.force,
                         detach=args.detach, timeout=args.timeout)
    for d in r["detached"]:
        print(f"detached {d}")
    for h in r["pulled"]:
        print(f"pulled {h}")
    print(f"vbdfs daemon (pid {r['pid']}) stopped; {ctx.mountpoint} unmounted")


def cmd_recover(ctx, args):
    results = recover.recover(ctx.store, ctx.mountpoint, ctx.node)
    if args.output == "json":
        emit_json(results)
    elif not results:
        print("no loop device is left on a dead vbdfs mount")
    for r in results if args.output == "text" else ():
        what = f"{r['device']} {r['instance']}/{r['disk']}"
        if r["action"] in ("re-attached", "re-pointed"):
            print(f"{what}: {r['action']}" + (f" as {r['new_device']}"
                                              if r["new_device"] != r["device"] else ""))
        elif r["action"] == "held":
            print(f"{what}: in use, left alone: {r['why']}. Stop that, then run "
                  "`vbdctl recover` again")
        else:
            print(f"{what}: failed: {r['why']}")
    return 1 if any(r["action"] not in ("re-attached", "re-pointed") for r in results) else 0
