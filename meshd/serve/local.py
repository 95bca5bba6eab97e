"""One device, no network: the target, its tokenizer, its cost curve and drafters, loaded once.

``meshd generate``, ``meshd demo`` and the single-device rows of ``meshd bench`` all run here.
The modes are those of ``meshd.modes``: ``ar`` and ``spec`` run the single-device engine
(``models.engine``); ``chunk`` and ``flow`` run the mesh's scheduler and stage workers over a
ring of in-process stages (``meshd.ring.pipeline``), where ``spec`` becomes ``flow``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshd.ring.pipeline import build_local_pipeline
from meshd.ring.scheduler import Request
from meshd.serve.loading import Say, Ticker, load_layers, quiet
from models.budget import MAX_LOSS, CostCurve, DraftPrior, TreeBudget
from models.drafters import Drafter, drafter_factory, load_drafter
from models.engine import Generation, Stats, generate
from models.profile import stage_cost_curve
from models.ranges import LayerRange
from models.source import ModelSource
from models.text import decode, encode_prompt, has_chat_template, stop_ids
from models.verify import Sampling


class LocalModel:
    """The model on this device, and ``run`` to generate with it in any mode."""

    def __init__(self, model: str = "default", dtype: str = "auto", weights: str | None = None, say: Say = quiet):
        """``say`` hears progress lines while the model loads and its cost curve is measured
        (``meshd.serve.loading.stderr_say`` for a command)."""
        t0 = time.perf_counter()
        self.say = say
        self.source = ModelSource.resolve(model)
        n = self.source.config.n_layers
        what = f"loading {self.source.path.name}"
        say(f"{what}: {n} layers and the vocabulary ends (weights {weights or 'dense'}, dtype {dtype}) ...")
        self.target = load_layers(self.source, LayerRange.whole(n), dtype, weights, what, vocab=True, say=say)
        say("loading the tokenizer ...")
        self.tokenizer = self.source.load_tokenizer()
        self.eos = stop_ids(self.tokenizer, self.target.cfg)
        self._curve: dict[int, float] | None = None
        self._drafters: dict[str, Drafter] = {}
        # per drafter, what its drafts were worth on the requests before (a request after ones whose drafts
        # did not pay starts backed off: see models.budget.DraftPrior)
        self._priors: dict[str, DraftPrior] = {}
        self.load_seconds = time.perf_counter() - t0

    @property
    def curve(self) -> dict[int, float]:
        if self._curve is None:  # measured once per model, dtype and thread count, then read from a cache
            with Ticker(self.say, "measuring this device's cost curve (once; cached for later runs)"):
                self._curve = stage_cost_curve(self.source, self.target, with_lm_head=True)
        return self._curve

    def drafter(self, name: str) -> Drafter:
        """``name`` as ``--drafter`` takes it (``ngram``, ``eagle[:DIR]``, ...), loaded once."""
        if name not in self._drafters:
            self._drafters[name] = load_drafter(name, self.target, source=self.source)
        return self._drafters[name]

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, text, has_chat_template(self.tokenizer) if chat is None else chat)

    def run(
        self,
        text: str,
        *,
        mode: str = "spec",
        drafter: str = "ngram",
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        on_text: Callable[[str], None] | None = None,
        stages: int = 1,
    ) -> dict:
        """Generate and return the ``meshd generate --json`` fields.

        ``ar``/``spec`` with one stage run the single-device engine; ``chunk``/``flow``, or any mode
        with ``stages > 1``, run the mesh scheduler over ``stages`` in-process stages, ``spec``
        as ``flow`` (correctness and round counts; the stages run one after another here, so
        wall-clock figures are not a pipelined mesh's).
        """
        prompt = self.encode(text, chat)
        if mode in ("chunk", "flow") or stages > 1:
            return self._run_pipeline(prompt, mode, drafter, max_tokens, temperature, top_p, seed, stages, on_text)
        d = self.drafter(drafter) if mode == "spec" else None
        printed: list[int] = []
        shown = [""]

        def on_tokens(new: list[int]) -> None:
            printed.extend(new)
            s = decode(self.tokenizer, printed)
            on_text(s[len(shown[0]) :])
            shown[0] = s

        res: Generation = generate(
            self.target,
            prompt,
            max_new_tokens=max_tokens,
            mode=mode,
            drafter=d,
            sampling=Sampling(temperature, top_p),
            seed=seed,
            eos_ids=self.eos,
            budget=TreeBudget(
                CostCurve(self.curve), prior=self._priors.setdefault(drafter, DraftPrior()), max_loss=MAX_LOSS
            )
            if d
            else None,
            on_tokens=on_tokens if on_text else None,
        )
        return self._report(res.token_ids, res.stats, res.finish_reason, mode, d.name if d else None, prompt)

    def _run_pipeline(
        self,
        prompt: list[int],
        mode: str,
        drafter: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stages: int,
        on_text: Callable[[str], None] | None,
    ) -> dict:
        factory = drafter_factory(drafter, self.target, source=self.source) if mode != "ar" else None
        pipe = build_local_pipeline(self.source, stages, factory, curves=CostCurve(self.curve), full=self.target)
        if on_text:
            shown, got = [""], []

            def emit(_rid: str, toks: list[int]) -> None:
                got.extend(toks)
                s = decode(self.tokenizer, got)
                on_text(s[len(shown[0]) :])
                shown[0] = s

            pipe.on_emit = emit
        mode = "flow" if mode == "spec" else mode  # the same tree verification, streamed through the stages
        pipe.submit(Request("local", prompt, max_tokens, mode, Sampling(temperature, top_p), seed, frozenset(self.eos)))
        out = pipe.run()["local"]
        if out.reason == "error":
            raise RuntimeError(out.error)
        return self._report(
            out.tokens, out.stats, out.reason, mode, drafter if mode != "ar" else None, prompt, stages=stages
        )

    def _report(
        self,
        token_ids: list[int],
        st: Stats,
        finish: str,
        mode: str,
        drafter: str | None,
        prompt: list[int],
        stages: int = 1,
    ) -> dict:
        return {
            "text": decode(self.tokenizer, token_ids),
            "token_ids": token_ids,
            "new_tokens": st.new_tokens,
            "rounds": st.rounds,
            "mean_accepted": round(st.mean_accepted, 4),
            "trees": st.trees,
            "plain_trees": st.plain_trees,
            "accepted_per_tree": round(st.mean_per_tree, 4),
            "target_forwards": st.target_forwards,
            "seconds": round(st.seconds, 4),
            "tokens_per_s": round(st.tokens_per_s, 3),
            "finish_reason": finish,
            "mode": mode,
            "drafter": drafter,
            "stages": stages,
            "dtype": str(self.target.dtype).removeprefix("torch."),
            "weights": self.target.kernels,
            "prompt_tokens": len(prompt),
            "prefill_seconds": round(st.prefill_seconds, 4),
            "draft_seconds": round(st.draft_seconds, 4),
            "verified_nodes": st.verified_nodes,
        }
