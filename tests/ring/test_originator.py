"""The originator fed hand-made events: no stages, no sockets, no daemon.

The target is a tiny random model; a "stage result" is a hand-picked hidden state whose greedy token
under that model's head is known (``Target.hidden_for``), so each test decides what the target says
at every tree node. The drafter is scripted: it always proposes the same tree for a given last token.
"""

from __future__ import annotations

import math

import pytest
import torch

from meshd.ring import scheduler
from meshd.ring.messages import PROMPT_PARENT, Prune, Result, Segment
from meshd.ring.scheduler import CloseSessions, Emit, Finish, Originator, Request, SendPrune, SendSegment
from models.budget import CostCurve
from models.engine import Stats
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree

FLAT = CostCurve({1: 1.0, 2: 1.0})  # flat: every drafted node is worth verifying; flat rows = 2
FLAT64 = CostCurve({1: 1.0, 64: 1.0})  # flat, measured up to 64 rows: a prompt's prefill chunks may be that wide
FLAT256 = CostCurve({1: 1.0, 256: 1.0})


class Target:
    """The tiny model's head, and for each token a hidden state the head turns into that token."""

    def __init__(self, head: Stage):
        self.head = head
        g = torch.Generator().manual_seed(0)
        bank = torch.randn(4000, head.cfg.hidden_size, generator=g) * 3
        logits = head.logits(head.final_norm(bank), normed=True)
        top = logits.topk(2, dim=-1)
        self.by_token: dict[int, torch.Tensor] = {}
        for i in range(bank.shape[0]):
            tok, margin = int(top.indices[i, 0]), float(top.values[i, 0] - top.values[i, 1])
            if margin > 0.5 and tok not in self.by_token:  # a clear winner, whatever the batch shape
                self.by_token[tok] = bank[i]
        self.tokens = sorted(self.by_token)

    def hidden_for(self, tokens: list[int]) -> torch.Tensor:
        return torch.stack([self.by_token[t] for t in tokens])


