"""The REST API's defences: who may call it, how many at once, how slowly, and how it stops.

A daemon on a home or lab network listens to everyone on it, and to every web page its users'
browsers open. So, in front of the handlers of :mod:`meshd.serve.api`:

- **Admission**: at most ``max_concurrent`` generations run at once and ``max_queued`` wait for a
  slot; the next one gets 429 with ``Retry-After`` at once instead of piling up sockets and memory.
- **Browsers**: a request that names a ``Host`` this daemon does not answer to is refused (DNS
  rebinding: a hostile name resolving to 127.0.0.1), and so is a browser's cross-origin request
  (``Origin`` or ``Sec-Fetch-Site``) unless its origin is in the ``cors_origins`` allow-list; the
  daemon's own page (same origin) and non-browser clients (no ``Origin``) pass.
- **Slow clients**: the body must arrive within ``body_timeout`` (408; the socket closes ``LINGER_S``
  later), and a connection that has
  not sent a complete request head within ``header_timeout`` is closed (aiohttp's keep-alive timer,
  which :func:`runner_kwargs` sets, also covers the time before a connection's first request);
  aiohttp's default keeps idle connections for an hour.
- **JSON**: bodies nested deeper than ``MAX_JSON_DEPTH`` are refused with 400, never a 500.
- **Draining**: on SIGTERM new generations get 503 while those in flight finish (``draining``).

Everything here answers in OpenAI's error JSON through the API's error middleware.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from meshd.serve.apischema import ApiError

log = logging.getLogger(__name__)

LINGER_S = 1.0  # long enough for a client to read an early error response, too short to hold sockets
MAX_JSON_DEPTH = 32  # real bodies nest about 4 deep (messages -> content part -> object)
MESH_NAMESPACE = "/mesh/"  # the peers' websocket: it authenticates itself, and peers send no Origin
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class GuardSettings:
    """The limits; the daemon fills them from :class:`meshd.config.Config`."""

    max_concurrent: int = 8
    max_queued: int = 32
    queue_timeout: float = 30.0  # longest a request waits for a slot before 429
    header_timeout: float = 15.0
    body_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()  # exact origins (scheme://host[:port]) browsers may call from; "*": any
    allowed_hosts: tuple[str, ...] = ()  # extra Host names this daemon answers to (beyond its addresses)


@dataclass
class RestGuard:
    """The live state behind the middlewares: slots in use, waiters, draining."""

    settings: GuardSettings = field(default_factory=GuardSettings)
    running: int = 0
    waiting: int = 0
    draining: bool = False
    rejected: int = 0  # 429s

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.max_concurrent)

    @property
    def middlewares(self) -> tuple[Callable, ...]:
        """Installed right inside the API's error middleware, so refusals render as OpenAI errors."""
        return (self._browser_middleware, self._admission_middleware)

    # ---- admission ----------------------------------------------------------------------------
    @web.middleware
    async def _admission_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path.startswith(MESH_NAMESPACE):
            return await handler(request)
        if self.draining:
            raise ApiError(
                503,
                "This daemon is shutting down and takes no new requests; retry on another peer or in a moment.",
                type="service_unavailable",
                code="shutting_down",
                headers={"Retry-After": "5"},
            )
        s = self.settings
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot is taken at once, before the next request is looked at
        elif self.waiting >= s.max_queued:
            raise self._busy(f"{self.running} requests are running and {self.waiting} are queued (the limit)")
        else:
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), s.queue_timeout)
            except asyncio.TimeoutError:
                raise self._busy(f"no slot freed within {s.queue_timeout:.0f} s") from None
            finally:
                self.waiting -= 1
        self.running += 1
        try:
            return await handler(request)
        finally:
            self.running -= 1
            self._slots.release()

    def _busy(self, why: str) -> ApiError:
        self.rejected += 1
        return ApiError(
            429,
            f"This daemon is at capacity: {why}. Retry after a few seconds.",
            type="rate_limit_exceeded",
            code="too_many_requests",
            headers={"Retry-After": "2"},
        )

    async def drain(self, timeout: float, in_flight: Callable[[], int]) -> int:
        """Stop admitting; wait up to ``timeout`` s for requests in flight to finish. Returns those left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self.running or in_flight()) and loop.time() < end:
            await asyncio.sleep(0.05)
        return max(self.running, in_flight())

    # ---- browsers -----------------------------------------------------------------------------
    @web.middleware
    async def _browser_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(MESH_NAMESPACE):
            return await handler(request)
        host = request.headers.get("Host", "")
        if not self._host_ok(request, host):
            raise ApiError(
                421,
                f"This daemon does not answer to the host name {host!r}. Call it by its IP address, or add the "
                "name to allowed_hosts.",
                code="misdirected_request",
            )
        origin = request.headers.get("Origin")
        cross = origin is not None and not _same_origin(origin, host, request.scheme)
        if origin is None and request.headers.get("Sec-Fetch-Site") == "cross-site":
            cross = True
        allowed = origin is not None and ("*" in self.settings.cors_origins or origin in self.settings.cors_origins)
        if cross and not allowed:
            raise ApiError(
                403,
                f"Cross-origin requests from {origin or 'another site'} are refused. To let a web page on that "
                "origin call this API, add it to cors_origins.",
                code="cross_origin_refused",
            )
        if cross and request.method == "OPTIONS":  # a CORS preflight from an allowed origin
            return web.Response(status=204, headers=self._cors_headers(origin, request))
        resp = await handler(request)
        if cross:
            resp.headers.update(self._cors_headers(origin, request))
        return resp

    def _cors_headers(self, origin: str, request: web.Request) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            ),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }

    def _host_ok(self, request: web.Request, host: str) -> bool:
        """An IP literal (any: that is not rebinding), a loopback name, this machine's name, or an allowed name."""
        name = urlsplit("//" + host).hostname or ""
        if not name:
            return True  # HTTP/1.0 without Host: not a browser
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        name = name.rstrip(".").lower()
        names = {*LOOPBACK_NAMES, *(h.lower() for h in self.settings.allowed_hosts)}
        hostname = os.uname().nodename.lower()
        names |= {hostname, hostname.split(".")[0], hostname.split(".")[0] + ".local"}
        return name in names


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    parts = urlsplit(origin)
    return parts.netloc.lower() == host.lower() and parts.scheme in (scheme, "http", "https")


