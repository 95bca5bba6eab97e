"""`meshd train-draft` for any model: the user's heads that `auto` finds, written so a crash never leaves
half a head, under one wall-clock budget; end to end on a GGUF other than the embedded one and on a
safetensors directory, with the oracle (speculation equals greedy) on the head it wrote."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest
import torch
from support import CURVES, assert_matches_greedy, chat_ids, greedy_reference, make_tiny_checkpoint
from test_eagle import random_head

import models.eagle
import training.train_draft as td
from meshd.cli import main
from models.budget import TreeBudget
from models.config import ModelError
from models.drafters import MergedDrafter, NGramDrafter, load_drafter
from models.eagle import CONFIG_FILE, EagleDrafter, default_drafter, find_head, load_head, save_head, user_heads_dir
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage
from training.evaluate import evaluate_acceptance
from training.rollouts import (
    DataStore,
    batch_generate,
    data_dir_name,
    features_label,
    generate_data,
    prefill_features,
)
from training.stopping import StopRequest
from training.timebudget import TimeBudget
from training.train import TrainConfig, train_head


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    src = ModelSource.resolve(tiny_dir)
    return src, Stage.load(src, dtype="fp32")


def same_head(a, b) -> bool:
    """The same weights as the file holds them (fp16: a head in memory is rounded on the way to disk)."""
    return all(torch.equal(x.half(), y.half()) for x, y in zip(a.parameters(), b.parameters()))


def test_user_heads_are_found_first(tiny, tmp_path, monkeypatch):
    """A head the user trained wins over a shipped one for the same target; a hidden (half-written)
    directory is never picked; without any, the error names both places and the command that makes one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(models.eagle, "HEADS_DIR", shipped)
    src, target = tiny
    assert user_heads_dir() == tmp_path / "cache" / "meshd" / "heads"
    assert default_drafter(src) == "ngram"
    with pytest.raises(ModelError) as e:
        find_head(src.fingerprint, target.cfg)
    msg = str(e.value)
    assert str(user_heads_dir()) in msg and str(shipped) in msg and "meshd train-draft --model" in msg

    save_head(random_head(target, src.fingerprint, seed=1), shipped / "s")
    assert find_head(src.fingerprint, target.cfg) == shipped / "s"
    assert default_drafter(src) == "eagle+ngram"

    save_head(random_head(target, src.fingerprint, seed=2), user_heads_dir() / ".u.tmp-123")  # a crashed run's
    save_head(random_head(target, "0123456789abcdef", seed=3), user_heads_dir() / "another-model")
    assert find_head(src.fingerprint, target.cfg) == shipped / "s"

    mine = random_head(target, src.fingerprint, seed=4)
    save_head(mine, user_heads_dir() / "u")
    assert find_head(src.fingerprint, target.cfg) == user_heads_dir() / "u"
    auto = load_drafter("auto", target, source=src)
    assert isinstance(auto, MergedDrafter) and isinstance(auto.parts[1], NGramDrafter)
    assert isinstance(auto.parts[0], EagleDrafter) and same_head(auto.parts[0].head, mine)
    assert same_head(load_drafter("eagle", target, source=src).head, mine)

    (user_heads_dir() / "u" / "head.safetensors").unlink()  # damaged: say so rather than fall back silently
    with pytest.raises(ModelError, match=r"u has no head.safetensors.*delete the directory.*train-draft"):
        find_head(src.fingerprint, target.cfg)


