"""The Ganeti ExtStorage provider: Ganeti's environment in, one volume operation out.

Ganeti's node daemon runs a provider's scripts (ganeti-extstorage-interface(7))
as root, with no arguments, in the provider's directory, with the volume in the
environment: always VOL_NAME (`<uuid>.ext.disk<N>`) and EXTP_<NAME> for each
disk parameter (EXTP_PROVIDER, EXTP_ACCESS and the user's, which Ganeti does
not check); VOL_SIZE (create) and VOL_NEW_SIZE (grow) in MiB; VOL_METADATA
(setinfo); VOL_OPEN_EXCLUSIVE (open); VOL_SNAPSHOT_NAME (snapshot).

The scripts are shims that run `python -m vbdfs.ganeti ACTION` (install()
writes them). Each function here reads its action's variables, calls one
function of operations/volumes.py, prints what Ganeti reads (attach: the
block device, then URIs) and returns; errors become exit status 1 and one
stderr line naming the volume, in run(). No paths, leases or manifests here.
The store is loaded only when an action needs it: see volumes.attach.
"""

from __future__ import annotations

import os
import sys
import time

from .config import ConfigError, load as load_config
from .operations import volumes


def known_errors() -> tuple:
    """Exceptions that end an action with exit status 1 and their message."""
    from .images import ImageError
    from .store import InvalidName, ManifestError, NoSuchDisk, StoreError, UnsafePath
    from .store.locks import LockBusy
    return (volumes.VolumeError, ConfigError, StoreError, ManifestError, NoSuchDisk,
            InvalidName, UnsafePath, ImageError, LockBusy, OSError)


CALL_LOG = "/var/log/ganeti/extstorage/vbdfs-calls.log"


class Volume:
    """One call's volume, parameters and node settings, read from the environment."""

    def __init__(self, env):
        self.env = env
        self.name = env.get("VOL_NAME", "")
        if not self.name:
            raise volumes.VolumeError("VOL_NAME is not set: run by Ganeti's noded?")
        self.params = {k[5:].lower(): v for k, v in env.items() if k.startswith("EXTP_")}
        self.cfg = load_config(use_env=True, env=env)
        self.mountpoint = self.cfg.mountpoint
        self.node = self.cfg.node
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from .store import Store
            self._store = Store(self.cfg.store, self.cfg.file_storage_paths)
        return self._store

    def checked_params(self) -> dict[str, str]:
        return volumes.check_params(self.params)

    def access(self) -> str:
        return volumes.access_mode(self.params)

    def mib(self, var: str) -> int:
        value = self.env.get(var, "")
        if not value.isdigit():
            raise volumes.VolumeError(f"{var}={value!r} is not a size in MiB")
        return int(value)


def create(v: Volume, out) -> None:
    volumes.create(v.store, v.name, v.mib("VOL_SIZE"), v.params)


def attach(v: Volume, out) -> None:
    for line in volumes.attach(lambda: v.store, v.mountpoint, v.node, v.name, v.access()):
        out.write(line + "\n")


def detach(v: Volume, out) -> None:
    volumes.detach(v.store, v.mountpoint, v.node, v.name)


def remove(v: Volume, out) -> None:
    volumes.remove(v.store, v.mountpoint, v.node, v.name)


def grow(v: Volume, out) -> None:
    v.checked_params()
    volumes.grow(v.store, v.mountpoint, v.name, v.mib("VOL_NEW_SIZE"))


def setinfo(v: Volume, out) -> None:
    v.checked_params()
    volumes.setinfo(v.store, v.name, v.env.get("VOL_METADATA", ""))


def verify(v: Volume, out) -> None:
    volumes.verify(v.params)


def snapshot(v: Volume, out) -> None:
    v.checked_params()
    volumes.snapshot(v.store, v.mountpoint, v.name,
                     v.env.get("VOL_SNAPSHOT_NAME") or v.name + ".snap", v.node)


def open_(v: Volume, out) -> None:
    v.checked_params()
    exclusive = v.env.get("VOL_OPEN_EXCLUSIVE", "True")
    if exclusive not in ("True", "False"):
        raise volumes.VolumeError(f"VOL_OPEN_EXCLUSIVE={exclusive!r} is not True or False")
    volumes.open_volume(v.store, v.mountpoint, v.node, v.name, exclusive == "True", v.access())


def close(v: Volume, out) -> None:
    volumes.close_volume(v.store, v.mountpoint, v.name)


# action -> function; every one is a script in the provider directory.
ACTIONS = {"create": create, "attach": attach, "detach": detach, "remove": remove,
           "grow": grow, "setinfo": setinfo, "verify": verify, "snapshot": snapshot,
           "open": open_, "close": close}


def run(action: str, env=None, out=None, err=None) -> int:
    """Run one action as Ganeti would; return the exit status."""
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    started = time.monotonic()
    status = 1
    try:
        if action not in ACTIONS:
            err.write(f"vbdfs: unknown action {action!r} (one of {', '.join(ACTIONS)})\n")
            status = 2
            return status
        ACTIONS[action](Volume(env), out)
        status = 0
    except Exception as e:             # noqa: the known ones end here, the rest propagate
        if not isinstance(e, known_errors()):
            raise
        err.write(f"vbdfs: volume {env.get('VOL_NAME') or '?'}: {action}: {e}\n")
    finally:
        _log_call(env, action, time.monotonic() - started, status)
    return status


def _log_call(env, action: str, seconds: float, status: int) -> None:
    """One line per call, for timing Ganeti's operations (Ganeti keeps no log of attach)."""
    path = env.get("VBDFS_GANETI_LOG", CALL_LOG)
    if not path or not os.path.isdir(os.path.dirname(path)):
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}"
    line = (f"{stamp}Z {action} {env.get('VOL_NAME') or '?'} {seconds * 1000:.1f}ms "
            f"exit={status}\n")
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError:
        pass                           # a full log must not fail the action


# --- the provider directory -------------------------------------------------------
SHIM = """#!/bin/sh
# Ganeti ExtStorage provider script, written by `vbdctl ganeti-install` (see
# vbdfs's README, "Ganeti"). noded runs it with a minimal PATH: absolute paths only.
export PYTHONPATH={pythonpath}
{config}exec {python} -m vbdfs.ganeti {action}
"""


def install(directory: str, python: str | None = None, config: str | None = None) -> list[str]:
    """Write the provider directory (its name is the provider's name); return the files.

    The shims run `python` (default: this interpreter) with this vbdfs package
    on its path, so Ganeti runs the code that installed them. config becomes
    the default of VBDFS_CONFIG.
    """
    import shlex
    from .images.fileops import write_atomic
    python = python or sys.executable
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise ConfigError(f"{python}: not an absolute path to an executable interpreter")
    if config is not None:
        config = os.path.abspath(config)
        load_config(config)            # refuse a broken file now, not at Ganeti's first call
    pythonpath = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    config_line = (f'if [ -z "$VBDFS_CONFIG" ]; then export VBDFS_CONFIG={shlex.quote(config)}; '
                   'fi\n' if config is not None else "")
    written = []
    for action in ACTIONS:
        path = os.path.join(directory, action)
        write_atomic(path, SHIM.format(pythonpath=shlex.quote(pythonpath),
                                       config=config_line, python=shlex.quote(python),
                                       action=action).encode())
        os.chmod(path, 0o755)
        written.append(path)
    path = os.path.join(directory, "parameters.list")
    write_atomic(path, "".join(f"{name} {desc}\n"
                               for name, desc in volumes.PARAMETERS.items()).encode())
    os.chmod(path, 0o644)
    written.append(path)
    return written


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) == 2 else ""))
