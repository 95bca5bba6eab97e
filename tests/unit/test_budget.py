"""The tree budget: the verified tree's size comes from the cost curve, the acceptance seen and the load."""

from __future__ import annotations

import math

import pytest

from models.budget import PROBE_DEPTH, PROBE_NODES, CostCurve, DraftPrior, TreeBudget
from models.tree import Tree

FLAT = CostCurve({1: 1.0, 64: 1.1})  # a GPU-like stage: 64 rows cost about what one does
STEEP = CostCurve({1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4, 16: 4.0, 64: 13.0})  # a CPU-like stage


def chain_tree(probs: list[float], width: int = 4) -> Tree:
    """A root, then at each level one likely child (prob p) and ``width - 1`` unlikely siblings."""
    t = Tree.root(0)
    node, score = 0, 0.0
    for depth, p in enumerate(probs, start=1):
        for j in range(1, width):
            t.add(node, 100 * depth + j, score + math.log((1 - p) / width))
        score += math.log(p)
        node = t.add(node, depth, score)
    return t


def test_flat_curves_verify_big_trees_steep_ones_small():
    tree = chain_tree([0.8] * 12)
    flat, steep = TreeBudget(FLAT, alpha=1.0).choose(tree), TreeBudget(STEEP, alpha=1.0).choose(tree)
    assert flat > 3 * steep >= 3, (flat, steep)
    assert flat >= 30  # on a flat curve even the 5 %-likely siblings pay for themselves


def test_poor_drafts_fall_back_to_plain_decoding():
    tree = chain_tree([0.05] * 6, width=1)
    assert TreeBudget(STEEP, alpha=1.0).choose(tree) == 0
    assert TreeBudget(FLAT, alpha=1.0).choose(tree) > 0  # nearly free rows: even poor guesses are worth a look


def test_observed_acceptance_moves_the_choice():
    tree = chain_tree([0.7] * 10)
    b = TreeBudget(STEEP)
    before = b.choose(tree)
    for _ in range(10):  # drafts turn out twice as good as they claim
        b.observe(predicted=1.0, accepted=2)
    grown = b.choose(tree)
    for _ in range(30):  # then nothing is ever accepted
        b.observe(predicted=2.0, accepted=0)
    assert grown > before >= 1 and b.choose(tree) < before, (before, grown, b.choose(tree))


@pytest.mark.parametrize("curve", [STEEP, CostCurve({1: 1.0, 16: 1.1, 64: 4.0})])
def test_productive_load_shrinks_trees(curve):
    """FASER: a node is worth its row only while it yields more than the rows other requests put through the
    same forwards; eight plain-decoding requests (a token per row) leave room only for the likeliest nodes."""
    tree = chain_tree([0.8] * 12)
    b = TreeBudget(curve, alpha=1.0)
    idle = b.choose(tree)
    loaded = b.choose(tree, load_rows=8, load_gain=8.0)
    busier = b.choose(tree, load_rows=32, load_gain=32.0)
    assert idle > loaded >= busier, (idle, loaded, busier)


def test_draft_overhead_counts_against_the_tree():
    tree = chain_tree([0.6] * 12)
    b = TreeBudget(STEEP, alpha=1.0)
    assert b.choose(tree, overhead=5.0) > b.choose(tree, overhead=0.0)  # a fixed cost per round favours bigger rounds


# ---- backing off when drafting does not pay for itself ---------------------------------------------
POOR = chain_tree([0.05] * 6, width=1)  # on STEEP nothing of it is worth a row (see above)
GOOD = chain_tree([0.9] * 8)


def plain_run(b: TreeBudget) -> int:
    """Rounds :meth:`TreeBudget.drafting` says to decode plainly before it lets the next draft happen."""
    n = 0
    while not b.drafting():
        n += 1
        assert n <= b.max_backoff, "the budget never probes again"
    return n


def test_a_draft_that_does_not_pay_stops_drafting_then_probes_with_a_doubling_wait():
    b = TreeBudget(STEEP, alpha=1.0, probe_after=2, max_backoff=16)
    assert b.drafting()  # the first round drafts: nothing is known yet
    waits = []
    for _ in range(6):
        # the drafting cost was paid for nothing; a probe still tests its best node (see the next test)
        assert b.choose(POOR, overhead=0.1) == (1 if b.probe else 0)
        waits.append(plain_run(b))
    assert waits == [2, 4, 8, 16, 16, 16]
    assert b.plain_rounds == sum(waits)


