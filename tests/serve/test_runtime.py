"""The daemon's runtime on one device: behaviour that needs its event loop, not a mesh."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

from support import CodecMesh, assert_matches_greedy, greedy_reference, solo_runtime, two_stage_mesh

from meshd.ring.messages import PROMPT_PARENT, Prune, Segment
from meshd.serve import runtime as runtime_module
from meshd.serve.engine import GenerateParams
from meshd.serve.runtime import INLINE_ROWS, Ring, Runtime
from models.budget import CostCurve
from models.drafters import ModelDrafter, drafter_factory
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage


async def test_idle_sessions_of_a_vanished_originator_are_freed(tiny_dir):
    """A stage holds KV for requests whose originator may die without a close; the sweep frees them."""
    src = ModelSource.resolve(str(tiny_dir))
    target = Stage.load(src, dtype="fp32")
    rt = solo_runtime(src, target, drafter_factory("ngram", target), session_timeout=0.3)
    await rt.start()
    try:
        # a prompt chunk from an originator this device does not know: the stage computes it, keeps the KV
        rt.deliver(Segment("ghost", [0, 1, 2], [PROMPT_PARENT, 0, 1], [0, 1, 2], tokens=[5, 6, 7], commit=True))
        for _ in range(50):
            await asyncio.sleep(0.02)
            if "ghost" in rt.worker.sessions:
                break
        assert "ghost" in rt.worker.sessions, "the stage never ran the stray segment"
        for _ in range(100):  # freed after the timeout (0.3 s) by the compute loop's sweep, with nothing to wake it
            await asyncio.sleep(0.05)
            if not rt.worker.sessions:
                break
        assert not rt.worker.sessions
        assert rt.stage_stats()["sessions"] == 0
    finally:
        await rt.stop()


class Peer:
    """The transport to the ring's second stage: records what it is sent, or refuses like a dead link."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.sent = refuse, []

    async def __call__(self, node: str, msg) -> None:
        if self.refuse:
            raise ConnectionError("connection refused")
        self.sent.append((node, msg))


async def two_stage_runtime(tiny_dir, peer: Peer) -> Runtime:
    """This device originates and holds the first half of the layers; ``peer-b`` holds the rest."""
    src = ModelSource.resolve(str(tiny_dir))
    head = Stage.load(src, dtype="fp32")
    rt = Runtime(src, head, None, node_id="me")
    rt.install_worker(Stage.load(src, LayerRange(0, 2), vocab=False, dtype="fp32"))
    rt.transport = peer
    cc = CostCurve({1: 1.0, 64: 2.0})
    rt.set_ring(Ring(epoch=1, nodes=[None, "peer-b"], curves=[cc, cc], local_index=0))
    await rt.start()
    return rt


async def finished(handle) -> list[list[int]]:
    return [chunk async for chunk in handle]


async def answers(
    a: Runtime,
    b: Runtime,
    prompts: list[list[int]],
    params: GenerateParams,
    ask: Runtime | None = None,
    ends: tuple[str, ...] = ("length",),
) -> list[list[int]]:
    """Start both runtimes of a two-stage mesh, have ``ask`` (by default ``a``) answer each prompt in turn,
    stop them; the answers' tokens (each must end for one of ``ends``)."""
    await a.start()
    await b.start()
    try:
        got = []
        for prompt in prompts:
            handle = await (ask or a).submit(prompt, params)
            got.append([t for chunk in await asyncio.wait_for(finished(handle), 60) for t in chunk])
            assert handle.finish_reason in ends, handle.error
    finally:
        await a.stop()
        await b.stop()
    return got


async def test_a_lost_link_fails_the_request_through_the_originator(tiny_dir):
    peer = Peer(refuse=True)
    rt = await two_stage_runtime(tiny_dir, peer)
    try:
        h = await rt.submit([1, 2, 3], GenerateParams(max_tokens=4, mode="ar"))
        assert await asyncio.wait_for(finished(h), 30) == []
        assert (h.finish_reason, h.error) == ("error", "lost the link to peer peer-b: connection refused")
        assert h.stats is not None and h.stats.target_forwards == 1  # the originator's own account of it
        assert rt.originator.live == {} and rt.handles == {}
        assert rt.counters["requests_failed_total"] == 1
        for _ in range(100):  # the close reaches this device's stage too
            await asyncio.sleep(0.02)
            if not rt.worker.sessions:
                break
        assert not rt.worker.sessions
    finally:
        await rt.stop()


