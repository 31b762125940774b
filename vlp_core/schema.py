"""Every Parquet schema of the platform, in one place.

Column names are defined once here and imported everywhere else (``from vlp_core.schema
import C``), so a rename is one edit.  Stages validate what they read with
:func:`require_columns`, which names the file and the missing column.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from vlp_core.errors import VlpError


class C:
    """Column names."""

    # shared
    KEY = "key"  # img2dataset's sample key, e.g. "000000012"
    URL = "url"
    CAPTION = "caption"
    TEXT = "text"
    STATUS = "status"
    REASON = "reason"
    SHARD = "shard"  # image reference: the ingest shard file, relative to the ingest dir
    ROW = "row_index"  # 0-based row number in the input URL list
    SHA256 = "sha256"
    WIDTH = "width"
    HEIGHT = "height"
    SPLIT = "split"
    # corpus
    SOURCE = "source"
    CANDIDATE = "candidate"  # 0 = the web alt-text, 1..K = synthetic captions
    ITC = "itc"
    ITM = "itm"
    KEPT = "kept"
    ITM_THRESHOLD = "itm_threshold"  # the threshold the keep rule used on this row (capfilt/judge.py)
    CAPTIONER_ID = "captioner_id"
    FILTER_ID = "filter_id"
    ROUND = "round"
    # features (run_features)
    IMAGE_EMB = "image_embedding"  # the filter's ITC image projection, fixed-size float32 list
    TEXT_EMB = "text_embedding"  # the filter's ITC text projection
    BACKBONE_EMB = "backbone_embedding"  # optional timm backbone pooled features
    EXACT_DUP = "exact_dup"  # an earlier image has the same sha256
    NEAR_DUP = "near_dup"  # an earlier image's embedding cosine is above features.near_dup_threshold
    DUP_OF = "dup_of"  # the key of that earlier image
    DUP_COSINE = "dup_cosine"  # cosine to the most similar earlier image
    # ground truth (never read by the pipeline, only by evaluation)
    IS_NOISE = "is_noise"
    NOISE_KIND = "noise_kind"
    FAIL_KIND = "fail_kind"
    TRUE_CAPTION = "true_caption"
    SCENE = "scene"  # JSON: objects (colour, shape, size, bbox) and the relation
    # region annotations (X-VLM's boxes with their phrases): an optional column of a URL list, carried
    # into its manifest and the training pairs; REGIONS_TYPE below
    REGIONS = "regions"


# Manifest statuses (ingest): every input row ends with exactly one of these.
SUCCESS = "success"  # the one ingest status whose row has an image
INGEST_STATUSES = (
    SUCCESS,
    "failed_to_download",
    "failed_to_resize",
    "refused_url",
    "duplicate_url",
    "invalid_row",
)

SOURCES = ("web", "synthetic", "human")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(C.ROW, pa.int64(), nullable=False),
        pa.field(C.URL, pa.string()),
        pa.field(C.CAPTION, pa.string()),  # normalised caption
        pa.field(C.STATUS, pa.string(), nullable=False),
        pa.field(C.REASON, pa.string()),
        pa.field(C.KEY, pa.string()),
        pa.field(C.SHARD, pa.string()),
        pa.field(C.WIDTH, pa.int32()),
        pa.field(C.HEIGHT, pa.int32()),
        pa.field(C.SHA256, pa.string()),
    ]
)

# A row's region annotations, as COCO / Visual Genome give X-VLM: a list of {phrase, box}, the box
# [x0, y0, x1, y1] normalised to [0, 1] of the image (x right, y down); null = none (a web row).
REGION_FIELDS = ("phrase", "box")
REGIONS_TYPE = pa.list_(pa.struct([pa.field("phrase", pa.string()), pa.field("box", pa.list_(pa.float32()))]))


def manifest_schema(regions: bool = False) -> pa.Schema:
    """:data:`MANIFEST_SCHEMA`, plus the ``regions`` column when the URL list had one."""
    return MANIFEST_SCHEMA.append(pa.field(C.REGIONS, REGIONS_TYPE)) if regions else MANIFEST_SCHEMA


def normalise_regions(value) -> "list[dict] | None":
    """One row's region annotations checked and normalised: None (no annotations) or a list of
    ``{"phrase": str, "box": [x0, y0, x1, y1]}`` with ``0 <= x0 < x1 <= 1``, same for y, and a
    non-empty phrase.  Raises ``ValueError`` saying what is wrong (the caller names file and row)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"regions must be a list of {{phrase, box}}, got {type(value).__name__}")
    out = []
    for j, r in enumerate(value):
        if not isinstance(r, dict) or set(r) - set(REGION_FIELDS) or "phrase" not in r or "box" not in r:
            raise ValueError(f"region {j}: expected {{phrase, box}}, got {r!r}")
        phrase, box = r["phrase"], r["box"]
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"region {j}: phrase must be a non-empty string, got {phrase!r}")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"region {j}: box must be 4 numbers [x0, y0, x1, y1], got {box!r}") from None
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"region {j}: box {[x0, y0, x1, y1]} is not inside [0, 1] with x0 < x1 and y0 < y1 "
                             "(boxes are normalised [x0, y0, x1, y1])")
        out.append({"phrase": phrase.strip(), "box": [x0, y0, x1, y1]})
    return out


