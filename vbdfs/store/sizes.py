"""Disk sizes as people type them: "5G", "512M", "1.5T"; a bare number is MiB.

Like Ganeti's ParseUnit: binary units M, G, T (also MB/MiB, ...; any case),
an optional fraction, a bare number means MiB, the result is rounded up to
a whole MiB. Unlike it, we do not round up to 4 MiB (an LVM extent): a file
has no extents. Zero, negative and unparsable sizes are refused with a
message that quotes the input.
"""

from __future__ import annotations

import re

from .manifest import MAX_SIZE
from .names import quoted

MiB = 1 << 20
_UNITS = {"m": 1, "g": 1 << 10, "t": 1 << 20}   # in MiB
# ASCII only: int() also reads other scripts' digits ("\u0665" is 5).
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?) *([A-Za-z]{0,3})\Z", re.ASCII)
MAX_DIGITS = 24   # more than any size up to MAX_SIZE needs; int() of 5,000 digits fails


class SizeError(ValueError):
    """A size argument is malformed; the message quotes it."""


def parse_size(text: str, what: str = "size") -> int:
    """Bytes for a positive size such as '5G'; a bare number is MiB."""
    if not isinstance(text, str):
        raise SizeError(f"{what} {quoted(text)} is not a string")
    s = text.strip()
    if s.startswith("-"):
        raise SizeError(f"{what} {quoted(text)} is negative")
    m = _SIZE_RE.match(s)
    if not m:
        raise SizeError(f"{what} {quoted(text)} is not a number with an optional unit "
                        "M, G or T (a bare number is MiB)")
    number, unit = m.groups()
    if len(number) > MAX_DIGITS:
        whole = number.partition(".")[0].lstrip("0")
        # 14 digits of MiB (the smallest unit) are past MAX_SIZE already.
        raise SizeError(f"{what} {quoted(text)} is too large" if len(whole) > 13
                        else f"{what} {quoted(text)} has too many digits")
    key = unit.lower()
    if key in ("mb", "mib", "gb", "gib", "tb", "tib"):
        key = key[0]
    if key == "":
        key = "m"
    if key not in _UNITS:
        raise SizeError(f"{what} {quoted(text)} has an unknown unit {quoted(unit)} "
                        "(use M, G or T; a bare number is MiB)")
    # Exact arithmetic on the decimal digits: no float rounding for "1.1G".
    whole, _, frac = number.partition(".")
    scale = 10 ** len(frac)
    mib_times_scale = int(whole + frac) * _UNITS[key]
    mib = -(-mib_times_scale // scale)        # round up to a whole MiB
    if mib == 0:
        raise SizeError(f"{what} {quoted(text)} is zero")
    if mib * MiB > MAX_SIZE:
        raise SizeError(f"{what} {quoted(text)} is too large")
    return mib * MiB


def parse_growth(text: str) -> int:
    """Bytes to add for `grow`: '+5G' or '5G'. Disks never shrink."""
    s = text.strip() if isinstance(text, str) else text
    if isinstance(s, str) and s.startswith("-"):
        raise SizeError(f"growth {quoted(text)} is negative: disks can only grow")
    if isinstance(s, str) and s.startswith("+"):
        s = s[1:]
    return parse_size(s, what="growth")