@pytest.fixture(scope="module")
def target(tiny_dir) -> Target:
    t = Target(Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32"))
    assert len(t.tokens) >= 8, "the bank should reach enough distinct tokens"
    return t


class Scripted:
    """A drafter that proposes ``trees[last token]`` (as (parent index, token, probability) rows under the
    root) and records what the originator tells it."""

    name = "scripted"

    def __init__(self, trees: dict[int, list[tuple[int, int, float]]]):
        self.trees = trees
        self.resets: list[list[int]] = []
        self.accepted: list[tuple[list[int], int]] = []  # (context, rows of hidden states)
        self.drafted: list[int] = []  # the last token of each draft's context

    def reset(self, prompt: list[int]) -> None:
        self.resets.append(list(prompt))

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        self.drafted.append(context[-1])
        tree = Tree.root(context[-1])
        for parent, tok, p in self.trees.get(context[-1], []):
            tree.add(parent, tok, tree.scores[parent] + math.log(p))
        return tree

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.accepted.append((list(context), 0 if hidden is None else hidden.shape[0]))


def originator(
    target: Target, drafter: Scripted | None = None, stages: int = 1, curves: list[CostCurve] | None = None, **kw
) -> Originator:
    """An originator on a clock that stands still, for ``stages`` flat stages (or ``curves``); by default
    drafting takes no time (``timer``), so the budget's choice depends on the curve only."""
    return Originator(
        target.head,
        (lambda: drafter) if drafter else None,
        curves or [FLAT] * stages,
        clock=lambda: 0.0,
        timer=kw.pop("timer", lambda: 0.0),
        back_off=False,  # every tree drafted: these tests are about how trees are cut (back-off: its own tests)
        origin="me",
        **kw,
    )


def segments(actions) -> list[Segment]:
    return [a.segment for a in actions if isinstance(a, SendSegment)]


def said(target: Target, seg: Segment, tokens: list[int], queue: int = 0) -> Result:
    """The last stage's output for ``seg``: at each row a hidden state for which the target says ``tokens``."""
    return Result(seg.request_id, seg.node_ids, target.hidden_for(tokens), queue)


def prefill(orig: Originator, target: Target, req: Request, first: int) -> list:
    """Submit ``req``, return every prompt chunk at once, the last prompt position saying ``first``;
    the actions of the last result (the first token, the first round)."""
    acts = []
    for seg in segments(orig.submit(req)):
        acts = orig.on_result(said(target, seg, [first] * len(seg)))  # only the last position's token matters
    return acts


# ---- submit and prefill ---------------------------------------------------------------------
def test_submit_cuts_the_prompt_into_committed_chunks_that_the_rings_model_brings_back_soonest(target):
    # a forward costs 1 + rows / 8 on each of 2 stages: n near-equal chunks of 150 rows come back after
    # (2 + n - 1) forwards of ceil(150 / n) rows; 5 chunks of 30 (6 x 4.75 = 28.5) beat 4 (5 x 5.75 = 28.75),
    # 6 (7 x 4.125 = 28.875) and the whole prompt (2 x 19.75 = 39.5)
    steep = CostCurve({1: 1.125, 257: 33.125})
    orig = originator(target, curves=[steep, steep])
    prompt = [target.tokens[i % 4] for i in range(150)]
    acts = orig.submit(Request("r", prompt, 8, "ar"))
    assert all(isinstance(a, SendSegment) for a in acts)
    segs = segments(acts)
    assert [len(s) for s in segs] == [30] * 5
    assert [n for s in segs for n in s.node_ids] == list(range(150))
    assert [p for s in segs for p in s.parents] == [PROMPT_PARENT, *range(149)]
    assert [p for s in segs for p in s.positions] == list(range(150))
    assert [t for s in segs for t in s.tokens] == prompt
    assert all(s.commit and s.origin == "me" and s.hidden is None for s in segs)
    assert orig.live["r"].stats.target_forwards == 5


def test_a_flat_ring_takes_the_prompt_whole_once_its_links_are_measured_as_far_as_its_curves_go(target):
    """On a flat, memory-bound curve 200 rows cost what one does: more chunks only add forwards. Before any
    segment went around alone the links are unknown, and chunks stay at 64 rows; never wider than the
    narrowest stage curve's widest measured forward."""
    orig = originator(target, curves=[FLAT256] * 3)
    assert [len(s) for s in segments(orig.submit(Request("r", [target.tokens[0]] * 150, 8, "ar")))] == [50] * 3
    orig.ring.sent("probe", 1, at=0.0, alone=True)
    orig.ring.returned("probe", at=3.0)  # three flat stages, a free link
    assert [len(s) for s in segments(orig.submit(Request("q", [target.tokens[0]] * 150, 8, "ar")))] == [150]
    assert [len(s) for s in segments(orig.submit(Request("p", [target.tokens[0]] * 600, 8, "ar")))] == [200] * 3
    # no wider than every stage's curve was measured: past that it is a guess
    orig = originator(target, curves=[FLAT256, FLAT256, CostCurve({1: 1.0, 32: 1.0})])
    orig.ring.sent("probe", 1, at=0.0, alone=True)
    orig.ring.returned("probe", at=3.0)
    assert [len(s) for s in segments(orig.submit(Request("r", [target.tokens[0]] * 150, 8, "ar")))] == [30] * 5


def test_submit_refuses_bad_requests(target):
    orig = originator(target)
    with pytest.raises(ValueError, match="mode 'beam'"):
        orig.submit(Request("r", [1, 2], 4, "beam"))
    with pytest.raises(ValueError, match="empty"):
        orig.submit(Request("r", [], 4, "ar"))
    orig.submit(Request("r", [1, 2], 4, "ar"))
    with pytest.raises(ValueError, match="already live"):
        orig.submit(Request("r", [1, 2], 4, "ar"))


def test_prefill_waits_for_every_chunk_then_emits_and_sends_the_root(target):
    a = target.tokens[0]
    orig = originator(target, curves=[FLAT64])
    chunks = segments(orig.submit(Request("r", [target.tokens[1]] * 100, 8, "ar")))  # links unmeasured: 2 x 50
    # the chunks come back in reverse order; only the last prompt position's output decides
    assert orig.on_result(said(target, chunks[1], [target.tokens[2]] * 49 + [a], queue=7)) == []
    assert orig.live["r"].stage_load == 7  # the reported load is kept for tree sizing
    acts = orig.on_result(said(target, chunks[0], [target.tokens[3]] * 50))
    assert acts[0] == Emit("r", [a])
    (root,) = segments(acts[1:])
    assert len(acts) == 2
    assert (root.node_ids, root.parents, root.positions, root.tokens) == ([100], [99], [100], [a])
    assert not root.commit


def test_the_prefill_time_is_the_clock_from_submit_to_the_prompts_last_row(target):
    now = [10.0]
    orig = Originator(target.head, None, [FLAT64], clock=lambda: now[0], timer=lambda: 0.0, origin="me")
    (chunk,) = segments(orig.submit(Request("r", [target.tokens[1]] * 10, 4, "ar")))
    now[0] = 10.25
    (root,) = segments(orig.on_result(said(target, chunk, [target.tokens[0]] * 10))[1:])
    now[0] = 10.5
    orig.on_result(said(target, root, [target.tokens[2]]))
    assert orig.live["r"].stats.prefill_seconds == pytest.approx(0.25)  # the decode rate starts there


# ---- rounds ---------------------------------------------------------------------------------
def test_ar_passes_emit_one_token_each_and_prune_to_the_accepted_node(target):
    a, b, c = target.tokens[:3]
    orig = originator(target)
    acts = prefill(orig, target, Request("r", [a, b], 8, "ar"), first=c)
    (root,) = segments(acts)
    acts = orig.on_result(said(target, root, [a]))
    assert acts[:2] == [Emit("r", [a]), SendPrune(Prune("r", upto=2, keep=[2], commit=[2]))]
    (nxt,) = segments(acts[2:])
    assert (nxt.node_ids, nxt.parents, nxt.positions, nxt.tokens) == ([3], [2], [3], [a])
    st = orig.live["r"].stats
    assert (st.rounds, st.per_round, st.accepted_drafts, st.target_forwards) == (1, [1], 0, 3)


def test_chunk_verifies_once_the_whole_tree_is_back(target):
    p, a, b, c, z = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.9), (1, b, 0.9), (2, c, 0.9)]})  # a chain under the root
    orig = originator(target, drafter, stages=2)
    acts = prefill(orig, target, Request("r", [a, b, c], 16, "chunk"), first=p)
    assert acts[0] == Emit("r", [p])
    s1, s2 = segments(acts)  # one chunk per stage, in tree order
    assert (s1.node_ids, s1.parents, s1.positions, s1.tokens) == ([3, 4], [2, 3], [3, 4], [p, a])
    assert (s2.node_ids, s2.parents, s2.positions, s2.tokens) == ([5, 6], [4, 5], [5, 6], [b, c])
    # the target accepts a and b, then says z instead of c
    # the first half alone would already decide a and b (flow would emit them): chunk waits for the whole tree
    assert orig.on_result(said(target, s1, [a, b])) == []
    acts = orig.on_result(said(target, s2, [z, a]))
    assert acts[0] == Emit("r", [a, b, z])
    assert acts[1] == SendPrune(Prune("r", upto=6, keep=[3, 4, 5], commit=[3, 4, 5]))
    new = segments(acts[2:])
    assert new[0].node_ids[0] == 7 and new[0].parents[0] == 5 and new[0].tokens[0] == z
    assert new[0].positions[0] == 6  # prompt at 0-2, p, a, b at 3-5
    st = orig.live["r"].stats
    assert (st.rounds, st.per_round, st.accepted_drafts, st.verified_nodes) == (1, [3], 2, 4 + 1)
    # the drafter heard the prompt, then the accepted path with the target's features of p, a, b
    assert drafter.resets == [[a, b, c]]
    assert drafter.accepted == [([a, b, c, p], 3), ([a, b, c, p, a, b, z], 3)]


