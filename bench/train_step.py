"""One pretraining step (ITC+ITM+LM, forward + backward + AdamW) in fp32 vs under bf16 autocast.

    .venv/bin/python bench/train_step.py --arch blip-base --device cuda --batch 32   # bench/gpu.sh
    .venv/bin/python bench/train_step.py --arch tiny --batch 64                      # a CPU check

A fresh model of ``--arch`` on a small clean synthetic world (images at the model's size), the
step the training loop runs (``vlp_core/train/loop.py``: the same ``model(...)`` call, bf16 the
way ``model.precision`` turns it on: ``torch.autocast(device, bfloat16)``, weights fp32).
Both precisions are timed in one process, in alternated rounds of ``--steps`` steps (the first
2 steps of each round dropped as warm-up); the result is the median step time of each and
the ratio.  The machine's cores are shared with other jobs, so only the ratio counts.  Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402


def main() -> int:
    apply_offline_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_train_step")
    p.add_argument("--arch", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="steps per round (the first 2 are warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be at least 3 (the first 2 are warm-up)")

    import torch

    from vlp_core.capfilt.backend import pick_device
    from vlp_core.config import load_params
    from vlp_core.precision import autocast_for, cpu_has_bf16
    from vlp_core.synthetic.make import run_synthetic_make
    from vlp_core.train.data import PairDataset, decode_pairs, epoch_batches, get_batch, load_pairs
    from vlp_core.train.loop import _image_size, _new_model, set_entry_threads

    set_entry_threads()
    dev = pick_device(a.device)
    params = load_params(None, [f"model.arch={a.arch}", "synthetic.n_web=256", "synthetic.n_human=10",
                                "synthetic.n_test=10", "synthetic.noise_rate=0.0", "synthetic.fail_rate=0.0"])
    world = Path(a.out) / "world"
    run_synthetic_make(params, world)
    table = load_pairs([(world / "web.parquet", "web")])
    model = _new_model(params, table.column("text").to_pylist()).to(dev)
    data = PairDataset(decode_pairs(table, _image_size(model)))
    batches = epoch_batches(len(data), a.batch, 0, 0, 0, 1)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    model.train()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def round_of_steps(precision: str) -> list[float]:
        times = []
        for i in range(a.steps):
            pixels, texts, idx = get_batch(data, batches[i % len(batches)])
            sync()
            t = time.perf_counter()
            with autocast_for(precision, dev):
                out = model(model.preprocess(pixels).to(dev), texts, image_idx=idx.to(dev))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            sync()
            times.append(time.perf_counter() - t)
        return times[2:]

    n_params = sum(q.numel() for q in model.parameters()) / 1e6
    extra = f", native bf16 CPU: {cpu_has_bf16()}, {torch.get_num_threads()} threads" if dev.type == "cpu" else \
        f", {torch.cuda.get_device_name(dev)}"
    print(f"arch {a.arch} ({n_params:.0f}M parameters, {_image_size(model)} px), batch {a.batch}, device {dev}{extra}; "
          f"{a.rounds} alternated rounds of {a.steps} steps (2 warm-up)")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(a.rounds):
        for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            t = round_of_steps(precision)
            times[precision] += t
            print(f"  round {r} {precision}: median {statistics.median(t):.3f} s/step", flush=True)
    f32, b16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"TRAIN STEP ({a.arch}, batch {a.batch}, {dev.type}): fp32 {f32:.3f} s, bf16 autocast {b16:.3f} s, "
          f"bf16 {f32 / b16:.2f}x faster (medians of {len(times['fp32'])} steps each; only the ratio counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
