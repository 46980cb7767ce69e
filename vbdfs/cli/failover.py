"""vbdctl modify, failover-check, failover, migrate-check: moving an instance between nodes."""

from __future__ import annotations

import sys

from ..operations import failover as fo
from .common import add_output_option, emit_json, print_table
from .instances import parse_nodes, parse_os


def register(sub) -> None:
    p = sub.add_parser("modify", help="change an instance's nodes or OS",
                       description="-n PRIMARY[:SECONDARY] sets both nodes (no SECONDARY: "
                       "none). The manifest is replaced atomically under the instance's lock.")
    p.add_argument("-n", "--node", dest="nodes", type=parse_nodes, metavar="PRIMARY[:SECONDARY]")
    p.add_argument("-o", "--os-type", dest="os", type=parse_os, metavar="OS")
    p.add_argument("instance")
    p.set_defaults(func=cmd_modify, parser=p)

    for name, func, short, text in (
            ("failover-check", cmd_failover_check, "check that failover to TARGET can proceed",
             "check, changing nothing, that the instance can fail over to TARGET: its "
             "secondary node, disk files present and valid (format, size, headers, backing "
             "chains), TARGET's mount serving the store, no write lease or attachment held"),
            ("migrate-check", cmd_migrate_check, "check that TARGET sees the same disk files",
             "check that TARGET sees the very disk files the primary uses (for live "
             "migration): the failover checks except leases, and a digest of each disk's "
             "start, end and samples read here and through TARGET's mount"),
            ("failover", cmd_failover, "move the instance to its secondary node TARGET",
             "run every failover check, abort with nothing changed if one fails; then "
             "stop the domain, detach its disks here, make TARGET the primary and the "
             "old primary the secondary; with --attach attach the disks on TARGET, "
             "with --start start the domain")):
        p = sub.add_parser(name, help=short, description=text + ".")
        p.add_argument("--target", required=True, metavar="NODE", help="the node to move to")
        p.add_argument("--target-mountpoint", metavar="DIR",
                       help="where TARGET's vbdfs daemon serves the store, as seen here "
                       "(default: --mountpoint)")
        if name == "failover":
            p.add_argument("--stop-command", metavar="CMD",
                           help="stops the domain; words may use {instance}, {primary}, "
                           "{target} (default: the config file's stop_command, else "
                           f"{fo.DEFAULT_STOP!r}; '' if it is already stopped)")
            p.add_argument("--start-command", metavar="CMD",
                           help="starts the domain with --start (default: the config "
                           f"file's start_command, else {fo.DEFAULT_START!r})")
            p.add_argument("--attach", action="store_true",
                           help="attach the disks on TARGET through --target-mountpoint")
            p.add_argument("--start", action="store_true",
                           help="run the start command after the failover")
        else:
            add_output_option(p)
        p.add_argument("instance")
        p.set_defaults(func=func)


def cmd_modify(ctx, args):
    if args.nodes is None and args.os is None:
        args.parser.error("nothing to change: give -n PRIMARY[:SECONDARY] and/or -o OS")
    primary, secondary = args.nodes or (None, None)
    m = fo.modify(ctx.store, args.instance, primary, secondary, args.os)
    print(f"instance {m.name}: primary {m.primary or '-'}, secondary {m.secondary or '-'}, "
          f"OS {m.os or '-'}")


def _show(results, args) -> int:
    ok = fo.all_ok(results)
    if getattr(args, "output", "text") == "json":
        emit_json({"instance": args.instance, "target": args.target, "ok": ok,
                   "checks": [r.to_dict() for r in results]})
    else:
        print_table([[r.name, "ok" if r.ok else "FAILED", r.detail] for r in results],
                    ["Check", "Result", "Detail"])
    return 0 if ok else 1


def _target_mp(ctx, args) -> str:
    return args.target_mountpoint or ctx.mountpoint


def cmd_failover_check(ctx, args):
    return _show(fo.failover_checks(ctx.store, args.instance, args.target,
                                    _target_mp(ctx, args), ctx.node), args)


def cmd_migrate_check(ctx, args):
    return _show(fo.migrate_checks(ctx.store, args.instance, args.target,
                                   _target_mp(ctx, args)), args)


def cmd_failover(ctx, args):
    try:
        results = fo.failover(ctx.store, args.instance, args.target, _target_mp(ctx, args),
                              ctx.node,
                              stop_command=_or(args.stop_command, ctx.config.stop_command),
                              start_command=_or(args.start_command, ctx.config.start_command),
                              do_attach=args.attach,
                              do_start=args.start, log=print)
    except fo.ChecksFailed as e:
        _show(e.results, args)
        print(f"vbdctl: {e}", file=sys.stderr)
        return 1
    print(f"instance {args.instance} failed over to {args.target} "
          f"({len(results)} checks passed)")


def _or(option, configured):
    """The option if given (even ''), else the config file's setting."""
    return configured if option is None else option
