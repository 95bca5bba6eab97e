"""At most one live link per peer: accepting, dialing with backoff, and settling duplicates.

Both ends of a pair may dial each other (static peer lists are usually symmetric, and mDNS shows
each to the other), so two links can come up at once. Both ends then keep the link dialed by the
lower node id and close the other with CLOSE_DUPLICATE: the rule needs no extra messages and gives
the same answer on both sides whatever order the links arrived in. A dialer whose link lost that
contest waits until the peer is unlinked before dialing again, so nothing flaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from peers.codec import Codec
from peers.hello import Hello
from peers.identity import Identity
from peers.link import (
    CLOSE_DUPLICATE,
    CLOSE_GOING_AWAY,
    CLOSE_SAME_ID,
    HandshakeError,
    Link,
    LinkSecurity,
    MessageHandler,
    accept_handshake,
    dial,
)

log = logging.getLogger(__name__)


@dataclass
class Target:
    """An address worth dialing: from the static list (node id unknown until the handshake) or mDNS."""

    host: str
    port: int
    node_id: str | None = None
    defer: float = 0.0  # seconds to wait first, giving a lower node id the chance to dial us
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    last_error: str = ""
    serving: bool = False  # a link from this target is up: never cancel the task under it
    removed: bool = False

    @property
    def key(self) -> str:
        return self.node_id or f"{self.host}:{self.port}"


class Neighbours:
    def __init__(
        self,
        identity: Identity,
        local: Callable[[], Hello],
        security: LinkSecurity,
        codec: Codec,
        *,
        on_message: MessageHandler,
        on_up: Callable[[Link], None],
        on_down: Callable[[Link], None],
        on_fatal: Callable[[Exception], Awaitable[None]],
        link_options: dict[str, Any] | None = None,
        backoff: tuple[float, float] = (0.25, 5.0),
        handshake_timeout: float = 5.0,
        dial_grace: float = 2.0,
    ) -> None:
        self.identity, self.local, self.security, self.codec = identity, local, security, codec
        self.on_message, self.on_up, self.on_down, self.on_fatal = on_message, on_up, on_down, on_fatal
        self.link_options = link_options or {}
        self.backoff, self.handshake_timeout, self.dial_grace = backoff, handshake_timeout, dial_grace
        self.links: dict[str, Link] = {}
        self.targets: dict[str, Target] = {}
        self._changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        for t in self.targets.values():
            self._spawn(t)

    async def stop(self) -> None:
        self._stopping = True
        # Close links before cancelling their tasks, so peers see "going away", not a failure.
        await asyncio.gather(*(link.close(CLOSE_GOING_AWAY, "shutting down") for link in list(self.links.values())))
        tasks = [t.task for t in self.targets.values() if t.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session:
            await self._session.close()

    # --- targets ---------------------------------------------------------------------------------

    def add_static(self, host: str, port: int) -> None:
        self._add(Target(host, port))

    def add_discovered(self, node_id: str, host: str, port: int) -> None:
        known = self.targets.get(node_id)
        if known and not known.removed:
            known.host, known.port = host, port  # used from the next dial on
            return
        defer = self.dial_grace if node_id < self.identity.node_id else 0.0
        self._add(Target(host, port, node_id, defer))

    def remove_discovered(self, node_id: str) -> None:
        """The advertisement went away; a link that is up stays up (it has its own liveness checks)."""
        target = self.targets.pop(node_id, None)
        if target:
            target.removed = True
            if target.task and not target.serving:
                target.task.cancel()

    def _add(self, target: Target) -> None:
        self.targets[target.key] = target
        if self._session:
            self._spawn(target)

    def _spawn(self, target: Target) -> None:
        target.task = asyncio.create_task(self._supervise(target), name=f"dial {target.key}")

    async def _supervise(self, t: Target) -> None:
        """Keep a link to the target up: dial, serve, and after a failure retry with jittered backoff."""
        await asyncio.sleep(t.defer)
        failures = 0
        while not self._stopping and not t.removed:
            if t.node_id:
                async with self._changed:
                    await self._changed.wait_for(lambda: t.node_id not in self.links)
            try:
                assert self._session is not None
                link = await dial(
                    self._session, t.host, t.port, self.local(), self.security, self.codec,
                    self.handshake_timeout, **self.link_options,
                )  # fmt: skip
            except (HandshakeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
                self._log_failure(t, exc)
                failures += 1
            except Exception:  # never let one bad target end its supervisor silently
                log.exception("unexpected error dialing %s:%d", t.host, t.port)
                failures += 1
            else:
                failures, t.last_error = 0, ""
                t.node_id = link.peer.node_id
                if t.node_id == self.identity.node_id and link.peer.instance == self.identity.instance:
                    log.info("static peer %s:%d is this daemon itself; not dialing it again", t.host, t.port)
                    await link.close()
                    return
                t.serving = True
                try:
                    await self.serve(link)
                finally:
                    t.serving = False
                if link.close_code == CLOSE_DUPLICATE:
                    continue  # the peer is linked another way; the wait above holds the next dial
                if link.close_code == CLOSE_SAME_ID:
                    failures = 8  # a twin with our node id: retry at the slowest pace until it is gone
            low, high = self.backoff
            delay = min(high, low * 2**failures)
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))

    def _log_failure(self, t: Target, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        # The first failure of a kind is news; the same failure every few seconds is noise.
        level = logging.WARNING if reason != t.last_error else logging.DEBUG
        if isinstance(exc, (OSError, asyncio.TimeoutError)) and not isinstance(exc, HandshakeError):
            level = logging.DEBUG if t.last_error else logging.INFO
        log.log(level, "cannot link to %s at %s:%d: %s", t.node_id or "peer", t.host, t.port, reason)
        t.last_error = reason

    # --- links -----------------------------------------------------------------------------------

    async def accept(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """Server side of ``/mesh/ws``: authenticate, then serve the link until it closes."""
        remote = request.remote or "?"
        if self._stopping:
            await ws.close(code=CLOSE_GOING_AWAY, message=b"shutting down")
            return
        try:
            peer = await accept_handshake(ws, remote, self.local(), self.security, self.codec, self.handshake_timeout)
        except HandshakeError as exc:
            log.warning("refused a link from %s: %s", remote, exc)
            return
        link = Link(ws, peer, codec=self.codec, remote=f"{remote}:{peer.api_port}", dialer=False, **self.link_options)
        await self.serve(link)

    async def serve(self, link: Link) -> None:
        if not await self._register(link):
            return
        self.on_up(link)
        try:
            await link.run(self.on_message)
        finally:
            if self.links.get(link.peer.node_id) is link:
                del self.links[link.peer.node_id]
                await self._notify()
                self.on_down(link)

    async def _register(self, link: Link) -> bool:
        me, peer = self.identity, link.peer
        if peer.node_id == me.node_id:
            if peer.instance == me.instance:
                await link.close(CLOSE_SAME_ID, "linked to itself")
            elif me.is_newer_than(peer.start_time, peer.instance):
                await link.close(CLOSE_SAME_ID, "duplicate node id")
                await self.on_fatal(me.duplicate_error(link.remote))
            else:
                log.error(
                    "the daemon at %s presents this daemon's node id %s and started later; it will refuse "
                    "to join. Its state directory is probably a copy of %s.", link.remote, me.node_id, me.state_dir,
                )  # fmt: skip
                await link.close(CLOSE_SAME_ID, "duplicate node id")
            return False
        existing = self.links.get(peer.node_id)
        if existing and not existing.closed and existing.peer.instance == peer.instance:
            preferred_dialer = min(me.node_id, peer.node_id)

            def dialer_of(lk: Link) -> str:
                return me.node_id if lk.dialer else peer.node_id

            if dialer_of(existing) == preferred_dialer and dialer_of(link) != preferred_dialer:
                await link.close(CLOSE_DUPLICATE, "another link to this peer won")
                return False
        self.links[peer.node_id] = link
        if existing and not existing.closed:
            await existing.close(CLOSE_DUPLICATE, "replaced by a newer link")
        await self._notify()
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def link(self, node_id: str) -> Link:
        try:
            return self.links[node_id]
        except KeyError:
            raise ConnectionError(f"no link to peer {node_id}; it is not (or no longer) connected") from None

    async def close_link(self, node_id: str, code: int, reason: str) -> None:
        link = self.links.get(node_id)
        if link:
            with contextlib.suppress(Exception):
                await link.close(code, reason)
