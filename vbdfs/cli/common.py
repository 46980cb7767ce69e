"""What every vbdctl subcommand shares: the context, output and error types."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import Config, ConfigError
from ..images import ImageError
from ..store import InvalidName, ManifestError, NoSuchDisk, Store, StoreError, UnsafePath
from ..store.locks import LockBusy
from ..store.names import quoted


class VbdctlError(Exception):
    """A command failed; the message names what and why."""


# Exceptions that end a command with exit status 1 and their message.
ERRORS = (VbdctlError, ConfigError, StoreError, ManifestError, NoSuchDisk, InvalidName, UnsafePath,
          ImageError, LockBusy, OSError)


LINE_LIMIT = 600    # characters of one error line, at most (room for a few long paths)
WORD_LIMIT = 160    # a longer word (a pasted blob, 5,000 digits) is summarised


def one_line(message) -> str:
    """An error message as one line of sane length: control characters
    escaped, each overlong word cut to its ends and its length, and the middle
    of an overlong line dropped. Messages quote what was given, which can be
    anything; the line stays readable and the cause (usually at the end) stays.
    """
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
    line = " ".join(w if len(w) <= WORD_LIMIT else f"{w[:32]}...{w[-12:]} ({len(w)} characters)"
                    for w in text.split(" "))
    if len(line) > LINE_LIMIT:
        half = LINE_LIMIT // 2 - 20
        line = f"{line[:half]} ... ({len(line)} characters) ... {line[-half:]}"
    return line


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one short line and exit status 2."""

    def parse_args(self, args=None, namespace=None):
        args, extra = self.parse_known_args(args, namespace)
        if extra:       # named by the first, counted: not echoed whole
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            self.error(f"unrecognized argument {quoted(extra[0])}{more}")
        return args

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


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
