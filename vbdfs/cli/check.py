"""vbdctl check: report (and repair) qcow2 refcount leaks and corruptions."""

from __future__ import annotations

from .common import add_output_option, emit_json


def register(sub) -> None:
    p = sub.add_parser("check", help="check a disk's qcow2 metadata like qemu-img check",
                       description="Count every reference the qcow2 tables make and compare "
                       "it with the stored refcounts, as `qemu-img check` does: clean, leaks "
                       "N (space only) or corruptions N. --repair rebuilds the refcounts "
                       "(crash-safe; leaks and refcount errors), refused while the disk is "
                       "attached or open. An image marked corrupt is not repaired here (use "
                       "qemu-img check -r all). Raw disks have nothing to check. Exit status "
                       "0 when every disk checked is clean (after --repair), 1 otherwise.")
    p.add_argument("instance")
    p.add_argument("disk", nargs="?", help="sda, sdb, ... or the index (default: all disks)")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the refcounts of disks with leaks or refcount errors")
    add_output_option(p)
    p.set_defaults(func=cmd_check)


def cmd_check(ctx, args):
    from ..operations.check import check_instance
    results = check_instance(ctx.store, args.instance, args.disk, repair=args.repair,
                             mountpoint=ctx.mountpoint, node=ctx.node)
    if args.output == "json":
        emit_json(results)
    else:
        for r in results:
            for line in r["errors"]:
                print(f"{r['disk']}: {line}")
            print(f"{r['instance']} {r['disk']}: {r.get('summary', r['verdict'])}"
                  + (f" ({r['note']})" if r.get("note") else ""))
            if r.get("repaired"):
                print(f"{r['instance']} {r['disk']}: repaired: {r['repaired']}; now "
                      f"{r['after']['summary']}")
    final = [r.get("after", r)["verdict"] for r in results]
    return 0 if all(v == "clean" for v in final) else 1