async def test_a_lost_stage_fails_every_request_in_flight(tiny_dir):
    peer = Peer()
    rt = await two_stage_runtime(tiny_dir, peer)
    try:
        handles = [await rt.submit([1, 2, 3 + i], GenerateParams(max_tokens=4, mode="ar")) for i in range(2)]
        for _ in range(200):  # both prompts went through this stage to the peer, whose results never come
            await asyncio.sleep(0.02)
            if len(peer.sent) == 2:
                break
        assert [type(m) for _, m in peer.sent] == [Segment, Segment]
        rt.clear_ring("peer peer-b holding layers was lost (timeout); waiting for a new plan")
        for h in handles:
            assert await asyncio.wait_for(finished(h), 30) == []
            assert h.finish_reason == "error"
            assert h.error == "peer peer-b holding layers was lost (timeout); waiting for a new plan"
        assert rt.originator.live == {} and rt.handles == {}
        assert rt.counters["requests_failed_total"] == 2
        assert rt.ready() == (False, "peer peer-b holding layers was lost (timeout); waiting for a new plan")
        rt.plan_problem = lambda: "the mesh cannot hold the model: [...] Missing: 4.0 MiB of layer memory."
        ok, why = rt.ready()  # once a plan attempt failed, a new request hears why there is no plan
        assert not ok and why.startswith("peer peer-b holding layers was lost") and why.endswith("layer memory.")
    finally:
        await rt.stop()


async def test_the_runtime_deepens_flow_pools_when_its_torch_thread_is_idle(tiny_dir):
    """With slots a first segment leaves after a shallow draft; the runtime must call ``Originator.idle``
    when nothing is queued (here: while the other runtime computes the second stage), or no filler is ever
    drafted and slots degenerate to one shallow tree per round. The output stays ``ar``'s."""
    src = ModelSource.resolve(str(tiny_dir))
    full = Stage.load(src, dtype="fp32")
    half = full.cfg.n_layers // 2
    cc = CostCurve({1: 1.0, 64: 1.1})
    mesh = CodecMesh()
    a = Runtime(src, full, drafter_factory("ngram", full), node_id="A")
    a.install_worker(Stage.load(src, LayerRange(0, half), vocab=False, dtype="fp32"))
    a.set_ring(Ring(epoch=1, nodes=[None, "B"], curves=[cc, cc], local_index=0))
    b = Runtime(src, full, None, node_id="B")
    b.install_worker(Stage.load(src, LayerRange(half, full.cfg.n_layers), vocab=False, dtype="fp32"))
    b.set_ring(Ring(epoch=1, nodes=["A", None], curves=[cc, cc], local_index=1))
    mesh.join(a)
    mesh.join(b)
    idle, calls = a.originator.idle, []
    a.originator.idle = lambda: calls.append(1) or idle()
    await a.start()
    await b.start()
    try:
        prompt = [5, 6, 7, 8] * 6  # repetitive: the n-gram drafter has something to draft
        got = {}
        for mode in ("flow", "ar"):
            handle = await a.submit(prompt, GenerateParams(max_tokens=12, mode=mode))
            got[mode] = [t for chunk in await finished(handle) for t in chunk]
            assert handle.finish_reason in ("length", "stop"), handle.error
        assert got["flow"] == got["ar"]
        assert calls, "the runtime never let the originator draft while idle"
        assert not a.originator.idle_work()
    finally:
        await a.stop()
        await b.stop()


