"""How many drafted nodes a round should verify: a cost curve and observed acceptance decide.

A forward over T tokens costs cost(T). Verifying the n best nodes of a candidate tree yields
about 1 + alpha * sum(p_i) tokens, where p_i = exp(cumulative draft log-prob) and alpha
calibrates the drafter's confidence against what the target actually accepted. Picking n to
maximise tokens per second makes trees big on flat (GPU) curves and small on steep (CPU)
ones, and falls back to plain decoding (n = 0) when drafts stop paying for themselves.

Drafting itself is paid every round whatever is then verified, so a round that drafts is worth it
only when its best rate, the draft's cost included, beats a plain round's 1 / cost(1). When it does
not (a weak head, an unfamiliar prompt), the budget stops drafting for a few rounds (plain decoding,
no drafter call) and probes again, doubling the wait while probes keep failing (FASER's adaptive
length, down to zero): ``spec`` then costs at most the occasional probe more than ``ar``. A probe is a
small draft (the head's best two nodes, :meth:`TreeBudget.depth_hint`): it only has to tell whether
drafts pay again, so it verifies at least its best node whatever the calibration says, and its measured
round judges it. A model's first request starts with a probe too.

Two things make those probes rarer and cheaper. A :class:`DraftPrior`, kept per model and drafter
across requests, starts a request already backed off when the drafts of the requests before it did
not pay (the first round of a short answer then drafts nothing). And while the budget backs off, the
drafter's cheap part (n-gram lookup: microseconds, no forward) still drafts every round
(:attr:`TreeBudget.cheap`); its tree is verified only when the curve says its nodes pay, so a
stretch the model copies from the context still speculates while the head waits for its next probe. It is
not even drafted when its likeliest node alone shows that no tree of its could pay
(:meth:`TreeBudget.cheap_may_pay`): a plain round then costs ``ar``'s and the drafters' bookkeeping.

The cheap part has a :class:`Calibration` of its own. Shared with the head, a few failed probes of the head
left ``alpha`` so low that no n-gram tree could pay any more, and a prompt that copies lost its lookups for
the rest of the request (and the other way round: one failed lookup starved the head's first choice). Its
own calibration learns only from its own rounds, and drifts back to its prior while it has none, so one bad
guess early in an answer cannot switch the lookups off for good.

Backing off still leaves each probe, each lookup tree and the first drafts of a request to chance: on a CPU
where a verified row costs a tenth of a plain round, one failed 7-node tree costs ~2.5 plain rounds, 10 % of
a 25-token answer. A budget given ``max_loss`` (what ``meshd generate`` and ``serve`` use on one device) also
keeps a request's books: the measured time its drafting rounds took beyond their tokens at the plain rate.
A round may draft, and verify as many nodes, only while what it would lose if nothing were accepted fits in
``max_loss`` of the request's time so far, less what drafts already lost (plus what they gained: accepted
tokens are credit). So a request loses at most that share to drafts, give or take one round's estimate, and
its trees grow with what its drafts have earned (:meth:`TreeBudget.allowance`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

from models.tree import Tree


class CostCurve:
    """Seconds of one forward over T tokens, interpolated linearly between measured points."""

    def __init__(self, points: Mapping[int, float]):
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        items = sorted((int(t), float(s)) for t, s in points.items())
        self.ts = [t for t, _ in items]
        self.secs = [s for _, s in items]
        self._least_share: dict[int, float] = {}  # see least_share_per_row

    def __call__(self, t: float) -> float:
        ts, ss = self.ts, self.secs
        if len(ts) == 1:
            return ss[0] * max(t, 1) / ts[0]
        if t <= ts[0]:
            return ss[0]
        i = bisect.bisect_left(ts, t)
        if i >= len(ts):  # extrapolate with the last segment's slope
            i = len(ts) - 1
        t0, t1, s0, s1 = ts[i - 1], ts[i], ss[i - 1], ss[i]
        return s0 + (s1 - s0) * (t - t0) / (t1 - t0)

    def least_share_per_row(self, max_rows: int) -> float:
        """The least, over 1..``max_rows`` extra rows, of what each costs on average as a share of a one-row
        forward: min over n of (cost(n + 1) / cost(1) - 1) / n. Computed once per ``max_rows`` (a curve
        does not change once made)."""
        if max_rows not in self._least_share:
            c1 = self(1)
            self._least_share[max_rows] = min((self(n + 1) / c1 - 1) / n for n in range(1, max_rows + 1))
        return self._least_share[max_rows]

    def to_dict(self) -> dict[int, float]:
        return dict(zip(self.ts, self.secs))

    def __add__(self, other: CostCurve) -> CostCurve:
        ts = sorted(set(self.ts) | set(other.ts))
        return CostCurve({t: self(t) + other(t) for t in ts})


class Calibration:
    """How much of what a drafter claims the target accepts: ``alpha`` = accepted drafted tokens over the
    summed probabilities of the verified nodes, both decayed by ``memory`` per verified tree, so recent
    rounds count most (a prompt changes character within an answer)."""

    def __init__(self, prior: float, memory: float, relax: float = 0.9):
        """``prior``: alpha before any round (and what it returns to without evidence, see :meth:`drift`);
        ``relax``: per round without evidence, the weight the evidence so far keeps."""
        self.prior, self.memory, self.relax = prior, memory, relax
        self._pred, self._seen = 1.0, prior
        self.alpha = prior

    def observe(self, predicted: float, accepted: int) -> None:
        """Fold one verified tree in: ``predicted`` = sum of its verified nodes' draft probabilities."""
        if predicted <= 0:
            return
        self._pred = self.memory * self._pred + predicted
        self._seen = self.memory * self._seen + accepted
        self._update()

    def drift(self) -> None:
        """One round went by without evidence: the evidence so far weighs a little less against the prior
        (one tree that claimed a token and was accepted at the prior's rate). What a drafter is worth
        changes along an answer (a list to copy comes up), and a calibration that only moved when its
        trees were verified would stay wherever its last failures left it: too low for any tree to be
        verified again, so it could never learn that things changed. Much evidence of failure takes
        longer to forget than one failed guess."""
        r = self.relax
        self._pred = r * self._pred + (1 - r)
        self._seen = r * self._seen + (1 - r) * self.prior
        self._update()

    def _update(self) -> None:
        self.alpha = min(2.0, max(0.02, self._seen / self._pred))


