"""Human-readable byte sizes, both ways, and the OS's idea of free memory.

The planner's errors and the ``--memory`` option speak the same units, so a user can copy
the missing amount from an error straight into a flag.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``2GiB``, ``512MiB``, ``1.5G`` or a plain byte count into bytes.

    Decimal units (kB, MB, GB) are powers of 1000 and binary ones (KiB, MiB, GiB) powers of 1024,
    as on the tin; a bare number is bytes.
    """
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: write a number with an optional unit, e.g. 2GiB, 512MiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Binary units with one decimal: what a user compares with ``free -h``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes: the kernel's estimate of what can be used without swapping."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable line in {meminfo}; pass the budget explicitly, e.g. --memory 2GiB")


def default_memory_budget(fraction: float = 0.6) -> int:
    """A share of free memory, leaving room for the OS, the tokenizer and activations."""
    return int(available_memory() * fraction)
