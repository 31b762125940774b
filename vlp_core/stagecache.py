"""The stage cache: the one place that decides what is done and skipped, at every grain.

**Stages.** Each stage has an *input key*, the SHA-256 of (stage id, the params sections it
reads, the keys of its upstream stages, and the content digest of its external inputs -- URL
lists, imported checkpoints).  Keys chain like a Merkle tree, so a changed URL list or setting
re-runs that stage and everything downstream, and nothing else.  After a stage succeeds its
marker ``data/.flow/<stage id>.json`` (:meth:`vlp_core.layout.Layout.marker`) stores the key;
a stage whose marker holds the same key and whose done file (``stats.json``) still exists is
skipped.

**Shards.** Inside a stage, each shard of CapFilt and of the features stage (and CapFilt's
threshold calibration) is an :class:`Entry` of the same cache: its input key is made the same
way, from what its rows depend on (settings, model ids, the digests of its inputs), and its
marker ``<out>/<shard>_stats.json`` (beside the shard's output, so a CLI run outside any work
dir resumes too) holds the key with the shard's stats.  A shard whose marker holds the same key
and whose outputs exist is skipped.  So a stage that failed half-way (it has no stage marker)
is run again, and redoes only its unfinished shards; training resumes from its last
checkpoint (:mod:`vlp_core.train.loop`: resume, not a skip).

The flows (through Prefect tasks), the demo, the comparison, the benchmarks and the CLI all
decide what to skip here; Prefect's own result cache is off, and DVC's stage cache is DVC's
(``dvc repro``).  ``img2dataset`` keeps its own shard markers inside an ingest (the download
tool's resume, :mod:`vlp_core.ingest.stage`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlp_core.config import EMA_KEYS, ZERO_OFF_KEYS, Params
from vlp_core.errors import VlpError
from vlp_core.io import read_json, write_json
from vlp_core.layout import Layout, stage_id


log = logging.getLogger(__name__)


class StageInputError(VlpError, RuntimeError):
    """A stage that cannot run (a missing input) or an injected failure (``orchestration.fail_before``)."""


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
    raise StageInputError(f"{p}: input not found")


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
            cur = _without_off_settings(cur)
            if dotted == "model" and cur.get("family") == "blip":
                cur = {k: v for k, v in cur.items() if k != "family"}  # as before families existed
            if dotted == "capfilt" and cur.get("captioner") == "base":
                cur = {k: v for k, v in cur.items() if k != "captioner"}  # as before the setting existed
        out[dotted] = cur
    return out


def _without_off_settings(section: Any) -> Any:
    """A training section's EMA settings count only while the EMA is on (``ema_decay > 0``), and
    :data:`~vlp_core.config.ZERO_OFF_KEYS` only when not 0: keys written before the settings existed
    stay valid.  Nested sections (``finetune``) are walked."""
    if not isinstance(section, dict):
        return section
    out = {k: _without_off_settings(v) for k, v in section.items()}
    if "ema_decay" in out and not out["ema_decay"]:
        out = {k: v for k, v in out.items() if k not in EMA_KEYS}
    return {k: v for k, v in out.items() if not (k in ZERO_OFF_KEYS and not v)}


def _key(inputs: dict[str, Any]) -> str:
    """The key rule, at every grain: SHA-256 of the inputs as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def input_key(sid: str, params: Params, sections: Sequence[str], upstream: Sequence[dict],
              files: Sequence[str | Path] = ()) -> str:
    """A stage's input key (see the module doc)."""
    return _key({
        "stage": sid,
        "params": params_subset(params, sections),
        "upstream": [u["key"] for u in upstream],
        "files": [digest_path(f) for f in files],
    })


@dataclass
class StageResult:
    """What every task returns (a plain dict travels better through Dask)."""

    name: str
    round: Optional[int]
    key: str
    out_dir: str  # as written: relative to the layout's root (vlp_core.layout.as_written)
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
        return StageResult(name, round, key, layout.written(out_dir), True, _stats_of(done)).as_dict()
    if params.orchestration.fail_before == name:
        raise StageInputError(f"{sid}: stopped before running (orchestration.fail_before={name})")
    t0 = time.time()
    if pass_fresh:
        run(fresh=bool(old) and old.get("key") != key)
    else:
        run()
    stats = _stats_of(done) if done.exists() else {}
    write_json({"stage": sid, "key": key, "finished": time.time(), "seconds": time.time() - t0,
                "out_dir": layout.written(out_dir)}, marker)
    return StageResult(name, round, key, layout.written(out_dir), False, stats).as_dict()


def _stats_of(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_cached(params: Params, layout: Layout, sid: str, key: str, out_dir: str | Path,
              done_file: str = "stats.json") -> bool:
    """Whether ``sid``'s marker holds ``key`` and its done file exists (the stage would be skipped)."""
    return (Path(out_dir) / done_file).exists() and marker_key(layout, sid) == key


def marker_key(layout: Layout, sid: str) -> Optional[str]:
    """The input key ``sid``'s marker holds (None without a readable marker)."""
    try:
        old = read_json(layout.marker(sid))
    except (OSError, ValueError):
        return None
    return old.get("key") if isinstance(old, dict) else None


# --------------------------------------------------------------------------- shard entries
@dataclass(frozen=True)
class Entry:
    """One shard of a stage (or another unit inside it: CapFilt's calibration) in the stage
    cache.  ``inputs``: what its output depends on (settings, model ids, digests of its inputs);
    its key is made from them by the same rule as a stage's; its marker
    ``<folder>/<name>_stats.json`` holds the key, the inputs (``fingerprint``) and the unit's stats."""

    stage: str  # the stage (capfilt, features)
    name: str  # the shard (00000) or unit (calibration)
    folder: Path  # where its outputs and its marker are
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return _key({"stage": self.stage, "shard": self.name, "inputs": self.inputs})

    @property
    def marker(self) -> Path:
        return Path(self.folder) / f"{self.name}_stats.json"

    def cached(self, *outputs: str | Path) -> Optional[dict[str, Any]]:
        """The stats the unit stored when its marker holds this key and every one of ``outputs``
        exists (skip it); else None (run it).  A marker from other inputs is logged."""
        try:
            old = read_json(self.marker)
        except (OSError, ValueError):
            return None
        if not isinstance(old, dict):
            return None
        if old.get("key") != self.key:
            log.info("%s: done marker is from other settings, models or inputs; redoing %s %s",
                     self.marker, self.stage, self.name)
            return None
        if not all(Path(o).exists() for o in outputs):
            return None
        return old

    def done(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the marker (after the unit's outputs are in place): the unit is done."""
        marker = {**stats, "stage": self.stage, "shard": self.name, "key": self.key, "fingerprint": self.inputs,
                  "finished": time.time()}
        write_json(marker, self.marker)
        return marker


__all__ = ["Entry", "StageInputError", "StageResult", "UNTRACKED_KEYS", "UNTRACKED_SECTIONS", "cached_stage", "digest_path",
           "input_key", "is_cached", "marker_key", "params_subset", "tracked_overrides"]
