"""Hugging Face BLIP interop (vlp_core.models.hf): a tiny-vit BlipMED exported as
BlipForConditionalGeneration / BlipForImageTextRetrieval gives transformers' own outputs, export
then import gives the model back, a folder made by transformers imports exactly, transformers 5's
processor_config.json gives the image settings, an explicit label_smoothing survives import, the
CNN backbone refuses to export, and fine-tuning starts from an HF folder."""
from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_capfilt_hf import make_hf_blip

from vlp_core.config import Params
from vlp_core.models import BlipMED, ModelError, create_model, train_tokenizer
from vlp_core.models.hf import export_captioner, export_filter, import_hf, is_hf_blip_dir

CAPS = ["a red circle", "a blue square above a star", "two green triangles left of a big circle",
        "a small yellow star below a red square", "one big green circle", "three blue stars"]
NOISE = 0.05  # added to random init so outputs depend on image and text (captions differ per image)
ATOL = 1e-5
MAX_NEW = 12


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 and "_m." not in name:
                p.add_(torch.randn(p.shape, generator=g) * NOISE)


def _images(n: int = 4, size: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These matrices are tiny: one thread beats two (and two wait on a core shared with other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPS * 4, vocab_size=96)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """A tiny-vit vlp checkpoint (random, perturbed) and its two HF exports."""
    torch.manual_seed(0)
    model = create_model("tiny-vit", tok)
    _perturb(model, 0)
    model.copy_params()
    root = tmp_path_factory.mktemp("hf_interop")
    vlp_dir = model.save_pretrained(root / "vlp")
    return {"vlp": vlp_dir, "captioner": export_captioner(vlp_dir, root / "blip-captioning"),
            "filter": export_filter(vlp_dir, root / "blip-itm")}


@pytest.fixture(scope="module")
def ours(exported):
    return BlipMED.from_pretrained(exported["vlp"]).eval()


def _itm_itc(model: BlipMED, pixels: torch.Tensor, texts):
    with torch.no_grad():
        emb = model.encode_image(pixels)
        return model.itm_probs(emb, texts), model.image_feat(emb) @ model.text_feat(texts).T


def _hf_itm_itc(hf, ids_itm, mask_itm, ids_itc, mask_itc, pixels):
    with torch.no_grad():
        itm = hf(input_ids=ids_itm, attention_mask=mask_itm, pixel_values=pixels,
                 use_itm_head=True).itm_score.softmax(-1)[:, 1]
        itc = hf(input_ids=ids_itc, attention_mask=mask_itc, pixel_values=pixels, use_itm_head=False).itm_score
    return itm, itc


def _hf_captions(cap_dir, pixels, prompt: str):
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    hf = BlipForConditionalGeneration.from_pretrained(str(cap_dir)).eval()
    tk = AutoTokenizer.from_pretrained(str(cap_dir))
    ids = tk([prompt] * len(pixels), return_tensors="pt")["input_ids"]  # generate puts bos first, drops [SEP]
    n_prompt = ids.shape[1] - 1
    out = hf.generate(pixel_values=pixels, input_ids=ids.clone(), do_sample=False, num_beams=1,
                      max_new_tokens=MAX_NEW, min_new_tokens=5)
    return [c.strip() for c in tk.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]


# --------------------------------------------------------------------------- export parity
def test_exported_folders_are_complete_hf_blip(exported, ours):
    from transformers import AutoTokenizer, BlipConfig, BlipProcessor

    for role in ("captioner", "filter"):
        d = exported[role]
        assert is_hf_blip_dir(d)
        for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f
        cfg = BlipConfig.from_pretrained(str(d))
        assert cfg.vision_config.layer_norm_eps == 1e-6 and cfg.vision_config.hidden_act == "gelu"
        vc = cfg.vision_config
        assert (vc.patch_size, vc.image_size, vc.num_hidden_layers) == (8, 48, 4)
        tc = cfg.text_config
        assert tc.bos_token_id == ours.tokenizer.convert_tokens_to_ids("[DEC]") == ours.config.dec_token_id
        assert tc.sep_token_id == tc.eos_token_id == ours.tokenizer.sep_token_id
        assert tc.pad_token_id == ours.tokenizer.pad_token_id and tc.vocab_size == len(ours.tokenizer)
        # the folder's tokenizer gives our ids ([CLS]-first "enc" mode)
        tk = AutoTokenizer.from_pretrained(str(d))
        ids = tk(CAPS, padding="longest", return_tensors="pt")["input_ids"]
        assert ids.tolist() == ours.tokenize(CAPS, "enc")[0].tolist()
        assert tk.bos_token == "[DEC]" and "[ENC]" in tk.all_special_tokens
    assert not is_hf_blip_dir(exported["vlp"])
    # BlipProcessor from the export gives our preprocessing (same size: no resize on either side)
    proc = BlipProcessor.from_pretrained(str(exported["filter"]))
    imgs = _images()
    theirs = proc(images=list(imgs), return_tensors="pt")["pixel_values"]
    diff = (theirs - ours.preprocess(imgs)).abs().max().item()
    assert theirs.shape == (4, 3, 48, 48) and diff < ATOL, diff


def test_filter_export_matches_transformers(exported, ours):
    from transformers import BlipForImageTextRetrieval

    hf = BlipForImageTextRetrieval.from_pretrained(str(exported["filter"])).eval()
    pixels = ours.preprocess(_images())
    texts = CAPS[:4]
    itm, itc = _itm_itc(ours, pixels, texts)
    # our ITM puts [ENC] first: feed HF the same ids; ITC uses the [CLS]-first ids
    h_itm, h_itc = _hf_itm_itc(hf, *ours.tokenize(texts, "itm"), *ours.tokenize(texts, "enc"), pixels)
    assert torch.allclose(itm, h_itm, atol=ATOL), (itm - h_itm).abs().max()
    assert itc.shape == h_itc.shape == (4, 4) and torch.allclose(itc, h_itc, atol=ATOL), (itc - h_itc).abs().max()
    assert itm.max() - itm.min() > 1e-2 and itc.std() > 1e-2  # the outputs depend on the inputs
    with torch.no_grad():  # the vision towers themselves
        assert torch.allclose(ours.encode_image(pixels), hf.vision_model(pixel_values=pixels).last_hidden_state,
                              atol=ATOL)


def test_captioner_export_matches_transformers_generate(exported, ours):
    pixels = ours.preprocess(_images())
    mine = ours.generate(pixels, max_length=MAX_NEW, min_length=5, strip_prompt=True)
    theirs = _hf_captions(exported["captioner"], pixels, ours.config.prompt)
    assert mine == theirs
    assert len(set(mine)) > 1 and all(len(c.split()) >= 2 for c in mine)


# --------------------------------------------------------------------------- round trip
def test_filter_round_trip(exported, ours):
    back = import_hf(exported["filter"]).eval()
    assert back.config.vision == "vit_base_patch16_224" and back.config.vision_kwargs["depth"] == 4
    assert (back.config.dec_token_id, back.config.enc_token_id) == (ours.config.dec_token_id, ours.config.enc_token_id)
    assert back.config.image_mean == ours.config.image_mean and back.config.image_size == 48
    pixels = ours.preprocess(_images())
    a_itm, a_itc = _itm_itc(ours, pixels, CAPS[:4])
    b_itm, b_itc = _itm_itc(back, pixels, CAPS[:4])
    assert torch.allclose(a_itm, b_itm, atol=ATOL) and torch.allclose(a_itc, b_itc, atol=ATOL)
    # momentum encoders start equal to the online ones
    assert torch.equal(back.vision_proj_m.weight, back.vision_proj.weight)


def test_captioner_round_trip_and_warning(exported, ours, caplog):
    with caplog.at_level(logging.WARNING, logger="vlp_core.models.hf"):
        back = import_hf(exported["captioner"]).eval()
    assert "itm_head" in caplog.text and "freshly initialised" in caplog.text
    pixels = ours.preprocess(_images())
    kw = dict(max_length=MAX_NEW, min_length=5, strip_prompt=True)
    assert back.generate(pixels, **kw) == ours.generate(pixels, **kw)
    # the encoder's self-attention starts as the decoder's; the shared parts are shared
    enc0, dec0 = back.text_encoder.encoder.layer[0], back.text_decoder.bert.encoder.layer[0]
    assert torch.equal(enc0.attention.self.query.weight, dec0.attention.self.query.weight)
    assert enc0.crossattention is dec0.crossattention


def test_import_of_a_transformers_made_folder_is_exact(tok, tmp_path):
    """Not an export: a folder saved by transformers (vision eps 1e-5, HF's [CLS]-first ITM)."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    d = make_hf_blip(tmp_path / "blip-itm", "BlipForImageTextRetrieval", tok, seed=3)
    hf = BlipForImageTextRetrieval.from_pretrained(str(d))
    _perturb(hf, 3)
    hf.save_pretrained(str(d))
    hf.eval()
    model = import_hf(d).eval()
    assert model.config.vision == "vit_base_patch16_clip_224"  # timm LayerNorm eps 1e-5, as the folder's
    enc = AutoTokenizer.from_pretrained(str(d))(CAPS[:4], padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pixels = model.preprocess(_images())
    with torch.no_grad():
        emb = model.encode_image(pixels)
        itm = model.itm_logits_ids(emb, ids, mask).softmax(-1)[:, 1]
        itc = model.image_feat(emb) @ model.text_feat_ids(ids, mask).T
        assert torch.allclose(emb, hf.vision_model(pixel_values=pixels).last_hidden_state, atol=ATOL)
    h_itm, h_itc = _hf_itm_itc(hf, ids, mask, ids, mask, pixels)
    assert torch.allclose(itm, h_itm, atol=ATOL) and torch.allclose(itc, h_itc, atol=ATOL)


# --------------------------------------------------------------------------- folder settings
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def _processor_only_folder(tok, d, resample: int = 3):
    """A transformers-made BlipForImageTextRetrieval folder whose image settings are only in
    processor_config.json, as transformers 5's BlipProcessor.save_pretrained writes them."""
    from transformers import BlipImageProcessor, BlipProcessor

    make_hf_blip(d, "BlipForImageTextRetrieval", tok, seed=4)
    (d / "preprocessor_config.json").unlink()
    images = BlipImageProcessor(size={"height": 48, "width": 48}, image_mean=list(MEAN), image_std=list(STD),
                                resample=resample)
    BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(d))
    assert (d / "processor_config.json").is_file() and not (d / "preprocessor_config.json").exists()
    return d


