"""What the APIs say about the served model: the names it answers to and the facts clients show.

A model file's stem (``SmolLM2-135M-Instruct.Q4_1``) is a poor name to make every client type,
so the daemon serves the model under a chosen name (``--served-name``) and accepts aliases
(``--alias``); the embedded default also answers to ``default``, the name ``meshd`` itself uses
for it. The card's facts (context length, layers, quantization, dtype) are read from the model
once at start-up; the plan is live and comes from the engine's status at request time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf

from models.config import ModelError
from models.source import DEFAULT_SOURCE, ModelSource, embedded_model_path


@dataclass(frozen=True)
class ModelCard:
    """The served model's names and facts (``None``: not known, e.g. a stand-in engine in tests)."""

    name: str  # the served name: what responses carry in ``model``
    aliases: tuple[str, ...] = ()
    context_length: int | None = None  # prompt + completion tokens one request may use
    n_layers: int | None = None
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None  # GGUF file type (Q4_1, Q8_0, F16...) or the safetensors dtype
    dtype: str | None = None  # what the mesh computes in
    fingerprint: str | None = None
    format: str | None = None  # gguf | safetensors
    size: int | None = None  # bytes of the weight files

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use, the served name first."""
        return (self.name, *(a for a in self.aliases if a != self.name))

    def accepts(self, model: str | None) -> bool:
        """Whether a request naming ``model`` is for this model (no name at all is)."""
        return model is None or model in self.names

    def served(self) -> str:
        """The names that work, for error messages: "`smol` (also accepted: `default`)"."""
        others = self.names[1:]
        also = f" (also accepted: {', '.join(f'`{n}`' for n in others)})" if others else ""
        return f"`{self.name}`{also}"

    def not_found(self, model: str) -> str:
        """The sentence for a request that named another model: what it asked and what would work."""
        return f"The model `{model}` does not exist: this mesh serves {self.served()}; see GET /v1/models."


def parameter_size(n: int | None) -> str:
    """135M, 1.7B: the short form model listings use."""
    if not n:
        return "unknown"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return str(n)


def is_embedded(source: ModelSource) -> bool:
    try:
        return source.path.resolve() == embedded_model_path().resolve()
    except ModelError:  # the embedded model is not installed, so this cannot be it
        return False


def quantization(source: ModelSource) -> str:
    """The weights' storage type: GGUF's declared file type, else its most common matrix type;
    for safetensors the dtype most tensors have (``BF16``, ``F16``, ``F32``)."""
    if source.kind == "gguf":
        ftype = source.gguf_fields().get("general.file_type")
        try:
            return (
                gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else _gguf_majority(source)
            )
        except ValueError:  # a file type newer than this gguf-py: the tensors still say
            return _gguf_majority(source)
    from safetensors import safe_open  # lazy: only safetensors models need it

    seen: Counter[str] = Counter()
    for f in _weight_files(source):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                seen[str(fh.get_slice(key).get_dtype())] += 1
    return seen.most_common(1)[0][0] if seen else "unknown"


def _gguf_majority(source: ModelSource) -> str:
    kinds = Counter(t.tensor_type.name for t in source.gguf.tensors if len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def parameter_count(source: ModelSource) -> int:
    if source.kind == "gguf":
        return sum(int(t.n_elements) for t in source.gguf.tensors)
    from safetensors import safe_open  # lazy: only safetensors models need it

    total = 0
    for f in _weight_files(source):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def build_card(
    source: ModelSource,
    *,
    dtype: str,
    context_length: int,
    served_name: str | None = None,
    aliases: tuple[str, ...] | list[str] = (),
) -> ModelCard:
    """The card for ``source`` served under ``served_name`` (default: the file's stem)."""
    names = list(dict.fromkeys(aliases))
    if is_embedded(source) and DEFAULT_SOURCE not in names:
        names.append(DEFAULT_SOURCE)
    cfg = source.config
    return ModelCard(
        name=served_name or source.name,
        aliases=tuple(n for n in names if n != (served_name or source.name)),
        context_length=context_length,
        n_layers=cfg.n_layers,
        architecture=cfg.arch,
        parameters=parameter_count(source),
        quantization=quantization(source),
        dtype=dtype,
        fingerprint=source.fingerprint,
        format=source.kind,
        size=sum(f.stat().st_size for f in _weight_files(source)),
    )


def _weight_files(source: ModelSource) -> list[Path]:
    return [source.path] if source.kind == "gguf" else sorted(source.path.glob("*.safetensors"))
