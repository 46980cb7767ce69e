"""Names of instances and disks. A name that passes here is one path component."""

from __future__ import annotations

import re

MAX_NAME = 200   # well under NAME_MAX (255) so temp names still fit

# Ganeti instance names are host names; allow that and a little more, nothing
# that a shell, a path or a Xen config line could misread.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")


class InvalidName(ValueError):
    pass


def quoted(text, limit: int = 32) -> str:
    """repr(text) for a message; only its start if long: a typo or a pasted
    blob of 5,000 characters, the error stays one short line."""
    if not isinstance(text, str) or len(text) <= limit:
        return repr(text)
    return f"{text[:limit - 8]!r}... ({len(text)} characters)"


def check_instance_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("instance name is empty")
    if "\0" in name:
        raise InvalidName("instance name contains a NUL byte")
    if "/" in name:
        raise InvalidName(f"instance name {quoted(name)} contains '/'")
    if name in (".", "..") or ".." in name:
        raise InvalidName(f"instance name {quoted(name)} contains '..'")
    if name.startswith("."):
        raise InvalidName(f"instance name {quoted(name)} starts with '.'")
    if len(name) > MAX_NAME:
        raise InvalidName(f"instance name is {len(name)} characters long (at most {MAX_NAME})")
    if not _NAME_RE.match(name):
        raise InvalidName(f"instance name {quoted(name)} has characters other than "
                          "letters, digits, '.', '_', '+' and '-'")
    return name


def disk_name(index: int, prefix: str = "sd") -> str:
    """sda, sdb, ..., sdz, sdaa, ... as Linux names disks by index."""
    if index < 0:
        raise InvalidName(f"negative disk index {index}")
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return prefix + letters


def disk_index(name: str, prefix: str = "sd") -> int:
    """Inverse of disk_name; InvalidName if name is not one."""
    if not name.startswith(prefix) or not name[len(prefix):].isalpha() \
            or not name[len(prefix):].islower() or not name[len(prefix):].isascii():
        raise InvalidName(f"{quoted(name)} is not a disk name ({prefix}a, {prefix}b, ...)")
    n = 0
    for c in name[len(prefix):]:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1
