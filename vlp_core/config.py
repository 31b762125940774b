"""Typed, frozen settings for every stage, loaded from ``params.yaml``.

One loader serves the CLI, DVC (which reads the same ``params.yaml``) and the Prefect
flows.  Each top-level key of ``params.yaml`` is one stage section and maps to one frozen
pydantic model below (``extra="forbid"``, strict types, bounds as ``Field`` constraints: a new
setting is one line).  Unknown keys, wrong types and impossible numbers are refused with one line
that names the file and the dotted key (pydantic's ``ValidationError`` becomes a
:class:`ConfigError`); command-line overrides use DVC's ``-S section.key=value`` form.
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from vlp_core.errors import VlpError


class ConfigError(VlpError, ValueError):
    """A bad setting: names the file and the dotted key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


# --------------------------------------------------------------------------- value types
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: a float setting takes it as a number."""
    return float(value) if isinstance(value, str) and _NUMBER_RE.match(value.strip()) else value


def _list_of_str(value: Any) -> Any:
    """A YAML list, or one ``a,b`` string (a ``-S`` override), as a tuple."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(value) if isinstance(value, list) else value


def _refuse(message: str, field: Optional[str] = None) -> PydanticCustomError:
    """A refusal in the project's words; ``field``: the key it names, when a check of the whole
    section raises it (``{section}`` in ``message`` becomes the section's dotted name)."""
    return PydanticCustomError("vlp_setting", "{message}", {"message": message, "field": field})


def _host_port(entry: str) -> str:
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _refuse(f"must be host:port (e.g. 127.0.0.1:8765), got {entry!r}")
    return entry


Number = Annotated[float, BeforeValidator(_yaml_number)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_list_of_str)]
HostPorts = Annotated[tuple[Annotated[str, AfterValidator(_host_port)], ...], BeforeValidator(_list_of_str)]
Precision = Literal["auto", "fp32", "bf16"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Settings(BaseModel):
    """The base of every section: frozen, unknown keys refused, no type coercion (an int is not a
    bool, ``"3"`` is not an int; a float takes an int), no NaN or infinity."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _over_nested_defaults(cls, data: Any) -> Any:
        """A nested section given in part keeps its own default's other values (``finetune.filter``
        given ``steps`` keeps the filter's lr, not :class:`TrainParams`'s); ``null`` = its default."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            if isinstance(f.default, Settings) and name in out and (out[name] is None or isinstance(out[name], dict)):
                out[name] = _merge(f.default.model_dump(), out[name] or {})
        return out


# --------------------------------------------------------------------------- sections
class SyntheticParams(Settings):
    """The synthetic web (``vlp synthetic make``)."""

    seed: int = Field(0, ge=0)
    objects: int = Field(2, ge=1, le=2)  # per image: 2 (a relation between them) or 1 (at a position; learns in minutes)
    image_size: int = Field(48, ge=8)
    n_web: int = Field(20000, ge=0)
    n_human: int = Field(2000, ge=0)
    n_test: int = Field(1000, ge=0)
    noise_rate: Number = Field(0.4, ge=0, le=1)  # share of web captions corrupted, split evenly over the kinds
    holdout_frac: Number = Field(0.1, ge=0, lt=1)  # share of (colour, shape) pairs never shown in human/web splits
    fail_rate: Number = Field(0.02, ge=0, le=1)  # share of web URLs that fail (404, not an image, truncated JPEG)
    jpeg_quality: int = Field(95, ge=1, le=100)