# ---- bodies ---------------------------------------------------------------------------------
async def read_body(request: web.Request, limit: int, too_large: Callable[[], ApiError]) -> bytes:
    """The request body, at most ``limit`` bytes, arriving within the guard's ``body_timeout`` (408)."""
    guard = request.app.get(GUARD)
    timeout = guard.settings.body_timeout if guard is not None else None

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 << 10):
            body += chunk
            if len(body) > limit:
                raise too_large()
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"The request body did not arrive within {timeout:.0f} s.", code="request_timeout"
        ) from None


def parse_json(body: bytes) -> Any:
    """``json.loads`` that answers nesting past ``MAX_JSON_DEPTH`` with a 400 (Python's own limit is a 500)."""
    try:
        obj = json.loads(body)
    except RecursionError:
        obj = None
    else:
        if _depth_ok(obj):
            return obj
    raise ApiError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")


def _depth_ok(obj: Any) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


# ---- start-up -------------------------------------------------------------------------------
def runner_kwargs(settings: GuardSettings) -> dict[str, Any]:
    """``web.AppRunner`` arguments: the keep-alive timer doubles as the request-head timeout, and a body left
    unread after an error (408, 413) is drained for ``LINGER_S``, not aiohttp's 10 s, before the socket closes."""
    return {"keepalive_timeout": settings.header_timeout, "lingering_time": LINGER_S}


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about when the API listens beyond loopback with no API key (anyone on the network may use it)."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in LOOPBACK_NAMES
    if loopback:
        return None
    return (
        f"the API listens on {host} with no API key: anyone who can reach this port can generate with it. "
        "Set --api-key-file (or MESHD_API_KEY), or --host 127.0.0.1 if only this machine needs it."
    )


GUARD = web.AppKey("rest_guard", RestGuard)