PROBE_AFTER = 2  # plain rounds after the first draft that did not pay, before drafting again
MAX_BACKOFF = 32  # the longest wait between probes (doubling from PROBE_AFTER while probes fail)
PROBE_NODES = 2  # a probe's draft: the head's best few nodes (see TreeBudget.depth_hint) ...
PROBE_DEPTH = 2  # ... over at most this many levels
# the share of a request's time its drafts may lose against plain rounds on one device (TreeBudget.allowance):
# issue 13 asks that ``spec`` be at worst a few per cent slower than ``ar`` on any prompt
MAX_LOSS = 0.03


class DraftPrior:
    """What earlier requests' drafts were worth, carried to the next request of the same model and drafter
    (one object per model and drafter, kept by whoever keeps the drafter: ``LocalModel``, a benchmark).

    A request whose latest full draft did not pay (its budget's :attr:`TreeBudget.verdict`) makes the next
    start backed off: plain rounds (the drafter's cheap part still drafting, see :attr:`TreeBudget.cheap`)
    for twice the wait before (``probe_after`` at first), or half the wait its own failed probes had
    reached if that is longer (a request that failed five probes in a row is stronger evidence than one
    that failed once), up to ``max_wait``; a request whose latest full draft paid lets the next one draft
    from its first round again. A request that never drafted (it ended within its wait) says nothing and
    leaves the prior as it was. Deterministic: only the budgets' verdicts count, in the order they finish.

    It also carries the tree size the latest request's full drafts settled on (:attr:`size`), which sizes
    the next request's first draft (:meth:`TreeBudget.keep_hint`) instead of the whole budget: on a steep
    CPU curve that first draft of up to 64 nodes cost as much as a plain token and was mostly thrown away.
    """

    def __init__(self, probe_after: int = PROBE_AFTER, max_wait: int = MAX_BACKOFF // 2):
        if probe_after < 1 or max_wait < probe_after:
            raise ValueError(f"prior wait {probe_after}..{max_wait} rounds: need 1 <= probe_after <= max_wait")
        self.probe_after, self.max_wait = probe_after, max_wait
        self.wait = 0  # plain rounds the next request starts with before its first full draft (0: draft at once)
        self.size: int | None = None  # nodes the latest judged request's last full draft verified (None: none yet)
        # what a full draft and a drafting round's bookkeeping took lately (TreeBudget.worst_loss; None: not
        # measured yet), so a capped request sizes its first draft by it rather than find out by losing it
        self.draft_s: float | None = None
        self.fixed_s: float | None = None

    def record(
        self,
        verdict: bool | None,
        backoff: int = 0,
        size: int | None = None,
        draft_s: float | None = None,
        fixed_s: float | None = None,
    ) -> None:
        """Fold in one finished request: ``verdict`` is its budget's :attr:`TreeBudget.verdict`, ``backoff``
        the wait its next failed probe would have bought (0: not known), ``size`` the nodes its last full
        draft verified (None: it drafted none), ``draft_s`` and ``fixed_s`` its measured draft and drafting
        round's bookkeeping (None: not measured)."""
        if size is not None:
            self.size = size
        if draft_s is not None:
            self.draft_s = draft_s
        if fixed_s is not None:
            self.fixed_s = fixed_s
        if verdict is True:
            self.wait = 0
        elif verdict is False:
            self.wait = min(self.max_wait, max(self.probe_after, 2 * self.wait, backoff // 2))

    def copy(self) -> DraftPrior:
        other = DraftPrior(self.probe_after, self.max_wait)
        other.wait, other.size = self.wait, self.size
        other.draft_s, other.fixed_s = self.draft_s, self.fixed_s
        return other


class TreeBudget:
    """Per-request choice of the verified tree size, learning the drafter's calibration as it goes,
    and of whether to draft at all this round (:meth:`drafting`)."""

    def __init__(
        self,
        cost: CostCurve,
        max_nodes: int = 64,
        alpha: float = 0.5,
        memory: float = 0.8,
        probe_after: int = PROBE_AFTER,
        max_backoff: int = MAX_BACKOFF,
        back_off: bool = True,
        prior: DraftPrior | None = None,
        cheap: bool = True,
        measured_only: bool = False,
        judge_after: float = 0.0,
        plain_s: float | None = None,
        max_loss: float | None = None,
    ):
        """``back_off=False``: draft every round whatever it costs (what the budget did before the
        backoff; for measuring a drafter's acceptance, which plain rounds would dilute).
        ``prior``: earlier requests' verdict, which may start this one backed off; :meth:`finish`
        hands this request's verdict back to it. ``cheap``: see the attribute. ``measured_only``: only
        measured rounds (:meth:`observe_round`) decide whether drafts pay, never the curve's prediction
        with the draft's cost added (a ring drafts while its stages compute, so that cost is mostly hidden).
        ``judge_after``: the decayed count of measured drafting rounds below which none backs off, and a
        probe is judged with the rounds before it rather than alone (0: every round judges; see
        :meth:`observe_round`). ``plain_s``: seconds a token of a plain round took, as measured before (an
        earlier request's plain rounds on the same devices), until this request measures its own.
        ``max_loss``: the share of the request's measured time its drafting rounds may lose against plain
        rounds (see :meth:`allowance`; None: no cap, as for a ring, whose rounds overlap and are not timed
        one by one). Needs ``cost`` in seconds and the caller to time every round, cheap ones too
        (:meth:`observe_round`)."""
        if probe_after < 1 or max_backoff < probe_after:
            raise ValueError(f"backoff {probe_after}..{max_backoff} rounds: need 1 <= probe_after <= max_backoff")
        self.cost, self.max_nodes = cost, max_nodes
        # prior: drafts are half as good as they claim until shown otherwise; the cheap part (see
        # :attr:`cheap`) is calibrated on its own rounds only
        self.calibration = Calibration(alpha, memory)
        self.cheap_calibration = Calibration(alpha, memory)
        self._cheap_seen = False  # whether the cheap calibration had evidence since the last round began
        self.memory = memory
        self._last: int | None = None
        self.probe_after, self.max_backoff, self.back_off = probe_after, max_backoff, back_off
        self._backoff = probe_after  # plain rounds the next failed draft buys
        self._skip = 0  # plain rounds left before the next probe
        self._waited = False  # whether plain rounds came since the last draft
        # whether this round's draft (the latest :meth:`drafting` that returned True) is a probe: the first
        # after plain rounds, which only has to tell whether drafts pay again (see keep_hint, depth_hint)
        self.probe = False
        self.plain_rounds = 0  # rounds without the whole drafter (its cheap part may have drafted): stats, tests
        # measured rounds (:meth:`observe_round`), where the caller times them: seconds of a plain round,
        # and decayed sums of drafting rounds' tokens and seconds (draft, verification and bookkeeping)
        self._plain_s: float | None = plain_s
        self._draft_tokens = 0.0
        self._draft_s = 0.0
        self._timed = False
        # while backing off, the drafter's cheap part (n-gram lookup) may still draft and have its tree
        # verified when the curve says it pays (the caller checks this; False: plain rounds only)
        self.cheap = cheap and back_off
        # whether this request's latest full draft paid (None: none was judged yet), for the prior
        self.verdict: bool | None = None
        self.prior = prior if back_off else None
        if self.prior is not None and self.prior.wait > 0:
            self._skip = self.prior.wait
            self._backoff = min(self.max_backoff, 2 * self.prior.wait)
            self._last = 0  # its first draft is a probe: a small tree (see keep_hint), not the whole budget
        elif self.prior is not None and self.prior.size is not None:
            self._last = self.prior.size  # the first draft sized as the requests before settled on
        elif self.prior is not None:
            # the model's first request: nothing says yet what drafts are worth here, so its first draft is a
            # probe (a full one, 64 nodes over 8 levels, cost ~2 plain rounds on a 2-core CPU, mostly lost)
            self._waited = True
        self._last_full: int | None = None  # nodes of this request's latest full draft, for the prior
        self.measured_only = measured_only
        self.judge_after = judge_after
        self._draft_n = 0.0  # decayed count of measured drafting rounds, beside their tokens and seconds
        if max_loss is not None and not 0.0 <= max_loss < 1.0:
            raise ValueError(f"max_loss {max_loss}: a share of the request's time, 0 <= max_loss < 1")
        self.max_loss = max_loss
        self._elapsed = 0.0  # seconds of this request's measured rounds
        self._lost = 0.0  # what its drafting rounds took beyond their tokens at the plain rate (< 0: gained)
        # decayed seconds a full draft took (choose's overhead), and a drafting round beyond its draft and
        # forward (mask, walk, the cache's pruning); from the prior until this request measures its own
        self._draft_cost: float | None = prior.draft_s if prior is not None else None
        self._fixed = (prior.fixed_s or 0.0) if prior is not None else 0.0
        self._fixed_seen = False
        self._planned: float | None = None  # the draft and forward of the round being verified (for _fixed)
        self.capped_rounds = 0  # rounds the cap kept plain (stats, tests)

    @property
    def alpha(self) -> float:
        """The whole drafter's calibration (see :class:`Calibration`)."""
        return self.calibration.alpha

    def drafting(self) -> bool:
        """Whether this round should call the drafter. False while backing off after drafts that did
        not pay: the caller then runs a plain one-row round (and still feeds the drafter the target's
        features, so the next probe drafts from the whole context). Each call counts one round."""
        if not self._cheap_seen:
            self.cheap_calibration.drift()  # the round before verified no cheap tree: no news of the part
        self._cheap_seen = False
        if self._skip > 0:
            self._skip -= 1
            self.plain_rounds += 1
            self._waited, self.probe = True, False  # the cheap part's draft, if any, is not a probe
            return False
        # a draft not measured yet (a model's first requests) is taken to cost a plain round's forward
        draft_s = self._draft_cost if self._draft_cost is not None else self.cost(1)
        if self.allowance() < self.worst_loss(1, draft_s):
            self.plain_rounds += 1  # the cap: even the smallest tree could lose more than the books allow
            self.capped_rounds += 1
            self.probe = False  # as while backing off; the next draft is a probe if it was to be one
            return False
        self.probe, self._waited = self._waited, False
        return True

    def allowance(self) -> float:
        """Seconds the next round may lose against a plain one: ``max_loss`` of the request's measured time,
        less what its drafting rounds lost so far (more, where they gained); infinite without a cap.

        Why a cap on top of backing off: backing off judges drafts after the fact, so what is lost before it
        (a failed probe, a lookup tree, a full draft after a lucky probe) is a share of the answer that
        grows as the answer gets shorter, and short answers are most of a chat's. With the cap, early rounds
        of a request verify small trees (a probe, a few lookup nodes) or none, and a tree grows only as far
        as earlier accepted tokens paid for it. On a flat curve (rows nearly free) the worst loss of a round
        is its draft's cost and the cap rarely binds; on a steep CPU curve it is what keeps a weak draft from
        costing a short answer more than ``max_loss``."""
        if self.max_loss is None:
            return math.inf
        return self.max_loss * self._elapsed - self._lost

    def worst_loss(self, nodes: int, overhead: float) -> float:
        """What a round that drafted for ``overhead`` seconds and verifies ``nodes`` drafted nodes loses
        against a plain round if none of them is accepted: the draft, the extra rows, and the drafting round's
        own bookkeeping as measured (a plain round's one row is what the round yields in any case)."""
        return overhead + self.cost(nodes + 1) - self.cost(1) + self._fixed

    def _capped(self, nodes: int, overhead: float) -> int:
        """The most of ``nodes`` (best first) whose round fits :meth:`allowance`; 0 where none does."""
        room = self.allowance()
        while nodes > 0 and self.worst_loss(nodes, overhead) > room:
            nodes -= 1
        return nodes

    def choose(
        self,
        tree: Tree,
        overhead: float = 0.0,
        cost: CostCurve | None = None,
        load_rows: int = 0,
        load_gain: float = 0.0,
    ) -> int:
        """Number of drafted nodes (besides the root) worth verifying from this candidate tree.

        ``load_rows``/``load_gain``: rows other requests put through the same forwards and the
        tokens those rows yield. Maximising the shared rate (load_gain + gain) / cost(load_rows + n)
        is FASER's rule: an idle ring lets a tree grow until its marginal node stops paying for
        itself; a loaded ring, already busy at a steeper point of the curve, gets smaller trees.

        ``overhead``: what drafting this tree cost. Once paid it is sunk, so it shifts every choice
        alike; but it also decides whether drafting pays at all: when even the best choice, overhead
        included, yields fewer tokens per second than a plain round (no draft, one row), the budget
        backs off (:meth:`drafting` is False for the next rounds), doubling the wait each time a probe
        fails, back to ``probe_after`` rounds when one pays.
        """
        limit = PROBE_NODES if self.probe else self.max_nodes  # a probe verifies no more than it drafted for
        best_n, best_rate, plain_rate = self._best(
            tree, overhead, cost or self.cost, load_rows, load_gain, limit, self.alpha
        )
        if self.probe and best_n == 0 and len(tree) > 1:
            # a probe tests the drafter's best node whatever the calibration says: after failures ``alpha`` is
            # low, a probe verifying nothing could never pay, and drafts (the n-gram part's too) stayed off
            best_n = 1
        if self.max_loss is not None:
            m = self.memory
            self._draft_cost = overhead if self._draft_cost is None else m * self._draft_cost + (1 - m) * overhead
            best_n = self._capped(best_n, overhead)
            self._planned = overhead + (cost or self.cost)(load_rows + best_n + 1)
        self._last = self._last_full = best_n
        if (self.probe and self._timed) or self.measured_only:
            pass  # judged by what its round yields (observe_round), not by the prediction
        elif best_rate < plain_rate:
            self._back_off()
        elif not self._timed:  # without measured rounds the prediction is all there is to go by
            self._paid()
        return best_n

    def choose_cheap(self, tree: Tree, overhead: float = 0.0) -> int:
        """Nodes worth verifying from the cheap part's tree in a round the budget backs off (see
        :attr:`cheap`): the rate rule of :meth:`choose`, but the tree is judged alone, without moving the
        wait before the next full draft or the verdict (a copy the n-gram table finds says little about
        the head), and a tree that does not beat a plain round is not verified (0: a plain round)."""
        alpha = self.cheap_calibration.alpha
        best_n, best_rate, plain_rate = self._best(tree, overhead, self.cost, 0, 0.0, self.max_nodes, alpha)
        n = self._capped(best_n, overhead) if best_rate > plain_rate else 0
        if n and self.max_loss is not None:
            self._planned = overhead + self.cost(n + 1)
        return n

    def cheap_may_pay(self, best_first: float) -> bool:
        """Whether a cheap part's tree whose likeliest node has probability ``best_first`` could be worth
        verifying at all (:meth:`choose_cheap` not 0), told before drafting it.

        No node of a tree scores above its likeliest first-level node, so n verified nodes yield at most
        ``alpha * n * best_first`` drafted tokens; they pay only if that beats what the n rows cost over a
        plain round, ``cost(n + 1) / cost(1) - 1``, for some n. When it beats it for none, the draft is
        skipped: in a plain round while the budget backs off, the n-gram table's draft and choice cost
        ~0.1 ms, 1-2 % of a token on a 2-core CPU, nearly always for a tree that is then not verified. Nor
        is it drafted while even one node's row could lose more than :meth:`allowance` leaves."""
        if self.allowance() < self.worst_loss(1, 0.0):
            return False
        return self.cheap_calibration.alpha * best_first > self.cost.least_share_per_row(self.max_nodes)

    @staticmethod
    def _best(
        tree: Tree, overhead: float, cost: CostCurve, load_rows: int, load_gain: float, limit: int, alpha: float
    ) -> tuple[int, float, float]:
        """(nodes, rate) of the best choice of at most ``limit`` nodes from ``tree`` (tokens per second,
        ``overhead`` included) whose drafter is calibrated by ``alpha``, and a plain round's rate (one row,
        no overhead)."""
        order = tree.score_order()[1 : limit + 1]
        best_n, gain = 0, load_gain + 1.0
        best_rate = gain / (overhead + cost(load_rows + 1))
        plain_rate = gain / cost(load_rows + 1)
        for n, i in enumerate(order, start=1):
            gain += alpha * math.exp(tree.scores[i])
            rate = gain / (overhead + cost(load_rows + n + 1))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n, best_rate, plain_rate

    def _back_off(self) -> None:
        if not self.back_off:
            return
        self.verdict = False
        self._skip = self._backoff
        self._backoff = min(self.max_backoff, 2 * self._backoff)

    def _paid(self) -> None:
        self.verdict = True
        self._backoff = self.probe_after

    def finish(self) -> None:
        """The request is over: hand its verdict to the prior (if any) for the next request."""
        if self.prior is not None:
            fixed = self._fixed if self._fixed_seen else None
            self.prior.record(self.verdict, self._backoff, self._last_full, self._draft_cost, fixed)

    def observe_round(self, tokens: int, seconds: float, drafted: bool, cheap: bool = False) -> None:
        """Fold in one round's measured wall time, for callers that can time whole rounds (one device).

        :meth:`choose` predicts from the cost curve, but a drafting round also pays what the curve does
        not hold (the tree's mask, the walk, the cache's pruning, the drafter catching up after plain
        rounds) and the curve was measured once, on a machine that may now be busier. So the rounds'
        measured rates decide too: drafting rounds (decayed like ``alpha``) against the latest plain
        rounds (decayed; before any, the curve's one-row cost). Slower: back off as for a draft not worth verifying;
        not slower, and the round accepted a drafted token: a probe paid, and the wait returns to ``probe_after``.

        With ``judge_after`` the rates decide only once that many drafting rounds (decayed) were measured,
        and a probe that accepted nothing does not back off alone. A ring's trees are few and their tokens
        vary from 1 to 10, so one unlucky tree would stop drafts that pay: on 5 emulated boards, where
        drafted trees yield ~1.9x the tokens a second of plain ones, a first drafted tree of 1 token took
        1.15x a plain tree and one prompt ran plain to its end (flow 2.03 tok/s against 3.61-3.89).

        ``cheap``: a round of the cheap part's tree (:meth:`choose_cheap`); with ``max_loss`` its time and
        tokens go into the request's books (:meth:`allowance`), and nothing else: what a lookup costs says
        nothing of what the whole drafter's rounds do."""
        self._keep_books(tokens, seconds, drafted)
        if cheap:
            return
        self._timed = True
        if not drafted:
            per_token = seconds / max(1, tokens)
            m = self.memory
            self._plain_s = per_token if self._plain_s is None else m * self._plain_s + (1 - m) * per_token
            return
        self._draft_tokens = self.memory * self._draft_tokens + tokens
        self._draft_s = self.memory * self._draft_s + seconds
        self._draft_n = self.memory * self._draft_n + 1
        plain_s = self._plain_token_s()
        if self._draft_n < self.judge_after:
            return
        slower = self._draft_tokens * plain_s < self._draft_s
        if slower or (self.probe and tokens <= 1 and not self.judge_after):
            if self._skip == 0:  # not already backing off after this round's choice
                self._back_off()
        elif tokens > 1:  # a round that accepted no drafted token paid for nothing, whatever its time said
            self._paid()

    def _keep_books(self, tokens: int, seconds: float, drafted: bool) -> None:
        """One measured round into :meth:`allowance`'s books (only with ``max_loss``)."""
        if self.max_loss is None:
            return
        self._elapsed += seconds
        if not drafted:
            return
        plain_s = self._plain_token_s()
        self._lost += seconds - tokens * plain_s
        if self._planned is not None:
            m = self.memory
            extra = seconds - self._planned
            self._fixed = max(0.0, m * self._fixed + (1 - m) * extra if self._fixed_seen else extra)
            self._fixed_seen, self._planned = True, None

    def _plain_token_s(self) -> float:
        """Seconds a token of a plain round takes: as measured (:attr:`plain_seconds`), else the curve's one row."""
        return self._plain_s if self._plain_s is not None else self.cost(1)

    @property
    def plain_seconds(self) -> float | None:
        """Seconds a token of a plain round takes (decayed over the measured ones; None: none yet)."""
        return self._plain_s

    def keep_hint(self) -> int:
        """How many nodes the next draft should be able to supply: the last choice and half again (at
        least 4 more), so the tree can still grow when acceptance rises; before this request's first
        choice, the prior's :attr:`DraftPrior.size` counts as the last, and without one the whole budget.
        A probe (:attr:`probe`) supplies at most ``PROBE_NODES``."""
        keep = self.max_nodes if self._last is None else min(self.max_nodes, self._last + max(4, self._last // 2))
        return min(keep, PROBE_NODES) if self.probe else keep

    def depth_hint(self, depth: int) -> int:
        """Levels the next draft may have (``depth`` as configured): a probe's at most ``PROBE_DEPTH``.

        Why probes are small: where drafts stopped paying (a weak head, an unfamiliar prompt, a CPU where
        every verified row costs a share of a forward) most probes fail, and a probe drafted like a full
        round (as deep as its best nodes lead, then its choice verified) cost about 2.5 plain rounds at 2
        threads on a Zen 3 core pair (docs/benchmarks.md, "What a drafting round costs"). Whether the
        head's best next tokens are accepted again is what a probe has to find out, and its top two nodes
        tell that; a probe that pays brings the full drafts back (the wait returns to ``probe_after``) and
        the tree grows from there by :meth:`keep_hint`."""
        return min(depth, PROBE_DEPTH) if self.probe else depth

    def expected(self, tree: Tree) -> float:
        return sum(math.exp(s) for s in tree.scores[1:])

    def observe(self, predicted: float, accepted: int, cheap: bool = False) -> None:
        """Fold one verified tree in: ``predicted`` = sum of the verified nodes' draft probabilities;
        ``cheap``: the tree was the cheap part's alone (:meth:`choose_cheap`), which calibrates that part only."""
        if cheap:
            self.cheap_calibration.observe(predicted, accepted)
            self._cheap_seen = True
        else:
            self.calibration.observe(predicted, accepted)
