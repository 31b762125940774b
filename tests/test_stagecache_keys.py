"""The stage cache keys and training fingerprints of given settings, pinned.

Every finished stage is found again by its key (:func:`vlp_core.stagecache.input_key`) and a
training run resumes only when its fingerprint (:func:`vlp_core.train.loop.train_fingerprint`)
is the same.  If a change to how the settings are read (``vlp_core/config.py``: the pydantic
models) changed either, every user's finished stages would run again.  The hex strings below were
computed by the settings loader of commit 2d86edb (hand-written dataclasses) and must not move.

A new setting changes the keys of the sections that hold it, on purpose (stages that read it
then run again): update the pins in the same commit and say so in its message.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from vlp_core.capfilt.stage import capfilt_settings
from vlp_core.config import ZERO_OFF_KEYS, Params, params_from_dict, section_dict
from vlp_core.stagecache import input_key
from vlp_core.train.loop import fingerprint_sha256, retrain_settings, train_fingerprint

SECTIONS = ("synthetic", "ingest", "model", "pretrain", "finetune.captioner", "finetune.filter", "retrain",
            "capfilt", "features", "evaluate", "catalog", "gate", "orchestration")
# values the loader must coerce: an int for a float, YAML 1.1's "1e-3" string, a list for a tuple,
# a section given in part over a nested default (finetune.filter keeps its own steps/lr defaults)
COERCED = {"pretrain": {"lr": "1e-3", "min_lr": 0}, "gate": {"margin": 0},
           "capfilt": {"calibrate_percentile": 10, "itc_prescreen": 0},
           "retrain": {"init": "continue", "lr": 2}, "ingest": {"allowed_hosts": ["127.0.0.1:80"]},
           "finetune": {"filter": {"steps": 7}}}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprints(p: Params) -> dict[str, str]:
    out = {f"key {s}": input_key("stage", p, (s,), [], ()) for s in SECTIONS}
    for name, section, tp in (("pretrain", "pretrain", p.pretrain),
                              ("finetune_captioner", "finetune.captioner", p.finetune.captioner),
                              ("finetune_filter", "finetune.filter", p.finetune.filter),
                              ("retrain", "retrain", retrain_settings(p))):
        out[f"train {name}"] = fingerprint_sha256(train_fingerprint(name, section, tp, [], {}))
    out["catalog params"] = _sha(p.to_dict())  # what `vlp record` stores (a record, not a key: ema_*, family too)
    for s in ("synthetic", "features"):  # world.json's settings; the features fingerprint
        out[f"section {s}"] = _sha(section_dict(p, s))
    out["section capfilt"] = _sha(capfilt_settings(p))  # the capfilt shards' fingerprint
    return out


PINNED = {
    "defaults": {
        "key synthetic": "f3e691eedaeee3542a22cae95ea120cedbd7c12f9565a407c1fcf157d057f86e",
        "key ingest": "714344b97efbf8b9940a8757eb2eed134c64fb7bd5239b9d362147968661fa37",
        "key model": "e51d0e97eae83b37a51dbb1bdb70ca645d0eb3a7ada4a3f86569687236b3dc0f",
        "key pretrain": "a21ba2c84e652ace38fcc55073f65bca49c4080e27571d1ec56a43cd213ce06e",
        "key finetune.captioner": "39ab077369b22fe01489fb69be833d6f9b473664d9b100a8703f758f9f1e8d66",
        "key finetune.filter": "27ea40cbe6d259400adc19a58d5eac8845c91beae69f7471067c0f7d7950cd02",
        "key retrain": "cab0bffc5b31c22c4cb6935c399079568ff9e511d8e7f02b088965209b41f99d",
        "key capfilt": "27766c9b5ec0b5183f58afc8dad9c7c0f45eeb2cae53ac6543fd9956c7b25d7a",
        "key features": "fbfdffc679384d0fe506f74befcdc1ffbeaf2fe4f524895631b6e7d138203149",
        "key evaluate": "faac5f3f7b9d4c5b3d503eb4f46fcb131e260a596422d5899970c30fb831ba18",
        "key catalog": "ed1a55b97f85b2dc5f76f90b2b435a97177e166874f968a184947dece653cb13",
        "key gate": "b8425112db937596c0da9366fe54153466c7928bd406d4d70685745f04db7c11",
        "key orchestration": "4e4e926c80b6097f77aa1db120ebfb59ba535dd2e67045960e85c5bacfaeed4c",
        "train pretrain": "5aa67b95507c4ac6300f88020075d39db1421b0c64d365b2382c90f52259ba56",
        "train finetune_captioner": "51b66b84bd6c7de39ae5dd5aae9ab14dd749bc3ead53cbcb7b6864453840905b",
        "train finetune_filter": "ab336d9a002ef824573d40c0f125047871b2c6273fc0c4321c1535c70aac2023",
        "train retrain": "91b31996eb5b416058d91ee0c16be57a5edbf11734f01531cabbd3d41cc2f3b2",
        "catalog params": "fd9030ed3dbe54f5bc751f83a3c6aab62103c255bb3e5c51943c70eef620ce41",
        "section synthetic": "29506c574de59baacc47716a0283022bc7b0c1770d92c0a6e9af1ac6a3865110",
        "section capfilt": "f3998a75f2873c1f1e73d44ed6db83258f86823e1fa2d46627a5fc97fcc5c662",
        "section features": "ebad7352c8db9484dcc8b8790d038aceef12a6ec345f91120aaea49791b2c7bd",
    },
    "coerced": {
        "key synthetic": "f3e691eedaeee3542a22cae95ea120cedbd7c12f9565a407c1fcf157d057f86e",
        "key ingest": "714344b97efbf8b9940a8757eb2eed134c64fb7bd5239b9d362147968661fa37",
        "key model": "e51d0e97eae83b37a51dbb1bdb70ca645d0eb3a7ada4a3f86569687236b3dc0f",
        "key pretrain": "c0d94b512cd8eee8e6b738e8dd4f4310de45439e38c3b36dca78673be86ed833",
        "key finetune.captioner": "39ab077369b22fe01489fb69be833d6f9b473664d9b100a8703f758f9f1e8d66",
        "key finetune.filter": "fc802dba82c7b81e2aea23a6d31b8d385038d26d4525087c36f106d8e44212e0",
        "key retrain": "dda6c57d3c54dc4977b1f582d52e75a65ee86c9ae1e2704b7fe4729f6160e87d",
        "key capfilt": "35f3618f3a55b622ac212adfcc7d18379622beb3bc7a262fa2eb4ad20eb7db51",
        "key features": "fbfdffc679384d0fe506f74befcdc1ffbeaf2fe4f524895631b6e7d138203149",
        "key evaluate": "faac5f3f7b9d4c5b3d503eb4f46fcb131e260a596422d5899970c30fb831ba18",
        "key catalog": "ed1a55b97f85b2dc5f76f90b2b435a97177e166874f968a184947dece653cb13",
        "key gate": "b8425112db937596c0da9366fe54153466c7928bd406d4d70685745f04db7c11",
        "key orchestration": "4e4e926c80b6097f77aa1db120ebfb59ba535dd2e67045960e85c5bacfaeed4c",
        "train pretrain": "a3a80d2009d4cc76d50c64ab192e94edcb2a63669788405ab051af51d216928d",
        "train finetune_captioner": "51b66b84bd6c7de39ae5dd5aae9ab14dd749bc3ead53cbcb7b6864453840905b",
        "train finetune_filter": "433cb38675e16da3178f803c45acad8b0c425cd8c748418d06f59762edb66e76",
        "train retrain": "c0a46e76304acc5950c34ea9e8727adf5d5e5e11acd5ccec2c0cff4b873900f3",
        "catalog params": "e566dadb9df636676fb1ef5d35a5b5b1038277ad06332d3dc6f05190913f7df4",
        "section synthetic": "29506c574de59baacc47716a0283022bc7b0c1770d92c0a6e9af1ac6a3865110",
        "section capfilt": "8288e37fa9865b1e921812e8cc6b1a68abbec1118edc34d30520b00b82aa0b9d",
        "section features": "ebad7352c8db9484dcc8b8790d038aceef12a6ec345f91120aaea49791b2c7bd",
    },
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_settings_give_the_keys_of_before(case):
    p = Params() if case == "defaults" else params_from_dict(COERCED, "<test>")
    assert fingerprints(p) == PINNED[case]


if __name__ == "__main__":  # print the pins (only when a new setting changes them on purpose)
    print(json.dumps({"defaults": fingerprints(Params()),
                      "coerced": fingerprints(params_from_dict(COERCED, "<test>"))}, indent=4))


def test_ema_settings_move_a_stage_key_only_while_the_ema_is_on():
    """ema_decay = 0 (off) keeps the keys of before whatever ema_warmup says; turning it on moves
    the key of that section's stage and of nothing upstream."""
    base = fingerprints(Params())
    warm_off = fingerprints(params_from_dict({"pretrain": {"ema_warmup": False}}, "<test>"))
    on = fingerprints(params_from_dict({"finetune": {"filter": {"ema_decay": 0.999}}}, "<test>"))
    assert {k: v for k, v in warm_off.items() if k != "catalog params"} == \
        {k: v for k, v in base.items() if k != "catalog params"}
    assert on["key finetune.filter"] != base["key finetune.filter"]
    assert on["train finetune_filter"] != base["train finetune_filter"]
    assert on["key pretrain"] == base["key pretrain"] and on["key finetune.captioner"] == base["key finetune.captioner"]


