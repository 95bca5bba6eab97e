"""Which decoder layers a stage holds: one half-open convention, ``[first, stop)`` like ``range``.

Half-open because ranges then split and join without off-by-one arithmetic: a ring of stages is
``[0, a), [a, b), [b, n)`` and a stage holds ``stop - first`` layers. No torch here, so the
mesh layer (planner, negotiation) can use it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers ``first, first + 1, ..., stop - 1``; empty when ``first == stop``."""

    first: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.stop:
            raise ValueError(f"layer range {self} is not a range: need 0 <= first <= stop")

    @property
    def n_layers(self) -> int:
        return self.stop - self.first

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.stop))

    def __str__(self) -> str:
        return f"{self.first}:{self.stop}"

    def check(self, n_layers: int) -> LayerRange:
        """This range, or a ValueError when it reaches past a model of ``n_layers`` layers."""
        if self.stop > n_layers:
            raise ValueError(f"layers {self} reach past the model's {n_layers} layers (use A:B with B <= {n_layers})")
        return self

    @classmethod
    def whole(cls, n_layers: int) -> LayerRange:
        return cls(0, n_layers)

    @classmethod
    def split(cls, n_layers: int, k: int) -> list[LayerRange]:
        """``k`` contiguous ranges covering ``[0, n_layers)``, sizes differing by at most one (larger first)."""
        if not 1 <= k <= n_layers:
            raise ValueError(f"cannot split {n_layers} layers into {k} stages")
        q, r = divmod(n_layers, k)
        out, a = [], 0
        for i in range(k):
            b = a + q + (1 if i < r else 0)
            out.append(cls(a, b))
            a = b
        return out

    @classmethod
    def parse(cls, spec: str | None, n_layers: int) -> LayerRange:
        """``"A:B"`` as typed on a command line; a missing end means the model's end (``""`` or None: all
        layers, ``"4:"``: from 4 on, ``":8"``: the first 8)."""
        if not spec:
            return cls.whole(n_layers)
        a, _, b = spec.partition(":")
        try:
            first, stop = int(a or 0), int(b or n_layers)
        except ValueError:
            raise ValueError(f"layers {spec!r}: expected A:B with whole numbers, e.g. 0:{n_layers}") from None
        return cls(first, stop).check(n_layers)
