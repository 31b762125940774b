"""The training loop on the tiny world: outputs, loss log, resume equals uninterrupted, fine-tune."""
from __future__ import annotations

import csv
import json

import pytest
from fixtures_model import FAST, STEPS, train_sources
from fixtures_world import tiny_params

from vlp_core.io import read_json
from vlp_core.train.loop import TrainError, run_finetune, run_pretrain


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory, fast):
    out = tmp_path_factory.mktemp("pretrain_full")
    stats = run_pretrain(fast, train_sources(tiny_world), out)
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
    part = run_pretrain(params, train_sources(tiny_world), tmp_path, stop_after_step=6)  # "killed" after step 6
    assert part.extra["steps"] == 6 and not (tmp_path / "model").exists()
    resumed = run_pretrain(params, train_sources(tiny_world), tmp_path)
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


def test_tokenizer_vocab_is_a_function_of_the_captions(tiny_world):
    from vlp_core.models import train_tokenizer
    from vlp_core.train.data import load_pairs

    texts = [t for t in load_pairs(train_sources(tiny_world))["text"].to_pylist() if t and t.strip()]
    vocabs = [train_tokenizer(texts, vocab_size=128).get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert train_tokenizer(list(reversed(texts)), vocab_size=128).get_vocab() == vocabs[0]
    tok = train_tokenizer(texts, vocab_size=128)
    assert len(tok) <= 128 + 2  # + [ENC]/[DEC] only when they did not fit
    ids = [i for t in texts for i in tok(t)["input_ids"]]
    assert tok.unk_token_id not in ids  # every seen character is in the vocabulary
    assert tok.convert_ids_to_tokens(tok.enc_token_id) == "[ENC]" and tok.bos_token == "[DEC]"


def test_two_seeded_runs_from_scratch_are_bit_identical(tiny_world, tmp_path):
    """Tokenizer trained from the captions in each run: loss.csv and weights match byte for byte."""
    params = tiny_params(**{**FAST, "pretrain.steps": 6, "pretrain.checkpoint_every": 6, "model.vocab_size": 128})
    runs = [tmp_path / "a", tmp_path / "b"]
    stats = [run_pretrain(params, train_sources(tiny_world), out) for out in runs]
    assert stats[0].extra["rank_state_sha256"] == stats[1].extra["rank_state_sha256"]
    assert (runs[0] / "loss.csv").read_bytes() == (runs[1] / "loss.csv").read_bytes()
    for name in ("model.safetensors", "tokenizer/tokenizer.json"):
        assert (runs[0] / "model" / name).read_bytes() == (runs[1] / "model" / name).read_bytes(), name


def test_rerun_resumes_only_with_the_same_fingerprint(tiny_world, tmp_path, fast, capsys):
    """A checkpoint made with other settings, sources or source content is refused in one line;
    settings that do not change the weights (log_every...) still resume; fresh starts over."""
    import shutil

    import yaml

    from vlp_core.cli import main

    human = tmp_path / "human.parquet"
    shutil.copy(tiny_world / "human.parquet", human)
    sources = [(tiny_world / "web.parquet", "web"), (human, "human")]
    out = tmp_path / "run"
    part = run_pretrain(fast, sources, out, stop_after_step=2)
    on_disk = read_json(out / "stats.json")["extra"]
    assert on_disk["fingerprint"] == part.extra["fingerprint"] and len(part.extra["fingerprint"]) == 64
    assert on_disk["fingerprint_inputs"]["pretrain.lr"] == 5e-4

    with pytest.raises(TrainError, match=r"pretrain\.lr 0\.0005 -> 0\.002\); rerun with a fresh out dir or --fresh"):
        run_pretrain(fast.replace(**{"pretrain.lr": 2e-3}), sources, out, stop_after_step=3)
    with pytest.raises(TrainError, match=r"sources .*web.parquet:web, .*human.parquet:human -> .*human.parquet:human"):
        run_pretrain(fast, sources[1:], out, stop_after_step=3)
    with pytest.raises(TrainError, match="model.max_text_len 32 -> 24"):
        run_pretrain(fast.replace(**{"model.max_text_len": 24}), sources, out, stop_after_step=3)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(human).slice(0, 90), human)  # same path, other content
    with pytest.raises(TrainError, match=r"human\.parquet changed"):
        run_pretrain(fast, sources, out, stop_after_step=3)
    shutil.copy(tiny_world / "human.parquet", human)  # the content is back: it resumes
    again = run_pretrain(fast.replace(**{"pretrain.log_every": 1, "pretrain.checkpoint_every": 1}), sources, out,
                         stop_after_step=3)
    assert again.extra["resumed_from_step"] == 2 and again.extra["fingerprint"] == part.extra["fingerprint"]

    # the CLI: one line, exit 2; --fresh starts over
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(fast.to_dict()))
    argv = ["pretrain", "--train", f"{tiny_world / 'web.parquet'}:web", "--train", f"{human}:human",
            "--out", str(out), "--params", str(params_file), "-S", "pretrain.steps=4"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pretrain.steps 12 -> 4" in err and str(out) in err
    assert main([*argv, "--fresh"]) == 0
    fresh = read_json(out / "stats.json")["extra"]
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 4
    assert [int(r["step"]) for r in csv.DictReader((out / "loss.csv").open())] == [2, 4]


def test_finished_run_is_returned_again_and_model_without_checkpoint_is_checked(uninterrupted, tiny_world,
                                                                                 tmp_path, fast):
    import shutil

    full_out, full = uninterrupted
    out = tmp_path / "done"
    shutil.copytree(full_out, out)
    again = run_pretrain(fast, train_sources(tiny_world), out)
    assert again.extra["resumed_from_step"] == STEPS and again.extra["rank_state_sha256"] == full.extra["rank_state_sha256"]
    shutil.rmtree(out / "checkpoint")  # model/ and stats.json only: still checked
    with pytest.raises(TrainError, match=r"the model was trained with other settings \(pretrain\.seed 0 -> 1\)"):
        run_pretrain(fast.replace(**{"pretrain.seed": 1}), train_sources(tiny_world), out)


def test_finetune_errors_are_clear(tiny_world, tmp_path):
    with pytest.raises(TrainError, match="captioner or filter"):
        run_finetune(tiny_params(), "nope", [(tiny_world / "human.parquet", "human")], tmp_path, tmp_path / "o")
    with pytest.raises(TrainError, match="not found"):
        run_finetune(tiny_params(), "filter", [(tiny_world / "human.parquet", "human")], tmp_path / "missing",
                     tmp_path / "o")
