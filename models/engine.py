"""Single-device generation: plain autoregressive decoding and tree speculative decoding.

This is the reference loop the mesh modes are measured against, and the oracle's subject:
with temperature 0 its output must equal plain greedy decoding of the same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from models.budget import CostCurve, TreeBudget
from models.drafters import Drafter, cheap_part, couple, likeliest_first
from models.stage import Stage
from models.tree import Tree
from models.verify import Draws, History, Sampling, Walk, advance, sample_token

PREFILL_CHUNK = 256
GREEDY = Sampling()


@dataclass
class Stats:
    new_tokens: int = 0
    rounds: int = 0  # verification steps that emitted tokens (in flow with slots: every walk advance)
    trees: int = 0  # verified trees: rounds from a fresh root until the walk could go no further
    # trees of the root alone: every one of ar's; spec's and flow's while their budget backs off drafting
    plain_trees: int = 0
    accepted_drafts: int = 0  # drafted tokens the target accepted (bonus tokens not included)
    target_forwards: int = 0  # every forward of the target, prefill chunks included
    verified_nodes: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    per_round: list[int] = field(default_factory=list)
    # per tree, seconds from its fresh root to its first emitted tokens: what a new round pays before its walk
    # can move (its draft, its first segment's trip through the ring, the verification); a mesh's flow ends
    # most trees at that first return, so this and the tokens a tree yields bound its rate
    first_tokens_seconds: list[float] = field(default_factory=list)
    # flow with slots: why each drafted tree ended where it did (meshd.ring.scheduler.TREE_ENDS): the drafts
    # below the node the walk stopped at held other tokens than the target's (missed), one held it but no row
    # had been sent for it (unsent), or nothing was drafted below that node (undrafted)
    tree_ends: dict[str, int] = field(default_factory=dict)
    # positions whose KV the stages reused from a cached prefix (not computed), summed over the request's
    # prefills: its prompt's and, after a resume, each replay's of its history (a prefix a stage turned
    # out to lack does not count); a miss: a stage had evicted the prefix offered, that prefill was sent in full
    prefix_hit: int = 0
    prefix_misses: int = 0
    # the mesh's resume (meshd.ring.scheduler): times the request was replayed on a new ring after its ring
    # was lost or re-planned, and the seconds its client waited for tokens across those pauses
    resumed: int = 0
    paused_seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verification round, bonus included (1.0 for plain decoding)."""
        return (sum(self.per_round) / self.rounds) if self.rounds else 0.0

    @property
    def mean_per_tree(self) -> float:
        """Tokens emitted per verified tree, bonus included: the acceptance figure that does not fall when
        a tree's segments return (and advance the walk) one by one, as flow's slots make them."""
        return (sum(self.per_round) / self.trees) if self.trees else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Generation:
    token_ids: list[int]
    stats: Stats
    finish_reason: str  # "stop" (EOS) or "length"


def prefill(target: Stage, cache, ids: Sequence[int], stats: Stats) -> torch.Tensor:
    """Run the prompt through the target in chunks; return every position's post-norm feature."""
    feats = []
    for start in range(0, len(ids), PREFILL_CHUNK):
        chunk = torch.tensor(ids[start : start + PREFILL_CHUNK])
        hidden = target.forward_one(target.embed(chunk), cache, torch.arange(start, start + len(chunk)))
        feats.append(target.final_norm(hidden))
        stats.target_forwards += 1
    return torch.cat(feats)


def _finish(out: list[int], new: list[int], max_new: int, eos: set[int]) -> str | None:
    """Append ``new`` to ``out`` up to EOS or the length limit; return the finish reason if done."""
    for tok in new:
        out.append(tok)
        if tok in eos:
            return "stop"
        if len(out) >= max_new:
            return "length"
    return None


