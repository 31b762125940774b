"""The Hugging Face BLIP backends on tiny random local folders in the official layouts
(``blip-image-captioning-*``: BlipForConditionalGeneration; ``blip-itm-*``:
BlipForImageTextRetrieval), checked against transformers' own forward/generate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_world import tiny_params

from vlp_core.capfilt.backend import CapfiltError, load_backend
from vlp_core.capfilt.captioner import Captioner
from vlp_core.capfilt.filter import ItmFilter
from vlp_core.capfilt.stage import CORPUS_DIR, list_capfilt_shards, run_capfilt_shard
from vlp_core.config import CapfiltParams
from vlp_core.io import read_json
from vlp_core.schema import C


def make_hf_blip(out: Path, cls_name: str, tokenizer, seed: int = 0, image_size: int = 48, hidden: int = 64,
                 text_layers: int = 2, vision_layers: int = 2) -> Path:
    """A tiny random HF BLIP folder: weights, config, tokenizer files, preprocessor_config.json."""
    import transformers
    from transformers import BlipConfig, BlipImageProcessor

    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=text_layers, num_attention_heads=2,
                intermediate_size=4 * hidden, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=hidden, num_hidden_layers=vision_layers, num_attention_heads=2, intermediate_size=4 * hidden,
                  image_size=image_size, patch_size=8)
    cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden // 2, image_text_hidden_size=hidden // 2)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hf_dirs(untrained_model, tmp_path_factory):  # noqa: F811
    from vlp_core.models import load_tokenizer

    tok = load_tokenizer(Path(untrained_model) / "tokenizer")
    root = tmp_path_factory.mktemp("hf")
    return (make_hf_blip(root / "blip-image-captioning-tiny", "BlipForConditionalGeneration", tok),
            make_hf_blip(root / "blip-itm-tiny", "BlipForImageTextRetrieval", tok, seed=1))


def _images(n=4):
    return np.random.default_rng(0).integers(0, 255, (n, 48, 48, 3), dtype=np.uint8)


def test_hf_captioner_matches_transformers_generate(hf_dirs):
    from transformers import BlipForConditionalGeneration

    cap_dir, _ = hf_dirs
    p = CapfiltParams(decode="greedy", num_captions=1, max_length=7, min_length=3, precision="fp32")  # exact match
    cap = Captioner(cap_dir, p)
    assert cap.backend.kind == "hf"
    imgs = _images()
    ours = cap.caption(imgs)
    ref = BlipForConditionalGeneration.from_pretrained(str(cap_dir)).eval()
    tok = cap.backend.tokenizer
    pixels = cap.backend.preprocess(imgs)
    prompt = tok([p.prompt] * len(imgs), return_tensors="pt")["input_ids"]
    n_prompt = prompt.shape[1] - 1
    with torch.no_grad():
        out = ref.generate(pixel_values=pixels, input_ids=prompt.clone(), max_length=n_prompt + 7,
                           min_length=n_prompt + 3, do_sample=False, num_beams=1)
    theirs = [c.strip() for c in tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]
    assert [c[0] for c in ours] == theirs
    # nucleus sampling, K per image
    caps = Captioner(cap_dir, CapfiltParams(num_captions=3, max_length=5, min_length=2)).caption(imgs)
    assert len(caps) == 4 and all(len(c) == 3 for c in caps)


def test_hf_filter_matches_transformers_retrieval(hf_dirs):
    from transformers import BlipForImageTextRetrieval

    _, itm_dir = hf_dirs
    flt = ItmFilter(itm_dir, precision="fp32")  # exact match with transformers' fp32 forward
    imgs = _images()
    texts = ["a red circle", "a big blue square above a star", "two green triangles", "x"]
    itc, itm = flt.scores(flt.encode(imgs), texts)
    ref = BlipForImageTextRetrieval.from_pretrained(str(itm_dir)).eval()
    enc = flt.backend.tokenizer(texts, padding="longest", return_tensors="pt")
    pixels = flt.backend.preprocess(imgs)
    itm_ids = enc["input_ids"].clone()  # ITM: [ENC] in place of [CLS] (config.json has no itm_first_token: enc)
    itm_ids[:, 0] = flt.backend.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        ref_itm = ref(input_ids=itm_ids, attention_mask=enc["attention_mask"], pixel_values=pixels,
                      use_itm_head=True).itm_score.softmax(-1)[:, 1].numpy()
        ref_itc = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels,
                      use_itm_head=False).itm_score.diagonal().numpy()
    assert np.allclose(itm, ref_itm, atol=1e-5) and np.allclose(itc, ref_itc, atol=1e-5)


def test_hf_roles_are_checked(hf_dirs):
    cap_dir, itm_dir = hf_dirs
    with pytest.raises(CapfiltError, match="BlipForImageTextRetrieval"):
        load_backend(cap_dir, "filter")
    with pytest.raises(CapfiltError, match="not a model folder|model_type"):
        load_backend(cap_dir.parent, "filter")


def test_capfilt_stage_with_hf_and_mixed_backends(hf_dirs, untrained_model, tiny_ingest, tmp_path):  # noqa: F811
    cap_dir, itm_dir = hf_dirs
    params = tiny_params(**{"capfilt.num_captions": 1, "capfilt.max_length": 5, "capfilt.min_length": 2,
                            "capfilt.threshold_mode": "fixed", "capfilt.itm_threshold": 0.5})
    shard = list_capfilt_shards(tiny_ingest["web_manifest"])[0]
    for name, captioner, filt in [("hf", cap_dir, itm_dir), ("mixed", untrained_model, itm_dir)]:
        res = run_capfilt_shard(params, shard, captioner, filt, tmp_path / name)
        t = pq.read_table(tmp_path / name / CORPUS_DIR / f"{shard.name}.parquet")
        assert res["rows_out"] == t.num_rows == res["rows_in"] == 2 * res["images"]
        assert res["vision_encoders"] == 2  # different vision encoders: one pass each
        scored = [v for v in t[C.ITM].to_pylist() if v is not None]
        assert len(scored) > 0.8 * t.num_rows and all(0 <= v <= 1 for v in scored)
        marker = read_json(tmp_path / name / CORPUS_DIR / f"{shard.name}_stats.json")
        assert marker["fingerprint"]["filter_id"] == load_backend(itm_dir, "filter").model_id
