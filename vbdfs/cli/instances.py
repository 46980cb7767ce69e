"""vbdctl list: the instances in the store."""

from __future__ import annotations

import logging
import os

from ..store import ManifestError, StoreError
from .common import add_output_option, emit_json, human_size, print_table

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("list", help="list the instances in the store")
    add_output_option(p)
    p.set_defaults(func=cmd_list)


def instance_summary(store, name: str) -> dict:
    """One instance as list shows it; an unreadable manifest becomes an error entry."""
    try:
        m = store.load(name)
    except (ManifestError, StoreError, OSError) as e:
        return {"name": name, "error": str(e)}
    allocated = 0
    for d in m.disks:
        try:
            allocated += os.stat(d.path).st_blocks * 512
        except FileNotFoundError:
            pass
    return {"name": name, "os": m.os, "primary": m.primary, "secondary": m.secondary,
            "disks": len(m.disks), "size": sum(d.size for d in m.disks), "allocated": allocated,
            "formats": sorted({d.format for d in m.disks})}


def cmd_list(ctx, args):
    ctx.store.check_exists()
    items = [instance_summary(ctx.store, n) for n in ctx.store.instances()]
    if args.output == "json":
        emit_json(items)
    else:
        rows = []
        for it in items:
            if "error" in it:
                rows.append([it["name"], "-", "-", "-", "-", "ERROR: " + it["error"]])
            else:
                rows.append([it["name"], it["disks"], human_size(it["size"]),
                             human_size(it["allocated"]), ",".join(it["formats"]),
                             it["primary"] or "-"])
        print_table(rows, ["Instance", "Disks", "Size", "Allocated", "Format", "Primary"])
    return 1 if any("error" in it for it in items) else 0
