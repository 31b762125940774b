"""Fixtures for tiny models and tokenizers: the short pretraining settings and the saved
tokenizer that the training-loop tests (loop, EMA) share, and an untrained tiny model (CapFilt,
held-out pairs)."""
from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_world import tiny_params

from vlp_core.models import create_model, train_tokenizer
from vlp_core.train.data import load_pairs

STEPS = 12
FAST = {"pretrain.steps": STEPS, "pretrain.batch_size": 16, "pretrain.warmup_steps": 3, "pretrain.log_every": 2,
        "pretrain.checkpoint_every": 4, "pretrain.lr": 5e-4}


def train_sources(world):
    """The tiny world's web and human splits, as training sources."""
    return [(world / "web.parquet", "web"), (world / "human.parquet", "human")]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_world, tmp_path_factory):
    """One saved tokenizer for every run of a test module (saves building it in each run)."""
    texts = [t for t in load_pairs(train_sources(tiny_world))["text"].to_pylist() if t and t.strip()]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=128).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    """:data:`FAST`'s pretraining settings on the tiny world, with the module's saved tokenizer."""
    return tiny_params(**FAST, **{"model.tokenizer": str(tokenizer_dir)})


@pytest.fixture(scope="session")
def untrained_model(tiny_world, tmp_path_factory) -> Path:
    """A freshly initialised tiny MED with a tokenizer trained on the world's captions."""
    import torch

    torch.manual_seed(0)
    texts = [t for t in load_pairs([(tiny_world / "web.parquet", "web")])["text"].to_pylist() if t and t.strip()]
    model = create_model("tiny", train_tokenizer(texts, vocab_size=128))
    return model.save_pretrained(tmp_path_factory.mktemp("untrained") / "model")
