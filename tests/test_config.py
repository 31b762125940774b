"""The one settings loader: defaults, overrides in DVC's form, and clear refusals."""
from __future__ import annotations

import pytest

from vlp_core.config import ConfigError, Params, load_params


def test_params_yaml_loads_and_matches_defaults_types(tmp_path):
    p = load_params("params.yaml")
    assert isinstance(p, Params)
    assert p.ingest.thread_count > 0


def test_override_in_dvc_form():
    p = load_params("params.yaml", ["ingest.thread_count=32", "capfilt.top_p=0.8", "finetune.filter.steps=7"])
    assert p.ingest.thread_count == 32
    assert p.capfilt.top_p == pytest.approx(0.8)
    assert p.finetune.filter.steps == 7
    # untouched siblings keep their values
    assert p.finetune.captioner.steps == load_params("params.yaml").finetune.captioner.steps


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("ingest:\n  thread_cont: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert "ingest.thread_cont" in str(e.value) and str(f) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert "pretrain.steps" in str(e.value) and str(f) in str(e.value)
    with pytest.raises(ConfigError, match="ingest.incremental"):
        load_params(f, ["pretrain.steps=3", "ingest.incremental=maybe"])


def test_network_policy_settings(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("ingest:\n  allow_private_network: true\n")
    with pytest.raises(ConfigError, match="replaced by ingest.allowed_hosts"):
        load_params(f)
    p = load_params(None, ["ingest.allowed_hosts=[127.0.0.1:8765, 'images.example:443']"])
    assert p.ingest.allowed_hosts == ("127.0.0.1:8765", "images.example:443")
    for bad in ("[127.0.0.1]", "[127.0.0.1:99999]", "[:80]"):
        with pytest.raises(ConfigError, match=r"ingest.allowed_hosts\[0\].*host:port"):
            load_params(None, [f"ingest.allowed_hosts={bad}"])
    with pytest.raises(ConfigError, match="ingest.max_image_pixels"):
        load_params(None, ["ingest.max_image_pixels=0"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params("params.yaml", ["ingest.thread_count"])


def test_params_are_frozen_and_replace_validates():
    p = Params()
    with pytest.raises(Exception):
        p.ingest.thread_count = 3  # type: ignore[misc]
    q = p.replace(**{"capfilt.num_captions": 3})
    assert q.capfilt.num_captions == 3 and p.capfilt.num_captions == 1
    with pytest.raises(ConfigError):
        p.replace(**{"capfilt.num_captions": "three"})


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_scientific_notation_is_a_number(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; float settings take it as a number."""
    assert load_params("params.yaml", ["pretrain.lr=1e-3"]).pretrain.lr == 1e-3
    assert load_params("params.yaml", ["capfilt.itc_prescreen=-2E-1"]).capfilt.itc_prescreen == -0.2
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  lr: 2e-3\n  min_lr: 1e-5\n")
    p = load_params(f)
    assert p.pretrain.lr == 2e-3 and p.pretrain.min_lr == 1e-5
    with pytest.raises(ConfigError, match="pretrain.lr: expected a number"):
        load_params("params.yaml", ["pretrain.lr=1e-3x"])
    with pytest.raises(ConfigError, match="pretrain.steps: expected an integer"):  # ints stay strict
        load_params("params.yaml", ["pretrain.steps=1e3"])


@pytest.mark.parametrize("override, key", [
    ("pretrain.steps=-5", "pretrain.steps"),
    ("pretrain.steps=0", "pretrain.steps"),
    ("pretrain.batch_size=1", "pretrain.batch_size"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("finetune.filter.lr=-1e-3", "finetune.filter.lr"),
    ("pretrain.lr=.nan", "pretrain.lr"),
    ("pretrain.min_lr=0.5", "pretrain.min_lr"),
    ("ingest.number_sample_per_shard=0", "ingest.number_sample_per_shard"),
    ("ingest.processes_count=0", "ingest.processes_count"),
    ("ingest.thread_count=0", "ingest.thread_count"),
    ("ingest.timeout=0", "ingest.timeout"),
    ("ingest.retries=-1", "ingest.retries"),
    ("capfilt.calibrate_percentile=101", "capfilt.calibrate_percentile"),
    ("capfilt.calibrate_percentile=-1", "capfilt.calibrate_percentile"),
    ("capfilt.top_p=0", "capfilt.top_p"),
    ("capfilt.keep_top=0", "capfilt.keep_top"),
    ("capfilt.min_length=50", "capfilt.min_length"),
    ("synthetic.noise_rate=1.5", "synthetic.noise_rate"),
    ("catalog.query_timeout_seconds=0", "catalog.query_timeout_seconds"),
    ("orchestration.network_timeout_seconds=0", "orchestration.network_timeout_seconds"),
    ("gate.margin=.nan", "gate.margin"),
    ("gate.margin=.inf", "gate.margin"),
    ("gate.metric=", "gate.metric"),
    ("gate.no_parent=maybe", "gate.no_parent"),
])
def test_impossible_numbers_are_refused_at_load_time(override, key):
    with pytest.raises(ConfigError) as e:
        load_params("params.yaml", [override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "params.yaml" in msg and override in msg


def test_impossible_number_in_the_file_names_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("ingest:\n  thread_count: 0\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: ingest\.thread_count: must be >= 1, got 0"):
        load_params(f)
    # and at the edges, the sane values load
    p = load_params("params.yaml", ["pretrain.batch_size=2", "pretrain.steps=1", "capfilt.calibrate_percentile=100",
                                    "capfilt.num_captions=0", "pretrain.lm_weight=0", "ingest.retries=0"])
    assert p.pretrain.batch_size == 2 and p.capfilt.calibrate_percentile == 100.0


def test_cli_refuses_impossible_settings_in_one_line(capsys):
    from vlp_core.cli import main

    assert main(["query", "SELECT 1", "-S", "ingest.number_sample_per_shard=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "ingest.number_sample_per_shard" in err


def test_query_timeout_is_a_setting():
    assert load_params("params.yaml").catalog.query_timeout_seconds == 60


def test_demo_world_and_retrain_settings_are_bounded():
    for override in ("synthetic.objects=3", "retrain.steps=0", "retrain.lr=0", "retrain.warmup_steps=-1"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_params("params.yaml", [override])
    assert load_params("params.yaml", ["synthetic.objects=1", "retrain.init=continue"]).retrain.init == "continue"


def test_capfilt_precision_is_a_checked_choice(tmp_path):
    assert load_params("params.yaml").capfilt.precision == "auto"
    assert load_params("params.yaml", ["capfilt.precision=fp32"]).capfilt.precision == "fp32"
    f = tmp_path / "p.yaml"
    f.write_text("capfilt:\n  precision: fp16\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert "capfilt.precision" in str(e.value) and str(f) in str(e.value) and "bf16" in str(e.value)


def test_a_section_given_in_part_keeps_its_own_defaults(tmp_path):
    """``finetune.filter`` given only ``steps`` keeps the filter's lr and loss weights (not
    TrainParams' class defaults); an empty section is all defaults."""
    f = tmp_path / "p.yaml"
    f.write_text("finetune:\n  filter:\n    steps: 7\ncapfilt:\n")
    p = load_params(f)
    d = Params()
    assert p.finetune.filter.steps == 7 and p.finetune.filter.lr == d.finetune.filter.lr == 5e-4
    assert p.finetune.filter.lm_weight == 0.0 and p.finetune.captioner == d.finetune.captioner
    assert p.capfilt == d.capfilt


def test_every_refusal_is_one_line_in_the_projects_words(tmp_path):
    """pydantic's ValidationError never reaches the user: one ConfigError line, file and key first."""
    cases = {"synthetic.holdout_frac=1": "synthetic.holdout_frac: must be in [0, 1), got 1",
             "capfilt.top_p=0": "capfilt.top_p: must be in (0, 1], got 0",
             "finetune.filter.min_lr=0.5": "finetune.filter.min_lr: must not exceed finetune.filter.lr (0.0005), got 0.5",
             "ingest.thread_cont=3": "ingest.thread_cont: unknown key (known: allowed_hosts, caption_col,",
             "pretrain=5": "pretrain: expected a mapping, got int",
             "model.arch=3": "model.arch: expected a string, got 3",
             "finetune.filter.steps=true": "finetune.filter.steps: expected an integer, got True",
             "gate.no_parent=maybe": "gate.no_parent: must be one of 'promote' or 'reject', got 'maybe'",
             "ingest.retry_failed=true": None}
    for override, expected in cases.items():
        extra = ["ingest.incremental=false"] if override.startswith("ingest.retry_failed") else []
        with pytest.raises(ConfigError) as e:
            load_params("params.yaml", [override, *extra])
        msg = str(e.value)
        assert "\n" not in msg and "pydantic" not in msg and msg.startswith(f"params.yaml (-S {override}): ")
        assert expected is None or expected in msg, msg
    with pytest.raises(ConfigError, match=r"^params\.yaml \(-S ingest\.retry_failed=true\): ingest\.retry_failed: "
                                          r"needs ingest\.incremental=true"):
        load_params("params.yaml", ["ingest.retry_failed=true", "ingest.incremental=false"])


def test_params_travel_to_workers_and_compare_by_value():
    """Dask pickles the settings; the stage keys hash their plain form (lists, not tuples)."""
    import pickle

    p = load_params("params.yaml", ["ingest.allowed_hosts=[127.0.0.1:80]"])
    assert pickle.loads(pickle.dumps(p)) == p and hash(p) == hash(pickle.loads(pickle.dumps(p)))
    assert p.to_dict()["ingest"]["allowed_hosts"] == ["127.0.0.1:80"]
    assert isinstance(p.to_dict()["capfilt"]["calibrate_percentile"], float)  # 10 in a file is 10.0, as before


def test_ema_settings_are_bounded_per_training_section():
    """ema_decay in [0, 1) in each training section (0 = off, the default); ema_warmup a boolean."""
    p = load_params("params.yaml")
    assert p.pretrain.ema_decay == p.finetune.captioner.ema_decay == p.finetune.filter.ema_decay == 0.0
    for section in ("pretrain", "finetune.captioner", "finetune.filter"):
        for bad in ("1", "1.5", "-0.1", ".nan"):
            with pytest.raises(ConfigError, match=rf"{section}\.ema_decay: must"):
                load_params("params.yaml", [f"{section}.ema_decay={bad}"])
        with pytest.raises(ConfigError, match=rf"{section}\.ema_warmup: expected true or false"):
            load_params("params.yaml", [f"{section}.ema_warmup=0.5"])
    p = load_params("params.yaml", ["finetune.filter.ema_decay=0.999", "pretrain.ema_warmup=false"])
    assert p.finetune.filter.ema_decay == 0.999 and p.pretrain.ema_warmup is False and p.pretrain.ema_decay == 0.0