async def test_the_originators_messages_leave_while_its_own_stage_computes(tiny_dir):
    """After a verification the originator's own stage computes the next segment in the same torch step (it
    does not wait for the loop to hand it back), and what the verification sends elsewhere (the prune for the
    other stages, the next segment when a peer's stage takes it, tokens for the client) goes to the loop
    before that forward starts: it leaves while the forward runs instead of waiting for its end. Every stage
    still sees a prune before the rows computed after it: the forward's outputs follow it (the answer is
    greedy decoding's)."""
    src = ModelSource.resolve(str(tiny_dir))
    _, a, b = two_stage_mesh(src)
    inner, done, seen = a.transport, [0], []
    run = a.worker.run

    def slow(batch):  # a device slow enough that its steps go to the torch thread
        if not batch:
            return run(batch)
        time.sleep(0.05)
        out = run(batch)
        done[0] += 1
        return out

    async def watch_prunes(node: str, msg) -> None:
        if isinstance(msg, Prune):
            seen.append(done[0])  # forwards finished when the prune left
        await inner(node, msg)

    a.worker.run, a.transport = slow, watch_prunes
    prompt = [5, 6, 7, 8]
    (tokens,) = await answers(a, b, [prompt], GenerateParams(max_tokens=6, mode="ar"))
    assert_matches_greedy(tokens, *greedy_reference(Stage.load(src, dtype="fp32"), prompt, 6, set()))
    # the prompt's forward and the first token's come before the first prune (the first verification has
    # nothing to prune); then each prune leaves before the forward of the segment sent beside it ends (when
    # it waited for that forward: 3, 4, 5, ...)
    assert len(seen) >= 3 and seen == list(range(2, 2 + len(seen))), seen
    assert a.sent_ahead >= len(seen) and a.stage_stats()["sent_ahead"] == a.sent_ahead


async def test_the_clients_tokens_leave_before_the_next_rounds_draft(tiny_dir):
    """A verification's tokens go to the loop before the torch thread drafts the round they end with
    (Originator.verify_result, then follow_up): the client does not wait a draft longer for a round's last
    tokens, nor for the answer's first. Each draft here waits (up to 2 s) for the client to hold every token
    before it; on a step that drafted before handing the tokens over, none ever would."""
    src = ModelSource.resolve(str(tiny_dir))
    _, a, b = two_stage_mesh(src)
    full, prompt, waited = Stage.load(src, dtype="fp32"), [5, 6, 7, 8], []

    class Watching(ModelDrafter):
        def draft(self, context, **kw):
            (handle,) = a.handles.values()
            want, t0 = len(context) - len(prompt), time.monotonic()
            while len(handle.token_ids) < want and time.monotonic() - t0 < 2.0:
                time.sleep(0.001)
            waited.append(len(handle.token_ids) >= want)
            return super().draft(context, **kw)

    a.originator.drafter_factory = lambda: Watching(full)
    run = a.worker.run

    def slow(batch):  # a device slow enough that its steps go to the torch thread
        if batch:
            time.sleep(0.05)
        return run(batch)

    a.worker.run = slow
    (tokens,) = await answers(a, b, [prompt], GenerateParams(max_tokens=8, mode="chunk"))
    assert_matches_greedy(tokens, *greedy_reference(full, prompt, 8, set()))
    assert len(waited) >= 2 and all(waited), waited


def test_a_replaced_slice_is_freed_when_the_next_one_is_installed(tiny_dir):
    """A re-plan swaps this device's slice; the old one must go at once, not at some later full
    collection (the soak saw resident memory grow by a slice at every re-plan)."""
    src = ModelSource.resolve(str(tiny_dir))
    rt = Runtime(src, Stage.load(src, dtype="fp32"), None, node_id="me", prefix_cache_bytes=1 << 20)
    first = Stage.load(src, LayerRange(0, 2), vocab=False, dtype="fp32")
    rt.install_worker(first)
    old_stage, old_worker = weakref.ref(first), weakref.ref(rt.worker)
    del first
    enabled = gc.isenabled()
    gc.disable()  # only what install_worker itself does may free it
    try:
        rt.install_worker(Stage.load(src, LayerRange(1, 3), vocab=False, dtype="fp32"))
        assert old_worker() is None and old_stage() is None
    finally:
        if enabled:
            gc.enable()


