"""Proof that the tiny BLIP MED learns: pretrain on the synthetic world, then evaluate.

    .venv/bin/python bench/learn.py                       # defaults: ~10 min of training on 2 cores
    .venv/bin/python bench/learn.py --steps 300 --captioner-steps 0   # a ~2-3 min budget

It makes a clean synthetic world (``--noise 0`` by default: this measures learning, not
CapFilt), pretrains ``model.arch`` (tiny) on the web split for a fixed number of steps (ITC +
ITM + LM, the LM loss weighted x3), then fine-tunes BLIP's *captioner* from it (LM only, the
same ``run_finetune(.., "captioner", ..)`` that CapFilt uses), reading the images straight
from the world's files (no ingest).  Both models are evaluated on the test split with the
world's ground truth.  It prints, side by side with their chance levels:

* the ITM loss at the end of training (a 1-in-3 guess, BLIP's 1 positive : 2 negatives, is 0.64);
* ITM accuracy on held-out positives vs a negative with ONE attribute swapped (chance 50%),
  and vs the ITC-hardest wrong test caption;
* retrieval R@1 (ITC top-k re-ranked by ITM; semantic recall) against chance;
* caption accuracy (greedy; every stated attribute right), per attribute, BLEU-4, CIDEr.

``--family blip,xvlm`` (issue 21) trains each family in turn on the same world, steps and seed
-- web *and* human pairs, since X-VLM's box annotations come with the human split only
(``--n-human``; its region losses apply to those rows) -- and ends with a side-by-side table:
relation-direction and shape accuracy of the captions, ITM against one-attribute swaps.

Targets (issue 4): ITM loss well below 0.6, ITM accuracy > 80 %, caption accuracy >= 50 %
within about 10 minutes on 2 cores.  The ITM numbers are the pretrained model's (the filter
starts from it); caption accuracy is the captioner's; the time is both trainings together.
A TARGETS block at the end marks each one met or not.  Not run by the tests.

What was tried (one seed each, this machine, 20k clean pairs, batch 64):

* 1,400 pretraining steps, LM weight 1, no captioner (788 s): ITM loss 0.18, ITM 88 % vs
  one-attribute swaps, R@1 35.9 %, but caption accuracy only 29 % (shape 56 %, relation 54 %).
* 800 pretraining steps, LM weight 3 (327 s), then a 1,500-step captioner fine-tune (247 s):
  caption accuracy 22 % -> 55.5 % (shape 43 -> 88 %, relation 54 -> 63 %); ITM loss 0.24,
  ITM 90 % vs ITC-hard negatives but 76 % vs one-attribute swaps.
* 1,000 pretraining steps, LM weight 3 (436 s), then a 1,300-step captioner fine-tune
  (216 s) -- the defaults, 652 s in all: caption accuracy 25.5 % -> 64.9 % (shape 90 %,
  relation 72.5 %; 72 % on seen colour-shape pairs, 31 % on held-out ones); ITM loss 0.21,
  ITM 89.3 % vs ITC-hard negatives, 79.5 % vs one-attribute swaps; R@1 26.5 % (chance 0.1 %).
* An LM-only step costs 0.41 of a full ITC+ITM+LM step (bench/step_cost.py), so the
  captioner's LM training is cheapest done in the fine-tune, as BLIP does.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.config import Params, load_params  # noqa: E402
from vlp_core.env import apply_offline_env  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_learn", help="work folder (world, runs)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lm-weight", type=float, default=3.0)
    p.add_argument("--itm-weight", type=float, default=1.0)
    p.add_argument("--itc-weight", type=float, default=1.0)
    p.add_argument("--captioner-steps", type=int, default=1300,
                   help="then fine-tune the captioner (LM only) this many steps and evaluate it too (0: skip)")
    p.add_argument("--budget-s", type=float, default=600.0, help="the training-time target for the TARGETS block")
    p.add_argument("--n-train", type=int, default=20000, help="web pairs in the world")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.0, help="synthetic.noise_rate of the web split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="blip",
                   help="model family, or a comma list run side by side at equal steps (e.g. blip,xvlm)")
    p.add_argument("--n-human", type=int, default=None,
                   help="human pairs (with box annotations) trained beside the web pairs; by default 200 of them, "
                        "trained only when --family names more than blip (blip alone: the web split, as before). "
                        "Give it to train them with --family blip too (one family per process, same world)")
    p.add_argument("--params", default=None, help="a params.yaml to start from (default: built-in defaults)")
    p.add_argument("-S", dest="overrides", action="append", default=[], help="extra section.key=value")
    return p.parse_args()


def _final_itm_loss(loss_csv: Path, windows: int = 5) -> float:
    rows = list(csv.DictReader(loss_csv.open()))[-windows:]
    return sum(float(r["itm"]) for r in rows) / max(1, len(rows))


def _seen_split_accuracy(world: Path, eval_dir: Path) -> tuple[float, int, float, int]:
    """Caption accuracy on test images whose (colour, shape) pairs were all seen in training,
    and on those with a held-out pair (compositional generalisation)."""
    import json

    import pyarrow.parquet as pq

    from vlp_core.synthetic.world import Scene, check_caption

    holdout = {tuple(p) for p in json.loads((world / "world.json").read_text())["holdout_pairs"]}
    gt = {r["url"]: r["scene"] for r in pq.read_table(world / "ground_truth.parquet", columns=["url", "scene"]).to_pylist()}
    seen, unseen = [], []
    for r in pq.read_table(eval_dir / "captions.parquet").to_pylist():
        scene = Scene.from_json(gt[r["url"]])
        ok = bool(check_caption(r["generated"], scene)["all"])
        (unseen if any((o.colour, o.shape) in holdout for o in scene.objects) else seen).append(ok)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return mean(seen), len(seen), mean(unseen), len(unseen)


def _report(tag: str, m: dict, itm_loss: float | None, train_s: float, sps: float | None,
            split_acc: tuple[float, int, float, int] | None = None) -> None:
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    print(f"\n== {tag} ==")
    if itm_loss is not None:
        print(f"train time                 {train_s:7.1f} s   ({sps} samples/s)")
        print(f"ITM loss (last windows)    {itm_loss:7.3f}     guess level 0.637  (target well below 0.6)")
    print(f"ITM acc vs 1-attr swap     {pct(m.get('itm_acc_swap', float('nan')))}     chance 50.0%  (target > 80%)")
    print(f"ITM acc vs ITC-hard neg    {pct(m['itm_acc'])}     chance 50.0%")
    ch = (m["chance_tr_r1"] + m["chance_ir_r1"]) / 2
    print(f"R@1 mean (ITC+ITM rerank)  {m['r1_mean']:5.1f}%     chance {ch:4.1f}%   ratio {m['r1_mean'] / max(ch, 1e-9):6.1f}x"
          f"   (TR {m['tr_r1']:.1f} / IR {m['ir_r1']:.1f}; ITC only {m['itc_r1_mean']:.1f})")
    print(f"R@5 / R@10 (TR)            {m['tr_r5']:5.1f}% / {m['tr_r10']:5.1f}%")
    print(f"caption accuracy (greedy)  {pct(m.get('caption_acc', float('nan')))}     (target >= 50%)   "
          + "  ".join(f"{a} {pct(m.get('caption_acc_' + a, float('nan')))}" for a in ("colour", "shape", "size", "relation")))
    if split_acc:
        print(f"  seen compositions        {100 * split_acc[0]:5.1f}%  (n={split_acc[1]});  "
              f"held-out colour-shape pairs {100 * split_acc[2]:5.1f}%  (n={split_acc[3]})")
    print(f"BLEU-4 / CIDEr             {m['bleu4']:.3f} / {m['cider']:.3f}")
    print(f"eval time                  {m['seconds']:7.1f} s")


def main() -> int:
    apply_offline_env()
    a = _args()
    from vlp_core.models.families import FAMILIES
    from vlp_core.synthetic.make import run_synthetic_make

    fams = [f.strip() for f in a.family.split(",") if f.strip()]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown or not fams:
        raise SystemExit(f"--family: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(FAMILIES)})")
    # X-VLM's boxes come with the human split; every family measured beside it trains on it too
    with_human = a.n_human is not None or fams != ["blip"]
    a.n_human = 200 if a.n_human is None else a.n_human
    base = load_params(a.params, a.overrides) if a.params else load_params(None, a.overrides)
    out = Path(a.out)
    world_params = base.replace(**{"synthetic.n_web": a.n_train, "synthetic.n_human": a.n_human, "synthetic.n_test": a.n_test,
                                   "synthetic.noise_rate": a.noise, "synthetic.fail_rate": 0.0,
                                   "synthetic.seed": a.seed})
    world = out / f"world_{a.n_train}_{a.n_test}_{a.noise}_{a.seed}"
    t = time.perf_counter()
    run_synthetic_make(world_params, world)
    print(f"world: {world} ({time.perf_counter() - t:.1f} s)")
    train = dict(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup, lm_weight=a.lm_weight,
                 itm_weight=a.itm_weight, itc_weight=a.itc_weight, seed=a.seed, checkpoint_every=a.steps, log_every=20)
    sources = [(world / "web.parquet", "web")] + ([(world / "human.parquet", "human")] if with_human else [])
    rows = {}
    for family in fams:
        params: Params = world_params.replace(**{f"pretrain.{k}": v for k, v in train.items()}, **{"model.family": family})
        rows[family] = _run_family(a, params, world, out, sources, family)
    if len(fams) > 1:
        _side_by_side(rows, a)
    return 0


def _run_family(a, params: Params, world: Path, out: Path, sources: list, family: str) -> dict:
    """Pretrain (and fine-tune the captioner of) one family; its numbers for the side-by-side table."""
    from vlp_core.train.evaluate import run_evaluate
    from vlp_core.train.loop import run_finetune, run_pretrain

    tag = (f"s{a.steps}_b{a.batch}_lr{a.lr:g}_w{a.warmup}_lm{a.lm_weight:g}_itm{a.itm_weight:g}_seed{a.seed}"
           + ("" if family == "blip" else f"_{family}") + ("_h" if len(sources) > 1 else ""))
    run = out / f"pretrain_{tag}"
    shutil.rmtree(run, ignore_errors=True)
    print(f"pretrain: {tag}")
    stats = run_pretrain(params, sources, run)
    test = (world / "test.parquet", "human")
    gt = world / "ground_truth.parquet"
    m = run_evaluate(params, run / "model", test, run / "eval", ground_truth=gt)
    itm_loss = _final_itm_loss(run / "loss.csv")
    _report(f"pretrained ({tag})", m, itm_loss, stats.extra["train_seconds"],
            stats.extra["samples_per_s"], _seen_split_accuracy(world, run / "eval"))
    train_s, caption_m = float(stats.extra["train_seconds"]), m
    if a.captioner_steps:
        ft = params.replace(**{"finetune.captioner.steps": a.captioner_steps, "finetune.captioner.batch_size": a.batch,
                               "finetune.captioner.checkpoint_every": a.captioner_steps})
        cap = out / f"captioner_{tag}_c{a.captioner_steps}"
        shutil.rmtree(cap, ignore_errors=True)
        st = run_finetune(ft, "captioner", sources, run / "model", cap)
        mc = run_evaluate(ft, cap / "model", test, cap / "eval", ground_truth=gt)
        _report(f"+ captioner fine-tune {a.captioner_steps} steps ({st.extra['train_seconds']:.0f} s)"
                " -- its ITM head is not trained here; read ITM from the pretrained model", mc, None, 0, None,
                _seen_split_accuracy(world, cap / "eval"))
        train_s, caption_m = train_s + float(st.extra["train_seconds"]), mc
    _targets(itm_loss, m, caption_m, train_s, a.budget_s)
    return {"pre": m, "cap": caption_m, "itm_loss": itm_loss, "train_s": train_s}


def _side_by_side(rows: dict, a) -> None:
    """The families at equal steps: what issue 21 asks X-VLM to move."""
    pct = lambda v: f"{100 * v:6.1f}%"  # noqa: E731
    fams = list(rows)
    cap_note = f"captioner ({a.captioner_steps} steps)" if a.captioner_steps else "pretrained model"
    print(f"\nSIDE BY SIDE ({a.steps} pretraining steps, {a.captioner_steps} captioner steps, batch {a.batch}, "
          f"seed {a.seed}, {a.n_train} web + {a.n_human} human pairs)")
    print(f"{'':34s}" + "".join(f"{f:>10s}" for f in fams))
    lines = [
        (f"relation-direction acc ({cap_note})", lambda r: pct(r["cap"].get("caption_acc_relation", float("nan")))),
        (f"shape acc ({cap_note})", lambda r: pct(r["cap"].get("caption_acc_shape", float("nan")))),
        (f"caption acc, all right", lambda r: pct(r["cap"].get("caption_acc", float("nan")))),
        ("ITM acc vs 1-attr swap (pretrained)", lambda r: pct(r["pre"].get("itm_acc_swap", float("nan")))),
        ("ITM acc vs ITC-hard neg (pretrained)", lambda r: pct(r["pre"]["itm_acc"])),
        ("R@1 mean (pretrained)", lambda r: f"{r['pre']['r1_mean']:6.1f}%"),
        ("train time", lambda r: f"{r['train_s']:6.0f} s"),
    ]
    for name, fmt in lines:
        print(f"{name:34s}" + "".join(f"{fmt(rows[f]):>10s}" for f in fams))


def _targets(itm_loss: float, pre: dict, cap: dict, train_s: float, budget_s: float) -> None:
    """One line per issue-4 target, marked MET or NOT MET from the numbers above."""
    rows = [
        ("ITM loss well below 0.6 (<= 0.4)", f"{itm_loss:.3f}", itm_loss <= 0.4),
        ("ITM acc vs ITC-hard negatives > 80%", f"{100 * pre['itm_acc']:.1f}%", pre["itm_acc"] > 0.8),
        ("ITM acc vs one-attribute swaps > 80%", f"{100 * pre.get('itm_acc_swap', 0.0):.1f}%",
         pre.get("itm_acc_swap", 0.0) > 0.8),
        ("caption accuracy >= 50%", f"{100 * cap.get('caption_acc', 0.0):.1f}%", cap.get("caption_acc", 0.0) >= 0.5),
        (f"training time <= ~{budget_s / 60:.0f} min (+10%)", f"{train_s:.0f} s", train_s <= 1.1 * budget_s),
    ]
    print("\nTARGETS (issue 4)")
    for name, value, ok in rows:
        print(f"  [{'MET' if ok else 'NOT MET':7s}] {name:40s} {value}")


if __name__ == "__main__":
    sys.exit(main())
