"""Settings shared by the daemon and vbdctl.

Precedence, lowest first: built-in defaults, the config file
(/etc/vbdfs/vbdfs.toml, or $VBDFS_CONFIG), the environment (VBDFS_STORE,
VBDFS_MOUNTPOINT, VBDFS_NODE; vbdctl only), command-line flags.
"""

from __future__ import annotations

import os
import types

DEFAULT_CONFIG = "/etc/vbdfs/vbdfs.toml"


class ConfigError(Exception):
    pass


class Config(types.SimpleNamespace):
    # A SimpleNamespace, not a dataclass: see store/manifest.py's Disk.
    def __init__(self, store: str = "/srv/ganeti/file-storage",
                 mountpoint: str = "/run/vbdfs",
                 node: str | None = None,                  # default: the host name
                 # Ganeti's whitelist of directories allowed for custom file storage paths.
                 file_storage_paths: str = "/etc/ganeti/file-storage-paths",
                 # How vbdctl failover stops and starts a domain ({instance}, {primary}, {target}).
                 stop_command: str = "xl shutdown -w {instance}",
                 start_command: str = "xl create /etc/xen/{instance}.cfg"):
        super().__init__(store=store, mountpoint=mountpoint,
                         node=os.uname().nodename if node is None else node,
                         file_storage_paths=file_storage_paths, stop_command=stop_command,
                         start_command=start_command)

    def override(self, **values) -> "Config":
        """A copy with every non-None value replaced."""
        return Config(**{**vars(self), **{k: v for k, v in values.items() if v is not None}})


_ENV = {"store": "VBDFS_STORE", "mountpoint": "VBDFS_MOUNTPOINT", "node": "VBDFS_NODE"}


def load(path: str | None = None, use_env: bool = False, env=os.environ) -> Config:
    """Read the config file; a missing default file is not an error, a broken one is."""
    explicit = path is not None or "VBDFS_CONFIG" in env
    path = path or env.get("VBDFS_CONFIG", DEFAULT_CONFIG)
    cfg = Config()
    try:
        with open(path, "rb") as f:
            values = _parse_toml(f, path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        values = {}
    except OSError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    known = set(vars(cfg))
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r} "
                              f"(known: {', '.join(sorted(known))})")
        if not isinstance(value, str) or not (value or key == "stop_command"):
            raise ConfigError(f"config file {path}: {key} must be a non-empty string")
    cfg = cfg.override(**values)
    if use_env:
        cfg = cfg.override(**{k: env.get(v) or None for k, v in _ENV.items()})
    return cfg


def _parse_toml(f, path: str) -> dict:
    import tomllib      # only when there is a file: vbdctl starts faster without it
    try:
        return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
