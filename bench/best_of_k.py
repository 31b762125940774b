"""Benchmark: does picking the best of K synthetic captions by the filter's ITM beat greedy?

    .venv/bin/python bench/best_of_k.py                          # seed 0, 5 nucleus samples
    .venv/bin/python bench/best_of_k.py --decode beam --k 3      # the 3 beams

It reuses a finished ``bench/cycle.py`` run (its world, ingest, and one seed's round-1
captioner and filter), runs CapFilt over the web images with K candidates per image (every
candidate scored, ``capfilt.keep_top`` unset) and, from the ground truth, prints per image:

* how often the greedy caption of the run itself is fully right (the baseline);
* a random one of the K candidates;
* the candidate with the highest ITM (what ``capfilt.keep_top: 1`` keeps, before the threshold);
* any of the K (the ceiling a perfect selector could reach);
* on images whose K candidates disagree, how often the ITM-best one is right, against chance.

Issue 7 names "K>1 sampled captions with the best one by ITM" as a lever for the captioner.
Not a test.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402

DEFAULT_RUN = "runs/bench_cycle/web8000_human2000_test1000"
DEFAULT_MODELS = "steps800_b64_cap1300_filt300_r1_w100_greedy"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help="a bench/cycle.py world folder (world/, ingest/)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="the run folder under --run holding seed<N>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("nucleus", "beam"), default="nucleus")
    p.add_argument("--k", type=int, default=5, help="candidates per image")
    p.add_argument("--out", default="runs/bench_best_of_k", help="where the K-candidate corpus goes")
    p.add_argument("--params", default="params.yaml")
    return p.parse_args()


def main() -> int:
    apply_offline_env()
    a = _args()
    import numpy as np

    from vlp_core.audit import roc_auc, synthetic_candidates
    from vlp_core.capfilt.stage import CORPUS_DIR, run_capfilt
    from vlp_core.config import load_params
    from vlp_core.schema import C

    run = Path(a.run)
    rd = run / a.models / f"seed{a.seed}" / "round1"
    for need in (rd / "captioner" / "model", rd / "filter" / "model", rd / "capfilt" / CORPUS_DIR):
        if not need.exists():
            print(f"{need}: not found; run bench/cycle.py --rounds 1 first", file=sys.stderr)
            return 2
    over = {"capfilt.decode": a.decode, "capfilt.num_captions": a.k, "capfilt.seed": a.seed,
            "pretrain.seed": a.seed, "capfilt.keep_top": None}
    if a.decode == "beam":
        over["capfilt.num_beams"] = a.k
    params = load_params(a.params).replace(**over)
    out = Path(a.out) / f"{a.models}_seed{a.seed}_{a.decode}{a.k}"
    t0 = time.perf_counter()
    run_capfilt(params, run / "ingest" / "web", rd / "captioner" / "model", rd / "filter" / "model", out,
                round=1, calibration=run / "ingest" / "human")
    print(f"CapFilt, {a.decode} K={a.k}: {time.perf_counter() - t0:.0f} s  ({out})")

    base = synthetic_candidates(rd / "capfilt" / CORPUS_DIR, run / "world")
    cand = synthetic_candidates(out / CORPUS_DIR, run / "world")
    rng = random.Random(a.seed)
    best, rand, anyok, mixed_best, mixed_chance = [], [], [], [], []
    for _, g in cand.groupby(C.KEY, sort=False):
        ok = g["correct"].to_numpy()
        itm = g[C.ITM].to_numpy(dtype=float)
        pick = np.arange(len(g)) == np.argmax(itm)  # the highest ITM (ties: the first)
        best.append(bool(ok[pick].any()))
        rand.append(bool(ok[rng.randrange(len(ok))]))
        anyok.append(bool(ok.any()))
        if 0 < ok.sum() < len(ok):
            mixed_best.append(best[-1])
            mixed_chance.append(ok.mean())
    pct = lambda x: 100.0 * float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
    print(f"images {len(best)}")
    print(f"greedy caption (the run's own)   {pct(base['correct']):5.1f} % fully right")
    print(f"random one of {a.k}                 {pct(rand):5.1f} %")
    print(f"ITM-best of {a.k}                   {pct(best):5.1f} %")
    print(f"any of {a.k} (perfect selector)     {pct(anyok):5.1f} %")
    print(f"images whose {a.k} disagree: {len(mixed_best)}; ITM-best right {pct(mixed_best):.1f} % "
          f"vs {pct(mixed_chance):.1f} % by chance")
    auc = roc_auc(~cand["correct"].to_numpy(), -cand[C.ITM].to_numpy(dtype=float))
    print(f"filter ROC-AUC, wrong vs right among all candidates: {auc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
