"""vbdctl: the control tool.

Each module in this package that defines `register(subparsers)` adds its
subcommands; a subcommand's handler is `func(ctx, args)` and returns the exit
status (None means 0). Handlers parse and print; the work is done by the
store and operations layers so that tests can call it without a CLI.

Exit status: 0 done, 1 failed (the message on stderr names the instance, disk
or path), 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from .. import config as config_mod
from .common import ERRORS, Context

log = logging.getLogger("vbdctl")

HELP_ORDER = ["instances", "attach", "xen", "transfer", "failover"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vbdctl",
        description="Manage vbdfs instances: file-based virtual block devices for Xen Dom0.",
        epilog="Defaults come from /etc/vbdfs/vbdfs.toml (or $VBDFS_CONFIG); the environment "
               "variables VBDFS_STORE, VBDFS_MOUNTPOINT and VBDFS_NODE override it, and "
               "the options override both. Exit status: 0 done, 1 failed, 2 usage.")
    p.add_argument("--config", metavar="FILE", help="config file (default /etc/vbdfs/vbdfs.toml)")
    p.add_argument("--store", metavar="DIR", help="the storage directory")
    p.add_argument("--mountpoint", metavar="DIR", help="where the vbdfs daemon serves the store")
    p.add_argument("--node", metavar="NAME", help="this node's name (default: the host name)")
    p.add_argument("--whitelist", metavar="FILE",
                   help="allowed custom storage directories (default /etc/ganeti/file-storage-paths)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    found = {m.name for m in pkgutil.iter_modules(__path__)}
    # --help lists commands in the order an administrator meets them.
    order = [m for m in HELP_ORDER if m in found] + sorted(found - set(HELP_ORDER))
    for mod in order:
        module = importlib.import_module(f"{__name__}.{mod}")
        if hasattr(module, "register"):
            module.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vbdctl: %(message)s")
    try:
        cfg = config_mod.load(args.config, use_env=True)
        cfg = cfg.override(store=args.store, mountpoint=args.mountpoint, node=args.node,
                           file_storage_paths=args.whitelist)
        return args.func(Context(cfg), args) or 0
    except BrokenPipeError:   # `vbdctl list | head`: the reader has all it wants
        sys.stderr.close()
        return 0
    except ERRORS as e:
        print(f"vbdctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vbdctl: interrupted", file=sys.stderr)
        return 1
