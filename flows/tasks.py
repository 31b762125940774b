"""Prefect tasks: each one call into ``vlp_core``, wrapped by the stage cache.

**Layout** (relative to the work dir, the same paths as ``dvc.yaml``)::

    data/urls/<split>.parquet        URL lists (inputs; the demo writes them)
    data/world/                      the synthetic world (demo only; ground truth for evaluate)
    data/ingest/<split>/             ingest of web / human / test
    data/round<k>/<stage>/           pretrain (k=0), finetune_captioner, finetune_filter,
                                     capfilt, features, retrain, evaluate
    data/round<k>/gate.json          the quality gate's verdict on the round (flows/gate.py)
    data/round<k>/record.json        what ``record`` wrote to the catalog
    data/.flow/<stage id>.json       the flow's stage cache markers (not a DVC out)

**Stage cache** (how an unchanged stage is skipped): each stage has an *input key*, the
SHA-256 of (stage id, the params sections it reads, the keys of its upstream stages, and
the content digest of its external inputs -- URL lists, imported checkpoints).  Keys chain
like a Merkle tree, so a changed URL list or setting re-runs that stage and everything
downstream, and nothing else.  After a stage succeeds its marker
``data/.flow/<stage id>.json`` stores the key; a stage whose marker holds the same key and
whose ``stats.json`` still exists is skipped.  A stage that failed half-way has no marker:
the rerun calls the stage function again, which itself skips finished shards (done
markers) and resumes training from its last checkpoint -- so a failed flow resumes where it
stopped.  Prefect's own result cache is off (``cache_policy=NONE``): the markers live with
the data, survive across runs and servers, and need no result store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from prefect import task
from prefect.cache_policies import NONE

from vlp_core.config import Params
from vlp_core.errors import VlpError
from vlp_core.io import read_json, write_json

SPLITS = ("web", "human", "test")


class FlowStageError(VlpError, RuntimeError):
    """A stage the flow cannot run (missing input) or an injected failure (fail_before)."""


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to the work dir (the DVC repo root)."""

    root: Path = Path(".")
    home: Optional[str] = None  # the absolute work dir, for tasks that run in other processes (Dask)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def world(self) -> Path:
        return self.data / "world"

    @property
    def ground_truth(self) -> Path:
        return self.world / "ground_truth.parquet"

    def urls(self, split: str) -> Path:
        return self.data / "urls" / f"{split}.parquet"

    def ingest(self, split: str) -> Path:
        return self.data / "ingest" / split

    def manifest(self, split: str) -> Path:
        return self.ingest(split) / "manifest.parquet"

    def stage(self, round: int, name: str) -> Path:
        return self.data / f"round{round}" / name

    def model(self, round: int, name: str) -> Path:
        return self.stage(round, name) / "model"

    def record_marker(self, round: int) -> Path:
        return self.data / f"round{round}" / "record.json"

    def marker(self, stage_id: str) -> Path:
        return self.data / ".flow" / f"{stage_id}.json"

    @property
    def report(self) -> Path:
        return self.root / "report" / "index.html"


# how to run, and which rounds to promote (the gate: no dvc.yaml stage reads it), not what is computed
UNTRACKED_SECTIONS = ("orchestration", "gate")
# policies dvc.yaml does not list (see its ingest stages): which hosts may be contacted, how
# large an image may be decoded
UNTRACKED_KEYS = ("ingest.allowed_hosts", "ingest.max_image_pixels")


def tracked_overrides(overrides: Sequence[str]) -> bool:
    """True when a ``-S`` override changes a setting that dvc.lock tracks (any section but
    orchestration, and any key but the network policy): such a run must not be recorded as
    params.yaml's result."""
    def tracked(o: str) -> bool:
        key = o.split("=", 1)[0].strip()
        return key.split(".", 1)[0] not in UNTRACKED_SECTIONS and key not in UNTRACKED_KEYS

    return any(tracked(o) for o in overrides)


def stage_id(name: str, round: Optional[int] = None) -> str:
    """``ingest_web`` or ``round1-capfilt``: the cache marker's name."""
    return name if round is None else f"round{round}-{name}"


