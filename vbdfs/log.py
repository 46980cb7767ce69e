"""Loggers that import the logging module when they are first used.

Importing logging (and traceback, tokenize and textwrap, which it imports)
cost every vbdctl command ~7 ms of start-up, a tenth of a small export, and
a command that goes well logs nothing. So the modules vbdctl loads log
through these, and vbdctl's set-up (configure) waits for the first message.
The daemon configures logging itself; these loggers are the same loggers.
"""

from __future__ import annotations

import sys

_pending: dict | None = None     # basicConfig() arguments for the first use


def configure(**basic_config) -> None:
    """logging.basicConfig(**basic_config), done when the first message is
    logged through a Logger here (at once if logging is loaded already)."""
    global _pending
    _pending = basic_config
    if "logging" in sys.modules:
        _logging()


def _logging():
    global _pending
    import logging
    if _pending is not None:
        config, _pending = _pending, None
        logging.basicConfig(**config)
    return logging


class Logger:
    """logging.getLogger(name), looked up on every use (logging is rare here)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        return getattr(_logging().getLogger(self.name), attr)


def get_logger(name: str) -> Logger:
    return Logger(name)