def test_the_tokens_and_prune_come_before_the_next_rounds_draft(target):
    """verify_result decides and emits; follow_up drafts the round the walk moved to and sends it (once), so
    a driver can send the client's tokens and the stages' prune before the drafting: on_result is both."""
    p, a, b, c, z = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.9), (1, b, 0.9)], z: [(0, a, 0.9)]})
    orig = originator(target, drafter, stages=2)
    *chunks, last = segments(orig.submit(Request("r", [a, b, c], 16, "chunk")))
    for chunk in chunks:
        assert orig.verify_result(said(target, chunk, [p] * len(chunk))) == [] and orig.follow_up("r") == []
    assert orig.verify_result(said(target, last, [p] * len(last))) == [Emit("r", [p])]  # the first token
    assert drafter.drafted == []  # not drafted yet
    s1, s2 = segments(orig.follow_up("r"))  # the first round: drafted now, one chunk per stage
    assert drafter.drafted == [p] and (s1.tokens, s2.tokens) == ([p, a], [b])
    assert orig.follow_up("r") == []  # once per verified result
    assert orig.verify_result(said(target, s1, [a, b])) == [] and orig.follow_up("r") == []  # chunk waits
    assert orig.verify_result(said(target, s2, [z])) == [
        Emit("r", [a, b, z]),
        SendPrune(Prune("r", upto=5, keep=[3, 4, 5], commit=[3, 4, 5])),
    ]
    assert drafter.drafted == [p]
    (nxt,) = segments(orig.follow_up("r"))[:1]
    assert drafter.drafted == [p, z] and nxt.tokens[0] == z
    assert orig.follow_up("unknown") == []


def test_a_result_verified_before_the_previous_ones_follow_up_starts_that_round_first(target):
    """Two results of one request in one device step: each is verified, then followed up. The second's
    verification first does what the first's walk called for, so the request goes on exactly as with
    on_result per result (the same tokens, prunes, segments and drafter calls)."""
    p, a, b, c, d, e = target.tokens[:6]
    trees = {p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9)], c: [(0, d, 0.9)]}

    def run(split: bool) -> tuple[list, Scripted, list[int]]:
        drafter = Scripted(trees)
        orig = originator(target, drafter, stages=2, flow_slots=1)
        s1, s2 = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
        if split:
            acts = orig.verify_result(said(target, s1, [a, c])) + orig.verify_result(said(target, s2, [d, e]))
            acts += orig.follow_up("r")
        else:
            acts = orig.on_result(said(target, s1, [a, c])) + orig.on_result(said(target, s2, [d, e]))
        return acts, drafter, orig.live["r"].out

    split, split_drafter, split_out = run(True)
    joined, joined_drafter, joined_out = run(False)
    assert [type(x) for x in split] == [Emit, SendPrune, SendSegment, Emit, SendPrune]
    assert split == joined and split_out == joined_out == [p, a, c, d]
    assert split_drafter.accepted == joined_drafter.accepted and split_drafter.drafted == joined_drafter.drafted


def test_flow_and_chunk_cut_the_same_tree_differently(target):
    p, a, b, c = target.tokens[:4]
    # scores: a 0.6, b 0.3, c (under a) 0.6 * 0.9 = 0.54: score order root, a, c, b; tree order root, a, b, c
    tree = {p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9)]}
    cut = {}
    for mode in ("chunk", "flow"):
        orig = originator(target, Scripted(tree), stages=2, flow_slots=1)  # one tree per round, as before slots
        segs = segments(prefill(orig, target, Request("r", [a, b], 8, mode), first=p))
        cut[mode] = [s.tokens for s in segs]
        assert orig.live["r"].stats.target_forwards == 1 + (1 if mode == "chunk" else len(segs))
    assert cut["chunk"] == [[p, a], [b, c]]
    assert cut["flow"] == [[p, a], [c, b]]


def test_flow_decides_step_wise_prunes_and_extends_the_tree(target):
    p, a, b, c, d, e = target.tokens[:6]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9)], c: [(0, d, 0.9)]})
    orig = originator(target, drafter, stages=2, flow_slots=1)  # one tree per round, as before slots
    s1, s2 = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert (s1.node_ids, s1.tokens, s2.node_ids, s2.tokens) == ([2, 3], [p, a], [5, 4], [c, b])
    # the first segment is back: the target takes a, then says c, whose own output is still in flight
    acts = orig.on_result(said(target, s1, [a, c]))
    assert acts[0] == Emit("r", [a, c])
    # b (node 4) loses; c (node 5) is accepted context already, its subtree survives
    assert acts[1] == SendPrune(Prune("r", upto=5, keep=[2, 3, 5], commit=[2, 3, 5]))
    (ext,) = segments(acts[2:])  # the tree re-drafted from c: d hangs under c
    assert (ext.node_ids, ext.parents, ext.positions, ext.tokens) == ([6], [5], [5], [d])
    assert orig.live["r"].in_flight == {5, 6}
    # c's output (with the pruned b's) is back: the target takes d; d's output is in flight
    acts = orig.on_result(said(target, s2, [d, e]))
    assert acts[0] == Emit("r", [d])
    assert acts[1] == SendPrune(Prune("r", upto=6, keep=[5, 6], commit=[5, 6]))
    assert segments(acts[2:]) == []  # nothing drafted under d
    acts = orig.on_result(said(target, ext, [e]))  # d's output: e, which the tree does not hold
    assert acts[0] == Emit("r", [e])
    assert acts[1] == SendPrune(Prune("r", upto=6, keep=[6], commit=[6]))
    (root,) = segments(acts[2:])  # a new round at e, on top of d
    assert (root.node_ids, root.parents, root.positions, root.tokens) == ([7], [6], [6], [e])  # p at 2 ... e at 6
    st = orig.live["r"].stats
    assert st.per_round == [2, 1, 1] and st.rounds == 3
    assert orig.live["r"].out == [p, a, c, d, e]


