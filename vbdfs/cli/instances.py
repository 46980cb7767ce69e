"""vbdctl list, info, add, remove, grow, rename: an instance's lifecycle."""

from __future__ import annotations

import argparse
import re
import sys

from ..log import get_logger
from ..operations import attach, inuse
from ..store import (DRIVERS, FORMATS, DiskSpec, ManifestError, SizeError, StoreError,
                     check_instance_name, parse_growth, parse_size)
from ..store.manifest import MAX_DISKS
from ..store.names import quoted
from .common import add_output_option, emit_json, human_size, print_table

log = get_logger(__name__)


def register(sub) -> None:
    p = sub.add_parser("list", help="list the instances in the store")
    add_output_option(p)
    p.set_defaults(func=cmd_list)
    register_lifecycle(sub)


def instance_summary(store, name: str) -> dict:
    """One instance as list shows it; an unreadable manifest becomes an error entry."""
    try:
        m = store.load(name)
    except (ManifestError, StoreError, OSError) as e:
        return {"name": name, "error": str(e)}
    allocated = 0
    for d in m.disks:
        try:
            allocated += store.stat_disk(d).st_blocks * 512
        except FileNotFoundError:
            pass
        except OSError as e:      # not a regular file in the store: the daemon refuses it too
            return {"name": name, "error": f"disk {d.name}: {e}"}
    read_only = {d.name: r for d in m.disks if (r := store.read_only_reason(d))}
    return {"name": name, "os": m.os, "primary": m.primary, "secondary": m.secondary,
            "disks": len(m.disks), "size": sum(d.size for d in m.disks), "allocated": allocated,
            "formats": sorted({d.format for d in m.disks}), "read_only": read_only,
            "ganeti": m.ganeti}


def ganeti_owner(metadata: str | None) -> str:
    """The Ganeti column: '-' for vbdctl's instances, 'unclaimed' for a volume
    no Ganeti instance took (setinfo never ran: an orphan if Ganeti gave up)."""
    if metadata is None:
        return "-"
    return metadata or "unclaimed"


def cmd_list(ctx, args):
    ctx.store.check_exists()
    items = [instance_summary(ctx.store, n) for n in ctx.store.instances()]
    if args.output == "json":
        emit_json(items)
    else:
        rows = []
        for it in items:
            if "error" in it:
                rows.append([it["name"], "-", "-", "-", "-", "-", "-", "ERROR: " + it["error"]])
            else:
                rows.append([it["name"], it["disks"], human_size(it["size"]),
                             human_size(it["allocated"]), ",".join(it["formats"]),
                             it["primary"] or "-", ",".join(it["read_only"]) or "-",
                             ganeti_owner(it["ganeti"])])
        print_table(rows, ["Instance", "Disks", "Size", "Allocated", "Format", "Primary",
                           "Read-only", "Ganeti"])
    return 1 if any("error" in it for it in items) else 0


# --- add, info, remove, grow, rename -------------------------------------------
# Syntax errors in one argument are usage errors (exit 2, from argparse);
# errors found by combining arguments or looking at the store exit 1.

_NODE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")
_OS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")


