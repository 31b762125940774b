"""CapFilt on the tiny ingested world: counts, one image pass, thresholds, rethreshold, resume,
corrupt inputs, the CLI."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fixtures_world import tiny_params

from vlp_core.capfilt.backend import ImagePass, load_backend
from vlp_core.capfilt.captioner import Captioner
from vlp_core.capfilt.filter import ItmFilter
from vlp_core.capfilt.rethreshold import rethreshold
from vlp_core.capfilt.stage import (CORPUS_DIR, list_capfilt_shards, read_manifest, run_capfilt,
                                    run_capfilt_shard)
from vlp_core.io import read_json
from vlp_core.schema import CORPUS_SCHEMA, C

K = 2
CHEAP = {"capfilt.num_captions": K, "capfilt.max_length": 8, "capfilt.min_length": 2, "capfilt.batch_size": 32,
         "capfilt.threshold_mode": "fixed"}


@pytest.fixture(scope="module")
def params():
    return tiny_params(**CHEAP)


def _corpus(out: Path):
    files = sorted((out / CORPUS_DIR).glob("*.parquet"))
    return pq.read_table(files).sort_by([(C.KEY, "ascending"), (C.CANDIDATE, "ascending")]) if files else None


@pytest.fixture(scope="module")
def full_run(tiny_ingest, untrained_model, params, tmp_path_factory):
    out = tmp_path_factory.mktemp("capfilt")
    stats = run_capfilt(params.replace(**{"capfilt.itm_threshold": 0.5}), tiny_ingest["web_manifest"],
                        untrained_model, untrained_model, out)
    return out, stats


def test_counts_invariant_and_schema(full_run, tiny_ingest):
    out, stats = full_run
    manifest = read_manifest(tiny_ingest["web_manifest"])
    n_ok = int(pc.sum(pc.equal(manifest[C.STATUS], "success")).as_py())
    corpus = _corpus(out)
    assert corpus.schema.equals(CORPUS_SCHEMA)
    # candidates in == rows out; every manifest row accounted for
    assert stats.rows_in == stats.rows_out == corpus.num_rows == n_ok * (1 + K)
    skipped = sum(v for k, v in stats.counts.items() if k.startswith("skipped:"))
    assert stats.extra["images"] + skipped == manifest.num_rows == 300
    assert skipped > 0  # the world has failing URLs
    # every image: candidate 0 = web, 1..K synthetic; one (key, candidate) each
    by_key = corpus.group_by(C.KEY).aggregate([(C.CANDIDATE, "count"), (C.CANDIDATE, "sum")])
    assert set(by_key["candidate_count"].to_pylist()) == {1 + K}
    assert set(by_key["candidate_sum"].to_pylist()) == {sum(range(1 + K))}
    src = dict(zip(corpus[C.CANDIDATE].to_pylist(), corpus[C.SOURCE].to_pylist()))
    assert src[0] == "web" and src[1] == "synthetic"
    # kept <=> itm above threshold (for scored rows); rejects have reasons
    kept = np.array(corpus[C.KEPT].to_pylist())
    itm = np.array([np.nan if v is None else v for v in corpus[C.ITM].to_pylist()])
    reasons = corpus[C.REASON].to_pylist()
    assert np.all(kept == (itm > 0.5))
    assert all((r is None) == k for r, k in zip(reasons, kept))
    assert {r.split(":")[0] for r in reasons if r} <= {"itm_below_threshold", "empty_text", "image_decode_error"}
    # empty web captions (a noise kind) are kept as rows with a reason, never scored
    empty = [i for i, (t, c) in enumerate(zip(corpus[C.TEXT].to_pylist(), corpus[C.CANDIDATE].to_pylist()))
             if c == 0 and not (t or "").strip()]
    assert empty and all(reasons[i] == "empty_text" and np.isnan(itm[i]) for i in empty)
    # ids and round
    assert len(set(corpus[C.CAPTIONER_ID].to_pylist())) == 1 and len(corpus[C.FILTER_ID][0].as_py()) == 12
    assert set(corpus[C.ROUND].to_pylist()) == {0}
    assert read_json(out / "threshold.json")["itm_threshold"] == 0.5
    # synthetic captions are real strings without the prompt
    syn = [t for t, c in zip(corpus[C.TEXT].to_pylist(), corpus[C.CANDIDATE].to_pylist()) if c > 0]
    assert all(isinstance(t, str) for t in syn) and not any(t.startswith("a picture of") for t in syn)


def test_one_vision_pass_when_captioner_and_filter_share_the_encoder(full_run, untrained_model, tmp_path):
    out, stats = full_run
    shards = read_json(out / CORPUS_DIR / "00000_stats.json")
    assert shards["vision_encoders"] == 1
    # a different filter whose vision encoder is the same frozen weights still shares the pass
    import torch

    from vlp_core.models import BlipMED

    m = BlipMED.from_pretrained(untrained_model)
    with torch.no_grad():
        m.itm_head.weight.add_(0.1)
    other = m.save_pretrained(tmp_path / "other")
    a, b = load_backend(untrained_model, "captioner"), load_backend(other, "filter")
    assert a.model_id != b.model_id and a.vision_key == b.vision_key
    with torch.no_grad():
        m.visual_encoder.blocks[0].attn.qkv.weight.add_(0.1) if hasattr(m.visual_encoder, "blocks") else \
            next(m.visual_encoder.parameters()).add_(0.1)
    third = load_backend(m.save_pretrained(tmp_path / "third"), "filter")
    assert third.vision_key != a.vision_key
    assert ImagePass([a, b]).n_encoders == 1 and ImagePass([a, third]).n_encoders == 2


def test_captioner_and_filter_interfaces(untrained_model, tiny_ingest):
    from vlp_core.config import CapfiltParams

    imgs = np.random.default_rng(0).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    for decode in ("nucleus", "beam", "greedy"):
        k = 1 if decode == "greedy" else 2
        cap = Captioner(untrained_model, CapfiltParams(decode=decode, num_captions=k, max_length=6, min_length=6))
        caps = cap.caption(imgs)
        assert len(caps) == 3 and all(len(c) == k for c in caps)
        assert all(len(c.split()) >= 1 for cs in caps for c in cs)
    flt = ItmFilter(untrained_model)
    emb = flt.encode(imgs)
    itc, itm = flt.scores(emb, ["a red circle", "", "a blue square left of a star"])
    assert itc.shape == itm.shape == (3,) and np.all((itm >= 0) & (itm <= 1)) and np.all(np.abs(itc) <= 1 + 1e-5)
    # the pairing by image_index equals scoring repeated images
    itc2, itm2 = flt.scores(emb, ["x", "a red circle"], image_index=[2, 0])
    assert abs(itm2[1] - itm[0]) < 1e-5
    # the pre-screen skips the ITM pass below its ITC bound
    _, itm3 = flt.scores(emb, ["a", "b", "c"], itc_prescreen=2.0)
    assert np.isnan(itm3).all()


def test_fast_text_path_matches_the_model(untrained_model):
    """The SDPA / shared-cross-K/V path equals BlipMED's own forward and generate."""
    import torch

    from vlp_core.config import CapfiltParams

    flt = ItmFilter(untrained_model, precision="fp32")  # exact equality needs fp32 on a bf16 CPU too
    model = flt.backend.model
    imgs = np.random.default_rng(1).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    emb = flt.encode(imgs)
    texts = ["a red circle left of a star", "a big blue square", "x y z", "a tiny green plus above a box"]
    index = [0, 2, 1, 2]
    itc, itm = flt.scores(emb, texts, image_index=index)
    with torch.no_grad():
        ref_itm = model.itm_probs(emb[index], texts).numpy()
        ref_itc = (model.image_feat(emb[index]) * model.text_feat(texts)).sum(-1).numpy()
        ref_caps = model.generate(image_embeds=emb, sample=False, max_length=8, min_length=3, strip_prompt=True)
    assert np.allclose(itm, ref_itm, atol=1e-5) and np.allclose(itc, ref_itc, atol=1e-5)
    caps = Captioner(untrained_model, CapfiltParams(decode="greedy", max_length=8, min_length=3,
                                                    precision="fp32")).caption(emb)
    assert [c[0] for c in caps] == ref_caps


