"""vlp_core.images (decode, preprocess, embed: once for models, CapFilt and features) and
CapFilt's ITC sidecar (vlp_core.corpus)."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlp_core.corpus import META_MODEL_ID, ItcSidecarWriter, read_itc_sidecar
from vlp_core.images import CLIP_MEAN, CLIP_STD, ImageSpec, decode_image, embed_images, hf_image_spec
from vlp_core.schema import C, itc_sidecar_schema


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3 if mode == "RGB" else 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def test_decode_image_resizes_to_rgb_uint8_and_raises_on_corrupt_bytes():
    out = decode_image(_png(30, 20, "RGBA"), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert decode_image(_png(30, 20), None).shape == (20, 30, 3)
    with pytest.raises(Exception):
        decode_image(_png(30, 20)[:40], 16)


def test_preprocess_normalises_and_resizes_where_the_images_are():
    spec = ImageSpec(8, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    px = np.full((2, 8, 8, 3), 255, np.uint8)
    x = spec.preprocess(px)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(1.0)) and torch.allclose(x[:, 1], torch.tensor(3.0))
    assert torch.allclose(x[:, 2], torch.tensor(1.0))
    assert spec.preprocess(px[0]).shape == (1, 3, 8, 8)  # one image gets a batch axis
    assert spec.preprocess(np.zeros((1, 5, 7, 3), np.uint8)).shape == (1, 3, 8, 8)  # bicubic to the size


def test_the_med_model_preprocesses_with_its_image_spec(tmp_path):
    from vlp_core.models import create_model

    model = create_model("tiny")
    spec = model.image_spec
    assert spec == ImageSpec(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    px = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    assert torch.equal(model.preprocess(px), spec.preprocess(px))


def test_hf_image_spec_reads_mean_and_std_and_keeps_the_vision_size(tmp_path, caplog):
    assert hf_image_spec(tmp_path, 384) == ImageSpec(384, CLIP_MEAN, CLIP_STD)  # no preprocessor_config.json
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    with caplog.at_level(logging.WARNING, logger="vlp_core.images"):
        spec = hf_image_spec(tmp_path, 384)
    assert spec == ImageSpec(384, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert "differs from the vision model's 384" in caplog.text


def test_embed_images_is_preprocess_then_encode_without_gradients():
    class Enc(torch.nn.Module):
        device = torch.device("cpu")
        spec = ImageSpec(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def preprocess(self, images):
            return self.spec.preprocess(images, self.device)

        def encode_image(self, px):
            return self.lin(px.flatten(2).transpose(1, 2))  # (B, 16, 2)

    enc = Enc()
    px = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    out = embed_images(enc, px, "fp32")
    assert out.shape == (2, 16, 2) and not out.requires_grad
    assert torch.equal(out, enc.encode_image(enc.preprocess(px)).detach())


def _rows(keys, cands):
    return pa.table({C.KEY: keys, C.SHARD: ["s.tar"] * len(keys), C.CANDIDATE: pa.array(cands, pa.int16())})


def test_itc_sidecar_writes_pending_batches_and_is_read_back_only_for_its_corpus(tmp_path):
    path = tmp_path / "feats" / "00000.parquet"
    dim = 4
    with ItcSidecarWriter(path, "m1") as w:
        # a first batch whose images all failed: no dimension yet, stored as nulls once known
        w.write(_rows(["a", "a"], [0, 1]), ["sha_a", "sha_a"], None, np.zeros(2, bool), None, np.zeros(2, bool))
        img = np.arange(8, dtype=np.float32).reshape(2, dim)
        w.write(_rows(["b", "b"], [0, 1]), ["sha_b", "sha_b"], img, np.ones(2, bool), img + 1,
                np.array([True, False]))
        # a later batch whose images all failed: written at once, as nulls
        w.write(_rows(["c"], [0]), [None], None, np.zeros(1, bool), None, np.zeros(1, bool))
    corpus = _rows(["a", "a", "b", "b", "c"], [0, 1, 0, 1, 0])
    t = read_itc_sidecar(path, corpus, "m1")
    assert t is not None and t.schema.remove_metadata() == itc_sidecar_schema(dim)
    assert t[C.SHA256].to_pylist() == ["sha_a", "sha_a", "sha_b", "sha_b", None]
    assert t[C.IMAGE_EMB].to_pylist()[4] is None and t[C.TEXT_EMB].to_pylist()[4] is None
    assert t[C.IMAGE_EMB].to_pylist()[:2] == [None, None] and t[C.IMAGE_EMB][3].as_py() == [4.0, 5.0, 6.0, 7.0]
    assert t[C.TEXT_EMB].to_pylist()[3] is None and t[C.TEXT_EMB][2].as_py() == [1.0, 2.0, 3.0, 4.0]
    assert pq.read_schema(path).metadata[META_MODEL_ID] == b"m1"
    assert read_itc_sidecar(path, corpus, "other-model") is None  # another filter's projections
    assert read_itc_sidecar(path, corpus.slice(0, 3), "m1") is None  # another corpus
    assert read_itc_sidecar(tmp_path / "missing.parquet", corpus, "m1") is None


def test_itc_sidecar_leaves_no_file_without_embeddings_or_after_an_error(tmp_path):
    with ItcSidecarWriter(tmp_path / "none.parquet", "m") as w:
        w.write(_rows(["a"], [0]), [None], None, np.zeros(1, bool), None, np.zeros(1, bool))
    with pytest.raises(RuntimeError):
        with ItcSidecarWriter(tmp_path / "err.parquet", "m") as w:
            e = np.zeros((1, 2), np.float32)
            w.write(_rows(["a"], [0]), ["x"], e, np.ones(1, bool), e, np.ones(1, bool))
            raise RuntimeError("the shard failed")
    assert list(tmp_path.iterdir()) == []