def test_processor_config_json_gives_the_image_settings(tok, tmp_path, caplog):
    from transformers import BlipProcessor

    from vlp_core.capfilt.backend import ImageSpec, load_backend
    from vlp_core.models.hf import CLIP_MEAN, CLIP_STD

    d = _processor_only_folder(tok, tmp_path / "blip-itm")
    with caplog.at_level(logging.WARNING):
        model = import_hf(d)
        backend = load_backend(d, "filter", cache=False)
    assert (model.config.image_size, model.config.image_mean, model.config.image_std) == (48, MEAN, STD)
    assert backend.spec == ImageSpec(48, MEAN, STD)
    assert "CLIP" not in caplog.text and "resample" not in caplog.text
    # the mean and std transformers itself uses for this folder
    proc = BlipProcessor.from_pretrained(str(d)).image_processor
    assert (tuple(proc.image_mean), tuple(proc.image_std)) == (MEAN, STD)
    imgs = _images(2)
    theirs = proc(images=list(imgs), return_tensors="pt")["pixel_values"]
    assert (theirs - model.preprocess(imgs)).abs().max() < ATOL
    assert (theirs - backend.preprocess(imgs)).abs().max() < ATOL

    # neither file: CLIP's values, and one warning line that says so
    (d / "processor_config.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlp_core.models.hf"):
        model = import_hf(d)
    lines = [r.getMessage() for r in caplog.records if "image_mean" in r.getMessage()]
    assert len(lines) == 1
    assert "no image_mean/image_std in preprocessor_config.json or processor_config.json" in lines[0]
    assert "CLIP" in lines[0] and (model.config.image_mean, model.config.image_std) == (CLIP_MEAN, CLIP_STD)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlp_core.models.hf"):
        assert load_backend(d, "filter", cache=False).spec == ImageSpec(48, CLIP_MEAN, CLIP_STD)
    assert sum("no image_mean/image_std" in r.getMessage() for r in caplog.records) == 1


