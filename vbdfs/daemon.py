"""The vbdfs daemon: mount the store as a FUSE filesystem.

    vbdfs [STORE MOUNTPOINT] [-f] [-o OPTIONS]

follows the convention of FUSE filesystems (sshfs, s3ql), so that
`mount -t fuse.vbdfs STORE MOUNTPOINT` and /etc/fstab lines work: mount.fuse3
runs `vbdfs STORE MOUNTPOINT -o OPTIONS`. Without -f it daemonizes once the
filesystem is mounted, so a failure is reported to the caller.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import sys

import pyfuse3
import trio

from . import config as config_mod
from . import fuseloop, iopath
from .fs import VbdFs
from .store import Store

log = logging.getLogger("vbdfs")

# Generic mount(8) options that mount.fuse3 or fstab may hand us: not ours to act on.
IGNORED_OPTIONS = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users",
                   "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async",
                   "atime", "noatime", "relatime", "nofail", "_netdev"}
FUSE_FLAGS = {"allow_other", "allow_root"}
VALUED_OPTIONS = {"node", "config", "whitelist", "io"}


class UsageError(Exception):
    pass


class StartError(Exception):
    pass


def parse_options(opts: list[str]) -> dict:
    """-o a,b=c,... into a dict; unknown options are a usage error."""
    out: dict = {"fuse": set(), "debug": False}
    for group in opts:
        for item in group.split(","):
            item = item.strip()
            if not item or item in IGNORED_OPTIONS or item.startswith(("x-systemd.", "comment=")):
                continue
            name, eq, value = item.partition("=")
            if name in FUSE_FLAGS and not eq:
                out["fuse"].add(name)
            elif name == "debug" and not eq:
                out["debug"] = True
            elif name == "io" and value not in iopath.MODES:
                raise UsageError(f"io={value}: the I/O mode is one of "
                                 f"{', '.join(iopath.MODES)}")
            elif name in VALUED_OPTIONS and eq and value:
                out[name] = value
            else:
                raise UsageError(f"unknown mount option {item!r}")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="vbdfs",
        description="Serve a vbdfs store (raw and qcow2 disk images) as raw files over FUSE.",
        epilog="Options for -o: allow_other, allow_root, node=NAME, config=FILE, "
               "whitelist=FILE, debug, io=auto|inline|threads (how disk I/O runs: "
               "inline on the daemon's thread, in worker threads so that requests "
               "overlap on a slow store, or auto: threads only for requests that "
               "would wait; default auto); generic mount options (rw, nosuid, nodev, "
               "_netdev, x-systemd.*, ...) are accepted and ignored. Defaults come from "
               "/etc/vbdfs/vbdfs.toml (or $VBDFS_CONFIG).")
    p.add_argument("store", nargs="?", help="the storage directory (default from the config file)")
    p.add_argument("mountpoint", nargs="?", help="where to mount (default from the config file)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground, log to stderr")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated mount options")
    args = p.parse_args(argv)
    if (args.store is None) != (args.mountpoint is None):
        p.error("give both STORE and MOUNTPOINT, or neither")
    try:
        args.opts = parse_options(args.options)
    except UsageError as e:
        p.error(str(e))
    return args


def check_paths(store: str, mountpoint: str) -> None:
    if not os.path.isdir(store):
        raise StartError(f"store {store} does not exist or is not a directory")
    if not os.path.isdir(mountpoint):
        raise StartError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise StartError(f"mount point {mountpoint} is busy: something is already mounted there")
    if os.path.realpath(mountpoint).startswith(os.path.realpath(store).rstrip("/") + "/"):
        raise StartError(f"mount point {mountpoint} is inside the store {store}")


def setup_logging(foreground: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("vbdfs[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def daemonize() -> None:
    """Detach from the terminal after the mount succeeded; the parent exits 0."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def serve(ops: VbdFs) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    log.info("got %s, unmounting", signal.Signals(sig).name)
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop_on_signal)
        # Each task holds at most one request: this bounds memory (see iopath.py).
        await pyfuse3.main(max_tasks=iopath.MAX_TASKS)
        nursery.cancel_scope.cancel()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    opts = args.opts
    try:
        cfg = config_mod.load(opts.get("config"))
    except config_mod.ConfigError as e:
        print(f"vbdfs: {e}", file=sys.stderr)
        return 1
    cfg = cfg.override(store=args.store, mountpoint=args.mountpoint, node=opts.get("node"),
                       file_storage_paths=opts.get("whitelist"))
    store_dir, mountpoint = os.path.realpath(cfg.store), os.path.abspath(cfg.mountpoint)
    try:
        check_paths(store_dir, mountpoint)
    except StartError as e:
        print(f"vbdfs: {e}", file=sys.stderr)
        return 1

    setup_logging(args.foreground, opts["debug"])
    ops = VbdFs(Store(store_dir, cfg.file_storage_paths), node=cfg.node,
                io_mode=opts.get("io", "auto"))
    fuse_options = set(pyfuse3.default_options) | opts["fuse"]
    fuse_options |= {f"fsname={store_dir}", "subtype=vbdfs"}
    if opts["debug"]:
        fuse_options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError as e:
        print(f"vbdfs: cannot mount {mountpoint}: {e}", file=sys.stderr)
        return 1
    if not args.foreground:
        daemonize()
    fuseloop.install()
    log.info("serving %s at %s as node %s", store_dir, mountpoint, cfg.node)
    unmount = True
    try:
        trio.run(serve, ops)
    except BaseException:
        log.exception("vbdfs failed; unmounting")
        raise
    finally:
        ops.close_all()
        pyfuse3.close(unmount=unmount)
        log.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
