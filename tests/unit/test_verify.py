"""Acceptance rules: greedy walk, resumable walks, exactness of sampled tree walks (and noise keyed by
position, so a seeded sample is the same text in every mode), for plain sampling and for the
distribution top-k, min-p and the penalties shape (each node judged by its own history), checked
against a direct computation of that distribution; exactness also when the drafts were ranked with the
same noise (coupled drafting), which makes a drafter that agrees with the target accepted every time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from meshd.ring.pipeline import build_local_pipeline
from meshd.ring.scheduler import Request
from models.drafters import ModelDrafter, load_drafter
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree
from models.verify import Draws, History, Sampling, Walk, advance, decide, target_probs, token_logprobs, verify


def test_greedy_walk_accepts_longest_match_and_bonus():
    t = Tree.root(0)
    a = t.add(0, 5, -0.1)
    t.add(0, 6, -0.2)
    b = t.add(a, 7, -0.3)
    logits = torch.full((len(t), 10), -1.0)
    logits[0, 5] = 1.0  # root -> 5 (node a): accepted
    logits[a, 7] = 1.0  # a -> 7 (node b): accepted
    logits[2, 1] = 1.0
    logits[b, 3] = 1.0  # b is a leaf: bonus 3
    path, toks = verify(t, logits, Sampling())
    assert path == [0, a, b] and toks == [5, 7, 3]


def test_walk_resumes_when_logits_arrive():
    t = Tree.root(0)
    a = t.add(0, 5, -0.1)
    logits = torch.zeros(2, 10)
    logits[0, 5] = 1.0
    logits[1, 2] = 1.0
    w = Walk()
    avail = {0}
    got = advance(w, t, lambda i: logits[i] if i in avail else None, Sampling(), None, 0)
    assert got == [5] and not w.done and w.path == [0, a]
    avail.add(1)
    assert advance(w, t, lambda i: logits[i] if i in avail else None, Sampling(), None, 0) == [2]
    assert w.done and w.bonus == 2


@pytest.fixture(scope="module")
def tiny_stage(tiny_dir):
    return Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")


# what the penalties see before the tree's root: the prompt, then generated tokens ending in the root's 8
HISTORY = History([3, 17, 42, 8], [8, 5, 8])
PENALISED = Sampling(
    0.9, 1.0, top_k=12, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6
)
# favours repeats: the tree's child kids[1] makes its own token likelier below it, so a walk that forgot
# the path's tokens would be visibly wrong there (the control in test_penalties_use_the_path_to_the_node)
REPEATING = Sampling(
    1.0, 1.0, top_k=20, min_p=0.01, repetition_penalty=0.9, presence_penalty=-1.0, frequency_penalty=-0.5
)


def _tree_and_logits(stage: Stage, sampling: Sampling):
    """A two-level tree whose children deliberately include unlikely tokens, and its target logits."""
    prompt = torch.tensor([3, 17, 42, 8])
    cache = stage.new_cache()
    last = stage.forward_one(stage.embed(prompt), cache, torch.arange(4))[-1:]
    p0 = target_probs(stage.logits(last)[0], sampling, HISTORY)
    ranked = p0.argsort(descending=True).tolist()
    t = Tree.root(int(prompt[-1]))
    kids = [t.add(0, ranked[r], -0.1 * (j + 1)) for j, r in enumerate([1, 0, 5, 12])]
    for j, r in enumerate([0, 2, 9]):
        t.add(kids[1], r, -1.0 - 0.1 * j)
    n = len(t)
    mask = torch.cat([torch.ones(n, 3, dtype=torch.bool), t.ancestor_mask()], 1)
    cache.truncate(3)
    logits = stage.logits(stage.forward_one(stage.embed(t.tokens), cache, t.positions(3), mask))
    return t, logits, kids


def biased_decide(tree, node, logits, sampling, gen, history):
    """Control: a plausible-looking but wrong rule (no residual: falls back to the full distribution)."""
    p = target_probs(logits, sampling, history).double()
    for c in sorted(tree.children(node), key=lambda c: -tree.scores[c]):
        if float(torch.rand((), generator=gen, dtype=torch.float64)) < float(p[tree.tokens[c]]):
            return c, tree.tokens[c]
    return None, int(torch.multinomial(p, 1, generator=gen))


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    exp = probs * counts.sum()
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    if e[-1] == 0:
        obs, e = obs[:-1], e[:-1]
    return float(chisquare(obs, e * obs.sum() / e.sum()).pvalue)


@pytest.mark.parametrize("sampling", [Sampling(1.0, 1.0), Sampling(0.7, 0.9), PENALISED, REPEATING])
def test_tree_rejection_sampling_matches_target(tiny_stage, sampling):
    tree, logits, kids = _tree_and_logits(tiny_stage, sampling)
    p_root = target_probs(logits[0], sampling, HISTORY).numpy().astype(np.float64)
    # below kids[1] the history has gained kids[1]'s token: that is what plain decoding would have seen
    here = HISTORY.then([tree.tokens[kids[1]]])
    p_child = target_probs(logits[kids[1]], sampling, here).numpy().astype(np.float64)
    draws = 12000
    gen = torch.Generator().manual_seed(1234)
    first = np.zeros(len(p_root))
    second = np.zeros(len(p_root))
    biased = np.zeros(len(p_root))
    for i in range(draws):  # a request's noise is fixed per position: one request (seed) per draw
        path, toks = verify(tree, logits, sampling, Draws(1234 + i), 3, HISTORY)
        first[toks[0]] += 1
        if len(path) > 1 and path[1] == kids[1]:
            second[toks[1]] += 1
        biased[biased_decide(tree, 0, logits[0], sampling, gen, HISTORY)[1]] += 1
    # Not a rounding bound: for an exact sampler the p-value is uniform on [0, 1], so each check
    # fails with probability 1e-3 over the draws. The seed fixes them here (p = 0.02 to 0.998; 0.09
    # to 0.72 with 60,000 draws and another seed); on another CPU the logits differ by rounding (~1e-6
    # relative), which shifts a few draws' outcomes at most, a fresh 1e-3 chance at worst. The biased
    # control scores p = 0.0 at 12,000 draws, far below its 1e-6.
    assert _chi2(first, p_root) > 1e-3
    assert second.sum() > 1000 and _chi2(second, p_child) > 1e-3
    assert _chi2(biased, p_root) < 1e-6, "the chi-square test failed to catch a biased sampler"


def test_decide_greedy_is_argmax():
    t = Tree.root(0)
    t.add(0, 4, -0.5)
    logits = torch.tensor([0.0, 3.0, 1.0, 0.0, 2.9])
    assert decide(t, 0, logits, Sampling(), None, 0) == (None, 1)


def test_penalties_use_the_path_to_the_node(tiny_stage):
    """Control for the history rule: judging kids[1]'s successor with the root's history (forgetting
    the draft token on the path) is a different distribution, and the chi-square test sees it."""
    tree, logits, kids = _tree_and_logits(tiny_stage, REPEATING)
    here = HISTORY.then([tree.tokens[kids[1]]])
    p_child = target_probs(logits[kids[1]], REPEATING, here).numpy().astype(np.float64)
    blind = np.zeros(len(p_child))
    for i in range(3000):
        blind[decide(tree, kids[1], logits[kids[1]], REPEATING, Draws(99 + i), 5, HISTORY)[1]] += 1
    assert _chi2(blind, p_child) < 1e-6


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(1.3, 0.95, min_p=0.02)])
def test_drafts_ranked_with_the_noise_keep_the_target_distribution(sampling):
    """Coupled drafting reads the noise the target samples with: the children below the root are the top
    three of another distribution (the target's logits blurred and shifted) perturbed by that noise, so
    which tokens are in the tree depends on the draw. The walk's token must still follow the target's
    distribution exactly (chi-square, p-value uniform for an exact sampler: fails with probability 1e-3;
    these seeds give p = 0.95 and 0.91), and the coupled children (accepted 7,567 and 7,420 times of
    8,000) must be accepted far more often than the same distribution's deterministic top three (4,847
    and 3,867)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(40, generator=g) * 1.5
    draft_lp = torch.log_softmax(0.7 * logits + torch.randn(40, generator=g), -1)
    p = target_probs(logits, sampling).double().numpy()
    assert (p > 0.01).sum() >= 8  # a distribution worth testing
    counts, coupled, fixed = np.zeros(40), 0, 0
    top3 = draft_lp.topk(3).indices.tolist()
    for i in range(8000):
        d = Draws(i)
        t = Tree.root(0)
        for tok in d.perturb(draft_lp[None], [6], sampling.temperature, None, 40)[0].topk(3).indices.tolist():
            t.add(0, tok, -1.0)
        path, toks = verify(t, torch.stack([logits] * len(t)), sampling, d, 5)
        counts[toks[0]] += 1
        coupled += len(path) > 1
        fixed += toks[0] in top3
    assert _chi2(counts, p) > 1e-3
    assert coupled > 1.2 * fixed, (coupled, fixed)