def generate(
    target: Stage,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 128,
    mode: str = "spec",
    drafter: Drafter | None = None,
    sampling: Sampling = GREEDY,
    seed: int | None = None,
    eos_ids: Sequence[int] = (),
    budget: TreeBudget | None = None,
    top_k: int = 8,
    depth: int = 8,
    pool: int = 512,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` on one device (``mode``: ``ar`` or ``spec``)."""
    if mode not in ("ar", "spec"):
        raise ValueError(f"mode {mode!r}: single-device modes are 'ar' and 'spec'")
    if mode == "spec" and drafter is None:
        raise ValueError("spec mode needs a drafter")
    if not prompt:
        raise ValueError("the prompt is empty")
    draws = Draws(seed)
    eos = set(eos_ids)
    stats = Stats()
    t0 = time.perf_counter()
    cache = target.new_cache(len(prompt) + max_new_tokens + pool + 8)
    feats = prefill(target, cache, prompt, stats)
    stats.prefill_seconds = time.perf_counter() - t0
    out: list[int] = []

    def emit(new: list[int]) -> str | None:
        before = len(out)
        reason = _finish(out, new, max_new_tokens, eos)
        if on_tokens:
            on_tokens(out[before:])
        return reason

    def history() -> History | None:  # what the penalties look at before the next token
        return History(prompt, tuple(out)) if sampling.penalised else None

    reason = emit([sample_token(target.logits(feats[-1:], normed=True)[0], sampling, draws, len(prompt), history())])
    context = list(prompt) + out
    cheap = None
    if mode == "spec":
        drafter.reset(list(prompt))
        couple(drafter, draws, sampling)
        drafter.accept(context, feats)
        budget = budget or TreeBudget(CostCurve({1: 1.0, 64: 2.0}))
        cheap = cheap_part(drafter) if budget.cheap else None
    while reason is None:
        tr = time.perf_counter()  # spec: the budget weighs measured rounds, plain against drafting ones
        left = max_new_tokens - len(out)  # the last token needs no draft: its root's row decides it
        full = mode == "spec" and left > 1 and budget.drafting()
        tree = None
        # the cheap part drafts only when a tree of its could pay for its rows (its likeliest node tells)
        cheap_now = (
            not full and left > 1 and cheap is not None and budget.cheap_may_pay(likeliest_first(cheap, context))
        )
        if full or cheap_now:
            # the whole drafter, or while the budget backs off it, its cheap part (n-gram lookup), whose
            # tree is verified only when its nodes pay for their rows
            td = time.perf_counter()
            d = drafter if full else cheap
            drafted = d.draft(
                context, top_k=top_k, depth=budget.depth_hint(depth), max_nodes=pool, keep=budget.keep_hint()
            )
            pool_tree = drafted.within(eos, left)  # no rows for what comes after the answer's end
            draft_s = time.perf_counter() - td
            stats.draft_seconds += draft_s
            if len(pool_tree) == 1 < len(drafted):
                pass  # all it drafted ends the answer: a plain round, which judges no draft
            elif full:
                tree = pool_tree.best(budget.choose(pool_tree, overhead=draft_s))
            elif n := budget.choose_cheap(pool_tree, overhead=draft_s):
                tree = pool_tree.best(n)
        if tree is None:
            # ar, and spec while drafts have not paid lately (the budget backs off) and the cheap part found
            # nothing worth a row: one row, as ar's
            h = target.forward_one(target.embed([out[-1]]), cache, torch.tensor([len(context) - 1]))
            feats = target.final_norm(h)
            stats.target_forwards += 1
            stats.rounds += 1
            stats.trees += 1
            stats.plain_trees += 1
            stats.per_round.append(1)
            logits = target.logits(feats, normed=True)[0]
            reason = emit([sample_token(logits, sampling, draws, len(context), history())])
            context.append(out[-1])
            if mode == "spec":
                drafter.accept(context, feats)  # the next probe drafts from the whole context
                budget.observe_round(1, time.perf_counter() - tr, drafted=False)
            continue
        accepted, emitted, feats = verify_tree(target, cache, tree, len(context) - 1, sampling, draws, stats, history())
        budget.observe(budget.expected(tree), len(accepted) - 1, cheap=not full)
        stats.rounds += 1
        stats.trees += 1
        stats.plain_trees += len(tree) == 1
        stats.accepted_drafts += len(accepted) - 1
        stats.per_round.append(len(emitted))
        reason = emit(emitted)
        context = list(prompt) + out
        drafter.accept(context, feats)
        # a cheap round's time says nothing of what the whole drafter's rounds cost, but goes into the books
        budget.observe_round(len(emitted), time.perf_counter() - tr, drafted=True, cheap=not full)
    if mode == "spec":
        budget.finish()
    stats.new_tokens = len(out)
    stats.seconds = time.perf_counter() - t0
    return Generation(out, stats, reason)


def verify_tree(
    target: Stage,
    cache,
    tree: Tree,
    base: int,
    sampling: Sampling,
    draws: Draws | None,
    stats: Stats,
    history: History | None = None,
) -> tuple[list[int], list[int], torch.Tensor]:
    """One target forward over the whole tree, acceptance walk, then keep only the accepted KV.

    Returns the accepted path, the emitted tokens and the post-norm features of the path nodes
    (what an EAGLE-style drafter regresses on)."""
    n = len(tree)
    mask = torch.cat([torch.ones(n, cache.length, dtype=torch.bool), tree.ancestor_mask()], dim=1)
    hidden = target.forward_one(target.embed(tree.tokens), cache, tree.positions(base), mask)
    stats.target_forwards += 1
    stats.verified_nodes += n
    feats = target.final_norm(hidden)
    walk = Walk()
    emitted = advance(walk, tree, target.logits_by_row(feats), sampling, draws, base, history)
    path = walk.path
    cache.keep(list(range(base)) + [base + i for i in path])
    return path, emitted, feats[path]
