"""Benchmark: CapFilt (`run_capfilt`, the function behind `vlp capfilt`) against plain transformers.

All in one run, on a synthetic world packed into webdataset tar shards (img2dataset's layout):

1. **Throughput**, images/s, K=1 caption (nucleus, top_p 0.9, BLIP's prompt) + ITC + ITM on
   both candidates (web alt-text and the caption):
   * ours: ``run_capfilt`` end to end (tar read, decode, one vision pass, batched KV-cached
     generation, filter, Parquet write) on a vlp checkpoint of the exportable ``tiny-vit``
     architecture (captioner = filter);
   * baseline: the same weights exported to Hugging Face BLIP folders, run the way the
     transformers docs show: ``BlipProcessor`` -> ``BlipForConditionalGeneration.generate``,
     then ``BlipForImageTextRetrieval`` with ``use_itm_head=True`` (ITM) and ``False`` (ITC)
     on every (image, candidate) pair;
   same images, same batch size, same decoding settings; alternated rounds, medians.
   (Without ``vlp_core.models.hf`` the two sides run on the same random HF BLIP folders;
   ours then uses its HF backend.)
2. **Memory**: peak RSS of ``run_capfilt`` in fresh subprocesses at 2k and 20k images.
3. **Detection quality**: a small filter pretrained briefly on the clean split; precision,
   recall and ROC-AUC of CapFilt's keep rule (calibrated threshold) per injected noise kind.

    .venv/bin/python bench/capfilt.py [--n-throughput 1000] [--batch-size 64] [--rounds 2]
        [--mem-sizes 2000,20000] [--quality-steps 600] [--skip-memory] [--skip-quality]

``--arch blip-base`` measures something else (issue 20, :mod:`bench.capfilt_base`): base-size
random BLIP folders at 384 px, ours (``capfilt.precision`` auto and fp32) against transformers in
fp32 and in bf16 autocast, with the bf16/fp32 decision agreement; ``--arch smoke`` is the same at
a tiny size (a check that the script runs)::

    .venv/bin/python bench/capfilt.py --arch blip-base [--n-throughput 16] [--batch-size 8] [--rounds 3]
        [--max-new-tokens 20] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMALL_ARCH = {"vision": "vlp_cnn_tiny", "vision_kwargs": {"widths": [16, 32, 64], "depth": 1, "num_heads": 2},
              "image_size": 48, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64, "embed_dim": 64, "queue_size": 128}


# --------------------------------------------------------------------------- data
def pack_world(world: Path, split: str, out: Path, n: int, per_shard: int = 1000) -> Path:
    """The first ``n`` rows of a world split as img2dataset-style tar shards + manifest.parquet."""
    from vlp_core.schema import MANIFEST_SCHEMA, C, conform

    out.mkdir(parents=True, exist_ok=True)
    t = pq.read_table(world / f"{split}.parquet").slice(0, n)
    gt = {r["url"]: r["fail_kind"] for r in pq.read_table(world / "ground_truth.parquet",
                                                         columns=["url", "fail_kind"]).to_pylist()}
    rows, tar, tar_path = [], None, None
    for i, (path, cap) in enumerate(zip(t["url_path"].to_pylist(), t["caption"].to_pylist())):
        if i % per_shard == 0:
            if tar:
                tar.close()
            tar_path = out / "shards" / f"{i // per_shard:05d}.tar"
            tar_path.parent.mkdir(parents=True, exist_ok=True)
            tar = tarfile.open(tar_path, "w")
        key = f"{i // per_shard:05d}{i % per_shard:04d}"
        f = world / "www" / path.lstrip("/")
        ok = gt.get(path) is None and f.is_file()
        if ok:
            tar.add(f, arcname=f"{key}.jpg")
        rows.append({C.ROW: i, C.URL: path, C.CAPTION: cap, C.STATUS: "success" if ok else "failed_to_download",
                     C.KEY: key, C.SHARD: str(tar_path) if ok else None})
    if tar:
        tar.close()
    pq.write_table(conform(pa.Table.from_pylist(rows), MANIFEST_SCHEMA), out / "manifest.parquet")
    return out


def lm_train_hf(cap_dir: Path, world: Path, steps: int, prompt: str, batch_size: int = 32) -> float:
    """A few LM steps on the clean split, so captions end with [SEP] at natural lengths as a
    trained captioner's do (random weights run every caption to max_length)."""
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    t0 = time.perf_counter()
    model = BlipForConditionalGeneration.from_pretrained(str(cap_dir)).train()
    proc = BlipProcessor.from_pretrained(str(cap_dir))
    t = pq.read_table(world / "human.parquet").to_pylist()
    rows = [r for r in t if r["caption"] and (world / "www" / r["url_path"].lstrip("/")).is_file()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    bos = model.config.text_config.bos_token_id
    for _ in range(steps):
        batch = [rows[i] for i in rng.choice(len(rows), batch_size, replace=False)]
        images = [Image.open(world / "www" / r["url_path"].lstrip("/")).convert("RGB") for r in batch]
        enc = proc(images=images, text=[prompt + r["caption"] for r in batch], padding=True, return_tensors="pt")
        enc["input_ids"][:, 0] = bos  # decode starts from [DEC], as generate() does
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(str(cap_dir))
    print(f"captioner: {steps} LM steps on the clean split in {time.perf_counter() - t0:.0f}s, last loss {loss.item():.2f}")
    return float(loss.item())


def make_models(world: Path, root: Path, train_steps: int, prompt: str) -> dict:
    """A ``tiny-vit`` vlp checkpoint (briefly LM-trained) and its HF export (or, without the
    exporter, HF BLIP folders of the same shape, the captioner briefly LM-trained, used by both sides)."""
    import torch

    from vlp_core.models import create_model, train_tokenizer

    torch.manual_seed(0)
    caps = [c for c in pq.read_table(world / "human.parquet")["caption"].to_pylist() if c]
    tok = train_tokenizer(caps, vocab_size=256)
    try:
        from vlp_core.models import hf
    except ImportError:
        hf = None
    if hf is not None and hasattr(hf, "export_captioner") and hasattr(hf, "export_filter"):
        vlp_dir = create_model("tiny-vit", tok).save_pretrained(root / "vlp_model")
        if train_steps:
            from vlp_core.config import load_params
            from vlp_core.train.loop import run_pretrain

            tok_dir = vlp_dir / "tokenizer"
            p = load_params(str(REPO / "params.yaml"), [
                "model.arch=tiny-vit", f"model.tokenizer={tok_dir}", f"pretrain.steps={train_steps}",
                "pretrain.batch_size=32", "pretrain.warmup_steps=10", "pretrain.checkpoint_every=100000"])
            t0 = time.perf_counter()
            run_pretrain(p, [(world / "human.parquet", "human")], root / "vlp_pretrain")
            vlp_dir = root / "vlp_pretrain" / "model"
            print(f"model: tiny-vit pretrained {train_steps} steps in {time.perf_counter() - t0:.0f}s")
        cap_dir, itm_dir = root / "hf_captioner", root / "hf_itm"
        hf.export_captioner(vlp_dir, cap_dir)
        hf.export_filter(vlp_dir, itm_dir)
        return {"ours_captioner": vlp_dir, "ours_filter": vlp_dir, "hf_captioner": cap_dir, "hf_itm": itm_dir,
                "same_weights": "vlp tiny-vit checkpoint exported with vlp_core.models.hf"}
    sys.path.insert(0, str(REPO / "tests"))
    from test_capfilt_hf import make_hf_blip

    dims = dict(hidden=128, text_layers=3, vision_layers=4)  # tiny-vit's shape
    cap_dir = make_hf_blip(root / "hf_captioner", "BlipForConditionalGeneration", tok, **dims)
    if train_steps:
        lm_train_hf(cap_dir, world, train_steps, prompt)
    itm_dir = make_hf_blip(root / "hf_itm", "BlipForImageTextRetrieval", tok, seed=1, **dims)
    # as an export of one checkpoint would be: the captioner and the filter share the vision encoder
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cap = BlipForConditionalGeneration.from_pretrained(str(cap_dir))
    itm = BlipForImageTextRetrieval.from_pretrained(str(itm_dir))
    itm.vision_model.load_state_dict(cap.vision_model.state_dict())
    itm.save_pretrained(str(itm_dir))
    return {"ours_captioner": cap_dir, "ours_filter": itm_dir, "hf_captioner": cap_dir, "hf_itm": itm_dir,
            "same_weights": f"HF BLIP folders of tiny-vit's shape (captioner LM-trained {train_steps} steps) sharing "
                            "one vision encoder (vlp_core.models.hf not available): both sides load them"}


# --------------------------------------------------------------------------- the two sides
def run_ours(params, manifest: Path, models: dict, out: Path, device: Optional[str] = None) -> tuple[int, float]:
    from vlp_core.capfilt.stage import run_capfilt

    t0 = time.perf_counter()
    stats = run_capfilt(params, manifest, models["ours_captioner"], models["ours_filter"], out, device=device)
    return stats.extra["images"], time.perf_counter() - t0


class Baseline:
    """CapFilt the transformers way (BlipProcessor + generate + BlipForImageTextRetrieval), on
    ``device``; ``run(..., bf16=True)`` runs it under bf16 autocast (the documented way to use
    bf16 with the fp32 checkpoints)."""

    def __init__(self, models: dict, cp, device: str = "cpu"):
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

        self.cp, self.device = cp, device
        self.proc = BlipProcessor.from_pretrained(str(models["hf_captioner"]))
        self.proc_itm = BlipProcessor.from_pretrained(str(models["hf_itm"]))
        self.cap = BlipForConditionalGeneration.from_pretrained(str(models["hf_captioner"])).to(device).eval()
        self.itm = BlipForImageTextRetrieval.from_pretrained(str(models["hf_itm"])).to(device).eval()

    def run(self, manifest: Path, out: Path, bf16: bool = False) -> tuple[int, float]:
        import contextlib
        import io

        import torch
        from PIL import Image

        from vlp_core.shards import ShardReader

        cp, dev = self.cp, self.device
        cast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t0 = time.perf_counter()
        m = pq.read_table(manifest).to_pylist()
        rows = [r for r in m if r["status"] == "success"]
        reader = ShardReader()
        n_prompt = len(self.proc.tokenizer(cp.prompt)["input_ids"]) - 1
        results = []
        with torch.no_grad(), cast:
            for s in range(0, len(rows), cp.batch_size):
                batch = rows[s:s + cp.batch_size]
                images = [Image.open(io.BytesIO(reader.read_bytes(r["shard"], r["key"]))).convert("RGB") for r in batch]
                inputs = self.proc(images=images, text=[cp.prompt] * len(images), return_tensors="pt").to(dev)
                gen = self.cap.generate(**inputs, do_sample=True, top_p=cp.top_p, top_k=0,
                                        max_length=n_prompt + cp.max_length, min_length=n_prompt + cp.min_length)
                caps = [c[len(cp.prompt):].strip() if c.startswith(cp.prompt.strip()) else c.strip()
                        for c in self.proc.batch_decode(gen, skip_special_tokens=True)]
                texts = [r["caption"] or "" for r in batch] + caps
                enc = self.proc_itm(images=images + images, text=texts, padding=True, truncation=True,
                                    max_length=35, return_tensors="pt").to(dev)
                itm = self.itm(**enc, use_itm_head=True).itm_score.float().softmax(-1)[:, 1].cpu()
                itc = self.itm(**enc, use_itm_head=False).itm_score.float().diagonal().cpu()
                results.append(pa.table({"key": [r["key"] for r in batch] * 2, "text": texts,
                                         "itc": itc.numpy(), "itm": itm.numpy(),
                                         "kept": (itm > cp.itm_threshold).numpy()}))
        pq.write_table(pa.concat_tables(results), out)
        return len(rows), time.perf_counter() - t0


# --------------------------------------------------------------------------- memory
def mem_child(manifest: str, models_json: str, out: str, overrides: list[str]) -> None:
    import resource

    import torch

    from vlp_core.config import load_params

    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
    params = load_params(str(REPO / "params.yaml"), overrides)
    models = json.loads(models_json)
    # warm-up on the first 64 rows: imports, model load, first batches (torch alone is ~0.5 GB)
    warm = Path(out + "_warm.parquet")
    pq.write_table(pq.read_table(Path(manifest) / "manifest.parquet").slice(0, 64), warm)
    run_ours(params, warm, models, Path(out + "_warm"))
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import psutil

    proc = psutil.Process()
    samples = []  # current RSS sampled while the run goes (the high-water mark alone is set by imports)
    import threading

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(proc.memory_info().rss / 2 ** 20)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    n, secs = run_ours(params, Path(manifest), models, Path(out))
    stop.set()
    th.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": n, "seconds": secs, "peak_rss_mb": peak, "after_load_mb": after_load,
                      "max_sampled_rss_mb": max(samples, default=0.0)}))


