"""Typed, frozen settings for every stage, loaded from ``params.yaml``.

One loader serves the CLI, DVC (which reads the same ``params.yaml``) and the Prefect
flows.  Each top-level key of ``params.yaml`` is one stage section and maps to one frozen
dataclass below.  Unknown keys and wrong types are refused with an error that names the key
and the file; command-line overrides use DVC's ``-S section.key=value`` form.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from vlp_core.errors import VlpError


class ConfigError(VlpError, ValueError):
    """A bad setting: names the file and the dotted key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticParams:
    """The synthetic web (``vlp synthetic make``)."""

    seed: int = 0
    objects: int = 2  # per image: 2 (a relation between them) or 1 (at a position; learns in minutes)
    image_size: int = 48
    n_web: int = 20000
    n_human: int = 2000
    n_test: int = 1000
    noise_rate: float = 0.4  # share of web captions corrupted, split evenly over the kinds
    holdout_frac: float = 0.1  # share of (colour, shape) pairs never shown in human/web splits
    fail_rate: float = 0.02  # share of web URLs that fail (404, not an image, truncated JPEG)
    jpeg_quality: int = 95


@dataclass(frozen=True)
class IngestParams:
    """Downloading a URL list into shards with img2dataset (``vlp ingest``)."""

    url_col: str = "url"
    caption_col: str = "caption"
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"
    image_size: int = 48
    resize_mode: Literal["no", "border", "keep_ratio", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    output_format: Literal["webdataset", "files"] = "webdataset"
    # img2dataset's distributor: multiprocessing (one machine), or pyspark / ray for a cluster
    # (a Spark session / ray.init() must exist; see infra/README.md)
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    number_sample_per_shard: int = 1000
    processes_count: int = 2
    thread_count: int = 16
    timeout: int = 10
    retries: int = 0
    incremental: bool = True
    # download again, into new shards, only the rows that failed for a transient reason (timeout,
    # HTTP 5xx, refused / reset / dropped connection; vlp_core/ingest/retry.py) and merge them into
    # the manifest; `vlp ingest --retry-failed` sets it for one run.  Needs incremental
    retry_failed: bool = False
    # host:port entries that may be contacted although they are not public addresses (the demo:
    # its own 127.0.0.1 server); everything else must resolve to global addresses only
    allowed_hosts: tuple[str, ...] = ()
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_caption_chars: int = 512
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class ModelParams:
    """Which architecture (a JSON file in ``vlp_core/models/architectures``) and tokenizer.

    The token that leads ITM's text input is not a setting here: it belongs to the weights and is
    stored with them, as ``itm_first_token`` (``enc`` | ``cls``) in the model's ``config.json``
    (see :class:`vlp_core.models.med.MedConfig`; default ``enc``, BLIP's, when absent)."""

    arch: str = "tiny"
    # the model family a fresh model is built as (vlp_core/models/families.py): blip (BLIP's MED),
    # xvlm (the MED + X-VLM's region-text ITC/ITM and box prediction, trained on the rows with box
    # annotations), vilbert (two streams with co-attention; filter only, it does not caption).
    # A loaded model (init_from, fine-tunes, continue-retrains) keeps the family it was saved with
    family: Literal["blip", "xvlm", "vilbert"] = "blip"
    init_from: Optional[str] = None  # a vlp checkpoint dir or a local HF BLIP dir
    tokenizer: Optional[str] = None  # a local HF tokenizer dir; None = train WordPiece offline
    vocab_size: int = 512
    max_text_len: int = 32
    # bf16 autocast in training (vlp_core/precision.py): auto = on CUDA and on CPUs with native
    # bf16 (AMX-BF16 / AVX512-BF16); fp32 / bf16 force either
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class TrainParams:
    """One training run (pretrain, or a fine-tune target)."""

    steps: int = 700
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    alpha: float = 0.4  # momentum distillation weight
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    # the share of pairs given a compositional hard negative text for ITM and ITC (train/hardneg.py):
    # the caption with two content words swapped or one replaced by a word that keeps the same
    # company in the corpus; 0 = BLIP's ITM (negatives mined from the batch only)
    hard_negatives: float = 0.0
    checkpoint_every: int = 200
    log_every: int = 10
    num_workers: int = 0


@dataclass(frozen=True)
class FinetuneParams:
    captioner: TrainParams = TrainParams(steps=300, lr=5e-4, warmup_steps=20, itc_weight=0.0, itm_weight=0.0)
    filter: TrainParams = TrainParams(steps=300, lr=5e-4, warmup_steps=20, lm_weight=0.0)


@dataclass(frozen=True)
class RetrainParams:
    """How each round's model is retrained on its bootstrapped corpus (and the controls on theirs).

    ``scratch`` (BLIP; the benchmarks): a fresh model trained like round 0, ``pretrain.steps``.
    ``continue`` (the demo): the round's base model (round 0's pretrained model, or the previous
    round's retrained one) trained on for ``steps`` more, with ``pretrain``'s other settings
    unless set here; the comparison then adds "raw web", round 0 continued on the raw web for the
    same steps, as the fair baseline."""

    init: Literal["scratch", "continue"] = "scratch"
    steps: Optional[int] = None  # continue: None = pretrain.steps
    lr: Optional[float] = None  # continue: None = pretrain.lr
    warmup_steps: Optional[int] = None  # continue: None = pretrain.warmup_steps


@dataclass(frozen=True)
class CapfiltParams:
    """Captioning and filtering (``vlp capfilt``)."""

    num_captions: int = 1  # K synthetic captions per image
    decode: Literal["nucleus", "beam", "greedy"] = "nucleus"
    top_p: float = 0.9
    num_beams: int = 3
    prompt: str = "a picture of "
    max_length: int = 30
    min_length: int = 5
    threshold_mode: Literal["fixed", "calibrated"] = "calibrated"
    itm_threshold: float = 0.5  # used when threshold_mode == fixed
    calibrate_percentile: float = 10.0  # keep what scores above this percentile of clean pairs
    itc_prescreen: Optional[float] = None  # skip the ITM pass below this ITC similarity
    keep_top: Optional[int] = None  # keep at most N synthetic captions per image, the highest ITM above the threshold
    batch_size: int = 128
    seed: int = 0
    # bf16 autocast for the captioner, the filter and the features stage's embeddings
    # (vlp_core/precision.py): auto = on CUDA and on CPUs with native bf16 (AMX-BF16 /
    # AVX512-BF16); fp32 / bf16 force either
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class FeaturesParams:
    """Embeddings and duplicate flags (``vlp features``)."""

    backbone: Optional[str] = None  # optional extra timm backbone for pooled features
    near_dup_threshold: float = 0.98
    block_size: int = 4096
    batch_size: int = 256


@dataclass(frozen=True)
class EvaluateParams:
    k_test: int = 16  # re-rank the ITC top-k by ITM (BLIP's protocol)
    batch_size: int = 256
    caption_decode: Literal["greedy", "beam"] = "greedy"


@dataclass(frozen=True)
class CatalogParams:
    path: str = "data/catalog.duckdb"
    query_timeout_seconds: float = 60.0  # `vlp query` stops a query that runs longer


@dataclass(frozen=True)
class GateParams:
    """The quality gate (``vlp_core/gate.py``): a round is promoted -- tagged ``round-N``, marked
    ``promoted`` in the catalog, and the source of the next round's captioner and filter and of
    the nightly's -- only when its evaluation beats its parent's (the latest promoted round
    before it, else the pretrained baseline) on ``metric`` by more than ``margin``."""

    enabled: bool = True  # false: every finished round is promoted (reason: the gate is off)
    metric: str = "r1_mean"  # a key of metrics.json, dotted for nested ones (as the catalog flattens them)
    higher_is_better: bool = True  # false for a loss-like metric
    margin: float = 0.0  # child - parent must exceed it (metric units); negative tolerates a small regression
    no_parent: Literal["promote", "reject"] = "promote"  # when there is no parent evaluation to compare with


@dataclass(frozen=True)
class OrchestrationParams:
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: Optional[str] = None  # None with task_runner=dask starts a local cluster
    dask_workers: int = 2
    retries: int = 2
    retry_delay_seconds: int = 5
    network_timeout_seconds: int = 3600
    rounds: int = 2
    dvc_commit: bool = True  # record each stage a flow ran in dvc.lock (`dvc commit`)
    git_tag: bool = True  # commit dvc.lock and tag round-N after each completed round
    dvc_push: bool = False  # push the round's data to dvc_remote_url after tagging
    dvc_remote_url: str = "../vlp-dvc-remote"  # used when the repo has no default remote yet
    schedule_cron: str = "0 2 * * *"  # `vlp deploy`: nightly incremental ingest + capfilt
    work_pool: str = "vlp-process"  # `vlp deploy`: the process work pool to run on
    fail_before: Optional[str] = None  # debugging/tests: raise before this stage (then rerun resumes)


@dataclass(frozen=True)
class Params:
    synthetic: SyntheticParams = SyntheticParams()
    ingest: IngestParams = IngestParams()
    model: ModelParams = ModelParams()
    pretrain: TrainParams = TrainParams()
    finetune: FinetuneParams = FinetuneParams()
    retrain: RetrainParams = RetrainParams()
    capfilt: CapfiltParams = CapfiltParams()
    features: FeaturesParams = FeaturesParams()
    evaluate: EvaluateParams = EvaluateParams()
    catalog: CatalogParams = CatalogParams()
    gate: GateParams = GateParams()
    orchestration: OrchestrationParams = OrchestrationParams()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def replace(self, **overrides: Any) -> "Params":
        """``params.replace(**{"capfilt.top_p": 0.8})`` returns a validated copy."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value, "<replace>")
        return params_from_dict(data, "<replace>")


# --------------------------------------------------------------------------- loading
DEFAULT_PARAMS_FILE = "params.yaml"


def load_params(path: str | Path | None = DEFAULT_PARAMS_FILE, overrides: typing.Iterable[str] = ()) -> Params:
    """Read ``path`` (missing file = all defaults when path is the default) and apply
    ``-S section.key=value`` overrides.  Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if p.exists():
            try:
                loaded = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(source, "<file>", f"not valid YAML ({exc})") from None
            if not isinstance(loaded, dict):
                raise ConfigError(source, "<file>", "the top level must be a mapping of stage sections")
            data = loaded
        elif str(path) != DEFAULT_PARAMS_FILE:
            raise ConfigError(source, "<file>", "file not found")
    origins: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("-S", item, "an override must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value, f"-S {item}")
        origins[key.strip()] = f"{source} (-S {item})"
    return params_from_dict(data, source, origins)


def params_from_dict(data: dict[str, Any], source: str = "<dict>", origins: Optional[dict[str, str]] = None) -> Params:
    """``origins``: dotted key -> where its value came from (a ``-S`` override), for errors."""
    return _build(Params, data, source, "", origins or {})


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(source, dotted, f"{part!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _build(cls: type, data: Any, source: str, prefix: str, origins: Optional[dict[str, str]] = None):
    origins = origins or {}
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in _REPLACED:
            raise ConfigError(source, key, _REPLACED[key])
        raise ConfigError(source, key, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if name not in data:
            if dataclasses.is_dataclass(typ):
                # nested default, but allow partial overrides of the default instance
                default = f.default if f.default is not dataclasses.MISSING else typ()
                kwargs[name] = default
            continue
        value = data[name]
        if dataclasses.is_dataclass(typ):
            default = f.default if f.default is not dataclasses.MISSING else typ()
            merged = {**_to_plain(default), **(value or {})} if isinstance(value, dict) else value
            kwargs[name] = _build(typ, merged, source, key, origins)
        else:
            src = origins.get(key, source)
            kwargs[name] = _coerce(typ, value, src, key)
            _check_bounds(cls, name, kwargs[name], src, key)
    for check in _CROSS_CHECKS.get(cls.__name__, ()):
        check(kwargs, lambda n: origins.get(f"{prefix}.{n}" if prefix else n, source), prefix)
    return cls(**kwargs)


# --------------------------------------------------------------------------- bounds
# Impossible numbers are refused when the settings load (one line: file, key, bound), not
# deep inside a stage.  Each bound: ">= 0", "> 0", "[0, 1]", "(0, 1]", "[0, 1)".
_BOUNDS: dict[str, dict[str, str]] = {
    "SyntheticParams": {"seed": ">= 0", "objects": "[1, 2]", "image_size": ">= 8", "n_web": ">= 0", "n_human": ">= 0", "n_test": ">= 0",
                        "noise_rate": "[0, 1]", "holdout_frac": "[0, 1)", "fail_rate": "[0, 1]",
                        "jpeg_quality": "[1, 100]"},
    "IngestParams": {"image_size": ">= 1", "encode_quality": "[0, 100]", "number_sample_per_shard": ">= 1",
                     "processes_count": ">= 1", "thread_count": ">= 1", "timeout": "> 0", "retries": ">= 0",
                     "max_caption_chars": ">= 1", "max_image_pixels": ">= 1"},
    "ModelParams": {"vocab_size": ">= 8", "max_text_len": ">= 4"},
    "TrainParams": {"steps": ">= 1", "batch_size": ">= 2", "lr": "> 0", "min_lr": ">= 0", "weight_decay": ">= 0",
                    "warmup_steps": ">= 0", "seed": ">= 0", "alpha": "[0, 1]", "itc_weight": ">= 0",
                    "itm_weight": ">= 0", "lm_weight": ">= 0", "hard_negatives": "[0, 1]", "checkpoint_every": ">= 1", "log_every": ">= 1",
                    "num_workers": ">= 0"},
    "RetrainParams": {"steps": ">= 1", "lr": "> 0", "warmup_steps": ">= 0"},
    "CapfiltParams": {"num_captions": ">= 0", "top_p": "(0, 1]", "num_beams": ">= 1", "max_length": ">= 1",
                      "min_length": ">= 0", "itm_threshold": "[0, 1]", "calibrate_percentile": "[0, 100]",
                      "itc_prescreen": "[-1, 1]", "keep_top": ">= 1", "batch_size": ">= 1", "seed": ">= 0"},
    "FeaturesParams": {"near_dup_threshold": "[-1, 1]", "block_size": ">= 1", "batch_size": ">= 1"},
    "EvaluateParams": {"k_test": ">= 1", "batch_size": ">= 1"},
    "CatalogParams": {"query_timeout_seconds": "> 0"},
    "OrchestrationParams": {"dask_workers": ">= 1", "retries": ">= 0", "retry_delay_seconds": ">= 0",
                            "network_timeout_seconds": "> 0", "rounds": ">= 0"},
}
_REPLACED = {"ingest.allow_private_network": "was replaced by ingest.allowed_hosts, a list of host:port "
                                             "entries that may be contacted (e.g. [127.0.0.1:8765])"}
_RANGE_RE = re.compile(r"^([\[(])\s*(\S+),\s*(\S+)\s*([\])])$")


def _check_bounds(cls: type, name: str, value: Any, source: str, key: str) -> None:
    spec = _BOUNDS.get(cls.__name__, {}).get(name)
    if spec is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"must be a finite number, got {value!r}")
    m = _RANGE_RE.match(spec)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        ok = (value >= lo if m.group(1) == "[" else value > lo) and (value <= hi if m.group(4) == "]" else value < hi)
        if not ok:
            raise ConfigError(source, key, f"must be in {spec}, got {value!r}")
        return
    op, bound = spec.split()
    if not (value >= float(bound) if op == ">=" else value > float(bound)):
        raise ConfigError(source, key, f"must be {spec}, got {value!r}")


def _train_checks(kw: dict[str, Any], src, prefix: str) -> None:
    if "lr" in kw and "min_lr" in kw and kw["min_lr"] > kw["lr"]:
        raise ConfigError(src("min_lr"), f"{prefix}.min_lr", f"must not exceed {prefix}.lr ({kw['lr']!r}), "
                                                             f"got {kw['min_lr']!r}")
    weights = [kw.get(w) for w in ("itc_weight", "itm_weight", "lm_weight")]
    if all(w is not None for w in weights) and sum(weights) <= 0:
        raise ConfigError(src("lm_weight"), f"{prefix}.itc_weight/itm_weight/lm_weight",
                          "at least one loss weight must be > 0")


def _capfilt_checks(kw: dict[str, Any], src, prefix: str) -> None:
    if "min_length" in kw and "max_length" in kw and kw["min_length"] > kw["max_length"]:
        raise ConfigError(src("min_length"), f"{prefix}.min_length",
                          f"must not exceed {prefix}.max_length ({kw['max_length']}), got {kw['min_length']}")


def _ingest_checks(kw: dict[str, Any], src, prefix: str) -> None:
    if kw.get("retry_failed") and kw.get("incremental") is False:
        raise ConfigError(src("retry_failed"), f"{prefix}.retry_failed",
                          f"needs {prefix}.incremental=true (a retry adds shards to the earlier run's; "
                          "incremental=false deletes them)")
    for i, entry in enumerate(kw.get("allowed_hosts") or ()):
        host, sep, port = str(entry).strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(src("allowed_hosts"), f"{prefix}.allowed_hosts[{i}]",
                              f"must be host:port (e.g. 127.0.0.1:8765), got {entry!r}")


def _gate_checks(kw: dict[str, Any], src, prefix: str) -> None:
    if "metric" in kw and not str(kw["metric"]).strip():
        raise ConfigError(src("metric"), f"{prefix}.metric",
                          "must name a metric of metrics.json (e.g. r1_mean), got ''")
    if "margin" in kw and not math.isfinite(kw["margin"]):
        raise ConfigError(src("margin"), f"{prefix}.margin", f"must be a finite number, got {kw['margin']!r}")


_CROSS_CHECKS = {"TrainParams": (_train_checks,), "CapfiltParams": (_capfilt_checks,),
                 "IngestParams": (_ingest_checks,), "GateParams": (_gate_checks,)}


def _coerce(typ: Any, value: Any, source: str, key: str) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(source, key, f"expected {_type_name(typ)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(source, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        raise ConfigError(source, key, f"expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(source, key, f"expected a string, got {value!r}")
    raise ConfigError(source, key, f"unsupported type {typ!r}")


_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def section_dict(params: Params, section: str) -> dict[str, Any]:
    """The plain dict of one section, e.g. for recording params in the catalog."""
    return _to_plain(getattr(params, section))


__all__ = [
    "ConfigError",
    "Params",
    "load_params",
    "params_from_dict",
    "section_dict",
] + [name for name in list(globals()) if name.endswith("Params") and name != "Params"]

