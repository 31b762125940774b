"""Which token leads the ITM text input ([ENC] or [CLS]) is one setting, ``itm_first_token`` in
the model's config.json: a tiny BlipForImageTextRetrieval folder written by transformers scores
the same through ``vlp capfilt --filter <HF folder>`` (the HF backend) and through its ``vlp
import``-ed copy (the native MED), for each value; export writes the setting, import copies it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_world import tiny_params
from test_capfilt_hf import make_hf_blip

from vlp_core.capfilt.backend import CapfiltError, load_backend
from vlp_core.capfilt.filter import ItmFilter
from vlp_core.capfilt.judge import judge
from vlp_core.capfilt.stage import CORPUS_DIR, list_capfilt_shards, run_capfilt_shard
from vlp_core.models import BlipMED, ModelError, create_model, load_tokenizer
from vlp_core.models.hf import export_filter, import_hf
from vlp_core.schema import C

TOL = 1e-4  # fp32, CPU
TEXTS = ["a red circle", "a big blue square above a star", "two green triangles", "a small yellow star",
         "one big green circle", "three blue stars"]


def _images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, 48, 48, 3), dtype=np.uint8)


def _set_first_token(folder: Path, value) -> Path:
    """Write (or, for None, remove) ``itm_first_token`` in ``folder/config.json``."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("itm_first_token", None)
    if value is not None:
        cfg["itm_first_token"] = value
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def _itm_folder(tok, out: Path, first) -> Path:
    """A transformers-written tiny BlipForImageTextRetrieval folder (official layout) with
    ``itm_first_token: first`` (None: no such key), its weights perturbed and its ITM head centred
    and widened for that first token, so that the ITM probabilities spread over (0, 1)."""
    from transformers import BlipForImageTextRetrieval

    d = make_hf_blip(out, "BlipForImageTextRetrieval", tok, seed=5)
    hf = BlipForImageTextRetrieval.from_pretrained(str(d)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        enc = tok(TEXTS * 6, padding="longest", return_tensors="pt")
        ids = enc["input_ids"].clone()
        ids[:, 0] = tok.convert_tokens_to_ids("[ENC]") if first in (None, "enc") else tok.cls_token_id
        pixels = (torch.from_numpy(_images()).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        logits = hf(input_ids=ids, attention_mask=enc["attention_mask"], use_itm_head=True,
                    pixel_values=pixels.repeat_interleave(len(TEXTS), 0)).itm_score  # every image x text
        margin = logits[:, 1] - logits[:, 0]
        scale = 2.0 / float(margin.std())
        hf.itm_head.weight.mul_(scale)
        hf.itm_head.bias.mul_(scale)
        hf.itm_head.bias[1] -= float(margin.median()) * scale
    hf.save_pretrained(str(d))
    return _set_first_token(d, first)


@pytest.fixture(scope="module")
def tok(untrained_model):  # noqa: F811
    return load_tokenizer(Path(untrained_model) / "tokenizer")


def _import(hf_dir: Path, out: Path) -> Path:
    from vlp_core.cli import main

    assert main(["import", "--hf", str(hf_dir), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("first", ["enc", "cls"])
def test_hf_folder_and_its_import_score_alike(first, tok, untrained_model, tiny_ingest, tmp_path):  # noqa: F811
    from transformers import BlipForImageTextRetrieval

    hf_dir = _itm_folder(tok, tmp_path / "blip-itm", first)
    vlp_dir = _import(hf_dir, tmp_path / "imported")
    assert json.loads((vlp_dir / "config.json").read_text())["itm_first_token"] == first

    # the filter on its own: ITM and ITC of both paths, and transformers' own forward fed the same ids
    # fp32: exact arithmetic on both paths (bf16 CPUs would autocast by default)
    hf_flt, vlp_flt = ItmFilter(hf_dir, precision="fp32"), ItmFilter(vlp_dir, precision="fp32")
    assert (hf_flt.backend.kind, vlp_flt.backend.kind) == ("hf", "vlp")
    imgs = _images()
    h_itc, h_itm = hf_flt.scores(hf_flt.encode(imgs), TEXTS)
    v_itc, v_itm = vlp_flt.scores(vlp_flt.encode(imgs), TEXTS)
    assert np.abs(h_itm - v_itm).max() <= TOL and np.abs(h_itc - v_itc).max() <= TOL
    assert h_itm.max() - h_itm.min() > 0.05  # the scores depend on the pair (not a constant)
    enc = tok(TEXTS, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    lead = tok.convert_tokens_to_ids("[ENC]") if first == "enc" else tok.cls_token_id
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all()  # what BlipProcessor gives
    ids[:, 0] = lead
    ref = BlipForImageTextRetrieval.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        ref_itm = ref(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=hf_flt.backend.preprocess(imgs),
                      use_itm_head=True).itm_score.softmax(-1)[:, 1].numpy()
    assert np.abs(ref_itm - h_itm).max() <= 1e-5

    # the CapFilt stage (what `vlp capfilt --filter` runs per shard): same scores, same decisions
    params = tiny_params(**{"capfilt.num_captions": 1, "capfilt.decode": "greedy", "capfilt.max_length": 5,
                            "capfilt.min_length": 2, "capfilt.threshold_mode": "fixed", "capfilt.itm_threshold": 0.5,
                            "capfilt.precision": "fp32"})
    shard = list_capfilt_shards(tiny_ingest["web_manifest"])[0]
    tables = {}
    for name, filt in (("hf", hf_dir), ("vlp", vlp_dir)):
        run_capfilt_shard(params, shard, untrained_model, filt, tmp_path / name)
        t = pq.read_table(tmp_path / name / CORPUS_DIR / f"{shard.name}.parquet")
        tables[name] = t.sort_by([(C.KEY, "ascending"), (C.CANDIDATE, "ascending")])
    a, b = tables["hf"], tables["vlp"]
    assert a[C.KEY].to_pylist() == b[C.KEY].to_pylist() and a[C.TEXT].to_pylist() == b[C.TEXT].to_pylist()
    a_itm = np.array(a[C.ITM].to_pylist(), dtype=float)
    b_itm = np.array(b[C.ITM].to_pylist(), dtype=float)
    assert np.array_equal(np.isnan(a_itm), np.isnan(b_itm))
    scored = ~np.isnan(a_itm)
    assert scored.sum() > 0.8 * len(a_itm) and np.abs(a_itm[scored] - b_itm[scored]).max() <= TOL
    assert a[C.KEPT].to_pylist() == b[C.KEPT].to_pylist() and a[C.REASON].to_pylist() == b[C.REASON].to_pylist()
    # and at a threshold inside the scores (between two neighbours, so both sides are populated)
    s = np.sort(a_itm[scored])
    i = int(np.argmax(np.diff(s[len(s) // 4: 3 * len(s) // 4]))) + len(s) // 4
    thr = float((s[i] + s[i + 1]) / 2)
    assert s[i + 1] - s[i] > 2 * TOL
    ka, kb = judge(a, thr)[C.KEPT].to_pylist(), judge(b, thr)[C.KEPT].to_pylist()
    assert ka == kb and 0 < sum(ka) < len(ka)


def test_the_setting_decides_and_defaults_to_enc(tok, tmp_path):
    """Absent = enc; enc and cls give different scores on the same weights (the setting is used)."""
    import shutil

    imgs = _images()
    scores = {}
    src = _itm_folder(tok, tmp_path / "itm", None)
    for first in (None, "enc", "cls"):
        d = _set_first_token(shutil.copytree(src, tmp_path / f"itm-{first}"), first)
        flt = ItmFilter(d)
        scores[first] = flt.scores(flt.encode(imgs), TEXTS)[1]
        model = import_hf(d)
        assert model.config.itm_first_token == (first or "enc")
        assert model.tokenize(TEXTS, "itm")[0][:, 0].unique().tolist() == [model.config.itm_token_id]
    assert np.array_equal(scores[None], scores["enc"])
    assert np.abs(scores["enc"] - scores["cls"]).max() > 1e-2


def test_export_writes_the_setting_and_bad_values_are_refused(tok, tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny-vit", tok, itm_first_token="cls")
    out = export_filter(model, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["itm_first_token"] == "cls"
    back = import_hf(out)
    assert back.config.itm_first_token == "cls" and back.config.itm_token_id == tok.cls_token_id
    vlp_dir = back.save_pretrained(tmp_path / "vlp")
    assert BlipMED.from_pretrained(vlp_dir).config.itm_first_token == "cls"
    # a value that is neither enc nor cls: one-line errors naming the file
    _set_first_token(out, "sep")
    with pytest.raises(ModelError, match=r"exported/config.json: itm_first_token is 'sep'; expected one of enc, cls"):
        import_hf(out)
    with pytest.raises(ModelError, match=r"config.json: itm_first_token is 'sep'"):
        load_backend(out, "filter", cache=False)
    cfg = json.loads((vlp_dir / "config.json").read_text())
    (vlp_dir / "config.json").write_text(json.dumps({**cfg, "itm_first_token": "CLS"}))
    with pytest.raises(ModelError, match=r"vlp/config.json: itm_first_token is 'CLS'"):
        BlipMED.from_pretrained(vlp_dir)


def test_enc_needs_an_enc_token_in_the_hf_tokenizer(tmp_path):
    """A folder whose tokenizer has no [ENC] cannot lead ITM with it: scoring says so (ITC works)."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    plain = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    assert "[ENC]" not in plain.get_vocab()
    d = make_hf_blip(tmp_path / "blip-itm", "BlipForImageTextRetrieval", plain)
    flt = ItmFilter(d, backend=load_backend(d, "filter", cache=False))
    assert flt.text_feat(TEXTS).shape[0] == len(TEXTS)  # ITC (the features stage) does not need it
    with pytest.raises(CapfiltError, match=r"itm_first_token is 'enc' but the tokenizer has no \[ENC\] token"):
        flt.scores(flt.encode(_images()), TEXTS)
    assert load_backend(_set_first_token(d, "cls"), "filter", cache=False).itm_token_id == plain.cls_token_id
