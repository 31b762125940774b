"""What one training step costs, per loss: where the pretraining time goes.

    .venv/bin/python bench/step_cost.py                 # tiny arch, batch 64, 12 steps per row
    .venv/bin/python bench/step_cost.py --arch tiny-vit --batch 32

It makes a small clean synthetic world, builds a fresh model of ``--arch`` and times the
median of ``--steps`` forward + backward + AdamW steps (the first 2 dropped as warm-up) for
the full ITC+ITM+LM objective and for each loss alone, side by side in one process, with
and without ``torch.use_deterministic_algorithms`` (the training loop turns it on on CPU
so that resumes are bit-exact).  bench/learn.py's recipe follows from it: an LM-only step
(the captioner fine-tune) costs well under half a full pretraining step.  Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402

OBJECTIVES = (("ITC+ITM+LM", {"itc": 1.0, "itm": 1.0, "lm": 1.0}), ("ITC only", {"itc": 1.0, "itm": 0.0, "lm": 0.0}),
              ("ITM only", {"itc": 0.0, "itm": 1.0, "lm": 0.0}), ("LM only", {"itc": 0.0, "itm": 0.0, "lm": 1.0}))


def main() -> int:
    apply_offline_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_step_cost")
    p.add_argument("--arch", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be at least 3 (the first 2 are warm-up)")

    import torch

    from vlp_core.config import load_params
    from vlp_core.synthetic.make import run_synthetic_make
    from vlp_core.train.data import PairDataset, decode_pairs, epoch_batches, get_batch, load_pairs
    from vlp_core.train.loop import _image_size, _new_model, set_entry_threads

    set_entry_threads()
    params = load_params(None, [f"model.arch={a.arch}", "synthetic.n_web=2000", "synthetic.n_human=10",
                                "synthetic.n_test=10", "synthetic.noise_rate=0.0", "synthetic.fail_rate=0.0"])
    world = Path(a.out) / "world"
    run_synthetic_make(params, world)
    table = load_pairs([(world / "web.parquet", "web")])
    model = _new_model(params, table.column("text").to_pylist())
    data = PairDataset(decode_pairs(table, _image_size(model)))
    batches = epoch_batches(len(data), a.batch, 0, 0, 0, 1)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()

    def median_step(weights: dict[str, float], deterministic: bool) -> float:
        torch.use_deterministic_algorithms(deterministic)
        times = []
        for i in range(a.steps):
            pixels, texts, idx = get_batch(data, batches[i % len(batches)])
            t = time.perf_counter()
            out = model(model.preprocess(pixels), texts, image_idx=idx, weights=weights)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[2:])

    before = torch.are_deterministic_algorithms_enabled()
    print(f"arch {a.arch}, batch {a.batch}, {torch.get_num_threads()} threads, median of {a.steps - 2} steps")
    print(f"{'objective':12s} {'deterministic':>14s} {'default':>9s}   share of a full step")
    rows = [(name, median_step(w, True), median_step(w, False)) for name, w in OBJECTIVES]
    full = rows[0][1]  # OBJECTIVES starts with the full objective
    for name, det, fast in rows:
        print(f"{name:12s} {det:12.3f} s {fast:7.3f} s   {det / full:5.2f}")
    torch.use_deterministic_algorithms(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