class Always(Scripted):
    """A drafter that proposes one child, ``token`` with probability ``p``, below whatever came last."""

    def __init__(self, token: int, p: float):
        super().__init__({})
        self.token, self.p = token, p

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        tree = Tree.root(context[-1])
        tree.add(0, self.token, math.log(self.p))
        return tree


def flow_trees(target: Target, drafter: Always, says: dict[int, list[int]], trees: int) -> tuple[list[int], Stats]:
    """Rows of each tree a flow request sends (one segment a tree) on a clock where a one-row tree takes
    1 s and a drafted one 1.5 s, and the request's statistics; ``says[rows]``: what the target says at
    each of a tree's rows."""
    now = [0.0]
    orig = Originator(target.head, lambda: drafter, [FLAT], clock=lambda: now[0], timer=lambda: 0.0, flow_slots=1)
    acts = prefill(
        orig, target, Request("r", [target.tokens[0], target.tokens[1]], 4 * trees, "flow"), first=says[1][0]
    )
    rows = []
    for _ in range(trees):
        (seg,) = segments(acts)
        rows.append(len(seg))
        now[0] += 1.0 if len(seg) == 1 else 1.5
        acts = orig.on_result(said(target, seg, says[len(seg)]))
    return rows, orig.live["r"].stats


def test_flow_backs_off_to_plain_trees_while_drafted_ones_are_slower_and_probes_again(target):
    """flow is never slower than ar: a request's first tree is plain (its root alone), each tree's wall
    time goes to the budget, and while drafted trees yield fewer tokens a second than plain ones the
    request sends plain trees, probing with a drafted one after 2, then 4 (doubling) plain ones. A verdict
    needs 5 drafted trees (a decayed count of 3): one unlucky tree must not stop drafts that pay."""
    x, u = target.tokens[2:4]
    rejected = {1: [u], 2: [u, u]}  # the target says u at the root: the drafted x is rejected, 1 token a tree
    rows, stats = flow_trees(target, Always(x, 0.9), rejected, 14)
    assert rows == [1, 2, 2, 2, 2, 2, 1, 1, 2, 1, 1, 1, 1, 2]
    assert (stats.trees, stats.plain_trees) == (14, 7)  # the records say how often the budget backed off


def test_a_flow_request_drafts_its_first_tree_once_the_ring_timed_a_plain_one(target):
    """Only while the ring has timed no plain tree (an ar request's token is one) is a flow request's first
    tree plain: it is what drafted trees are judged against, the same for every request on the ring."""
    x, u = target.tokens[2:4]
    now = [0.0]
    orig = Originator(target.head, lambda: Always(x, 0.9), [FLAT], clock=lambda: now[0], timer=lambda: 0.0)
    prompt = [target.tokens[0], target.tokens[1]]
    (root,) = segments(prefill(orig, target, Request("a", prompt, 3, "ar"), first=u))
    now[0] += 1.0
    orig.on_result(said(target, root, [u]))  # the ar request's first tree ends: a plain one timed
    (seg,) = segments(prefill(orig, target, Request("f", prompt, 8, "flow"), first=u))
    assert seg.tokens == [u, x]


def test_flow_keeps_drafting_while_drafted_trees_pay(target):
    x, u = target.tokens[2:4]
    accepted = {1: [u], 2: [x, u]}  # x accepted, then u: 2 tokens in 1.5 s against 1 in 1 s
    rows, stats = flow_trees(target, Always(x, 0.9), accepted, 6)
    assert rows == [1, 2, 2, 2, 2, 2] and (stats.trees, stats.plain_trees) == (6, 1)


# ---- finishing ------------------------------------------------------------------------------
def test_eos_stops_closes_and_a_late_result_is_ignored(target):
    p, a, b, eos = target.tokens[:4]
    drafter = Scripted({p: [(0, a, 0.9), (1, eos, 0.9), (2, b, 0.9)]})
    orig = originator(target, drafter)
    (seg,) = segments(prefill(orig, target, Request("r", [a, b], 16, "chunk", eos=frozenset({eos})), first=p))
    assert seg.tokens == [p, a]  # the stop token and what follows it get no row: a's row decides the stop
    acts = orig.on_result(said(target, seg, [a, eos]))
    assert acts[0] == Emit("r", [a, eos])  # nothing after the stop token
    assert acts[1] == CloseSessions("r")
    fin = acts[2]
    assert isinstance(fin, Finish) and (fin.request_id, fin.reason, fin.error) == ("r", "stop", None)
    assert fin.stats.new_tokens == 3 and len(acts) == 3  # p, a, eos; no prune, no new round
    assert "r" not in orig.live
    assert orig.on_result(said(target, seg, [a, eos])) == []


