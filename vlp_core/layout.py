"""Where every stage reads and writes: one module for the paths of a work dir (a DVC repo).

    data/urls/<split>.parquet        URL lists (inputs; the demo writes them)
    data/world/                      the synthetic world (demo only; ground truth for evaluate)
    data/ingest/<split>/             ingest of web / human / test: shards/, manifest.parquet
    data/round0/pretrain/            round 0's base model (pretrained on the raw web + human)
    data/round<k>/<stage>/           finetune_captioner, finetune_filter, capfilt, features,
                                     retrain, evaluate (and evaluate_base in round 0)
    data/round<k>/gate.json          the quality gate's verdict on the round (vlp_core/gate.py)
    data/round<k>/record.json        what ``record`` wrote to the catalog
    data/.flow/<stage id>.json       the stage cache's markers (:mod:`vlp_core.stagecache`)
    data/comparison/                 the demo's controls and table

**One root, no cwd.** Every path a stage reads or writes is resolved against an explicit
root -- the work dir, :attr:`Layout.root`, absolute in the flows -- never against the
process's current folder, so a task on a thread-pool runner or a Dask worker needs no
``os.chdir``.  Paths *written into files* (the shard references of a manifest, the inputs a
``stats.json`` names) stay relative to that root (:func:`as_written`), so a work dir can be
moved or tracked by DVC; readers turn them back into paths with :func:`resolve`.  The CLI's
root is the folder ``vlp`` runs in (``"."``), as before.

**Round k** means one thing everywhere (flows, demo, comparison, benchmarks): the captioner
and the filter are fine-tuned from round k's *base model* (round 0: the pretrained model;
round k > 0: round k-1's retrained model), CapFilt writes version ``round<k>``'s corpus, and
the model retrained on it is round k's model.  ``dvc.yaml`` writes the same paths; a test
(``tests/test_layout.py``) checks every stage of it against :class:`Layout`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SPLITS = ("web", "human", "test")

# file and folder names inside a stage's folder
MANIFEST_FILE = "manifest.parquet"  # ingest: one row per input row (MANIFEST_SCHEMA)
SHARDS_DIR = "shards"  # ingest: img2dataset's shards
CORPUS_DIR = "corpus"  # capfilt: one Parquet file per shard (CORPUS_SCHEMA)
EMBEDDINGS_DIR = "embeddings"  # features
STATS_FILE = "stats.json"  # every stage: StageStats, the stage's done marker
METRICS_FILE = "metrics.json"  # evaluate
CAPTIONS_FILE = "captions.parquet"  # evaluate
MODEL_DIR = "model"  # training stages: the finished model (save_pretrained)
CHECKPOINT_DIR = "checkpoint"  # training stages: the resumable state
LOSS_FILE = "loss.csv"  # training stages
RECORD_FILE = "record.json"  # record: what went into the catalog
GATE_FILE = "gate.json"  # the quality gate's verdict on a round

PRETRAIN = "pretrain"
# the stages of a round, in order (evaluate_base: round 0's pretrained model, evaluated like a round)
ROUND_STAGES = ("finetune_captioner", "finetune_filter", "capfilt", "features", "retrain", "evaluate")
# the stage folders whose stats the record stage stores (the same list as dvc.yaml's record stage)
RECORDED_STATS = ("finetune_captioner", "finetune_filter", "capfilt", "features", "retrain")


def resolve(path: str | Path, root: str | Path) -> Path:
    """A path as written into a file (relative to the work dir ``root``), as a path to open:
    absolute paths are kept, relative ones are joined onto ``root``."""
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def as_written(path: str | Path, root: str | Path) -> str:
    """``path`` as it is written into a file, so that :func:`resolve` finds it again: relative to
    ``root`` (the flows' absolute root, or a relative one such as a benchmark's), except an
    absolute path outside an absolute root, which stays absolute; always as given for the CLI's
    root ``"."`` (paths relative to where ``vlp`` runs, or absolute ones)."""
    p, r = Path(path), Path(root)
    if r == Path(".") or p.is_absolute() != r.is_absolute():
        return str(p)
    rel = os.path.relpath(p, r)
    outside = rel == ".." or rel.startswith(".." + os.sep)
    return str(p) if outside and p.is_absolute() else rel


def stage_id(name: str, round: Optional[int] = None) -> str:
    """``ingest_web`` or ``round1-capfilt``: a stage's name in the stage cache."""
    return name if round is None else f"round{round}-{name}"


def dvc_stage_name(name: str, round: Optional[int] = None) -> str:
    """The stage's name in dvc.yaml: per-round stages are ``foreach`` items (``capfilt@round1``);
    ``pretrain`` and ``evaluate_base`` exist for round 0 only."""
    if round is None or name in (PRETRAIN, "evaluate_base"):
        return name
    return f"{name}@round{round}"