def test_precision_bf16_scores_near_fp32_and_is_part_of_the_fingerprint(untrained_model, tiny_ingest, params,
                                                                          full_run, tmp_path):
    """capfilt.precision: forced bf16 runs on a CPU and moves scores a little; the resolved
    arithmetic is in the shard fingerprint and stats, so changing it redoes the shards."""
    import torch

    from vlp_core.config import CapfiltParams
    from vlp_core.precision import PrecisionError, resolved

    imgs = np.random.default_rng(2).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    texts = ["a red circle left of a star", "a big blue square", "a tiny green plus above a box"]
    out = {}
    for prec in ("fp32", "bf16"):
        flt = ItmFilter(untrained_model, precision=prec)
        emb = flt.encode(imgs)
        assert emb.dtype == (torch.bfloat16 if prec == "bf16" else torch.float32)
        itc, itm = flt.scores(emb, texts)
        assert itc.dtype == itm.dtype == np.float32
        caps = Captioner(untrained_model, CapfiltParams(decode="greedy", max_length=6, min_length=2,
                                                        precision=prec)).caption(imgs)
        assert len(caps) == 3 and all(isinstance(c[0], str) and c[0] for c in caps)
        out[prec] = (itc, itm)
    assert np.abs(out["bf16"][1] - out["fp32"][1]).max() < 0.05  # ITM probabilities
    assert np.abs(out["bf16"][0] - out["fp32"][0]).max() < 0.05  # ITC cosines
    with pytest.raises(PrecisionError, match="fp16"):
        ItmFilter(untrained_model, precision="fp16").encode(imgs)

    done, stats = full_run
    auto = resolved("auto", "cpu")
    assert stats.extra["autocast"] == auto
    assert read_json(done / CORPUS_DIR / "00000_stats.json")["fingerprint"]["autocast"] == auto
    other = "fp32" if auto == "bf16" else "bf16"
    copy = tmp_path / "copy"
    shutil.copytree(done, copy)
    p = params.replace(**{"capfilt.itm_threshold": 0.5})
    assert run_capfilt(p, tiny_ingest["web_manifest"], untrained_model, untrained_model, copy).shards_done == 0
    redo = run_capfilt(p.replace(**{"capfilt.precision": other}), tiny_ingest["web_manifest"], untrained_model,
                       untrained_model, copy)
    assert redo.shards_skipped == 0 and redo.shards_done == stats.shards_done + stats.shards_skipped
    assert redo.extra["autocast"] == other and redo.rows_out == stats.rows_out


