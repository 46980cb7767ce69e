"""vbdctl ganeti-install: put the ExtStorage provider where Ganeti finds it."""

from __future__ import annotations

DEFAULT_DIR = "/usr/local/lib/ganeti/extstorage/vbdfs"


def register(sub) -> None:
    p = sub.add_parser(
        "ganeti-install", help="install the Ganeti ExtStorage provider (run on every node)",
        description="Write the ExtStorage provider directory: the scripts create, attach, "
                    "detach, remove, grow, setinfo, verify, snapshot, open, close (shims "
                    "that run this vbdfs with this Python) and parameters.list. The "
                    "directory's name is the provider's name (--disk ...,provider=NAME). "
                    "Ganeti searches /srv/ganeti/extstorage, /usr/local/lib/ganeti/extstorage, "
                    "/usr/lib/ganeti/extstorage and /usr/share/ganeti/extstorage; check with "
                    "`gnt-storage diagnose`.")
    p.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                   help=f"the provider directory to write (default {DEFAULT_DIR})")
    p.add_argument("--config", metavar="FILE",
                   help="the vbdfs config file the provider reads (store, mountpoint, node); "
                        "default: $VBDFS_CONFIG as noded has it, else /etc/vbdfs/vbdfs.toml")
    p.add_argument("--python", metavar="PATH",
                   help="the interpreter the scripts run (default: the one running vbdctl)")
    p.set_defaults(func=cmd_install)


def cmd_install(ctx, args):
    from .. import ganeti
    for path in ganeti.install(args.dir, python=args.python, config=args.config):
        print(path)
