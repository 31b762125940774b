"""The training loop: ``run_pretrain`` and ``run_finetune`` (captioner or filter).

One loop serves both.  It reads pairs (:mod:`vlp_core.train.data`), builds or loads a
:class:`vlp_core.models.BlipMED` or another family's model (a
:class:`vlp_core.models.vilbert.ViLBERT`'s ``prepare_training`` hook fits its region codebook
before a fresh run's first step), and runs a fixed number of AdamW steps with linear warmup then
cosine decay (:mod:`vlp_core.train.schedule`).  The loss is
``itc_weight * ITC + itm_weight * ITM + lm_weight * LM`` from the section's
:class:`~vlp_core.config.TrainParams`; a model whose family trains on box annotations (X-VLM,
``uses_regions``) also gets each pair's ``regions`` and adds its region losses
(:mod:`vlp_core.models.xvlm`).

Outputs under ``out_dir``::

    checkpoint/model/            save_pretrained (safetensors + config + tokenizer), every
    checkpoint/trainer_state.pt  ``checkpoint_every`` steps: full model state (momentum
                                 encoders and queues too), optimizer, scheduler, RNG, step,
                                 and the EMA's state when ``ema_decay > 0``
    model/                       the final model (save_pretrained): the live weights, or their
                                 EMA (:mod:`vlp_core.train.ema`) when ``ema_decay > 0``
    loss.csv                     step, loss, itc, itm, lm, lr (mean over each log window)
    stats.json                   StageStats

A rerun resumes from ``checkpoint/`` and gives the same final weights as an uninterrupted run
(data order is a pure function of (seed, epoch), and the RNG state is restored).  It resumes
only when the run's fingerprint (:func:`train_fingerprint`: stage, settings, sources and a
hash of their Parquet files, model) is the checkpoint's; else it stops with one line saying
what differs (``fresh=True`` / ``--fresh`` starts over).  ``stats.json`` records it too.

Scale: launched by ``torchrun`` (``WORLD_SIZE > 1``) it initialises ``gloo`` (CPU) or
``nccl`` (CUDA), gives each rank its share of every batch (``batch_size`` is the *global*
batch) and wraps the model in DDP; the model's ITC gathers features across ranks.  Only rank
0 writes files.  The forward pass runs under bf16 autocast where ``model.precision`` says so
(:mod:`vlp_core.precision`: by default on CUDA and on CPUs with native bf16).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import ctypes
import ctypes.util
import hashlib
import json
import logging
import logging.handlers
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from vlp_core import models
from vlp_core.config import EMA_KEYS, ZERO_OFF_KEYS, Params, TrainParams
from vlp_core.env import keep_freed_memory
from vlp_core.errors import VlpError
from vlp_core.holdout import held_out
from vlp_core.io import StageStats, atomic_path
from vlp_core.layout import as_written, resolve
from vlp_core.models.hf import import_hf, is_hf_blip_dir
from vlp_core.precision import arithmetic, use_bf16
from vlp_core.train.data import (PairDataset, Source, batch_regions, decode_pairs, epoch_batches, get_batch,
                                 load_pairs, source_files)
from vlp_core.train.ema import WeightEma
from vlp_core.train.hardneg import HardNegatives
from vlp_core.train.schedule import make_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
LOSS_CSV = "loss.csv"
DEFAULT_LOSS_NAMES = ("itc", "itm", "lm")  # BLIP's; a model class may name its own (``LOSS_NAMES``)
LOSS_FIELDS = ("step", "loss", *DEFAULT_LOSS_NAMES, "lr")
TRAINER_STATE = "trainer_state.pt"
Target = Literal["captioner", "filter"]


class TrainError(VlpError, RuntimeError):
    """A training run that cannot start (bad init dir, too little data...)."""


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistInfo:
    """Read torchrun's environment; initialise the process group when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank, world, local, device)


