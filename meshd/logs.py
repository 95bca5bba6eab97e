"""Log lines for a terminal or for journald, decided once at start-up.

Under systemd (``$JOURNAL_STREAM`` names the very file stderr is, as systemd documents), every
line starts with its syslog priority, ``<4>`` for a warning, which journald strips and stores as
the entry's priority (``journalctl -p warning`` finds it); no timestamp, since the journal keeps
its own. In a terminal or a pipe: ``time LEVEL logger: message``. A multi-line record (a
traceback) carries the prefix on each line, so journald files none of it as ``info``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """RFC 5424 severity of a Python log level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def under_journald(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (not a redirect made later)."""
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (pytest's capture, StringIO)
        return False
    return (str(st.st_dev), str(st.st_ino)) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``, the prefix repeated on every line of the record."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def configure(level: int | str, stream: TextIO | None = None, env: Mapping[str, str] = os.environ) -> None:
    """The root logger writes to ``stream`` (stderr) at ``level``, formatted for where it goes."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    journal = under_journald(stream, env)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
