"""A stage worker fed hand-made ring messages: no sockets, no daemon, no originator.

Node ids are request-global; the prompt is ids 0..2 (committed), tree nodes come after. Each test
builds the smallest message sequence that exercises one rule of ``meshd/ring/worker.py``.
"""

from __future__ import annotations

import pytest
import torch
from support import forward_terms, rounding_tolerance

from meshd.ring.messages import PROMPT_PARENT, Close, Prune, Result, Segment
from meshd.ring.validate import FrameRejected
from meshd.ring.worker import StageWorker
from models.budget import CostCurve
from models.source import ModelSource
from models.stage import Stage


@pytest.fixture(scope="module")
def full(tiny_dir) -> Stage:
    return Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")


def worker(full: Stage, **kw) -> StageWorker:
    return StageWorker(full, embed=full.embed, **kw)


def prompt(rid: str = "r") -> Segment:
    return Segment(rid, [0, 1, 2], [PROMPT_PARENT, 0, 1], [0, 1, 2], tokens=[5, 6, 7], commit=True)


def tree(rid: str = "r") -> Segment:
    """Two siblings under the last prompt token (3 and 4) and a child of 3 (5)."""
    return Segment(rid, [3, 4, 5], [2, 2, 3], [3, 3, 4], tokens=[8, 9, 10])


def test_mask_is_committed_context_plus_each_rows_own_ancestors(full):
    w = worker(full)
    w.handle(prompt())
    w.step()
    sess = w.sessions["r"]
    m = sess.mask_for(tree())
    want = torch.tensor(
        [
            # cache: 0 1 2 | rows: 3 4 5
            [1, 1, 1, 1, 0, 0],  # 3: prompt and itself
            [1, 1, 1, 0, 1, 0],  # 4: its sibling 3 is not its ancestor
            [1, 1, 1, 1, 0, 1],  # 5: its parent 3, in the same segment
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, want)
    w.handle(tree())
    w.step()
    # a later segment whose ancestors are cached but not committed: it sees 3 (its grandparent's slot)
    # and 5 (its parent), never the dead-end sibling 4
    m = sess.mask_for(Segment("r", [6], [5], [5], tokens=[11]))
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool))


def test_unknown_ancestor_is_an_error_naming_the_node(full):
    w = worker(full)
    w.handle(prompt())
    w.step()
    sess = w.sessions["r"]
    orphan = Segment("r", [9], [7], [4], tokens=[3])  # parent 7 never reached this stage
    with pytest.raises(FrameRejected, match="node 9's parent 7 is neither"):
        w.handle(orphan)  # refused at the door, before any compute; the request's session is closed
    assert "r" not in w.sessions and not w.queue
    with pytest.raises(KeyError, match="node 9's ancestor 7 is unknown"):
        sess.mask_for(orphan)  # the mask walk itself still names it


def test_tree_rows_compute_what_plain_decoding_of_their_path_computes(full):
    """Siblings share a forward but never see each other: node 5's output is the causal forward of the
    path prompt -> 3 -> 5, and after a prune keeping that path a child of 5 still is."""
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(tree())
    (out,) = w.step()
    w.handle(Prune("r", upto=5, keep=[3, 5], commit=[3, 5]))
    w.handle(Segment("r", [6], [5], [5], tokens=[11]))
    (after,) = w.step()
    plain = full.forward_one(full.embed([5, 6, 7, 8, 10, 11]), full.new_cache(), torch.arange(6))
    # fp32; the tree forward attends over extra masked columns and a batch of other rows, which changes
    # only the rounding (reduction order of the sums), never the terms: each forward sees 6 keys
    tol = rounding_tolerance(torch.float32, forward_terms(full.cfg, context=6, lm_head=False), plain.abs().max())
    assert (out.hidden[2] - plain[4]).abs().max() <= tol
    assert (after.hidden[0] - plain[5]).abs().max() <= tol


def test_prune_drops_queued_rows_later_rows_and_cached_slots(full):
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(tree())
    w.step()
    w.handle(Segment("r", [6, 7], [4, 5], [4, 5], tokens=[1, 2]))  # queued: 6 hangs under 4
    w.handle(Prune("r", upto=7, keep=[3, 5, 7], commit=[3]))
    sess = w.sessions["r"]
    assert [s.node_ids for s in w.queue] == [[7]]  # queued row 6 dropped before any compute
    assert sorted(sess.slot_of) == [0, 1, 2, 3, 5] and sess.cache.length == 5  # slot of 4 compacted away
    assert sess.slot_of[5] == 4  # renumbered to the compacted cache
    w.handle(Segment("r", [4, 8], [2, 7], [3, 6], tokens=[3, 4]))  # arrives after the prune
    assert [s.node_ids for s in w.queue] == [[7], [8]]  # dead 4 dropped; 8 > upto is untouched
    w.handle(Segment("r", [6], [4], [4], tokens=[1]))
    assert len(w.queue) == 2  # every row dead: nothing queued