def dvc_stage_name(name: str, round: Optional[int] = None) -> str:
    """The stage's name in dvc.yaml: per-round stages are ``foreach`` items (``capfilt@round1``);
    ``pretrain`` exists for round 0 only."""
    if round is None or name == "pretrain":
        return name
    return f"{name}@round{round}"


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failure that may pass on another try (a network
    error, a timeout, a killed process), never one that cannot (a :class:`VlpError`: bad settings,
    bad input, a folder holding other data)."""
    try:
        state.result()
    except VlpError:
        return False
    except BaseException:  # noqa: BLE001 - anything else may be transient
        return True
    return True


# --------------------------------------------------------------------------- digests
def digest_path(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's (relative path, file digest) list."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(str(f.relative_to(p)).encode())
            h.update(digest_path(f).encode())
        return h.hexdigest()
    raise FlowStageError(f"{p}: input not found")


def params_subset(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """The settings a stage reads, by dotted section (``finetune.captioner``), without the
    policies of :data:`UNTRACKED_KEYS` (which hosts may be contacted is not an input)."""
    out = {}
    plain = params.to_dict()
    for dotted in sections:
        cur: Any = plain
        for part in dotted.split("."):
            cur = cur[part]
        if isinstance(cur, dict):
            cur = {k: v for k, v in cur.items() if f"{dotted}.{k}" not in UNTRACKED_KEYS}
        out[dotted] = cur
    return out


def input_key(sid: str, params: Params, sections: Sequence[str], upstream: Sequence[dict],
              files: Sequence[str | Path] = ()) -> str:
    blob = json.dumps({
        "stage": sid,
        "params": params_subset(params, sections),
        "upstream": [u["key"] for u in upstream],
        "files": [digest_path(f) for f in files],
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageResult:
    """What every task returns (a plain dict travels better through Dask)."""

    name: str
    round: Optional[int]
    key: str
    out_dir: str
    skipped: bool
    stats: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def cached_stage(params: Params, layout: Layout, name: str, round: Optional[int], out_dir: Path,
                 sections: Sequence[str], upstream: Sequence[dict], files: Sequence[str | Path],
                 run: Callable[..., Any], done_file: str = "stats.json", pass_fresh: bool = False) -> dict[str, Any]:
    """Run ``run()`` unless the stage's marker holds the same input key and ``done_file``
    exists in ``out_dir``; then write the marker.  ``orchestration.fail_before == name``
    raises instead of running (to exercise resume).  With ``pass_fresh`` (training stages)
    ``run(fresh=...)`` is told whether the marker holds another key: the inputs changed, so
    the old checkpoint must not be resumed (a run that crashed, with no marker, resumes)."""
    sid = stage_id(name, round)
    key = input_key(sid, params, sections, upstream, files)
    marker = layout.marker(sid)
    done = Path(out_dir) / done_file
    old: dict[str, Any] = {}
    if marker.exists():
        try:
            old = read_json(marker)
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
    if old.get("key") == key and done.exists():
        return StageResult(name, round, key, str(out_dir), True, _stats_of(done)).as_dict()
    if params.orchestration.fail_before == name:
        raise FlowStageError(f"{sid}: stopped before running (orchestration.fail_before={name})")
    t0 = time.time()
    if pass_fresh:
        run(fresh=bool(old) and old.get("key") != key)
    else:
        run()
    stats = _stats_of(done) if done.exists() else {}
    write_json({"stage": sid, "key": key, "finished": time.time(), "seconds": time.time() - t0,
                "out_dir": str(out_dir)}, marker)
    return StageResult(name, round, key, str(out_dir), False, stats).as_dict()


def _stats_of(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def at_home(layout: Layout) -> Iterator[None]:
    """Run in the flow's work dir: a task on a Dask worker starts elsewhere, and stage paths
    (and the shard references inside manifests) are relative to the work dir."""
    if layout.home is None or os.path.samefile(os.getcwd(), layout.home):
        yield
        return
    old = os.getcwd()
    os.chdir(layout.home)
    try:
        yield
    finally:
        os.chdir(old)


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))


# --------------------------------------------------------------------------- tasks
@task(name="ingest", task_run_name="ingest-{split}", cache_policy=NONE)
def ingest_task(params: Params, layout: Layout, split: str) -> dict[str, Any]:
    """Ingest ``data/urls/<split>.parquet`` into ``data/ingest/<split>`` (incremental)."""
    from vlp_core.ingest.stage import run_ingest

    urls, out = layout.urls(split), layout.ingest(split)
    if not urls.exists():
        raise FlowStageError(f"{urls}: URL list not found (write one, or run `vlp demo`)")
    return cached_stage(params, layout, f"ingest_{split}", None, out, ["ingest"], [], [urls],
                        lambda: run_ingest(params, urls, out))


@task(name="pretrain", cache_policy=NONE)
def pretrain_task(params: Params, layout: Layout, web: dict, human: dict) -> dict[str, Any]:
    """Pretrain round 0's model on the web and human pairs."""
    from vlp_core.train.loop import run_pretrain

    _threads()
    out = layout.stage(0, "pretrain")
    sources = [(str(layout.ingest("web")), "web"), (str(layout.ingest("human")), "human")]
    return cached_stage(params, layout, "pretrain", 0, out, ["pretrain", "model"], [web, human], [],
                        lambda fresh: run_pretrain(params, sources, out, fresh=fresh), pass_fresh=True)