def test_processor_resize_settings_are_read(tok, tmp_path, caplog):
    """A processor that resizes otherwise than the pipeline (bilinear here) is named in a warning."""
    from vlp_core.models.hf import read_image_settings

    d = _processor_only_folder(tok, tmp_path / "blip-itm", resample=2)
    st = read_image_settings(d)
    assert st["resample"] == (2, d / "processor_config.json") and st["size"][0] == {"height": 48, "width": 48}
    with caplog.at_level(logging.WARNING, logger="vlp_core.models.hf"):
        import_hf(d)
    assert "processor_config.json: resample is 2; the pipeline resizes bicubic" in caplog.text


@pytest.mark.parametrize("written, expected", [(0.0, 0.0), (0.2, 0.2), (None, 0.1)])
def test_label_smoothing_survives_import(written, expected, tok, tmp_path):
    """An explicit label_smoothing (0.0 included) is kept by `vlp import`; only a missing key
    takes the default (0.1)."""
    import json

    from vlp_core.cli import main

    d = make_hf_blip(tmp_path / "blip-captioning", "BlipForConditionalGeneration", tok)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["text_config"]["label_smoothing"] == 0.0  # transformers writes its default out
    for where in (cfg, cfg["text_config"]):
        where.pop("label_smoothing", None)
        if written is not None:
            where["label_smoothing"] = written
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["import", "--hf", str(d), "--out", str(tmp_path / "vlp")]) == 0
    assert json.loads((tmp_path / "vlp" / "config.json").read_text())["label_smoothing"] == expected
    model = BlipMED.from_pretrained(tmp_path / "vlp")
    assert model.config.label_smoothing == expected
    assert model.text_decoder.config.label_smoothing == expected  # what the LM loss uses


