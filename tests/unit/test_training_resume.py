"""Self-distillation data generation stops and resumes: a run to N tokens continued to 2N holds the same
answers as one run to 2N (every prompt answered by both is answered identically, nothing is redone)."""

from __future__ import annotations

from support import make_tiny_checkpoint

from models.source import ModelSource
from models.stage import Stage
from training.prompt_gen import generate_prompts
from training.rollouts import DataStore, generate_data


class ByteTokenizer:
    """Enough of a tokenizer for the tiny checkpoint: a chat is its user text's bytes, folded into 64 ids."""

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> list[int]:
        return [1] + [b % 62 + 2 for b in messages[-1]["content"].encode()[:24]]


def answers(store: DataStore) -> dict[str, list[int]]:
    keys = [k for k in store.meta["done"]]
    return {k: seq.tolist() for k, (seq, _, _) in zip(keys, store.sequences())}


def test_generation_resumes_where_it_stopped(tmp_path):
    target = Stage.load(ModelSource.resolve(make_tiny_checkpoint(tmp_path / "tiny")), dtype="fp32")
    prompts = generate_prompts(40, seed=1)
    kw = dict(max_new=12, slots=4, seed=0, eos=[], chunk=8)

    def run(store: DataStore, tokens: int) -> None:
        generate_data(target, ByteTokenizer(), store, prompts, target_tokens=tokens, **kw)

    resumed = DataStore(tmp_path / "resumed")
    run(resumed, 100)
    first = answers(resumed)
    assert 100 <= resumed.meta["answer_tokens"] < 200
    run(DataStore(tmp_path / "resumed"), 200)  # a new process: everything comes from disk
    resumed = DataStore(tmp_path / "resumed")
    once = DataStore(tmp_path / "once")
    run(once, 200)
    got, want = answers(resumed), answers(once)
    assert {k: got[k] for k in first} == first  # nothing stored was redone or changed
    assert len(got) == len(resumed.meta["done"]) == len(set(resumed.meta["done"]))
    assert resumed.meta["answer_tokens"] >= 200 and once.meta["answer_tokens"] >= 200
    assert got == want  # the same prompts answered the same way as one uninterrupted run