@task(name="import-checkpoint", cache_policy=NONE)
def import_task(params: Params, layout: Layout, init_from: str) -> dict[str, Any]:
    """An imported checkpoint instead of pretraining: its key is its content digest."""
    key = input_key("import", params, [], [], [init_from])
    return StageResult("pretrain", 0, key, str(Path(init_from).parent), True, {"imported": init_from}).as_dict()


@task(name="finetune", task_run_name="finetune-{target}-round{round}", cache_policy=NONE)
def finetune_task(params: Params, layout: Layout, round: int, target: str, init_model: str,
                  base: dict, human: dict) -> dict[str, Any]:
    """Fine-tune ``init_model`` into the captioner or the filter on the human pairs."""
    from vlp_core.train.loop import run_finetune

    _threads()
    out = layout.stage(round, f"finetune_{target}")
    sources = [(str(layout.ingest("human")), "human")]
    with at_home(layout):
        return cached_stage(params, layout, f"finetune_{target}", round, out, [f"finetune.{target}"],
                            [base, human], [], lambda fresh: run_finetune(params, target, sources, init_model, out,
                                                                          fresh=fresh), pass_fresh=True)


@task(name="capfilt-shard", task_run_name="capfilt-round{round}-{shard.name}", cache_policy=NONE)
def capfilt_shard_task(params: Params, layout: Layout, round: int, shard: Any, captioner: str,
                       filter: str, calibration: Any) -> Any:
    """Caption and filter ONE ingest shard (the fan-out unit; idempotent by done marker)."""
    from vlp_core.capfilt.stage import run_capfilt_shard

    _threads()
    with at_home(layout):
        return run_capfilt_shard(params, shard, captioner, filter, layout.stage(round, "capfilt"),
                                 round=round, calibration=calibration)


@task(name="capfilt", task_run_name="capfilt-round{round}", cache_policy=NONE)
def capfilt_task(params: Params, layout: Layout, round: int, captioner: dict, filter: dict, web: dict,
                 human: dict, shard_results: Sequence[Any] = ()) -> dict[str, Any]:
    """Finish CapFilt (all shards: those the fan-out did are skipped by done marker)."""
    from vlp_core.capfilt.stage import run_capfilt

    _threads()
    out = layout.stage(round, "capfilt")
    return cached_stage(
        params, layout, "capfilt", round, out, ["capfilt"], [captioner, filter, web, human], [],
        lambda: run_capfilt(params, layout.manifest("web"), str(layout.model(round, "finetune_captioner")),
                            str(layout.model(round, "finetune_filter")), out, round=round,
                            calibration=layout.manifest("human")))


@task(name="features", task_run_name="features-round{round}", cache_policy=NONE)
def features_task(params: Params, layout: Layout, round: int, capfilt: dict, filter: dict) -> dict[str, Any]:
    """Embeddings and duplicate flags of the round's corpus (with the round's filter)."""
    from vlp_core.features.stage import run_features

    _threads()
    out = layout.stage(round, "features")
    return cached_stage(params, layout, "features", round, out, ["features"], [capfilt, filter], [],
                        lambda: run_features(params, layout.stage(round, "capfilt"),
                                             layout.model(round, "finetune_filter"), out))