# --------------------------------------------------------------------------- refusals, CLI
def test_cnn_backbone_refuses_to_export(tok, tmp_path):
    cnn = create_model("tiny", tok)
    for fn in (export_filter, export_captioner):
        with pytest.raises(ModelError, match=r"backbone 'vlp_cnn_tiny'.*not a timm VisionTransformer"):
            fn(cnn, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(ModelError, match="not a Hugging Face BLIP folder"):
        import_hf(tmp_path)


def test_cli_export_and_import(exported, ours, tmp_path, capsys):
    from vlp_core.cli import main

    assert main(["export", "--model", str(exported["vlp"]), "--as", "filter", "--out", str(tmp_path / "itm")]) == 0
    assert is_hf_blip_dir(tmp_path / "itm")
    assert main(["import", "--hf", str(tmp_path / "itm"), "--out", str(tmp_path / "vlp")]) == 0
    assert "BlipForImageTextRetrieval" in capsys.readouterr().out
    back = BlipMED.from_pretrained(tmp_path / "vlp").eval()
    pixels = ours.preprocess(_images(2))
    assert torch.allclose(_itm_itc(back, pixels, CAPS[:2])[0], _itm_itc(ours, pixels, CAPS[:2])[0], atol=ATOL)


# --------------------------------------------------------------------------- training from HF
def _tiny_world_list(root, n: int = 16):
    """A synthetic-world URL list (``url_path, caption``) over ``n`` JPEGs in ``root/www``."""
    from PIL import Image

    (root / "www").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "www" / f"{i:03d}.jpg")
        rows.append((f"/{i:03d}.jpg", CAPS[i % len(CAPS)]))
    table = pa.table({"url_path": [r[0] for r in rows], "caption": [r[1] for r in rows]})
    pq.write_table(table, root / "pairs.parquet")
    return root / "pairs.parquet"


def test_finetune_starts_from_an_hf_folder(exported, tmp_path, monkeypatch):
    from vlp_core.train.loop import run_finetune

    monkeypatch.setenv("TORCH_NUM_THREADS", "1")  # the loop's thread count (see _one_thread)

    pairs = _tiny_world_list(tmp_path / "world")
    params = Params().replace(**{"finetune.captioner.steps": 2, "finetune.captioner.batch_size": 8,
                                 "finetune.captioner.warmup_steps": 1, "finetune.captioner.log_every": 1,
                                 "finetune.captioner.checkpoint_every": 100})
    stats = run_finetune(params, "captioner", [(pairs, "human")], exported["captioner"], tmp_path / "ft")
    assert stats.extra["steps"] == 2 and stats.counts["used"] == 16
    rows = list(csv.DictReader((tmp_path / "ft" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["lm"])) and float(r["lm"]) > 0
                                                         for r in rows)
    tuned = BlipMED.from_pretrained(tmp_path / "ft" / "model")
    assert tuned.config.arch == "hf:blip-captioning"  # built by import_hf
    start = import_hf(exported["captioner"])
    assert not torch.equal(tuned.text_decoder.cls.predictions.transform.dense.weight,
                           start.text_decoder.cls.predictions.transform.dense.weight)
