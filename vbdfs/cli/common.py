"""What every vbdctl subcommand shares: the context, output and error types."""

from __future__ import annotations

import json
import sys

from ..config import Config, ConfigError
from ..images import ImageError
from ..store import InvalidName, ManifestError, NoSuchDisk, Store, StoreError, UnsafePath
from ..store.locks import LockBusy


class VbdctlError(Exception):
    """A command failed; the message names what and why."""


# Exceptions that end a command with exit status 1 and their message.
ERRORS = (VbdctlError, ConfigError, StoreError, ManifestError, NoSuchDisk, InvalidName, UnsafePath,
          ImageError, LockBusy, OSError)


class Context:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.store, config.file_storage_paths)

    @property
    def mountpoint(self) -> str:
        return self.config.mountpoint

    @property
    def node(self) -> str:
        return self.config.node


def add_output_option(parser) -> None:
    parser.add_argument("--output", choices=("text", "json"), default="text",
                        help="text for people (default) or json for scripts")


def emit_json(obj, file=None) -> None:
    file = file or sys.stdout
    json.dump(obj, file, indent=2, sort_keys=True)
    file.write("\n")


def print_table(rows: list[list], header: list[str]) -> None:
    """Columns padded to their widest cell, like `gnt-instance list`."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def human_size(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024
