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
    with pytest.raises(ConfigError, match="ingest.allow_private_network"):
        load_params(f, ["pretrain.steps=3", "ingest.allow_private_network=maybe"])


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