CORPUS_SCHEMA = pa.schema(
    [
        pa.field(C.KEY, pa.string(), nullable=False),
        pa.field(C.URL, pa.string()),
        pa.field(C.SHARD, pa.string()),
        pa.field(C.CANDIDATE, pa.int16(), nullable=False),
        pa.field(C.TEXT, pa.string()),
        pa.field(C.SOURCE, pa.string(), nullable=False),
        pa.field(C.ITC, pa.float32()),
        pa.field(C.ITM, pa.float32()),
        pa.field(C.KEPT, pa.bool_(), nullable=False),
        pa.field(C.REASON, pa.string()),
        pa.field(C.CAPTIONER_ID, pa.string()),
        pa.field(C.FILTER_ID, pa.string()),
        pa.field(C.ROUND, pa.int32(), nullable=False),
        pa.field(C.ITM_THRESHOLD, pa.float32()),  # null in corpora written before it was stored
    ]
)

def features_schema(dim: int, backbone_dim: int | None = None) -> pa.Schema:
    """``run_features``' rows: one per corpus row, embeddings as fixed-size float32 lists."""
    fields = [
        pa.field(C.KEY, pa.string(), nullable=False),
        pa.field(C.SHARD, pa.string()),
        pa.field(C.CANDIDATE, pa.int16(), nullable=False),
        pa.field(C.SOURCE, pa.string()),
        pa.field(C.KEPT, pa.bool_()),
        pa.field(C.SHA256, pa.string()),
        pa.field(C.IMAGE_EMB, pa.list_(pa.float32(), dim)),
        pa.field(C.TEXT_EMB, pa.list_(pa.float32(), dim)),
    ]
    if backbone_dim:
        fields.append(pa.field(C.BACKBONE_EMB, pa.list_(pa.float32(), backbone_dim)))
    fields += [
        pa.field(C.EXACT_DUP, pa.bool_(), nullable=False),
        pa.field(C.NEAR_DUP, pa.bool_(), nullable=False),
        pa.field(C.DUP_OF, pa.string()),
        pa.field(C.DUP_COSINE, pa.float32()),
    ]
    return pa.schema(fields)


def itc_sidecar_schema(dim: int) -> pa.Schema:
    """CapFilt's ITC sidecar (``<capfilt>/feats/<shard>.parquet``, :mod:`vlp_core.corpus`): one
    row per corpus row, the filter's ITC projections that ``run_features`` turns into its rows."""
    return pa.schema([
        pa.field(C.KEY, pa.string(), nullable=False),
        pa.field(C.SHARD, pa.string()),
        pa.field(C.CANDIDATE, pa.int16(), nullable=False),
        pa.field(C.SHA256, pa.string()),
        pa.field(C.IMAGE_EMB, pa.list_(pa.float32(), dim)),
        pa.field(C.TEXT_EMB, pa.list_(pa.float32(), dim)),
    ])


GROUND_TRUTH_SCHEMA = pa.schema(
    [
        pa.field(C.URL, pa.string(), nullable=False),
        pa.field(C.SPLIT, pa.string(), nullable=False),
        pa.field(C.CAPTION, pa.string()),  # the caption as published (maybe noisy)
        pa.field(C.TRUE_CAPTION, pa.string()),
        pa.field(C.IS_NOISE, pa.bool_(), nullable=False),
        pa.field(C.NOISE_KIND, pa.string()),  # null when clean
        pa.field(C.FAIL_KIND, pa.string()),  # null when the URL serves a good image
        pa.field(C.SCENE, pa.string()),  # JSON
    ]
)


class SchemaError(VlpError, ValueError):
    """A file lacks a column or has a wrong type; the message names the file."""


def require_columns(table_or_schema, columns, source: str | Path) -> None:
    """Raise a clear error naming ``source`` if any of ``columns`` is missing."""
    schema = table_or_schema.schema if hasattr(table_or_schema, "schema") else table_or_schema
    names = set(schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaError(f"{source}: missing column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (missing nullable columns become null)."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            arrays.append(pa.nulls(table.num_rows, f.type))
        else:
            raise SchemaError(f"column {f.name} is required")
    return pa.Table.from_arrays(arrays, schema=schema)