def test_publish_head_replaces_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    src, target = tiny
    out = tmp_path / "heads" / "m"
    first, second = (random_head(target, src.fingerprint, seed=s) for s in (1, 2))
    assert td.publish_head(first, out, {"run": 1}) == out
    real_save = td.save_head

    def crash(head, path, report=None):
        path.mkdir(parents=True)
        (path / CONFIG_FILE).write_text(json.dumps({"target_fingerprint": src.fingerprint}))
        raise OSError("disk full")

    monkeypatch.setattr(td, "save_head", crash)
    with pytest.raises(OSError, match="disk full"):
        td.publish_head(second, out, {"run": 2})
    # the earlier head is whole and still the one found; the half-written one is hidden
    assert find_head(src.fingerprint, target.cfg, roots=[out.parent]) == out
    assert same_head(load_head(out, target.cfg, src.fingerprint), first)
    monkeypatch.setattr(td, "save_head", real_save)
    td.publish_head(second, out, {"run": 2})
    assert same_head(load_head(out, target.cfg, src.fingerprint), second)
    assert json.loads((out / "report.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".m.tmp")) == ["m"]

    # --out: a new, empty or head directory is fine; anything else would be replaced whole, so it is refused
    td.check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    td.check_out_dir(tmp_path / "empty")
    td.check_out_dir(out)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"docs exists and is not a draft head"):
        td.check_out_dir(tmp_path / "docs")
    with pytest.raises(ValueError, match=r"must not start with a dot"):
        td.check_out_dir(tmp_path / ".hidden")


def test_default_head_dir_and_the_closing_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src, target = tiny
    mine = td.default_head_dir(src)
    assert mine == tmp_path / "meshd" / "heads" / f"{src.name}-{src.fingerprint[:12]}"
    elsewhere = tmp_path / "elsewhere" / "h"
    td.publish_head(random_head(target, src.fingerprint), elsewhere, {})
    assert f"does not look in {elsewhere.parent}" in td.where_auto_looks(elsewhere, src)
    assert f"--drafter eagle:{elsewhere}" in td.where_auto_looks(elsewhere, src)
    td.publish_head(random_head(target, src.fingerprint), mine, {})
    assert "`--drafter auto`" in td.where_auto_looks(mine, src) and "now use it for" in td.where_auto_looks(mine, src)
    assert f"auto uses {mine}" in td.where_auto_looks(elsewhere, src)


class Steps:
    """A stop test that answers true from its ``n``-th call on (a budget running out, deterministically)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def test_generation_stops_keeping_what_finished(tiny):
    _, target = tiny
    g = torch.Generator().manual_seed(5)
    prompts = [(str(i), torch.randint(0, 64, (6,), generator=g).tolist()) for i in range(6)]
    full = {r.key: r.tokens for r in batch_generate(target, prompts, max_new=20, slots=3)}
    # asked before each prefill and step: 3 prefills + 19 steps finish the first three, the next three are
    # prefilled (asks 23-25) and dropped at the next step
    cut = batch_generate(target, prompts, max_new=20, slots=3, stop=Steps(25))
    assert len(cut) == 3 and all(full[r.key] == r.tokens and len(r.tokens) == 26 for r in cut)
    assert batch_generate(target, prompts, max_new=20, slots=3, stop=Steps(0)) == []


class FakeChatTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [1 + ord(c) % 60 for c in messages[0]["content"]]


def test_generate_data_cut_then_resumed(tiny, tmp_path):
    _, target = tiny
    prompts = [(f"p{i}", f"prompt {i}") for i in range(12)]
    store = DataStore(tmp_path / "data")
    kw = dict(target_tokens=10_000, max_new=10, slots=4, seed=0, eos=[], chunk=4)
    assert generate_data(target, FakeChatTokenizer(), store, prompts, stop=Steps(20), **kw) is True
    kept = store.meta["sequences"]
    assert 0 < kept < 12 and DataStore(tmp_path / "data").meta["sequences"] == kept  # flushed to disk
    again = DataStore(tmp_path / "data")
    assert generate_data(target, FakeChatTokenizer(), again, prompts, **kw) is False
    assert again.meta["sequences"] == 12 and sorted(again.meta["done"]) == sorted(k for k, _ in prompts)


def training_data(target, seed: int) -> list:
    """Stored sequences as training reads them: 8 random prompts answered by the target, 20 tokens each."""
    g = torch.Generator().manual_seed(seed)
    prompts = [(str(i), torch.randint(0, 64, (6,), generator=g).tolist()) for i in range(8)]
    return [(torch.tensor(r.tokens), r.feats.half(), r.prompt_len) for r in batch_generate(target, prompts, max_new=20)]


def test_training_deadline_anneals_and_resumes(tiny, tmp_path):
    """Cut by its deadline, training ends at the schedule's floor rate with a checkpoint a rerun resumes."""
    _, target = tiny
    seqs = training_data(target, seed=3)
    tc = TrainConfig(epochs=400, lr=1e-3, batch_tokens=120, steps=2)
    ckpt = tmp_path / "ckpt"
    state = train_head(
        random_head(target), target, seqs, tc, ckpt, lm_rows=target.lm_head_w, deadline=time.perf_counter() + 0.5
    )
    assert state["cut"] and state["history"][-1]["step"] == state["step"]
    assert state["step"] < state["planned"] and state["history"][-1]["lr"] == pytest.approx(0.05 * tc.lr)
    # a rerun resumes where the cut left off; a deadline already past still trains one batch
    again = train_head(random_head(target), target, seqs, tc, ckpt, lm_rows=target.lm_head_w, deadline=0.0)
    assert again["step"] == state["step"] + 1 and again["cut"]


def test_training_stopped_on_request_saves_its_batch_and_resumes(tiny, tmp_path):
    """A signal's stop ends training after the batch in progress, mid-schedule, with the checkpoint a
    rerun continues from (the same schedule: not annealed early as a time budget's cut is)."""
    _, target = tiny
    seqs = training_data(target, seed=4)
    tc = TrainConfig(epochs=4, lr=1e-3, batch_tokens=120, steps=2)
    ckpt = tmp_path / "ckpt"
    state = train_head(random_head(target), target, seqs, tc, ckpt, lm_rows=target.lm_head_w, stop=Steps(2))
    assert state["stopped"] and not state["cut"] and state["step"] == 3 < state["planned"]
    assert state["history"][-1]["step"] == 3 and state["history"][-1]["lr"] > 0.5 * tc.lr  # mid-schedule
    again = train_head(random_head(target), target, seqs, tc, ckpt, lm_rows=target.lm_head_w)
    assert again["step"] == again["planned"] == state["planned"] and not again["stopped"]
    assert [h["step"] for h in again["history"]] == [3, state["planned"]]  # resumed at batch 3, not restarted


def test_a_checkpoint_resumes_only_from_the_head_it_started_from(tiny, tmp_path):
    """A warm start's checkpoint names the head it began from: a run from a fresh head, or from another
    head, starts over instead of resuming a schedule that was training something else."""
    _, target = tiny
    seqs = training_data(target, seed=6)
    ckpt = tmp_path / "ckpt"
    warm = TrainConfig(epochs=3, lr=1e-3, batch_tokens=120, steps=2, init="heads/a@0123")
    state = train_head(random_head(target), target, seqs, warm, ckpt, lm_rows=target.lm_head_w, stop=Steps(0))
    assert state["stopped"] and state["step"] == 1
    fresh = TrainConfig(epochs=3, lr=1e-3, batch_tokens=120, steps=2)
    other = train_head(random_head(target), target, seqs, fresh, ckpt, lm_rows=target.lm_head_w, stop=Steps(0))
    assert other["step"] == 1  # started over: the checkpoint was another start's
    again = train_head(random_head(target), target, seqs, fresh, ckpt, lm_rows=target.lm_head_w, stop=Steps(0))
    assert again["step"] == 2  # its own checkpoint resumes


def test_a_signal_asks_the_run_to_stop_and_a_second_one_stops_it():
    """SIGTERM or Ctrl-C: at once while nothing could be kept, else a request the loops see, and the
    second one at once; the handlers before come back after; an ignored Ctrl-C stays ignored.

    Ctrl-C is given Python's usual handler first: a job started in the background by a shell without
    job control (``make test &`` in a script) inherits SIGINT ignored, and the run then keeps it so."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signals_ask_then_stop()
    finally:
        signal.signal(signal.SIGINT, inherited)


def signals_ask_then_stop() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop.installed(), pytest.raises(SystemExit) as exit_:
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.01)
    assert exit_.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    for sig, second in ((signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)):
        stop = StopRequest()
        with stop.installed():
            stop.graceful = True
            assert not stop()
            signal.raise_signal(sig)
            time.sleep(0.01)
            assert stop() and stop.name == sig.name and stop.exit_code == 128 + sig
            with pytest.raises(second):
                signal.raise_signal(sig)
                time.sleep(0.01)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest().installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_head_trains_on_the_features_of_quantized_weights(tmp_path, monkeypatch, embedded_source, embedded_tokenizer):
    """``--weights int8``: the head's features come from the quantized target (not the dense one), are
    kept apart from dense features in the work dir, and training reads the quantized embeddings and
    LM head dequantized; the report says which numerics it learnt from."""
    monkeypatch.delenv(td.SPEC_BENCH_ENV, raising=False)
    model = chat_target("safetensors", tmp_path, embedded_source, embedded_tokenizer)
    work, out = tmp_path / "work", tmp_path / "head"
    kw = dict(model=model, out=out, work=work, tokens=120, max_new=12, slots=8, vocab=64, epochs=1)
    report = td.train_draft(**kw, batch_tokens=256, eval_per_category=0, dtype="fp32", weights="int8")
    assert report["features"] == "int8-float32" and report["training"]["batches"] > 0
    assert (work / "data-int8").is_dir() and not (work / "data").exists()
    src = ModelSource.resolve(model)
    quantized, dense = Stage.load(src, dtype="fp32", weights="int8"), Stage.load(src, dtype="fp32")
    tokens, feats, _ = DataStore(work / "data-int8").sequences()[0]
    ids = tokens[:-1].tolist()
    # made while generating (one row at a time), so equal to a prefill's up to float rounding; the dense
    # weights' features differ by the quantization's error, far more
    gap_int8 = (feats.float() - prefill_features(quantized, ids, quantized.new_cache(len(ids)))).abs().max()
    gap_dense = (feats.float() - prefill_features(dense, ids, dense.new_cache(len(ids)))).abs().max()
    assert gap_int8 * 10 < gap_dense  # measured: 0.001 against 0.40
    assert load_head(out, dense.cfg, src.fingerprint).draft_vocab.numel() == 64


def test_report_replay_is_cut_per_pair(tiny):
    _, target = tiny
    g = torch.Generator().manual_seed(4)
    prompts = [(str(i), torch.randint(0, 64, (6,), generator=g).tolist()) for i in range(4)]
    rolls = batch_generate(target, prompts, max_new=12)
    cats = {r.key: "x" for r in rolls}
    drafters = {"eagle": EagleDrafter(random_head(target), target), "ngram": NGramDrafter()}
    full = evaluate_acceptance(drafters, rolls, cats, settings=("chain",))
    assert all(v["rollouts"] == 4 for v in full.values())
    cut = evaluate_acceptance(drafters, rolls, cats, settings=("chain", "tree16"), deadline=time.perf_counter())
    assert sorted(cut) == ["eagle/chain", "eagle/tree16", "ngram/chain", "ngram/tree16"]
    assert all(v["rollouts"] == 1 and v["rounds"] > 0 for v in cut.values())  # every pair still has a figure


@pytest.mark.parametrize("budgeted", [False, True])
def test_held_out_report_fits_what_is_left(tiny, tmp_path, budgeted):
    """Without a budget every held-out question is answered and replayed; with the budget spent, the
    report says what it cut (and caches no partial rollouts)."""
    src, target = tiny
    bench = tmp_path / "question.jsonl"
    bench.write_text(
        "".join(json.dumps({"question_id": i, "category": "c", "turns": [f"q {i}"]}) + "\n" for i in range(1, 13))
    )
    out = td.publish_head(random_head(target, src.fingerprint), tmp_path / "h", {})
    budget = TimeBudget(30.0, report=True, start=time.perf_counter() - 31) if budgeted else None
    held = td.held_out_report(
        target,
        FakeChatTokenizer(),
        out,
        src.fingerprint,
        bench,
        work=tmp_path / "work",
        per_category=3,
        eval_tokens=8,
        seed=0,
        eos=[],
        slots=4,
        numerics=features_label(target),
        budget=budget,
    )
    assert held["questions"] == 3 and sorted(held["results"]) == [
        f"{d}/{s}" for d in ("eagle", "ngram") for s in ("chain", "tree32")
    ]
    cached = list((tmp_path / "work").glob("heldout-*.pt"))
    if budgeted:
        assert held["cut"].startswith("cut to fit the time budget: 0 of 3 questions") and cached == []
    else:
        assert "cut" not in held and [c.name.endswith("-dense-float32.pt") for c in cached] == [True]
        assert all(r["rollouts"] == 3 and r["rounds"] >= 3 for r in held["results"].values())


def chat_target(kind: str, root, source: ModelSource, tokenizer) -> str:
    """A tiny random model with a real chat tokenizer: a synthetic GGUF, or a safetensors directory."""
    if kind == "gguf":
        path = root / "tiny-chat.gguf"
        assert main(["make-model", "--shape", "tiny", "--quant", "Q8_0", "--seed", "5", "--out", str(path)]) == 0
        return str(path)
    path = make_tiny_checkpoint(root / "tiny-chat", vocab_size=source.config.vocab_size, seed=5)
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_train_draft_end_to_end_under_a_budget(
    kind, tmp_path, monkeypatch, capsys, embedded_source, embedded_tokenizer
):
    """Any model, one command, a time budget: the head lands in the user's heads, `auto` drafts with it,
    and speculation with it emits exactly the target's greedy tokens."""
    model = chat_target(kind, tmp_path, embedded_source, embedded_tokenizer)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ModelSource.resolve(model).load_tokenizer()  # a GGUF's tokenizer conversion (~10 s) is cached, not budgeted
    bench = tmp_path / "question.jsonl"  # held-out ids 4 and 8: the report's reserve is too short, so it is skipped
    bench.write_text(
        "".join(json.dumps({"question_id": i, "category": "c", "turns": [f"Say {i}."]}) + "\n" for i in range(1, 9))
    )
    argv = ["train-draft", "--model", model, "--time-budget", "20s", "--tokens", "300", "--max-new", "16"]
    argv += ["--slots", "8", "--vocab", "512", "--epochs", "1000", "--batch-tokens", "512", "--threads", "2"]
    argv += ["--dtype", "fp32", "--questions", str(bench)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    src = ModelSource.resolve(model)
    heads = sorted((tmp_path / "cache" / "meshd" / "heads").iterdir())
    assert [h.name for h in heads] == [f"{src.name}-{src.fingerprint[:12]}"]  # nothing half-written beside it
    head_dir = heads[0]
    assert "time budget 20s: generation up to 12s (60%)" in err and "held-out report the last 2s" in err
    assert (
        f"`--drafter auto` (the default of serve and generate) and `--drafter eagle` now use it for {src.name}" in err
    )
    report = json.loads((head_dir / "report.json").read_text())
    assert report["target_fingerprint"] == src.fingerprint and report["time_budget"]["seconds"] == 20
    cut = report["time_budget"]["cut"]
    assert "training" in cut and cut["report"].startswith("skipped") and "held_out" not in report
    training = report["training"]
    assert 0 < training["batches"] < training["planned_batches"]  # the epochs asked for did not fit: time capped them

    target = Stage.load(src, dtype="fp32")
    auto = load_drafter("auto", target, source=src)
    assert isinstance(auto, MergedDrafter) and isinstance(auto.parts[0], EagleDrafter)
    assert same_head(auto.parts[0].head, load_head(head_dir, target.cfg, src.fingerprint))
    prompt = chat_ids(embedded_tokenizer, "Name three colours.")
    want, gaps = greedy_reference(target, prompt, 24, set())
    # drafting every round (no backoff): whether the head drafts is the question here, not whether a head
    # trained for 20 s pays (a budget that backs off verifies few nodes, fewer than its plain rounds)
    budget = TreeBudget(CURVES["flat"], back_off=False)
    res = generate(target, prompt, max_new_tokens=24, drafter=auto, budget=budget)
    assert_matches_greedy(res.token_ids, want, gaps)
    assert res.stats.new_tokens == 24 and res.stats.verified_nodes > res.stats.rounds  # it drafted


class SigtermAfter(StopRequest):
    """A stop request that a SIGTERM answers after ``n`` asks (what the handler records, without a signal)."""

    def __init__(self, n: int):
        super().__init__()
        self.asks = n

    def __call__(self) -> bool:
        self.asks -= 1
        if self.asks < 0 and self.signum is None:
            self.signum = signal.SIGTERM
        return super().__call__()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_draft_stopped_keeps_its_answers_and_a_rerun_finishes(
    tmp_path, monkeypatch, capsys, embedded_source, embedded_tokenizer
):
    """SIGTERM during generation: the answers finished so far are stored, no head is written, the run
    says how to go on; the same command again continues from them and writes the head."""
    model = chat_target("gguf", tmp_path, embedded_source, embedded_tokenizer)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kw = dict(model=model, work=tmp_path / "w", out=tmp_path / "head", tokens=400, max_new=16, slots=8)
    kw.update(vocab=512, epochs=2, batch_tokens=512, dtype="fp32", eval_per_category=0)
    got = td.train_draft(**kw, stop=SigtermAfter(30))  # 8 prefills + 16 steps finish 8 answers
    err = capsys.readouterr().err
    assert got["stopped"] == "SIGTERM" and 0 < got["data"]["answer_tokens"] < 400
    assert "stopped by SIGTERM after generation" in err and "run the same command again to continue" in err
    assert not (tmp_path / "head").exists()
    kept = got["data"]["sequences"]
    report = td.train_draft(**kw)
    assert "stopped" not in report and (tmp_path / "head" / CONFIG_FILE).is_file()
    assert report["data"]["stored_answer_tokens"] >= 400 and report["data"]["sequences"] > kept
    assert f"generation: {got['data']['answer_tokens']} answer tokens stored" in capsys.readouterr().err

    # a warm start: more epochs on top of that head keep its draft vocabulary (not one of --vocab's size)
    # and begin from its weights (at a vanishing rate the head comes out as it went in)
    kw.update(out=tmp_path / "warm", vocab=64, epochs=1, lr=1e-12)
    warm = td.train_draft(**kw, init_head=tmp_path / "head")
    began = warm["training"]["init_head"]
    assert began["head"] == str(tmp_path / "head") and began["report"]["training"]["epochs"] == 2  # its lineage
    assert warm["head"]["draft_vocab"] == report["head"]["draft_vocab"] != 64
    assert "starting from the head in" in capsys.readouterr().err
    target = Stage.load(ModelSource.resolve(model), dtype="fp32")
    before, after = load_head(tmp_path / "head", target.cfg), load_head(tmp_path / "warm", target.cfg)
    assert torch.equal(before.draft_vocab, after.draft_vocab) and same_head(before, after)
    with pytest.raises(ModelError, match="nowhere not found"):  # read with the target, before any work
        td.train_draft(**kw, init_head=tmp_path / "nowhere")


def test_a_warm_start_widens_its_draft_vocabulary_and_epochs_0_writes_it_untrained(
    tmp_path, monkeypatch, embedded_source, embedded_tokenizer
):
    """`--init-head H --vocab N` with N above H's vocabulary keeps H's ids and adds the data's most frequent
    tokens (then the lowest unused ids); `--epochs 0` writes that head without features or training, its
    weights unchanged; `--epochs 0` without a head to widen is refused before any work."""
    monkeypatch.delenv("MESHD_SPEC_BENCH", raising=False)
    model = chat_target("safetensors", tmp_path, embedded_source, embedded_tokenizer)
    src = ModelSource.resolve(model)
    target = Stage.load(src, dtype="fp32")
    start, out, work = tmp_path / "start", tmp_path / "wide", tmp_path / "w"
    save_head(random_head(target, src.fingerprint, vocab=[0, 1, 2, 3]), start)
    common = dict(model=model, tokens=40, max_new=8, slots=4, dtype="fp32", work=work, out=out)
    report = td.train_draft(**common, init_head=start, vocab=48, epochs=0, eval_per_category=0)
    assert report["head"]["draft_vocab"] == 48
    wide, before = load_head(out, target.cfg, src.fingerprint), load_head(start, target.cfg, src.fingerprint)
    ids = wide.draft_vocab.tolist()
    assert len(ids) == 48 == len(set(ids)) and ids[:4] == [0, 1, 2, 3] and same_head(wide, before)
    assert wide.hc.greedy_vocab_size == 4  # greedy drafts keep reading the ids the head had, listed first
    store = DataStore(work / data_dir_name(target))
    answered = [t for _, toks, plen in store.answered() for t in toks[plen:]]
    assert answered and {t for t, _ in Counter(answered).most_common(8)} <= set(ids)  # the data's commonest are in
    with pytest.raises(ValueError, match="--epochs 0: give at least 1, or 0 with --init-head"):
        td.train_draft(**common, epochs=0)