def test_a_probe_that_pays_resets_the_wait():
    b = TreeBudget(STEEP, alpha=1.0, probe_after=2, max_backoff=32)
    for _ in range(3):
        b.choose(POOR, overhead=0.1)
        plain_run(b)
    assert b.choose(GOOD, overhead=0.1) > 0
    assert plain_run(b) == 0  # it paid: keep drafting every round
    b.choose(POOR, overhead=0.1)
    assert plain_run(b) == 2  # the next failure waits the shortest time again


def test_the_first_draft_after_plain_rounds_is_a_small_probe_and_one_that_paid_brings_full_drafts_back():
    """A probe only has to tell whether the head's best next tokens are accepted again: its top nodes
    over a level or two, not a full draft (on a CPU a full probe cost ~2.5 plain rounds, mostly lost)."""
    b = TreeBudget(STEEP, alpha=1.0, probe_after=2)
    assert b.drafting() and not b.probe  # nothing waited for: a full draft
    assert b.keep_hint() == b.max_nodes and b.depth_hint(8) == 8
    b.choose(POOR, overhead=0.1)
    assert not b.drafting() and not b.probe  # backing off: the cheap part's draft of this round is no probe
    assert b.keep_hint() > PROBE_NODES and b.depth_hint(8) == 8
    plain_run(b)
    assert b.probe and b.keep_hint() == PROBE_NODES and b.depth_hint(8) == PROBE_DEPTH
    assert b.depth_hint(1) == 1  # never deeper than configured
    assert b.choose(GOOD, overhead=0.1) > 0  # the probe paid
    assert b.drafting() and not b.probe and b.keep_hint() > PROBE_NODES and b.depth_hint(8) == 8


def test_verified_nodes_that_do_not_cover_the_drafting_cost_still_back_off():
    """Once paid, the draft's cost shifts every choice alike, so the budget may verify a few nodes; if
    even that best choice is slower than a plain round (no draft, one row), drafting does not pay."""
    tree = chain_tree([0.3] * 4, width=1)
    b = TreeBudget(STEEP, alpha=1.0)
    assert b.choose(tree, overhead=2.0) > 0
    assert plain_run(b) == b.probe_after
    cheap = TreeBudget(STEEP, alpha=1.0)
    assert cheap.choose(tree, overhead=0.01) > 0 and plain_run(cheap) == 0


def test_free_drafting_never_backs_off():
    """Without a drafting cost verifying nothing is a plain round: nothing is lost by drafting."""
    b = TreeBudget(STEEP, alpha=1.0)
    for _ in range(5):
        assert b.choose(POOR) == 0 and b.drafting()
    assert b.plain_rounds == 0


def test_backoff_bounds_are_checked():
    with pytest.raises(ValueError, match="probe_after"):
        TreeBudget(STEEP, probe_after=0)
    with pytest.raises(ValueError, match="max_backoff"):
        TreeBudget(STEEP, probe_after=8, max_backoff=4)


def test_measured_rounds_slower_than_plain_ones_back_off_though_the_curve_says_they_pay():
    """The curve predicts a paying tree, but the rounds as timed (what the curve does not hold, a busier
    machine) yield fewer tokens per second than plain rounds: the measurement wins."""
    b = TreeBudget(STEEP, alpha=1.0)
    for _ in range(3):
        b.observe_round(1, 1.0, drafted=False)  # plain rounds: 1 token a second
    assert b.choose(GOOD, overhead=0.1) > 0 and b.drafting()
    b.observe_round(2, 3.0, drafted=True)  # 2 tokens in 3 s
    assert plain_run(b) == b.probe_after
    b.choose(GOOD, overhead=0.1)
    b.observe_round(1, 2.0, drafted=True)  # the probe fails too: the wait doubles
    assert plain_run(b) == 2 * b.probe_after


