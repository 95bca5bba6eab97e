"""Prefix caches through the ring without sockets: a chat's later turns start after the KV the stages
kept, and the output is the same token for token (fp32, greedy) as with caching off."""

from __future__ import annotations

import pytest
import torch
from support import assert_matches_greedy, greedy_reference, make_tiny_checkpoint

from meshd.ring.messages import Close, PrefixRef, Segment
from meshd.ring.pipeline import build_local_pipeline
from meshd.ring.scheduler import Request
from meshd.ring.validate import FrameRejected, Limits
from meshd.ring.worker import StageWorker
from models.drafters import MergedDrafter, ModelDrafter, NGramDrafter, load_drafter
from models.eagle import EagleDrafter, EagleHead, HeadConfig
from models.prefixcache import PREFIX_BLOCK, chain_hashes
from models.source import ModelSource
from models.stage import Stage

MB = 1 << 20


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return ModelSource.resolve(make_tiny_checkpoint(tmp_path_factory.mktemp("pfx") / "m", num_hidden_layers=6))


@pytest.fixture(scope="module")
def full(tiny_src):
    return Stage.load(tiny_src, dtype="fp32")


def eagle_factory(target: Stage):
    torch.manual_seed(0)
    head = EagleHead(HeadConfig.for_target(target.cfg), target.cfg).eval()
    base = EagleDrafter(head, target)
    return lambda: MergedDrafter([base.fresh(), NGramDrafter()])


def chat(pipe, turns: int, mode: str, new: int = 12) -> list[tuple[list[int], list[int], object]]:
    """``turns`` turns: each prompt is the previous prompt, its answer and a new user message."""
    g = torch.Generator().manual_seed(5)
    prompt: list[int] = torch.randint(0, 64, (70,), generator=g).tolist()
    out = []
    for t in range(turns):
        rid = f"t{t}"
        pipe.submit(Request(rid, list(prompt), new, mode))
        res = pipe.run()[rid]
        assert res.reason == "length", res.error
        out.append((list(prompt), res.tokens, res.stats))
        prompt = prompt + res.tokens + torch.randint(0, 64, (9,), generator=g).tolist()
    return out