def measure_memory(root: Path, world: Path, sizes: list[int], models: dict, overrides: list[str]) -> list[dict]:
    out = []
    for n in sizes:
        ing = pack_world(world, "web", root / f"mem_{n}", n)
        cmd = [sys.executable, __file__, "--_mem-child", str(ing), "--_models", json.dumps({k: str(v) for k, v in
                                                                                             models.items()}),
               "--_out", str(root / f"mem_out_{n}")] + [a for o in overrides for a in ("-S", o)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"memory run at {n} failed:\n{r.stderr[-3000:]}")
        out.append({"n": n, **json.loads(r.stdout.strip().splitlines()[-1])})
    return out


# --------------------------------------------------------------------------- quality
def measure_quality(root: Path, world: Path, steps: int, n_web: int, overrides: list[str]) -> tuple[dict, float]:
    from vlp_core.capfilt.quality import detection_report
    from vlp_core.capfilt.stage import run_capfilt
    from vlp_core.config import load_params
    from vlp_core.train.loop import run_pretrain

    arch = root / "small.json"
    arch.write_text(json.dumps(SMALL_ARCH))
    params = load_params(str(REPO / "params.yaml"), [
        f"model.arch={arch}", "model.vocab_size=128", f"pretrain.steps={steps}", "pretrain.batch_size=64",
        "pretrain.lr=0.002", "pretrain.warmup_steps=20", "pretrain.lm_weight=0.0", "pretrain.checkpoint_every=100000",
        "capfilt.num_captions=0", "capfilt.threshold_mode=calibrated", "capfilt.calibrate_percentile=10", *overrides])
    t0 = time.perf_counter()
    run_pretrain(params, [(world / "human.parquet", "human")], root / "q_pretrain")
    train_s = time.perf_counter() - t0
    web = pack_world(world, "web", root / "q_web", n_web)
    # calibration on clean pairs the filter did not train on: the tail of the human split
    human = pack_world(world, "human", root / "q_human_all", 10 ** 9)
    t = pq.read_table(human / "manifest.parquet")
    cal = root / "q_cal.parquet"
    pq.write_table(t.slice(max(0, t.num_rows - 500)), cal)
    run_capfilt(params, web, root / "q_pretrain" / "model", root / "q_pretrain" / "model", root / "q_out",
                calibration=cal)
    return detection_report(root / "q_out", world / "ground_truth.parquet"), train_s


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["tiny-vit", "blip-base", "smoke"], default="tiny-vit",
                    help="tiny-vit: throughput, memory, quality (below); blip-base / smoke: the precision comparison")
    ap.add_argument("--n-throughput", type=int, default=None, help="images (default 1000; blip-base 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64; blip-base 8")
    ap.add_argument("--rounds", type=int, default=None, help="default 2; blip-base 3")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="blip-base: caption length cap")
    ap.add_argument("--device", default=None, help="blip-base: cpu or cuda (default: cuda if available)")
    ap.add_argument("--train-steps", type=int, default=150, help="LM steps for the captioner (0 = random weights)")
    ap.add_argument("--mem-sizes", default="2000,20000")
    ap.add_argument("--quality-steps", type=int, default=600)
    ap.add_argument("--quality-web", type=int, default=4000)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    ap.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    ap.add_argument("--_models", dest="models", help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from vlp_core.env import apply_offline_env

    apply_offline_env()
    if args.mem_child:
        return mem_child(args.mem_child, args.models, args.out, args.overrides)
    small = args.arch == "tiny-vit"
    args.n_throughput = args.n_throughput or (1000 if small else 16)
    args.batch_size = args.batch_size or (64 if small else 8)
    args.rounds = args.rounds or (2 if small else 3)

    import torch

    if not small:
        from capfilt_base import run as run_precision

        torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
        root = Path(tempfile.mkdtemp(prefix=f"bench-capfilt-{args.arch}-"))
        try:
            rc = run_precision(args, root, Baseline, pack_world, run_ours)
        finally:
            if not args.keep:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(rc)

    from vlp_core.capfilt.backend import clear_backend_cache
    from vlp_core.config import load_params
    from vlp_core.synthetic.make import run_synthetic_make

    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
    mem_sizes = [int(x) for x in args.mem_sizes.split(",") if x]
    overrides = [f"capfilt.batch_size={args.batch_size}", "capfilt.num_captions=1", "capfilt.decode=nucleus",
                 "capfilt.threshold_mode=fixed", *args.overrides]
    params = load_params(str(REPO / "params.yaml"), overrides)
    root = Path(tempfile.mkdtemp(prefix="bench-capfilt-"))
    n_web = max([args.n_throughput, args.quality_web] + mem_sizes)
    t0 = time.perf_counter()
    run_synthetic_make(load_params(str(REPO / "params.yaml"), [
        f"synthetic.n_web={n_web}", "synthetic.n_human=4000", "synthetic.n_test=10"]), root / "world")
    world = root / "world"
    print(f"world: {n_web} web + 4000 human images at 48 px in {time.perf_counter() - t0:.1f}s ({root})")

    # ---- 1. throughput
    models = make_models(world, root, args.train_steps, params.capfilt.prompt)
    cp = params.capfilt
    print(f"models: {models['same_weights']}")
    print(f"settings: K=1 {cp.decode} top_p={cp.top_p} prompt={cp.prompt!r} length {cp.min_length}-{cp.max_length}, "
          f"batch {cp.batch_size}, torch threads {torch.get_num_threads()}")
    tp = pack_world(world, "web", root / "tp", args.n_throughput)
    warm = pack_world(world, "web", root / "warm", min(2 * args.batch_size, args.n_throughput))
    base = Baseline(models, cp)
    run_ours(params, warm / "manifest.parquet", models, root / "warm_ours")  # load + warm caches
    base.run(warm / "manifest.parquet", root / "warm_base.parquet")
    ours_ips, base_ips = [], []
    for r in range(args.rounds):
        order = [("ours", 0), ("base", 1)] if r % 2 == 0 else [("base", 1), ("ours", 0)]
        for side, _ in order:
            if side == "ours":
                n, s = run_ours(params, tp / "manifest.parquet", models, root / f"tp_ours_{r}")
                ours_ips.append(n / s)
            else:
                n, s = base.run(tp / "manifest.parquet", root / f"tp_base_{r}.parquet")
                base_ips.append(n / s)
            print(f"  round {r} {side:>8}: {n} images in {s:6.1f}s = {n / s:7.1f} img/s")
    om, bm = statistics.median(ours_ips), statistics.median(base_ips)
    stats = json.loads((root / "tp_ours_0" / "stats.json").read_text())
    print(f"THROUGHPUT (median img/s): ours {om:.1f} | transformers baseline {bm:.1f} | ratio {om / bm:.2f}x "
          f"(target >= 2x); ours ran {stats['extra'].get('vision_passes')} vision batches for "
          f"{stats['extra']['images']} images")
    del base
    clear_backend_cache()

    # ---- 2. memory
    if not args.skip_memory:
        mem = measure_memory(root, world, mem_sizes, models, overrides)
        for m in mem:
            print(f"  memory: {m['n']:>6} web rows -> {m['images']} images in {m['seconds']:.1f}s "
                  f"({m['images'] / m['seconds']:.1f} img/s), peak RSS {m['peak_rss_mb']:.0f} MB "
                  f"(after imports + model load + 64 images: {m['after_load_mb']:.0f} MB; "
                  f"largest RSS sampled during the run {m['max_sampled_rss_mb']:.0f} MB)")
        if len(mem) >= 2:
            a, b = mem[0]["peak_rss_mb"], mem[-1]["peak_rss_mb"]
            print(f"MEMORY: peak RSS {mem[-1]['n']} / {mem[0]['n']} images = {b / a:.3f} "
                  f"({(b / a - 1) * 100:+.1f}%, target within 15%); largest sampled RSS "
                  f"{mem[-1]['max_sampled_rss_mb']:.0f} vs {mem[0]['max_sampled_rss_mb']:.0f} MB "
                  f"({(mem[-1]['max_sampled_rss_mb'] / mem[0]['max_sampled_rss_mb'] - 1) * 100:+.1f}%)")

    # ---- 3. quality
    if not args.skip_quality:
        from vlp_core.capfilt.quality import format_report

        report, train_s = measure_quality(root, world, args.quality_steps, args.quality_web, args.overrides)
        print(f"DETECTION (filter pretrained {args.quality_steps} steps = {train_s:.0f}s on the clean split; "
              f"calibrated threshold, 10th percentile of held-out clean pairs; {args.quality_web} web rows):")
        print(format_report(report))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
