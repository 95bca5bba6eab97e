"""systemd's readiness protocol (``sd_notify``) without libsystemd.

With ``Type=notify`` systemd considers the service started only when it receives ``READY=1``
on the datagram socket named in ``$NOTIFY_SOCKET``; ``STATUS=`` lines show up in
``systemctl status meshd``. Outside systemd the variable is absent and every call is a no-op,
so the daemon can call these unconditionally. Failures to send are logged, never raised: a
broken notification socket must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | bytes | None:
    """The socket address: a filesystem path, or an abstract-namespace name written ``@name``."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract socket (@name)", path)
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (newline-separated ``KEY=value`` assignments). True if it was sent."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], exc)
        return False


def ready(status_text: str | None = None) -> bool:
    """The API listens and a plan is committed: systemd may now report the unit as started."""
    msg = "READY=1"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def status(text: str) -> bool:
    """A one-line human status, shown by ``systemctl status meshd``."""
    return notify("STATUS=" + _one_line(text))


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    """Announce a reload; systemd >= 253 wants the monotonic timestamp with it."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog() -> bool:
    """Pet the watchdog (only meaningful when the unit sets ``WatchdogSec=``)."""
    return notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pets (half of ``WatchdogSec=``), or None when no watchdog is asked for us.

    systemd sets ``WATCHDOG_USEC`` and, to say it is meant for this process, ``WATCHDOG_PID``.
    """
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


async def watchdog_loop(alive=lambda: True) -> None:
    """Pet the watchdog while ``alive()`` holds; returns at once when no watchdog is configured.

    Run it as a task; when the event loop stalls, the pets stop and systemd restarts the daemon.
    """
    import asyncio

    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if alive():
            watchdog()
        await asyncio.sleep(interval)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
