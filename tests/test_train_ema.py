"""The EMA of the weights (vlp_core/train/ema.py) in the training loop: the final model/ is the
hand-computed EMA, a resumed run equals an uninterrupted one, the live run is unchanged by it, and
ema_decay 0 leaves everything as it was (no EMA state, no fingerprint keys, model/ = live weights)."""
from __future__ import annotations

import pytest
import torch
from fixtures_model import train_sources
from fixtures_world import tiny_params

from vlp_core.train.ema import WeightEma
from vlp_core.train.loop import run_finetune, run_pretrain, state_sha256, train_fingerprint


@pytest.fixture(scope="module")
def plain(tiny_world, tmp_path_factory, fast):
    """The run with the EMA off (the default): today's training."""
    out = tmp_path_factory.mktemp("plain")
    return out, run_pretrain(fast, train_sources(tiny_world), out)


@pytest.fixture(scope="module")
def with_ema(tiny_world, tmp_path_factory, fast):
    out = tmp_path_factory.mktemp("ema")
    return out, run_pretrain(fast.replace(**{"pretrain.ema_decay": 0.99}), train_sources(tiny_world), out)


def _trainer_state(out):
    return torch.load(out / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)


def _final_state(out):
    from vlp_core.models import BlipMED

    model = BlipMED.from_pretrained(out / "model")
    return model, model.state_dict()


def test_decay_zero_keeps_todays_run(plain):
    """No EMA state, no EMA keys in the fingerprint or stats, and model/ holds the live weights."""
    out, stats = plain
    state = _trainer_state(out)
    assert "ema" not in state
    assert not any("ema" in k for k in stats.extra["fingerprint_inputs"]) and "ema_state_sha256" not in stats.extra
    model, final = _final_state(out)
    assert state_sha256(model) == stats.extra["rank_state_sha256"][0]
    # the machine's arithmetic is recorded beside the digests, outside the fingerprint
    assert stats.extra["arithmetic"]["torch"] == torch.__version__ and stats.extra["arithmetic"]["threads"] >= 1
    assert "arithmetic" not in stats.extra["fingerprint_inputs"]
    for name, t in final.items():
        assert torch.equal(t, state["model"][name]), name


def test_ema_leaves_the_live_run_unchanged_and_model_holds_the_average(plain, with_ema):
    (_, off), (out, on) = plain, with_ema
    assert on.extra["rank_state_sha256"] == off.extra["rank_state_sha256"]  # the live weights: same run
    assert on.extra["fingerprint"] != off.extra["fingerprint"]
    assert on.extra["fingerprint_inputs"]["pretrain.ema_decay"] == 0.99
    assert on.extra["fingerprint_inputs"]["pretrain.ema_warmup"] is True
    model, final = _final_state(out)
    assert state_sha256(model) == on.extra["ema_state_sha256"]
    live = _trainer_state(out)["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and any(n.startswith("text_encoder_m.") for n in frozen)  # BLIP's momentum encoders
    differ = [n for n in trainable if not torch.equal(final[n], live[n])]
    assert len(differ) > len(trainable) // 2
    buffers = [n for n, _ in model.named_buffers() if n in final]  # the persistent ones (queues)
    assert "image_queue" in buffers and "queue_ptr" in buffers
    for n in frozen + buffers:  # copied from the live model
        assert torch.equal(final[n], live[n]), n


def test_ema_is_the_hand_computed_average_of_three_steps(tiny_world, tmp_path, fast):
    """Three steps, a checkpoint after each (the live weights w1, w2, w3): model/ is
    e1 = w1, e_t = e_{t-1} + (1 - d) (w_t - e_{t-1}) for the trainable parameters, bit for bit."""
    decay = 0.9
    params = fast.replace(**{"pretrain.steps": 3, "pretrain.checkpoint_every": 1, "pretrain.log_every": 1,
                             "pretrain.ema_decay": decay, "pretrain.ema_warmup": False})
    live = []
    for stop in (1, 2, 3):
        run_pretrain(params, train_sources(tiny_world), tmp_path, stop_after_step=stop)
        state = _trainer_state(tmp_path)
        assert state["step"] == stop
        live.append(state["model"])
    model, final = _final_state(tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for n in trainable:
        ema = live[0][n].clone()
        for w in live[1:]:
            ema = torch.lerp(ema, w[n], 1.0 - decay)
        assert torch.equal(final[n], ema), n
    assert not all(torch.equal(final[n], live[2][n]) for n in trainable)


def test_resume_with_ema_is_bit_identical(with_ema, tiny_world, tmp_path, fast):
    full_out, full = with_ema
    params = fast.replace(**{"pretrain.ema_decay": 0.99})
    part = run_pretrain(params, train_sources(tiny_world), tmp_path, stop_after_step=6)
    assert "ema" in _trainer_state(tmp_path) and not (tmp_path / "model").exists()
    resumed = run_pretrain(params, train_sources(tiny_world), tmp_path)
    assert part.extra["steps"] == 6 and resumed.extra["resumed_from_step"] == 6
    assert resumed.extra["rank_state_sha256"] == full.extra["rank_state_sha256"]
    assert resumed.extra["ema_state_sha256"] == full.extra["ema_state_sha256"]
    name = "model.safetensors"
    assert (tmp_path / "model" / name).read_bytes() == (full_out / "model" / name).read_bytes()


def test_finetune_sections_have_their_own_ema(with_ema, tiny_world, tmp_path):
    out, _ = with_ema
    params = tiny_params(**{"finetune.filter.steps": 3, "finetune.filter.batch_size": 16,
                            "finetune.filter.ema_decay": 0.5})
    stats = run_finetune(params, "filter", [(tiny_world / "human.parquet", "human")], out / "model", tmp_path / "f")
    assert stats.extra["ema_decay"] == 0.5
    assert stats.extra["fingerprint_inputs"]["finetune.filter.ema_decay"] == 0.5
    assert stats.extra["ema_state_sha256"] != stats.extra["rank_state_sha256"][0]
    assert params.finetune.captioner.ema_decay == 0.0 and params.pretrain.ema_decay == 0.0


def test_fingerprint_has_ema_keys_only_when_on():
    base = tiny_params().pretrain
    off = train_fingerprint("pretrain", "pretrain", base, [], {})
    warm_off = train_fingerprint("pretrain", "pretrain", base.model_copy(update=dict(ema_warmup=False)), [], {})
    on = train_fingerprint("pretrain", "pretrain", base.model_copy(update=dict(ema_decay=0.999)), [], {})
    assert off == warm_off and not any("ema" in k for k in off)
    assert on["pretrain.ema_decay"] == 0.999 and on["pretrain.ema_warmup"] is True
    assert {k: v for k, v in on.items() if "ema" not in k} == off


def test_decay_schedule_with_and_without_warmup():
    model = torch.nn.Linear(2, 2)
    warm, flat = WeightEma(model, 0.999, warmup=True), WeightEma(model, 0.999, warmup=False)
    assert warm.decay_at(1) == flat.decay_at(1) == 0.0  # the first step copies the live weights
    assert flat.decay_at(2) == flat.decay_at(800) == 0.999
    for t in (2, 100, 800):
        assert warm.decay_at(t) == pytest.approx(min(0.999, 1 - t ** -0.75))
    assert warm.decay_at(10**6) == 0.999
