"""CapFilt and features give the same rows as the reference in ``tests/data/same_rows/``.

The reference was written by the code as it stood before images were decoded, preprocessed
and embedded in one place (``vlp_core/images.py``, issue 18): this test holds every later
change to that path to the same corpus rows (every column: keys, texts, scores, kept,
reason, ids) and the same features rows (sha256, ITC embeddings, duplicate flags), both when
the features stage reuses CapFilt's ITC projections and when it computes them itself.

Inputs, all seeded and made here: a 24-image synthetic web (a quarter of its URLs broken:
missing, not an image, truncated JPEG), a manifest over its files (the truncated JPEG counts
as downloaded, so one image fails to decode), an untrained ``tiny`` MED with a tokenizer
trained on the web's captions, and CapFilt settings that reach every reason (K=2 nucleus
captions, an ITC pre-screen, a fixed threshold, ``keep_top: 1``).

Comparison: exact for every column that is not a float.  Float columns (ITC, ITM, stored
threshold, embeddings, duplicate cosine) are compared to 1e-6: on one machine the run is
bit-exact (fp32 on the CPU, fixed thread count, the same ops in the same order), but another
CPU's BLAS kernels (another ISA) may round the last bit differently.

Regenerate the reference (only when a change of the rows is intended, and say so in the
commit)::

    PYTHONPATH=$PWD python tests/test_same_rows.py --write
"""
from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).parent / "data" / "same_rows"
TABLES = ("corpus", "features_reused", "features_computed")
N_WEB = 24
WORLD = {"synthetic.n_web": N_WEB, "synthetic.n_human": 0, "synthetic.n_test": 0, "synthetic.objects": 1,
         "synthetic.fail_rate": 0.25, "synthetic.seed": 3}
CAPFILT = {"capfilt.num_captions": 2, "capfilt.decode": "nucleus", "capfilt.max_length": 8,
           "capfilt.min_length": 2, "capfilt.batch_size": 5, "capfilt.threshold_mode": "fixed",
           "capfilt.itm_threshold": 0.746, "capfilt.itc_prescreen": -0.0455, "capfilt.keep_top": 1,
           "features.batch_size": 7,
           "capfilt.precision": "fp32"}  # exact arithmetic: the reference is fp32 (bf16 CPUs would differ)
THREADS = 2


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _manifest(world: Path) -> pa.Table:
    """The web split as an ingest would list it, with plain image files as references: 404s and
    non-images failed; the truncated JPEG 'downloaded' (so it fails to decode in CapFilt)."""
    from vlp_core.schema import C
    from vlp_core.synthetic.make import sample_id

    gt = pq.read_table(world / "ground_truth.parquet").to_pylist()
    rows = {C.KEY: [], C.URL: [], C.CAPTION: [], C.STATUS: [], C.SHARD: []}
    for i, r in enumerate(gt):
        failed = r[C.FAIL_KIND] in ("404", "not_image")
        rows[C.KEY].append(sample_id(i))
        rows[C.URL].append(r[C.URL])
        rows[C.CAPTION].append(r[C.CAPTION])
        rows[C.STATUS].append("failed_to_download" if failed else "success")
        rows[C.SHARD].append(None if failed else f"www/web/{sample_id(i)}.jpg")
    return pa.table(rows)


def produce(root: Path, **overrides) -> dict[str, pa.Table]:
    """Make the inputs under ``root`` and run CapFilt and features (twice: reusing CapFilt's
    projections, and computing them); the tables sorted by (key, candidate).  ``overrides``:
    settings laid over ``CAPFILT`` (only for tests other than the reference's)."""
    import torch

    from fixtures_world import tiny_params
    from vlp_core.capfilt.backend import clear_backend_cache
    from vlp_core.capfilt.stage import run_capfilt
    from vlp_core.features.stage import EMB_DIR, run_features
    from vlp_core.models import create_model, train_tokenizer
    from vlp_core.schema import C
    from vlp_core.synthetic.make import run_synthetic_make

    params = tiny_params(**WORLD, **{**CAPFILT, **overrides})
    root.mkdir(parents=True, exist_ok=True)
    run_synthetic_make(params, root)
    pq.write_table(_manifest(root), root / "manifest.parquet")
    fails = pq.read_table(root / "ground_truth.parquet")[C.FAIL_KIND].to_pylist()
    assert {"404", "not_image", "truncated"} <= set(fails), "the world must hold every kind of broken URL"
    clear_backend_cache()
    with _threads(THREADS):  # image references are relative to ``root``, passed explicitly (no chdir)
        torch.manual_seed(0)
        texts = [t for t in pq.read_table(root / "web.parquet")[C.CAPTION].to_pylist() if t and t.strip()]
        model = create_model("tiny", train_tokenizer(texts, vocab_size=128)).save_pretrained(root / "model")
        run_capfilt(params, root / "manifest.parquet", model, model, root / "capfilt", root=root)
        run_features(params, root / "capfilt", model, root / "features_reused", root=root)
        shutil.copytree(root / "capfilt" / "corpus", root / "bare" / "corpus")  # no CapFilt projections beside it
        run_features(params, root / "bare", model, root / "features_computed", root=root)
    order = [(C.KEY, "ascending"), (C.CANDIDATE, "ascending")]
    folders = {"corpus": root / "capfilt" / "corpus", "features_reused": root / "features_reused" / EMB_DIR,
               "features_computed": root / "features_computed" / EMB_DIR}
    return {name: pq.read_table(sorted(f.glob("*.parquet"))).sort_by(order) for name, f in folders.items()}


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type))