@pytest.mark.parametrize(("mode", "drafter"), [("flow", "eagle"), pytest.param("ar", "ngram", marks=pytest.mark.slow)])
def test_chat_turns_reuse_prefixes_and_match_caching_off(tiny_src, full, mode, drafter):
    runs = {}
    for on in (False, True):
        pipe = build_local_pipeline(tiny_src, 3, None, full=full, prefix_bytes=64 * MB if on else 0)
        pipe.originator.drafter_factory = NGramDrafter if drafter == "ngram" else eagle_factory(full)
        runs[on] = chat(pipe, 3, mode)
        if on:
            assert all(w.prefixes.tokens > 0 for w in pipe.workers)
            assert all(not w.sessions for w in pipe.workers)
    for (p_off, t_off, s_off), (p_on, t_on, _s_on) in zip(runs[False], runs[True]):
        assert p_off == p_on and t_off == t_on  # the same prompts, the same answers
        assert s_off.prefix_hit == 0
    want, gaps = greedy_reference(full, runs[True][-1][0], 12, set())
    assert_matches_greedy(runs[True][-1][1], want, gaps)
    hits = [s.prefix_hit for _, _, s in runs[True]]
    assert hits[0] == 0
    for (prompt, _, _), (_, _, s), prev in zip(runs[True][1:], runs[True][1:], runs[True]):
        # the previous turn's prompt and answer, but its last sampled token, in whole blocks
        assert s.prefix_hit == (len(prev[0]) + len(prev[1]) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
        assert s.prefix_hit < len(prompt)
        assert s.prefix_misses == 0


def test_shared_system_prompt_reuses_the_common_blocks(tiny_src, full):
    pipe = build_local_pipeline(tiny_src, 2, NGramDrafter, full=full, prefix_bytes=64 * MB)
    system = list(range(3, 3 + 40))
    pipe.submit(Request("a", [*system, 7, 8, 9], 6, "flow"))
    pipe.run()
    prompt = [*system, 11, 12, 13, 14]
    pipe.submit(Request("b", prompt, 6, "flow"))
    out = pipe.run()["b"]
    assert out.stats.prefix_hit == 32  # the system prompt's whole blocks
    want, gaps = greedy_reference(full, prompt, 6, set())
    assert_matches_greedy(out.tokens, want, gaps)


def test_evicted_prefix_is_sent_again_without_failing(tiny_src, full):
    pipe = build_local_pipeline(tiny_src, 3, NGramDrafter, full=full, prefix_bytes=64 * MB)
    first = list(range(5, 60))
    pipe.submit(Request("a", first, 8, "flow"))
    a = pipe.run()["a"].tokens
    pipe.workers[1].prefixes.reclaim(10**9)  # the middle stage dropped everything it kept
    prompt = first + a + [4, 4, 4]
    pipe.submit(Request("b", prompt, 10, "flow"))
    out = pipe.run()["b"]
    assert out.reason == "length", out.error
    assert out.stats.prefix_misses == 1 and out.stats.prefix_hit == 0
    want, gaps = greedy_reference(full, prompt, 10, set())
    assert_matches_greedy(out.tokens, want, gaps)
    assert all(not w.sessions and not w.missed for w in pipe.workers)
    # the restart kept the new context everywhere: the next turn hits again
    pipe.submit(Request("c", prompt + out.tokens + [9, 9], 4, "ar"))
    assert pipe.run()["c"].stats.prefix_hit > len(prompt) - PREFIX_BLOCK


def test_kept_prefixes_yield_to_live_sessions(full):
    """The cache lives inside the stage's KV reservation: a live request that needs the room evicts it."""
    w = StageWorker(full, embed=full.embed, prefix_bytes=64 * MB, limits=Limits(kv_tokens=350))
    prompt = [i % 60 + 1 for i in range(4 * PREFIX_BLOCK + 3)]
    seg = Segment("a", list(range(len(prompt))), [i - 1 for i in range(len(prompt))], list(range(len(prompt))))
    seg.tokens, seg.commit = prompt, True
    w.handle(seg)
    w.step()
    hashes = chain_hashes(prompt, 0)
    w.handle(Close("a", tuple(hashes), (), 0))
    assert w.prefixes.tokens == 4 * PREFIX_BLOCK and w.gate.kv_tokens == 4 * PREFIX_BLOCK
    # a fork counts its prefix as session entries
    ref = PrefixRef(0, 2 * PREFIX_BLOCK, hashes[1])
    n = 2 * PREFIX_BLOCK
    fork = Segment("b", [n, n + 1], [n - 1, n], [n, n + 1], [5, 6], commit=True, prefix=ref)
    w.handle(fork)
    assert w.sessions["b"].cache.length == n and w.prefix_tokens_reused == n
    w.step()
    w.handle(Close("b"))
    # a big request needs more than the reservation leaves next to the cache: the cache gives way
    big = Segment("c", list(range(300)), [i - 1 for i in range(300)], list(range(300)), [3] * 300, commit=True)
    w.max_batch_rows = w.gate.max_rows = 300
    w.handle(big)
    assert w.prefixes.tokens == 0 and w.gate.kv_tokens == 300


def test_a_miss_drops_the_request_until_its_restart(full):
    w = StageWorker(full, embed=full.embed, prefix_bytes=MB)
    ref = PrefixRef(0, PREFIX_BLOCK, 12345)
    n = PREFIX_BLOCK
    seg = Segment("a", [n], [n - 1], [n], [5], commit=True, origin=None, prefix=ref)
    with pytest.raises(FrameRejected) as exc:
        w.handle(seg)
    assert exc.value.code == "prefix_miss" and not exc.value.spoils
    later = Segment("a", [n + 1], [n], [n + 1], [6], commit=True)
    w.handle(later)  # dropped silently: its parent lives only in the prefix this stage lacks
    assert not w.queue and "a" not in w.gate.books
    again = Segment("a", list(range(n + 2)), [i - 1 for i in range(n + 2)], list(range(n + 2)), [1] * (n + 2))
    again.commit, again.restart = True, True
    w.handle(again)
    assert len(w.step()) == 1 and "a" not in w.missed


def test_prefix_reference_checked_at_the_gate(full):
    w = StageWorker(full, embed=full.embed, prefix_bytes=MB)
    for length in (0, 5, full.cfg.max_position):
        seg = Segment(f"x{length}", [length], [length - 1], [length], [5], commit=True, prefix=PrefixRef(0, length, 1))
        with pytest.raises(FrameRejected) as exc:
            w.handle(seg)
        assert exc.value.code == "bad_segment"


def test_a_turn_ending_inside_an_accepted_path_keeps_its_features(tiny_src, full):
    """Perfect drafts accept whole paths; an end token inside one stops the answer there, and the kept
    context (with the features a drafter needs) ends there too, so the next turn still reuses it."""
    d = load_drafter(f"model:{tiny_src.path}", full)
    prompt = [(5 * i) % 60 + 1 for i in range(40)]
    probe = build_local_pipeline(tiny_src, 2, lambda: ModelDrafter(d.model), full=full)
    probe.submit(Request("p", prompt, 20, "flow"))
    free = probe.run()["p"].tokens
    end = free[6]
    pipe = build_local_pipeline(tiny_src, 2, lambda: ModelDrafter(d.model), full=full, prefix_bytes=64 * MB)
    pipe.submit(Request("a", prompt, 20, "flow", eos=frozenset({end})))
    a = pipe.run()["a"]
    assert a.reason == "stop" and a.tokens == free[: free.index(end) + 1]
    assert a.stats.accepted_drafts > 0
    nxt = prompt + a.tokens + [2, 3]
    m = pipe.originator.prefix_book.match(nxt, need_feats=True)
    assert m is not None and m.length == (len(prompt) + len(a.tokens) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
    pipe.submit(Request("b", nxt, 8, "flow"))
    b = pipe.run()["b"]
    assert b.stats.prefix_hit == m.length
    want, gaps = greedy_reference(full, nxt, 8, set())
    assert_matches_greedy(b.tokens, want, gaps)


def test_only_the_unbroken_start_of_the_committed_chain_is_kept(full):
    """A close that commits nodes off the context's chain (a buggy or hostile originator) cannot make a
    stage keep KV of the wrong positions under a prefix's name: keeping stops where the chain breaks."""
    w = StageWorker(full, embed=full.embed, prefix_bytes=MB)
    n = 30
    w.handle(Segment("a", list(range(n)), [i - 1 for i in range(n)], list(range(n)), [3] * n, commit=True))
    w.step()
    side = list(range(n, n + 11))  # a branch off position 10, not a continuation of the prompt
    w.handle(Segment("a", side, [10, *side[:-1]], list(range(11, 22)), [4] * 11))
    w.step()
    w.handle(Close("a", tuple(range(100, 103)), tuple(side), 0))
    assert w.prefixes.tokens == PREFIX_BLOCK  # the prompt's one whole block, not 2 blocks of a mixed chain
