"""Resume without sockets: the ring is lost mid-generation, the requests pause, and a new ring (split
otherwise) rebuilds their KV by replaying the history; the tokens are those of an uninterrupted run.
With prefix caches the replay starts after the longest prefix kept under the ring's plan."""

from __future__ import annotations

import pytest
import torch
from support import assert_matches_greedy, greedy_reference, make_tiny_checkpoint
from test_pipeline import factory_for
from test_prefixes import eagle_factory

from meshd.ring.messages import Result, Segment
from meshd.ring.pipeline import InProcessPipeline, build_local_pipeline, local_stages
from meshd.ring.scheduler import CloseSessions, Emit, Request, SendSegment, resumed_ring_id
from models.drafters import NGramDrafter
from models.engine import generate
from models.prefixcache import PREFIX_BLOCK
from models.source import ModelSource
from models.stage import Stage
from models.verify import Sampling


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return ModelSource.resolve(make_tiny_checkpoint(tmp_path_factory.mktemp("resume") / "m", num_hidden_layers=6))


def step_until(pipe: InProcessPipeline, done, limit: int = 100_000) -> None:
    for _ in range(limit):
        if done() or not pipe.step():
            return


@pytest.mark.parametrize("mode", ["ar", "chunk", "flow"])
@pytest.mark.parametrize("drafter", ["ngram", "self"])
@pytest.mark.parametrize("after", [0, 1, 9])  # tokens each request has emitted (at least) when the ring is lost
def test_resume_gives_the_uninterrupted_tokens(tiny_src, mode, drafter, after):
    now = [0.0]
    pipe = build_local_pipeline(tiny_src, 3, None, clock=lambda: now[0])
    pipe.originator.drafter_factory = factory_for(drafter, tiny_src, pipe.originator.vocab)
    full = pipe.originator.vocab
    g = torch.Generator().manual_seed(after)
    prompts = {f"r{i}": torch.randint(0, 64, (70 + 5 * i,), generator=g).tolist() for i in range(2)}
    for rid, p in prompts.items():
        pipe.submit(Request(rid, p, 32, mode))
    if after:
        step_until(pipe, lambda: all(len(o.tokens) >= after for o in pipe.outcomes.values()))
    else:  # lost during the prefill: its first chunks went round, the rest not
        pipe.step()
    before = {rid: list(o.tokens) for rid, o in pipe.outcomes.items()}
    assert all(o.reason is None for o in pipe.outcomes.values())
    pipe.lose_ring()
    assert sorted(pipe.originator.waiting()) == sorted(prompts)
    now[0] += 2.5  # the pause: waiting for a new plan
    workers, curves = local_stages(full, 2)
    pipe.new_ring(workers, curves)
    out = pipe.run()
    for rid, p in prompts.items():
        o = out[rid]
        assert o.reason == "length", o.error
        assert o.tokens[: len(before[rid])] == before[rid]
        want, gaps = greedy_reference(full, p, 32, set())
        assert_matches_greedy(o.tokens, want, gaps)
        assert o.stats.resumed == 1 and o.stats.paused_seconds == pytest.approx(2.5)
    assert all(not w.sessions for w in workers)  # closed on finish, under the ring ids the new ring knew


def test_resume_replays_history_under_a_new_ring_id(tiny_src):
    """The replay closes the old id, prefills prompt + emitted tokens but the last, and emits nothing
    twice; results of the lost ring that still arrive are ignored."""
    pipe = build_local_pipeline(tiny_src, 2, None)
    prompt = list(range(3, 20))
    pipe.submit(Request("q", prompt, 12, "ar"))
    step_until(pipe, lambda: len(pipe.outcomes["q"].tokens) >= 3)
    emitted = list(pipe.outcomes["q"].tokens)
    # a result of the old ring, computed but not yet delivered when the ring goes
    late = [seg for w in pipe.workers for seg in w.queue]
    pipe.lose_ring()
    orig = pipe.originator
    acts = orig.on_ring([c for c in local_stages(orig.vocab, 1)[1]])
    new_id = resumed_ring_id("q", 1)
    assert acts[0] == CloseSessions("q")
    segs = [a.segment for a in acts if isinstance(a, SendSegment)]
    assert all(s.request_id == new_id and s.commit for s in segs)
    assert [t for s in segs for t in s.tokens] == prompt + emitted[:-1]
    assert orig.request_of(new_id) == "q" and orig.request_of("q") is None
    for seg in late:  # the old ring's rows, had they come back: nothing happens
        assert orig.on_result(Result(seg.request_id, seg.node_ids, torch.zeros(len(seg), 64))) == []
    workers, _ = local_stages(orig.vocab, 1)
    pipe.workers = workers
    pipe.dispatch(acts)
    out = pipe.run()["q"]
    want, gaps = greedy_reference(orig.vocab, prompt, 12, set())
    assert_matches_greedy(out.tokens, want, gaps)
    assert not any(isinstance(a, Emit) for a in acts)