def test_calibrated_threshold_and_rethreshold_equals_recompute(tiny_ingest, untrained_model, params, full_run,
                                                               tmp_path):
    out_a, _ = full_run
    cal = params.replace(**{"capfilt.threshold_mode": "calibrated", "capfilt.calibrate_percentile": 30.0})
    out_c = tmp_path / "cal"
    stats = run_capfilt(cal, tiny_ingest["web_manifest"], untrained_model, untrained_model, out_c,
                        calibration=tiny_ingest["human_manifest"])
    rec = read_json(out_c / "threshold.json")
    scores = pq.read_table(out_c / "calibration.parquet")[C.ITM].to_numpy()
    assert rec["mode"] == "calibrated" and rec["n_calibration"] == len(scores) > 50
    assert rec["itm_threshold"] == pytest.approx(np.percentile(scores, 30.0))
    assert (scores > rec["itm_threshold"]).mean() == pytest.approx(0.7, abs=0.05)
    assert stats.extra["itm_threshold"] == rec["itm_threshold"]

    # rethreshold the fixed-0.5 corpus at the calibrated threshold: same rows as the calibrated run
    re_out = tmp_path / "re"
    rstats = rethreshold(out_a, re_out, itm_threshold=rec["itm_threshold"])
    a, b = _corpus(re_out), _corpus(out_c)
    assert rstats.rows_in == rstats.rows_out == a.num_rows == b.num_rows
    assert a.schema.equals(CORPUS_SCHEMA)
    for col in (C.KEY, C.CANDIDATE, C.TEXT, C.KEPT, C.REASON, C.ITM, C.ITC, C.SOURCE):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    assert read_json(re_out / "threshold.json")["itm_threshold"] == rec["itm_threshold"]
    # by percentile of the stored calibration scores: the same again, no model pass
    re2 = tmp_path / "re2"
    rethreshold(out_c, re2, percentile=30.0)
    assert _corpus(re2)[C.KEPT].to_pylist() == b[C.KEPT].to_pylist()