def test_a_measured_probe_that_pays_resets_the_wait_and_a_choice_alone_does_not():
    b = TreeBudget(STEEP, alpha=1.0)
    b.observe_round(1, 1.0, drafted=False)
    for _ in range(3):  # waits of 2, 4, 8
        b.choose(POOR, overhead=0.1)
        b.observe_round(1, 1.0, drafted=True)  # nothing accepted (a probe is judged by this, the first by its choice)
        plain_run(b)
    assert b.choose(GOOD, overhead=0.1) > 0  # predicted to pay; with timed rounds, those decide whether it did
    b.observe_round(1, 1.0, drafted=True)  # only the bonus token: the probe failed, the wait doubles
    assert plain_run(b) == 16
    for _ in range(4):
        b.choose(GOOD, overhead=0.1)
        b.observe_round(5, 1.0, drafted=True)  # 5 tokens a second against plain rounds' 1: drafting pays
        assert plain_run(b) == 0
    b.choose(POOR, overhead=0.1)
    assert plain_run(b) == b.probe_after


def test_a_budget_told_not_to_back_off_drafts_every_round():
    """What measuring a drafter's acceptance needs: drafts that never pay still draft."""
    budget = TreeBudget(CostCurve({1: 1.0, 64: 2.0}), back_off=False)
    for _ in range(6):
        assert budget.drafting()
        budget.observe_round(1, 10.0, drafted=True)  # far slower than a plain round
    assert budget.plain_rounds == 0


# ---- a prior across requests, and the cheap part's rounds while backing off ------------------------
def test_prior_waits_double_with_every_request_whose_last_probe_failed_and_reset_when_one_paid():
    prior = DraftPrior(probe_after=2, max_wait=16)
    waits = [prior.wait]
    for _ in range(6):
        prior.record(False)
        waits.append(prior.wait)
    assert waits == [0, 2, 4, 8, 16, 16, 16]
    prior.record(None)  # a request that never drafted says nothing
    assert prior.wait == 16
    prior.record(True)
    assert prior.wait == 0
    prior.record(False, backoff=32)  # a request whose failed probes had reached a wait of 32 rounds
    assert prior.wait == 16
    with pytest.raises(ValueError, match="max_wait"):
        DraftPrior(probe_after=4, max_wait=2)


def test_a_budget_starts_backed_off_by_its_prior_and_a_failed_probe_doubles_that_wait():
    prior = DraftPrior(probe_after=2)
    prior.record(False)
    prior.record(False)  # wait 4
    b = TreeBudget(STEEP, alpha=1.0, prior=prior)
    assert plain_run(b) == 4  # the first rounds draft nothing: no full draft for a short answer
    assert b.keep_hint() < TreeBudget(STEEP).keep_hint() == b.max_nodes  # and its first draft is a small probe
    b.choose(POOR, overhead=0.1)
    assert plain_run(b) == 8
    b.finish()
    assert prior.wait == 8  # its last probe failed too


def test_a_request_whose_probe_paid_resets_the_prior_and_one_never_judged_leaves_it():
    prior = DraftPrior(probe_after=2)
    prior.record(False)
    b = TreeBudget(STEEP, alpha=1.0, prior=prior)
    assert plain_run(b) == 2 and b.verdict is None
    b.finish()  # ended within its wait (a short answer): nothing learnt
    assert prior.wait == 2
    b = TreeBudget(STEEP, alpha=1.0, prior=prior)
    plain_run(b)
    b.choose(POOR, overhead=0.1)
    plain_run(b)
    assert b.choose(GOOD, overhead=0.1) > 0 and b.verdict is True  # the latest probe paid
    b.finish()
    assert prior.wait == 0  # the next request drafts from its first round


