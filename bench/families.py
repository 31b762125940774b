"""The model families as the filter: ROC-AUC per web-noise kind, BLIP against ViLBERT at equal steps.

    .venv/bin/python bench/families.py                          # defaults: 500 steps per family
    .venv/bin/python bench/families.py --steps 100 --n-web 500  # a quick check that it runs

One synthetic world (``--noise`` of the web captions corrupted, split evenly over the noise
kinds; no failed downloads).  Each family (``--families``, architectures ``--arch-<family>``)
is pretrained through ``run_pretrain`` (the training loop of every stage) on the clean human
split for the same ``--steps``, batch, learning rate and loss weights: ``itc_weight``,
``itm_weight``, ``lm_weight`` are BLIP's ITC, ITM and LM and ViLBERT's dual-encoder head,
alignment prediction and masked multimodal modelling (MLM + MRM; see
``vlp_core/models/vilbert.py``).  Then each filter scores every web (image, alt-text) pair
with its ``itm_probs`` (BLIP: the ITM head, as CapFilt's filter; ViLBERT: the alignment
head), in the same code for both.  The keep rule is CapFilt's calibrated one: the
``--percentile``-th percentile of the filter's score on the world's clean test split
(held out from training); an empty alt-text is an unscored reject, as in CapFilt.  The
numbers are :func:`vlp_core.capfilt.quality.detection_report`'s (precision, recall and
ROC-AUC of "clean vs that kind", noise score ``-itm``), from the world's ground truth.

One seed; the training time of each family is printed beside its table.  Not run by the tests.
On a shared machine run it with ``TORCH_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 5``: with
other jobs on the 2 cores, two spinning OpenMP threads cost ~10x the CPU time per step.

Measured (2026-12-02, the defaults but ``--steps 300``; 507 CPU-s): ROC-AUC overall BLIP 0.800,
ViLBERT 0.933 (per kind in the README, "Model families").
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402

ARCHS = {"blip": "tiny", "vilbert": "vilbert-tiny"}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_families", help="work folder (world, runs)")
    p.add_argument("--families", default="blip,vilbert")
    for fam, arch in ARCHS.items():
        p.add_argument(f"--arch-{fam}", default=arch, help=f"architecture of the {fam} filter")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--itc-weight", type=float, default=1.0)
    p.add_argument("--itm-weight", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=1.0)
    p.add_argument("--n-train", type=int, default=4000, help="clean human pairs the filters train on")
    p.add_argument("--n-web", type=int, default=2000, help="web pairs scored")
    p.add_argument("--n-cal", type=int, default=500, help="clean held-out pairs the threshold is calibrated on")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--percentile", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def score_pairs(model, source, batch: int = 128):
    """``(table of the source's pairs, itm per pair: float or None for an empty text)``."""
    import torch

    from vlp_core.train.data import decode_pairs, load_pairs

    table = load_pairs([source])
    data = decode_pairs(table, int(model.config.image_size), min_text_chars=0)
    scores: list = [None] * len(data)
    rows = [i for i, t in enumerate(data.texts) if t.strip()]
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            px = model.preprocess(data.images[data.image_idx[r]])
            p = model.itm_probs(model.encode_image(px), [data.texts[i] for i in r]).float().numpy()
            for i, v in zip(r, p):
                scores[i] = float(v)
    return data.table, scores


def main() -> int:
    apply_offline_env()
    a = _args()
    import numpy as np
    import pyarrow as pa

    from vlp_core.capfilt.quality import detection_report, format_report
    from vlp_core.config import Params
    from vlp_core.schema import C
    from vlp_core.synthetic.make import run_synthetic_make
    from vlp_core.models import BlipMED
    from vlp_core.models.vilbert import ViLBERT, is_vilbert_dir
    from vlp_core.train.loop import run_pretrain

    out = Path(a.out)
    params = Params().replace(**{"synthetic.n_web": a.n_web, "synthetic.n_human": a.n_train, "synthetic.n_test": a.n_cal,
                                 "synthetic.noise_rate": a.noise, "synthetic.fail_rate": 0.0, "synthetic.seed": a.seed})
    world = out / f"world_{a.n_web}_{a.n_train}_{a.n_cal}_{a.noise}_{a.seed}"
    t = time.perf_counter()
    run_synthetic_make(params, world)
    print(f"world: {world} ({time.perf_counter() - t:.1f} s); train on {a.n_train} clean pairs, score {a.n_web} web "
          f"pairs ({a.noise:.0%} noisy), calibrate on {a.n_cal}; {a.steps} steps x batch {a.batch}, seed {a.seed}")
    results = {}
    for fam in [f.strip() for f in a.families.split(",") if f.strip()]:
        arch = getattr(a, f"arch_{fam}", None)
        if arch is None:
            raise SystemExit(f"unknown family {fam!r} (one of {', '.join(ARCHS)})")
        train = {"steps": a.steps, "batch_size": a.batch, "lr": a.lr, "warmup_steps": a.warmup, "seed": a.seed,
                 "itc_weight": a.itc_weight, "itm_weight": a.itm_weight, "lm_weight": a.lm_weight,
                 "checkpoint_every": a.steps, "log_every": 50}
        p = params.replace(**{"model.arch": arch, **{f"pretrain.{k}": v for k, v in train.items()}})
        run = out / f"{fam}_{arch}_s{a.steps}_seed{a.seed}"
        shutil.rmtree(run, ignore_errors=True)
        stats = run_pretrain(p, [(world / "human.parquet", "human")], run)
        model = (ViLBERT if is_vilbert_dir(run / "model") else BlipMED).from_pretrained(run / "model")
        t = time.perf_counter()
        _, cal = score_pairs(model, (world / "test.parquet", "human"))
        threshold = float(np.percentile([s for s in cal if s is not None], a.percentile))
        web, itm = score_pairs(model, (world / "web.parquet", "web"))
        kept = [s is not None and s >= threshold for s in itm]
        reason = ["empty_text" if s is None else "kept" if k else "itm_below_threshold" for s, k in zip(itm, kept)]
        corpus = pa.table({C.URL: web[C.URL], C.CANDIDATE: pa.array([0] * web.num_rows, pa.int32()),
                           C.ITM: pa.array(itm, pa.float32()), C.KEPT: pa.array(kept), C.REASON: pa.array(reason)})
        report = detection_report(corpus, world / "ground_truth.parquet")
        score_s = time.perf_counter() - t
        results[fam] = {"arch": arch, "train_seconds": stats.extra["train_seconds"], "score_seconds": round(score_s, 1),
                        "final_losses": stats.extra["final_losses"], "threshold": threshold,
                        "params": model.num_parameters(), "report": report}
        print(f"\n== {fam} ({arch}, {model.num_parameters() / 1e6:.2f}M trainable parameters): trained "
              f"{stats.extra['train_seconds']:.0f} s, scored {score_s:.0f} s; final losses "
              + ", ".join(f"{k} {v:.3f}" for k, v in stats.extra["final_losses"].items())
              + f"; threshold {threshold:.3f} (p{a.percentile:g} of clean)")
        print(format_report(report))
    if len(results) > 1:
        fams = list(results)
        kinds = list(next(iter(results.values()))["report"])
        print("\nROC-AUC per noise kind (clean vs that kind)")
        print(f"{'noise kind':<12} " + " ".join(f"{f:>9}" for f in fams))
        for k in kinds:
            print(f"{k:<12} " + " ".join(f"{results[f]['report'][k]['roc_auc']:>9.3f}" for f in fams))
    (out / "families.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
