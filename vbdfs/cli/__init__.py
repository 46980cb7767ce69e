"""vbdctl: the control tool.

Each command module here has `register(subparsers)`, which adds its
subcommands; a subcommand's handler is `func(ctx, args)` and returns the exit
status (None means 0). Handlers parse and print; the work is done by the
store and operations layers so that tests can call it without a CLI.
COMMANDS names the module of every command, so that vbdctl imports only the
one it runs: for a small export, start-up was most of the time.

Exit status: 0 done, 1 failed (the message on stderr names the instance, disk
or path), 2 usage.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys

from .. import config as config_mod
from .. import log as log_mod
from .common import ERRORS, Context, Parser, one_line

log = log_mod.get_logger("vbdctl")

# command -> the module that registers it, in the order --help lists them.
COMMANDS = {
    "list": "instances", "add": "instances", "info": "instances", "remove": "instances",
    "grow": "instances", "rename": "instances", "check": "check",
    "attach": "attach", "detach": "attach",
    "xen-config": "xen",
    "export": "transfer", "import": "transfer", "convert": "transfer", "mount": "transfer",
    "umount": "transfer",
    "modify": "failover", "failover-check": "failover", "migrate-check": "failover",
    "failover": "failover",
    "daemon-stop": "daemon", "recover": "daemon",
    "ganeti-install": "ganeti",
}
GLOBAL_OPTIONS_WITH_VALUE = {"--config", "--store", "--mountpoint", "--node", "--whitelist"}


def command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (skipping global options and their values)."""
    args = iter(argv)
    for a in args:
        if a in GLOBAL_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with a known command, only that command's module is loaded."""
    p = Parser(
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
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for mod in modules:
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_in(argv)).parse_args(argv)
    # What is loaded by now (the modules, the parser) lives until exit: out of
    # the collector's sight, it is not walked again by each full collection
    # during the command, nor at exit, which saved ~6 ms of a small export.
    gc.freeze()
    log_mod.configure(level="INFO" if args.verbose else "WARNING", format="vbdctl: %(message)s")
    # An ssh drop or a systemd stop must clean up like Ctrl-C (staging
    # directories, temp copies), not end the process where it stands.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        cfg = config_mod.load(args.config, use_env=True)
        cfg = cfg.override(store=args.store, mountpoint=args.mountpoint, node=args.node,
                           file_storage_paths=args.whitelist)
        return args.func(Context(cfg), args) or 0
    except BrokenPipeError:
        # Python would complain again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command == "export":    # `export - | ssh ...` broke: the stream is cut short
            print("vbdctl: export: the reader closed the stream early; "
                  "the export is incomplete", file=sys.stderr)
            return 1
        return 0                        # `vbdctl list | head`: the reader has all it wants
    except ERRORS as e:
        print(f"vbdctl: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        # A bug, not an answer: still one line; -v shows where it happened.
        log.info("internal error", exc_info=True)
        print(f"vbdctl: internal error: {type(e).__name__}: {one_line(e)} "
              "(a bug; -v shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vbdctl: interrupted", file=sys.stderr)
        return 1
