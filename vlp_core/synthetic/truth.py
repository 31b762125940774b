"""Ground-truth helpers for evaluation (the pipeline itself never reads ground truth)."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.schema import GROUND_TRUTH_SCHEMA, require_columns


def url_path(url: str) -> str:
    """The path part of a URL ("http://127.0.0.1:8000/web/000001.jpg" -> "/web/000001.jpg");
    ground truth is keyed by it, so manifests from any server port join the same way."""
    return urlparse(str(url)).path


def load_ground_truth(world_dir: str | Path) -> pa.Table:
    """``W/ground_truth.parquet`` as a table with ``GROUND_TRUTH_SCHEMA``."""
    path = Path(world_dir) / "ground_truth.parquet"
    table = pq.read_table(path)
    require_columns(table, GROUND_TRUTH_SCHEMA.names, path)
    return table