def set_entry_threads() -> None:
    """2 CPU threads (``TORCH_NUM_THREADS`` overrides), split between local ranks."""
    total = int(os.environ.get("TORCH_NUM_THREADS", "2"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, total // max(1, local_world)))
    keep_freed_memory()  # glibc: no unmap/page-fault churn of the step's buffers (vlp_core.env)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_sha256(model: torch.nn.Module, params_only: bool = False) -> str:
    """A hash of every parameter and buffer, or of the parameters only (to check that DDP
    ranks agree)."""
    h = hashlib.sha256()
    items = dict(model.named_parameters()) if params_only else model.state_dict()
    for name, t in sorted(items.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- model
def _load_model(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise TrainError(f"{path}: model folder not found")
    if is_hf_blip_dir(path):  # a Hugging Face BLIP folder (e.g. an official checkpoint)
        return import_hf(path)
    return models.load_model(path)  # the family its config.json names


def _new_model(params: Params, captions: Sequence[str], root: str | Path = "."):
    mp = params.model
    if mp.tokenizer:  # a folder, relative to the work dir ``root``
        tokenizer = models.load_tokenizer(resolve(mp.tokenizer, root))
    else:
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist_on else 0
        tokenizer = models.train_tokenizer(captions, vocab_size=mp.vocab_size) if rank == 0 else None
        if dist_on:  # WordPiece training is not bit-stable: every rank takes rank 0's
            box = [tokenizer]
            torch.distributed.broadcast_object_list(box, src=0)
            tokenizer = box[0]
    # model.family at its default (blip) lets an architecture that names its family (vilbert-tiny) build it
    family = models.fresh_family(mp.arch, mp.family)
    return models.create_model(mp.arch, tokenizer=tokenizer, family=family, max_text_len=mp.max_text_len)


def _image_size(model) -> int:
    return int(model.config.image_size)


# --------------------------------------------------------------------------- checkpoints
def _sync_buffers(model: torch.nn.Module) -> None:
    """Take rank 0's buffers (BatchNorm statistics, queues), as DDP does before each forward."""
    for b in model.buffers():
        torch.distributed.broadcast(b.data, src=0)


def _save_checkpoint(out_dir: Path, model, optimizer, scheduler, step: int, extra: dict[str, Any]) -> None:
    """Write ``checkpoint/`` atomically: build it beside, then swap it in.  ``checkpoint/model/``
    holds the live weights (what a resume continues); an EMA's state travels in ``extra``."""
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / f".{CHECKPOINT_DIR}.tmp"
    old = out_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / MODEL_DIR)
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), **extra}, tmp / TRAINER_STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(out_dir: Path) -> Optional[Path]:
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):  # .old: a crash mid-swap
        cand = out_dir / name
        if (cand / TRAINER_STATE).is_file() and (cand / MODEL_DIR).is_dir():
            return cand
    return None


