"""Progress lines of the offline training commands, on stderr with a timestamp (runs take hours)."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[train-draft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
