"""meshd: serve one LLM from a mesh of small edge devices."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("meshd")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
