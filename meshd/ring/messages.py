"""What travels around the ring for one request: segments of tree nodes, prune decisions, closes
and results.

Nodes are named by request-global ids that only grow, never by position in a tensor. That
makes a prune decision order-independent: a stage applies it to what it already holds, to what
is queued for it, and to rows that reach it later, and every stage ends up consistent without
the prune having to travel in-band behind the segments.

These are the in-memory forms; :mod:`meshd.ring.wire` maps them to and from codec messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_PARENT = -1  # parent id of a request's first token
PREFIX_MISS = "prefix_miss"  # a stage's answer to a prefix it no longer holds: the originator sends the prompt again


@dataclass(frozen=True)
class PrefixRef:
    """A request's first segment may start after a prefix the stages keep (models/prefixcache.py):
    its first ``length`` tokens (nodes ``0..length-1``, committed, at positions ``0..length-1``),
    named by the chain hash ``hash`` under plan ``epoch``. A stage that no longer holds it answers
    ``prefix_miss`` and drops the request's segments until one with ``restart`` arrives."""

    epoch: int
    length: int
    hash: int


@dataclass
class Segment:
    """Rows for one request: node ids, their parents (global ids), positions, and the input.

    ``tokens`` is set when the receiving stage embeds (the first stage); ``hidden`` otherwise.
    ``commit`` marks prompt chunks: rows that are committed context the moment they exist.
    """

    request_id: str
    node_ids: list[int]
    parents: list[int]
    positions: list[int]
    tokens: list[int] | None = None
    hidden: torch.Tensor | None = None
    commit: bool = False
    origin: str | None = None  # originator's node id: where the last stage returns the result
    first: bool = False  # a round's (or a new frontier's) first segment: the walk waits on it, stages run it first
    prefix: PrefixRef | None = None  # the request starts after this cached prefix (its first segment only)
    restart: bool = False  # the prompt again from its start, after a prefix miss: stages drop what they hold of it

    def __len__(self) -> int:
        return len(self.node_ids)

    def rows(self, keep: list[int]) -> Segment:
        """The same segment restricted to the row indices ``keep``."""
        return Segment(
            self.request_id,
            [self.node_ids[i] for i in keep],
            [self.parents[i] for i in keep],
            [self.positions[i] for i in keep],
            [self.tokens[i] for i in keep] if self.tokens is not None else None,
            self.hidden[keep] if self.hidden is not None else None,
            self.commit,
            self.origin,
            self.first,
            self.prefix,
            self.restart,
        )

    def with_hidden(self, hidden: torch.Tensor) -> Segment:
        """The same rows carrying a stage's output: the input of the next stage."""
        return Segment(
            self.request_id,
            self.node_ids,
            self.parents,
            self.positions,
            None,
            hidden,
            self.commit,
            self.origin,
            self.first,
            self.prefix,
            self.restart,
        )


@dataclass
class Prune:
    """The originator's decision: of all nodes with id <= ``upto``, only ``keep`` survive;
    ``commit`` (a subset of ``keep``) are now accepted context. Nodes above ``upto`` were issued
    after the decision and are untouched."""

    request_id: str
    upto: int
    keep: list[int]
    commit: list[int]

    def dead(self, node: int) -> bool:
        return node <= self.upto and node not in self._keep

    def __post_init__(self) -> None:
        self._keep = set(self.keep)


@dataclass(frozen=True)
class Close:
    """The request is over (finished, cancelled or failed): a stage frees its session and ignores
    anything that still arrives for it.

    A finished request may ask the stage to keep its context's KV first: ``commit`` are the last
    round's accepted nodes whose KV the stages computed (no prune follows a finish), and ``keep`` the
    chain hashes (plan ``epoch``) of the context's full blocks, of which a stage stores as many as
    its committed KV covers."""

    request_id: str
    keep: tuple[int, ...] = ()
    commit: tuple[int, ...] = ()
    epoch: int = 0


@dataclass
class Result:
    """A segment's output from the last stage, back at the originator."""

    request_id: str
    node_ids: list[int]
    hidden: torch.Tensor
    # rows of *other* requests at the reporting stage, queued or in the forward that produced this result:
    # a load signal for tree sizing that also shows requests of other originators
    stage_queue: int = 0

    @classmethod
    def of(cls, out: Segment, stage_queue: int) -> Result:
        """The last stage's output ``out`` as the result its originator reads."""
        return cls(out.request_id, out.node_ids, out.hidden, stage_queue)


@dataclass(frozen=True)
class Failure:
    """A stage refused one of the request's messages or failed computing it: its originator fails
    the request with ``reason`` instead of waiting for a result that will never come."""

    request_id: str
    code: str  # short and machine-readable: bad_segment, not_owner, kv_full, forward_failed, ...
    reason: str


StageMessage = Segment | Prune | Close  # what a stage worker handles
RingMessage = Segment | Prune | Close | Result | Failure  # everything that travels between peers for a request
