"""``meshd serve``: the composition root. Model, mesh, runtime and REST, wired together once.

Start-up order matters to users: the API port is bound before the model is ready, so
``/health`` can say *why* the daemon is not serving yet (loading, waiting for peers), and
systemd hears READY=1 only once requests can actually be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from aiohttp import web

from meshd import logs
from meshd.config import Config
from meshd.ring.messages import RingMessage
from meshd.ring.wire import MESSAGE_TYPES, from_message, to_message
from meshd.serve import notify
from meshd.serve.api import METRICS, create_app
from meshd.serve.guard import GuardSettings, RestGuard, exposure_warning, runner_kwargs
from meshd.serve.loading import load_layers
from meshd.serve.metrics import Metrics
from meshd.serve.modelcard import build_card
from meshd.serve.runtime import Ring, Runtime
from models.budget import CostCurve
from models.drafters import drafter_factory
from models.profile import forward_times, stage_cost_curve
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage, layer_nbytes, resolve_weights
from peers.codec import Message, QuantizedRows
from peers.link import LinkEmulation
from peers.membership import MembershipEvent, PeerLost
from peers.mesh import MeshConfig, MeshNode
from peers.negotiation import Plan
from peers.planner import ORIGIN_LEVELS, ORIGIN_ROWS, Assignment, ModelShape
from peers.sizes import parse_size

try:  # a dependency only where it builds (Linux, macOS); asyncio's own loop elsewhere
    import uvloop
except ImportError:  # pragma: no cover - platform without uvloop
    uvloop = None

log = logging.getLogger("meshd")
# client, request line, status, bytes, seconds, user agent; no time: the log line (or the journal) has it
ACCESS_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'


EARLY_LIMIT = 4096  # ring messages held for a plan this peer has not committed yet (beyond: dropped)

RUNTIME_BYTES = 400 * 2**20
"""What a daemon process holds before any weight, counted against ``--memory`` on every peer:
Python, torch and aiohttp (~240 MB resident on x86-64), the tokenizer (~70 MB), the model file's
parsed header and the KV cache's and forward's working buffers. Measured with ``meshd serve`` on
this project's reference machine (docs/benchmarks.md, "Weights kept quantized"); a constant, not a
per-process measurement, so that every peer computes the same plan."""


def model_shape(source: ModelSource, vocab: Stage, context: int, draft_bytes: int = 0) -> ModelShape:
    """What the planner must know: bytes per layer as this format holds them, what every peer
    replicates, KV per token, the runtime's own share."""
    cfg = vocab.cfg
    kv = torch.tensor([], dtype=vocab.dtype).element_size()
    return ModelShape(
        n_layers=cfg.n_layers,
        bytes_per_layer=layer_nbytes(source, vocab.weights, vocab.dtype),
        replicated_bytes=vocab.nbytes() + draft_bytes,
        kv_bytes_per_token_per_layer=2 * cfg.kv_size * kv,
        context=context,
        runtime_bytes=RUNTIME_BYTES,
    )


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), for the live page; None where /proc is absent."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def hidden_bytes(msg: Message) -> int:
    """Bytes of the hidden states a ring message carries (what dominates a link's traffic)."""
    hidden = msg.get("hidden")
    return hidden.nbytes if isinstance(hidden, (torch.Tensor, QuantizedRows)) else 0


def link_seconds_per_byte(emulation: LinkEmulation | None) -> float | None:
    """What a byte costs on this peer's links, where known: today only an emulated bandwidth is (the
    ring timer learns the links' time per row, but summed over hops and at the precision already
    chosen, so it cannot tell one link's bandwidth)."""
    if emulation is None or emulation.bandwidth_mbps <= 0:
        return None
    return emulation.transmit_time(1)


class DeviceHooks(Protocol):
    """A benchmark hook: this peer paces its work like another device (built by the lab, passed in by
    ``meshd serve --emulate``; the daemon never builds one itself)."""

    def stage(self, stage: Stage) -> Stage: ...

    def curve(self, stage: Stage, measured: dict[int, float]) -> dict[int, float]: ...

    def vocab(self, vocab: Stage) -> Stage: ...

    def drafters(self, factory: Callable[[], Any] | None) -> Callable[[], Any] | None: ...

    def report(self) -> dict: ...


