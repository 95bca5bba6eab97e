"""Progress while a daemon loads its layers: a model on an SD card can take minutes, and a daemon
that says nothing for minutes looks hung (to a user, and to systemd's status line)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from meshd.serve import notify
from models.quant import QuantRows
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.weights import TensorReader

log = logging.getLogger("meshd")
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")
PROGRESS_EVERY_S = 2.0  # at most one progress line this often


@dataclass
class ProgressReader(TensorReader):
    """A tensor reader that calls ``on_layer(i)`` whenever it starts reading layer ``i``'s tensors."""

    on_layer: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layer: int | None = None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self._note(name)
        return super().read(name, dtype)

    def read_matrix(self, name: str, fmt: str, dtype: torch.dtype | None = None) -> torch.Tensor | QuantRows:
        self._note(name)
        return super().read_matrix(name, fmt, dtype)

    def _note(self, name: str) -> None:
        m = LAYER_TENSOR.match(name)
        if m and int(m.group(1)) != self._layer:
            self._layer = int(m.group(1))
            if self.on_layer is not None:
                self.on_layer(self._layer)


def load_layers(source: ModelSource, span: LayerRange, dtype: torch.dtype, weights: str, what: str) -> Stage:
    """``Stage.load`` of ``span`` (no vocabulary), logging and telling systemd how far it got."""
    t0 = last = time.monotonic()

    def on_layer(i: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            text = f"{what}: layer {i - span.first + 1} of {span.n_layers} ({now - t0:.0f} s)"
            log.info("%s", text)
            notify.status(text)

    reader = ProgressReader(source, on_layer=on_layer)
    stage = Stage.load(source, span, vocab=False, dtype=dtype, weights=weights, reader=reader)
    log.info("%s: %d layers in %.1f s", what, span.n_layers, time.monotonic() - t0)
    return stage
