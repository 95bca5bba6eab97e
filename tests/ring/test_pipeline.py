"""The scheduler and stage workers without sockets: every mode against plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
from support import assert_matches_greedy, greedy_reference, make_tiny_checkpoint

from meshd.ring.messages import Prune, Segment
from meshd.ring.pipeline import build_local_pipeline
from meshd.ring.scheduler import Request
from meshd.ring.worker import StageWorker
from models.drafters import MergedDrafter, ModelDrafter, NGramDrafter, can_extend, load_drafter
from models.eagle import EagleDrafter, EagleHead, HeadConfig
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.verify import Sampling


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return ModelSource.resolve(make_tiny_checkpoint(tmp_path_factory.mktemp("pipe") / "m", num_hidden_layers=6))


def factory_for(kind: str, src, head):
    if kind == "ngram":
        return NGramDrafter
    # the target itself (perfect drafts: long acceptances, partial-segment waits) or its first 2 layers
    d = load_drafter(f"model:{src.path}" + ("@2" if kind == "early-exit" else ""), head)
    return lambda: ModelDrafter(d.model)


def run_matches_greedy(pipe, mode: str, prompt_len: int, n: int, seed: int):
    """One request of a random prompt through ``pipe``, checked against token-by-token greedy decoding
    of the same model; returns its output (for the callers' own checks)."""
    prompt = torch.randint(0, 64, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    want, gaps = greedy_reference(pipe.originator.vocab, prompt, n, set())
    pipe.submit(Request("r", prompt, n, mode))
    out = pipe.run()["r"]
    assert out.reason == "length", out.error
    assert_matches_greedy(out.tokens, want, gaps)
    return out


@pytest.mark.parametrize("mode", ["ar", "chunk", "flow"])
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("drafter", ["ngram", "self", "early-exit"])
def test_modes_equal_greedy(tiny_src, mode, stages, drafter):
    pipe = build_local_pipeline(tiny_src, stages, None)
    pipe.originator.drafter_factory = factory_for(drafter, tiny_src, pipe.originator.vocab)
    out = run_matches_greedy(pipe, mode, 75, 40, seed=stages)  # 75 rows: more than one prefill chunk
    if mode != "ar" and drafter == "self":
        assert out.stats.accepted_drafts > 0


def test_concurrent_requests_share_forwards(tiny_src):
    pipe = build_local_pipeline(tiny_src, 2, NGramDrafter)
    prompts = {f"r{i}": list(range(i + 1, i + 30)) for i in range(3)}
    for rid, p in prompts.items():
        pipe.submit(Request(rid, p, 24, ["ar", "chunk", "flow"][int(rid[1])]))
    rows_before = pipe.workers[0].rows_done
    out = pipe.run()
    for rid, p in prompts.items():
        want, gaps = greedy_reference(pipe.originator.vocab, p, 24, set())
        assert_matches_greedy(out[rid].tokens, want, gaps)
    assert pipe.workers[0].rows_done > rows_before
    assert not pipe.workers[0].sessions and not pipe.workers[1].sessions  # closed on finish


def test_sampling_is_seeded_and_finishes(tiny_src):
    # every tree drafted: with flow's back-off the trees (and so the draws a seed's stream gives them)
    # follow measured times, and the ring's first request times a plain tree (docs/design.md, "Seeds")
    pipe = build_local_pipeline(tiny_src, 3, NGramDrafter, back_off=False)
    runs = []
    for rid in ("a", "b"):
        pipe.submit(Request(rid, list(range(5, 25)), 30, "flow", Sampling(0.8, 0.95), seed=7))
        runs.append(pipe.run()[rid].tokens)
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_cancel_frees_every_stage(tiny_src):
    pipe = build_local_pipeline(tiny_src, 3, NGramDrafter)
    pipe.submit(Request("x", list(range(5, 25)), 30, "flow"))
    pipe.workers[0].step()
    pipe.dispatch(pipe.originator.cancel("x"))
    out = pipe.run()["x"]
    assert out.reason == "cancelled"
    assert all(not w.sessions and not w.queue for w in pipe.workers)


def test_prune_is_order_independent(tiny_src):
    """A prune that overtakes a segment (it is broadcast, segments travel the ring) still applies."""
    full = Stage.load(tiny_src, dtype="fp32")
    st = full.slice(LayerRange.split(6, 2)[0])
    w1, w2 = StageWorker(st, embed=full.embed), StageWorker(st, embed=full.embed)
    prompt = Segment("r", [0, 1, 2], [-1, 0, 1], [0, 1, 2], tokens=[5, 6, 7], commit=True)
    tree = Segment("r", [3, 4, 5], [2, 3, 3], [3, 4, 4], tokens=[8, 9, 10])
    prune = Prune("r", upto=5, keep=[3, 4], commit=[3])
    w1.enqueue(prompt)
    w1.step()
    w1.enqueue(tree)
    w1.prune(prune)  # arrives while the segment is queued: row 5 is dropped before compute
    out1 = w1.step()
    w2.enqueue(prompt)
    w2.step()
    w2.prune(prune)  # arrives before the segment: row 5 is dropped on arrival
    w2.enqueue(tree)
    out2 = w2.step()
    assert out1[0].node_ids == out2[0].node_ids == [3, 4]
    assert torch.equal(out1[0].hidden, out2[0].hidden)  # same rows, cache and mask: the same ops in the same order
    assert w1.sessions["r"].cache.length == w2.sessions["r"].cache.length == 5


@pytest.mark.parametrize("stages", [2, 3, 4, 5])
@pytest.mark.parametrize("slots", [1, 3, None])
def test_flow_equals_greedy_for_every_slot_setting(tiny_src, stages, slots):
    """Segments in flight change when rows are computed, never what is decided (None: slots from the ring model)."""
    pipe = build_local_pipeline(tiny_src, stages, None, flow_slots=slots)
    pipe.originator.drafter_factory = factory_for(
        "self" if stages % 2 else "early-exit", tiny_src, pipe.originator.vocab
    )
    run_matches_greedy(pipe, "flow", 20, 24, seed=stages)
    assert all(not w.sessions and not w.queue for w in pipe.workers)
    if slots is not None and slots > 1:  # never more in flight than the slots (1: one tree per round, as before)
        assert 1 <= pipe.originator.peak_segments <= slots


@pytest.mark.parametrize("stages", [2, 5])
def test_flow_with_idle_drafting_equals_greedy(tiny_src, stages):
    """A first segment drafted shallow and the pool deepened while it is in flight (``Originator.idle``)
    change which rows are computed when, never what is decided."""
    pipe = build_local_pipeline(tiny_src, stages, None, draft_when_idle=True)
    pipe.originator.drafter_factory = factory_for("self", tiny_src, pipe.originator.vocab)
    out = run_matches_greedy(pipe, "flow", 20, 24, seed=stages)
    assert out.stats.accepted_drafts > 0
    assert all(not w.sessions and not w.queue for w in pipe.workers)


class Opaque:
    """A drafter that cannot grow a pool (no ``extend``): the originator re-drafts from the root."""

    def __init__(self, inner):
        self.inner, self.name = inner, "opaque"

    def reset(self, prompt):
        self.inner.reset(prompt)

    def draft(self, context, **kw):
        return self.inner.draft(context, **kw)

    def accept(self, context, hidden):
        self.inner.accept(context, hidden)


def resumable_factory(kind: str, src, head):
    if kind == "eagle+ngram":  # a random head: poor guesses, but every row of the head's path runs
        torch.manual_seed(0)
        eagle = EagleDrafter(EagleHead(HeadConfig.for_target(head.cfg), head.cfg).eval(), head)
        return MergedDrafter([eagle, NGramDrafter()]).fresh
    inner = factory_for("self", src, head)
    return (lambda: Opaque(inner())) if kind == "opaque" else inner


@pytest.mark.parametrize(
    ("stages", "drafter", "resumable"),
    [
        (2, "self", True),
        (5, "self", True),
        (2, "eagle+ngram", True),
        (5, "eagle+ngram", True),
        (3, "opaque", True),
        (3, "self", False),
        (4, "eagle+ngram", False),
    ],
)
def test_flow_with_resumable_drafting_equals_greedy(tiny_src, stages, drafter, resumable):
    """Pools grown level by level by a drafter that keeps its state (idle steps, re-roots) change what is
    sent when, never what is decided; a drafter that cannot resume takes the re-drafting path."""
    pipe = build_local_pipeline(tiny_src, stages, None, draft_when_idle=True, resumable_drafting=resumable)
    pipe.originator.drafter_factory = resumable_factory(drafter, tiny_src, pipe.originator.vocab)
    assert can_extend(pipe.originator.drafter_factory()) == (drafter != "opaque")
    out = run_matches_greedy(pipe, "flow", 20, 24, seed=stages)
    if drafter == "self":
        assert out.stats.accepted_drafts > 0
    assert all(not w.sessions and not w.queue for w in pipe.workers)