def test_keep_top_keeps_the_highest_itm_synthetic_caption_and_rethreshold_agrees(tiny_ingest, untrained_model,
                                                                                  params, full_run, tmp_path):
    out_a, _ = full_run
    a = _corpus(out_a)
    syn_itm = np.array([x for x, s in zip(a[C.ITM].to_pylist(), a[C.SOURCE].to_pylist())
                        if s == "synthetic" and x is not None])
    thr = float(np.percentile(syn_itm, 20))  # most synthetic captions pass: several per image
    p = params.replace(**{"capfilt.itm_threshold": thr, "capfilt.keep_top": 1})
    out = tmp_path / "top1"
    stats = run_capfilt(p, tiny_ingest["web_manifest"], untrained_model, untrained_model, out)
    t = _corpus(out)
    assert stats.rows_in == stats.rows_out == t.num_rows == a.num_rows  # every candidate still has a row
    rows = t.to_pylist()
    by_key: dict = {}
    for r in rows:
        by_key.setdefault(r[C.KEY], []).append(r)
    n_dropped = 0
    for key, rs in by_key.items():
        syn = [r for r in rs if r[C.SOURCE] == "synthetic" and r[C.ITM] is not None and r[C.ITM] > thr]
        kept = [r for r in rs if r[C.SOURCE] == "synthetic" and r[C.KEPT]]
        assert len(kept) == min(1, len(syn)), key
        if syn:
            assert kept[0][C.ITM] == max(r[C.ITM] for r in syn)
        for r in syn:
            if not r[C.KEPT]:
                assert r[C.REASON] == "not_top_itm"
                n_dropped += 1
        web = [r for r in rs if r[C.SOURCE] == "web"]  # web alt-texts are not subject to keep_top
        assert all(r[C.KEPT] == (r[C.ITM] is not None and r[C.ITM] > thr) for r in web)
    assert n_dropped > 0 and stats.counts["reason:not_top_itm"] == n_dropped
    # the same rule without a model pass, from the corpus kept at 0.5 with every caption
    re_out = tmp_path / "re_top1"
    rethreshold(out_a, re_out, itm_threshold=thr, keep_top=1)
    b = _corpus(re_out)
    for col in (C.KEY, C.CANDIDATE, C.TEXT, C.KEPT, C.REASON, C.ITM):
        assert b[col].to_pylist() == t[col].to_pylist(), col
    # and back: rows dropped by keep_top are judged again when it is lifted
    re_all, re_ref = tmp_path / "re_all", tmp_path / "re_ref"
    rethreshold(out, re_all, itm_threshold=thr)
    rethreshold(out_a, re_ref, itm_threshold=thr)
    assert _corpus(re_all)[C.KEPT].to_pylist() == _corpus(re_ref)[C.KEPT].to_pylist()
    with pytest.raises(Exception, match="capfilt.keep_top"):
        rethreshold(out_a, tmp_path / "bad", itm_threshold=thr, keep_top=0)


def test_shards_in_concurrent_threads_equal_a_sequential_run(tiny_ingest, untrained_model, params, full_run,
                                                             tmp_path):
    """Prefect's default runner maps shards onto threads: each shard samples from its own
    random stream, so the corpus does not depend on scheduling."""
    from concurrent.futures import ThreadPoolExecutor

    p = params.replace(**{"capfilt.itm_threshold": 0.5})
    shards = list_capfilt_shards(p, tiny_ingest["web_manifest"])
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda s: run_capfilt_shard(p, s, untrained_model, untrained_model, tmp_path,
                                                            calibration=0.5), shards))
    assert all(not r["skipped"] for r in results)
    a, b = _corpus(tmp_path), _corpus(full_run[0])
    for col in (C.KEY, C.CANDIDATE, C.TEXT, C.KEPT, C.ITM):
        assert a[col].to_pylist() == b[col].to_pylist(), col


