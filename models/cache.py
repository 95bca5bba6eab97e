"""meshd's on-disk cache directory (tokenizers converted from GGUF, measured cost curves and profiles).

It follows the XDG base directory convention, ``$XDG_CACHE_HOME/meshd`` (``~/.cache/meshd`` when the
variable is unset or empty), so every cache the project writes is found, and cleared, in one place.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/meshd/<parts...>``; nothing is created here (writers make what they need)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "meshd", *parts)