async def test_short_steps_run_where_the_message_arrived_and_long_ones_on_the_torch_thread(tiny_dir, monkeypatch):
    """A token's step is short: it runs on the event loop's thread, where its message arrived, sparing a hop
    two thread hand-offs; a prompt over INLINE_ROWS rows goes to the torch thread, and so does any step while
    that thread has work queued (it cannot overtake it). The text is greedy decoding's either way. (A step
    counts as short up to 1 s here instead of INLINE_SECONDS: on a busy machine a token's step of this tiny
    model can take longer than 20 ms, which would send it to the torch thread, rightly, and fail the test.)"""
    monkeypatch.setattr(runtime_module, "INLINE_SECONDS", 1.0)
    src = ModelSource.resolve(str(tiny_dir))
    _, a, b = two_stage_mesh(src)
    ran: dict[str, list[tuple[str, int]]] = {"A": [], "B": []}
    for rt in (a, b):

        def spy(batch, run=rt.worker.run, name=rt.node_id):
            if batch:
                ran[name].append((threading.current_thread().name, sum(len(s) for s in batch)))
            return run(batch)

        rt.worker.run = spy
    prompts = [[5, 6, 7, 8], [5 + i % 50 for i in range(INLINE_ROWS + 6)]]
    # one after the other: the second's prompt comes once token steps were timed
    got = await answers(a, b, prompts, GenerateParams(max_tokens=8, mode="ar"))
    target = Stage.load(src, dtype="fp32")
    for prompt, tokens in zip(prompts, got):
        assert_matches_greedy(tokens, *greedy_reference(target, prompt, 8, set()))
    loop_thread = threading.current_thread().name
    for name, forwards in ran.items():
        # B's first forward (nothing timed yet) and every prompt over INLINE_ROWS rows: on the torch thread
        assert forwards[0][0] != loop_thread, (name, forwards)
        long = [thread for thread, rows in forwards if rows > INLINE_ROWS]
        assert len(long) == 1 and long[0] != loop_thread, (name, forwards)
    # at B every token's segment arrives while its loop waits with the torch thread idle
    tokens_at_b = [thread for thread, rows in ran["B"][1:] if rows == 1]
    assert len(tokens_at_b) == 14 and set(tokens_at_b) == {loop_thread}, ran["B"]
    assert a.inline_steps > 0


async def test_a_step_that_holds_its_fillers_for_a_result_loses_nothing(tiny_dir, monkeypatch):
    """The originator's device holds a forward of fillers while a result of its own is due
    (``Originator.hold_stage``; here every such step is told to hold 50 ms): the compute loop waits for the
    result or the deadline without spinning, then runs the fillers, and the answer is greedy decoding's."""
    from meshd.ring.scheduler import Originator

    src = ModelSource.resolve(str(tiny_dir))
    full = Stage.load(src, dtype="fp32")
    half = full.cfg.n_layers // 2
    cc = CostCurve({1: 0.01, 64: 0.64})  # a row costs as much as the next: a tree goes in several segments
    mesh = CodecMesh()
    a = Runtime(src, full, None, node_id="A")
    a.install_worker(Stage.load(src, LayerRange(0, half), vocab=False, dtype="fp32"))
    a.set_ring(Ring(epoch=1, nodes=[None, "B"], curves=[cc, cc], local_index=0))
    # B originates and runs the last stage: fillers reach its stage behind each round's first segment
    b = Runtime(src, full, lambda: ModelDrafter(full), node_id="B", flow_slots=3)
    b.install_worker(Stage.load(src, LayerRange(half, full.cfg.n_layers), vocab=False, dtype="fp32"))
    b.set_ring(Ring(epoch=1, nodes=["A", None], curves=[cc, cc], local_index=1))
    mesh.join(a)
    mesh.join(b)
    asked: list[float] = []

    def hold(self, rows: int, now: float) -> float | None:
        if not self.live:  # A's originator: nothing of its own in flight
            return None
        asked.append(now)
        return now + 0.05

    monkeypatch.setattr(Originator, "hold_stage", hold)
    prompt = [20, 21, 22]
    params = GenerateParams(max_tokens=24, mode="flow")
    (tokens,) = await answers(a, b, [prompt], params, ask=b, ends=("length", "stop"))
    assert_matches_greedy(tokens, *greedy_reference(full, prompt, 24, set(b._stop_ids())))
    assert b.held_steps == len(asked) > 0 and a.held_steps == 0
    assert len(asked) < 400, len(asked)  # a loop that spun through its holds would ask thousands of times
    assert b.stage_stats()["held_steps"] == b.held_steps  # in /mesh