class Daemon:
    """One peer: model, mesh node, runtime and REST API.

    ``stage_wrapper`` and ``link_emulation`` are benchmark hooks, never set by ``meshd serve``: what
    each loaded layer slice is wrapped in before it serves (to emulate a slower device), and a
    shaping of every link this peer sends on (to emulate a slower network). The lab's launcher
    (``python -m meshd.lab.emulate serve``) builds them. ``device`` paces stage forwards, the LM head
    and drafting like another device and reports how often the real work overran (``/mesh``).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        stage_wrapper: Callable[[Stage], Stage] | None = None,
        link_emulation: LinkEmulation | None = None,
        device: DeviceHooks | None = None,
    ):
        self.cfg = cfg
        self.stage_wrapper, self.link_emulation, self.device = stage_wrapper, link_emulation, device
        self.stopping = asyncio.Event()
        # The slice loaded for a proposed plan, installed only when that plan commits: (epoch, stage).
        self._staged: tuple[int, Stage | None] | None = None
        # Ring messages stamped with a plan newer than ours (a peer committed it first): held until ours commits,
        # so this device's stage never runs them with the slice of the plan before.
        self._early: list[tuple[int, str, RingMessage]] = []
        self.node: MeshNode | None = None
        self.runtime: Runtime | None = None
        self.runner: web.AppRunner | None = None
        self.metrics: Metrics | None = None
        self.guard: RestGuard | None = None

    # ---- start-up ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        weights, dtype = resolve_weights(cfg.weights, cfg.dtype)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("loading %s (embeddings, final norm, LM head; weights %s, %s)", cfg.model, weights, dtype)
        notify.status("loading the model")
        source = ModelSource.resolve(cfg.model)
        vocab = await asyncio.to_thread(
            load_layers, source, LayerRange(0, 0), dtype, weights, "loading the model", vocab=True
        )  # says every 2 s that it still reads them (a big vocabulary on an SD card takes a while)
        log.info("loading the tokenizer")
        notify.status("loading the tokenizer")
        tokenizer = await asyncio.to_thread(source.load_tokenizer)
        factory = await asyncio.to_thread(drafter_factory, cfg.drafter, vocab, source=source)
        if self.device is not None:
            vocab, factory = self.device.vocab(vocab), self.device.drafters(factory)
        self.runtime = rt = Runtime(
            source,
            vocab,
            factory,
            tokenizer=tokenizer,
            max_context=cfg.max_context,
            session_timeout=cfg.session_timeout,
            flow_slots=cfg.flow_slots or None,  # 0: sized from the ring's measured latency
            flow_backoff=cfg.flow_backoff,
            contexts=cfg.contexts,
            sessions_per_peer=cfg.sessions_per_peer,
            stall_timeout=cfg.stall_timeout,
            wire_activations=cfg.wire_activations,
            link_seconds_per_byte=link_seconds_per_byte(self.link_emulation),
            prefix_cache_bytes=parse_size(cfg.prefix_cache_size) if cfg.prefix_cache else 0,
            resume_timeout=cfg.resume_timeout,
        )
        mesh_cfg = MeshConfig(
            api_port=cfg.port,
            state_dir=cfg.state_dir,
            mesh_name=cfg.mesh_name,
            fingerprint=source.fingerprint,
            secret=cfg.mesh_secret,
            static_peers=list(cfg.peers),
            mdns=cfg.mdns,
            interface=cfg.interface,
            memory_budget=parse_size(cfg.memory) if cfg.memory else None,
            role=cfg.role,
            origin_layers=await asyncio.to_thread(origin_layers, source, vocab, factory, dtype, weights, self.device)
            if cfg.role == "both"
            else 0.0,
            emulation=self.link_emulation,
        )
        # KV is reserved for ``contexts`` whole contexts: what each stage's session cap then admits
        shape = model_shape(source, vocab, cfg.contexts * cfg.max_context)
        self.node = node = MeshNode(mesh_cfg, shape, load_slice=self._load_slice)
        rt.node_id = node.node_id
        rt.plan_problem = lambda: node.negotiator.error  # what the planner says the mesh lacks
        rt.transport = self._send
        for kind in MESSAGE_TYPES:
            node.on(kind, self._receive)
        node.on_plan(self._on_plan)
        node.on_membership(self._on_membership)
        node.on_link_down(rt.originator_lost)  # its requests' sessions here: nothing can continue them now

        card = await asyncio.to_thread(
            build_card,
            source,
            dtype=str(vocab.dtype).removeprefix("torch."),
            context_length=cfg.max_context,
            served_name=cfg.served_name,
            aliases=cfg.aliases,
        )
        rt.model_name = card.name
        self.guard = RestGuard(guard_settings(cfg))
        app = create_app(rt, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes, guard=self.guard, card=card)
        self.metrics = app[METRICS]
        node.on_link_rtt(self.metrics.observe_rtt)  # round trips and bytes measured on the mesh links themselves
        self.metrics.link_bytes = lambda: {
            peer: {"sent": st.bytes_sent, "received": st.bytes_received} for peer, st in node.link_stats().items()
        }
        rt.on_resumed = self.metrics.resume_pause.observe
        node.attach(app)
        rt.mesh_status = self._mesh_status
        access = logging.getLogger("meshd.access") if cfg.access_log else None
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=access,
            access_log_format=ACCESS_FORMAT,
            **runner_kwargs(self.guard.settings),
        )
        await self.runner.setup()
        await web.TCPSite(self.runner, cfg.host, cfg.port).start()
        log.info("API and mesh endpoint listening on http://%s:%d (node %s)", cfg.host, cfg.port, node.node_id)
        if (warning := exposure_warning(cfg.host, cfg.api_key)) is not None:
            log.warning("%s", warning)
        await rt.start()
        await node.start()
        watchdog = asyncio.ensure_future(self._watchdog())
        stopped = asyncio.ensure_future(node.wait_stopped())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({stopped, stop}, return_when=asyncio.FIRST_COMPLETED)
        await self.drain()
        await self.shutdown()
        for t in (stopped, stop, watchdog):
            t.cancel()
        return 0

    async def drain(self) -> None:
        """SIGTERM: refuse new generations (503) and give those in flight ``drain_timeout`` s to finish."""
        rt, timeout = self.runtime, self.cfg.drain_timeout

        def in_flight() -> int:  # ours, and other originators' passing through our stage (they resume if cut)
            return len(rt.handles) + (len(rt.worker.sessions) if rt.worker is not None else 0)

        if not in_flight() and not self.guard.running:
            return
        notify.status(f"draining {in_flight()} request(s) for up to {timeout:.0f} s")
        log.info("draining: %d request(s) in flight get up to %.0f s to finish", in_flight(), timeout)
        if self.node is not None and self.node.hand_over():
            # Requests through our stage then pause only for their replay at the commit, not for the
            # peers' re-plan after we are gone (which also loads and measures their new slices).
            log.info("handing this device's layers over to the other peers; live requests move at the commit")
        left = await self.guard.drain(timeout, in_flight)
        if left:
            log.warning("%d request(s) still in flight after %.0f s fail now", left, timeout)

    async def _watchdog(self) -> None:
        """systemd's WatchdogSec: ping while the event loop runs and the torch thread answers within the interval
        (a torch thread stuck for good stops the pings, and systemd restarts the daemon)."""
        interval = notify.watchdog_interval()
        if interval is None:
            return
        while True:
            try:
                await asyncio.wait_for(self.runtime.ping_torch(), interval)
                notify.watchdog()
            except asyncio.TimeoutError:
                log.warning("the torch thread has not answered for %.0f s; not pinging the watchdog", interval)
            await asyncio.sleep(interval)

    async def shutdown(self) -> None:
        notify.stopping()
        log.info("shutting down: failing in-flight requests, closing links, unregistering mDNS")
        if self.runtime:
            await self.runtime.stop()
        if self.node:
            await self.node.stop()
        if self.runner:
            await self.runner.cleanup()

    # ---- mesh callbacks ---------------------------------------------------------------------
    async def _load_slice(self, plan: Plan, stage: Assignment | None) -> None:
        """Load this device's layers for a proposed plan, measure them, publish the cost curve.

        The published curve is this machine's own speed, measured before ``stage_wrapper`` applies; an
        emulated device (``device``) publishes the profile's time instead where that is longer, since its
        forwards take that long and originators size their segments by it.
        The slice is staged, not served: ``_install_slice`` swaps it in when the plan commits, so a
        proposal that never commits changes nothing.
        """
        rt = self.runtime
        self._staged = None
        if stage is None:
            self._staged = (plan.epoch, None)
            return
        w = rt.worker
        if w is not None and w.stage.layer_range == stage.layers:
            return
        notify.status(f"loading layers {stage.layers} for plan epoch {plan.epoch}")
        what = f"plan epoch {plan.epoch}: loading layers {stage.layers}"
        st = await asyncio.to_thread(load_layers, rt.source, stage.layers, rt.vocab.dtype, rt.vocab.weights, what)
        log.info("measuring this device's speed on layers %s (the cost curve peers size draft trees by)", stage.layers)
        notify.status(f"measuring this device's speed on layers {stage.layers}")
        t0 = time.monotonic()
        curve = await asyncio.to_thread(stage_cost_curve, rt.source, st, with_lm_head=False, repeats=2)
        log.info(
            "cost curve of layers %s in %.1f s: %s",
            stage.layers,
            time.monotonic() - t0,
            ", ".join(f"{t} tokens {s * 1e3:.1f} ms" for t, s in sorted(curve.items())),
        )
        if self.device is not None:  # peers size segments by what this stage will take: the profile's time
            curve = self.device.curve(st, curve)
            st = self.device.stage(st)
        self._staged = (plan.epoch, self.stage_wrapper(st) if self.stage_wrapper is not None else st)
        self.node.set_cost_curve(curve)

    def _install_slice(self, plan: Plan) -> None:
        """The plan committed: serve the slice staged for it (none staged: keep the current one)."""
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == plan.epoch:
            self.runtime.install_worker(staged[1])

    def _stage_curve(self, node_id: str, n_layers: int) -> CostCurve:
        if node_id == self.node.node_id and self.runtime.worker is not None:
            curve = self.node.hello.cost_curve
        else:
            peer = self.node.peers.get(node_id)
            curve = peer.cost_curve if peer else {}
        if curve:
            return CostCurve(curve)
        # not published yet: assume a device like this one, scaled by the layer count
        own = self.node.hello.cost_curve
        w = self.runtime.worker
        if own and w is not None and w.stage.n_layers:
            return CostCurve({t: s * n_layers / w.stage.n_layers for t, s in own.items()})
        return CostCurve({1: 0.002 * n_layers, 64: 0.006 * n_layers})

    def _on_plan(self, plan: Plan) -> None:
        self._install_slice(plan)
        me = self.node.node_id
        nodes = [None if s.node_id == me else s.node_id for s in plan.stages]
        local = next((i for i, s in enumerate(plan.stages) if s.node_id == me), None)
        curves = [self._stage_curve(s.node_id, s.n_layers) for s in plan.stages]
        self.runtime.set_ring(Ring(plan.epoch, nodes, curves, local, plan.layout))
        early, self._early = self._early, []
        for epoch, sender, msg in early:
            if epoch <= plan.epoch:
                self.runtime.deliver(msg, sender)
            else:
                self._early.append((epoch, sender, msg))
        layout = ", ".join(f"{s.node_id[:8]}[{s.layers}]" for s in plan.stages)
        notify.status(f"serving; plan epoch {plan.epoch}: {layout}; {len(plan.members)} peers")
        notify.ready()

    def _on_membership(self, event: MembershipEvent) -> None:
        rt = self.runtime
        if isinstance(event, PeerLost):  # usually freed already when its link closed (``on_link_down``)
            rt.originator_lost(event.node_id)
        if isinstance(event, PeerLost) and rt.ring is not None and event.node_id in rt.ring.nodes:
            rt.clear_ring(f"peer {event.node_id} holding layers was lost ({event.reason}); waiting for a new plan")
            notify.status(f"re-planning: lost peer {event.node_id}")

    async def _send(self, node_id: str, msg: RingMessage) -> None:
        wire = to_message(msg, self.runtime.link_dtype(node_id))
        self.metrics.count_bytes(node_id, "sent", hidden_bytes(wire))
        await self.node.send(node_id, wire)

    async def _receive(self, sender: str, msg: Message) -> None:
        try:
            ring_msg = from_message(msg)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("dropping %s from %s: %s", msg.type, sender, exc)
            return
        self.metrics.count_bytes(sender, "received", hidden_bytes(msg))
        committed = self.node.committed_plan
        if committed is not None and msg.epoch > committed.epoch:
            if len(self._early) < EARLY_LIMIT:
                self._early.append((msg.epoch, sender, ring_msg))
            return  # beyond the limit, dropped: its request pauses on its stall, never runs on the wrong slice
        self.runtime.deliver(ring_msg, sender)

    def _mesh_status(self) -> dict:
        """The mesh half of ``GET /mesh``: plan, peers and their published cost curves."""
        status = self.node.status()
        status["memory"] = {"budget": self.node.hello.memory_budget, "rss": resident_bytes()}
        for p in status.get("peers", []):
            hello = self.node.peers.get(p["node_id"])
            p["cost_curve_ms"] = {t: round(s * 1e3, 3) for t, s in (hello.cost_curve if hello else {}).items()}
            p["version"] = hello.version if hello else None
        if self.device is not None:
            status["emulation"] = self.device.report()
        return status


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def origin_layers(
    source: ModelSource,
    vocab: Stage,
    factory: Callable[[], Any] | None,
    dtype: str,
    weights: str,
    device: DeviceHooks | None = None,
) -> float:
    """This device's originator work per round in decoder layers of its own forward: one LM head over
    ``ORIGIN_ROWS`` rows plus one draft ``ORIGIN_LEVELS`` deep, over one layer's forward of as many rows,
    all timed here as this device runs them (paced, when emulated), each the best of a few calls after a
    cold first one. The planner takes it off this peer's share where other peers only serve stages
    (peers.planner); 0.0 when it cannot be measured."""
    try:
        h = vocab.final_norm(torch.randn(ORIGIN_ROWS, vocab.cfg.hidden_size, dtype=vocab.dtype))
        head = min(timed(lambda: vocab.logits(h, normed=True)) for _ in range(3))  # the first call is cold
        draft = 0.0
        if factory is not None:
            ids = [int(t) for t in torch.randint(0, vocab.cfg.vocab_size, (32,))]
            # the target's features of every position but the root's (the last token), as after a prefill
            feats = vocab.final_norm(torch.randn(len(ids) - 1, vocab.cfg.hidden_size, dtype=vocab.dtype))

            def one_draft() -> float:
                d = factory()  # a fresh drafter each time: a second draft would grow the first one's tree
                d.reset(ids)
                d.accept(ids, feats)
                return timed(lambda: d.draft(ids, top_k=8, depth=ORIGIN_LEVELS, max_nodes=64))

            draft = min(one_draft() for _ in range(2))
        layer = Stage.load(source, LayerRange(0, 1), dtype=dtype, weights=weights)
        per_layer = {ORIGIN_ROWS: forward_times(layer, (ORIGIN_ROWS,), repeats=5, lm_head=False)[ORIGIN_ROWS]}
        if device is not None:
            per_layer = device.curve(layer, per_layer)
        layers = (head + draft) / max(1e-9, per_layer[ORIGIN_ROWS])
    except Exception as exc:  # a drafter that cannot draft from nothing: the split just ignores this peer's work
        log.warning(
            "could not measure the originator's work (%s: %s); the planner counts none", type(exc).__name__, exc
        )
        return 0.0
    log.info("originator work per round: %.1f ms head + %.1f ms draft = %.1f layers", head * 1e3, draft * 1e3, layers)
    return round(layers, 1)


def guard_settings(cfg: Config) -> GuardSettings:
    return GuardSettings(
        max_concurrent=cfg.max_concurrent,
        max_queued=cfg.max_queued,
        header_timeout=cfg.header_timeout,
        body_timeout=cfg.body_timeout,
        cors_origins=tuple(cfg.cors_origins),
        allowed_hosts=tuple(cfg.allowed_hosts),
    )


def serve(
    cfg: Config,
    *,
    stage_wrapper: Callable[[Stage], Stage] | None = None,
    link_emulation: LinkEmulation | None = None,
    device: DeviceHooks | None = None,
) -> int:
    """Run one daemon until SIGTERM/SIGINT; the hooks are ``Daemon``'s benchmark hooks."""
    logs.configure(cfg.log_level)
    if uvloop is not None:
        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(Daemon(cfg, stage_wrapper=stage_wrapper, link_emulation=link_emulation, device=device).run())
    return 130