@task(name="retrain", task_run_name="retrain-round{round}", cache_policy=NONE)
def retrain_task(params: Params, layout: Layout, round: int, capfilt: dict, human: dict,
                 base_model: Optional[str] = None) -> dict[str, Any]:
    """Retrain on the bootstrapped corpus plus the human pairs: a fresh model, or the round's
    base model trained on (``retrain.init``)."""
    from vlp_core.train.loop import in_fresh_process, run_retrain

    _threads()
    out = layout.stage(round, "retrain")
    sources = [(str(layout.stage(round, "capfilt")), "web"), (str(layout.ingest("human")), "human")]
    return cached_stage(params, layout, "retrain", round, out, ["pretrain", "retrain", "model"], [capfilt, human], [],
                        lambda fresh: in_fresh_process(run_retrain, params, sources, base_model, out, fresh=fresh),
                        pass_fresh=True)


@task(name="evaluate", task_run_name="evaluate-{which}-round{round}", cache_policy=NONE)
def evaluate_task(params: Params, layout: Layout, round: int, model: dict, test: dict,
                  which: str = "retrain") -> dict[str, Any]:
    """Evaluate the round's retrained model (``which="retrain"``, stage ``evaluate``) or round
    0's pretrained baseline (``which="pretrain"``, stage ``evaluate_base``) on the test pairs."""
    from vlp_core.train.evaluate import run_evaluate

    _threads()
    name = "evaluate" if which == "retrain" else "evaluate_base"
    out = layout.stage(round, name)
    gt = layout.ground_truth if layout.ground_truth.exists() else None
    return cached_stage(
        params, layout, name, round, out, ["evaluate", "capfilt.prompt", "pretrain.seed"], [model, test],
        [gt] if gt else [],
        lambda: run_evaluate(params, layout.model(round, which), (str(layout.ingest("test")), "human"), out,
                             ground_truth=gt),
        done_file="metrics.json")


def round_stats_paths(layout: Layout, round: int) -> list[Path]:
    names = [  # the same list as the record stage of dvc.yaml
        "finetune_captioner", "finetune_filter", "capfilt", "features", "retrain"]
    return [p for p in (layout.stage(round, n) / "stats.json" for n in names) if p.exists()]


@task(name="record", task_run_name="record-round{round}", cache_policy=NONE)
def record_task(params: Params, layout: Layout, round: int, upstream: Sequence[dict],
                gate: Optional[dict] = None) -> dict[str, Any]:
    """Record the round as version ``round<k>`` in the DuckDB catalog, with the gate's verdict
    (``flows.gate.gate_task``: state promoted / rejected, reason, parent) when given."""
    from vlp_core.catalog import record_version

    out = layout.data / f"round{round}"

    def run() -> None:
        metrics = [p for p in (layout.stage(round, n) / "metrics.json" for n in ("evaluate_base", "evaluate"))
                   if p.exists()]
        s = record_version(params, f"round{round}", layout.stage(round, "capfilt"), round_stats_paths(layout, round),
                           metrics, repo_dir=layout.root, round=round, catalog=layout.root / params.catalog.path,
                           state=(gate or {}).get("state"), reason=(gate or {}).get("reason"),
                           parent=(gate or {}).get("parent"))
        write_json({"name": s.name, "corpus_rows": s.corpus_rows, "stats": s.stats, "metrics": s.metrics},
                   layout.record_marker(round))

    return cached_stage(params, layout, "record", round, out, ["catalog"], list(upstream), [], run,
                        done_file="record.json")


__all__ = [
    "FlowStageError", "Layout", "SPLITS", "cached_stage", "capfilt_shard_task", "capfilt_task", "digest_path",
    "dvc_stage_name", "evaluate_task", "features_task", "finetune_task", "import_task", "ingest_task",
    "input_key", "pretrain_task", "record_task", "retrain_task", "stage_id", "tracked_overrides",
]