def _save_final(out_dir: Path, model) -> None:
    final = out_dir / MODEL_DIR
    tmp = out_dir / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _clear_outputs(out_dir: Path) -> None:
    """``fresh=True``: remove what an earlier run left (checkpoint, model, loss log, stats)."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old", f".{CHECKPOINT_DIR}.tmp", MODEL_DIR, f".{MODEL_DIR}.tmp"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (LOSS_CSV, STATS_JSON):
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- fingerprint
# TrainParams fields that do not change the trained weights
FINGERPRINT_IGNORES = ("checkpoint_every", "log_every", "num_workers")
# TrainParams fields that count only while the EMA is on (ema_decay > 0): runs recorded before the
# EMA existed, and runs with it off, keep their fingerprints
FINGERPRINT_EMA = EMA_KEYS
STATS_JSON = "stats.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_fingerprint(stage: str, section: str, tp: TrainParams, sources: Sequence[Source],
                      model_inputs: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """What a run's weights depend on, as a flat dict: the stage, the settings of ``section``
    (all but :data:`FINGERPRINT_IGNORES`; :data:`FINGERPRINT_EMA` only when ``ema_decay > 0``;
    :data:`~vlp_core.config.ZERO_OFF_KEYS` only when not 0),
    the sources (path:label, as written: relative to the work dir ``root``) and a sha256 of every
    Parquet file they read, and the model inputs (arch and tokenizer, or the init model)."""
    fp: dict[str, Any] = {"stage": stage}
    for name in type(tp).model_fields:
        if name in ZERO_OFF_KEYS and not getattr(tp, name):
            continue
        if name not in FINGERPRINT_IGNORES and (name not in FINGERPRINT_EMA or tp.ema_decay > 0):
            value = getattr(tp, name)
            fp[f"{section}.{name}"] = list(value) if isinstance(value, tuple) else value  # as JSON reads it back
    fp["sources"] = [f"{os.path.normpath(as_written(p, root))}:{n}" for p, n in sources]
    for p, _ in sources:
        for file in source_files(p):
            fp[f"data {os.path.normpath(as_written(file, root))}"] = _file_sha256(file)
    fp.update(model_inputs)
    return fp


def fingerprint_sha256(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs, one short phrase per key (``pretrain.lr 0.001 -> 0.002``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key.startswith("data "):
            what = "is new" if a is None else "is gone" if b is None else "changed"
            out.append(f"{key[5:]} {what}")
        elif key == "sources":
            out.append(f"sources {', '.join(a or [])} -> {', '.join(b or [])}")
        else:
            out.append(f"{key} {a} -> {b}")
    return out


def _check_fingerprint(out_dir: Path, what: str, old: Optional[dict[str, Any]], new: dict[str, Any]) -> None:
    """Raise :class:`TrainError` (one line) unless ``old`` (from the checkpoint or the finished
    run's stats) is ``new``."""
    if old is None:
        raise TrainError(f"{out_dir}: the {what} has no training fingerprint (an older vlp wrote it), so it "
                         f"cannot be checked against these settings; rerun with a fresh out dir or --fresh")
    diff = _fingerprint_diff(old, new)
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise TrainError(f"{out_dir}: the {what} was trained with other settings ({shown}); "
                         f"rerun with a fresh out dir or --fresh")


def _finished_fingerprint(out_dir: Path) -> tuple[bool, Optional[dict[str, Any]]]:
    """``(True, fingerprint or None)`` when ``out_dir`` holds a finished run (model/ and
    stats.json), else ``(False, None)``."""
    stats = out_dir / STATS_JSON
    if not (out_dir / MODEL_DIR).is_dir() or not stats.is_file():
        return False, None
    try:
        extra = json.loads(stats.read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        return True, None
    fp = extra.get("fingerprint_inputs")
    return True, fp if isinstance(fp, dict) else None


# --------------------------------------------------------------------------- loss log
class LossLog:
    """``loss.csv``: one row per log window (means over the window), appended as it goes.
    On resume, rows after the checkpoint's step are dropped.  Columns: step, loss, the model's
    loss names (BLIP: itc, itm, lm; ViLBERT: itc, mlm, mrm, align), lr."""

    def __init__(self, path: Path, resume_step: int, enabled: bool,
                 loss_names: Sequence[str] = DEFAULT_LOSS_NAMES):
        self.path, self.enabled = path, enabled
        self.names = tuple(loss_names)
        self.fields = ("step", "loss", *self.names, "lr")
        self.sums: dict[str, float] = {}
        self.n = 0
        if not enabled:
            return
        rows = []
        if resume_step > 0 and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)

    def add(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def flush(self, step: int, lr: float) -> dict[str, float]:
        """Write the window's means for ``step`` (1-based count of steps done)."""
        means = {k: v / max(1, self.n) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        if self.enabled and means:
            row = {"step": step, "lr": f"{lr:.6g}", **{k: f"{means.get(k, 0.0):.6f}" for k in ("loss", *self.names)}}
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        return means


# --------------------------------------------------------------------------- the loop
def _train(stage: str, params: Params, tp: TrainParams, sources: Sequence[Source], out_dir: str | Path,
           build_model, stop_after_step: Optional[int], *, section: Optional[str] = None,
           model_inputs: Optional[dict[str, Any]] = None, fresh: bool = False, root: str | Path = ".") -> StageStats:
    set_entry_threads()
    dist = setup_distributed()
    before = torch.are_deterministic_algorithms_enabled()
    if dist.device.type == "cpu":
        # CPU index_put/scatter backward (ITM hard negatives) is otherwise not bit-reproducible
        torch.use_deterministic_algorithms(True)
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    try:
        bf16 = use_bf16(params.model.precision, dist.device)
        inputs = {**(model_inputs or {}), "precision": "bf16" if bf16 else "fp32"}
        return _train_run(stage, tp, sources, out_dir, build_model, stop_after_step, dist,
                          section=section or stage, model_inputs=inputs, fresh=fresh, bf16=bf16, root=root)
    except BaseException:
        if not existed and dist.is_main and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that failed before writing anything leaves no empty folder
        raise
    finally:
        torch.use_deterministic_algorithms(before)


def _train_run(stage: str, tp: TrainParams, sources: Sequence[Source], out_dir: Path, build_model,
               stop_after_step: Optional[int], dist: DistInfo, *, section: str, model_inputs: dict[str, Any],
               fresh: bool = False, bf16: bool = False, root: str | Path = ".") -> StageStats:
    t0 = time.perf_counter()
    seed_everything(tp.seed)

    table = load_pairs(sources, root)
    n_held = 0
    if tp.holdout > 0:  # kept out of training by key (vlp_core/holdout.py): CapFilt calibrates on them
        mask = held_out(table.column("key").to_pylist(), tp.holdout)
        n_held = int(mask.sum())
        if n_held == table.num_rows:
            raise TrainError(f"{section}.holdout {tp.holdout} holds out all {n_held} training pairs")
        table = table.filter(pa.array(~mask))
    fingerprint = train_fingerprint(stage, section, tp, sources, model_inputs, root)
    if dist.is_main:
        if fresh:
            _clear_outputs(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    if fresh and dist.enabled:
        torch.distributed.barrier()
    ckpt = _find_checkpoint(out_dir)
    state: Optional[dict[str, Any]] = None
    if ckpt is not None:
        # resume only what these inputs would train (else: one line saying what differs)
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
        _check_fingerprint(out_dir, "checkpoint", state.get("fingerprint"), fingerprint)
        model = _load_model(ckpt / MODEL_DIR)
        model.load_state_dict(state["model"])
    else:
        finished, old = _finished_fingerprint(out_dir)
        if finished and old is not None:  # model/ without checkpoint/: it must be this run's
            _check_fingerprint(out_dir, "model", old, fingerprint)
        model = build_model(table)
    if stage == "finetune_captioner" and not getattr(model, "generates", True):
        raise TrainError(f"{type(model).__name__} does not generate captions, so it cannot be fine-tuned into the "
                         "captioner (use a blip model as the captioner)")
    data = decode_pairs(table, _image_size(model))
    if state is None and hasattr(model, "prepare_training"):  # a family's one-off setup (ViLBERT: region codebook)
        model.prepare_training(data.images)
    dataset = PairDataset(data)
    per_rank = tp.batch_size // dist.world_size
    if per_rank < 2:
        raise TrainError(f"batch_size {tp.batch_size} is too small for {dist.world_size} ranks")
    batches = epoch_batches(len(dataset), per_rank, 0, tp.seed, dist.rank, dist.world_size)
    steps_per_epoch = len(batches)

    model.to(dist.device)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tp.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tp.lr)
    scheduler = make_scheduler(optimizer, tp.steps, tp.warmup_steps, tp.lr, tp.min_lr)
    # the EMA of the weights (train/ema.py): it touches no RNG, so the live run is the same with it on
    ema = WeightEma(model, tp.ema_decay, tp.ema_warmup) if tp.ema_decay > 0 else None
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
        if ema is not None:
            if "ema" not in state:  # cannot happen with a matching fingerprint; refuse rather than guess
                raise TrainError(f"{out_dir}: the checkpoint has no EMA state although ema_decay is "
                                 f"{tp.ema_decay}; rerun with a fresh out dir or --fresh")
            ema.load_state_dict(state["ema"])
        del state

    weights = {"itc": tp.itc_weight, "itm": tp.itm_weight, "lm": tp.lm_weight}
    hard = (HardNegatives(data.texts, phrase_share=tp.phrase_swaps, synonyms=tp.synonyms)
            if tp.hard_negatives > 0 and tp.itm_weight > 0 else None)
    regions = getattr(model, "uses_regions", False)  # X-VLM: the pairs' box annotations go in too
    if regions and dist.is_main and not data.n_with_regions:
        logger.warning("%s: a %s model, but no training pair has box annotations (regions): it trains the "
                       "image-level losses only", stage, getattr(model, "family", "?"))
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            broadcast_buffers=True, find_unused_parameters=regions or any(w == 0 for w in weights.values()))
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    loss_names = tuple(getattr(model, "LOSS_NAMES", DEFAULT_LOSS_NAMES))
    log = LossLog(out_dir / LOSS_CSV, start, dist.is_main, loss_names)
    last = stop_after_step if stop_after_step is not None else tp.steps
    last = min(last, tp.steps)
    bar = tqdm(total=tp.steps, initial=start, desc=stage, unit="step", disable=None if dist.is_main else True)
    cur_epoch, means, samples, t_loop = 0, {}, 0, time.perf_counter()
    for step in range(start, last):
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != cur_epoch:
            batches, cur_epoch = epoch_batches(len(dataset), per_rank, epoch, tp.seed, dist.rank, dist.world_size), epoch
        pixels, texts, image_idx = get_batch(dataset, batches[b])
        pixel_values = model.preprocess(pixels).to(dist.device, non_blocking=True)
        image_idx = image_idx.to(dist.device)
        # BLIP ramps momentum distillation in over the first epoch
        alpha = tp.alpha * min(1.0, step / max(1, steps_per_epoch))
        hard_texts = hard.batch(texts, tp.hard_negatives, tp.seed, step * dist.world_size + dist.rank) if hard else None
        extra = {"regions": batch_regions(dataset, batches[b])} if regions else {}
        with autocast:
            out = net(pixel_values, texts, image_idx=image_idx, alpha=alpha, weights=weights, hard_texts=hard_texts,
                      **extra)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step + 1)
        samples += len(texts) * dist.world_size
        log.add({"loss": float(loss.detach()), **{k: float(out[k].detach()) for k in loss_names if k in out}})
        done = step + 1
        if done % tp.log_every == 0 or done == last:
            means = log.flush(done, scheduler.get_last_lr()[0]) or means
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
            if dist.is_main:  # also where no terminal shows the bar (a Prefect run's logs, a log file)
                logger.info("%s: step %d/%d, %s, lr %.3g, %.0f samples/s", stage, done, tp.steps,
                            ", ".join(f"{k} {v:.4f}" for k, v in means.items()), scheduler.get_last_lr()[0],
                            samples / max(time.perf_counter() - t_loop, 1e-9))
        if done % tp.checkpoint_every == 0 or done == last:
            if dist.enabled:
                _sync_buffers(model)
            if dist.is_main:
                _save_checkpoint(out_dir, model, optimizer, scheduler, done,
                                 {"stage": stage, "fingerprint": fingerprint,
                                  **({"ema": ema.state_dict()} if ema is not None else {})})
            if dist.enabled:
                torch.distributed.barrier()
        bar.update(1)
    bar.close()
    loop_s = time.perf_counter() - t_loop

    stats = StageStats(stage=stage, rows_in=data.rows_in + n_held, rows_out=len(data) + data.n_skipped + n_held)
    stats.add("used", len(data))
    if n_held:
        stats.add("held_out", n_held)
    for reason, n in sorted(data.skipped.items()):
        stats.add(f"skipped.{reason}", n)
    step_done = max(start, last)
    stats.extra = {
        "steps": step_done, "target_steps": tp.steps, "resumed_from_step": start,
        "samples_per_s": round(samples / loop_s, 2) if loop_s > 0 and samples else None,
        "train_seconds": round(loop_s, 3), "world_size": dist.world_size, "images": int(len(data.images)),
        "final_losses": {k: round(v, 6) for k, v in means.items()},
        "sources": [[as_written(p, root), n] for p, n in sources],
        "fingerprint": fingerprint_sha256(fingerprint), "fingerprint_inputs": fingerprint,
        # not in the fingerprint (a resume on another machine is allowed), but the reason two runs
        # of one fingerprint can differ: see vlp_core.precision.arithmetic
        "arithmetic": arithmetic(dist.device),
    }
    param_hashes, hashes = [state_sha256(model, params_only=True)], [state_sha256(model)]
    if dist.enabled:
        param_hashes = [None] * dist.world_size
        torch.distributed.all_gather_object(param_hashes, state_sha256(model, params_only=True))
        _sync_buffers(model)
        hashes = [None] * dist.world_size
        torch.distributed.all_gather_object(hashes, state_sha256(model))
    stats.extra["rank_param_sha256"] = param_hashes
    stats.extra["rank_state_sha256"] = hashes  # the live model's, EMA or not
    if ema is not None:
        stats.extra["ema_decay"] = tp.ema_decay
        stats.extra["ema_state_sha256"] = state_sha256(ema.module)  # rank 0's: the weights model/ holds
    if dist.is_main:
        if step_done >= tp.steps:
            _save_final(out_dir, ema.module if ema is not None else model)
        stats.seconds = round(time.perf_counter() - t0, 3)
        stats.check().write(out_dir)
    if dist.enabled:
        torch.distributed.barrier()
    return stats


def run_pretrain(params: Params, sources: Sequence[Source], out_dir: str | Path,
                 init_from: Optional[str | Path] = None, *, stop_after_step: Optional[int] = None,
                 fresh: bool = False, root: str | Path = ".") -> StageStats:
    """Pretrain on ``sources`` with ``params.pretrain`` (ITC + ITM + LM).

    The model starts from ``init_from`` (or ``params.model.init_from``) when given, else it
    is created from ``params.model.arch``; with ``params.model.tokenizer`` unset, a WordPiece
    tokenizer is trained offline on the source captions.  ``stop_after_step`` ends the run
    early after checkpointing (as if interrupted); a rerun resumes from there, but only when
    its fingerprint (settings, sources and their content, model) matches the checkpoint's,
    else :class:`TrainError`.  ``fresh`` deletes an earlier run's checkpoint and model first.
    ``root``: the work dir the sources' shard references are relative to (the CLI's: where
    ``vlp`` runs).
    """
    init = init_from or params.model.init_from
    mp = params.model
    model_inputs: dict[str, Any] = ({"model.init_from": os.path.normpath(as_written(init, root))} if init else
                                    {"model.arch": mp.arch, "model.max_text_len": mp.max_text_len})
    if not init and mp.family != "blip":  # (absent for blip: earlier runs' fingerprints stay valid)
        model_inputs["model.family"] = mp.family
    if not init:  # vocab_size only matters for a tokenizer trained here
        model_inputs.update({"model.tokenizer": mp.tokenizer} if mp.tokenizer else {"model.vocab_size": mp.vocab_size})

    def build(table):
        if init:
            return _load_model(resolve(init, root))
        return _new_model(params, [t for t in table["text"].to_pylist() if t and t.strip()], root)

    return _train("pretrain", params, params.pretrain, sources, out_dir, build, stop_after_step,
                  section="pretrain", model_inputs=model_inputs, fresh=fresh, root=root)


def in_fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh (spawned) Python process; returns its result and
    re-raises its exception.

    Why: a training run started late in a long-lived process -- a Prefect flow after CapFilt
    ran its shard tasks in worker threads -- ran at 106-131 samples/s where the same run
    alone ran at 167-207 (the demo, 2 cores); a spawned child costs a few seconds of imports
    and trains at full speed.  Used for the retrains and the comparison's arms.

    On Linux the child is told to stop (SIGTERM) when this process dies, so a killed flow or
    bench leaves no training running on without it."""
    if multiprocessing.current_process().daemon:  # e.g. a Dask worker: it may not have children
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("spawn")
    records = ctx.Queue()
    relay = threading.Thread(target=_relay_logs, args=(records,), daemon=True)
    relay.start()
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_child_setup,
                                                    initargs=(records, os.getpid())) as ex:
            return ex.submit(fn, *args, **kwargs).result()
    finally:
        records.put(None)
        relay.join(timeout=10)


def _child_setup(records, parent_pid: int) -> None:
    """In the spawned child: stop with the parent (:func:`_die_with_parent`), send logs to it."""
    _die_with_parent(parent_pid)
    _send_logs(records)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask the kernel for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``); if it
    died before the request, stop now.  Elsewhere: nothing (the child outlives a killed parent)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError) as exc:
        logger.debug("no parent-death signal for this training child: %s", exc)
        return
    if os.getppid() != parent_pid:  # the parent died between the spawn and the request
        os._exit(1)


def _send_logs(records) -> None:
    """In the spawned child: the project's log records go to the parent (:func:`_relay_logs`)."""
    root = logging.getLogger("vlp_core")
    root.setLevel(logging.INFO)
    root.addHandler(logging.handlers.QueueHandler(records))
    root.propagate = False


def _relay_logs(records) -> None:
    """In the parent: hand each of the child's records to the logger of the same name, so a child's
    training progress reaches the parent's handlers (a Prefect run's logs among them)."""
    while True:
        rec = records.get()
        if rec is None:
            return
        logging.getLogger(rec.name).handle(rec)


def retrain_settings(params: Params) -> TrainParams:
    """The training settings of a retrain: ``pretrain``'s, with ``retrain``'s steps, lr and
    warm-up when it continues a base model (:class:`vlp_core.config.RetrainParams`)."""
    r, tp = params.retrain, params.pretrain
    if r.init == "scratch":
        return tp
    changes = {k: v for k, v in (("steps", r.steps), ("lr", r.lr), ("warmup_steps", r.warmup_steps)) if v is not None}
    return tp.model_copy(update=changes)


def run_retrain(params: Params, sources: Sequence[Source], base_model: Optional[str | Path], out_dir: str | Path,
                *, stop_after_step: Optional[int] = None, fresh: bool = False, root: str | Path = ".") -> StageStats:
    """Retrain on a bootstrapped corpus (or a control's corpus), as ``params.retrain`` says:

    * ``init: scratch`` (BLIP's recipe): a fresh model, exactly :func:`run_pretrain`;
    * ``init: continue``: ``base_model`` (the round's starting model) trained on for
      :func:`retrain_settings`' steps -- cheaper, and every arm of a comparison then starts
      from the same weights."""
    if params.retrain.init == "scratch":
        return run_pretrain(params, sources, out_dir, stop_after_step=stop_after_step, fresh=fresh, root=root)
    if base_model is None:
        raise TrainError("retrain.init is continue, but no base model was given")
    tp = retrain_settings(params)
    return _train("retrain", params, tp, sources, out_dir, lambda table: _load_model(base_model), stop_after_step,
                  section="retrain", model_inputs={"model.init_from": os.path.normpath(as_written(base_model, root))},
                  fresh=fresh, root=root)


def run_finetune(params: Params, target: Target, sources: Sequence[Source], init_from: str | Path,
                 out_dir: str | Path, *, stop_after_step: Optional[int] = None, fresh: bool = False,
                 root: str | Path = ".") -> StageStats:
    """Fine-tune the model at ``init_from`` into the captioner (LM loss, weights from
    ``params.finetune.captioner``) or the filter (ITC + ITM, ``params.finetune.filter``).
    The tokenizer is the init model's.  Resume and ``fresh`` as :func:`run_pretrain`."""
    if target not in ("captioner", "filter"):
        raise TrainError(f"unknown fine-tune target {target!r} (captioner or filter)")
    tp: TrainParams = getattr(params.finetune, target)
    return _train(f"finetune_{target}", params, tp, sources, out_dir, lambda table: _load_model(init_from),
                  stop_after_step, section=f"finetune.{target}",
                  model_inputs={"model.init_from": os.path.normpath(as_written(init_from, root))}, fresh=fresh, root=root)


__all__ = ["DistInfo", "LossLog", "TrainError", "fingerprint_sha256", "in_fresh_process", "retrain_settings", "run_finetune", "run_pretrain", "run_retrain",
           "setup_distributed", "state_sha256", "train_fingerprint"]

