"""Issue 16 probe: does a model's ITM head know left from right?  Not a test.

    .venv/bin/python bench/relations.py --run <bench/cycle.py run folder> --seed 0 MODEL_DIR [MODEL_DIR ...]

For each test image of the run's world (two-object scenes) it scores the true caption against the same
caption with **only the relation reversed** ("a red circle left of a blue box" -> "... right of ...",
the same template and words), and against the same caption with the **two objects traded**
("a blue box left of a red circle"), and prints the pairwise ITM accuracy (the true caption scored higher) split by
the relation's axis (horizontal: left/right, vertical: above/below).  ``bench/cycle.py``'s swap
accuracy mixes these with colour, shape and size swaps (a quarter of its negatives change the relation,
a third of those reverse it), so a model can score 88 % there and still not know left from right.
MODEL_DIR: a model folder, relative to the seed folder (``data/round0/retrain/model``) or absolute.

``--pretrain-steps N`` first pretrains a fresh model for N steps on the seed's oracle corpus (``--corpus
raw``: every downloaded web pair) plus the human pairs (``-S section.key=value`` for the levers, e.g. ``-S pretrain.phrase_swaps=1``; ``--out``
holds it; a rerun resumes) and scores it too, with its ``itm_acc_relation`` and ``itm_acc_swap``.
``--human-regions`` gives that run the human pairs' object boxes from the world's ground truth (for
``-S model.family=xvlm`` on a world made before boxes were part of it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402


def main() -> int:
    apply_offline_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a bench/cycle.py run folder (holding seed<k>/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--pretrain-steps", type=int, default=0)
    ap.add_argument("--out", default="runs/relations")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--human-regions", action="store_true")
    ap.add_argument("--corpus", default="oracle", choices=["oracle", "raw"],
                    help="the web pairs --pretrain-steps trains on: the seed's oracle corpus (clean) or its raw web "
                         "corpus (every downloaded pair, as the pretrained model of a round sees them)")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="section.key=value")
    a = ap.parse_args()

    import numpy as np
    import torch

    from vlp_core.layout import Layout
    from vlp_core.models.med import BlipMED
    from vlp_core.schema import C
    from vlp_core.synthetic import world as W
    from vlp_core.synthetic.truth import url_path
    from vlp_core.train.data import decode_pairs, load_pairs, parse_source
    from vlp_core.train.evaluate import _truth_by_url, encode_images, itm_scores, relation_reversed_captions

    torch.set_num_threads(2)
    layout = Layout.at(Path(a.run).resolve() / f"seed{a.seed}")
    truth = _truth_by_url(layout.world / "ground_truth.parquet")
    models = list(a.models)
    if a.pretrain_steps:
        models.append(str(_pretrain(a, layout, truth)))
    test = load_pairs([parse_source(str(layout.ingest("test")))])
    decoded: dict[int, tuple] = {}  # image size -> (images, scenes, the relation captions, axes): once, not per model
    for m in models:
        model = BlipMED.from_pretrained(layout.root / m).eval()
        size = int(model.config.image_size)
        if size not in decoded:
            data = decode_pairs(test, size)
            urls = data.image_urls()
            rows = [i for i, u in enumerate(urls) if u is not None and url_path(u) in truth]
            scenes = [truth[url_path(urls[i])][C.SCENE] for i in rows]
            idx, *texts = relation_reversed_captions(scenes, a.seed)
            axis = np.array(["h" if W.Scene.from_json(scenes[i]).relation in ("left", "right") else "v" for i in idx])
            decoded[size] = (data.images[[rows[i] for i in idx]], texts, axis)
        images, texts, axis = decoded[size]
        emb, _ = encode_images(model, images, 128, torch.device("cpu"))
        with torch.no_grad():
            s = [itm_scores(model, emb, t, 128, torch.device("cpu"))[0] for t in texts]  # true, reversed, traded
        res = []
        for name, neg in (("reversed", s[1]), ("traded", s[2])):
            for ax in ("h", "v"):
                sel = axis == ax
                res.append(f"{name}/{ax} {np.mean(s[0][sel] > neg[sel]) * 100:.1f}%")
        print(f"{m}: n={len(axis)} " + ", ".join(res), flush=True)
    return 0


def _pretrain(a, layout, truth) -> Path:
    """A fresh model pretrained on the seed's oracle (or raw) web corpus + human pairs (``--pretrain-steps``)."""
    import time

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlp_core.config import load_params
    from vlp_core.schema import REGIONS_TYPE, C
    from vlp_core.synthetic import world as W
    from vlp_core.synthetic.truth import url_path
    from vlp_core.train.evaluate import run_swap_accuracy
    from vlp_core.train.loop import run_pretrain

    p = load_params(a.params, list(a.overrides)).replace(**{"pretrain.steps": a.pretrain_steps,
                                                            "pretrain.seed": a.seed})
    out = Path(a.out).resolve() / f"seed{a.seed}"
    human = layout.ingest("human")
    if a.human_regions:  # the world's boxes, as COCO / Visual Genome give X-VLM
        manifest = pq.read_table(human / "manifest.parquet")
        regions = []
        for k, u in enumerate(manifest[C.URL].to_pylist()):
            row = truth.get(url_path(u)) if u else None
            regions.append(W.regions(W.Scene.from_json(row[C.SCENE]), np.random.default_rng([a.seed, k]),
                                     int(p.synthetic.image_size)) if row else None)
        if C.REGIONS in manifest.column_names:
            manifest = manifest.drop([C.REGIONS])
        human = out / "human_regions"
        human.mkdir(parents=True, exist_ok=True)
        pq.write_table(manifest.append_column(C.REGIONS, pa.array(regions, REGIONS_TYPE)), human / "manifest.parquet")
    web = layout.root / "data" / "comparison" / ("oracle/corpus" if a.corpus == "oracle" else "raw_corpus")
    t = time.perf_counter()
    run_pretrain(p, [(str(web), "web"), (str(human), "human")], out / "pretrain", root=layout.root)
    res = run_swap_accuracy(p, out / "pretrain" / "model", (str(layout.ingest("test")), "human"),
                            layout.world / "ground_truth.parquet")
    print(f"pretrained {a.pretrain_steps} steps ({time.perf_counter() - t:.0f} s; {' '.join(a.overrides)}): "
          f"itm_acc_swap {res['itm_acc_swap']:.3f}, itm_acc_relation {res['itm_acc_relation']:.3f}", flush=True)
    return out / "pretrain" / "model"


if __name__ == "__main__":
    sys.exit(main())