class IngestParams(Settings):
    """Downloading a URL list into shards with img2dataset (``vlp ingest``)."""

    url_col: str = "url"
    caption_col: str = "caption"
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"
    image_size: int = Field(48, ge=1)
    resize_mode: Literal["no", "border", "keep_ratio", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    output_format: Literal["webdataset", "files"] = "webdataset"
    # img2dataset's distributor: multiprocessing (one machine), or pyspark / ray for a cluster
    # (a Spark session / ray.init() must exist; see infra/README.md)
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    number_sample_per_shard: int = Field(1000, ge=1)
    processes_count: int = Field(2, ge=1)
    thread_count: int = Field(16, ge=1)
    timeout: int = Field(10, gt=0)
    retries: int = Field(0, ge=0)
    incremental: bool = True
    # download again, into new shards, only the rows that failed for a transient reason (timeout,
    # HTTP 5xx, refused / reset / dropped connection; vlp_core/ingest/retry.py) and merge them into
    # the manifest; `vlp ingest --retry-failed` sets it for one run.  Needs incremental
    retry_failed: bool = False
    # host:port entries that may be contacted although they are not public addresses (the demo:
    # its own 127.0.0.1 server); everything else must resolve to global addresses only
    allowed_hosts: HostPorts = ()
    max_image_pixels: int = Field(40_000_000, ge=1)  # width x height, read from the header before decoding
    max_caption_chars: int = Field(512, ge=1)
    disallowed_header_directives: Strings = ("noai", "noimageai", "noindex", "noimageindex")

    @model_validator(mode="after")
    def _retry_needs_incremental(self) -> "IngestParams":
        if self.retry_failed and not self.incremental:
            raise _refuse("needs {section}.incremental=true (a retry adds shards to the earlier run's; "
                          "incremental=false deletes them)", "retry_failed")
        return self


class ModelParams(Settings):
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
    vocab_size: int = Field(512, ge=8)
    max_text_len: int = Field(32, ge=4)
    # bf16 autocast in training (vlp_core/precision.py): auto = on CUDA and on CPUs with native
    # bf16 (AMX-BF16 / AVX512-BF16); fp32 / bf16 force either
    precision: Precision = "auto"


# TrainParams fields that count in a stage key or training fingerprint only while the EMA is on
# (ema_decay > 0): keys and fingerprints recorded before the setting existed stay valid.
EMA_KEYS = ("ema_decay", "ema_warmup")
# TrainParams fields that count in a stage key or training fingerprint only when not 0 (added after
# runs were recorded with their behaviour at 0)
ZERO_OFF_KEYS = ("phrase_swaps", "synonyms", "holdout")


class TrainParams(Settings):
    """One training run (pretrain, or a fine-tune target)."""

    steps: int = Field(700, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: Number = Field(1e-3, gt=0)
    min_lr: Number = Field(1e-5, ge=0)
    weight_decay: Number = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    seed: int = Field(0, ge=0)
    alpha: Number = Field(0.4, ge=0, le=1)  # momentum distillation weight
    itc_weight: Number = Field(1.0, ge=0)
    itm_weight: Number = Field(1.0, ge=0)
    lm_weight: Number = Field(1.0, ge=0)
    # the share of pairs given a compositional hard negative text for ITM and ITC (train/hardneg.py):
    # the caption with two content words swapped or one replaced by a word that keeps the same
    # company in the corpus; 0 = BLIP's ITM (negatives mined from the batch only)
    hard_negatives: Number = Field(0.0, ge=0, le=1)
    # of those hard negatives, the share that trade two word-for-word aligned phrases where the caption
    # has them ("a red circle left of a blue box" -> "a blue box left of a red circle": the relation
    # reversed, the bag of words unchanged; NegCLIP's order negatives); 0 = word swaps and replacements only
    phrase_swaps: Number = Field(0.0, ge=0, le=1)
    # groups of words that mean the same, one group a string of words ("big large", "circle disc ball";
    # a -S override: "big large,circle disc ball"): a hard negative never replaces a word with one of
    # its group, so a synonym is not taught as a mismatch; empty = none (the corpus alone decides)
    synonyms: Strings = ()
    # the share of the training pairs held out, chosen by key (vlp_core/holdout.py); the filter's
    # held-out human pairs are what CapFilt calibrates its threshold on (threshold_mode calibrated),
    # so the threshold is not taken from pairs the filter memorised; 0 = train on every pair
    holdout: Number = Field(0.0, ge=0, lt=1)
    ema_decay: Number = Field(0.0, ge=0, lt=1)  # EMA of the weights for the final model/ (train/ema.py); 0 = off, the live weights
    ema_warmup: bool = True  # timm's decay warm-up: min(ema_decay, 1 - t ** -0.75) at step t
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainParams":
        if self.min_lr > self.lr:
            raise _refuse(f"must not exceed {{section}}.lr ({self.lr!r}), got {self.min_lr!r}", "min_lr")
        if self.itc_weight + self.itm_weight + self.lm_weight <= 0:
            raise _refuse("at least one loss weight must be > 0", "itc_weight/itm_weight/lm_weight")
        return self


class FinetuneParams(Settings):
    captioner: TrainParams = TrainParams(steps=300, lr=5e-4, warmup_steps=20, itc_weight=0.0, itm_weight=0.0)
    filter: TrainParams = TrainParams(steps=300, lr=5e-4, warmup_steps=20, lm_weight=0.0)


class RetrainParams(Settings):
    """How each round's model is retrained on its bootstrapped corpus (and the controls on theirs).

    ``scratch`` (BLIP; the benchmarks): a fresh model trained like round 0, ``pretrain.steps``.
    ``continue`` (the demo): the round's base model (round 0's pretrained model, or the previous
    round's retrained one) trained on for ``steps`` more, with ``pretrain``'s other settings
    unless set here; the comparison then adds "raw web", round 0 continued on the raw web for the
    same steps, as the fair baseline."""

    init: Literal["scratch", "continue"] = "scratch"
    steps: Optional[int] = Field(None, ge=1)  # continue: None = pretrain.steps
    lr: Optional[Number] = Field(None, gt=0)  # continue: None = pretrain.lr
    warmup_steps: Optional[int] = Field(None, ge=0)  # continue: None = pretrain.warmup_steps


class CapfiltParams(Settings):
    """Captioning and filtering (``vlp capfilt``)."""

    # where each round's captioner comes from: "base" = fine-tuned from the round's base model (BLIP's
    # CapFilt; a base model whose family does not generate, ViLBERT, gives a round without one);
    # "none" = no captioner, the filter judges the web texts only (BLIP's "F alone"); or a model
    # folder of a family that generates (a vlp checkpoint or a local HF BLIP folder, relative to the
    # work dir), fine-tuned into each round's captioner on the human pairs: e.g. a BLIP captioner
    # beside a ViLBERT filter (vlp_core/rounds.py)
    captioner: str = Field("base", min_length=1)
    num_captions: int = Field(1, ge=0)  # K synthetic captions per image
    decode: Literal["nucleus", "beam", "greedy"] = "nucleus"
    top_p: Number = Field(0.9, gt=0, le=1)
    num_beams: int = Field(3, ge=1)
    prompt: str = "a picture of "
    max_length: int = Field(30, ge=1)
    min_length: int = Field(5, ge=0)
    threshold_mode: Literal["fixed", "calibrated"] = "calibrated"
    itm_threshold: Number = Field(0.5, ge=0, le=1)  # used when threshold_mode == fixed
    calibrate_percentile: Number = Field(10.0, ge=0, le=100)  # keep what scores above this percentile of clean pairs
    itc_prescreen: Optional[Number] = Field(None, ge=-1, le=1)  # skip the ITM pass below this ITC similarity
    keep_top: Optional[int] = Field(None, ge=1)  # keep at most N synthetic captions per image, the highest ITM above the threshold
    batch_size: int = Field(128, ge=1)
    seed: int = Field(0, ge=0)
    # bf16 autocast for the captioner, the filter and the features stage's embeddings
    # (vlp_core/precision.py): auto = on CUDA and on CPUs with native bf16 (AMX-BF16 /
    # AVX512-BF16); fp32 / bf16 force either
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _lengths(self) -> "CapfiltParams":
        if self.min_length > self.max_length:
            raise _refuse(f"must not exceed {{section}}.max_length ({self.max_length}), got {self.min_length}",
                          "min_length")
        return self


class FeaturesParams(Settings):
    """Embeddings and duplicate flags (``vlp features``)."""

    backbone: Optional[str] = None  # optional extra timm backbone for pooled features
    near_dup_threshold: Number = Field(0.98, ge=-1, le=1)
    block_size: int = Field(4096, ge=1)
    batch_size: int = Field(256, ge=1)


class EvaluateParams(Settings):
    k_test: int = Field(16, ge=1)  # re-rank the ITC top-k by ITM (BLIP's protocol)
    batch_size: int = Field(256, ge=1)
    caption_decode: Literal["greedy", "beam"] = "greedy"


class CatalogParams(Settings):
    path: str = "data/catalog.duckdb"
    query_timeout_seconds: Number = Field(60.0, gt=0)  # `vlp query` stops a query that runs longer


class GateParams(Settings):
    """The quality gate (``vlp_core/gate.py``): a round is promoted -- tagged ``round-N``, marked
    ``promoted`` in the catalog, and the source of the next round's captioner and filter and of
    the nightly's -- only when its evaluation beats its parent's (the latest promoted round
    before it, else the pretrained baseline) on ``metric`` by more than ``margin``."""

    enabled: bool = True  # false: every finished round is promoted (reason: the gate is off)
    metric: str = "r1_mean"  # a key of metrics.json, dotted for nested ones (as the catalog flattens them)
    higher_is_better: bool = True  # false for a loss-like metric
    margin: Number = 0.0  # child - parent must exceed it (metric units); negative tolerates a small regression
    no_parent: Literal["promote", "reject"] = "promote"  # when there is no parent evaluation to compare with

    @field_validator("metric")
    @classmethod
    def _names_a_metric(cls, value: str) -> str:
        if not value.strip():
            raise _refuse(f"must name a metric of metrics.json (e.g. r1_mean), got {value!r}")
        return value


class OrchestrationParams(Settings):
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: Optional[str] = None  # None with task_runner=dask starts a local cluster
    dask_workers: int = Field(2, ge=1)
    retries: int = Field(2, ge=0)
    retry_delay_seconds: int = Field(5, ge=0)
    network_timeout_seconds: int = Field(3600, gt=0)
    rounds: int = Field(2, ge=0)
    dvc_commit: bool = True  # record each stage a flow ran in dvc.lock (`dvc commit`)
    git_tag: bool = True  # commit dvc.lock and tag round-N after each completed round
    dvc_push: bool = False  # push the round's data to dvc_remote_url after tagging
    dvc_remote_url: str = "../vlp-dvc-remote"  # used when the repo has no default remote yet
    schedule_cron: str = "0 2 * * *"  # `vlp deploy`: nightly incremental ingest + capfilt
    work_pool: str = "vlp-process"  # `vlp deploy`: the process work pool to run on
    fail_before: Optional[str] = None  # debugging/tests: raise before this stage (then rerun resumes)


class Params(Settings):
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
        """Plain nested dicts and lists, as ``params.yaml`` writes them (and the stage keys hash them)."""
        return _to_plain(self.model_dump())

    def replace(self, **overrides: Any) -> "Params":
        """``params.replace(**{"capfilt.top_p": 0.8})`` returns a validated copy."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value, "<replace>")
        return params_from_dict(data, "<replace>")


# --------------------------------------------------------------------------- loading
DEFAULT_PARAMS_FILE = "params.yaml"
# keys that once existed: refused with what replaced them
_REPLACED = {"ingest.allow_private_network": "was replaced by ingest.allowed_hosts, a list of host:port "
                                             "entries that may be contacted (e.g. [127.0.0.1:8765])"}


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
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source, origins or {}) from None


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(source, dotted, f"{part!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


# --------------------------------------------------------------------------- one-line errors
def _config_error(exc: ValidationError, source: str, origins: dict[str, str]) -> ConfigError:
    """pydantic's first error as one line: the file (or the ``-S`` override), the dotted key, and
    what is wrong in the project's words."""
    err = exc.errors(include_url=False)[0]
    loc, ctx, got = list(err["loc"]), err.get("ctx") or {}, err.get("input")
    fields = [p for p in loc if isinstance(p, str)]
    section = ".".join(fields[:-1] if err["type"] != "vlp_setting" or ctx.get("field") is None else fields)
    if err["type"] == "vlp_setting" and ctx.get("field"):
        loc.append(ctx["field"])
        fields.append(ctx["field"])
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc)) or "<top level>"
    names = [f"{'.'.join(fields[:-1] + [n])}" for n in fields[-1].split("/")] if fields else []
    src = next((origins[n] for n in names if n in origins), None)
    src = src or next((o for k, o in origins.items() if names and k.startswith(names[0] + ".")), source)
    return ConfigError(src, key, _message(err, fields, section, got))


_TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
               "string_type": "a string", "tuple_type": "a list", "list_type": "a list"}


def _message(err: dict[str, Any], fields: list[str], section: str, got: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "vlp_setting":
        return str(ctx["message"]).replace("{section}", section)
    if kind == "extra_forbidden":
        key = ".".join(fields)
        owner = _model_at(fields[:-1])
        known = ", ".join(sorted(owner.model_fields)) if owner else "?"
        return _REPLACED.get(key, f"unknown key (known: {known})")
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping, got {type(got).__name__}"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {got!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {_bounds(fields)}, got {got!r}"
    return " ".join(str(err["msg"]).split())  # pydantic's own words, on one line


def _model_at(fields: list[str]) -> Optional[type[BaseModel]]:
    cls: Any = Params
    for name in fields:
        f = cls.model_fields.get(name) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if f is None:
            return None
        cls = f.annotation
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _bounds(fields: list[str]) -> str:
    """A field's constraints as the message says them: ``>= 1``, ``> 0``, ``in [0, 1)``."""
    owner = _model_at(fields[:-1])
    meta = owner.model_fields[fields[-1]].metadata if owner and fields[-1] in owner.model_fields else []
    lo = hi = None
    for m in meta:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            lo = ("[" if isinstance(m, annotated_types.Ge) else "(", getattr(m, "ge", getattr(m, "gt", None)))
        elif isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            hi = ("]" if isinstance(m, annotated_types.Le) else ")", getattr(m, "le", getattr(m, "lt", None)))
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return "in range"


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _to_plain(obj.model_dump())
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def section_dict(params: Params, section: str) -> dict[str, Any]:
    """The plain dict of one section, e.g. for recording params in the catalog."""
    return _to_plain(getattr(params, section))


__all__ = [
    "ConfigError",
    "EMA_KEYS",
    "Params",
    "Settings",
    "load_params",
    "params_from_dict",
    "section_dict",
] + [name for name in list(globals()) if name.endswith("Params") and name != "Params"]