def test_capfilt_captioner_moves_the_capfilt_key_only_when_not_base():
    """capfilt.captioner at ``base`` (BLIP's CapFilt, every run before the setting existed) keeps the
    capfilt stage key and the shards' fingerprint; another value moves the stage key only."""
    base = fingerprints(Params())
    none = fingerprints(params_from_dict({"capfilt": {"captioner": "none"}}, "<test>"))
    assert none["key capfilt"] != base["key capfilt"]
    assert {k: v for k, v in none.items() if k not in ("key capfilt", "catalog params")} == \
        {k: v for k, v in base.items() if k not in ("key capfilt", "catalog params")}


ZERO_OFF_CASES = [{"phrase_swaps": 0.5}, {"synonyms": ["big large"]}, {"holdout": 0.2}]


def test_every_zero_off_setting_has_a_case():
    assert {next(iter(d)) for d in ZERO_OFF_CASES} == set(ZERO_OFF_KEYS)


@pytest.mark.parametrize("setting", ZERO_OFF_CASES, ids=lambda d: next(iter(d)))
def test_zero_off_settings_move_the_filters_key_only_when_set(setting):
    """phrase_swaps, synonyms and holdout (config.ZERO_OFF_KEYS) at 0 / empty -- every run before
    each setting existed -- keep the keys and fingerprints; set for the filter, each moves that
    stage's key and training fingerprint and nothing upstream."""
    base = fingerprints(Params())
    on = fingerprints(params_from_dict({"finetune": {"filter": setting}}, "<test>"))
    moved = ("key finetune.filter", "train finetune_filter")
    assert all(on[m] != base[m] for m in moved)
    assert {k: v for k, v in on.items() if k not in (*moved, "catalog params")} == \
        {k: v for k, v in base.items() if k not in (*moved, "catalog params")}