def test_no_ring_in_time_fails_with_the_reason(tiny_src):
    now = [0.0]
    pipe = build_local_pipeline(tiny_src, 2, NGramDrafter, clock=lambda: now[0])
    pipe.submit(Request("w", list(range(5, 30)), 20, "flow"))
    step_until(pipe, lambda: len(pipe.outcomes["w"].tokens) >= 2)
    pipe.lose_ring()
    now[0] += 5
    assert pipe.originator.give_up(10.0, "no plan") == []
    now[0] += 6
    acts = pipe.originator.give_up(10.0, "the mesh lacks 1.2 GB for layers 20-29")
    pipe.dispatch(acts)
    o = pipe.outcomes["w"]
    assert o.reason == "error" and "within 10 s" in o.error and "lacks 1.2 GB" in o.error
    assert any(isinstance(a, CloseSessions) for a in acts) and not pipe.originator.live


@pytest.mark.parametrize("mode", ["chunk", "flow"])
def test_a_seeded_sample_resumed_is_the_uninterrupted_text(tiny_src, mode):
    """T=1 with a seed: each decided position's noise is keyed by the seed and the position whatever the
    trees (models/verify.py), and
    what was decided before the loss stays decided, so the resumed request writes the text an
    uninterrupted run writes (and plain sampled decoding with that seed), though its trees differ."""
    full = Stage.load(tiny_src, dtype="fp32")
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    want = generate(full, prompt, max_new_tokens=32, mode="ar", sampling=Sampling(1.0), seed=3).token_ids
    pipe = build_local_pipeline(tiny_src, 3, None, full=full)
    pipe.originator.drafter_factory = factory_for("self", tiny_src, full)
    pipe.submit(Request("r", prompt, 32, mode, Sampling(1.0), seed=3))
    step_until(pipe, lambda: len(pipe.outcomes["r"].tokens) >= 9)
    assert pipe.outcomes["r"].reason is None
    pipe.lose_ring()
    workers, curves = local_stages(full, 2)
    pipe.new_ring(workers, curves)
    o = pipe.run()["r"]
    assert o.reason == "length" and o.stats.resumed == 1, o.error
    assert o.tokens == want


# The test is deterministic: for an exact sampler its KS p-value is uniform over seed sets, so a given set
# fails with probability 0.01. With the position-keyed noise (models/verify.py) the seeds 16-175 of the
# earlier stream scored 0.141 with and without the resume (the same texts: the loss changes nothing), a 1 %
# event; seeds from 1000, 2000, ..., 9000 scored 0.092, 0.056, 0.063, 0.033, 0.059, 0.071, 0.080, 0.066, 0.087.
SEEDS = 1000


@pytest.mark.slow  # ~10 s on a quiet machine
def test_sampling_after_a_resume_follows_the_target(tiny_src):
    """T=1: the first token after a resume is a draw from the target's distribution given the history.
    Over many seeded requests, its probability integral transform is uniform (Kolmogorov-Smirnov)."""
    pipe = build_local_pipeline(tiny_src, 2, NGramDrafter)
    full = pipe.originator.vocab
    prompt = list(range(7, 27))
    u = torch.Generator().manual_seed(123)
    pits: list[float] = []
    n, k = 160, 0
    while len(pits) < n:
        batch = [f"s{k + j}" for j in range(16)]  # resumed together, as a lost ring resumes every request
        k += len(batch)
        for j, rid in enumerate(batch):
            pipe.submit(Request(rid, prompt, 5, "flow", Sampling(1.0), seed=SEEDS + k + j))
        step_until(pipe, lambda b=batch: all(len(pipe.outcomes[r].tokens) >= 3 for r in b))
        history = {r: list(pipe.outcomes[r].tokens) for r in batch if pipe.outcomes[r].reason is None}
        pipe.lose_ring()
        workers, curves = local_stages(full, 2)
        pipe.new_ring(workers, curves)
        out = pipe.run()
        for rid, hist in history.items():  # those finished before the loss (long acceptances) had no resume
            o = out[rid]
            assert o.reason == "length" and o.stats.resumed == 1, o.error
            ctx = prompt + hist
            with torch.no_grad():
                h = full.forward_one(full.embed(ctx), full.new_cache(), torch.arange(len(ctx)))[-1:]
                q = torch.softmax(full.logits(h)[0].double(), -1)
            nxt = o.tokens[len(hist)]
            pits.append(float(q[:nxt].sum() + torch.rand((), generator=u, dtype=torch.float64) * q[nxt]))
    pits = sorted(pits[:n])
    ks = max(max((i + 1) / n - p, p - i / n) for i, p in enumerate(pits))
    assert ks < 1.63 / n**0.5, f"KS statistic {ks:.3f}: the resumed draws do not follow the target (p < 0.01)"