def test_prescreen_rows_have_a_reason(tiny_ingest, untrained_model, params, tmp_path):
    p = params.replace(**{"capfilt.itc_prescreen": 0.0, "capfilt.num_captions": 0})
    shard = list_capfilt_shards(tiny_ingest["web_manifest"])[0]
    res = run_capfilt_shard(p, shard, untrained_model, untrained_model, tmp_path)
    t = pq.read_table(tmp_path / CORPUS_DIR / f"{shard.name}.parquet")
    pre = [i for i, r in enumerate(t[C.REASON].to_pylist()) if r == "itc_prescreen"]
    itc = t[C.ITC].to_pylist()
    assert res["rows_out"] == t.num_rows == res["images"]
    assert all(itc[i] < 0.0 and t[C.ITM][i].as_py() is None for i in pre)
    assert all(v >= 0.0 for i, v in enumerate(itc) if v is not None and i not in pre)


def _copy_ingest(src: Path, dst: Path) -> Path:
    """A private copy of the web ingest whose manifest points at the copied shards."""
    import pyarrow as pa

    shutil.copytree(src / "shards", dst / "shards")
    t = pq.read_table(src / "manifest.parquet")
    refs = [None if r is None else str(dst / "shards" / Path(r).name) for r in t[C.SHARD].to_pylist()]
    t = t.set_column(t.schema.get_field_index(C.SHARD), C.SHARD, pa.array(refs, pa.string()))
    pq.write_table(t, dst / "manifest.parquet")
    return dst


def _rewrite_member(tar_path: Path, key: str, data: bytes) -> None:
    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read() if m.isfile() else None))
    with tarfile.open(tar_path, "w") as tar:
        for m, blob in members:
            if m.name == f"{key}.jpg":
                blob = data
                m.size = len(data)
            tar.addfile(m, io.BytesIO(blob) if blob is not None else None)


def test_corrupt_image_and_truncated_shard(tiny_ingest, untrained_model, params, tmp_path):
    ing = _copy_ingest(tiny_ingest["web_dir"], tmp_path / "ing")
    shards = list_capfilt_shards(ing)
    assert len(shards) == 3
    t = read_manifest(ing)
    ok = t.filter(pc.equal(t[C.STATUS], "success"))
    bad_key = [k for k, r in zip(ok[C.KEY].to_pylist(), ok[C.SHARD].to_pylist()) if r == shards[0].shard][3]
    _rewrite_member(Path(shards[0].shard), bad_key, b"\xff\xd8\xff\xe0 not really a jpeg")
    last = Path(shards[2].shard)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated mid-member
    out = tmp_path / "out"
    stats = run_capfilt(params, ing, untrained_model, untrained_model, out)
    assert stats.shards_failed == [shards[2].name]
    assert shards[2].shard in stats.extra["shard_errors"][shards[2].name]
    assert stats.shards_done == 2 and stats.rows_in == stats.rows_out
    corpus = _corpus(out)
    rows = corpus.filter(pc.equal(corpus[C.KEY], bad_key))
    assert rows.num_rows == 1 + K
    assert all(r.startswith("image_decode_error: ") for r in rows[C.REASON].to_pylist())
    assert rows[C.TEXT][0].as_py() == ok.filter(pc.equal(ok[C.KEY], bad_key))[C.CAPTION][0].as_py()
    assert not (out / CORPUS_DIR / f"{shards[2].name}.parquet").exists()
    assert not (out / CORPUS_DIR / f"{shards[2].name}_stats.json").exists()


