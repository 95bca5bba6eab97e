"""Question and prompt files: the one reader of Spec-Bench-format question files (for training,
the held-out evaluation and the lab's benchmarks), and the prompts to self-distil on.

Training always uses the project's own prompt files (``models/heads/prompts/*.jsonl``) and any
extra files given. Spec-Bench (its public ``question.jsonl``) is optional and only ever read from
a path the user gives (``--questions`` or ``MESHD_SPEC_BENCH``): its questions with
``question_id % 4 != 0`` may be trained on, the held-out split ``% 4 == 0`` never is, and is
what the held-out evaluation replays.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

PROJECT_PROMPTS = Path(__file__).resolve().parents[1] / "models" / "heads" / "prompts"
EVERYDAY = Path(__file__).resolve().parents[1] / "meshd" / "lab" / "prompts" / "everyday.jsonl"
"""The project's everyday prompts (Spec-Bench's format): kept beside the lab's benchmarks, which measure on
them; training reads them only to keep them out of its data, and the held-out evaluation replays them."""
SPEC_BENCH_ENV = "MESHD_SPEC_BENCH"
SPEC_BENCH_SOURCE = "data/spec_bench/question.jsonl of github.com/hemingkx/Spec-Bench"


def spec_bench_path(given: str | Path | None = None) -> Path | None:
    """The Spec-Bench question file: ``given``, else ``$MESHD_SPEC_BENCH``, else None (not used)."""
    path = given or os.environ.get(SPEC_BENCH_ENV)
    return Path(path).expanduser() if path else None


def read_spec_bench(path: Path) -> list[dict]:
    """Every question of a Spec-Bench-format JSONL file (``question_id``, ``category``, ``turns``)."""
    if not path.is_file():
        raise ValueError(
            f"question file {path} not found: pass --questions PATH to Spec-Bench's question.jsonl "
            f"({SPEC_BENCH_SOURCE}) or set {SPEC_BENCH_ENV}"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_held_out(question_id: int) -> bool:
    """Spec-Bench's held-out split: never trained on, replayed by the held-out evaluation."""
    return question_id % 4 == 0


def load_questions(
    path: Path,
    categories: int | Sequence[str] | None = None,
    per_category: int | None = None,
    held_out_only: bool = False,
) -> list[dict]:
    """The first ``per_category`` questions (all when None) of each chosen category, in file order:
    ``categories`` is a count (the first categories of the file), a list of names, or None (all)."""
    rows = read_spec_bench(path)
    if held_out_only:
        rows = [r for r in rows if is_held_out(int(r["question_id"]))]
    order = list(dict.fromkeys(r["category"] for r in rows))
    if isinstance(categories, int):
        chosen = order[:categories]
    elif categories:
        unknown = set(categories) - set(order)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {order}")
        chosen = list(categories)
    else:
        chosen = order
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        if r["category"] in chosen and (per_category is None or seen[r["category"]] < per_category):
            seen[r["category"]] += 1
            out.append(r)
    return out


def project_prompt_files() -> list[Path]:
    return sorted(PROJECT_PROMPTS.glob("*.jsonl"))


Prompt = str | list[dict]
"""A user message, or a whole chat ending with a user turn (``[{"role": ..., "content": ...}, ...]``)."""


def read_prompt_file(path: Path) -> list[tuple[str, Prompt]]:
    """(key, prompt) pairs of a JSONL file (``{"prompt": ...}``, ``{"text": ...}``, ``{"turns": [...]}``
    or a chat as ``{"messages": [...]}``) or of a plain text file with one prompt per line; keys are
    ``name:line``."""
    out: list[tuple[str, Prompt]] = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            r = json.loads(line)
            text = r.get("messages") or r.get("prompt") or r.get("text") or (r.get("turns") or [""])[0]
        else:
            text = line.strip()
        if text:
            out.append((f"{path.name}:{i}", text))
    return out


def training_prompts(files: Sequence[str | Path] = (), spec_bench: Path | None = None) -> list[tuple[str, Prompt]]:
    """(key, user message) pairs: Spec-Bench's training split (first turns) when a file is given, then
    the project's own prompt files and ``files`` (each file once)."""
    out: list[tuple[str, Prompt]] = []
    if spec_bench is not None:
        for r in read_spec_bench(spec_bench):
            if not is_held_out(int(r["question_id"])):
                out.append((f"specbench:{r['question_id']}", r["turns"][0]))
    paths = dict.fromkeys(p.resolve() for p in [*project_prompt_files(), *map(Path, files)])
    for path in paths:
        if not path.is_file():
            raise ValueError(f"prompt file {path} not found")
        out += read_prompt_file(path)
    return out


def held_out_questions(path: Path, per_category: int | None = None) -> list[dict]:
    """Spec-Bench's held-out split, the first ``per_category`` of each category (all when None)."""
    return load_questions(path, per_category=per_category, held_out_only=True)
