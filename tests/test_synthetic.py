"""The synthetic web: counts, noise and failure kinds, holdout, determinism, captions, server."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_world import tiny_params
from vlp_core.cli import main as vlp_main
from vlp_core.schema import GROUND_TRUTH_SCHEMA
from vlp_core.synthetic import world as w
from vlp_core.synthetic.make import FAIL_KINDS, NOISE_KINDS, SINGLE_NOISE_KINDS, run_synthetic_make
from vlp_core.synthetic.truth import load_ground_truth, url_path


def test_world_counts_noise_and_failures(tiny_world):
    gt = load_ground_truth(tiny_world)
    assert gt.schema.equals(GROUND_TRUTH_SCHEMA)
    df = gt.to_pandas()
    assert Counter(df.split) == {"web": 300, "human": 100, "test": 100}
    web = df[df.split == "web"]
    # 40% noise, split evenly over every kind
    assert web.is_noise.sum() == 120
    assert Counter(web.noise_kind.dropna()) == {k: 20 for k in NOISE_KINDS}
    assert Counter(web.fail_kind.dropna()) == {k: 2 for k in FAIL_KINDS}
    clean = df[df.split != "web"]
    assert not clean.is_noise.any() and clean.fail_kind.isna().all()
    assert (clean.caption == clean.true_caption).all()
    # URL lists carry exactly the published captions, in ground-truth order
    for split in ("web", "human", "test"):
        lst = pq.read_table(tiny_world / f"{split}.parquet").to_pandas()
        part = df[df.split == split]
        assert list(lst.url_path) == list(part.url) and list(lst.caption) == list(part.caption)


def test_failure_files_are_what_they_claim(tiny_world):
    df = load_ground_truth(tiny_world).to_pandas()
    for _, row in df.iterrows():
        path = tiny_world / "www" / row.url.lstrip("/")
        if row.fail_kind == "404":
            assert not path.exists()
        elif row.fail_kind == "not_image":
            assert path.read_bytes().startswith(b"<!DOCTYPE html>")
        elif row.fail_kind == "truncated":
            with pytest.raises(OSError):
                Image.open(path).load()
        else:
            img = Image.open(path)
            img.load()
            assert img.size == (48, 48)


def test_scenes_geometry_and_holdout(tiny_world):
    meta = json.loads((tiny_world / "world.json").read_text())
    holdout = {tuple(p) for p in meta["holdout_pairs"]}
    assert len(holdout) == 2
    df = load_ground_truth(tiny_world).to_pandas()
    for _, row in df.iterrows():
        scene = w.Scene.from_json(row.scene)
        a, b = scene.objects
        if row.split != "test":
            assert (a.colour, a.shape) not in holdout and (b.colour, b.shape) not in holdout
            # nor in any published text (attribute noise must not name a held-out pair)
            for colour, shape in holdout:
                for m in w.parse_caption(row.caption)[:2]:
                    assert not (m.colour == colour and m.shape == shape), row.caption
        for o in (a, b):
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            assert x1 - x0 == w.SIZE_PX[o.size]
        # the relation holds with no overlap along its axis
        if scene.relation == "left":
            assert a.bbox[2] < b.bbox[0]
        elif scene.relation == "right":
            assert b.bbox[2] < a.bbox[0]
        elif scene.relation == "above":
            assert a.bbox[3] < b.bbox[1]
        else:
            assert b.bbox[3] < a.bbox[1]


def test_true_captions_check_true_and_attribute_noise_false(tiny_world):
    df = load_ground_truth(tiny_world).to_pandas()
    for _, row in df.iterrows():
        assert w.check_caption(row.true_caption, row.scene)["all"] is True, row.true_caption
        verdict = w.check_caption(row.caption, row.scene)
        if row.noise_kind in ("attribute", "partial", "boilerplate", "empty"):
            assert verdict["all"] is False, (row.noise_kind, row.caption)
    attr = df[df.noise_kind == "attribute"]
    # exactly one attribute is wrong: one of colour/shape/size/relation is False, the rest True
    for _, row in attr.iterrows():
        v = w.check_caption(row.caption, row.scene)
        assert sum(v[k] is False for k in ("colour", "shape", "size", "relation")) == 1, row.caption


def test_vocabulary_size():
    vocab = w.vocabulary()
    assert 35 <= len(vocab) <= 60
    assert {"red", "circle", "left", "above", "small"} <= set(vocab)


def _scene() -> w.Scene:
    # a large red circle to the left of a small blue square
    return w.Scene((w.SceneObject("red", "circle", "large", (2, 10, 22, 30)),
                    w.SceneObject("blue", "square", "small", (30, 14, 42, 26))), "left", (128, 128, 128))


@pytest.mark.parametrize("text, expected", [
    ("a big red circle to the left of a small blue square", dict(colour=True, shape=True, size=True, relation=True, all=True)),
    ("small blue square right of large red circle", dict(colour=True, shape=True, size=True, relation=True, all=True)),
    ("a picture of a red disc left of a blue box", dict(colour=True, shape=True, size=None, relation=True, all=True)),
    ("A Picture of: the RED circle is on the left of the blue square.", dict(colour=True, shape=True, relation=True, all=True)),
    ("a red circle to the right of a blue square", dict(colour=True, shape=True, relation=False, all=False)),
    ("a small red circle left of a small blue square", dict(colour=True, shape=True, size=False, relation=True, all=False)),
    ("a big green circle left of a small blue square", dict(colour=False, shape=True, size=True, relation=True, all=False)),
    ("a big red triangle left of a small blue square", dict(shape=False, all=False)),
    ("there is a blue square under a red circle", dict(colour=True, shape=True, relation=False, all=False)),
    ("a large red circle", dict(colour=True, shape=True, size=True, relation=None, all=False)),
    ("IMG_2041.jpg", dict(colour=None, shape=None, size=None, relation=None, all=False)),
    ("", dict(colour=None, shape=None, size=None, relation=None, all=False)),
    ("a red circle left of a square", dict(colour=True, shape=True, relation=True, all=False)),
])
def test_check_caption_hand_cases(text, expected):
    got = w.check_caption(text, _scene())
    for key, value in expected.items():
        assert got[key] is value, (text, key, got)


def test_check_caption_accepts_scene_json():
    assert w.check_caption("a red circle above a blue square", _scene().to_json())["relation"] is False


def test_determinism_same_bytes(tmp_path):
    params = tiny_params(**{"synthetic.n_web": 40, "synthetic.n_human": 10, "synthetic.n_test": 10})
    run_synthetic_make(params, tmp_path / "a")
    run_synthetic_make(params, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 55
    for rel in files_a:
        if rel.name == "stats.json":  # holds the wall time
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # another seed gives another world
    run_synthetic_make(tiny_params(**{"synthetic.n_web": 40, "synthetic.n_human": 10, "synthetic.n_test": 10,
                                      "synthetic.seed": 1}), tmp_path / "c")
    assert (tmp_path / "c" / "web.parquet").read_bytes() != (tmp_path / "a" / "web.parquet").read_bytes()


def test_make_skips_when_settings_match(tmp_path):
    params = tiny_params(**{"synthetic.n_web": 12, "synthetic.n_human": 3, "synthetic.n_test": 3})
    first = run_synthetic_make(params, tmp_path)
    again = run_synthetic_make(params, tmp_path)
    assert first.shards_skipped == 0 and again.shards_skipped == 1 and again.rows_out == first.rows_out == 18


def test_server_serves_jpegs_and_logs_requests(tiny_world, world_server):
    df = load_ground_truth(tiny_world).to_pandas()
    ok = df[df.fail_kind.isna()].url.iloc[0]
    missing = df[df.fail_kind == "404"].url.iloc[0]
    with urllib.request.urlopen(world_server.base_url + ok, timeout=5) as r:
        assert r.headers["Content-Type"] == "image/jpeg"
        data = r.read()
    assert data == (tiny_world / "www" / ok.lstrip("/")).read_bytes()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(world_server.base_url + missing, timeout=5)
    assert e.value.code == 404
    assert ok in world_server.request_log and missing in world_server.request_log
    assert url_path(world_server.base_url + ok) == ok


def test_cli_make_and_urls(tmp_path, capsys):
    out = tmp_path / "w"
    rc = vlp_main(["synthetic", "make", "--out", str(out), "-S", "synthetic.n_web=20",
                   "-S", "synthetic.n_human=5", "-S", "synthetic.n_test=5"])
    assert rc == 0 and "30 rows" in capsys.readouterr().out
    rc = vlp_main(["synthetic", "urls", "--world", str(out), "--base", "http://127.0.0.1:9"])
    assert rc == 0
    urls = pq.read_table(out / "urls" / "web.parquet").to_pandas()
    assert len(urls) == 20 and urls.url.iloc[3] == "http://127.0.0.1:9/web/000003.jpg"
    arr = np.asarray(Image.open(out / "www" / "human" / "000000.jpg"))
    assert arr.shape == (48, 48, 3) and arr.std() > 5  # a noisy background, not a flat fill


def test_cli_serve_prints_port_and_writes_absolute_urls(tiny_world):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "vlp_core.cli", "synthetic", "serve", "--world", str(tiny_world)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("serving http://127.0.0.1:"), first
        base = first.split()[1]
        urls = pq.read_table(tiny_world / "urls" / "human.parquet").to_pandas()
        assert len(urls) == 100 and urls.url.iloc[0] == base + "/human/000000.jpg"
        with urllib.request.urlopen(urls.url.iloc[0], timeout=5) as r:
            assert r.status == 200 and r.read()[:2] == b"\xff\xd8"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "stopped" in out and "Traceback" not in err


# --------------------------------------------------------------------------- one-object world (the demo's)
def test_one_object_scenes_positions_and_captions():
    seen = Counter()
    for i in range(200):
        rng = np.random.default_rng([3, 1, i])
        scene = w.sample_scene(rng, 48, objects=1)
        assert scene.single and scene.relation in w.POSITIONS
        x0, y0, x1, y1 = scene.objects[0].bbox
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        # the centre lies on the named side of the image's middle
        side = {"left": cx < 20, "right": cx > 28, "top": cy < 20, "bottom": cy > 28,
                "centre": 18 <= cx <= 30 and 18 <= cy <= 30}[scene.relation]
        assert side, (scene.relation, scene.objects[0].bbox)
        seen[scene.relation] += 1
        text = w.caption(scene, rng)
        assert w.check_caption(text, scene) == {"colour": True, "shape": True, "size": True, "relation": True,
                                                "all": True}
        assert w.check_caption(text, scene.to_json())["all"]  # the JSON round trip
        wrong, attr = w.corrupt_attribute(scene, rng)
        assert wrong.single and w.check_caption(w.caption(wrong, rng), scene)[attr] is False
        assert w.check_caption(w.partial_caption(scene, rng), scene)["all"] is False  # says not where
    assert set(seen) == set(w.POSITIONS)


@pytest.mark.parametrize("text,expected", [
    ("a big red circle on the left", {"colour": True, "shape": True, "size": True, "relation": True, "all": True}),
    ("a red circle in the middle", {"colour": True, "shape": True, "size": None, "relation": False, "all": False}),
    ("a red circle", {"colour": True, "shape": True, "size": None, "relation": None, "all": False}),
    ("a large blue ball at the left", {"colour": False, "shape": True, "size": True, "relation": True, "all": False}),
])
def test_check_caption_one_object_hand_cases(text, expected):
    scene = w.Scene((w.SceneObject("red", "circle", "large", (2, 14, 22, 34)),), "left", (128, 128, 128))
    assert w.check_caption(text, scene) == expected


def test_one_object_world_is_made_and_deterministic(tmp_path):
    p = tiny_params().replace(**{"synthetic.objects": 1})
    run_synthetic_make(p, tmp_path / "a")
    run_synthetic_make(p, tmp_path / "b")
    gt = load_ground_truth(tmp_path / "a").to_pandas()
    web = gt[gt.split == "web"]
    # no "partial" kind with one object: 40 % noise over the other five kinds
    assert Counter(web.noise_kind.dropna()) == {k: 24 for k in SINGLE_NOISE_KINDS}
    scenes = [w.Scene.from_json(s) for s in gt.scene]
    assert all(s.single for s in scenes)
    clean = gt[~gt.is_noise]
    assert all(w.check_caption(c, s)["all"] for c, s in zip(clean.caption, clean.scene))
    for f in ("ground_truth.parquet", "web.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
