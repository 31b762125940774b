"""Pair sources, one-pass image decoding, batch order and the LR schedule (vlp_core.train)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlp_core.schema import CORPUS_SCHEMA, SchemaError, conform
from vlp_core.train.data import (DataError, PairDataset, decode_pairs, epoch_batches, get_batch, load_pairs,
                                 parse_source)
from vlp_core.train.schedule import lr_at, make_scheduler


def test_parse_source():
    assert parse_source("data/corpus:human") == ("data/corpus", "human")
    assert parse_source("data/manifest.parquet") == ("data/manifest.parquet", "web")
    assert parse_source("C:/x/odd:name") == ("C:/x/odd:name", "web")  # suffix not a source name


def test_world_list_counts_failures_and_empty_texts(tiny_world):
    table = load_pairs([(tiny_world / "web.parquet", "web"), (tiny_world / "human.parquet", "human")])
    assert table.column_names == ["key", "shard", "text", "source", "url", "regions"]
    assert table.num_rows == 400
    assert table["source"].to_pylist().count("human") == 100
    data = decode_pairs(table, 48)
    gt = pq.read_table(tiny_world / "ground_truth.parquet").to_pandas()
    web = gt[gt.split == "web"]
    n_fail = int(web.fail_kind.notna().sum())
    n_empty_ok = int(((web.caption.str.strip() == "") & web.fail_kind.isna()).sum())
    assert n_fail > 0 and n_empty_ok > 0
    assert data.rows_in == 400
    assert len(data) + data.n_skipped == 400
    assert data.skipped.get("empty_text", 0) >= n_empty_ok
    assert sum(v for k, v in data.skipped.items() if k != "empty_text") <= n_fail
    assert data.images.shape[1:] == (48, 48, 3) and data.images.dtype == np.uint8
    assert len(data.images) == len(set(data.image_idx.tolist()))  # only used images, each once
    # pixels of a pair are its image file's pixels
    from PIL import Image

    row = int(data.rows[0])
    want = np.asarray(Image.open(table["shard"][row].as_py()).convert("RGB"))
    np.testing.assert_array_equal(data.images[data.image_idx[0]], want)


def _write_manifest(tmp_path, world):
    rows = []
    for i in range(6):
        rows.append({"row_index": i, "url": f"http://127.0.0.1:1/human/{i:06d}.jpg", "caption": f"cap {i}",
                     "status": "success" if i != 3 else "failed_to_download", "reason": None, "key": f"{i:09d}",
                     "shard": str(world / "www" / "human" / f"{i:06d}.jpg") if i != 3 else None,
                     "width": 48, "height": 48, "sha256": None})
    path = tmp_path / "ing" / "manifest.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_manifest_and_corpus_sources(tmp_path, tiny_world):
    manifest = _write_manifest(tmp_path, tiny_world)
    t = load_pairs([(manifest.parent, "human")])  # the ingest folder works too
    assert t.num_rows == 5 and set(t["source"].to_pylist()) == {"human"}
    assert t["text"].to_pylist()[0] == "cap 0"

    corpus = tmp_path / "capfilt" / "corpus"
    corpus.mkdir(parents=True)
    rows = [{"key": f"{i:09d}", "url": f"/human/{i:06d}.jpg", "shard": str(tiny_world / "www" / "human" / f"{i:06d}.jpg"),
             "candidate": c, "text": f"text {i} {c}", "source": "web" if c == 0 else "synthetic", "itc": 0.1,
             "itm": 0.9, "kept": c == 0 or i % 2 == 0, "reason": None, "captioner_id": "a", "filter_id": "b", "round": 0}
            for i in range(4) for c in (0, 1)]
    pq.write_table(conform(pa.Table.from_pylist(rows), CORPUS_SCHEMA), corpus / "00000.parquet")
    t = load_pairs([(corpus.parent, "web")])
    assert t.num_rows == 6  # 4 web + 2 kept synthetic
    assert t["source"].to_pylist().count("synthetic") == 2
    data = decode_pairs(t, 48)
    assert len(data.images) == 4 and len(data) == 6  # each image decoded once


def test_bad_sources_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"status": ["success"], "caption": ["x"]}), bad)
    with pytest.raises(SchemaError, match="bad.parquet.*missing column"):
        load_pairs([(bad, "web")])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"foo": [1]}), other)
    with pytest.raises(DataError, match="other.parquet"):
        load_pairs([(other, "web")])
    with pytest.raises(DataError, match="no such file"):
        load_pairs([(tmp_path / "nope", "web")])


def test_epoch_batches_deterministic_and_disjoint_over_ranks():
    a = epoch_batches(100, 8, epoch=3, seed=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(100, 8, epoch=3, seed=1)]
    assert len(a) == 12 and all(len(x) == 8 for x in a)
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(100, 8, epoch=4, seed=1)]
    r0 = np.concatenate(epoch_batches(100, 8, 0, 0, rank=0, world_size=2))
    r1 = np.concatenate(epoch_batches(100, 8, 0, 0, rank=1, world_size=2))
    assert len(set(r0.tolist()) & set(r1.tolist())) == 0
    with pytest.raises(DataError, match="fewer than one batch"):
        epoch_batches(5, 8, 0, 0)


def test_get_batch_matches_dataset_items(tiny_world):
    data = decode_pairs(load_pairs([(tiny_world / "human.parquet", "human")]), 48)
    ds = PairDataset(data)
    px, texts, idx = get_batch(ds, [3, 1])
    assert px.shape == (2, 48, 48, 3) and px.dtype == torch.uint8
    item = ds[1]
    assert torch.equal(px[1], item[0]) and texts[1] == item[1] and int(idx[1]) == item[2]


def test_schedule_shape():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # warmup starts at lr / warmup
    assert lrs[9] == pytest.approx(1e-3)  # end of warmup = peak
    assert lrs[10] == pytest.approx(1e-3)  # cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert lrs[-1] == pytest.approx(1e-5)  # down to min_lr
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, 100, 10, 1e-3, 1e-5)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lrs)