def test_length_cuts_the_accepted_tokens_at_max_new_tokens(target):
    p, a, b, c = target.tokens[:4]
    drafter = Scripted({p: [(0, a, 0.9), (1, b, 0.9), (2, c, 0.9)], a: [(0, b, 0.9)]})
    orig = originator(target, drafter)
    (seg,) = segments(prefill(orig, target, Request("r", [a, b], 3, "chunk"), first=p))
    assert seg.tokens == [p, a]  # 2 tokens left: b, the last, needs no row (a's row decides it), c none either
    acts = orig.on_result(said(target, seg, [a, b]))
    assert acts[0] == Emit("r", [a, b])
    assert acts[1] == CloseSessions("r") and acts[2].reason == "length" and acts[2].stats.new_tokens == 3

    drafts = []
    drafter.draft = lambda context, **kw: drafts.append(len(context)) or Scripted.draft(drafter, context, **kw)
    orig = originator(target, drafter)
    (seg,) = segments(prefill(orig, target, Request("r", [a, b], 2, "chunk"), first=p))
    assert seg.tokens == [p] and drafts == []  # one token left: nothing is drafted for it
    acts = orig.on_result(said(target, seg, [a]))
    assert acts[0] == Emit("r", [a]) and acts[2].reason == "length"


def test_cancel_closes_once_and_results_after_it_are_ignored(target):
    p, a = target.tokens[:2]
    orig = originator(target)
    (root,) = segments(prefill(orig, target, Request("r", [a], 8, "ar"), first=p))
    acts = orig.cancel("r")
    assert acts[0] == CloseSessions("r")
    assert isinstance(acts[1], Finish) and (acts[1].reason, acts[1].error) == ("cancelled", None)
    assert acts[1].stats.target_forwards == 2  # the stats so far travel with the finish
    assert orig.cancel("r") == [] and orig.on_result(said(target, root, [a])) == []


def test_a_failure_is_a_cancel_with_reason_error(target):
    orig = originator(target)
    orig.submit(Request("r", [target.tokens[0]], 8, "ar"))
    close, fin = orig.cancel("r", "error", "lost the link to peer x")
    assert close == CloseSessions("r")
    assert (fin.reason, fin.error) == ("error", "lost the link to peer x")


def test_ring_lost_fails_every_live_request(target):
    orig = originator(target)
    for rid in ("a", "b"):
        orig.submit(Request(rid, [target.tokens[0]], 8, "ar"))
    acts = orig.ring_lost("peer p holding layers was lost")
    assert [type(a) for a in acts] == [CloseSessions, Finish, CloseSessions, Finish]
    assert [a.request_id for a in acts] == ["a", "a", "b", "b"]
    assert all(a.reason == "error" and a.error == "peer p holding layers was lost" for a in acts[1::2])
    assert orig.live == {} and orig.ring_lost("again") == []


# ---- flow with segments in flight -------------------------------------------------------------
STEEP = CostCurve({1: 1.0, 64: 64.0})  # a row costs as much as a forward: the first segment stays small


def test_flow_slots_send_a_small_first_segment_then_fillers_in_score_order(target):
    p, a, b, c, d = target.tokens[:5]
    # score order: a 0.6, c (under a) 0.54, b 0.3, d (under b) 0.15
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)]})
    orig = originator(target, drafter, curves=[STEEP] * 2, flow_slots=3)
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert [s.first for s in segs] == [True] + [False] * (len(segs) - 1)
    assert len(segs) == 3 and segs[0].tokens[0] == p and segs[0].node_ids[0] == 2  # the root goes first
    # a row costs a forward here: one node per segment, the best unsent candidates first, until the slots are full
    assert [s.tokens for s in segs] == [[p], [a], [c]]
    sent = {n for s in segs for n in s.node_ids}
    assert all(par in sent | {1} for s in segs for par in s.parents)  # every parent sent before its child
    assert orig.live_segments() == {"r": 3}


def test_flow_under_load_sends_no_fillers_and_sizes_first_segments_with_the_others_rows(target):
    """FASER's rule for segments: a request alone fills its slots; one that shares the ring with another
    request's rows in flight sends its first segment only (the ring is busy with those rows already)."""
    p, a, b, c, d = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)]})
    orig = originator(target, drafter, curves=[STEEP] * 2, flow_slots=3)
    alone = segments(prefill(orig, target, Request("r1", [a, b], 16, "flow"), first=p))
    assert len(alone) == 3  # a first segment and two fillers, as in the test above
    shared = segments(prefill(orig, target, Request("r2", [a, b], 16, "flow"), first=p))
    assert len(shared) == 1 and shared[0].first and shared[0].tokens == [p]
    assert orig.live_segments() == {"r1": 3, "r2": 1}


def test_flow_sends_no_fillers_while_the_last_stage_reports_another_originators_rows(target):
    """A request of another originator is not in this originator's books; the last stage tells with each
    result how many rows of other requests it holds (``Result.stage_queue``), and while there are any the
    request sends first segments only, as under its own originator's load."""
    p, a, b, c, d = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)]})

    def run(load: int) -> list[Segment]:
        orig = originator(target, drafter, curves=[STEEP] * 2, flow_slots=3)
        acts = []
        for seg in segments(orig.submit(Request("r", [a, b], 16, "flow"))):
            acts = orig.on_result(said(target, seg, [p] * len(seg), queue=load))
        return segments(acts)

    assert len(run(0)) == 3  # alone: a first segment and two fillers
    shared = run(5)
    assert len(shared) == 1 and shared[0].first and shared[0].tokens == [p]


