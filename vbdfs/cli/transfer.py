"""vbdctl export, import, convert, mount, umount: copies and backup access."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..images import NEW_FORMATS
from ..operations import transfer
from ..store.names import quoted
from .common import VbdctlError, add_output_option, emit_json, human_size


def register(sub) -> None:
    p = sub.add_parser("export", help="export an instance (sparse, with checksums)",
                       description="Write DEST_DIR/INSTANCE/ (Ganeti's config.ini, the "
                       "manifest, one dump per disk, each disk's checksum), or with DEST "
                       "'-' the vbdfs stream on stdout, for `vbdctl import -` on another "
                       "node. Refuses a disk attached or open read-write unless --force.")
    p.add_argument("instance")
    p.add_argument("dest", metavar="DEST_DIR|-")
    p.add_argument("--format", choices=NEW_FORMATS,
                   help="the dumps' format (default: each disk's own)")
    p.add_argument("--force", action="store_true",
                   help="export even while a disk is attached or open read-write")
    add_output_option(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="create an instance from an export, verifying it",
                       description="Create an instance from EXPORT_DIR (written by vbdctl "
                       "export) or from the stream on stdin ('-'). Every disk's checksum is "
                       "verified while it is copied; on any mismatch nothing is created.")
    p.add_argument("source", metavar="EXPORT_DIR|-")
    p.add_argument("--name", help="the new instance's name (default: the exported one)")
    p.add_argument("-t", "--disk-template", dest="template", type=_template,
                   metavar="file[:path=DIR][,format=F][,driver=D]",
                   help="where and how to store the disks (default: the store, and each "
                   "disk's exported format and driver)")
    add_output_option(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("convert", help="convert a disk between raw and qcow2",
                       description="Copy the disk into the other format (sparse), check it "
                       "reads back the same, and swap it in with the manifest. Refuses "
                       "while the disk is attached or open.")
    p.add_argument("instance")
    p.add_argument("disk", help="sda, sdb, ... or the index")
    p.add_argument("--to", required=True, choices=NEW_FORMATS)
    add_output_option(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("mount", help="mount a guest's filesystem in Dom0 (read-only)",
                       description="Attach the disk's raw view as a loop device (partitions "
                       "scanned) and mount it, or its partition N, on MOUNTPOINT; read-only "
                       "unless --read-write. Undo with vbdctl umount.")
    p.add_argument("instance")
    p.add_argument("disk", help="sda, sdb, ... or the index")
    p.add_argument("target", metavar="MOUNTPOINT")
    p.add_argument("--partition", type=_positive, metavar="N")
    p.add_argument("--read-write", action="store_true")
    add_output_option(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount what vbdctl mount mounted, detach its loop device")
    p.add_argument("target", metavar="MOUNTPOINT")
    add_output_option(p)
    p.set_defaults(func=cmd_umount)


def _positive(text: str) -> int:
    # ASCII digits only (int() reads "\u0665" as 5), and few: int() of 5,000 fails.
    if not (text.isascii() and text.isdigit()) or len(text) > 4 or int(text) < 1:
        raise argparse.ArgumentTypeError(f"partition {quoted(text)}: expected 1, 2, ...")
    return int(text)


def _template(text: str) -> dict:
    from .instances import parse_template       # one parser for -t, shared with add
    t = parse_template(text)
    if t.get("reuse"):
        raise argparse.ArgumentTypeError("import creates new disk files: reuse makes no sense")
    return t


@contextlib.contextmanager
def progress_bar(what: str):
    """A progress(n, total) callback: a tqdm bar on a terminal's stderr, else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    bar = None

    def progress(n, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(n)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _report(summary: dict, args, out=None) -> None:
    out = out or sys.stdout
    if args.output == "json":
        emit_json(summary, out)
        return
    for reason in summary.get("forced_over", []):
        print(f"warning (--force): {reason}", file=sys.stderr)
    where = summary.get("export") or summary.get("source")
    print(f"{summary['instance']} {where}: {len(summary['disks'])} disks in "
          f"{summary['seconds']}s", file=out)
    for d in summary["disks"]:
        print(f"  {d['name']} {d['format']} size {human_size(d['size'])} data "
              f"{human_size(d['data_bytes'])} {d['checksum']}", file=out)


def cmd_export(ctx, args):
    with progress_bar(f"export {args.instance}") as progress:
        if args.dest == "-":
            if args.format:
                raise VbdctlError("export -: the stream carries contents, not a format; "
                                  "choose the format at import (-t file:format=F)")
            if sys.stdout.isatty():
                raise VbdctlError("export -: stdout is a terminal; pipe it to vbdctl import -")
            summary = transfer.export_stream(ctx.store, args.instance, sys.stdout.buffer,
                                             force=args.force, mountpoint=ctx.mountpoint,
                                             node=ctx.node, progress=progress)
            _report(summary, args, out=sys.stderr)     # stdout is the stream
            return
        summary = transfer.export_instance(ctx.store, args.instance, args.dest,
                                           fmt=args.format, force=args.force,
                                           mountpoint=ctx.mountpoint, node=ctx.node,
                                           progress=progress)
    _report(summary, args)


def cmd_import(ctx, args):
    t = args.template or {}
    opts = dict(name=args.name, directory=t.get("path"), fmt=t.get("format"),
                driver=t.get("driver"), node=ctx.node)
    with progress_bar("import") as progress:
        if args.source == "-":
            summary = transfer.import_stream(ctx.store, sys.stdin.buffer, progress=progress,
                                             **opts)
        else:
            summary = transfer.import_instance(ctx.store, args.source, progress=progress,
                                               **opts)
    _report(summary, args)


# convert and guestmount are imported by their commands only: every module
# vbdctl loads is start-up time, which dominates a small export.
def cmd_convert(ctx, args):
    from ..operations import convert
    with progress_bar(f"convert {args.instance} {args.disk}") as progress:
        s = convert.convert_disk(ctx.store, args.instance, args.disk, args.to,
                                 mountpoint=ctx.mountpoint, node=ctx.node, progress=progress)
    if args.output == "json":
        emit_json(s)
    else:
        print(f"{s['instance']} {s['disk']}: {s['from']} -> {s['to']}, data "
              f"{human_size(s['data_bytes'])}, allocated {human_size(s['allocated'])}, "
              f"{s['seconds']}s")
        for path in s["removed"]:
            print(f"removed the old external data file {path}")


def cmd_mount(ctx, args):
    from ..operations import guestmount
    s = guestmount.mount_guest(ctx.store, ctx.mountpoint, args.instance, args.disk,
                               args.target, partition=args.partition,
                               read_write=args.read_write)
    if args.output == "json":
        emit_json(s)
    else:
        print(f"{s['source']} on {s['mountpoint']} ({'ro' if s['read_only'] else 'rw'})")


def cmd_umount(ctx, args):
    from ..operations import guestmount
    s = guestmount.umount_guest(ctx.store, args.target)
    if args.output == "json":
        emit_json(s)
    else:
        print(f"{s['mountpoint']} unmounted" + (f", {s['device']} detached" if s["detached"]
                                               else f"; {s['device']} still mounted elsewhere"))