def test_committed_nodes_never_die(full):
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(Prune("r", upto=2, keep=[], commit=[]))  # a prune range over the committed prompt
    assert sorted(w.sessions["r"].slot_of) == [0, 1, 2] and w.sessions["r"].cache.length == 3


def test_closed_request_never_reopens_a_session(full):
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(tree())
    w.handle(Close("r"))
    assert "r" not in w.sessions and not w.queue
    w.handle(tree())
    w.handle(Prune("r", upto=5, keep=[3], commit=[3]))
    assert "r" not in w.sessions and not w.queue and w.step() == []


def test_take_batch_one_segment_per_request_in_arrival_order(full):
    w = worker(full, max_batch_rows=6)
    for seg in (prompt("a"), tree("a"), prompt("b"), prompt("c")):
        w.handle(seg)
    # a's tree depends on a's prompt: it waits for the next forward; c would exceed 6 rows
    assert [(s.request_id, s.node_ids[0]) for s in w.take_batch()] == [("a", 0), ("b", 0)]
    assert [(s.request_id, s.node_ids[0]) for s in w.queue] == [("a", 3), ("c", 0)]  # still in arrival order
    # both fit now; c's prompt leads (its originator waits on it), a's tree is not a round's first segment
    assert [(s.request_id, s.node_ids[0]) for s in w.take_batch()] == [("c", 0), ("a", 3)]
    assert w.take_batch() == [] and w.queued_rows == 0
    small = worker(full, max_batch_rows=2)
    with pytest.raises(FrameRejected, match="1 to 2 rows"):
        small.handle(prompt("d"))  # one segment over the limit is refused, not run alone
    assert not small.queue


def test_outputs_keep_ids_and_origin_and_carry_hidden_states(full):
    w = worker(full)
    seg = prompt()
    seg.origin = "peer-a"
    (out,) = w.run([seg])
    assert (out.request_id, out.node_ids, out.parents, out.positions) == ("r", [0, 1, 2], seg.parents, [0, 1, 2])
    assert out.origin == "peer-a" and out.commit and out.tokens is None
    assert out.hidden.shape == (3, full.cfg.hidden_size)
    assert w.rows_done == 3 and w.forwards == 1 and w.shared_forwards == 0 and w.busy_seconds > 0
    w.run([tree("r"), prompt("s")])
    assert w.shared_forwards == 1  # rows of two requests in one forward


def test_a_later_stage_needs_hidden_states(full):
    w = StageWorker(full)  # no embedding: not the first stage
    with pytest.raises(FrameRejected, match="a later stage takes hidden states"):
        w.handle(prompt())  # refused at the door
    with pytest.raises(ValueError, match="neither hidden states nor tokens to embed"):
        w.run([prompt()])  # and run() itself still refuses what no gate passed
    h = torch.randn(3, full.cfg.hidden_size)
    (out,) = w.run([Segment("r2", [0, 1, 2], [PROMPT_PARENT, 0, 1], [0, 1, 2], hidden=h, commit=True)])
    assert out.hidden.shape == h.shape


def test_expire_frees_idle_sessions_and_closes_them(full):
    now = [100.0]
    w = worker(full, idle_timeout=10.0, clock=lambda: now[0])
    w.handle(prompt("old"))
    w.run(w.take_batch())
    now[0] += 11.0
    w.handle(prompt("new"))
    w.run(w.take_batch())
    assert w.sessions["old"].last_used == 100.0 and w.sessions["new"].last_used == 111.0
    assert w.expire() == ["old"]
    assert set(w.sessions) == {"new"}
    w.handle(tree("old"))  # its originator comes back late: still closed
    assert not w.queue


def test_busy_time_is_measured_with_the_given_timer(full):
    ticks = iter([1.0, 3.5])
    w = worker(full, timer=lambda: next(ticks))
    w.run([prompt()])
    assert w.busy_seconds == 2.5


def test_a_stage_refuses_a_result(full):
    w = worker(full)
    with pytest.raises(TypeError, match="cannot handle Result"):
        w.handle(Result("r", [0], torch.zeros(1, 4)))


def test_a_rounds_first_segment_goes_before_filler_and_older_requests_before_newer(full):
    w = worker(full, max_batch_rows=3)
    for rid in ("a", "b"):  # a's session opens first: a is the older request
        w.handle(prompt(rid))
        w.step()
    w.handle(Segment("a", [3, 4, 5], [2, 2, 3], [3, 3, 4], tokens=[8, 9, 10]))  # filler
    w.handle(Segment("b", [3, 4, 5], [2, 2, 3], [3, 3, 4], tokens=[8, 9, 10], first=True))
    assert [s.request_id for s in w.take_batch()] == ["b"]  # the walk waits on b's first segment
    assert [s.request_id for s in w.take_batch()] == ["a"]
    w.handle(Segment("b", [6], [5], [5], tokens=[1]))  # both fillers now, b's arrived first
    w.handle(Segment("a", [6, 7, 8], [5, 5, 5], [5, 5, 5], tokens=[1, 2, 3]))
    assert [s.request_id for s in w.take_batch()] == ["a"]  # equal priority: the older request