def test_flow_refills_a_slot_freed_by_a_prune_and_restarts_at_once_from_the_bonus_token(target):
    p, a, b, c, d, z = target.tokens[:6]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)], z: [(0, a, 0.9)]})
    orig = originator(target, drafter, curves=[STEEP] * 2, flow_slots=3)
    s1, s2, _ = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    # the root says z: no child matches, the round ends; every other segment is dead, the ring refills now
    acts = orig.on_result(said(target, s1, [z] * len(s1)))
    assert acts[0] == Emit("r", [z])
    assert isinstance(acts[1], SendPrune) and acts[1].prune.keep == [2]
    new = segments(acts[2:])
    assert new[0].first and new[0].tokens[0] == z and new[0].parents[0] == 2
    assert orig.live_segments() == {"r": len(new)}
    # a late result for the dead segments moves nothing and sends nothing beyond the slots
    assert segments(orig.on_result(said(target, s2, [a] * len(s2)))) == []
    assert orig.live_segments() == {"r": len(new)}


def test_a_filler_goes_out_only_if_the_first_stage_is_done_with_it_before_the_next_first_segment(target):
    """With slots from the ring's timing, a filler must leave the first stage before the earliest of the
    request's segments in flight is expected back (that return may move the walk, which then sends a
    first segment, and a forward cannot be stopped). Here stage 0 costs a second per row and stage 1 half
    a second: the root's trip is 1.5 s and its forward at stage 0 takes 1 s, so a filler of a row (1 s)
    does not fit, although ``ceil(latency / step)`` = 2 slots would have sent one."""
    p, a, b, c, d = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)]})
    now = [0.0]
    curves = [STEEP, CostCurve({1: 0.5, 64: 0.5})]

    def make(**kw) -> Originator:
        return Originator(
            target.head, lambda: drafter, curves, clock=lambda: now[0], timer=lambda: 0.0, back_off=False, **kw
        )

    orig = make()
    assert orig.ring.slots(1, 8) == 2
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert [s.tokens for s in segs] == [[p]] and segs[0].first  # the root alone, no filler behind it
    # the same ring with the first stage as cheap as the second: the root's forward (0.5 s) leaves a second
    # of its 1 s trip for a filler, of one row (two rows would take the first stage a whole second)
    curves[0] = CostCurve({1: 0.5, 2: 1.0, 64: 32.0})
    now[0] = 10.0
    orig = make()
    segs = segments(prefill(orig, target, Request("r2", [a, b], 16, "flow"), first=p))
    assert [s.tokens for s in segs] == [[p], [a]] and [s.first for s in segs] == [True, False]
    # configured slots are kept as configured
    orig = make(flow_slots=3)
    segs = segments(prefill(orig, target, Request("r3", [a, b], 16, "flow"), first=p))
    assert len(segs) == 3


def test_a_stage_on_the_originators_device_holds_fillers_for_a_result_due_before_their_forward_ends(target):
    """On a device that runs a stage past the first, fillers reach that stage right behind each first
    segment; a result due back before such a forward would end waits for it unless the forward waits, at
    most a quarter of the forward past the expected return (``HOLD_SLACK``). Three stages of a second a
    forward, the originator's device running the middle one: the root leaves at 0 and is due back at 3 s."""
    from meshd.ring.scheduler import HOLD_SLACK

    p, a, b = target.tokens[:3]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3)]})
    now = [0.0]

    def make(local: int | None) -> Originator:
        return Originator(
            target.head,
            lambda: drafter,
            [FLAT] * 3,
            clock=lambda: now[0],
            timer=lambda: 0.0,
            back_off=False,
            local_stage=local,
        )

    orig = make(local=1)
    assert orig.hold_stage(2, 0.0) is None  # nothing of its own in flight
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    due = orig.ring.latency(len(segs[0]))
    assert due == pytest.approx(3.0)
    until = due + HOLD_SLACK * 1.0
    assert orig.hold_stage(2, 1.9) is None  # the forward (1 s) would end before the result comes
    assert orig.hold_stage(2, 2.5) == pytest.approx(until)  # it would still be computing at 3 s: wait
    assert orig.hold_stage(2, 3.1) == pytest.approx(until)  # a little late: still worth waiting for
    assert orig.hold_stage(2, until) is None  # late by more than the slack: go ahead
    assert orig.hold_stage(0, 2.5) is None
    # the result back at 3 s: what is due now is the next round's first segment, sent then
    now[0] = 3.0
    nxt = segments(orig.on_result(said(target, segs[0], [a] * len(segs[0]))))
    assert nxt and nxt[0].first
    due = 3.0 + orig.ring.latency(len(nxt[0]))
    assert orig.hold_stage(2, 3.0) is None
    assert orig.hold_stage(2, due - 0.5) == pytest.approx(due + HOLD_SLACK)
    # an originator whose device runs no stage never holds one
    other = make(local=None)
    segments(prefill(other, target, Request("s", [a, b], 16, "flow"), first=p))
    assert other.hold_stage(2, 2.5) is None


def test_ring_timer_counts_the_originators_own_stage_and_its_work_as_one_step():
    """An originator that also runs a stage does both in one thread: there a step is the stage's forward
    plus the originator's work per segment, not the larger of the two."""
    from meshd.ring.ringtime import RingTimer

    curves = [CostCurve({1: 0.010, 64: 0.010})] * 2
    apart, shared = RingTimer(curves), RingTimer(curves, local=0)
    for ring in (apart, shared):
        ring.originator_work(0.006)
    assert apart.step(1) == pytest.approx(0.010) and shared.step(1) == pytest.approx(0.016)
    assert apart.latency(1) == shared.latency(1) == pytest.approx(0.026)
    assert apart.slots(1, 8) == 3 and shared.slots(1, 8) == 2
    with pytest.raises(ValueError, match="local stage 2"):
        RingTimer(curves, local=2)


