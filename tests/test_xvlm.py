"""Model families and X-VLM (issue 21): the registry, X-VLM's region losses and box head, its
save/load round trip, the human split's box annotations from the synthetic world through the
ingest to training (and nowhere else), and one tiny round of the cycle with ``model.family=xvlm``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_world import tiny_params

from vlp_core.models import BlipMED, ModelError, create_model, families, load_model, train_tokenizer
from vlp_core.models.xvlm import XVLM, paired_giou, patch_mask
from vlp_core.schema import C

TEXTS = ["a big red circle to the left of a small blue square", "a small green cross above a large yellow ball",
         "a little purple box below a big orange disc", "a large blue triangle right of a tiny red plus"]
REGIONS = [[{"phrase": "a big red circle", "box": [0.1, 0.3, 0.4, 0.7]},
            {"phrase": "a small blue square", "box": [0.6, 0.4, 0.85, 0.65]}],
           None,
           [{"phrase": "a little purple box", "box": [0.4, 0.6, 0.6, 0.9]}],
           [{"phrase": "a large blue triangle", "box": [0.55, 0.1, 0.95, 0.5]},
            {"phrase": "a tiny red plus", "box": [0.05, 0.2, 0.3, 0.45]}]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 4, vocab_size=128)


def _pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- registry
def test_registry_builds_and_loads_each_family_by_name(tok, tmp_path):
    assert set(families.FAMILIES) == {"blip", "xvlm", "vilbert"}
    assert families.generates("blip") and families.generates("xvlm") and not families.generates("vilbert")
    assert families.family("vilbert").target == "vlp_core.models.vilbert:ViLBERT"
    blip, xvlm = create_model("tiny", tok), create_model("tiny", tok, family="xvlm")
    assert type(blip) is BlipMED and type(xvlm) is XVLM
    for m, name in ((blip, "blip"), (xvlm, "xvlm")):
        d = m.save_pretrained(tmp_path / name)
        # blip, what a folder without the key means, is not written: BLIP folders keep their bytes
        assert json.loads((d / "config.json").read_text()).get("family", "blip") == name
        assert ("family" in json.loads((d / "config.json").read_text())) == (name != "blip")
        assert families.saved_family(d) == name
        assert type(load_model(d)) is type(m)
        assert type(BlipMED.from_pretrained(d)) is type(m)  # the platform's loader dispatches too
    with pytest.raises(ModelError, match="a 'blip' model, which XVLM cannot load"):
        XVLM.from_pretrained(tmp_path / "blip")
    with pytest.raises(ModelError, match="unknown model family 'clip'"):
        create_model("tiny", tok, family="clip")


def test_a_family_whose_module_is_missing_is_one_clear_error(monkeypatch, tok):
    monkeypatch.setitem(families.FAMILIES, "vilbert",
                        families.Family("vilbert", "vlp_core.models.no_such_module", "ViLBERT", generates=False))
    with pytest.raises(ModelError, match="model family 'vilbert': its module vlp_core.models.no_such_module is not installed"):
        create_model("tiny", tok, family="vilbert")


def test_an_architecture_naming_a_family_refuses_another(tmp_path, tok):
    arch = json.loads((Path(families.__file__).parent / "architectures" / "tiny.json").read_text())
    path = tmp_path / "tiny-xvlm.json"
    path.write_text(json.dumps({**arch, "family": "xvlm", "bbox_giou_weight": 2.0}))
    m = create_model(path, tok)  # no family given: the architecture's
    assert type(m) is XVLM and m.config.bbox_giou_weight == 2.0
    with pytest.raises(ModelError, match="is for model family 'xvlm', not 'blip'"):
        create_model(path, tok, family="blip")
    with pytest.raises(ModelError, match="bbox_l1_weight is -1"):
        create_model("tiny", tok, family="xvlm", bbox_l1_weight=-1)


def test_an_old_folder_without_family_loads_as_blip(tok, tmp_path):
    d = create_model("tiny", tok).save_pretrained(tmp_path / "old")
    assert "family" not in json.loads((d / "config.json").read_text())  # as every folder saved before families
    assert families.saved_family(d) == "blip"
    assert type(load_model(d)) is BlipMED and type(BlipMED.from_pretrained(d)) is BlipMED


def test_model_family_setting_is_checked():
    from vlp_core.config import ConfigError, Params

    assert Params().model.family == "blip"
    assert Params().replace(**{"model.family": "xvlm"}).model.family == "xvlm"
    with pytest.raises(ConfigError, match="model.family"):
        Params().replace(**{"model.family": "clip"})


# --------------------------------------------------------------------------- the model
def test_patch_mask_and_giou():
    m = patch_mask(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 0.65, 0.65]]), 36).view(2, 6, 6)
    assert m[0, :3, :3].all() and m[0].sum() == 9  # the top-left quarter: 3 x 3 cells
    assert m[1].sum() == 1 and m[1, 3, 3]  # a small box inside one cell still covers it
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.8, 0.8, 1.0, 1.0]])
    g = paired_giou(a, b)
    assert g[0] == pytest.approx(1.0) and -1.0 <= float(g[1]) < 0.0
    with pytest.raises(ModelError, match="square grid"):
        patch_mask(a, 35)


def test_forward_gives_each_loss_finite(tok):
    torch.manual_seed(0)
    m = create_model("tiny", tok, family="xvlm")
    out = m(_pixels(), TEXTS, regions=REGIONS)
    for k in ("loss", "itc", "itm", "lm", "region_itc", "region_itm", "bbox_l1", "bbox_giou"):
        assert torch.isfinite(out[k]) and float(out[k].detach()) > 0, k
    out["loss"].backward()
    assert m.bbox_head[0].weight.grad.abs().sum() > 0
    # a section that turns ITC and ITM off (the captioner) turns region ITC/ITM off; boxes still train
    out = m(_pixels(), TEXTS, weights={"itc": 0.0, "itm": 0.0}, regions=REGIONS)
    assert "region_itc" not in out and "region_itm" not in out and float(out["bbox_l1"]) > 0
    # no annotations in the batch: the region losses are 0 and the total is BLIP's
    torch.manual_seed(1)
    none = m(_pixels(), TEXTS, regions=[None] * 4)
    assert all(float(none[k]) == 0.0 for k in ("region_itc", "region_itm", "bbox_l1", "bbox_giou"))
    assert float(none["loss"]) == pytest.approx(float(none["itc"] + none["itm"] + none["lm"]), rel=1e-5)


def test_box_head_learns_a_box_in_a_few_steps(tok):
    torch.manual_seed(0)
    m = create_model("tiny", tok, family="xvlm")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    px = _pixels(seed=3)
    only_boxes = {"itc": 0.0, "itm": 0.0, "lm": 0.0}
    losses = []
    for _ in range(15):
        out = m(px, TEXTS, weights=only_boxes, regions=REGIONS)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["bbox_l1"]) + float(out["bbox_giou"]))
    assert losses[-1] < 0.6 * losses[0], losses
    m.eval()
    with torch.no_grad():
        emb = m.encode_image(px)
        pred = m.predict_boxes(emb[[0, 0]], ["a big red circle", "a small blue square"])
    want = torch.tensor([[0.25, 0.5, 0.3, 0.4], [0.725, 0.525, 0.25, 0.25]])  # (cx, cy, w, h) of REGIONS[0]
    assert (pred - want).abs().mean() < (torch.full_like(want, 0.5) - want).abs().mean()


def test_save_load_round_trip_is_exact(tok, tmp_path):
    torch.manual_seed(0)
    m = create_model("tiny", tok, family="xvlm", region_itm_weight=0.5)
    m(_pixels(), TEXTS, regions=REGIONS)["loss"].backward()  # queues and pointer move
    d = m.save_pretrained(tmp_path / "x")
    back = load_model(d)
    assert type(back) is XVLM and back.config == m.config and back.config.region_itm_weight == 0.5
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m.eval(), back.eval()
    with torch.no_grad():
        emb = m.encode_image(_pixels())
        assert torch.equal(m.itm_probs(emb, TEXTS), back.itm_probs(emb, TEXTS))
        assert torch.equal(m.predict_boxes(emb, TEXTS), back.predict_boxes(emb, TEXTS))
        assert m.generate(image_embeds=emb, max_length=5) == back.generate(image_embeds=emb, max_length=5)


# --------------------------------------------------------------------------- the boxes' way to training
def test_the_human_split_has_boxes_and_the_others_none(tiny_world):
    from vlp_core.synthetic.world import Scene

    gt = {r["url"]: Scene.from_json(r["scene"])
          for r in pq.read_table(tiny_world / "ground_truth.parquet", columns=["url", "scene"]).to_pylist()}
    human = pq.read_table(tiny_world / "human.parquet").to_pylist()
    for row in human:
        scene = gt[row["url_path"]]
        assert len(row[C.REGIONS]) == len(scene.objects)
        for reg, obj in zip(row[C.REGIONS], scene.objects):
            assert np.allclose(np.array(reg["box"]) * 48, obj.bbox, atol=1e-4)
            assert obj.colour in reg["phrase"] and reg["phrase"].startswith(("a ", "an "))
    for split in ("web", "test"):
        assert C.REGIONS not in pq.read_table(tiny_world / f"{split}.parquet").column_names


def test_training_pairs_carry_the_boxes_of_human_rows_only(tiny_world):
    from vlp_core.train.data import PairDataset, batch_regions, decode_pairs, load_pairs

    table = load_pairs([(tiny_world / "web.parquet", "web"), (tiny_world / "human.parquet", "human")])
    data = decode_pairs(table, 48)
    src = data.table[C.SOURCE].to_pylist()
    assert all((r is not None) == (s == "human") for r, s in zip(data.regions, src))
    assert data.n_with_regions == src.count("human") > 0
    idx = [src.index("human"), 0]
    assert batch_regions(PairDataset(data), idx) == [data.regions[idx[0]], None]


def test_a_bad_box_in_a_url_list_is_one_line_naming_file_and_row(tmp_path):
    import pyarrow as pa

    from vlp_core.config import IngestParams
    from vlp_core.ingest.reader import InputFileError, read_url_list

    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": "http://a/1.jpg", "caption": "x", "regions": [{"phrase": "a dog", "box": [0, 0, 0.5, 0.5]}]}\n'
                    '{"url": "http://a/2.jpg", "caption": "y", "regions": [{"phrase": "a cat", "box": [0.5, 0, 0.2, 1]}]}\n')
    with pytest.raises(InputFileError, match=r"urls.jsonl: line 2: column 'regions': region 0: box .* x0 < x1"):
        read_url_list(path, IngestParams())
    good = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "caption": ["x"],
                             "regions": [[{"phrase": "a dog", "box": [0.0, 0.0, 0.5, 0.5]}]]}), good)
    assert read_url_list(good, IngestParams())[C.REGIONS].to_pylist() == [[{"phrase": "a dog", "box": [0.0, 0.0, 0.5, 0.5]}]]


def test_pretrain_xvlm_trains_region_losses_and_saves_an_xvlm(tiny_world, tmp_path):
    from vlp_core.train.loop import run_pretrain

    params = tiny_params(**{"model.family": "xvlm", "model.vocab_size": 128, "pretrain.steps": 4,
                            "pretrain.batch_size": 16, "pretrain.warmup_steps": 1, "pretrain.log_every": 2,
                            "pretrain.checkpoint_every": 100})
    stats = run_pretrain(params, [(tiny_world / "web.parquet", "web"), (tiny_world / "human.parquet", "human")],
                         tmp_path / "pre")
    assert type(load_model(tmp_path / "pre" / "model")) is XVLM
    final = stats.extra["final_losses"]
    assert all(np.isfinite(final[k]) for k in ("region_itc", "region_itm", "bbox_l1", "bbox_giou"))
    assert stats.extra["fingerprint_inputs"]["model.family"] == "xvlm"


# --------------------------------------------------------------------------- a round
def test_a_tiny_round_runs_with_xvlm_and_boxes_reach_only_training(tiny_ingest, tmp_path):
    """Round 0 of the cycle (pretrain, both fine-tunes, CapFilt, features, retrain, evaluate) with
    ``model.family=xvlm`` on the ingested tiny world: the human manifest carries the boxes, the
    models are X-VLMs, and neither CapFilt's corpus nor evaluation sees a box."""
    from vlp_core.layout import PRETRAIN, Layout
    from vlp_core.rounds import compose, run_steps

    human = pq.read_table(tiny_ingest["human_manifest"])
    ok = [r for r in human.to_pylist() if r[C.STATUS] == "success"]
    assert ok and all(r[C.REGIONS] for r in ok)
    assert C.REGIONS not in pq.read_table(tiny_ingest["web_manifest"]).column_names

    layout = Layout(tmp_path)
    for split in ("web", "human", "test"):
        dst = layout.ingest(split)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_ingest[f"{split}_dir"], dst)
    fast = {"model.family": "xvlm", "model.vocab_size": 128, "retrain.init": "continue", "retrain.steps": 2,
            "pretrain.steps": 4, "pretrain.batch_size": 16, "pretrain.warmup_steps": 1, "pretrain.checkpoint_every": 100,
            "finetune.captioner.steps": 2, "finetune.captioner.batch_size": 16, "finetune.captioner.warmup_steps": 1,
            "finetune.filter.steps": 2, "finetune.filter.batch_size": 16, "finetune.filter.warmup_steps": 1,
            "capfilt.batch_size": 64, "capfilt.max_length": 8, "evaluate.batch_size": 64, "evaluate.k_test": 4,
            "features.batch_size": 64}
    params = tiny_params(**fast)
    steps = compose(params, layout, 0, ingest=False, record=False)
    results = run_steps(params, layout, steps, log=lambda _: None)
    assert {"round0-pretrain", "round0-capfilt", "round0-retrain", "round0-evaluate", "round0-evaluate_base"} <= set(results)
    for which in (PRETRAIN, "finetune_captioner", "finetune_filter", "retrain"):
        assert families.saved_family(layout.model(0, which)) == "xvlm", which
    files = sorted((layout.stage(0, "capfilt") / "corpus").glob("*.parquet"))
    assert files and all(C.REGIONS not in pq.read_schema(f).names for f in files)
    assert sum(pq.read_metadata(f).num_rows for f in files) > 0
    metrics = json.loads((layout.stage(0, "evaluate") / "metrics.json").read_text())
    assert 0.0 <= metrics["r1_mean"] <= 100.0
    pre = json.loads((layout.stage(0, PRETRAIN) / "stats.json").read_text())
    assert pre["extra"]["final_losses"]["bbox_l1"] > 0  # the human rows' boxes reached pretraining