@dataclass(frozen=True)
class Layout:
    """Every stage's paths under ``root`` (the work dir, the DVC repo root).  The flows build it
    with :meth:`at`: an absolute root, so its paths do not depend on the current folder."""

    root: Path = Path(".")

    @classmethod
    def at(cls, workdir: str | Path) -> "Layout":
        """The layout of ``workdir``, resolved to an absolute path once (relative to where the
        caller runs: the CLI's ``--workdir``)."""
        return cls(Path(workdir).resolve())

    def written(self, path: str | Path) -> str:
        """``path`` as written into a file (:func:`as_written`)."""
        return as_written(path, self.root)

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
        return self.ingest(split) / MANIFEST_FILE

    def shards(self, split: str) -> Path:
        return self.ingest(split) / SHARDS_DIR

    def round_dir(self, round: int) -> Path:
        return self.data / f"round{round}"

    def stage(self, round: int, name: str) -> Path:
        return self.round_dir(round) / name

    def model(self, round: int, name: str) -> Path:
        return self.stage(round, name) / MODEL_DIR

    def corpus(self, round: int) -> Path:
        return self.stage(round, "capfilt") / CORPUS_DIR

    def base_model(self, round: int, init_from: Optional[str | Path] = None) -> Path:
        """The model round ``round`` fine-tunes its captioner and filter from (and, with
        ``retrain.init: continue``, retrains): round 0's pretrained model (or ``init_from``, an
        imported checkpoint), else round k-1's retrained model."""
        if round == 0:
            return Path(init_from) if init_from else self.model(0, PRETRAIN)
        return self.model(round - 1, "retrain")

    def gate_file(self, round: int) -> Path:
        return self.round_dir(round) / GATE_FILE

    def record_marker(self, round: int) -> Path:
        return self.round_dir(round) / RECORD_FILE

    def marker(self, sid: str) -> Path:
        return self.data / ".flow" / f"{sid}.json"

    @property
    def comparison(self) -> Path:
        return self.data / "comparison"

    @property
    def report(self) -> Path:
        return self.root / "report" / "index.html"

    def outputs(self, name: str, round: Optional[int] = None) -> set[Path]:
        """The files and folders stage ``name`` (of round ``round``) writes and DVC tracks (its
        outs, metrics and plots in dvc.yaml)."""
        if name.startswith("ingest_"):
            split = name[len("ingest_"):]
            return {self.shards(split), self.manifest(split), self.ingest(split) / STATS_FILE}
        if name == "synthetic":
            return {self.world}
        if name == "record":
            return {self.record_marker(int(round or 0))}
        d = self.stage(int(round or 0), name)
        if name in (PRETRAIN, "retrain") or name.startswith("finetune_"):
            return {d / MODEL_DIR, d / CHECKPOINT_DIR, d / STATS_FILE, d / LOSS_FILE}
        if name == "capfilt":
            return {d / CORPUS_DIR, d / STATS_FILE}
        if name == "features":
            return {d / EMBEDDINGS_DIR, d / STATS_FILE}
        if name in ("evaluate", "evaluate_base"):
            return {d / CAPTIONS_FILE, d / METRICS_FILE}
        raise KeyError(f"no stage {name!r}")

    def metrics(self, name: str, round: Optional[int] = None) -> set[Path]:
        """The DVC *metrics* of stage ``name``: only evaluation's ``metrics.json`` (round k's
        model and, in round 0, the pretrained one).  Every other stage's ``stats.json`` is a plain
        output (``outs`` with ``cache: false``), so ``dvc metrics show`` lists evaluation results only."""
        if name in ("evaluate", "evaluate_base"):
            return {self.stage(int(round or 0), name) / METRICS_FILE}
        return set()

    def plots(self, name: str, round: Optional[int] = None) -> set[Path]:
        """The DVC *plots* of stage ``name``: a training stage's loss log (``loss.csv``: ``y: loss``
        against ``x: step``)."""
        if name in (PRETRAIN, "retrain") or name.startswith("finetune_"):
            return {self.stage(int(round or 0), name) / LOSS_FILE}
        return set()

    def git_files(self, last_round: int) -> list[Path]:
        """The small files a version's git commit holds besides ``dvc.lock`` (DVC metrics and
        plots are ``cache: false``: ``dvc metrics diff``, ``dvc plots diff`` and ``dvc exp show``
        read them from git), for rounds 0..``last_round``; only those that exist."""
        stages = [(PRETRAIN, 0), ("evaluate_base", 0)]
        stages += [(n, k) for k in range(last_round + 1) for n in ROUND_STAGES]
        files = sorted({f for n, k in stages for f in self.metrics(n, k) | self.plots(n, k)})
        return [f for f in files if f.is_file()]

    def rounds_done(self) -> list[int]:
        """Rounds whose filter and captioner are finished, in order (what the nightly can use); a
        round without a captioner (``capfilt.captioner``; a ViLBERT base) needs its filter only."""
        out = []
        for p in self.data.glob("round*"):
            k = p.name[len("round"):]
            if not k.isdigit() or not (p / "finetune_filter" / MODEL_DIR).exists():
                continue
            if (p / "finetune_captioner" / MODEL_DIR).exists() or self._captioner_none(int(k)):
                out.append(int(k))
        return sorted(out)

    def _captioner_none(self, round: int) -> bool:
        """Whether round ``round``'s CapFilt ran without a captioner (its stats say so)."""
        f = self.stage(round, "capfilt") / STATS_FILE
        try:
            extra = json.loads(f.read_text()).get("extra", {})
        except (FileNotFoundError, ValueError):
            return False
        return extra.get("captioner", "not recorded") is None  # stats from before the key existed: a captioner


__all__ = ["CAPTIONS_FILE", "CHECKPOINT_DIR", "CORPUS_DIR", "EMBEDDINGS_DIR", "GATE_FILE", "LOSS_FILE", "Layout", "MANIFEST_FILE",
           "METRICS_FILE", "MODEL_DIR", "PRETRAIN", "RECORDED_STATS", "RECORD_FILE", "ROUND_STAGES", "SHARDS_DIR",
           "SPLITS", "STATS_FILE", "as_written", "dvc_stage_name", "resolve", "stage_id"]