def test_ring_timer_learns_the_links_from_lone_segments():
    from meshd.ring.ringtime import RingTimer

    ring = RingTimer([CostCurve({1: 0.010, 64: 0.010})] * 4)  # flat stages: 40 ms of compute per trip
    assert ring.latency(8) == pytest.approx(0.040) and ring.slots(8, 16) == 4
    for k, rows in enumerate([1, 8, 16, 32] * 5):  # a link: 1 ms per segment + 0.5 ms per row per trip
        ring.sent(k, rows, 0.0, alone=True)
        ring.returned(k, 0.040 + 0.001 + 0.0005 * rows)
    a, b = ring.link()
    assert a == pytest.approx(0.001, abs=1e-4) and b == pytest.approx(0.0005, rel=0.05)
    # 64 rows: each of 4 hops carries them for 8 ms, under a stage's 10 ms; 128 rows: 16 ms, the new slowest step
    assert ring.step(64) == pytest.approx(0.010) and ring.step(128) == pytest.approx(0.016, rel=0.05)
    ring.sent("x", 8, 0.0, alone=False)  # behind others: its trip includes queueing, not a sample
    ring.returned("x", 10.0)
    assert ring.link() == (a, b)


def _chain(target: Target):
    """Slots 3 on a steep curve: the root p, then a (under p), then c (under a) each go as a segment of
    their own, so c is in flight below a node (a) whose own logits are still in flight."""
    p, a, b, c, d = target.tokens[:5]
    drafter = Scripted({p: [(0, a, 0.6), (0, b, 0.3), (1, c, 0.9), (2, d, 0.5)]})
    orig = originator(target, drafter, curves=[STEEP] * 2, flow_slots=3)
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert [s.tokens for s in segs] == [[p], [a], [c]] and segs[2].parents == segs[1].node_ids
    return orig, segs, (p, a, b, c, d)


def test_flow_uses_the_results_of_nodes_sent_below_an_in_flight_node(target):
    orig, (s_root, s_a, s_c), (_, a, _, c, d) = _chain(target)
    acts = orig.on_result(said(target, s_root, [a]))  # the root accepts a, whose logits are on the way
    assert acts[0] == Emit("r", [a])
    assert set(s_c.node_ids) <= set(next(x for x in acts if isinstance(x, SendPrune)).prune.keep)
    acts = orig.on_result(said(target, s_a, [c]))  # a accepts c: c was sent before a was verified
    assert acts[0] == Emit("r", [c])
    assert all(c not in s.tokens for s in segments(acts))  # c is not sent again: its result is on the way
    acts = orig.on_result(said(target, s_c, [d]))  # c's own result decides the next token
    assert acts[0] == Emit("r", [d])
    prune = next(x for x in acts if isinstance(x, SendPrune)).prune
    assert prune.commit == s_c.node_ids  # committed from the third segment (the root and a were before)
    assert segments(acts)[0].first and segments(acts)[0].tokens[0] == d  # the next round starts from the bonus


def test_a_tree_returned_in_three_segments_is_three_steps_of_the_walk_but_one_verified_tree(target):
    orig, (s_root, s_a, s_c), (_, a, _, c, d) = _chain(target)
    stats = orig.live["r"].stats
    for seg, says in ((s_root, a), (s_a, c), (s_c, d)):
        orig.on_result(said(target, seg, [says]))
    # tokens per round falls to 1.0 with slots by construction; per tree the three tokens count together
    assert (stats.rounds, stats.trees) == (3, 1)
    assert stats.mean_accepted == 1.0 and stats.mean_per_tree == 3.0


def test_flow_prunes_a_segment_below_an_in_flight_node_when_its_ancestor_is_rejected(target):
    orig, (s_root, s_a, s_c), (_, a, _, c, d) = _chain(target)
    orig.on_result(said(target, s_root, [a]))
    acts = orig.on_result(said(target, s_a, [d]))  # a's logits reject c: c is dead while still in flight
    assert acts[0] == Emit("r", [d])
    prune = next(x for x in acts if isinstance(x, SendPrune)).prune
    assert prune.keep == s_a.node_ids and s_c.node_ids[0] not in prune.keep  # a ends the path; the root was kept before
    assert orig.live_segments() == {"r": len(segments(acts))}  # c's slot was freed by the prune
    assert orig.on_result(said(target, s_c, [c])) == []  # its late result moves nothing


@pytest.fixture
def two_levels_first(monkeypatch):
    """The chains of the idle-drafting tests below are written for first segments drafted 2 levels deep and
    idle drafting that stops at 5 (the mechanism; the defaults are a tuning, see IDLE_FIRST_DEPTH)."""
    monkeypatch.setattr(scheduler, "IDLE_FIRST_DEPTH", 2)
    monkeypatch.setattr(scheduler, "IDLE_DEPTH", 5)


class Shallow(Scripted):
    """A scripted drafter that honours ``depth``: nodes deeper than it are not drafted."""

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        full = super().draft(context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)
        tree, where = Tree.root(full.tokens[0]), {0: 0}
        for i in range(1, len(full)):
            if full.depth[i] <= depth:
                where[i] = tree.add(where[full.parents[i]], full.tokens[i], full.scores[i])
        return tree


def test_idle_drafting_sends_a_shallow_first_segment_then_deepens_the_pool_while_it_is_in_flight(
    target, two_levels_first
):
    p, a, b, c, e, f = target.tokens[:6]
    drafter = Shallow({p: [(0, a, 0.9), (1, c, 0.9), (2, e, 0.9), (3, f, 0.9)]})  # one likely chain, 4 deep
    orig = originator(target, drafter, stages=2, draft_when_idle=True)
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    sent = [t for s in segs for t in s.tokens]
    assert sent[0] == p and e not in sent and f not in sent  # only 2 levels drafted before the first segment
    assert orig.idle_work()
    more = segments(orig.idle())
    assert not orig.idle_work()
    deeper = [t for s in more for t in s.tokens]
    assert e in deeper and not any(s.first for s in more)  # the deeper levels go out as fillers
    ids = {t: n for s in segs + more for t, n in zip(s.tokens, s.node_ids)}
    parent_of = {n: par for s in segs + more for n, par in zip(s.node_ids, s.parents)}
    assert parent_of[ids[e]] == ids[c]  # below c, whose own result is still in flight
    # the walk runs down the chain through results of both kinds of segment
    acts = orig.on_result(said(target, segs[0], [a if t == p else c if t == a else e for t in segs[0].tokens]))
    assert acts[0] == Emit("r", [a, c, e])  # e accepted from the first segment's last logits; its own are on the way
    prune = next(x for x in acts if isinstance(x, SendPrune)).prune
    assert ids[e] in prune.keep and ids[e] in prune.commit[-1:]