# ---- resume after a cached prefix (models/prefixcache.py) ------------------------------------------
MB = 1 << 20


@pytest.fixture(scope="module")
def full(tiny_src):
    return Stage.load(tiny_src, dtype="fp32")


NEW = 30  # tokens of the second turn


@pytest.fixture(scope="module")
def turns(full):
    """A first turn's prompt and a second's that starts with the first turn's context (prompt, answer, a
    new message), with the second's greedy reference: (p1, p2, want, gaps)."""
    g = torch.Generator().manual_seed(11)
    p1 = torch.randint(0, 64, (70,), generator=g).tolist()
    out1, _ = greedy_reference(full, p1, 12, set())
    p2 = p1 + out1 + torch.randint(0, 64, (9,), generator=g).tolist()
    return p1, p2, *greedy_reference(full, p2, NEW, set())


def first_turn_kept(tiny_src, full, turns, now: list[float]) -> tuple[InProcessPipeline, int]:
    """A 3-stage pipeline with prefix caches on and an EAGLE drafter (it needs every position's features),
    after the first turn finished and was kept; returns it and the kept length (whole blocks)."""
    p1, p2 = turns[:2]
    pipe = build_local_pipeline(tiny_src, 3, eagle_factory(full), full=full, prefix_bytes=64 * MB, clock=lambda: now[0])
    pipe.submit(Request("t1", p1, 12, "flow"))
    out1 = pipe.run()["t1"]
    assert out1.reason == "length", out1.error
    assert p1 + out1.tokens == p2[: len(p1) + 12], (
        "the first turn's answer is not the greedy one the second's prompt holds"
    )
    return pipe, (len(p1) + len(out1.tokens) - 1) // PREFIX_BLOCK * PREFIX_BLOCK


def run_until_emitted(pipe: InProcessPipeline, rid: str, n: int) -> list[int]:
    step_until(pipe, lambda: len(pipe.outcomes[rid].tokens) >= n)
    assert pipe.outcomes[rid].reason is None, "finished before the pause: give it more tokens to write"
    return list(pipe.outcomes[rid].tokens)


def replayed(acts) -> tuple[list[Segment], list[int]]:
    """The segments of a resume's replay, and the positions they compute."""
    segs = [a.segment for a in acts if isinstance(a, SendSegment)]
    return segs, [n for s in segs for n in s.positions]


def second_turn_running(tiny_src, full, turns, now: list[float]) -> tuple[InProcessPipeline, int, list[int]]:
    """Turn 1 finished and kept; turn 2 ("t2") has emitted 5 tokens. Returns the pipeline, the kept prefix
    length and what t2 emitted."""
    pipe, kept = first_turn_kept(tiny_src, full, turns, now)
    pipe.submit(Request("t2", turns[1], NEW, "flow"))
    return pipe, kept, run_until_emitted(pipe, "t2", 5)