@pytest.mark.slow
def test_resume_after_kill(tiny_ingest, untrained_model, full_run, tmp_path):
    """A CLI run killed after the first shard's marker; the rerun skips it and completes,
    with no duplicate or missing rows, identical to an uninterrupted run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlp_core.cli", "capfilt", "--manifest", str(tiny_ingest["web_dir"]),
           "--captioner", str(untrained_model), "--filter", str(untrained_model), "--out", str(out),
           "-S", "capfilt.threshold_mode=fixed", "-S", "capfilt.itm_threshold=0.5"]
    cmd += [a for k, v in CHEAP.items() if k != "capfilt.threshold_mode" for a in ("-S", f"{k}={v}")]
    env = {**os.environ, "TORCH_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = out / CORPUS_DIR / "00000_stats.json"
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert marker.exists()
    done_before = sorted(p.name for p in (out / CORPUS_DIR).glob("*_stats.json"))
    assert len(done_before) < 3, "the run finished before it could be killed"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stats = read_json(out / "stats.json")
    assert stats["shards_skipped"] == len(done_before) and stats["shards_done"] == 3 - len(done_before)
    assert not list((out / CORPUS_DIR).glob(".*.tmp"))
    a, b = _corpus(out), _corpus(full_run[0])
    assert a.num_rows == b.num_rows == stats["rows_out"]
    for col in (C.KEY, C.CANDIDATE, C.TEXT, C.ITM, C.KEPT):
        assert a[col].to_pylist() == b[col].to_pylist(), col


def test_cli(tiny_ingest, untrained_model, full_run, tmp_path, capsys):
    from vlp_core.cli import main

    out = tmp_path / "re"
    rc = main(["capfilt", "rethreshold", "--corpus", str(full_run[0]), "--out", str(out),
               "-S", "capfilt.itm_threshold=0.9"])
    assert rc == 0
    t = _corpus(out)
    assert t.num_rows == full_run[1].rows_out
    assert not any(t[C.KEPT].to_pylist()) or min(v for v, k in zip(t[C.ITM].to_pylist(), t[C.KEPT].to_pylist()) if k) > 0.9
    capsys.readouterr()
    rc = main(["capfilt", "--manifest", str(tmp_path / "nope"), "--captioner", str(untrained_model), "--filter",
               str(untrained_model), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err
    rc = main(["capfilt", "--manifest", str(tiny_ingest["web_dir"]), "--captioner", str(tmp_path), "--filter",
               str(untrained_model), "--out", str(tmp_path / "x"), "-S", "capfilt.threshold_mode=calibrated"])
    err = capsys.readouterr().err
    assert rc == 2 and "calibration" in err or "config.json" in err


def test_the_backend_cache_is_bounded_and_keeps_the_most_recent():
    """A long-lived worker going through round after round keeps the models it used last, not
    every round's (the process's model cache has an owner and a bound)."""
    from vlp_core.capfilt.backend import LruCache

    cache, made = LruCache(capacity=2), []

    def maker(k):
        return lambda: made.append(k) or f"model-{k}"

    assert [cache.get(k, maker(k)) for k in ("a", "b", "a", "c", "a", "b")] == [
        "model-a", "model-b", "model-a", "model-c", "model-a", "model-b"]
    assert made == ["a", "b", "c", "b"]  # "a" stayed (used last), "b" was dropped for "c" and loaded again
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_calibration_scores_only_the_pairs_the_filter_held_out(tiny_ingest, untrained_model, params, tmp_path):
    """finetune.filter.holdout: the threshold comes from the human pairs kept out of the filter's
    fine-tune (the same keys vlp_core.holdout picks there), and the calibration's record says so."""
    from vlp_core.holdout import held_out

    cal = params.replace(**{"capfilt.threshold_mode": "calibrated", "finetune.filter.holdout": 0.3})
    out = tmp_path / "held"
    run_capfilt(cal, tiny_ingest["web_manifest"], untrained_model, untrained_model, out,
                calibration=tiny_ingest["human_manifest"])
    m = read_manifest(tiny_ingest["human_manifest"])
    keys = [k for k, s in zip(m[C.KEY].to_pylist(), m[C.STATUS].to_pylist()) if s == "success"]
    want = {k for k, h in zip(keys, held_out(keys, 0.3)) if h}
    got = pq.read_table(out / "calibration.parquet")[C.KEY].to_pylist()
    assert 0 < len(got) < len(keys) and set(got) <= want and len(got) >= 0.9 * len(want)
    rec = read_json(out / "threshold.json")
    assert rec["holdout"] == 0.3 and rec["n_calibration"] == len(got)