class Growing(Shallow):
    """A scripted drafter that can also grow a pool (``extend``): below a node it proposes the script's
    children of the same token path under the root of its latest draft, and it counts its calls."""

    def __init__(self, trees: dict[int, list[tuple[int, int, float]]], level_seconds: float = 0.0):
        super().__init__(trees)
        self.drafts, self.extends = 0, 0
        self.anchor: list[int] = []
        self.level_seconds, self.spent = level_seconds, 0.0  # each extend "takes" level_seconds (read: spent)

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        self.drafts += 1
        self.anchor = list(context)
        return super().draft(context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)

    def extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        self.extends += 1
        self.spent += self.level_seconds
        assert context[: len(self.anchor)] == self.anchor, "grows only what it drafted"
        full = Scripted.draft(self, self.anchor, top_k=top_k, depth=99, max_nodes=max_nodes)
        where = {tuple(full.path_tokens(i)): i for i in range(len(full))}
        added = []
        for leaf in leaves:
            at = where.get(tuple(self.anchor[-1:] + context[len(self.anchor) :] + pool.path_tokens(leaf)[1:]))
            for c in full.children(at) if at is not None else []:
                added.append(pool.add(leaf, full.tokens[c], pool.scores[leaf] + full.scores[c] - full.scores[at]))
        return added


@pytest.mark.parametrize("resumable", [True, False])
def test_idle_grows_the_pool_one_level_per_call_and_a_reroot_keeps_the_surviving_pool(
    target, two_levels_first, resumable
):
    """With resumable drafting the pool is drafted once per round: each idle call grows it by one level
    (a result arriving meanwhile waits for one level at most), and after a re-root the surviving sub-pool
    goes on without a new draft. Without it, idle re-drafts from the root and a re-root drafts again."""
    p, a, b, c, e, f, g = target.tokens[:7]
    drafter = Growing({p: [(0, a, 0.9), (1, c, 0.9), (2, e, 0.9), (3, f, 0.9), (4, g, 0.9)]})  # a chain, 5 deep
    orig = originator(target, drafter, stages=2, draft_when_idle=True, resumable_drafting=resumable)
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert drafter.drafts == 1 and [t for s in segs for t in s.tokens] == [p, a, c]  # 2 levels before the first
    calls, more = 0, []
    while orig.idle_work():
        calls += 1
        more += segments(orig.idle())
    assert orig.live["r"].pool.tokens == [p, a, c, e, f, g]  # drafted to the end of the script
    assert [t for s in more for t in s.tokens][:1] == [e]  # the deeper levels go out as fillers, as slots allow
    if resumable:
        assert (calls, drafter.extends, drafter.drafts) == (3, 3, 1)  # e, f, g: one level per call
    else:
        assert (calls, drafter.extends, drafter.drafts) == (1, 0, 2)  # one re-draft from the root
    # the walk accepts a and c from the first segment and waits on e, whose result is in flight
    acts = orig.on_result(said(target, segs[0], [a, c, e]))
    assert acts[0] == Emit("r", [a, c, e])
    assert drafter.drafts == (1 if resumable else 3)
    assert orig.live["r"].pool.tokens == [e, f, g]  # the surviving sub-pool (the pruned part is gone)
    later = [t for s in more + segments(acts) for t in s.tokens]
    assert sorted(later) == sorted([e, f, g])  # each drafted node sent once, as fillers or the frontier's first


@pytest.mark.parametrize("level_seconds, deeper", [(0.01, True), (100.0, False)])
def test_a_first_segment_is_drafted_deeper_while_a_level_costs_less_than_the_step_it_saves(
    target, two_levels_first, level_seconds, deeper
):
    """Drafting when idle sends a round's first segment after 2 levels; once idle drafting has timed a
    level, a later round drafts one more first where that level's time is under the chance of reaching
    it times the ring's slowest step (1 s here: flat stages of 1 s): a cheap level goes with the first
    segment, a dear one is left to idle drafting, which sends it as a filler."""
    p, a, b, c, e, f, g = target.tokens[:7]
    chains = {p: [(0, a, 0.9), (1, c, 0.9), (2, e, 0.9)], b: [(0, f, 0.9), (1, g, 0.9), (2, a, 0.9)]}
    drafter = Growing(chains, level_seconds)
    orig = originator(target, drafter, stages=2, draft_when_idle=True, timer=lambda: drafter.spent)
    segs = segments(prefill(orig, target, Request("r", [a, b], 16, "flow"), first=p))
    assert [t for s in segs for t in s.tokens] == [p, a, c]  # no level timed yet: 2 levels, as always
    while orig.idle_work():
        orig.idle()  # grows e below c: a level timed
    acts = orig.on_result(said(target, segs[0], [a, b, e]))  # a accepted, c rejected: the round ends with b
    assert acts[0] == Emit("r", [a, b])
    first = next(s for s in segments(acts) if s.first)
    assert first.tokens == ([b, f, g, a] if deeper else [b, f, g])