def _floats(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size  # .values keeps the slots of null rows (flatten() would drop them)
        vals = arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy(zero_copy_only=False)
        vals = np.asarray(vals, np.float64).reshape(len(arr), dim)
        vals = np.where(valid[:, None], vals, 0.0)
    else:
        vals = np.where(valid, np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), np.float64), 0.0)
    return vals, valid


def assert_same(name: str, got: pa.Table, want: pa.Table) -> None:
    assert got.schema.remove_metadata() == want.schema.remove_metadata(), f"{name}: schema differs"
    # the reference's metadata holds, keys added since (vlp.autocast) may join it
    assert {k: v for k, v in (got.schema.metadata or {}).items() if k in (want.schema.metadata or {})} == \
        (want.schema.metadata or {}), f"{name}: schema metadata differs"
    assert got.num_rows == want.num_rows, f"{name}: {got.num_rows} rows, want {want.num_rows}"
    for field in want.schema:
        g, w = got[field.name], want[field.name]
        if _is_float(field.type):
            (gv, gok), (wv, wok) = _floats(g), _floats(w)
            assert np.array_equal(gok, wok), f"{name}.{field.name}: nulls differ"
            np.testing.assert_allclose(gv, wv, rtol=0, atol=1e-6, err_msg=f"{name}.{field.name}")
        else:
            assert g.to_pylist() == w.to_pylist(), f"{name}.{field.name} differs"


def test_capfilt_and_features_rows_match_the_reference(tmp_path):
    want = {name: pq.read_table(DATA / f"{name}.parquet") for name in TABLES}
    got = produce(tmp_path / "run")
    corpus = want["corpus"]
    # the reference reaches every reason, keeps some rows and drops some
    reasons = {r.split(":")[0] for r in corpus["reason"].to_pylist() if r}
    assert reasons == {"itm_below_threshold", "itc_prescreen", "empty_text", "image_decode_error", "not_top_itm"}
    assert 0 < sum(corpus["kept"].to_pylist()) < corpus.num_rows <= 3 * N_WEB
    for name in TABLES:
        assert_same(name, got[name], want[name])


def test_capfilt_hands_features_the_projections_it_would_compute(tmp_path):
    """Filter-only CapFilt (K=0), one image a batch: a batch whose only text is empty scores
    nothing, yet its image's projection still reaches the sidecar, and a failed image after the
    first batch still gets its (null) sidecar row; the features built from the sidecar match the
    features computed from the images.  One difference stands (as before issue 18): a row whose
    image failed has no text projection from CapFilt (it scores no text without its image), while
    the features stage computing alone embeds that text."""
    got = produce(tmp_path / "run", **{"capfilt.num_captions": 0, "capfilt.batch_size": 1,
                                       "capfilt.itc_prescreen": None, "capfilt.keep_top": None})
    reasons = got["corpus"]["reason"].to_pylist()
    assert "empty_text" in reasons and any(r and r.startswith("image_decode_error") for r in reasons)
    reused, computed = got["features_reused"], got["features_computed"]
    # near_dup / dup_of too: an untrained model sees every image as a near duplicate, and the
    # earliest of the equally near images is named (dedup.TIE_DECIMALS), not the last bits' pick
    for col in ("key", "candidate", "sha256", "kept", "exact_dup", "near_dup", "dup_of"):
        assert reused[col].to_pylist() == computed[col].to_pylist(), col
    decoded = np.array([not (r or "").startswith("image_decode_error") for r in reasons])
    for col in ("image_embedding", "text_embedding"):
        (rv, rok), (cv, cok) = _floats(reused[col]), _floats(computed[col])
        if col == "image_embedding":
            assert np.array_equal(rok, decoded) and np.array_equal(cok, decoded)  # empty text or not
        else:
            has_text = np.array([bool((t or "").strip()) for t in got["corpus"]["text"].to_pylist()])
            assert np.array_equal(rok, has_text & decoded) and np.array_equal(cok, has_text)
        both = rok & cok
        np.testing.assert_allclose(rv[both], cv[both], rtol=0, atol=1e-5, err_msg=col)


def _write() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (the tests' offline environment)

    with tempfile.TemporaryDirectory() as tmp:
        tables = produce(Path(tmp) / "run")
    DATA.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        pq.write_table(t, DATA / f"{name}.parquet", compression="zstd")
        print(f"{DATA / name}.parquet: {t.num_rows} rows, {(DATA / f'{name}.parquet').stat().st_size} bytes")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: PYTHONPATH=$PWD python tests/test_same_rows.py --write  (rewrites tests/data/same_rows/)")
    _write()