def test_the_first_draft_is_sized_as_the_requests_before_settled_on():
    """A request's first draft supplies what the earlier requests' last full drafts verified and half
    again, not the whole budget: on a steep curve the rest is drafted only to be thrown away."""
    prior = DraftPrior()
    first = TreeBudget(STEEP, alpha=1.0, prior=prior)
    assert first.keep_hint() == first.max_nodes  # nothing known yet
    n = first.choose(GOOD, overhead=0.1)
    assert 0 < n < 16 and first.verdict is True
    first.finish()
    assert prior.size == n
    second = TreeBudget(STEEP, alpha=1.0, prior=prior)
    assert second.keep_hint() == n + max(4, n // 2) < second.max_nodes
    second.finish()  # drafted nothing: the prior keeps what it knew
    assert prior.size == n and prior.copy().size == n


def test_the_first_draft_of_a_models_first_request_is_a_probe():
    """With a prior that knows nothing yet (no request judged), the first draft is a probe (small); once the
    prior knows what full drafts settled on, the next request's first draft is sized from it."""
    prior = DraftPrior()
    first = TreeBudget(FLAT, alpha=1.0, prior=prior)
    assert first.drafting() and first.probe and first.keep_hint() == PROBE_NODES
    assert first.choose(GOOD) == PROBE_NODES and first.verdict is True  # it paid: full drafts follow
    assert first.drafting() and not first.probe and first.keep_hint() > PROBE_NODES
    n = first.choose(GOOD)
    first.finish()
    second = TreeBudget(FLAT, alpha=1.0, prior=prior)
    assert second.drafting() and not second.probe and second.keep_hint() == min(64, n + max(4, n // 2))
    alone = TreeBudget(FLAT, alpha=1.0)  # no prior (a benchmark measuring a drafter): full drafts at once
    assert alone.drafting() and not alone.probe and alone.keep_hint() == alone.max_nodes


def test_measured_rounds_give_the_verdict_the_prior_learns_from():
    prior = DraftPrior()
    b = TreeBudget(STEEP, alpha=1.0, prior=prior)
    b.observe_round(1, 1.0, drafted=False)
    b.choose(GOOD, overhead=0.1)
    b.observe_round(2, 3.0, drafted=True)  # predicted to pay, measured slower than plain rounds
    assert b.verdict is False
    b.finish()
    assert prior.wait == prior.probe_after


def test_a_budget_that_never_backs_off_ignores_its_prior():
    prior = DraftPrior()
    prior.record(False)
    b = TreeBudget(STEEP, prior=prior, back_off=False)
    assert plain_run(b) == 0 and not b.cheap
    b.choose(POOR, overhead=0.1)
    b.finish()
    assert prior.wait == prior.probe_after  # neither used nor moved


def test_cheap_trees_are_verified_only_when_they_pay_and_never_move_the_wait_or_the_verdict():
    b = TreeBudget(STEEP, alpha=1.0)
    b.choose(POOR, overhead=0.1)  # backing off: 2 rounds, then 4 after the next failure
    assert b.verdict is False and b.cheap
    assert b.choose_cheap(POOR, overhead=0.001) == 0  # not worth a row: the round stays plain
    assert b.choose_cheap(GOOD, overhead=0.001) > 0
    assert b.verdict is False and plain_run(b) == 2  # the head's schedule is its own
    b.choose(POOR, overhead=0.1)
    assert plain_run(b) == 4
    assert TreeBudget(STEEP, cheap=False).cheap is False


def test_a_drafting_round_that_accepted_nothing_never_counts_as_a_probe_that_paid():
    """Timed on a noisy machine, a probe that only got the bonus token can look as fast as a plain round;
    it still did not pay: the wait and the verdict the prior learns from stay those of a failure."""
    b = TreeBudget(STEEP, alpha=1.0)
    b.observe_round(1, 1.0, drafted=False)
    b.choose(POOR, overhead=0.1)  # fails: wait 2, next 4
    plain_run(b)
    b.choose(GOOD, overhead=0.1)
    b.observe_round(1, 0.5, drafted=True)  # one token, faster than a plain round: noise, not a paying probe
    assert b.verdict is False
    b.choose(POOR, overhead=0.1)
    assert plain_run(b) == 4


@pytest.mark.parametrize("curve", [STEEP, FLAT, CostCurve({1: 1.0, 2: 1.31, 4: 1.72, 8: 2.81, 64: 18.7})])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0])
def test_a_cheap_tree_told_unable_to_pay_from_its_likeliest_node_is_never_one_worth_verifying(curve, alpha):
    """cheap_may_pay lets a round skip drafting the n-gram tree: it must never skip one that choose_cheap
    would have verified (a bound, not a guess), and must let through trees that pay."""
    b = TreeBudget(curve, alpha=alpha)
    for p in (0.02, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 0.9, 0.99):
        for width, depth in ((1, 1), (1, 8), (4, 3), (8, 2)):
            tree = chain_tree([p] * depth, width=width)
            first = max(math.exp(tree.scores[c]) for c in range(1, len(tree)) if tree.parents[c] == 0)
            if not b.cheap_may_pay(first):
                assert b.choose_cheap(tree) == 0, (p, width, depth)
    assert b.cheap_may_pay(0.99) == (b.choose_cheap(chain_tree([0.99] * 8, width=1)) > 0)
    steep = TreeBudget(STEEP, alpha=1.0)  # a row costs 0.2 of a plain round there: p 0.1 never pays, 0.9 does
    assert not steep.cheap_may_pay(0.1) and steep.cheap_may_pay(0.9) and not steep.cheap_may_pay(0.0)


def test_a_probe_tests_its_best_node_however_low_the_calibration_fell():
    """After failures alpha is low and the rate rule verifies nothing; a probe that verified nothing could
    never pay and drafts stayed off for the rest of the request (an n-gram copy included). A probe always
    verifies its best node, and on a timed budget its measured round, not the prediction, judges it."""
    b = TreeBudget(STEEP, alpha=0.02, probe_after=2)
    b.observe_round(1, 1.0, drafted=False)
    assert b.choose(GOOD, overhead=0.1) == 0 and plain_run(b) == 2  # not a probe: the rule, and a wait
    assert b.probe and b.choose(GOOD, overhead=0.1) == 1
    b.observe(math.exp(max(GOOD.scores[1:])), 1)  # its best node was accepted
    b.observe_round(2, 1.2, drafted=True)  # 2 tokens in 1.2 plain rounds: it paid
    assert b.verdict is True and b.drafting() and not b.probe  # full drafts at once
    assert b.alpha > 0.3 and b.choose(GOOD, overhead=0.1) > 1  # the calibration recovered


def test_a_probe_verifies_no_more_nodes_than_it_drafted_for():
    """A probe drafts the head's best PROBE_NODES nodes; merged with the n-gram table's, its tree can hold
    more, but a probe only has to tell whether drafts pay again: it verifies at most PROBE_NODES."""
    b = TreeBudget(FLAT, alpha=1.0, probe_after=2)
    b.choose(POOR, overhead=0.5)
    assert b.verdict is False and plain_run(b) == 2
    assert b.probe and b.choose(GOOD) == PROBE_NODES
    assert b.drafting() and not b.probe and b.choose(GOOD) > PROBE_NODES


def test_the_cheap_part_is_calibrated_on_its_own_rounds_and_forgets_its_failures_while_it_waits():
    """Shared with the head, a few failed head probes made every n-gram tree look worthless for the rest of
    the request, so a prompt that copies lost its lookups (and a failed lookup starved the head). Each part
    now has its own calibration, and the cheap one drifts back to its prior in rounds without evidence,
    the more slowly the more failures it saw."""
    b = TreeBudget(STEEP)  # prior alpha 0.5: a lookup of p 0.9 pays on this curve (a row costs 0.2 rounds)
    for _ in range(5):
        b.observe(2.0, 0)  # the head's trees: nothing accepted
    assert b.alpha < 0.1 and b.cheap_calibration.alpha == 0.5 and b.cheap_may_pay(0.9)

    def rounds_until_the_lookup_may_pay() -> int:
        n = 0
        while not b.cheap_may_pay(0.9):
            b.drafting()
            n += 1
        return n

    b.observe(2.0, 0, cheap=True)  # one failed lookup
    once = rounds_until_the_lookup_may_pay()
    for _ in range(5):
        b.observe(2.0, 0, cheap=True)
    assert b.cheap_calibration.alpha < 0.1
    many = rounds_until_the_lookup_may_pay()
    assert 1 <= once < many <= 40, (once, many)
    assert b.alpha < 0.1  # the head's calibration neither drifted nor learned from the lookups
    b.drafting()
    b.observe(1.0, 1, cheap=True)  # a verified lookup: no drift in the next round, only the evidence
    before = b.cheap_calibration.alpha
    b.drafting()
    assert b.cheap_calibration.alpha == before


# ---- the loss cap (max_loss) -----------------------------------------------------------------------
def run_request(b: TreeBudget, tokens: int, tree: Tree, accept: int, draft_s: float = 0.3, fixed: float = 0.1):
    """A request of ``tokens`` tokens timed as the engine times it on ``b.cost`` (a plain round is cost(1);
    a drafting round its draft, its forward and ``fixed`` bookkeeping), whose verified trees get ``accept``
    drafted tokens at most; returns (its seconds, the seconds plain decoding takes, verified tree sizes)."""
    seconds, out, sizes = 0.0, 0, []
    while out < tokens:
        if b.drafting():
            n = b.choose(tree, overhead=draft_s)
            got = 1 + min(accept, n)
            secs = draft_s + b.cost(n + 1) + fixed
            b.observe(b.expected(tree.best(n)), got - 1)
            b.observe_round(got, secs, drafted=True)
            sizes.append(n)
        else:
            got, secs = 1, b.cost(1)
            b.observe_round(1, secs, drafted=False)
        seconds, out = seconds + secs, out + got
    return seconds, out * b.cost(1), sizes


@pytest.mark.parametrize("tokens", [8, 25, 128])
def test_a_capped_request_loses_at_most_its_share_to_drafts_that_never_pay(tokens):
    """A head sure of drafts the target never takes, on a CPU-like curve: uncapped, its first full draft
    and the probes after it cost a short answer 15-33 %; capped, a request loses no more than ``max_loss``
    of its time and one smallest round's worth of estimate."""
    sure = chain_tree([0.9] * 8)
    spent, plain, _ = run_request(TreeBudget(STEEP, alpha=1.0), tokens, sure, accept=0)
    assert spent > (1.10 if tokens < 100 else 1.04) * plain
    b = TreeBudget(STEEP, alpha=1.0, max_loss=0.03)
    spent, plain, _ = run_request(b, tokens, sure, accept=0)
    assert spent - plain <= 0.03 * spent + b.worst_loss(1, 0.3) + 1e-9
    assert b.capped_rounds > 0


def test_under_the_cap_trees_grow_with_what_accepted_drafts_earned():
    """The first rounds of a capped request are plain (nothing earned, nothing to lose); then small trees;
    every accepted token is credit, so trees that pay grow to what an uncapped budget verifies."""
    sure = chain_tree([0.9] * 8, width=2)
    _, _, uncapped = run_request(TreeBudget(STEEP, alpha=1.0), 200, sure, accept=8)
    b = TreeBudget(STEEP, alpha=1.0, max_loss=0.03)
    assert not b.drafting() and b.capped_rounds == 1  # at its first round, no loss fits in 3 % of nothing
    _, _, sizes = run_request(b, 200, sure, accept=8)
    assert 0 < sizes[0] < uncapped[0] and sizes == sorted(sizes) and sizes[-1] == uncapped[-1]


def test_a_capped_request_drafts_first_where_the_prior_says_its_draft_fits():
    """The prior carries what a draft and a drafting round's bookkeeping cost, so the next request drafts
    once a first small tree fits, rather than draft early, find the cost too high and verify nothing."""
    sure = chain_tree([0.9] * 8, width=2)
    prior = DraftPrior()
    first = TreeBudget(STEEP, alpha=1.0, max_loss=0.03, prior=prior)
    run_request(first, 200, sure, accept=8)
    first.finish()
    assert prior.draft_s == pytest.approx(0.3) and prior.fixed_s == pytest.approx(0.1)
    b = TreeBudget(STEEP, alpha=1.0, max_loss=0.03, prior=prior)
    _, _, sizes = run_request(b, 60, sure, accept=8)
    assert sizes[0] > 0


def test_cheap_rounds_go_into_the_books_but_judge_nothing():
    """A lookup tree's round counts in the request's books (what it lost, what it gained) and its time
    judges neither the whole drafter nor the plain rate; while nothing is earned, no lookup is drafted."""
    b = TreeBudget(STEEP, alpha=1.0, max_loss=0.03)
    assert not b.cheap_may_pay(0.99)
    for _ in range(40):
        b.observe_round(1, 1.0, drafted=False)
    assert b.allowance() == pytest.approx(1.2)
    assert b.cheap_may_pay(0.99)
    b.observe_round(4, 1.5, drafted=True, cheap=True)  # three drafted tokens for half a round's more time
    assert b.allowance() == pytest.approx(0.03 * 41.5 + 2.5)
    assert b.plain_seconds == pytest.approx(1.0) and b.verdict is None


def test_without_a_cap_the_budget_keeps_no_books():
    b = TreeBudget(STEEP, alpha=1.0)
    assert b.allowance() == math.inf and b.drafting()
    b.observe_round(1, 5.0, drafted=True)
    assert b.allowance() == math.inf
    with pytest.raises(ValueError, match="max_loss"):
        TreeBudget(STEEP, max_loss=1.5)
