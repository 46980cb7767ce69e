"""Storage-path safety, as Ganeti enforces it for file-based disks, in one place.

A custom directory must be absolute, free of '..', not under a system
directory, and strictly below a directory listed in the whitelist file.
"""

from __future__ import annotations

import os

from ..log import get_logger

log = get_logger(__name__)


class UnsafePath(ValueError):
    pass


_FORBIDDEN = ["/boot", "/dev", "/etc", "/home", "/proc", "/root", "/sys"]
for _base in ("/", "/usr", "/usr/local"):
    for _sub in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        _FORBIDDEN.append(os.path.join(_base, _sub))
FORBIDDEN_PREFIXES = tuple(_FORBIDDEN)


def normalise(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty path")
    if "\0" in path:
        raise UnsafePath(f"path {path!r} contains a NUL byte")
    if not os.path.isabs(path):
        raise UnsafePath(f"path {path!r} is not absolute")
    if ".." in path.split("/"):
        raise UnsafePath(f"path {path!r} contains '..'")
    return os.path.normpath(path)


def is_below(path: str, root: str, strictly: bool = True) -> bool:
    """path inside root, compared on normalised paths with a trailing '/'."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    if not strictly and path == root:
        return True
    return (path + "/").startswith(root.rstrip("/") + "/") and path != root


def check_not_forbidden(path: str) -> str:
    path = normalise(path)
    for prefix in FORBIDDEN_PREFIXES:
        if is_below(path, prefix, strictly=False):
            raise UnsafePath(f"path {path} is under the forbidden directory {prefix}")
    return path


def read_whitelist(filename: str) -> list[str]:
    """Absolute directories, one per line; '#' comments; relative lines ignored."""
    try:
        with open(filename, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not os.path.isabs(line):
            log.warning("%s:%d: ignoring relative path %r", filename, n, line)
            continue
        out.append(os.path.normpath(line))
    return out


def check_custom_dir(path: str, whitelist_file: str) -> str:
    """A custom storage directory: allowed only strictly below a whitelisted one.

    Checked as written and as resolved (a symlink in a whitelisted directory
    must not lead to /etc); the resolved path is returned, so what is later
    created or removed is what was checked.
    """
    path = check_not_forbidden(path)
    real = os.path.realpath(path)
    if real != path:
        try:
            check_not_forbidden(real)
        except UnsafePath as e:
            raise UnsafePath(f"custom storage path {path} leads through a symlink to "
                             f"{real}: {e}") from None
    allowed = read_whitelist(whitelist_file)
    if not allowed:
        raise UnsafePath(f"custom storage path {path} refused: {whitelist_file} "
                         "lists no allowed directory")
    for root in allowed:
        if is_below(path, root) and is_below(real, os.path.realpath(root)):
            return real
    if any(is_below(path, root) for root in allowed):
        raise UnsafePath(f"custom storage path {path} leads through a symlink to {real}, "
                         f"which is not strictly below any directory listed in "
                         f"{whitelist_file}")
    raise UnsafePath(f"custom storage path {path} is not strictly below any directory "
                     f"listed in {whitelist_file} ({', '.join(allowed)})")


def join_below(root: str, *names: str) -> str:
    """root/names... with a check that the result is strictly below root."""
    for name in names:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise UnsafePath(f"bad path component {name!r}")
    path = os.path.join(root, *names)
    if not is_below(path, root):
        raise UnsafePath(f"{path} is not below {root}")
    return path