def _options(text: str, what: str, keys: tuple, flags: tuple = ()) -> dict:
    """'k=v,flag,...' into a dict; unknown or repeated keys are errors."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if key in flags and not eq:
            value = True
        elif key not in keys or not eq or not value:
            known = ", ".join([f"{k}=..." for k in keys] + list(flags))
            raise argparse.ArgumentTypeError(f"{what}: bad option {quoted(item)} (known: {known})")
        if key in out:
            raise argparse.ArgumentTypeError(f"{what}: {key} given twice")
        out[key] = value
    for key, choices in (("format", FORMATS), ("driver", DRIVERS)):
        if key in out and out[key] not in choices:
            raise argparse.ArgumentTypeError(
                f"{what}: unknown {key} {quoted(out[key])} (one of {', '.join(choices)})")
    return out


def parse_template(text: str) -> dict:
    """-t file[:path=DIR][,driver=D][,reuse][,format=F] (':' or ',' after 'file')."""
    m = re.match(r"([a-z]+)(?:[:,](.*))?\Z", text, re.S)
    if not m or m.group(1) != "file":
        raise argparse.ArgumentTypeError(f"disk template {quoted(text)}: only 'file' is supported "
                                         "(file[:path=DIR][,driver=...][,reuse][,format=...])")
    return _options(m.group(2) or "", "disk template",
                    ("path", "driver", "format"), ("reuse",))


def parse_disk(text: str) -> tuple[int, dict]:
    """--disk N[:size=SIZE][,format=F][,driver=D]"""
    index, _, rest = text.partition(":")
    if not index.isdigit() or not index.isascii():
        raise argparse.ArgumentTypeError(f"disk {quoted(text)}: expected INDEX[:size=SIZE,...] "
                                         "with INDEX 0, 1, ...")
    if len(index) > 3 or int(index) >= MAX_DISKS:
        raise argparse.ArgumentTypeError(f"disk index {index} is out of range "
                                         f"(0 to {MAX_DISKS - 1})")
    opts = _options(rest, f"disk {index}", ("size", "format", "driver"))
    if "size" in opts:
        try:
            opts["size"] = parse_size(opts["size"], what=f"disk {index} size")
        except SizeError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return int(index), opts


def parse_nodes(text: str) -> tuple[str, str]:
    primary, _, secondary = text.partition(":")
    for n in filter(None, (primary, secondary)):
        if len(n) > 255 or not _NODE_RE.match(n):
            raise argparse.ArgumentTypeError(f"node name {quoted(n)} is not a host name")
    if not primary or primary == secondary:
        raise argparse.ArgumentTypeError(f"nodes {quoted(text)}: expected PRIMARY[:SECONDARY], "
                                         "two different nodes")
    return primary, secondary


def parse_os(text: str) -> str:
    if not _OS_RE.match(text):
        raise argparse.ArgumentTypeError(f"OS name {quoted(text)}: letters, digits, '.', '_', "
                                         "'+', '-' only")
    return text


def register_lifecycle(sub) -> None:
    p = sub.add_parser("add", help="create an instance's disks (or adopt existing files)",
                       description="Create an instance with sparse disks sda, sdb, ... by "
                       "index. Sizes take M, G or T; a bare number is MiB.")
    p.add_argument("-t", "--disk-template", dest="template", type=parse_template,
                   default=parse_template("file"), metavar="file[:path=DIR][,OPTS]",
                   help="file, with path=DIR (a directory strictly below one listed in the "
                   "whitelist), driver=loop|blktap|blktap2|qdisk, format=raw|qcow2 "
                   "(defaults for every disk; qcow, legacy version 1, with reuse only), "
                   "reuse (adopt the files already there; formats detected)")
    p.add_argument("--disk", dest="disks", action="append", type=parse_disk, default=[],
                   metavar="N:size=SIZE[,format=F][,driver=D]",
                   help="disk N (0 = sda); repeat for each disk; with reuse, size is "
                   "optional and checked against the file")
    p.add_argument("-n", "--node", dest="nodes", type=parse_nodes, metavar="PRIMARY[:SECONDARY]",
                   help="the instance's nodes (default: this node)")
    p.add_argument("-o", "--os-type", dest="os", type=parse_os, metavar="OS")
    p.add_argument("instance")
    p.set_defaults(func=cmd_add, parser=p)

    p = sub.add_parser("info", help="show an instance's disks")
    add_output_option(p)
    p.add_argument("instance")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("remove", help="delete an instance's disks and directories",
                       description="Refused while a disk is attached or open.")
    p.add_argument("instance")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("grow", help="grow a disk (raw or qcow2) that nothing has open",
                       description="Grow DISK by SIZE ('+5G' or '5G'), or to SIZE with "
                       "--absolute. Disks never shrink.")
    # "-1G" is a (refused) size here, not an option: let argparse pass it through.
    p._negative_number_matcher = re.compile(r"^-\d")
    p.add_argument("--absolute", action="store_true", help="SIZE is the new size")
    p.add_argument("instance")
    p.add_argument("disk", help="sda, sdb, ... or the index")
    p.add_argument("size", metavar="[+]SIZE")
    p.set_defaults(func=cmd_grow, parser=p)

    p = sub.add_parser("rename", help="rename an instance (its directories and manifest)")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(func=cmd_rename)


def disk_specs(parser, template: dict, disks: list[tuple[int, dict]]) -> list[DiskSpec] | None:
    """The --disk options in index order; gaps and duplicates are usage errors."""
    if not disks:
        if template.get("reuse"):
            return None                 # adopt every sdX found
        parser.error("give at least one --disk N:size=SIZE")
    by_index: dict[int, dict] = {}
    for index, opts in disks:
        if index in by_index:
            parser.error(f"disk index {index} is given twice")
        by_index[index] = opts
    missing = [i for i in range(max(by_index) + 1) if i not in by_index]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        parser.error(f"disk indices must be 0, 1, 2, ... without gaps: {shown} missing")
    if len(by_index) > MAX_DISKS:
        parser.error(f"{len(by_index)} disks: at most {MAX_DISKS}")
    specs = []
    for i in range(len(by_index)):
        o = by_index[i]
        if "size" not in o and not template.get("reuse"):
            parser.error(f"disk {i}: no size (give --disk {i}:size=SIZE)")
        fmt = o.get("format", template.get("format"))
        specs.append(DiskSpec(size=o.get("size"),
                              format=fmt if (fmt or template.get("reuse")) else "raw",
                              driver=o.get("driver", template.get("driver", "loop"))))
    return specs


def cmd_add(ctx, args):
    check_instance_name(args.instance)
    specs = disk_specs(args.parser, args.template, args.disks)
    primary, secondary = args.nodes or (ctx.node, "")
    kw = dict(directory=args.template.get("path"), os_name=args.os or "", primary=primary,
              secondary=secondary)
    if args.template.get("reuse"):
        m = ctx.store.adopt(args.instance, specs, driver=args.template.get("driver", "loop"),
                            **kw)
        # Adopted all the same (nothing is changed; qemu-img can repair it in
        # place), but the administrator must know before attaching it.
        read_only = {d.name: r for d in m.disks if (r := ctx.store.read_only_reason(d))}
        for disk, reason in read_only.items():
            print(f"vbdctl: warning: instance {m.name} disk {disk} is read-only: {reason}",
                  file=sys.stderr)
    else:
        m = ctx.store.create(args.instance, specs, **kw)
        read_only = {}
    print(f"added instance {m.name}: " + ", ".join(
        f"{d.name} {human_size(d.size)} {d.format} ({d.driver}"
        f"{', read-only' if d.name in read_only else ''})" for d in m.disks))


def instance_info(store, mountpoint: str, node: str, name: str) -> dict:
    """Everything info shows: the manifest, allocation and live attachments."""
    m = store.load(name)
    records = attach.live_records(store, name, node)
    disks = []
    for d in m.disks:
        error = None
        try:
            allocated = store.stat_disk(d).st_blocks * 512
        except FileNotFoundError:
            allocated = None
        except OSError as e:      # not a regular file in the store: the daemon refuses it too
            allocated, error = None, str(e)
        disks.append({"disk": d.name, "index": d.index, "format": d.format,
                      "driver": d.driver, "size": d.size, "allocated": allocated,
                      "path": d.path, "view": attach.view_path(mountpoint, name, d.name),
                      "attachment": records.get(d.name) or next(
                          (r for k, r in sorted(records.items())
                           if k.startswith(d.name + "@")), None),
                      "error": error,
                      "read_only": None if error else store.read_only_reason(d)})
    return {"name": m.name, "os": m.os, "primary": m.primary, "secondary": m.secondary,
            "ganeti": m.ganeti, "disks": disks}


def cmd_info(ctx, args):
    info = instance_info(ctx.store, ctx.mountpoint, ctx.node, args.instance)
    broken = [f"disk {d['disk']} is broken: {d['error']}" for d in info["disks"] if d["error"]]
    if args.output == "json":
        emit_json(info)
        return 1 if broken else 0
    print(f"Instance {info['name']}  OS {info['os'] or '-'}  primary {info['primary'] or '-'}"
          f"  secondary {info['secondary'] or '-'}"
          + (f"  Ganeti volume of {ganeti_owner(info['ganeti'])}"
             if info["ganeti"] is not None else ""))
    rows = []
    for d in info["disks"]:
        a = d["attachment"]
        rows.append([d["disk"], d["format"], d["driver"], human_size(d["size"]),
                     "BROKEN" if d["error"] else
                     "missing" if d["allocated"] is None else human_size(d["allocated"]),
                     d["path"], f"{a['device']} ({a['node']})" if a else "-"])
    print_table(rows, ["Disk", "Format", "Driver", "Size", "Allocated", "Path", "Attached"])
    for d in info["disks"]:
        if d["read_only"]:
            print(f"{d['disk']} is read-only: {d['read_only']}")
    for line in broken:
        print(f"vbdctl: {line}", file=sys.stderr)
    return 1 if broken else 0


def cmd_remove(ctx, args):
    inuse.remove_instance(ctx.store, ctx.mountpoint, ctx.node, args.instance)
    print(f"removed instance {args.instance}")


def cmd_grow(ctx, args):
    try:
        if args.absolute:
            kw = {"new_size": parse_size(args.size)}
        else:
            kw = {"growth": parse_growth(args.size)}
    except SizeError as e:
        args.parser.error(str(e))
    d = inuse.grow_disk(ctx.store, ctx.mountpoint, ctx.node, args.instance, args.disk, **kw)
    print(f"instance {args.instance} disk {d.name} grown to {human_size(d.size)}")


def cmd_rename(ctx, args):
    inuse.rename_instance(ctx.store, ctx.mountpoint, ctx.node, args.old, args.new)
    print(f"renamed instance {args.old} to {args.new}")
