"""Conversation prefixes kept for reuse: a stage's KV of recent prompts, and the originator's record of them.

A chat's next turn, or a request with the same system prompt, starts with tokens whose KV a stage
computed moments ago. Prefixes are named by *chain hashes*: one per full block of ``PREFIX_BLOCK``
tokens, the hash of the plan epoch and every token up to that block's end, so one hash names one
exact token prefix under one plan, and a stored prefix of n blocks also answers for each of its
shorter prefixes. The originator knows the tokens and sends only hashes; a stage never needs them.

Two sides, one LRU of hash-indexed entries (:class:`_HashedLru`):

- :class:`PrefixCache` at a stage holds the keys and values of its layer slice for each stored
  prefix, bounded in bytes; the worker forks a new request's session from it (a copy, so the entry
  stays valid whatever the request writes) and stores a finished request's committed context into it.
- :class:`PrefixBook` at the originator records which prefixes it asked the stages to store, with
  the target's post-norm features of those positions when it had them (an EAGLE drafter feeds on
  the features of every committed position, and a request that reuses the stages' KV gets no
  features back for the reused part). The record is a belief: a stage may have evicted the entry,
  and then answers ``prefix_miss`` and the originator sends the whole prompt again.

Pure data and torch tensors; no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

PREFIX_BLOCK = 16  # tokens per hashed block: prefixes are reused in whole blocks
HASH_MASK = (1 << 63) - 1  # hashes are non-negative int64s: the codec's ints and torch's both hold them


def chain_hashes(tokens: Sequence[int], epoch: int, block: int = PREFIX_BLOCK) -> list[int]:
    """One hash per full block of ``tokens``: entry ``k`` names ``tokens[: (k + 1) * block]`` under ``epoch``."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", epoch))
    out = []
    for k in range(len(tokens) // block):
        h.update(struct.pack(f"<{block}q", *tokens[k * block : (k + 1) * block]))
        out.append(int.from_bytes(h.copy().digest(), "little") & HASH_MASK)
    return out


@dataclass
class _Entry:
    epoch: int
    hashes: list[int]  # chain hashes of its blocks; the last one is its key
    nbytes: int
    payload: object
    members: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.members = set(self.hashes)


class _HashedLru:
    """Entries named by their chain hashes, least recently used first out, bounded in bytes.

    Every hash of every entry is indexed, so a lookup by any block boundary finds the entry that
    holds that prefix. An entry whose whole chain is a prefix of a new one is superseded by it
    (a chat's turn n+1 replaces turn n); one that already holds a new chain absorbs it.
    """

    def __init__(self, max_bytes: int, block: int = PREFIX_BLOCK):
        if max_bytes < 0:
            raise ValueError(f"a prefix cache of {max_bytes} bytes: give 0 (off) or more")
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # key (last hash) -> entry, oldest first
        self.index: dict[int, int] = {}  # any chain hash -> key of an entry holding it
        self.nbytes = 0
        self.epoch = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """A new plan: entries of any other epoch can never be asked for again."""
        self.epoch = epoch
        for key in [k for k, e in self.entries.items() if e.epoch != epoch]:
            self._remove(key)

    def find(self, epoch: int, h: int, length: int) -> _Entry | None:
        """The entry holding the ``length``-token prefix named ``h`` under ``epoch`` (most recently used now)."""
        key = self.index.get(h)
        e = self.entries.get(key) if key is not None else None
        n = length // self.block
        if e is None or e.epoch != epoch or length % self.block or not 0 < n <= len(e.hashes) or e.hashes[n - 1] != h:
            return None
        self.entries.move_to_end(key)
        return e

    def longest(self, epoch: int, hashes: Sequence[int]) -> tuple[int, _Entry] | None:
        """The longest prefix among ``hashes`` (a chain) held here: (its length, the entry)."""
        for n in range(len(hashes), 0, -1):
            e = self.find(epoch, hashes[n - 1], n * self.block)
            if e is not None:
                return n * self.block, e
        return None

    def put(self, epoch: int, hashes: list[int], nbytes: int, payload: object) -> bool:
        """Store an entry for the chain ``hashes``; False when it cannot fit (or is already held)."""
        if not hashes or nbytes > self.max_bytes:
            return False
        held = self.find(epoch, hashes[-1], len(hashes) * self.block)
        if held is not None:
            return False
        chain = set(hashes)
        for key in [k for k, e in self.entries.items() if e.epoch == epoch and k in chain]:
            self._remove(key)  # a shorter chain of the same conversation: superseded
        while self.entries and self.nbytes + nbytes > self.max_bytes:
            self.evict_one()
        e = _Entry(epoch, list(hashes), nbytes, payload)
        key = hashes[-1]
        self.entries[key] = e
        self.nbytes += nbytes
        for h in hashes:
            self.index[h] = key
        self._added(e)
        return True

    def evict_one(self) -> _Entry | None:
        if not self.entries:
            return None
        key = next(iter(self.entries))
        self.evictions += 1
        return self._remove(key)

    def _remove(self, key: int) -> _Entry:
        e = self.entries.pop(key)
        self.nbytes -= e.nbytes
        for h in e.hashes:
            if self.index.get(h) == key:
                other = next((k for k, o in reversed(self.entries.items()) if h in o.members), None)
                if other is None:
                    del self.index[h]
                else:
                    self.index[h] = other
        self._removed(e)
        return e

    def _added(self, e: _Entry) -> None:
        """Hook for subclasses that account for what entries hold."""

    def _removed(self, e: _Entry) -> None:
        """Hook for subclasses that account for what entries hold."""


@dataclass
class KVPrefix:
    """A stored prefix's keys and values for this stage's layers: (layers, kv heads, length, head dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class PrefixCache(_HashedLru):
    """A stage's KV of recent prefixes, at most ``max_bytes``, least recently used evicted first.

    ``on_tokens(delta)`` hears every change in the number of cached KV entries: the worker charges
    them to the same per-stage KV reservation its sessions draw on (:class:`meshd.ring.validate.FrameGate`),
    and evicts from here (:meth:`reclaim`) before a live request is refused for room.
    """

    def __init__(
        self, max_bytes: int, block: int = PREFIX_BLOCK, on_tokens: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(max_bytes, block)
        self.on_tokens = on_tokens
        self.tokens = 0
        self.hits = self.misses = self.stores = 0

    def lookup(self, epoch: int, h: int, length: int) -> KVPrefix | None:
        """The first ``length`` entries of the prefix named ``h`` (views: copy before writing), or None."""
        e = self.find(epoch, h, length)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        kv: KVPrefix = e.payload
        return KVPrefix(kv.k[:, :, :length], kv.v[:, :, :length])

    def store(self, epoch: int, hashes: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        """Keep ``k, v`` (the first ``len(hashes) * block`` positions, owned by the cache from now on)."""
        n = len(hashes) * self.block
        if k.shape[2] != n or v.shape != k.shape:
            raise ValueError(f"{len(hashes)} blocks name {n} positions, but the KV given holds {k.shape[2]}")
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        ok = self.put(epoch, hashes, nbytes, KVPrefix(k, v))
        self.stores += ok
        return ok

    def reclaim(self, tokens: int) -> int:
        """Evict least recently used entries until ``tokens`` KV entries are freed (or none is left)."""
        freed = 0
        while freed < tokens and self.entries:
            freed += self.evict_one().payload.length
        return freed

    def _added(self, e: _Entry) -> None:
        self._count(e.payload.length)

    def _removed(self, e: _Entry) -> None:
        self._count(-e.payload.length)

    def _count(self, delta: int) -> None:
        self.tokens += delta
        if self.on_tokens is not None:
            self.on_tokens(delta)


@dataclass(frozen=True)
class PrefixMatch:
    """A prompt's longest recorded prefix: ``length`` tokens named ``hash`` under ``epoch``, and
    the target's post-norm features of those positions when recorded (None: not kept)."""

    epoch: int
    length: int
    hash: int
    feats: torch.Tensor | None


class PrefixBook(_HashedLru):
    """The originator's record of the prefixes it asked stages to keep; the features it holds for
    them count against ``max_bytes`` (an entry without features costs ``ENTRY_BYTES``)."""

    ENTRY_BYTES = 64

    def match(self, prompt: Sequence[int], *, need_feats: bool) -> PrefixMatch | None:
        """The longest recorded prefix that leaves at least one prompt token to compute (the last
        token's logits are the request's first answer)."""
        hashes = chain_hashes(prompt[: len(prompt) - 1], self.epoch, self.block)
        for n in range(len(hashes), 0, -1):
            length = n * self.block
            e = self.find(self.epoch, hashes[n - 1], length)
            if e is None:
                continue
            feats = e.payload
            if need_feats and (feats is None or feats.shape[0] < length):
                continue
            return PrefixMatch(self.epoch, length, hashes[n - 1], feats[:length] if feats is not None else None)
        return None

    def record(self, context: Sequence[int], feats: torch.Tensor | None) -> list[int]:
        """Note that stages were asked to keep ``context``'s full blocks; returns their chain hashes
        (what the close message carries). ``feats``: the features of ``context``'s positions, if known."""
        hashes = chain_hashes(context, self.epoch, self.block)
        if not hashes:
            return []
        n = len(hashes) * self.block
        if feats is not None and feats.shape[0] >= n:
            feats = feats[:n].clone()
            nbytes = feats.numel() * feats.element_size()
        else:
            feats, nbytes = None, self.ENTRY_BYTES
        if not self.put(self.epoch, hashes, nbytes, feats) and feats is not None:
            self.put(self.epoch, hashes, self.ENTRY_BYTES, None)  # too big to keep the features: the hashes alone
        return hashes

    def forget(self, h: int) -> None:
        """A stage no longer holds the prefix named ``h``: stop offering it (and longer ones through it)."""
        key = self.index.get(h)
        if key is not None and key in self.entries:
            self._remove(key)
