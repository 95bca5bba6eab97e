"""``MeshNode``: identity, discovery, links, membership and plan negotiation, put together.

This is the only class the daemon needs. It owns no HTTP server: ``attach()`` adds ``/mesh/ws``
to the daemon's own aiohttp application, because REST and the mesh share one port.
All timers run off one tick loop on the daemon's event loop; there are no threads.

    node = MeshNode(MeshConfig(api_port=8090, secret=...), shape, load_slice=load, cost_curve=curve)
    node.on("segment", handle_segment)          # async (sender_node_id, Message) -> None
    node.on_plan(lambda plan: ...)               # every committed plan
    node.attach(app)                             # before the aiohttp app starts
    await node.start()
    await node.send(next_stage_id, Message("segment", {...}, request_id=rid))
    await node.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from peers.codec import DEFAULT_MAX_FRAME, Codec, Message, Registry
from peers.discovery import Discovery
from peers.hello import Hello
from peers.identity import Identity
from peers.link import (
    CLOSE_GOING_AWAY,
    CLOSE_INTEGRITY,
    CLOSE_STALLED,
    Link,
    LinkEmulation,
    LinkMeter,
    LinkSecurity,
    LinkStats,
    RttListener,
    add_mesh_route,
)
from peers.membership import Membership, MembershipEvent, PeerJoined, PeerLost
from peers.negotiation import Committed, LoadSlice, Negotiator, Plan, PlanAction, PlanFailed, Rejected, Send
from peers.neighbours import Neighbours
from peers.planner import Assignment, ModelShape, PeerResources
from peers.sizes import default_memory_budget

log = logging.getLogger(__name__)

LoadSliceFn = Callable[[Plan, Assignment | None], Awaitable[None]]
DataHandler = Callable[[str, Message], Awaitable[None]]
CLOSE_TIMED_OUT = 4001
# Link ends after which the peer is dropped from membership at once instead of after the peer timeout:
# it said it is going, it stopped reading what we send, or its frames could not be trusted.
_LOST_AT_ONCE = {
    CLOSE_GOING_AWAY: "left the mesh",
    CLOSE_STALLED: "stopped reading (a send timed out)",
    CLOSE_INTEGRITY: "sent a frame that failed authentication",
}


@dataclass
class MeshConfig:
    api_port: int
    state_dir: Path | None = None
    mesh_name: str = "meshd"
    fingerprint: str = ""
    secret: str | None = None
    static_peers: list[str] = field(default_factory=list)  # "host:port"
    mdns: bool = True
    interface: str | None = None  # address of the interface mDNS may use
    memory_budget: int | None = None  # bytes; None = a share of MemAvailable
    compute_score: float = 1.0
    role: str = "both"  # peers.planner.ROLES: "originator" holds no layers
    origin_layers: float = 0.0  # measured originator work per round, in this peer's layers (the planner's discount)
    heartbeat_interval: float = 1.0
    peer_timeout: float = 3.0
    plan_debounce: float = 1.0
    ack_timeout: float = 300.0  # a peer loading a big slice from an SD card can take minutes; losses are
    # noticed sooner by heartbeats
    max_frame: int = DEFAULT_MAX_FRAME
    send_queue: int = 64
    # A websocket write blocked this long closes the link and drops the peer (it stopped reading);
    # a send waiting this long for room on a full queue raises SendTimeout.
    send_timeout: float = 10.0
    emulation: LinkEmulation | None = None


@dataclass(frozen=True)
class PlanView:
    """The newest plan this node knows: the committed one, or a newer proposal still loading."""

    epoch: int
    committed: bool
    stages: tuple[Assignment, ...]
    members: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "committed": self.committed,
            "stages": [
                {"node_id": s.node_id, "first_layer": s.layers.first, "stop_layer": s.layers.stop} for s in self.stages
            ],
            "members": list(self.members),
        }


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"peer {text!r} is not host:port (e.g. 192.168.1.20:8090)")
    return host.strip("[]"), int(port)


class MeshNode:
    def __init__(
        self,
        config: MeshConfig,
        shape: ModelShape,
        *,
        cost_curve: dict[int, float] | None = None,
        load_slice: LoadSliceFn | None = None,
        registry: Registry | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.config, self.shape = config, shape
        self.identity = identity or Identity.load(config.state_dir)
        self.codec = Codec(registry, config.max_frame)
        plaintext = config.emulation is not None and config.emulation.insecure_plaintext
        self.security = LinkSecurity(config.secret.encode() if config.secret else None, insecure_plaintext=plaintext)
        budget = config.memory_budget if config.memory_budget is not None else default_memory_budget()
        self.hello = Hello(
            node_id=self.identity.node_id,
            instance=self.identity.instance,
            start_time=self.identity.start_time,
            mesh=config.mesh_name,
            fingerprint=config.fingerprint,
            memory_budget=budget,
            compute_score=config.compute_score,
            role=config.role,
            origin_layers=config.origin_layers,
            layer_bytes=shape.bytes_per_layer,  # this peer's own format: the planner counts each peer's
            replicated_bytes=shape.replicated_bytes,
            api_port=config.api_port,
            cost_curve=dict(cost_curve or {}),
            links=self.security.links,
        )
        self._load_slice = load_slice
        self._handlers: dict[str, DataHandler] = {}
        self._plan_callbacks: list[Callable[[Plan], Awaitable[None] | None]] = []
        self._event_callbacks: list[Callable[[MembershipEvent], None]] = []
        self._link_down_callbacks: list[Callable[[str], None]] = []
        self.membership = Membership(config.peer_timeout)
        self.negotiator = Negotiator(
            self.node_id, shape, config.plan_debounce, config.ack_timeout, fingerprint=config.fingerprint
        )
        # Data of an older epoch is refused unless the layout has not changed since it: an epoch change
        # that keeps every stage where it was (a pure originator joined or left) fails no request.
        self._layout: tuple[tuple[str, int, int], ...] = ()
        self._layout_epoch = 0
        self.link_meter = LinkMeter()  # bytes and round trips per peer, across reconnects
        link_options = {
            "queue_size": config.send_queue,
            "emulation": config.emulation,
            "send_timeout": config.send_timeout,
            "meter": self.link_meter,
            "ping_interval": config.heartbeat_interval,
        }
        self.neighbours = Neighbours(
            self.identity, lambda: self.hello, self.security, self.codec,
            on_message=self._on_message, on_up=self._on_link_up, on_down=self._on_link_down,
            link_options=link_options,
        )  # fmt: skip
        for peer in config.static_peers:
            self.neighbours.add_static(*parse_host_port(peer))
        self.discovery: Discovery | None = None
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._load_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._logged: set[str] = set()

    # --- public API ------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def peers(self) -> dict[str, Hello]:
        """Live peers (authenticated and heard from recently), with their hello: budget, cost curve."""
        return dict(self.membership.members)

    @property
    def committed_plan(self) -> Plan | None:
        return self.negotiator.committed

    @property
    def plan(self) -> PlanView | None:
        n = self.negotiator
        p, committed = (n.pending, False) if n.pending else (n.committed, True)
        return PlanView(p.epoch, committed, p.stages, p.members) if p else None

    def attach(self, app: web.Application) -> None:
        """Serve ``/mesh/ws`` on the daemon's application; call before the app starts."""
        add_mesh_route(app, self.neighbours.accept)

    def on(self, msg_type: str, handler: DataHandler) -> None:
        """Handle a data-plane message type: ``await handler(sender_node_id, msg)``.

        Handlers run in the sender's link reader, so they see that link's messages in order and
        a slow handler pushes back on that sender; keep them short (hand work to a queue).
        """
        if msg_type not in self.codec.registry or self.codec.registry.spec(msg_type).control:
            raise ValueError(f"{msg_type!r} is not a registered data-plane message type")
        self._handlers[msg_type] = handler

    def on_plan(self, callback: Callable[[Plan], Awaitable[None] | None]) -> None:
        """Called with every newly committed plan."""
        self._plan_callbacks.append(callback)

    def on_membership(self, callback: Callable[[MembershipEvent], None]) -> None:
        self._event_callbacks.append(callback)

    def on_link_down(self, callback: Callable[[str], None]) -> None:
        """``callback(node_id)`` as soon as the link to a peer closes, however it ended.

        Membership may wait the peer timeout before calling the peer lost (an abrupt close can be a
        blip), but a closed link already proves that nothing more comes from that peer over it: what
        only that peer could have continued (its requests' sessions at our stage) can go at once.
        """
        self._link_down_callbacks.append(callback)

    def hand_over(self) -> bool:
        """Give this node's layers to the other peers while it still serves (a graceful stop's first step).

        The node announces itself as a pure originator, so the next plan puts no layers here: the others
        load their wider slices while the current ring keeps serving, and at the commit live requests
        move over by replaying their history (their only pause), before this node leaves. Returns False
        when there is nothing to hand over (no committed plan gives this node layers, or it is alone);
        if the others cannot hold the model without it, no plan commits and the current one stays.
        """
        committed = self.negotiator.committed
        if committed is None or committed.stage_of(self.node_id) is None or not self.membership.members:
            return False
        self.hello = replace(self.hello, role="originator", origin_layers=0.0)
        msg = Message("peer_info", {"hello": self.hello.to_wire()})
        for link in list(self.neighbours.links.values()):
            self._spawn(link.send(msg))
        self._members_changed(time.monotonic())
        return True

    def on_link_rtt(self, listener: RttListener) -> None:
        """``listener(node_id, seconds)`` hears every round trip measured on a link (a websocket
        ping every heartbeat interval, answered by the peer's link reader)."""
        self.link_meter.listeners.append(listener)

    def link_stats(self) -> dict[str, LinkStats]:
        """Per peer ever linked: bytes sent and received on its links, the last round trip."""
        return {n: replace(st) for n, st in self.link_meter.peers.items()}

    async def send(self, node_id: str, msg: Message) -> None:
        """Send to one peer, in order with earlier sends to it; waits while its queue is full.

        The message is stamped with the committed plan's epoch unless it carries one.
        Raises ConnectionError if there is no link to that peer.
        """
        if msg.epoch == 0 and self.negotiator.committed:
            msg = replace(msg, epoch=self.negotiator.committed.epoch)
        await self.neighbours.link(node_id).send(msg)

    def set_cost_curve(self, curve: dict[int, float]) -> None:
        """Publish a new cost curve (measured once the slice is loaded) to every peer.

        Only the curve changes: the compute score that weighs the split is fixed at start-up, so
        a measurement taken after loading cannot trigger a re-plan, a reload and a new measurement.
        """
        self.hello = replace(self.hello, cost_curve=dict(curve))
        msg = Message("peer_info", {"hello": self.hello.to_wire()})
        for link in list(self.neighbours.links.values()):
            self._spawn(link.send(msg))

    async def start(self) -> None:
        if self.security.secret is None:
            log.warning(
                "NO MESH SECRET CONFIGURED: links are unauthenticated, so only loopback peers are "
                "accepted. Set a mesh secret (--mesh-secret) on every peer to mesh across machines."
            )
        if self.security.insecure_plaintext:
            log.warning(
                "INSECURE PLAINTEXT LINKS (a benchmark switch): frames to and from peers are neither encrypted "
                "nor authenticated, so anyone on the network can read prompts and inject frames. Only daemons "
                "with the same switch are accepted as peers. Never run a mesh like this outside a benchmark."
            )
        await self.neighbours.start()
        if self.config.mdns:
            self.discovery = Discovery(
                self.hello,
                interface=self.config.interface,
                on_found=self.neighbours.add_discovered,
                on_removed=self.neighbours.remove_discovered,
            )
            await self.discovery.start()
        self._members_changed(time.monotonic())
        self._tick_task = asyncio.create_task(self._tick_loop(), name="mesh tick")
        log.info(
            "mesh node %s up (mesh %r, budget %d bytes)", self.node_id, self.config.mesh_name, self.hello.memory_budget
        )

    @property
    def stopping(self) -> bool:
        return self._shutdown_task is not None

    async def stop(self) -> None:
        """Leave the mesh cleanly: unadvertise, tell neighbours we are going (not failing), close links.

        Safe to call more than once and from several tasks; every caller returns once it is done.
        """
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()
        if self.discovery:
            with contextlib.suppress(Exception):
                await self.discovery.stop()
        await self.neighbours.stop()
        for task in [*self._tasks, self._load_task]:
            if task:
                task.cancel()
        self._stopped.set()
        log.info("mesh node %s stopped", self.node_id)

    async def wait_stopped(self) -> None:
        """Returns once ``stop()`` has finished."""
        await self._stopped.wait()

    def status(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "node_id": self.node_id,
            "mesh": self.config.mesh_name,
            "plan": plan.to_json() if plan else None,
            "plan_error": self.negotiator.error,
            "duplicate_node_id": self.neighbours.duplicate,
            "peers": [
                {
                    "node_id": h.node_id,
                    "address": link.remote if (link := self.neighbours.links.get(h.node_id)) else None,
                    "memory_budget": h.memory_budget,
                    "compute_score": h.compute_score,
                    "role": h.role,
                    # the originator work it measured, in its own layers: what the origin-aware split takes off
                    "origin_layers": h.origin_layers,
                    "api_port": h.api_port,
                    **self._link_json(h.node_id),
                }
                for h in sorted(self.membership.members.values(), key=lambda h: h.node_id)
            ],
        }

    # --- internals -------------------------------------------------------------------------------

    def _link_json(self, node_id: str) -> dict[str, Any]:
        st = self.link_meter.peers.get(node_id) or LinkStats()
        return {
            "rtt_ms": round(st.rtt * 1e3, 3) if st.rtt is not None else None,
            "link_bytes": {"sent": st.bytes_sent, "received": st.bytes_received},
        }

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resources(self) -> dict[str, PeerResources]:
        hellos = [self.hello, *self.membership.members.values()]
        return {
            h.node_id: PeerResources(
                h.node_id, h.memory_budget, h.compute_score, h.role, h.origin_layers, h.layer_bytes, h.replicated_bytes
            )
            for h in hellos
        }

    def _members_changed(self, now: float) -> None:
        self._run(self.negotiator.set_members(self._resources(), now))

    def _membership_events(self, events: list[MembershipEvent]) -> None:
        if not events:
            return
        for event in events:
            if isinstance(event, PeerJoined):
                log.info("peer %s joined (budget %d bytes)", event.peer.node_id, event.peer.memory_budget)
            else:
                log.info("peer %s lost: %s", event.node_id, event.reason)
            for cb in self._event_callbacks:
                cb(event)
        self._members_changed(time.monotonic())

    def _on_link_up(self, link: Link) -> None:
        self._membership_events(self.membership.heard(link.peer, time.monotonic()))

    def _on_link_down(self, link: Link) -> None:
        for cb in self._link_down_callbacks:
            cb(link.peer.node_id)
        # No need to wait for the heartbeat timeout when the way the link ended says the peer is gone.
        reason = _LOST_AT_ONCE.get(link.close_code or 0)
        if reason and not self.stopping:
            self._membership_events(self.membership.lost(link.peer.node_id, reason))

    async def _on_message(self, link: Link, msg: Message) -> None:
        sender, now = link.peer.node_id, time.monotonic()
        self.membership.touch(sender, now)
        spec = self.codec.registry.spec(msg.type)
        if msg.type == "heartbeat":
            return
        if msg.type == "peer_info":
            await self._on_peer_info(link, msg)
        elif msg.type.startswith("plan_"):
            self._run(self.negotiator.on_message(sender, msg, now))
        elif spec.control:
            self._log_once(f"{msg.type} from {sender} after the handshake; ignored")
        else:
            await self._on_data(sender, msg)

    async def _on_peer_info(self, link: Link, msg: Message) -> None:
        try:
            hello = Hello.from_wire(msg["hello"])
        except ValueError as exc:
            self._log_once(f"bad peer_info from {link.peer.node_id}: {exc}")
            return
        if (hello.node_id, hello.instance) != (link.peer.node_id, link.peer.instance):
            self._log_once(f"peer_info from {link.peer.node_id} claims another identity; ignored")
            return
        old, link.peer = link.peer, hello
        self.membership.heard(hello, time.monotonic())
        if _plan_inputs(old) != _plan_inputs(hello):
            self._members_changed(time.monotonic())

    async def _on_data(self, sender: str, msg: Message) -> None:
        committed = self.negotiator.committed
        if committed and msg.epoch < self._layout_epoch and msg.type != "error":
            why = f"epoch {msg.epoch} is older than the layout in force since epoch {self._layout_epoch}"
            self._log_once(f"dropping {msg.type} from {sender}: {why}")
            reply = Message("error", {"code": "stale_epoch", "message": why}, committed.epoch, msg.request_id)
            link = self.neighbours.links.get(sender)
            if link:  # best effort: the reader must not wait for room on a full send queue
                link.offer(self.codec.encode(reply))
            return
        handler = self._handlers.get(msg.type)
        if handler is None:
            self._log_once(f"no handler for {msg.type!r} messages; dropping them")
            return
        await handler(sender, msg)

    def _log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            log.warning("%s", text)

    async def _tick_loop(self) -> None:
        next_beat = 0.0
        step = min(0.2, self.config.heartbeat_interval)
        while True:
            try:
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_interval
                    self._heartbeat()
                events = self.membership.expire(now)
                for event in events:
                    if isinstance(event, PeerLost):
                        await self.neighbours.close_link(event.node_id, CLOSE_TIMED_OUT, "silent too long")
                self._membership_events(events)
                self._run(self.negotiator.tick(now))
            except Exception:  # a bug here must not silence the heartbeats for good
                log.exception("mesh tick failed; continuing")
            await asyncio.sleep(step)

    def _heartbeat(self) -> None:
        msg = self.codec.encode(Message("heartbeat", {"ts": time.time()}))
        for link in list(self.neighbours.links.values()):
            link.offer(msg)  # a full queue already proves we are alive to that peer

    def _run(self, actions: list[PlanAction]) -> None:
        """Carry out the negotiator's actions; sends and loads go to tasks so no event waits on IO."""
        for action in actions:
            if isinstance(action, Send):
                self._spawn(self._send_control(action.to, action.msg))
            elif isinstance(action, LoadSlice):
                if self._load_task:
                    self._load_task.cancel()
                self._load_task = asyncio.create_task(self._load(action.plan))
            elif isinstance(action, Committed):
                self._on_committed(action.plan)
            elif isinstance(action, PlanFailed):
                self._log_once(f"no plan: {action.reason}")
            elif isinstance(action, Rejected):
                log.info("rejected a message from %s: %s", action.sender, action.reason)

    async def _send_control(self, to: str, msg: Message) -> None:
        try:
            await self.neighbours.link(to).send(msg)
        except ConnectionError as exc:
            log.info("cannot send %s to %s: %s", msg.type, to, exc)

    async def _load(self, plan: Plan) -> None:
        stage = plan.stage_of(self.node_id)
        try:
            if self._load_slice:
                await self._load_slice(plan, stage)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("loading the slice for plan epoch %d failed", plan.epoch)
            self._run(self.negotiator.loaded(plan.epoch, False, time.monotonic(), f"{type(exc).__name__}: {exc}"))
        else:
            self._run(self.negotiator.loaded(plan.epoch, True, time.monotonic()))

    def _on_committed(self, plan: Plan) -> None:
        if plan.layout != self._layout:
            self._layout, self._layout_epoch = plan.layout, plan.epoch
        layout = ", ".join(f"{s.node_id}[{s.layers}]" for s in plan.stages)
        log.info("plan epoch %d committed: %s (members %s)", plan.epoch, layout, ", ".join(plan.members))
        for cb in self._plan_callbacks:
            result = cb(plan)
            if asyncio.iscoroutine(result):
                self._spawn(result)


def _plan_inputs(h: Hello) -> tuple:
    """What of a peer's hello the layer split depends on: a change re-plans."""
    return h.memory_budget, h.compute_score, h.role, h.origin_layers, h.layer_bytes, h.replicated_bytes
