"""The training loop on the tiny world: outputs, loss log, resume equals uninterrupted, fine-tune."""
from __future__ import annotations

import csv
import json

import pytest
from fixtures_world import tiny_params

from vlp_core.io import read_json
from vlp_core.train.loop import TrainError, run_finetune, run_pretrain

STEPS = 12
FAST = {"pretrain.steps": STEPS, "pretrain.batch_size": 16, "pretrain.warmup_steps": 3, "pretrain.log_every": 2,
        "pretrain.checkpoint_every": 4, "pretrain.lr": 5e-4}


def _sources(world):
    return [(world / "web.parquet", "web"), (world / "human.parquet", "human")]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_world, tmp_path_factory):
    """One saved tokenizer for every run here (WordPiece training itself is not bit-stable)."""
    from vlp_core.models import train_tokenizer
    from vlp_core.train.data import load_pairs

    texts = [t for t in load_pairs(_sources(tiny_world))["text"].to_pylist() if t and t.strip()]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=128).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    return tiny_params(**FAST, **{"model.tokenizer": str(tokenizer_dir)})


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory, fast):
    out = tmp_path_factory.mktemp("pretrain_full")
    stats = run_pretrain(fast, _sources(tiny_world), out)
    return out, stats


def test_pretrain_writes_model_checkpoint_losses_and_stats(uninterrupted):
    out, stats = uninterrupted
    assert (out / "model" / "config.json").is_file()
    assert (out / "checkpoint" / "trainer_state.pt").is_file() and (out / "checkpoint" / "model").is_dir()
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(2, STEPS + 1, 2))
    assert set(rows[0]) == {"step", "loss", "itc", "itm", "lm", "lr"}
    assert all(float(r["loss"]) > 0 for r in rows)
    on_disk = read_json(out / "stats.json")
    assert on_disk["rows_in"] == on_disk["rows_out"] == 400
    assert on_disk["counts"]["used"] + sum(v for k, v in on_disk["counts"].items() if k.startswith("skipped.")) == 400
    assert on_disk["counts"]["skipped.empty_text"] > 0
    assert stats.extra["steps"] == STEPS and stats.extra["samples_per_s"] > 0
    assert set(stats.extra["final_losses"]) >= {"loss", "itc", "itm", "lm"}


def test_resume_after_interruption_gives_identical_weights(uninterrupted, tiny_world, tmp_path, fast):
    full_out, full = uninterrupted
    params = fast
    part = run_pretrain(params, _sources(tiny_world), tmp_path, stop_after_step=6)  # "killed" after step 6
    assert part.extra["steps"] == 6 and not (tmp_path / "model").exists()
    resumed = run_pretrain(params, _sources(tiny_world), tmp_path)
    assert resumed.extra["resumed_from_step"] == 6
    assert resumed.extra["rank_state_sha256"] == full.extra["rank_state_sha256"]
    # the loss log has each step once, and matches the uninterrupted run
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    full_rows = list(csv.DictReader((full_out / "loss.csv").open()))
    assert rows == full_rows


def test_finetune_captioner_and_filter(uninterrupted, tiny_world, tmp_path):
    out, _ = uninterrupted
    params = tiny_params(**{"finetune.captioner.steps": 3, "finetune.captioner.batch_size": 16,
                            "finetune.filter.steps": 3, "finetune.filter.batch_size": 16})
    cap = run_finetune(params, "captioner", [(tiny_world / "human.parquet", "human")], out / "model", tmp_path / "cap")
    assert cap.stage == "finetune_captioner" and (tmp_path / "cap" / "model" / "config.json").is_file()
    rows = list(csv.DictReader((tmp_path / "cap" / "loss.csv").open()))
    # captioner: LM only (the default weights zero ITC and ITM)
    assert float(rows[-1]["loss"]) == pytest.approx(float(rows[-1]["lm"]), rel=1e-4)
    filt = run_finetune(params, "filter", [(tiny_world / "human.parquet", "human")], out / "model", tmp_path / "filt")
    rows = list(csv.DictReader((tmp_path / "filt" / "loss.csv").open()))
    assert float(rows[-1]["loss"]) == pytest.approx(float(rows[-1]["itc"]) + float(rows[-1]["itm"]), rel=1e-4)
    assert filt.rows_in == filt.rows_out == 100
    # the fine-tuned model keeps the init model's tokenizer
    cfg_a = json.loads((out / "model" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "cap" / "model" / "config.json").read_text())
    assert cfg_a.get("vocab_size") == cfg_b.get("vocab_size")


def test_finetune_errors_are_clear(tiny_world, tmp_path):
    with pytest.raises(TrainError, match="captioner or filter"):
        run_finetune(tiny_params(), "nope", [(tiny_world / "human.parquet", "human")], tmp_path, tmp_path / "o")
    with pytest.raises(TrainError, match="not found"):
        run_finetune(tiny_params(), "filter", [(tiny_world / "human.parquet", "human")], tmp_path / "missing",
                     tmp_path / "o")
