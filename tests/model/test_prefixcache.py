"""The prefix caches' LRU: byte bound, least-recently-used eviction, epoch keying, chain hashes."""

from __future__ import annotations

import pytest
import torch

from models.prefixcache import PREFIX_BLOCK, PrefixBook, PrefixCache, chain_hashes

B = PREFIX_BLOCK


def kv(n: int, fill: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((2, 1, n, 4), fill)
    return k, k + 0.5


def entry_bytes(n: int) -> int:
    return 2 * 2 * 1 * n * 4 * 4


def test_chain_hashes_name_exact_prefixes_under_an_epoch():
    a = list(range(3 * B + 5))
    h = chain_hashes(a, 0)
    assert len(h) == 3  # whole blocks only
    assert chain_hashes(a[: 2 * B], 0) == h[:2]  # a prefix's hashes are the chain's start
    b = list(a)
    b[B + 1] += 1
    hb = chain_hashes(b, 0)
    assert hb[0] == h[0] and hb[1] != h[1] and hb[2] != h[2]  # a change reaches every later block
    assert set(chain_hashes(a, 1)).isdisjoint(h)  # another plan: other names
    assert all(0 <= x < 2**63 for x in h)


def test_lookup_finds_any_block_boundary_of_a_stored_prefix():
    c = PrefixCache(1 << 20)
    h = chain_hashes(list(range(4 * B)), 0)
    k, v = kv(4 * B)
    k[:, :, :, 0] = torch.arange(4 * B, dtype=torch.float32)
    assert c.store(0, h, k, v)
    got = c.lookup(0, h[1], 2 * B)
    assert got is not None and got.length == 2 * B
    assert torch.equal(got.k[0, 0, :, 0], torch.arange(2 * B, dtype=torch.float32))
    assert c.lookup(0, h[1], 3 * B) is None  # the hash names 2 blocks, not 3
    assert c.lookup(0, 12345, B) is None
    assert (c.hits, c.misses) == (1, 2)


def test_byte_bound_evicts_least_recently_used_first():
    c = PrefixCache(3 * entry_bytes(B))
    chains = [chain_hashes([i] * B, 0) for i in range(4)]
    for ch in chains[:3]:
        assert c.store(0, ch, *kv(B))
    assert c.nbytes == 3 * entry_bytes(B)
    assert c.lookup(0, chains[0][0], B) is not None  # 0 is now the most recently used
    assert c.store(0, chains[3], *kv(B))
    assert c.nbytes <= 3 * entry_bytes(B) and c.evictions == 1
    assert c.lookup(0, chains[1][0], B) is None  # the least recently used went
    assert all(c.lookup(0, chains[i][0], B) is not None for i in (0, 2, 3))
    assert not c.store(0, chain_hashes(list(range(4 * B)), 0), *kv(4 * B))  # bigger than the bound: not kept
    assert c.tokens == 3 * B


def test_epochs_key_entries_and_a_new_plan_drops_the_old():
    c = PrefixCache(1 << 20)
    toks = list(range(2 * B))
    c.store(0, chain_hashes(toks, 0), *kv(2 * B))
    c.store(1, chain_hashes(toks, 1), *kv(2 * B))
    assert c.lookup(1, chain_hashes(toks, 0)[1], 2 * B) is None  # epoch 0's name under epoch 1
    assert c.lookup(0, chain_hashes(toks, 0)[1], 2 * B) is not None
    c.set_epoch(1)
    assert c.lookup(0, chain_hashes(toks, 0)[1], 2 * B) is None
    assert c.lookup(1, chain_hashes(toks, 1)[1], 2 * B) is not None
    assert len(c) == 1 and c.tokens == 2 * B


def test_a_longer_turn_supersedes_the_shorter_and_shared_blocks_survive_eviction():
    counted = []
    c = PrefixCache(1 << 20, on_tokens=counted.append)
    turn1 = list(range(2 * B))
    turn2 = turn1 + list(range(100, 100 + 2 * B))
    c.store(0, chain_hashes(turn1, 0), *kv(2 * B))
    c.store(0, chain_hashes(turn2, 0), *kv(4 * B))
    assert len(c) == 1 and c.tokens == 4 * B and sum(counted) == 4 * B  # turn 1 is inside turn 2
    assert not c.store(0, chain_hashes(turn1, 0), *kv(2 * B))  # already held, inside turn 2
    other = turn1 + list(range(200, 200 + B))  # same system prompt, another question
    c.store(0, chain_hashes(other, 0), *kv(3 * B))
    h1 = chain_hashes(turn1, 0)[1]
    c.lookup(0, chain_hashes(turn2, 0)[-1], 4 * B)  # turn 2 used: the other branch is older
    c.evict_one()
    assert c.lookup(0, h1, 2 * B) is not None  # the shared blocks still resolve through turn 2
    assert c.reclaim(1) == 4 * B and c.tokens == 0 and sum(counted) == 0 and not c.index


def test_book_matches_the_longest_prefix_leaving_a_token_to_compute():
    book = PrefixBook(1 << 20)
    ctx = list(range(3 * B))
    feats = torch.randn(3 * B, 8)
    assert book.record(ctx, feats) == chain_hashes(ctx, 0)
    m = book.match([*ctx, 1, 2], need_feats=True)
    assert m.length == 3 * B and torch.equal(m.feats, feats)
    m = book.match(ctx, need_feats=False)  # the whole context is the prompt: its last block stays to compute
    assert m.length == 2 * B and m.hash == chain_hashes(ctx, 0)[1]
    assert book.match([7] * (2 * B), need_feats=False) is None
    book.forget(m.hash)
    assert book.match([*ctx, 1], need_feats=False) is None
    book.record(ctx, None)  # no features: a request with a drafter that needs them cannot use it
    assert book.match([*ctx, 1], need_feats=True) is None
    assert book.match([*ctx, 1], need_feats=False).length == 3 * B
    book.set_epoch(2)
    assert book.match([*ctx, 1], need_feats=False) is None


def test_negative_bound_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        PrefixCache(-1)
