"""Progress while a model loads and while a long step runs: a model on an SD card can take
minutes, and a daemon or command that says nothing for minutes looks hung (to a user, and to
systemd's status line).

The one place for it: the daemon's slices (``meshd serve``), the whole model of ``meshd generate``,
``meshd profile`` and ``meshd bench``, and the heartbeat lines of a long measurement all come from
here. Where the lines go is the caller's ``say``: the daemon's log and systemd status
(:func:`daemon_say`), or stderr for a command (:func:`stderr_say`).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import torch

from meshd.serve import notify
from models.quant import QuantRows
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.weights import TensorReader

log = logging.getLogger("meshd")
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")
PROGRESS_EVERY_S = 2.0  # at most one line per loaded layer this often
TICK_EVERY_S = 5.0  # a step without steps of its own (a measurement, one benchmark run) says it still runs this often,
TICK_MAX_S = 60.0  # then, as it goes on, less often, but at least this often

Say = Callable[[str], None]


def daemon_say(text: str) -> None:
    """A progress line of the daemon: its log, and systemd's status line."""
    log.info("%s", text)
    notify.status(text)


def stderr_say(text: str) -> None:
    """A progress line of a command: stderr, so stdout stays the answer (``--json`` included)."""
    print(text, file=sys.stderr, flush=True)


def quiet(_text: str) -> None:
    """No progress lines (library use, tests)."""


@dataclass
class ProgressReader(TensorReader):
    """A tensor reader that calls ``on_layer(i)`` whenever it starts reading layer ``i``'s tensors,
    and ``on_other()`` once, when it first reads a tensor of no layer (the vocabulary ends)."""

    on_layer: Callable[[int], None] | None = None
    on_other: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layer: int | None = None
        self._other = False

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
        elif not m and not self._other:
            self._other = True
            if self.on_other is not None:
                self.on_other()


def load_layers(
    source: ModelSource,
    span: LayerRange,
    dtype: torch.dtype | str | None,
    weights: str | None,
    what: str,
    *,
    vocab: bool = False,
    say: Say = daemon_say,
) -> Stage:
    """``Stage.load`` of ``span`` (with the vocabulary ends if ``vocab``), saying how far it got:
    a line per layer at most every ``PROGRESS_EVERY_S`` seconds, and one when done."""
    t0 = last = time.monotonic()

    def on_layer(i: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            say(f"{what}: layer {i - span.first + 1} of {span.n_layers} ({now - t0:.0f} s)")

    # The vocabulary ends are read after the layers; a big vocabulary takes a while of its own.
    with Ticker(say, f"{what}: the vocabulary ends", max(PROGRESS_EVERY_S, 0.05), start=False) as vocab_tick:
        reader = ProgressReader(source, on_layer=on_layer, on_other=vocab_tick.start)
        stage = Stage.load(source, span, vocab=vocab, dtype=dtype, weights=weights, reader=reader)
    parts = ([f"{span.n_layers} layers"] if span.n_layers else []) + (["the vocabulary ends"] if vocab else [])
    say(f"{what}: {' and '.join(parts) or 'nothing'} in {time.monotonic() - t0:.1f} s")
    return stage


class Ticker:
    """While a blocking step runs, say ``what (N s)`` from a helper thread, so a step that reports
    nothing itself (a measurement, one benchmark request) is never silent: after ``every`` seconds,
    then every ``every`` seconds or a quarter of the time so far, whichever is longer (a step of
    minutes says so without a line every few seconds), at most every ``TICK_MAX_S``. Says nothing
    if the step ends within ``every`` seconds."""

    def __init__(self, say: Say, what: str, every: float | None = None, *, start: bool = True):
        self.say, self.what, self.autostart = say, what, start
        self.every = TICK_EVERY_S if every is None else every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        t0 = time.monotonic()

        def tick() -> None:
            wait = self.every
            while not self._stop.wait(wait):
                elapsed = time.monotonic() - t0
                self.say(f"{self.what} ({elapsed:.0f} s)")
                wait = min(max(self.every, elapsed / 4), max(self.every, TICK_MAX_S))

        self._thread = threading.Thread(target=tick, name="meshd-progress", daemon=True)
        self._thread.start()

    def __enter__(self) -> Ticker:
        if self.autostart:
            self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
