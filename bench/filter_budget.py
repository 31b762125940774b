"""Issue 16 probe: does a longer filter fine-tune lift round 0's filter against one-attribute swaps and at
telling wrong from right synthetic captions?  Not a test.

    .venv/bin/python bench/filter_budget.py --run runs/bench_cycle/web8000_human2000_test1000/<run folder> \\
        --seed 0 --steps 1200

It reads a finished ``bench/cycle.py`` seed (its pretrained model, captioner, CapFilt corpus and downloads),
fine-tunes a new filter from the same pretrained model for ``--steps`` steps with the run's settings
(``--ema-decay``, ``--filter-hard-negatives``: give the run's), and prints for the run's own 300-step filter
and the new one the ROC-AUC of wrong vs right synthetic captions on the first web shard (the same
captions: greedy decoding is deterministic) and the new filter's ITM accuracy against one-attribute swaps.
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


def main() -> int:
    apply_offline_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a bench/cycle.py run folder (holding seed<k>/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200, help="steps of the new filter fine-tune")
    ap.add_argument("--out", default="runs/filter_budget")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--filter-hard-negatives", type=float, default=1.0)
    ap.add_argument("--phrase-swaps", type=float, default=0.0,
                    help="finetune.filter.phrase_swaps: the share of hard negatives that trade two aligned phrases")
    ap.add_argument("--synonyms", action="store_true",
                    help="finetune.filter.synonyms: the world's synonym groups (no synonym made a hard negative)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--base", default=None,
                    help="model folder the filter is fine-tuned from (default: the seed's pretrained model); "
                         "relative paths are read inside the seed folder, e.g. data/round0/retrain/model")
    a = ap.parse_args()

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from vlp_core.audit import audit_corpus
    from vlp_core.capfilt.stage import run_capfilt
    from vlp_core.config import load_params
    from vlp_core.layout import Layout
    from vlp_core.synthetic.world import synonym_groups
    from vlp_core.train.evaluate import run_swap_accuracy
    from vlp_core.train.loop import run_finetune

    layout = Layout.at(Path(a.run).resolve() / f"seed{a.seed}")
    out = Path(a.out) / f"seed{a.seed}"
    s = a.seed
    p = load_params(a.params, list(a.overrides)).replace(**{
        "finetune.filter.steps": max(a.steps, 1), "finetune.filter.batch_size": a.batch, "capfilt.decode": "greedy",
        "finetune.filter.ema_decay": a.ema_decay, "finetune.filter.hard_negatives": a.filter_hard_negatives,
        "finetune.filter.phrase_swaps": a.phrase_swaps, "finetune.filter.synonyms": synonym_groups() if a.synonyms else (),
        "pretrain.seed": s, "finetune.filter.seed": s, "capfilt.seed": s})
    sub = out / "filter_run" / "corpus"
    sub.mkdir(parents=True, exist_ok=True)
    first = sorted(layout.corpus(0).glob("*.parquet"))[0]
    shutil.copy(first, sub / first.name)
    before = audit_corpus(sub, layout.world)
    print(f"the run's filter, shard {first.stem}: {json.dumps(before.get('synthetic_detection'))}", flush=True)
    t = time.perf_counter()
    fdir = out / f"filter{a.steps}"
    base = layout.model(0, "pretrain") if a.base is None else layout.root / a.base
    if a.steps > 0:
        run_finetune(p, "filter", [(str(layout.ingest("human")), "human")], str(base), fdir, root=layout.root)
        print(f"filter fine-tune from {base}, {a.steps} steps: {time.perf_counter() - t:.0f} s", flush=True)
        fmodel = fdir / "model"
    else:  # score with the base model itself, no fine-tune
        fmodel = base
        print(f"filter = {base} as it is (no fine-tune)", flush=True)
    swap = run_swap_accuracy(p, fmodel, (str(layout.ingest("test")), "human"),
                             layout.world / "ground_truth.parquet")
    print(f"filter {a.steps} steps: ITM accuracy vs one-attribute swaps {swap.get('itm_acc_swap')}, "
          f"vs reversed relations {swap.get('itm_acc_relation')}", flush=True)
    man = pq.read_table(layout.manifest("web"))
    col = next(c for c in man.column_names if "shard" in c)
    shard = sorted(set(man[col].to_pylist()), key=str)[0]
    mdir = out / "web_first_shard"
    mdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(man.filter(pc.equal(man[col], shard)), mdir / "manifest.parquet")
    run_capfilt(p, mdir / "manifest.parquet", str(layout.model(0, "finetune_captioner")), str(fmodel),
                out / f"capfilt{a.steps}", round=0, calibration=layout.manifest("human"), root=layout.root)
    after = audit_corpus(out / f"capfilt{a.steps}" / "corpus", layout.world)
    print(f"filter {a.steps} steps, same shard: {json.dumps(after.get('synthetic_detection'))}; web noise "
          f"{json.dumps(after.get('web_detection'))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