def test_a_resume_on_the_same_ring_starts_after_the_kept_prefix(tiny_src, full, turns):
    _, p2, want, gaps = turns
    now = [0.0]
    pipe, kept, emitted = second_turn_running(tiny_src, full, turns, now)
    orig = pipe.originator
    orig.pause("t2")  # a send to a stage failed; the ring is still there
    now[0] += 5.0
    acts = orig.resume_waiting(older_than=5.0)
    history = p2 + emitted[:-1]
    segs, positions = replayed(acts)
    assert segs[0].prefix is not None and segs[0].prefix.length == kept
    assert positions == list(range(kept, len(history)))  # the kept prefix is not computed again
    assert [t for s in segs for t in s.tokens] == history[kept:]
    pipe.dispatch(acts)
    out = pipe.run()["t2"]
    assert out.reason == "length", out.error
    assert out.tokens[: len(emitted)] == emitted
    assert_matches_greedy(out.tokens, want, gaps)
    assert out.stats.resumed == 1 and out.stats.prefix_misses == 0
    assert out.stats.prefix_hit == 2 * kept  # the prompt's prefill and the replay each started after it
    # the replay's features covered every position: the finished turn is kept with them for the next
    nxt = p2 + out.tokens + [1, 2]
    m = orig.prefix_book.match(nxt, need_feats=True)
    assert m is not None and m.length == (len(p2) + len(out.tokens) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
    assert all(not w.sessions and not w.missed for w in pipe.workers)


def test_an_evicted_prefix_during_a_replay_restarts_the_whole_history(tiny_src, full, turns, monkeypatch):
    _, p2, want, gaps = turns
    pipe, kept, emitted = second_turn_running(tiny_src, full, turns, [0.0])
    orig = pipe.originator
    pipe.workers[1].prefixes.reclaim(10**9)  # the middle stage dropped what it kept; the book still believes
    restarts = []
    miss = orig.prefix_miss

    def heard_miss(ring_id: str):
        restarts.append(miss(ring_id))
        return restarts[-1]

    monkeypatch.setattr(orig, "prefix_miss", heard_miss)
    orig.pause("t2")
    acts = orig.resume_waiting()
    assert replayed(acts)[0][0].prefix.length == kept
    pipe.dispatch(acts)
    out = pipe.run()["t2"]
    assert out.reason == "length", out.error
    history = p2 + emitted[:-1]
    segs, positions = replayed(restarts[0])
    assert segs[0].restart and segs[0].prefix is None
    assert positions == list(range(len(history))) and [t for s in segs for t in s.tokens] == history
    assert all(r == [] for r in restarts[1:])  # one restart per prefill, however many stages miss
    assert_matches_greedy(out.tokens, want, gaps)
    assert out.stats.prefix_misses == 1 and out.stats.prefix_hit == kept  # the prompt's hit; the replay's missed
    assert all(not w.sessions and not w.missed for w in pipe.workers)


def test_after_a_new_plan_only_prefixes_kept_under_it_match(tiny_src, full, turns):
    p1, p2, want, gaps = turns
    pipe, kept, emitted = second_turn_running(tiny_src, full, turns, [0.0])
    orig = pipe.originator
    # a re-plan that moves layers: 3 stages become 2, under epoch 1
    pipe.lose_ring()
    orig.set_epoch(1)
    workers, curves = local_stages(full, 2, prefix_bytes=64 * MB)
    for w in workers:
        w.set_epoch(1)
    pipe.workers = workers
    acts = orig.on_ring(curves)
    segs, positions = replayed(acts)
    assert segs[0].prefix is None and positions == list(range(len(p2) + len(emitted) - 1))  # nothing stale
    pipe.dispatch(acts)
    # another request with the first turn's prompt finishes on the new ring and is kept under epoch 1
    pipe.submit(Request("x", [*p1, 3, 3, 3], 2, "flow"))
    step_until(pipe, lambda: pipe.outcomes["x"].reason is not None)
    assert pipe.outcomes["x"].reason == "length" and pipe.outcomes["x"].stats.prefix_hit == 0
    emitted = run_until_emitted(pipe, "t2", len(emitted) + 2)
    # a transient path break on the new ring: the replay starts after the prefix x kept there
    orig.pause(resumed_ring_id("t2", 1))
    acts = orig.resume_waiting()
    segs, positions = replayed(acts)
    shared = len(p1) // PREFIX_BLOCK * PREFIX_BLOCK
    assert segs[0].prefix is not None and segs[0].prefix.epoch == 1 and segs[0].prefix.length == shared
    assert positions == list(range(shared, len(p2) + len(emitted) - 1))
    pipe.dispatch(acts)
    out = pipe.run()["t2"]
    assert out.reason == "length", out.error
    assert_matches_greedy(out.tokens, want, gaps)
    assert out.stats.resumed == 2 and out.stats.prefix_misses == 0
    assert out.stats.prefix_hit == kept + 0 + shared  # the prompt's, the new plan's replay's, the last replay's
