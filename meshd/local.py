"""One device, no network: the target, its tokenizer, its cost curve and drafters, loaded once.

``meshd generate``, ``meshd demo`` and the single-device rows of ``meshd bench`` all run here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from models.budget import CostCurve, TreeBudget
from models.drafters import Drafter, load_drafter
from models.engine import Generation, generate
from models.profile import stage_cost_curve
from models.source import ModelSource
from models.stage import Stage
from models.text import decode, encode_prompt, has_chat_template, stop_ids
from models.verify import Sampling


class LocalEngine:
    def __init__(self, model: str = "default", dtype: str = "auto"):
        t0 = time.perf_counter()
        self.source = ModelSource.resolve(model)
        self.target = Stage.load(self.source, dtype=dtype)
        self.tokenizer = self.source.load_tokenizer()
        self.eos = stop_ids(self.tokenizer, self.target.cfg)
        self._curve: dict[int, float] | None = None
        self._drafters: dict[str, Drafter] = {}
        self.load_seconds = time.perf_counter() - t0

    @property
    def curve(self) -> dict[int, float]:
        if self._curve is None:
            self._curve = stage_cost_curve(self.source, self.target, with_head=True)
        return self._curve

    def drafter(self, spec: str) -> Drafter:
        if spec not in self._drafters:
            self._drafters[spec] = load_drafter(spec, self.target)
        return self._drafters[spec]

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, text, has_chat_template(self.tokenizer) if chat is None else chat)

    def run(self, text: str, *, mode: str = "spec", drafter: str = "ngram", max_tokens: int = 128,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, chat: bool | None = None,
            on_text: Callable[[str], None] | None = None) -> dict:
        """Generate and return the ``meshd generate --json`` fields."""
        prompt = self.encode(text, chat)
        d = self.drafter(drafter) if mode == "spec" else None
        printed: list[int] = []
        shown = [""]

        def on_tokens(new: list[int]) -> None:
            printed.extend(new)
            s = decode(self.tokenizer, printed)
            on_text(s[len(shown[0]):])
            shown[0] = s

        res: Generation = generate(
            self.target, prompt, max_new_tokens=max_tokens, mode=mode, drafter=d,
            sampling=Sampling(temperature, top_p), seed=seed, eos_ids=self.eos,
            budget=TreeBudget(CostCurve(self.curve)) if d else None, on_tokens=on_tokens if on_text else None)
        st = res.stats
        return {
            "text": decode(self.tokenizer, res.token_ids), "token_ids": res.token_ids, "new_tokens": st.new_tokens,
            "rounds": st.rounds, "mean_accepted": round(st.mean_accepted, 4), "target_forwards": st.target_forwards,
            "seconds": round(st.seconds, 4), "tokens_per_s": round(st.tokens_per_s, 3),
            "finish_reason": res.finish_reason, "mode": mode, "drafter": d.name if d else None,
            "dtype": str(self.target.dtype).removeprefix("torch."), "prompt_tokens": len(prompt),
            "prefill_seconds": round(st.prefill_seconds, 4), "draft_seconds": round(st.draft_seconds, 4),
            "verified_nodes": st.verified_nodes,
        }
