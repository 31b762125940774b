"""Features: blocked near-duplicate search, embeddings reused from CapFilt or recomputed,
duplicate flags across shards, resume, backbone, CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fixtures_world import tiny_params
from test_capfilt import _copy_ingest, _rewrite_member

from vlp_core.capfilt.stage import FEATS_DIR, list_capfilt_shards, read_manifest, run_capfilt
from vlp_core.features.dedup import exact_duplicates, near_duplicates
from vlp_core.features.stage import EMB_DIR, run_features, to_numpy_list
from vlp_core.schema import C


def test_exact_duplicates_point_to_the_first():
    assert exact_duplicates(["a", "b", "a", None, "b", "a", None]).tolist() == [-1, -1, 0, -1, 1, 0, -1]


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_near_duplicates_blocked_equals_brute_force(block):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 16)).astype(np.float32)
    e[30] = e[4] + 0.01 * rng.normal(size=16)  # a planted near duplicate
    valid = np.ones(50, bool)
    valid[12] = False
    idx, sim = near_duplicates(e, block_size=block, valid=valid)
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = en @ en.T
    for i in range(50):
        cand = [j for j in range(i) if valid[j]]
        if not valid[i] or not cand:
            assert idx[i] == -1 and np.isinf(sim[i])
            continue
        j = max(cand, key=lambda j: (round(float(s[i, j]), 5), -j))  # ties to 5 decimals: the earliest
        assert idx[i] == j and sim[i] == pytest.approx(s[i, j], abs=1e-5)
    assert idx[30] == 4 and sim[30] > 0.99


def test_near_duplicates_name_the_earliest_of_equal_copies_whatever_the_last_bits():
    """Copies of one image whose embeddings differ only in the last bits (another CPU's BLAS)
    all point at the first copy, not at whichever copy the rounding favoured."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=32).astype(np.float32)
    other = rng.normal(size=32).astype(np.float32)
    for trial in range(20):
        e = np.stack([other, base, base, base, other, base]).astype(np.float32)
        e = e + rng.normal(scale=1e-7, size=e.shape).astype(np.float32)  # last-bit noise
        idx, sim = near_duplicates(e, block_size=1 + trial % 4)
        assert idx.tolist()[2:] == [1, 1, 0, 1], trial
        assert np.all(sim[[2, 3, 5]] > 0.99999)


@pytest.fixture(scope="module")
def dup_capfilt(tiny_ingest, untrained_model, tmp_path_factory):  # noqa: F811
    """CapFilt (K=1) over a copy of the web ingest where one image of shard 1 is an exact copy
    of an image of shard 0."""
    root = tmp_path_factory.mktemp("feat")
    ing = _copy_ingest(tiny_ingest["web_dir"], root / "ing")
    shards = list_capfilt_shards(ing)
    t = read_manifest(ing)
    ok = t.filter(pc.equal(t[C.STATUS], "success"))
    by_shard = {s.shard: [k for k, r in zip(ok[C.KEY].to_pylist(), ok[C.SHARD].to_pylist()) if r == s.shard]
                for s in shards}
    a, b = by_shard[shards[0].shard][0], by_shard[shards[1].shard][5]
    import tarfile

    with tarfile.open(shards[0].shard) as tar:
        data = tar.extractfile(f"{a}.jpg").read()
    _rewrite_member(Path(shards[1].shard), b, data)
    # fp32: the test below compares reused and recomputed embeddings exactly (bf16 is checked there too)
    params = tiny_params(**{"capfilt.num_captions": 1, "capfilt.max_length": 6, "capfilt.min_length": 2,
                            "capfilt.threshold_mode": "fixed", "capfilt.batch_size": 64, "capfilt.precision": "fp32"})
    out = root / "capfilt"
    run_capfilt(params, ing, untrained_model, untrained_model, out)
    return params, out, a, b


def _table(out: Path):
    return pq.read_table(sorted((out / EMB_DIR).glob("*.parquet")))


def test_features_reuse_capfilt_pass_and_flag_duplicates(dup_capfilt, untrained_model, tmp_path):  # noqa: F811
    params, capfilt_out, a, b = dup_capfilt
    corpus = pq.read_table(sorted((capfilt_out / "corpus").glob("*.parquet")))
    out = tmp_path / "features"
    stats = run_features(params, capfilt_out, untrained_model, out)
    t = _table(out)
    assert stats.rows_in == stats.rows_out == t.num_rows == corpus.num_rows  # rows never dropped
    assert stats.counts["reused_capfilt_embeddings"] == corpus.num_rows  # no second image pass
    assert t[C.KEY].to_pylist() == corpus[C.KEY].to_pylist()
    assert t[C.KEPT].to_pylist() == corpus[C.KEPT].to_pylist()
    dim = t.schema.field(C.IMAGE_EMB).type.list_size
    assert dim == 128 and t.schema.field(C.TEXT_EMB).type == pa.list_(pa.float32(), 128)
    img, img_ok = to_numpy_list(t[C.IMAGE_EMB], dim)
    txt, txt_ok = to_numpy_list(t[C.TEXT_EMB], dim)
    assert np.allclose(np.linalg.norm(img[img_ok], axis=1), 1, atol=1e-4)
    empty = np.array([not (x or "").strip() for x in corpus[C.TEXT].to_pylist()])
    assert empty.any() and not txt_ok[empty].any() and txt_ok[~empty & img_ok].all()
    # the planted copy: exact (and near) duplicate of the first one, which is not flagged
    keys = t[C.KEY].to_pylist()
    rb = [i for i, k in enumerate(keys) if k == b]
    ra = [i for i, k in enumerate(keys) if k == a]
    assert all(t[C.EXACT_DUP][i].as_py() and t[C.NEAR_DUP][i].as_py() and t[C.DUP_OF][i].as_py() == a for i in rb)
    assert not any(t[C.EXACT_DUP][i].as_py() for i in ra)
    assert stats.counts["exact_dup_images"] >= 1
    # near-dup flags agree with a brute-force pass over the stored embeddings
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    rows = sorted(first.values())
    e = img[rows]
    s = e @ e.T
    thr = params.features.near_dup_threshold
    brute = [bool(img_ok[r] and any(img_ok[rows[j]] and s[n, j] > thr for j in range(n))) for n, r in enumerate(rows)]
    assert [t[C.NEAR_DUP][r].as_py() for r in rows] == brute
    # recomputing from the images (no CapFilt sidecar) gives the same embeddings and flags
    bare = tmp_path / "bare"
    shutil.copytree(capfilt_out / "corpus", bare / "corpus")
    stats2 = run_features(params, bare, untrained_model, tmp_path / "features2")
    t2 = _table(tmp_path / "features2")
    assert "reused_capfilt_embeddings" not in stats2.counts
    img2, ok2 = to_numpy_list(t2[C.IMAGE_EMB], dim)
    txt2, _ = to_numpy_list(t2[C.TEXT_EMB], dim)
    assert (ok2 == img_ok).all() and np.allclose(img2, img, atol=1e-5) and np.allclose(txt2, txt, atol=1e-5)
    for col in (C.EXACT_DUP, C.NEAR_DUP, C.DUP_OF, C.SHA256):
        assert t2[col].to_pylist() == t[col].to_pylist(), col
    # resume: every shard is skipped, the output is unchanged
    stats3 = run_features(params, capfilt_out, untrained_model, out)
    assert stats3.shards_skipped == 3 and stats3.shards_done == 0
    assert _table(out)[C.NEAR_DUP].to_pylist() == t[C.NEAR_DUP].to_pylist()
    # another arithmetic (capfilt.precision): CapFilt's embeddings are not reused, every shard is redone
    assert stats.extra["autocast"] == "fp32"
    stats4 = run_features(params.replace(**{"capfilt.precision": "bf16"}), capfilt_out, untrained_model, out)
    assert stats4.shards_done == 3 and "reused_capfilt_embeddings" not in stats4.counts
    assert stats4.extra["autocast"] == "bf16" and stats4.rows_out == corpus.num_rows
    t4 = _table(out)
    assert pq.read_schema(sorted((out / EMB_DIR).glob("*.parquet"))[0]).metadata[b"vlp.autocast"] == b"bf16"
    img4, ok4 = to_numpy_list(t4[C.IMAGE_EMB], dim)
    assert (ok4 == img_ok).all() and np.allclose(np.linalg.norm(img4[ok4], axis=1), 1, atol=1e-5)  # unit in fp32
    assert np.abs(img4 - img).max() < 0.05 and t4[C.EXACT_DUP].to_pylist() == t[C.EXACT_DUP].to_pylist()


def test_backbone_features_and_cli(dup_capfilt, untrained_model, tmp_path, capsys):  # noqa: F811
    from vlp_core.cli import main

    params, capfilt_out, _, _ = dup_capfilt
    shutil.rmtree(tmp_path, ignore_errors=True)
    rc = main(["features", "--corpus", str(capfilt_out), "--model", str(untrained_model), "--out", str(tmp_path / "f"),
               "-S", "features.backbone=test_resnet", "-S", "features.block_size=64"])
    assert rc == 0
    assert "exact duplicates" in capsys.readouterr().out
    t = _table(tmp_path / "f")
    bdim = t.schema.field(C.BACKBONE_EMB).type.list_size
    bb, ok = to_numpy_list(t[C.BACKBONE_EMB], bdim)
    assert bdim > 0 and ok.sum() > 0 and np.abs(bb[ok]).sum() > 0
    assert not (capfilt_out / FEATS_DIR / "missing").exists()
    rc = main(["features", "--corpus", str(tmp_path / "nothing"), "--model", str(untrained_model), "--out",
               str(tmp_path / "g")])
    assert rc == 2 and "nothing" in capsys.readouterr().err