def test_queued_segments_of_one_request_coalesce_where_the_curve_is_flat(full):
    flat, steep = CostCurve({1: 1.0, 64: 1.1}), CostCurve({1: 1.0, 64: 64.0})
    later = Segment("r", [6], [5], [5], tokens=[11])
    outs = {}
    for name, cost in (("flat", flat), ("steep", steep), ("none", None)):
        w = worker(full, cost=cost)
        w.handle(prompt())
        w.step()
        w.handle(tree())
        w.handle(later)  # depends on 5, queued in the segment ahead of it
        batch = w.take_batch()
        outs[name] = w.run(batch)
        if name == "flat":  # one forward for both: the dependency is inside one segment now
            assert [s.node_ids for s in batch] == [[3, 4, 5, 6]] and w.coalesced == 1 and not w.queue
        else:
            assert [s.node_ids for s in batch] == [[3, 4, 5]] and w.coalesced == 0
            outs[name] += w.step()
    # the same rows computed either way (fp32; a different batch shape changes only the rounding)
    sep = torch.cat([o.hidden for o in outs["none"]])
    tol = rounding_tolerance(torch.float32, forward_terms(full.cfg, context=7, lm_head=False), sep.abs().max())
    assert (outs["flat"][0].hidden - sep).abs().max() <= tol


def test_a_new_requests_prompt_goes_before_other_requests_filler(full):
    w = worker(full, max_batch_rows=3)
    w.handle(prompt("a"))
    w.step()
    w.handle(Segment("a", [3, 4, 5], [2, 2, 3], [3, 3, 4], tokens=[8, 9, 10]))  # a's filler, queued first
    w.handle(prompt("b"))  # b's originator waits on its prompt: it goes first, though b is newer
    assert [s.request_id for s in w.take_batch()] == ["b"]


def test_a_rounds_first_segment_overtakes_its_own_requests_filler_when_it_needs_none_of_its_rows(full):
    """The originator's walk waits on a first segment only: one queued behind the same request's filler
    (sent while the previous first segment was in flight) runs first, unless it hangs below that filler's
    rows, which this stage has not computed yet."""
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(Segment("r", [3], [2], [3], tokens=[8]))  # a filler under the last prompt token
    w.handle(Segment("r", [4, 5], [2, 4], [3, 4], tokens=[9, 10], first=True))  # needs the prompt and itself
    assert [s.node_ids for s in w.step()] == [[4, 5]]
    assert [s.node_ids for s in w.step()] == [[3]]
    w.handle(Segment("r", [6], [3], [4], tokens=[11]))  # a filler below 3 (computed)
    w.handle(Segment("r", [7], [6], [5], tokens=[12], first=True))  # below 6, still queued: it waits
    assert [s.node_ids for s in w.take_batch()] == [[6]]
    assert [s.node_ids for s in w.take_batch()] == [[7]]


def test_a_first_segment_waits_for_a_committed_parent_this_stage_has_not_computed(full):
    """In flow a prune commits the accepted node the walk waits on, and its row may still be queued here:
    a first segment below it must not overtake it (downstream it would arrive before its parent, and here
    its rows would not attend it)."""
    w = worker(full)
    w.handle(prompt())
    w.step()
    w.handle(Segment("r", [3], [2], [3], tokens=[8]))  # queued
    w.handle(Prune("r", 3, [0, 1, 2, 3], [3]))  # the walk accepted node 3's token; its row is still queued here
    w.handle(Segment("r", [4], [3], [4], tokens=[9], first=True))
    assert [s.node_ids for s in w.take_batch()] == [[3]]
    assert [s.node_ids for s in w.take_batch()] == [[4]]


def test_rows_besides_a_request_are_the_others_queued_and_in_the_latest_forward(full):
    """What the last stage reports with a result as load: other requests' rows, never the request's own."""
    w = worker(full)
    for rid in ("a", "b"):
        w.handle(prompt(rid))
    w.step()  # both prompts in one forward: 3 rows each
    assert w.rows_besides("a") == 3 and w.rows_besides("b") == 3 and w.rows_besides("c") == 6
    w.handle(tree("a"))
    assert w.rows_besides("b") == 6 and w.rows_besides("a") == 3  # a's queued tree counts for b only
    w.step()  # a's tree alone
    assert w.rows_besides("a") == 0 and w.rows_besides("b") == 3
