"""``run_synthetic_make``: write a seeded synthetic web (images, URL lists, ground truth).

Layout of a world ``W``::

    W/www/<split>/<id>.jpg     what the server serves (failure URLs: missing, not an image, truncated)
    W/<split>.parquet          URL list: url_path, caption (what a crawl would publish); the human
                               split also has ``regions``: each object's box with its phrase
                               (REGIONS_TYPE), as COCO / Visual Genome give X-VLM
    W/ground_truth.parquet     GROUND_TRUTH_SCHEMA keyed by url = URL path ("/web/000123.jpg")
    W/world.json               the settings, holdout pairs and vocabulary
    W/stats.json               StageStats

Every image is rendered from its own RNG stream ``(seed, split, index)``, so the same seed
gives the same bytes.  The pipeline never reads ``ground_truth.parquet``; evaluation does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from vlp_core.config import Params
from vlp_core.io import StageStats, Timer, read_json, write_json, write_parquet
from vlp_core.schema import GROUND_TRUTH_SCHEMA, REGIONS_TYPE, C
from vlp_core.synthetic import world as w

SPLITS = ("web", "human", "test")
_SPLIT_CODE = {"web": 1, "human": 2, "test": 3}
NOISE_KINDS = ("swapped", "attribute", "boilerplate", "empty", "html", "partial")
# One object per image: a caption cannot name part of the scene and leave the rest out, so
# "partial" (one object of two) has no counterpart, and HTML junk never wraps a caption.
SINGLE_NOISE_KINDS = ("swapped", "attribute", "boilerplate", "empty", "html")


def noise_kinds(objects: int) -> tuple[str, ...]:
    """The web's noise kinds in a world of ``objects`` objects per image."""
    return SINGLE_NOISE_KINDS if objects == 1 else NOISE_KINDS
FAIL_KINDS = ("404", "not_image", "truncated")
URL_LIST_COLUMNS = ("url_path", C.CAPTION)
REGION_SPLITS = ("human",)  # the splits given box annotations (the clean, human-annotated set)
# the world's file format: a world of another format is made again (2: the human split's regions)
WORLD_FORMAT = 2

NOT_IMAGE_BYTES = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>moved</body></html>\n"


def sample_id(i: int) -> str:
    return f"{i:06d}"


def url_path_of(split: str, i: int) -> str:
    return f"/{split}/{sample_id(i)}.jpg"


def _noisy_caption(kind: str, i: int, scene: w.Scene, rng: np.random.Generator,
                   true_captions: list[str], exclude: frozenset) -> str:
    if kind == "swapped":
        j = int(rng.integers(len(true_captions) - 1))
        j = j + 1 if j >= i else j
        return true_captions[j]
    if kind == "attribute":
        wrong, _ = w.corrupt_attribute(scene, rng, exclude)
        return w.caption(wrong, rng)
    if kind == "boilerplate":
        return w.BOILERPLATE[rng.integers(len(w.BOILERPLATE))].format(n=int(rng.integers(10000)))
    if kind == "empty":
        return ("", " ", "  \n", "\t")[rng.integers(4)]
    if kind == "html":
        if scene.single or rng.random() < 0.5:
            return w.HTML_JUNK[rng.integers(len(w.HTML_JUNK))]
        return f"<div class=\"caption\"><b>{w.partial_caption(scene, rng)}</b>&nbsp;</div>"
    if kind == "partial":
        return w.partial_caption(scene, rng)
    raise ValueError(kind)  # pragma: no cover


def _assign(n: int, rate: float, kinds: tuple[str, ...], rng: np.random.Generator) -> list[Optional[str]]:
    """Spread round(rate * n) rows evenly over ``kinds`` at random positions."""
    out: list[Optional[str]] = [None] * n
    k = int(round(rate * n))
    for j, idx in enumerate(rng.permutation(n)[:k]):
        out[int(idx)] = kinds[j % len(kinds)]
    return out


