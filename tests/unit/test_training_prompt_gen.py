"""The generated self-distillation prompts: deterministic, distinct, varied, and never an evaluation prompt."""

from __future__ import annotations

import json

import pytest

from training.prompt_gen import TASKS, assert_disjoint, evaluation_texts, generate_prompts, normalise


def test_prompts_are_deterministic_distinct_and_cover_every_task():
    a, b = generate_prompts(2000, seed=3), generate_prompts(2000, seed=3)
    assert a == b and generate_prompts(2000, seed=4) != a
    assert len({normalise(t) for _, t in a}) == len(a) == 2000
    assert {k.split(":")[2] for k, _ in a[:200]} == set(TASKS)


def test_never_an_everyday_prompt_and_the_check_bites(tmp_path):
    prompts = generate_prompts(3000)
    forbidden = evaluation_texts()
    assert len(forbidden) >= 40
    assert_disjoint(prompts, forbidden)
    everyday = sorted(forbidden)[0]
    with pytest.raises(AssertionError, match="evaluation prompts"):
        assert_disjoint([*prompts, ("x", everyday.upper() + " ?")], forbidden)


def test_spec_bench_held_out_split_is_forbidden_its_training_split_is_not(tmp_path):
    text = generate_prompts(1)[0][1]
    path = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 8, "category": "qa", "turns": [text]},  # held out (id % 4 == 0)
        {"question_id": 9, "category": "qa", "turns": ["Something only the training split asks."]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    forbidden = evaluation_texts(path)
    assert normalise(text) in forbidden and normalise(rows[1]["turns"][0]) not in forbidden
    with pytest.raises(AssertionError):
        assert_disjoint(generate_prompts(5), forbidden)
