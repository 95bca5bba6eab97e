"""Clients of a running daemon: ``meshd chat``, ``query`` and ``status`` over its REST API.

``http`` talks to the daemon, ``commands`` runs the three commands, ``statusview`` renders
``meshd status``; their flags are defined in ``meshd.cli``.
"""

import os

DEFAULT_PEER = "http://127.0.0.1:8090"


def default_peer() -> str:
    """The daemon the commands talk to unless told otherwise: ``$MESHD_PEER``, else the local one."""
    return os.environ.get("MESHD_PEER") or DEFAULT_PEER
