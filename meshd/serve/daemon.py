"""``meshd serve``: the composition root. Model, mesh, runtime and REST, wired together once.

Start-up order matters to users: the API port is bound before the model is ready, so
``/health`` can say *why* the daemon is not serving yet (loading, waiting for peers), and
systemd hears READY=1 only once requests can actually be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import torch
from aiohttp import web

from meshd.config import Config
from meshd.ring.messages import RingMessage
from meshd.ring.wire import MESSAGE_TYPES, from_message, to_message
from meshd.serve import notify
from meshd.serve.api import create_app
from meshd.serve.modelcard import build_card
from meshd.serve.runtime import Ring, Runtime
from models.budget import CostCurve
from models.drafters import drafter_factory
from models.profile import stage_cost_curve
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage, parse_dtype
from peers.codec import Message
from peers.link import LinkEmulation
from peers.membership import MembershipEvent, PeerLost
from peers.mesh import MeshConfig, MeshNode
from peers.negotiation import Plan
from peers.planner import Assignment, ModelShape
from peers.sizes import parse_size

try:  # a dependency only where it builds (Linux, macOS); asyncio's own loop elsewhere
    import uvloop
except ImportError:  # pragma: no cover - platform without uvloop
    uvloop = None

log = logging.getLogger("meshd")


def model_shape(vocab: Stage, dtype: torch.dtype, context: int, draft_bytes: int = 0) -> ModelShape:
    """What the planner must know: bytes per layer, what every peer replicates, KV per token."""
    cfg = vocab.cfg
    b = torch.tensor([], dtype=dtype).element_size()
    return ModelShape(
        n_layers=cfg.n_layers,
        bytes_per_layer=cfg.layer_params() * b,
        replicated_bytes=vocab.nbytes() + draft_bytes,
        kv_bytes_per_token_per_layer=2 * cfg.kv_size * b,
        context=context,
    )


class Daemon:
    """One peer: model, mesh node, runtime and REST API.

    ``stage_wrapper`` and ``link_emulation`` are benchmark hooks, never set by ``meshd serve``: what
    each loaded layer slice is wrapped in before it serves (to emulate a slower device), and a
    shaping of every link this peer sends on (to emulate a slower network). The lab's launcher
    (``python -m meshd.lab.emulate serve``) builds them.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        stage_wrapper: Callable[[Stage], Stage] | None = None,
        link_emulation: LinkEmulation | None = None,
    ):
        self.cfg = cfg
        self.stage_wrapper, self.link_emulation = stage_wrapper, link_emulation
        self.stopping = asyncio.Event()
        self.node: MeshNode | None = None
        self.runtime: Runtime | None = None
        self.runner: web.AppRunner | None = None

    # ---- start-up ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        dtype = parse_dtype(cfg.dtype)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("loading %s (embeddings, final norm, LM head; %s)", cfg.model, dtype)
        notify.status("loading the model")
        source = ModelSource.resolve(cfg.model)
        vocab = await asyncio.to_thread(Stage.load, source, LayerRange(0, 0), vocab=True, dtype=dtype)
        tokenizer = await asyncio.to_thread(source.load_tokenizer)
        factory = await asyncio.to_thread(drafter_factory, cfg.drafter, vocab, source=source)
        self.runtime = rt = Runtime(
            source,
            vocab,
            factory,
            tokenizer=tokenizer,
            max_context=cfg.max_context,
            session_timeout=cfg.session_timeout,
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
            emulation=self.link_emulation,
        )
        self.node = node = MeshNode(mesh_cfg, model_shape(vocab, dtype, cfg.max_context), load_slice=self._load_slice)
        rt.node_id = node.node_id
        rt.transport = self._send
        for kind in MESSAGE_TYPES:
            node.on(kind, self._receive)
        node.on_plan(self._on_plan)
        node.on_membership(self._on_membership)

        card = await asyncio.to_thread(
            build_card,
            source,
            dtype=str(vocab.dtype).removeprefix("torch."),
            context_length=cfg.max_context,
            served_name=cfg.served_name,
            aliases=cfg.aliases,
        )
        rt.model_name = card.name
        app = create_app(rt, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes, card=card)
        node.attach(app)
        rt.mesh_status = self._mesh_status
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, cfg.host, cfg.port).start()
        log.info("API and mesh endpoint listening on http://%s:%d (node %s)", cfg.host, cfg.port, node.node_id)
        await rt.start()
        await node.start()
        stopped = asyncio.ensure_future(node.wait_stopped())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({stopped, stop}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if node.error is not None:
            log.error("%s", node.error)
            code = 3
        await self.shutdown()
        for t in (stopped, stop):
            t.cancel()
        return code

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

        The published curve is this machine's own speed, measured before ``stage_wrapper`` applies.
        """
        rt = self.runtime
        if stage is None:
            rt.install_worker(None)
            return
        w = rt.worker
        if w is not None and w.stage.layer_range == stage.layers:
            return
        log.info("plan epoch %d: loading layers %s", plan.epoch, stage.layers)
        notify.status(f"loading layers {stage.layers} for plan epoch {plan.epoch}")
        st = await asyncio.to_thread(Stage.load, rt.source, stage.layers, vocab=False, dtype=rt.vocab.dtype)
        curve = await asyncio.to_thread(stage_cost_curve, rt.source, st, with_lm_head=False, repeats=2)
        rt.install_worker(self.stage_wrapper(st) if self.stage_wrapper is not None else st)
        self.node.set_cost_curve(curve)

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
        me = self.node.node_id
        nodes = [None if s.node_id == me else s.node_id for s in plan.stages]
        local = next((i for i, s in enumerate(plan.stages) if s.node_id == me), None)
        curves = [self._stage_curve(s.node_id, s.n_layers) for s in plan.stages]
        self.runtime.set_ring(Ring(plan.epoch, nodes, curves, local))
        layout = ", ".join(f"{s.node_id[:8]}[{s.layers}]" for s in plan.stages)
        notify.status(f"serving; plan epoch {plan.epoch}: {layout}; {len(plan.members)} peers")
        notify.ready()

    def _on_membership(self, event: MembershipEvent) -> None:
        rt = self.runtime
        if isinstance(event, PeerLost) and rt.ring is not None and event.node_id in rt.ring.nodes:
            rt.clear_ring(f"peer {event.node_id} holding layers was lost ({event.reason}); waiting for a new plan")
            notify.status(f"re-planning: lost peer {event.node_id}")

    async def _send(self, node_id: str, msg: RingMessage) -> None:
        await self.node.send(node_id, to_message(msg, self.runtime.wire_dtype))

    async def _receive(self, sender: str, msg: Message) -> None:
        try:
            ring_msg = from_message(msg)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("dropping %s from %s: %s", msg.type, sender, exc)
            return
        self.runtime.deliver(ring_msg)

    def _mesh_status(self) -> dict:
        """The mesh half of ``GET /mesh``: plan, peers and their published cost curves."""
        status = self.node.status()
        for p in status.get("peers", []):
            hello = self.node.peers.get(p["node_id"])
            p["cost_curve_ms"] = {t: round(s * 1e3, 3) for t, s in (hello.cost_curve if hello else {}).items()}
        return status


def serve(
    cfg: Config,
    *,
    stage_wrapper: Callable[[Stage], Stage] | None = None,
    link_emulation: LinkEmulation | None = None,
) -> int:
    """Run one daemon until SIGTERM/SIGINT; the hooks are ``Daemon``'s benchmark hooks."""
    logging.basicConfig(
        level=getattr(logging, str(cfg.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if uvloop is not None:
        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(Daemon(cfg, stage_wrapper=stage_wrapper, link_emulation=link_emulation).run())
    return 130