def test_a_drafter_that_agrees_with_the_target_is_accepted_every_time():
    """With the target's own log-probabilities, the coupled draft's first choice is the token the target
    draws at that position (temperature scales both alike), 200 times out of 200; the uncoupled choice,
    the argmax, only as often as its probability."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=g) * 2
    sampling = Sampling(0.8)
    hits, argmax_hits = 0, 0
    for i in range(200):
        d = Draws(100 + i)
        guess = int(d.perturb(torch.log_softmax(logits, -1)[None], [9], 0.8, None, 50)[0].argmax())
        t = Tree.root(0)
        t.add(0, guess, -0.1)
        _, toks = verify(t, torch.stack([logits, logits]), sampling, d, 8)
        hits += toks[0] == guess
        argmax_hits += toks[0] == int(logits.argmax())
    assert hits == 200
    assert argmax_hits < 200 * (float(target_probs(logits, sampling).max()) + 0.1)


def _reference_probs(logits: np.ndarray, s: Sampling, prompt: list[int], generated: list[int]) -> np.ndarray:
    """The documented recipe written out plainly, token by token (float64), to check ``target_probs``."""
    z = logits.astype(np.float64).copy()
    for t in set(prompt) | set(generated):
        z[t] = z[t] / s.repetition_penalty if z[t] > 0 else z[t] * s.repetition_penalty
    for t in set(generated):
        z[t] -= s.frequency_penalty * generated.count(t) + s.presence_penalty
    p = np.exp((z - z.max()) / s.temperature)
    p /= p.sum()
    if s.top_k:
        p[p < np.sort(p)[-s.top_k]] = 0
        p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= s.top_p]] = 0
        p /= p.sum()
    if s.min_p:
        p[p < s.min_p * p.max()] = 0
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "s",
    [
        Sampling(0.8, top_k=5),
        Sampling(1.2, min_p=0.1),
        Sampling(1.0, 0.9, top_k=10, min_p=0.05),
        Sampling(0.7, repetition_penalty=1.5),
        Sampling(1.0, presence_penalty=1.0, frequency_penalty=0.5),
        Sampling(1.0, presence_penalty=-1.5, frequency_penalty=-0.25, repetition_penalty=0.8),
        PENALISED,
    ],
)
def test_target_probs_follow_the_documented_recipe(s):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, generator=g) * 3
    prompt, generated = [1, 2, 3, 3, 40], [3, 7, 7, 7, 12, 49]
    got = target_probs(logits, s, History(prompt, generated)).double().numpy()
    want = _reference_probs(logits.numpy(), s, prompt, generated)
    # float32 softmax against float64: a few ulps of float32 on values below 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert ((got > 0) == (want > 0)).all()


def test_penalties_need_the_history_and_greedy_takes_the_penalised_argmax():
    logits = torch.tensor([0.0, 2.0, 1.9, -1.0])
    with pytest.raises(ValueError, match="History"):
        target_probs(logits, Sampling(1.0, repetition_penalty=1.2))
    t = Tree.root(1)
    t.add(0, 2, -0.5)
    s = Sampling(0.0, frequency_penalty=0.5)
    assert decide(t, 0, logits, s, None, 0, History([], [])) == (None, 1)
    assert decide(t, 0, logits, s, None, 0, History([], [1])) == (1, 2)  # 2.0 - 0.5 < 1.9: the child wins


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.5), dict(presence_penalty=0.8, frequency_penalty=0.6)])
def test_greedy_with_penalties_is_plain_penalised_decoding_on_every_path(tiny_dir, tiny_stage, penalties):
    """The greedy oracle with penalties: the single-device speculative engine and the mesh's scheduler
    (flow, three stages) give plain decoding's tokens. The drafter is the target itself, unpenalised,
    so its trees are deep and often right: accepted paths whose nodes are judged with their own history."""
    sampling = Sampling(0.0, **penalties)
    prompt = [5, 9, 5, 9, 5, 9, 21, 5, 9]
    drafter = ModelDrafter(load_drafter(f"model:{tiny_dir}", tiny_stage).model)
    want = generate(tiny_stage, prompt, max_new_tokens=40, mode="ar", sampling=sampling).token_ids
    assert want != generate(tiny_stage, prompt, max_new_tokens=40, mode="ar").token_ids  # the penalties bite
    spec = generate(tiny_stage, prompt, max_new_tokens=40, mode="spec", drafter=drafter, sampling=sampling)
    assert spec.token_ids == want and spec.stats.accepted_drafts > 0
    pipe = build_local_pipeline(ModelSource.resolve(tiny_dir), 3, lambda: ModelDrafter(drafter.model), full=tiny_stage)
    pipe.submit(Request("r", prompt, 40, "flow", sampling))
    out = pipe.run()["r"]
    assert out.tokens == want and out.stats.accepted_drafts > 0


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, 0.9), PENALISED])
def test_a_seeded_sample_is_plain_decodings_text_in_every_mode(tiny_dir, tiny_stage, sampling):
    """Noise keyed by position, whatever the tree: a seeded sampled request writes plain sampled
    decoding's text in `spec` and in the mesh's `chunk` and `flow` (the drafts, ranked with the same noise,
    only decide how many of those tokens a forward yields), as greedy requests do. A tree forward's fp32
    logits differ from a one-row forward's by rounding, which moves a draw onto another token only where
    two tokens' races end within ~1e-6 of each other (about a 1e-6 chance a token); none does for these
    seeds. Control: another seed writes another text, every mode verified drafted trees, and some drafts
    were accepted."""
    prompt = [5, 9, 5, 9, 5, 9, 21, 5, 9]
    drafter = ModelDrafter(load_drafter(f"model:{tiny_dir}", tiny_stage).model)
    want = generate(tiny_stage, prompt, max_new_tokens=40, mode="ar", sampling=sampling, seed=7).token_ids
    assert want != generate(tiny_stage, prompt, max_new_tokens=40, mode="ar", sampling=sampling, seed=8).token_ids
    spec = generate(tiny_stage, prompt, max_new_tokens=40, mode="spec", drafter=drafter, sampling=sampling, seed=7)
    assert spec.token_ids == want
    pipe = build_local_pipeline(ModelSource.resolve(tiny_dir), 3, lambda: ModelDrafter(drafter.model), full=tiny_stage)
    for mode in ("chunk", "flow"):
        pipe.submit(Request(mode, prompt, 40, mode, sampling, seed=7))
    out = pipe.run()
    runs = {"spec": spec.stats, **{m: out[m].stats for m in ("chunk", "flow")}}
    for mode in ("chunk", "flow"):
        assert out[mode].tokens == want, mode
    assert all(s.plain_trees < s.trees for s in runs.values()), "some mode drafted no tree"
    assert sum(s.accepted_drafts for s in runs.values()) > 0


def test_token_logprobs_are_the_models_log_softmax():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    lp = token_logprobs(logits, 2, top=2)
    ref = torch.log_softmax(logits, -1)
    assert lp.token == 2 and lp.logprob == pytest.approx(float(ref[2]))
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(float(ref[1]))
    assert token_logprobs(logits, 0, top=0).top == ()
