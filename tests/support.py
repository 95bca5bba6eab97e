"""Helpers the tests import by name: tiny random checkpoints, the project's prompt set, the daemon's
runtime on a one-device ring (``solo_runtime``), and an ``Engine`` (``meshd.serve.engine``) standing
in for that runtime behind the REST API (deterministic tokens from a real tokenizer, chunked like
speculative rounds, with cancellation and failures recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from aiohttp import web

from meshd.lab.bench import EVERYDAY
from meshd.lab.testbed import LoopbackMesh
from meshd.ring.wire import from_message, to_message
from meshd.serve.engine import GenerateParams, RuntimeUnavailable
from meshd.serve.runtime import Ring, Runtime
from models.budget import CostCurve
from models.drafters import Drafter
from models.engine import Stats
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.verify import TokenLogprobs
from peers.codec import Codec, Message
from training.prompts import load_questions


def prompts(n_per_category: int, categories: int | None = None) -> list[dict]:
    """The first questions of each category of the project's own everyday prompt set, in file order.

    The set is written for this project and never used to train or tune a drafter, so a test that
    asserts acceptance on it is not grading the head on its own training data.
    """
    return load_questions(EVERYDAY, categories, n_per_category)


TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
)


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random HF checkpoint (config.json + model.safetensors) and return its directory."""
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    cfg = cls[0](**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and norms; random ones exercise more of the forward
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---- the oracle ------------------------------------------------------------------------------
def near_tie(stage: Stage, context: int, top: float) -> float:
    """The top-2 logit gap under which another batch shape may pick the other token: speculative
    decoding computes the same logits in tree-sized batches (and the mesh in slices), so each of
    the two may move by the rounding bound of a forward over ``context`` keys."""
    return 2 * rounding_tolerance(stage.dtype, forward_terms(stage.cfg, context, n_layers=stage.n_layers), abs(top))


def greedy_reference(stage: Stage, prompt: list[int], n: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Token-by-token greedy decoding, recording at every step the top-2 logit gap in units of
    :func:`near_tie` (below 1: a near-tie)."""
    cache = stage.new_cache()
    h = stage.forward_one(stage.embed(prompt), cache, torch.arange(len(prompt)))[-1:]
    out, gaps = [], []
    while len(out) < n:
        logits = stage.logits(h)[0]
        top2 = logits.topk(2).values
        # counted at the longest context of the run (prompt + n), where the bound is largest
        gaps.append(float(top2[0] - top2[1]) / near_tie(stage, len(prompt) + n, float(top2[0])))
        out.append(int(logits.argmax()))
        if out[-1] in eos:
            break
        h = stage.forward_one(stage.embed([out[-1]]), cache, torch.tensor([len(prompt) + len(out) - 1]))
    return out, gaps


def assert_matches_greedy(got: list[int], want: list[int], gaps: list[float]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert gaps[i] < 1.0, f"diverged at token {i} ({g} != {w}) with a top-2 gap of {gaps[i]:.3g} near-ties"
            return
    assert len(got) == len(want), f"lengths differ without a divergence: {len(got)} vs {len(want)}"


# steep CPU-like and flat GPU-like cost curves must both stay exact
CURVES = {"steep": CostCurve({1: 1.0, 8: 1.6, 64: 6.0}), "flat": CostCurve({1: 1.0, 64: 1.05})}


def chat_ids(tok, question: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- floating-point tolerances ------------------------------------------------------------
ROUNDING_LAMBDA = 8.0


def rounding_tolerance(dtype: torch.dtype, n: int, scale: float) -> float:
    """Bound on |a - b| where a and b compute the same values, of magnitude ``scale``, with different
    rounding: another kernel or summation order (AVX-512 vs NEON, oneDNN vs plain), another batch
    size or cache layout, or ``dtype`` against an fp32 reference.

    ``n`` counts the rounding errors that can reach one result (the terms accumulated along its
    longest path, see :func:`forward_terms`); each is at most u = eps/2 of the value (2^-24 in fp32,
    2^-8 in bf16). Their worst case, n * u, does not happen in practice; as independent zero-mean
    errors they stay below lam * sqrt(n) * u except with probability under 2n * exp(-lam^2 / 2)
    (Higham & Mary, probabilistic rounding error analysis, SIAM J. Sci. Comput. 2019). lam = 8 makes
    that ~1e-13 per value; the largest seen on this project's machines is lam ~ 1.3.
    """
    return ROUNDING_LAMBDA * math.sqrt(n) * (torch.finfo(dtype).eps / 2) * float(scale)


def layer_terms(hidden: int, head_dim: int, q_size: int, intermediate: int, context: int) -> int:
    """Terms accumulated along one output's path through a decoder layer attending ``context`` keys:
    input norm, q/k/v, post-attention norm and gate/up (hidden each), scores (head_dim), softmax and
    values (context each), output projection (q_size), down projection (intermediate)."""
    return 4 * hidden + head_dim + 2 * context + q_size + intermediate


def forward_terms(cfg, context: int, n_layers: int | None = None, lm_head: bool = True) -> int:
    """:func:`layer_terms` of every layer of a ``cfg``-shaped forward, then final norm and LM head."""
    per = layer_terms(cfg.hidden_size, cfg.head_dim, cfg.q_size, cfg.intermediate_size, context)
    return (cfg.n_layers if n_layers is None else n_layers) * per + (2 * cfg.hidden_size if lm_head else 0)


REPLY = "Hello from the mesh! Emoji: 🎉🦀 and ünïcödé. The end is near. STOP here and then more text follows."


def fake_logprobs(token: int, index: int, top: int) -> TokenLogprobs:
    """Made-up but well-formed numbers for the canned reply's ``index``-th token: the token is the
    likeliest, each alternative one nat less likely than the one before."""
    lp = -0.125 * (index % 4)
    return TokenLogprobs(token, lp, tuple((token + j, lp - j) for j in range(top)))


class FakeHandle:
    """A ``RequestHandle``: the canned reply in chunks of ``FakeRuntime.chunk`` tokens."""

    def __init__(self, rt: FakeRuntime, rid: str, prompt_tokens: int, params: GenerateParams):
        self.runtime, self.request_id, self.prompt_tokens, self.params = rt, rid, prompt_tokens, params
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats: Stats | None = None
        self.logprobs: list[TokenLogprobs] = []
        self.paused_since: float | None = None
        self.submitted, self.first_token_at = time.monotonic(), None
        self._queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        self._stats = Stats()
        self._task = asyncio.ensure_future(self._produce())

    async def _produce(self) -> None:
        rt = self.runtime
        tokens = rt.reply_ids[: self.params.max_tokens]
        i = 0
        while i < len(tokens):
            await asyncio.sleep(rt.delay)
            if rt.fail_after is not None and i >= rt.fail_after:
                self._finish("error", "lost the link to peer b3: connection reset")
                return
            if rt.pause_at is not None and i >= rt.pause_at[0] and not self._stats.resumed:
                self.paused_since = time.monotonic()
                await asyncio.sleep(rt.pause_at[1])
                self._stats.resumed, self._stats.paused_seconds = 1, time.monotonic() - self.paused_since
                self.paused_since = None
            chunk = tokens[i : i + rt.chunk]
            if self.params.logprobs is not None:
                self.logprobs += [fake_logprobs(t, i + j, self.params.logprobs) for j, t in enumerate(chunk)]
            i += len(chunk)
            self._stats.rounds += 1
            self._stats.per_round.append(len(chunk))
            self._stats.new_tokens += len(chunk)
            self._stats.target_forwards += 1
            self.first_token_at = self.first_token_at or time.monotonic()
            self._queue.put_nowait(chunk)
        self._finish("length" if len(tokens) < len(rt.reply_ids) else "stop")

    def _finish(self, reason: str, error: str | None = None) -> None:
        self._stats.seconds = max(1e-3, self._stats.rounds * self.runtime.delay)
        self.finish_reason, self.error, self.stats = reason, error, self._stats
        self.runtime.finished[self.request_id] = reason
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def cancel(self) -> None:
        if self.finish_reason is None:
            self._task.cancel()
            self.runtime.cancelled.append(self.request_id)
            self._finish("cancelled")


class FakeRuntime:
    """An ``Engine``, as the daemon's ``Runtime`` is (``tests/serve/test_engine.py`` checks both)."""

    def __init__(self, tokenizer, *, reply: str = REPLY, chunk: int = 3, delay: float = 0.0, max_context: int = 2048):
        self.tokenizer = tokenizer
        self.model_name = "SmolLM2-135M-Instruct.Q4_1"
        self.max_context = max_context
        self.reply_ids = [int(t) for t in tokenizer(reply, add_special_tokens=False)["input_ids"]]
        self.chunk, self.delay = chunk, delay
        self.fail_after: int | None = None
        self.pause_at: tuple[int, float] | None = None  # (tokens, seconds): pause there, as a lost ring does
        self.not_ready: str | None = None
        self.submitted: list[tuple[list[int], GenerateParams]] = []
        self.handles: dict[str, FakeHandle] = {}
        self.cancelled: list[str] = []
        self.finished: dict[str, str] = {}
        self.started = 1_700_000_000.0

    def ready(self) -> tuple[bool, str]:
        return (False, self.not_ready) if self.not_ready else (True, "")

    async def submit(self, prompt_ids: list[int], params: GenerateParams) -> FakeHandle:
        if self.not_ready:
            raise RuntimeUnavailable(self.not_ready)
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError("prompt + max_tokens exceeds the context")
        self.submitted.append((list(prompt_ids), params))
        rid = str(len(self.submitted))
        h = FakeHandle(self, rid, len(prompt_ids), params)
        self.handles[rid] = h
        return h

    def in_flight(self) -> int:
        return sum(1 for h in self.handles.values() if h.finish_reason is None)

    def status(self) -> dict:
        return {
            "node_id": "a1b2c3d4e5f6a7b8",
            "mesh": "meshd",
            "model": self.model_name,
            "ready": not self.not_ready,
            "reason": self.not_ready,
            "plan": {
                "epoch": 3,
                "committed": True,
                "members": ["a1b2c3d4e5f6a7b8", "ffee00112233"],
                "stages": [
                    {"node_id": "a1b2c3d4e5f6a7b8", "first_layer": 0, "stop_layer": 15},
                    {"node_id": "ffee00112233", "first_layer": 15, "stop_layer": 30},
                ],
            },
            "peers": [
                {
                    "node_id": "ffee00112233",
                    "address": "127.0.0.1:1",
                    "memory_budget": 1 << 30,
                    "compute_score": 1.0,
                    "api_port": 1,
                }
            ],
            "stage": {
                "first_layer": 0,
                "stop_layer": 15,
                "queued_rows": 0,
                "sessions": self.in_flight(),
                "busy_seconds": 1.5,
                "rows_done": 10,
                "utilisation": 0.25,
            },
            "metrics": self.metrics(),
        }

    def metrics(self) -> dict:
        return {
            "requests_total": len(self.submitted),
            "requests_in_flight": self.in_flight(),
            "tokens_total": 42,
            "tokens_per_second": 12.5,
            "accepted_per_round": 2.75,
            "stage_utilisation": {"stage=0,node=a1b2": 0.25},
            "stage_queue_rows": 0,
            "stage_sessions": self.in_flight(),
            "requests_failed_total": 0,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(app: web.Application):
    """Run ``app`` the way the daemon does (AppRunner: handlers are *not* cancelled on disconnect)."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def solo_runtime(
    source: ModelSource,
    full: Stage,
    drafter_factory: Callable[[], Drafter] | None,
    tokenizer: Any = None,
    **runtime_kw: Any,
) -> Runtime:
    """The daemon's ``Runtime`` on a one-device ring, no mesh around it: this device holds every layer.
    With a single stage the cost curve only scales the tree budget; any increasing one will do."""
    rt = Runtime(source, full, drafter_factory, tokenizer=tokenizer, **runtime_kw)
    rt.install_worker(full)
    rt.set_ring(Ring(epoch=1, nodes=[None], curves=[CostCurve({1: 1.0, 64: 2.0})], local_index=0))
    return rt


class CodecMesh:
    """In-process runtimes joined as a mesh would join them: every ring message crosses the real codec
    and arrives tagged with the node it came from. ``tamper(sender, to, message)`` may rewrite a codec
    message in flight or drop it (return None), as a broken or hostile peer would."""

    def __init__(self) -> None:
        self.runtimes: dict[str, Runtime] = {}
        self.codec = Codec()
        self.tamper: Callable[[str, str, Message], Message | None] | None = None
        self.sent: list[tuple[str, str, Message]] = []

    def join(self, rt: Runtime) -> None:
        self.runtimes[rt.node_id] = rt

        async def transport(node: str, msg) -> None:
            dest = self.runtimes.get(node)
            if dest is None:
                raise ConnectionError(f"no link to {node}")
            wire = to_message(msg, rt.wire_dtype)
            if self.tamper is not None:
                wire = self.tamper(rt.node_id, node, wire)
            if wire is None:
                return
            self.sent.append((rt.node_id, node, wire))
            dest.deliver(from_message(self.codec.decode(self.codec.encode(wire))), rt.node_id)

        rt.transport = transport


def two_stage_mesh(src: ModelSource, **runtime_kw: Any) -> tuple[CodecMesh, Runtime, Runtime]:
    """Originator "A" holding the first half of the layers, "B" the second half, joined by a loopback mesh."""
    mesh = CodecMesh()
    full = Stage.load(src, dtype="fp32")
    half = full.cfg.n_layers // 2
    cc = CostCurve({1: 1.0, 64: 2.0})
    a = Runtime(src, full, None, node_id="A", **runtime_kw)
    a.install_worker(Stage.load(src, LayerRange(0, half), vocab=False, dtype="fp32"))
    a.set_ring(Ring(epoch=1, nodes=[None, "B"], curves=[cc, cc], local_index=0))
    b = Runtime(src, full, None, node_id="B", **runtime_kw)
    b.install_worker(Stage.load(src, LayerRange(half, full.cfg.n_layers), vocab=False, dtype="fp32"))
    b.set_ring(Ring(epoch=1, nodes=["A", None], curves=[cc, cc], local_index=1))
    mesh.join(a)
    mesh.join(b)
    return mesh, a, b


# ---- the real-client tests' shared mesh (fixture ``client_mesh`` in tests/serve/conftest.py) ----
SERVED, ALIAS = "smol", "smol:135m"
QUESTION = "What is the capital of France? Answer in one sentence."
TOKENS = 20


@dataclass
class ClientMesh:
    mesh: LoopbackMesh
    prompt: list[int]  # QUESTION as a chat, token ids
    want: list[int]  # plain greedy decoding of it, TOKENS long at most
    text: str  # ... as text

    def url(self, i: int) -> str:
        return self.mesh.url(i)
