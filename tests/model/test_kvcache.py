"""The KV cache: compaction after a prune keeps exactly the gathered entries, and a pruned cache
gives the same logits as recomputing the kept tokens from scratch."""

from __future__ import annotations

import pytest
import torch
from support import forward_terms, rounding_tolerance

from models.kvcache import KVCache
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree


def test_logits_after_prune_equal_fresh_recompute(tiny_dir):
    stage = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [3, 17, 42, 8, 9, 1]
    cache = stage.new_cache()
    stage.forward_one(stage.embed(prompt[:-1]), cache, torch.arange(5))
    base = cache.length
    t = Tree.root(prompt[-1])
    a = t.add(0, 11, -0.1)
    t.add(0, 12, -0.2)
    b = t.add(a, 13, -0.3)
    t.add(a, 14, -0.4)
    c = t.add(b, 15, -0.5)
    mask = torch.cat([torch.ones(len(t), base, dtype=torch.bool), t.ancestor_mask()], 1)
    stage.forward_one(stage.embed(t.tokens), cache, t.positions(base), mask)
    keep = t.path(c)  # root -> 11 -> 13 -> 15
    cache.keep(list(range(base)) + [base + i for i in keep])
    nxt = torch.tensor([21, 22])
    got = stage.logits(stage.forward_one(stage.embed(nxt), cache, torch.arange(cache.length, cache.length + 2)))
    seq = [*prompt, 11, 13, 15, 21, 22]
    fresh = stage.logits(stage.forward_one(stage.embed(seq), stage.new_cache(), torch.arange(len(seq))))
    # the same fp32 rows over a compacted cache vs recomputed: only the summation order may differ
    tol = rounding_tolerance(torch.float32, forward_terms(stage.cfg, context=len(seq)), fresh.abs().max())
    assert (got - fresh[-2:]).abs().max() <= tol
    cache.truncate(base)
    assert cache.length == base


@pytest.mark.parametrize(
    "keep", [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 5, 8], [0, 2, 3, 9], [4, 7], [], list(range(6))]
)
def test_cache_keep_equals_a_gather(keep):
    """keep() copies only the moved tail; the result must still be exactly the gathered entries."""
    cache = KVCache(2, 3, 4, torch.float32, capacity=4)
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    cache.reserve(10)
    for layer in range(2):
        cache.write(layer, k[layer], v[layer])
    cache.commit(10)
    cache.keep(keep)
    idx = torch.tensor(keep, dtype=torch.long)
    assert cache.length == len(keep)
    assert torch.equal(cache.k[:, :, : len(keep)], k.index_select(2, idx))
    assert torch.equal(cache.v[:, :, : len(keep)], v.index_select(2, idx))


def test_load_copies_a_stored_prefix_and_gather_takes_slots_in_order():
    c = KVCache(2, 1, 4, torch.float32, capacity=4)
    k = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).reshape(2, 1, 6, 4)
    c.load(k, k + 1)
    assert c.length == 6 and c.capacity >= 6
    with torch.inference_mode():
        c.k[0, 0, 0, 0] = -1.0
    assert k[0, 0, 0, 0] == 0.0  # a copy: the stored prefix is untouched by what the session writes
    gk, gv = c.gather([1, 3, 4])
    assert torch.equal(gk, c.k[:, :, [1, 3, 4]]) and torch.equal(gv, c.v[:, :, [1, 3, 4]])
    with pytest.raises(IndexError):
        c.gather([6])
    with pytest.raises(ValueError, match="does not fit"):
        c.load(torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 2, 4))
