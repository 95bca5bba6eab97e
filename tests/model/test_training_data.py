"""Self-distillation data: prompts made in bulk (seeded, distinct, never close to an evaluation prompt;
chats read back and encoded whole), and the answers' token ids kept small and rebuilt into a full store
with features recomputed by prefill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.source import ModelSource
from models.stage import Stage
from training import promptgen as pg
from training.prompts import project_prompt_files, read_prompt_file
from training.rollouts import DataStore, batch_generate, generate_data
from training.train import TrainConfig, collate
from training.train_draft import first_answer_tokens


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")


def test_templates_are_seeded_distinct_and_mixed():
    a = pg.template_prompts(3000, seed=4)
    assert a == pg.template_prompts(3000, seed=4) and a != pg.template_prompts(3000, seed=5)
    assert len(a) == len(set(a)) == 3000
    kinds = {
        "math": lambda p: "How many" in p or "change" in p or "days" in p,
        "code": lambda p: "function" in p or "code in" in p,
        "story": lambda p: "story" in p or "novel" in p or "fable" in p,
        "explain": lambda p: p.startswith(("Explain", "What is", "How does", "Why is")),
    }
    for name, is_kind in kinds.items():
        assert sum(map(is_kind, a)) > 100, name  # every kind is well represented


def test_evaluation_prompts_are_never_made():
    """An evaluation prompt (everyday set, Spec-Bench held-out), or one sharing a run of six words with one,
    is dropped; the check ignores case and punctuation; duplicates go too."""
    evals = pg.evaluation_texts()
    assert len(evals) >= 40  # the everyday set
    ex = pg.Exclusion(evals)
    seen: set[str] = set()
    near = "Please, " + evals[0].upper() + " Thanks."
    kept = pg.keep_new([evals[0], near, "A prompt of its own.", "a  PROMPT of its own."], ex, seen)
    assert kept == ["A prompt of its own."]
    made = pg.keep_new(pg.template_prompts(2000), pg.Exclusion(evals), set())
    assert made and not any(ex.hits(p) for p in made)
    chat = [{"role": "user", "content": evals[1]}, {"role": "assistant", "content": "x"}]
    chat.append({"role": "user", "content": "Go on."})
    assert pg.keep_new([chat], ex, set()) == []  # a chat's user turns are checked too


def test_the_projects_prompt_files_never_come_near_the_everyday_set():
    """The prompts the project ships for training (``models/heads/prompts/*.jsonl``, chats' user turns
    included) share no run of six words with an everyday prompt, so the set measured on stays unseen.
    One exception, pinned: ``synthetic.jsonl`` (2026-12-01) predates the rule, and 29 of its 540 prompts
    share a stock phrase with one ("Write a short story about a ...", "... hours. What is its average
    speed?", "Write a Python function that checks ... a palindrome"); its lines cannot be dropped, since
    the stored answers are keyed by line number, so the test holds that count from growing. (Spec-Bench's
    held-out split is excluded when the files are made with ``--questions``; it is not in the repository.)"""
    ex = pg.Exclusion(pg.evaluation_texts())
    files = project_prompt_files()
    assert len(files) >= 2
    for path in files:
        near = [
            key
            for key, prompt in read_prompt_file(path)
            for text in ([prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"])
            if ex.hits(text)
        ]
        assert len(near) == (29 if path.name == "synthetic.jsonl" else 0), f"{path.name}: {near[:5]}"


def test_held_out_spec_bench_is_excluded(tmp_path):
    bench = tmp_path / "q.jsonl"
    text = "secret question number {} about seven rare apples"
    rows = [{"question_id": i, "category": "c", "turns": [text.format(i)]} for i in (4, 5)]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = pg.Exclusion(pg.evaluation_texts(bench))
    assert ex.hits("Here is secret question number 4 about seven rare apples")  # held out (4 % 4 == 0)
    assert not ex.hits("Here is secret question number 5 about seven rare apples")  # trained on


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("How do volcanoes form?", "How do volcanoes form?"),
        ('Question: "Why is the sky blue?"', "Why is the sky blue?"),
        ("Explain how tides work.", "Explain how tides work."),
        ("Volcanoes form when magma rises.", None),  # an answer, not a question
        ("Why?", None),  # too short
        ("What is X?\nWhat is Y?", None),  # more than one
    ],
)
def test_clean_question(text, want):
    assert pg.clean_question(text) == want


def test_follow_up_chats_read_back_and_encode_whole(tmp_path, tiny):
    chats = pg.follow_up_chats([("What is rain?", " Water falling. "), ("Why?", "")], count=5, seed=1)
    assert len(chats) == 1 and [m["role"] for m in chats[0]] == ["user", "assistant", "user"]
    assert chats[0][1]["content"] == "Water falling." and chats[0][2]["content"] in pg.FOLLOW_UPS
    path = tmp_path / "p.jsonl"
    pg.write_prompts(path, ["Plain one.", chats[0]])
    got = read_prompt_file(path)
    assert got == [("p.jsonl:0", "Plain one."), ("p.jsonl:1", chats[0])]

    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [1 + ord(c) % 60 for m in messages for c in m["content"][:8]]

    store = DataStore(tmp_path / "data")
    generate_data(tiny, Tok(), store, got, target_tokens=100, max_new=4, slots=2, seed=0, eos=[])
    answered = {k: (toks, plen) for k, toks, plen in store.answered()}
    assert answered["p.jsonl:1"][1] == len(Tok().apply_chat_template(chats[0], True, True))  # all three turns
    seqs = store.sequences()
    assert sorted(len(t) for t, _, _ in seqs) == sorted(len(t) for t, _ in answered.values())
    assert all(torch.equal(torch.tensor(answered[k][0]), t) for k, (t, _, _) in zip(store.meta["done"], seqs))


def test_token_file_round_trip_recomputes_features(tiny, tmp_path):
    """Saved token ids rebuild the store: same keys, tokens and prompt lengths at once, features only when
    asked for (``fill_features``), then equal to the ones generation recorded (within one fp16 step: the
    store keeps features in fp16, and prefill and step-by-step decoding round differently in the last
    fp32 bits); another target's file is refused; a second load adds nothing."""
    g = torch.Generator().manual_seed(7)
    prompts = [(f"k{i}", torch.randint(0, 64, (3 + i,), generator=g).tolist()) for i in range(5)]
    store = DataStore(tmp_path / "a")
    for r in batch_generate(tiny, prompts, max_new=12, slots=3):
        store.add(r)
    store.flush(1.0)
    path = tmp_path / "tokens.npz"
    assert store.save_tokens(path, "fp-1", max_new=12) == 5
    with pytest.raises(ValueError, match="not of fp-2"):
        DataStore(tmp_path / "x").load_tokens(path, "fp-2")
    again = DataStore(tmp_path / "b")
    assert again.load_tokens(path, "fp-1") == 5
    assert again.load_tokens(path, "fp-1") == 0
    assert again.answered() == store.answered()
    assert {k: again.meta[k] for k in ("sequences", "answer_tokens", "prompt_tokens")} == {
        k: store.meta[k] for k in ("sequences", "answer_tokens", "prompt_tokens")
    }
    with pytest.raises(ValueError, match="fill_features"):
        again.sequences()
    assert again.fill_features(tiny, progress=False) == 5
    assert DataStore(tmp_path / "b").fill_features(tiny, progress=False) == 0  # kept on disk
    for (t1, f1, p1), (t2, f2, p2) in zip(store.sequences(), again.sequences(), strict=True):
        assert torch.equal(t1, t2) and p1 == p2
        torch.testing.assert_close(f2.float(), f1.float(), rtol=2**-10, atol=2**-10)
    seqs = store.sequences()
    answer = [len(t) - p for t, _, p in seqs]
    assert first_answer_tokens(seqs, sum(answer[:2])) == seqs[:2]
    assert first_answer_tokens(seqs, sum(answer[:2]) + answer[2] - 1) == seqs[:2]


def test_features_are_made_only_for_the_shards_training_reads(tiny, tmp_path):
    """Token ids loaded in shards of 1,000 sequences; a prefix of the answer tokens fills and reads only
    the shards that hold it, so a run that trains on the first N tokens prefills no more than it needs."""
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(4, 9, (1500,), generator=g).tolist()
    toks = torch.randint(0, 64, (sum(lens),), generator=g).numpy().astype("uint16")
    path = tmp_path / "tokens.npz"
    np.savez_compressed(
        path,
        tokens=toks,
        lens=np.array(lens, dtype=np.int32),
        prompt_lens=np.full(1500, 2, dtype=np.int32),
        keys=np.array(json.dumps([f"k{i}" for i in range(1500)])),
        meta=np.array(json.dumps({"fingerprint": "fp", "max_new": 8})),
    )
    store = DataStore(tmp_path / "s")
    assert store.load_tokens(path, "fp") == 1500 and len(store.meta["shards"]) == 2
    first = sum(n - 2 for n in lens[:1000])
    assert store.fill_features(tiny, answer_tokens=first, progress=False) == 1000
    seqs = store.sequences(answer_tokens=first)
    assert len(seqs) == 1000 and first_answer_tokens(seqs, first) == seqs
    assert all(f.shape == (len(t) - 1, tiny.cfg.hidden_size) for t, f, _ in seqs[:5])
    with pytest.raises(ValueError, match="fill_features"):
        store.sequences(answer_tokens=first + 1)
    assert store.fill_features(tiny, progress=False) == 500


def test_a_stopped_prefill_keeps_what_it_made_and_a_rerun_makes_the_rest(tiny, tmp_path):
    """Stopped inside a shard (a time budget or a signal), the prefill splits it: the sequences done keep
    their features, the rest stay token ids; training can read the done ones alone (``made_only``), and
    a rerun fills the rest, leaving the store as one uninterrupted prefill would, in the same order."""
    g = torch.Generator().manual_seed(9)
    prompts = [(f"k{i}", torch.randint(0, 64, (3 + i % 4,), generator=g).tolist()) for i in range(7)]
    store = DataStore(tmp_path / "a")
    for r in batch_generate(tiny, prompts, max_new=6, slots=4):
        store.add(r)
    store.flush()
    path = tmp_path / "tokens.npz"
    store.save_tokens(path, "fp", max_new=6)
    whole, cut = DataStore(tmp_path / "whole"), DataStore(tmp_path / "cut")
    for s in (whole, cut):
        s.load_tokens(path, "fp")
    assert whole.fill_features(tiny, progress=False) == 7
    asks = iter(range(100))
    assert cut.fill_features(tiny, progress=False, stop=lambda: next(asks) >= 3) == 3
    rest = sum(len(t) for _, t, _ in cut.answered()[3:])
    assert len(cut.meta["shards"]) == 2 and cut.without_features() == [(cut.meta["shards"][1], rest)]
    done = DataStore(tmp_path / "cut").sequences(made_only=True)  # as a rerun reads the store from disk
    assert [t.tolist() for t, _, _ in done] == [t.tolist() for t, _, _ in whole.sequences()[:3]]
    with pytest.raises(ValueError, match="fill_features"):
        cut.sequences()
    assert DataStore(tmp_path / "cut").fill_features(tiny, progress=False) == 4
    again = DataStore(tmp_path / "cut")
    assert again.answered() == whole.answered() and again.meta["sequences"] == 7
    for (t1, f1, p1), (t2, f2, p2) in zip(whole.sequences(), again.sequences(), strict=True):
        assert torch.equal(t1, t2) and p1 == p2 and torch.equal(f1, f2)
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard-*")) == sorted(again.meta["shards"])


def test_generation_stops_starting_prompts_at_the_target(tiny, tmp_path):
    """Once the answers finished reach ``target_tokens``, no further prompt starts even inside a chunk;
    the answers in flight finish (so at most one slot-load of answers past the target)."""

    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [1 + ord(c) % 60 for c in messages[-1]["content"]]

    prompts = [(f"p{i}", f"prompt number {i}") for i in range(40)]
    store = DataStore(tmp_path / "data")
    generate_data(tiny, Tok(), store, prompts, target_tokens=30, max_new=10, slots=2, seed=0, eos=[], chunk=40)
    assert 30 <= store.meta["answer_tokens"] <= 30 + 2 * 10 and store.meta["sequences"] < 10


def test_a_batch_takes_its_targets_from_the_last_columns_of_wider_features():
    """Features may carry extra inputs before the last layer's (a head mixing several layers'): the batch's
    inputs keep every column, its targets (the next position's feature) only the last ``target_width``."""
    toks = torch.arange(10, 16)
    last = torch.randn(5, 4)
    wide = torch.cat([torch.randn(5, 8), last], dim=1)
    tc = TrainConfig(max_len=64)
    nxt, fin, ftg, w = collate([(toks, wide, 2)], [0], tc, target_width=4)
    assert fin.shape == (1, 4, 12) and ftg.shape == (1, 4, 4)
    assert torch.equal(fin[0], wide[:4]) and torch.equal(ftg[0], last[1:5])
    narrow = collate([(toks, last, 2)], [0], tc)
    assert torch.equal(narrow[0], nxt) and torch.equal(narrow[2], ftg) and torch.equal(narrow[3], w)
