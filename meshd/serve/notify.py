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

log = logging.getLogger(__name__)


def _address() -> str | bytes | None:
    """The socket address: a filesystem path, or an abstract-namespace name written ``@name``."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract socket (@name)", path)
    return None


def notify(state: str) -> bool:
    """Send one notification (newline-separated ``KEY=value`` assignments). True if it was sent."""
    addr = _address()
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
    """The daemon is shutting down: systemd shows the unit as deactivating, not failed."""
    return notify("STOPPING=1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def watchdog_interval() -> float | None:
    """Seconds between keep-alive pings when the unit sets ``WatchdogSec=`` (half systemd's timeout), else None.

    systemd exports ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be this process) to the service."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None


def watchdog() -> bool:
    """This daemon is alive: its event loop runs and its torch thread answers. Without these pings systemd
    restarts the unit after ``WatchdogSec``."""
    return notify("WATCHDOG=1")
