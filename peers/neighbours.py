"""At most one live link per peer: accepting, dialing with backoff, and settling duplicates.

Both ends of a pair may dial each other (static peer lists are usually symmetric, and mDNS shows
each to the other), so two links can come up at once. Both ends then keep the link dialed by the
lower node id and close the other with CLOSE_DUPLICATE: the rule needs no extra messages and gives
the same answer on both sides whatever order the links arrived in. A dialer whose link lost that
contest waits until the peer is unlinked before dialing again, so nothing flaps.

Everything that arrives unauthenticated is bounded: at most ``MAX_HANDSHAKES`` handshakes in
progress (``MAX_HANDSHAKES_PER_HOST`` from one address), at most ``MAX_DISCOVERED`` dial targets
from mDNS, and a discovered target that keeps failing is dropped after ``MAX_DIAL_FAILURES``
attempts (a restarted peer advertises a new instance and is found again). An mDNS advert, which
anyone on the LAN can forge, never moves or removes a peer whose link is authenticated and up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, web

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

MAX_HANDSHAKES = 32  # in progress at once: bounds what unauthenticated connections can hold
MAX_HANDSHAKES_PER_HOST = 4
MAX_DISCOVERED = 64  # dial targets from mDNS; static peers are not counted
MAX_DIAL_FAILURES = 12  # consecutive failures before a discovered target is dropped (~40 s with backoff)


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
    static: bool = False  # from the configuration: redialled forever, never dropped
    # The last address a handshake succeeded on: tried again when an (unauthenticated) advert's fails.
    verified: tuple[str, int] | None = None

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
        link_options: dict[str, Any] | None = None,
        backoff: tuple[float, float] = (0.25, 5.0),
        handshake_timeout: float = 5.0,
        dial_grace: float = 2.0,
    ) -> None:
        self.identity, self.local, self.security, self.codec = identity, local, security, codec
        self.on_message, self.on_up, self.on_down = on_message, on_up, on_down
        self.link_options = link_options or {}
        self.backoff, self.handshake_timeout, self.dial_grace = backoff, handshake_timeout, dial_grace
        self.links: dict[str, Link] = {}
        self.targets: dict[str, Target] = {}
        self.duplicate: str | None = None  # the last refusal of a peer presenting our node id, for status
        self._handshakes: Counter[str] = Counter()  # remote host -> handshakes in progress
        self._changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._logged: set[str] = set()

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
        self._add(Target(host, port, static=True))

    def add_discovered(self, node_id: str, host: str, port: int) -> None:
        known = self.targets.get(node_id)
        if known and not known.removed:
            if node_id in self.links:
                if (host, port) != (known.host, known.port):
                    self._log_once(f"mDNS advert moves linked peer {node_id} to {host}:{port}; ignored")
                return  # the authenticated link's address stands
            known.host, known.port = host, port  # used from the next dial on
            return
        if sum(1 for t in self.targets.values() if not t.static) >= MAX_DISCOVERED:
            self._log_once(f"{MAX_DISCOVERED} discovered peers already; ignoring more adverts (e.g. {node_id})")
            return
        defer = self.dial_grace if node_id < self.identity.node_id else 0.0
        self._add(Target(host, port, node_id, defer))

    def remove_discovered(self, node_id: str) -> None:
        """The advertisement went away. A linked peer is kept (adverts are unauthenticated, and the
        link has its own liveness checks); otherwise its target is dropped."""
        target = self.targets.get(node_id)
        if target is None or target.static:
            return
        if node_id in self.links:
            self._log_once(f"mDNS says linked peer {node_id} is gone; its link stays up")
            return
        del self.targets[node_id]
        target.removed = True
        if target.task and not target.serving:
            target.task.cancel()

    def _add(self, target: Target) -> None:
        self.targets[target.key] = target
        if self._session:
            self._spawn(target)

    def _spawn(self, target: Target) -> None:
        target.task = asyncio.create_task(self._supervise(target), name=f"dial {target.key}")

    def _address(self, t: Target, failures: int) -> tuple[str, int]:
        """Alternate between the advertised and the last verified address while dials fail."""
        if t.verified and t.verified != (t.host, t.port) and failures % 2 == 1:
            return t.verified
        return t.host, t.port

    async def _supervise(self, t: Target) -> None:
        """Keep a link to the target up: dial, serve, and after a failure retry with jittered backoff."""
        await asyncio.sleep(t.defer)
        failures = 0
        while not self._stopping and not t.removed:
            if t.node_id:
                async with self._changed:
                    await self._changed.wait_for(lambda: t.node_id not in self.links)
            host, port = self._address(t, failures)
            try:
                assert self._session is not None
                link = await dial(
                    self._session, host, port, self.local(), self.security, self.codec,
                    self.handshake_timeout, **self.link_options,
                )  # fmt: skip
            except HandshakeError as exc:
                if exc.code == "self":
                    log.info("peer %s:%d is this daemon itself; not dialing it again", host, port)
                    return
                if exc.code == "duplicate_id":
                    self._duplicate(f"{host}:{port}", exc)
                    failures = max(failures, 8)  # a twin with our node id: retry at the slowest pace
                self._log_failure(t, host, port, exc)
                failures += 1
            except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
                self._log_failure(t, host, port, exc)
                failures += 1
            except Exception:  # never let one bad target end its supervisor silently
                log.exception("unexpected error dialing %s:%d", host, port)
                failures += 1
            else:
                if t.node_id and link.peer.node_id != t.node_id:
                    # An advert named one node and the address answered as another: a stale or forged advert.
                    self._log_once(f"{host}:{port}, advertised as {t.node_id}, is peer {link.peer.node_id}")
                    await link.close(CLOSE_DUPLICATE, "not the node this address was advertised for")
                    failures += 1
                else:
                    failures, t.last_error = 0, ""
                    t.node_id, t.verified = link.peer.node_id, (host, port)
                    t.serving = True
                    try:
                        await self.serve(link)
                    finally:
                        t.serving = False
                    if link.close_code == CLOSE_DUPLICATE:
                        continue  # the peer is linked another way; the wait above holds the next dial
                    if link.close_code == CLOSE_SAME_ID:
                        failures = 8  # the peer keeps an older instance of this node id: retry slowly
            if not t.static and failures >= MAX_DIAL_FAILURES:
                log.info("giving up on discovered peer %s at %s:%d after %d failures", t.key, t.host, t.port, failures)
                if self.targets.get(t.key) is t:
                    del self.targets[t.key]
                return
            low, high = self.backoff
            delay = min(high, low * 2**failures)
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))

    def _log_failure(self, t: Target, host: str, port: int, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        # The first failure of a kind is news; the same failure every few seconds is noise.
        level = logging.WARNING if reason != t.last_error else logging.DEBUG
        if isinstance(exc, (OSError, asyncio.TimeoutError)) and not isinstance(exc, HandshakeError):
            level = logging.DEBUG if t.last_error else logging.INFO
        log.log(level, "cannot link to %s at %s:%d: %s", t.node_id or "peer", host, port, reason)
        t.last_error = reason

    def _duplicate(self, where: str, exc: HandshakeError) -> None:
        """A peer presents our node id: refused, and reported, but this daemon keeps serving."""
        text = f"refused a link with {where}: {exc} (delete {self.identity.state_dir / 'node_id'} there or here)"
        if text != self.duplicate:
            log.error("%s", text)
        self.duplicate = text

    def _log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            log.warning("%s", text)

    # --- links -----------------------------------------------------------------------------------

    async def accept(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """Server side of ``/mesh/ws``: authenticate, then serve the link until it closes."""
        remote = request.remote or "?"
        if self._stopping:
            await ws.close(code=CLOSE_GOING_AWAY, message=b"shutting down")
            return
        if sum(self._handshakes.values()) >= MAX_HANDSHAKES or self._handshakes[remote] >= MAX_HANDSHAKES_PER_HOST:
            self._log_once(f"too many handshakes in progress (from {remote} or in all); refusing more for now")
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many handshakes in progress")
            return
        self._handshakes[remote] += 1
        try:
            auth = await accept_handshake(ws, remote, self.local(), self.security, self.codec, self.handshake_timeout)
        except HandshakeError as exc:
            if exc.code == "duplicate_id":
                self._duplicate(remote, exc)
            else:
                log.warning("refused a link from %s: %s", remote, exc)
            return
        finally:
            self._handshakes[remote] -= 1
            if not self._handshakes[remote]:
                del self._handshakes[remote]
        remote_addr = f"{remote}:{auth.peer.api_port}"
        link = Link(ws, auth, codec=self.codec, remote=remote_addr, dialer=False, **self.link_options)
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
        existing = self.links.get(peer.node_id)
        if existing and not existing.closed and existing.peer.instance != peer.instance:
            # Two processes claim one node id (a copied state directory, or a restart whose old link
            # has not timed out yet): the one that started first keeps the id until its link ends.
            if existing.peer.started_before(peer):
                await link.close(CLOSE_SAME_ID, "this node id is linked to an older instance")
                return False
        elif existing and not existing.closed:
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
