"""The daemon's runtime on one device: behaviour that needs its event loop, not a mesh."""

from __future__ import annotations

import asyncio

from meshd.ring.messages import PROMPT_PARENT, Segment
from meshd.serve.runtime import solo_runtime
from models.drafters import drafter_factory
from models.source import ModelSource
from models.stage import Stage


async def test_idle_sessions_of_a_vanished_originator_are_freed(tiny_dir):
    """A stage holds KV for requests whose originator may die without a close; the sweep frees them."""
    src = ModelSource.resolve(str(tiny_dir))
    target = Stage.load(src, dtype="fp32")
    rt = solo_runtime(src, target, drafter_factory("ngram", target), session_timeout=0.3)
    await rt.start()
    try:
        # a prompt chunk from an originator this device does not know: the stage computes it, keeps the KV
        rt.deliver(Segment("ghost", [0, 1, 2], [PROMPT_PARENT, 0, 1], [0, 1, 2], tokens=[5, 6, 7], commit=True))
        for _ in range(50):
            await asyncio.sleep(0.02)
            if "ghost" in rt.worker.sessions:
                break
        assert "ghost" in rt.worker.sessions, "the stage never ran the stray segment"
        for _ in range(100):  # freed after the timeout (0.3 s) by the compute loop's sweep, with nothing to wake it
            await asyncio.sleep(0.05)
            if not rt.worker.sessions:
                break
        assert not rt.worker.sessions
        assert rt.stage_stats()["sessions"] == 0
    finally:
        await rt.stop()
