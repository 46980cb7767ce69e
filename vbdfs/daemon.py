"""The vbdfs daemon: mount the store as a FUSE filesystem.

    vbdfs [STORE MOUNTPOINT] [-f] [-o OPTIONS]

follows the convention of FUSE filesystems (sshfs, s3ql), so that
`mount -t fuse.vbdfs STORE MOUNTPOINT` and /etc/fstab lines work: mount.fuse3
runs `vbdfs STORE MOUNTPOINT -o OPTIONS`. Without -f it daemonizes once the
filesystem is mounted, so a failure is reported to the caller.

Stopping never pulls a disk from under its user: on SIGTERM, SIGINT or
SIGHUP the daemon unmounts only if no disk is open or attached; otherwise it
logs which disks hold it and by what, keeps serving, and unmounts (a normal,
non-lazy umount, so the kernel has the last word) once they are all closed.
SIGUSR1 (`vbdctl daemon-stop --force`) flushes and unmounts at once, in use
or not. Started on a mount point where a dead vbdfs mount of its store was
left behind by a crash, it cleans that up first (operations/recover.py).
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
from .operations import attach, holders, recover
from .store import Store, StoreError

log = logging.getLogger("vbdfs")

# Generic mount(8) options that mount.fuse3 or fstab may hand us: not ours to act on.
IGNORED_OPTIONS = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users",
                   "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async",
                   "atime", "noatime", "relatime", "nofail", "_netdev"}
FUSE_FLAGS = {"allow_other", "allow_root"}
VALUED_OPTIONS = {"node", "config", "whitelist", "io"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORCE_SIGNAL = signal.SIGUSR1
# While a stop waits for disks to be closed: how often to look again.
STOP_POLL = 1.0
HOLDERS_TIMEOUT = 5.0


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
               "/etc/vbdfs/vbdfs.toml (or $VBDFS_CONFIG). SIGTERM, SIGINT or SIGHUP unmount once "
               "no disk is open or attached (until then the daemon logs what holds them "
               "and keeps serving); SIGUSR1 unmounts at once (vbdctl daemon-stop --force).")
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


def check_paths(store: str, mountpoint: str) -> str | None:
    """Refuse a bad store or mount point; clean a dead vbdfs mount (say so)."""
    if not os.path.isdir(store):
        raise StartError(f"store {store} does not exist or is not a directory")
    try:
        cleaned = recover.clean_dead_mount(store, mountpoint)
    except StoreError as e:
        raise StartError(str(e)) from None
    if not os.path.isdir(mountpoint):
        raise StartError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise StartError(f"mount point {mountpoint} is busy: something is already mounted there")
    if os.path.realpath(mountpoint).startswith(os.path.realpath(store).rstrip("/") + "/"):
        raise StartError(f"mount point {mountpoint} is inside the store {store}")
    return cleaned


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


class Stopper:
    """Stops the daemon on a signal, but not while a disk is open or attached."""

    def __init__(self, ops: VbdFs, mountpoint: str):
        self.ops = ops
        self.mountpoint = mountpoint
        self.forced = False            # the main loop ends by terminate(): unmount lazily
        self._seen = None              # what held the mount when last logged
        self._umount_error = None

    def _in_use(self) -> tuple:
        """Cheap: the disks the daemon has open and the loop devices on the mount."""
        loops = [back for _, back, _ in attach.loop_list()
                 if back in holders.Under(self.mountpoint)]
        return tuple(sorted(self.ops.open_disks())), tuple(sorted(loops))

    async def _holders(self, open_disks) -> list[str]:
        """What holds the disks, found in a thread: reading /proc of a process
        blocked on this very mount must not stop the daemon serving it."""
        with trio.move_on_after(HOLDERS_TIMEOUT):
            return holders.describe(await trio.to_thread.run_sync(
                holders.mount_holders, self.mountpoint, open_disks, abandon_on_cancel=True))
        return [f"{inst}/{disk}: (looking for its holder timed out)" for inst, disk in open_disks]

    async def _log_holders(self, key: tuple) -> None:
        if key == self._seen:
            return
        self._seen = key
        held = await self._holders(key[0])
        log.warning("not unmounting %s: %d disk(s) in use; serving on until they are "
                    "closed (vbdctl daemon-stop --force pulls them)", self.mountpoint, len(held))
        for line in held:
            log.warning("in use: %s", line)

    async def _unmount(self) -> bool:
        """A plain umount: the kernel refuses it (EBUSY) if anything opened a disk meanwhile."""
        tool = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
        r = await trio.run_process([*tool, self.mountpoint], capture_stderr=True, check=False)
        error = r.stderr.decode(errors="replace").strip()
        if r.returncode != 0 and error != self._umount_error:
            log.warning("still serving: %s", error)
        self._umount_error = error
        return r.returncode == 0

    async def run(self) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS, FORCE_SIGNAL) as signals:
            pending = False
            while True:
                with trio.move_on_after(STOP_POLL if pending else float("inf")):
                    sig = await signals.__anext__()
                    if sig == FORCE_SIGNAL:
                        return await self._force()
                    log.info("got %s: stopping once no disk is in use",
                             signal.Signals(sig).name)
                    pending, self._seen = True, None
                if pending:
                    key = self._in_use()
                    if not any(key):
                        if self._umount_error is None:
                            log.info("no disk in use: unmounting %s", self.mountpoint)
                        if await self._unmount():
                            return     # the kernel ends the session: pyfuse3.main returns
                        key = self._in_use()
                    if any(key):
                        await self._log_holders(key)

    async def _force(self) -> None:
        held = await self._holders(self.ops.open_disks())
        log.warning("forced stop: unmounting %s%s", self.mountpoint,
                    "; pulling disks in use: " + " | ".join(held) if held else "")
        self.forced = True
        pyfuse3.terminate()


def report_background_limit() -> None:
    """Say whether the kernel may send this mount more than 12 asynchronous
    requests at once (VbdFs.max_background, which only the patched pyfuse3
    passes on at mount)."""
    if hasattr(pyfuse3.Operations, "max_background"):
        log.info("FUSE max_background %d (kernel default 12)", VbdFs.max_background)
    else:
        log.warning("FUSE max_background stays at the kernel's default (12 requests in "
                    "flight, a guest's deeper queue waits): this pyfuse3 lacks "
                    "patches/pyfuse3-*-max-background.patch (run tools/setup)")


async def serve(stopper: Stopper) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopper.run)
        # Each task holds at most one request: this bounds memory (see iopath.py).
        await pyfuse3.main(max_tasks=iopath.MAX_TASKS, **fuseloop.main_options())
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
        cleaned = check_paths(store_dir, mountpoint)
    except StartError as e:
        print(f"vbdfs: {e}", file=sys.stderr)
        return 1

    real_mountpoint = os.path.realpath(mountpoint)   # as loop devices name their files
    setup_logging(args.foreground, opts["debug"])
    if cleaned:
        log.warning("%s", cleaned)
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
    report_background_limit()
    log.info("serving %s at %s as node %s", store_dir, mountpoint, cfg.node)
    stopper = Stopper(ops, real_mountpoint)
    unmount = False        # a clean stop unmounted already: the kernel ended the session
    try:
        trio.run(serve, stopper)
        unmount = stopper.forced
    except BaseException:
        unmount = True
        log.exception("vbdfs failed; unmounting")
        raise
    finally:
        ops.close_all()
        pyfuse3.close(unmount=unmount)
        log.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