def _make_split(split: str, n: int, params: Params, out_dir: Path, holdout: frozenset,
                gt: dict[str, list], stats: StageStats) -> None:
    sp = params.synthetic
    size = sp.image_size
    www = out_dir / "www" / split
    www.mkdir(parents=True, exist_ok=True)
    exclude = holdout if split != "test" else frozenset()
    scenes: list[w.Scene] = []
    captions: list[str] = []
    images: list[np.ndarray] = []
    for i in tqdm(range(n), desc=f"render {split}", unit="img", disable=None, leave=False):
        rng = np.random.default_rng([sp.seed, _SPLIT_CODE[split], i])
        scene = w.sample_scene(rng, size, exclude, objects=sp.objects)
        scenes.append(scene)
        images.append(w.render(scene, rng, size))
        captions.append(w.caption(scene, rng))
    split_rng = np.random.default_rng([sp.seed, _SPLIT_CODE[split], 10**9])
    noise = _assign(n, sp.noise_rate, noise_kinds(sp.objects), split_rng) if split == "web" else [None] * n
    fails = _assign(n, sp.fail_rate, FAIL_KINDS, split_rng) if split == "web" else [None] * n
    urls, published, boxes = [], [], []
    for i in range(n):
        rng = np.random.default_rng([sp.seed, _SPLIT_CODE[split], i, 1])
        text = captions[i] if noise[i] is None else _noisy_caption(noise[i], i, scenes[i], rng, captions, exclude)
        data = w.encode_jpeg(images[i], sp.jpeg_quality)
        path = www / f"{sample_id(i)}.jpg"
        if fails[i] == "404":
            path.unlink(missing_ok=True)
        elif fails[i] == "not_image":
            path.write_bytes(NOT_IMAGE_BYTES)
        elif fails[i] == "truncated":
            path.write_bytes(data[: len(data) // 2])  # cut in half: neither PIL nor OpenCV decodes it
        else:
            path.write_bytes(data)
        url = url_path_of(split, i)
        urls.append(url)
        published.append(text)
        if split in REGION_SPLITS:  # its own stream: the captions and images stay as they were
            boxes.append(w.regions(scenes[i], np.random.default_rng([sp.seed, _SPLIT_CODE[split], i, 2]), size))
        gt[C.URL].append(url)
        gt[C.SPLIT].append(split)
        gt[C.CAPTION].append(text)
        gt[C.TRUE_CAPTION].append(captions[i])
        gt[C.IS_NOISE].append(noise[i] is not None)
        gt[C.NOISE_KIND].append(noise[i])
        gt[C.FAIL_KIND].append(fails[i])
        gt[C.SCENE].append(scenes[i].to_json())
        stats.add(f"{split}.rows")
        if noise[i]:
            stats.add(f"{split}.noise.{noise[i]}")
        if fails[i]:
            stats.add(f"{split}.fail.{fails[i]}")
    cols = {"url_path": pa.array(urls, pa.string()), C.CAPTION: pa.array(published, pa.string())}
    if split in REGION_SPLITS:
        cols[C.REGIONS] = pa.array(boxes, REGIONS_TYPE)
    table = pa.table(cols)
    write_parquet(table, out_dir / f"{split}.parquet")


def run_synthetic_make(params: Params, out_dir: str | Path, force: bool = False) -> StageStats:
    """Generate the world described by ``params.synthetic`` under ``out_dir``.

    Skips the work (``shards_skipped=1``) when ``out_dir`` already holds a world made with
    the same settings, unless ``force``.
    """
    out_dir = Path(out_dir)
    sp = params.synthetic
    settings = sp.model_dump()
    meta_path = out_dir / "world.json"
    if not force and meta_path.exists() and (out_dir / "ground_truth.parquet").exists() \
            and read_json(meta_path).get("settings") == settings and (out_dir / "stats.json").exists() \
            and read_json(meta_path).get("format", 1) == WORLD_FORMAT:
        old = read_json(out_dir / "stats.json")
        stats = StageStats(stage="synthetic", rows_in=old["rows_in"], rows_out=old["rows_out"],
                           counts=old["counts"], shards_skipped=1)
        return stats
    stats = StageStats(stage="synthetic")
    holdout = w.holdout_pairs(sp.seed, sp.holdout_frac)
    gt: dict[str, list] = {f.name: [] for f in GROUND_TRUTH_SCHEMA}
    with Timer() as t:
        for split, n in (("web", sp.n_web), ("human", sp.n_human), ("test", sp.n_test)):
            _make_split(split, n, params, out_dir, holdout, gt, stats)
            stats.shards_done += 1
        write_parquet(pa.table(gt, schema=GROUND_TRUTH_SCHEMA), out_dir / "ground_truth.parquet")
    stats.rows_in = stats.rows_out = len(gt[C.URL])
    stats.seconds = round(t.seconds, 3)
    stats.extra = {"holdout_pairs": sorted(list(p) for p in holdout)}
    write_json({"format": WORLD_FORMAT, "settings": settings, "holdout_pairs": sorted(list(p) for p in holdout),
                "vocabulary": w.vocabulary(), "splits": list(SPLITS)}, meta_path)
    stats.check().write(out_dir)
    return stats
