"""Files: atomic writes, Parquet and JSON reading with one-line errors, stage statistics.

Every stage writes each output file atomically (a temp file in the same folder, then
``os.replace``), so a crash never leaves half a file.  What is done and skipped -- a stage or
one shard of it -- is decided by :mod:`vlp_core.stagecache`, not here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.errors import VlpError


class ParquetReadError(VlpError, OSError):
    """A Parquet input that cannot be read (missing, truncated, not Parquet); names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give (mkstemp's temp files are 0600)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path`` with the mode a
    plain ``open()`` would have given it (0644 under the usual umask), not the temp file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _parquet_error(path: Any, exc: Exception) -> ParquetReadError:
    name = ", ".join(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)
    if isinstance(exc, FileNotFoundError):
        return ParquetReadError(f"{name}: file not found")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ParquetReadError(f"{name}: not a readable Parquet file (truncated or damaged? {first[:200]})")


def read_parquet(path: Any, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """``pq.read_table`` with one clear error naming the file (:class:`ParquetReadError`)."""
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None


def read_parquet_schema(path: str | Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None


def read_parquet_metadata(path: str | Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_object(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else raises ``error`` in one line naming
    the file (unreadable, not JSON, or another JSON type)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class StageStats:
    """What every ``run_<stage>`` returns and writes as ``<out_dir>/stats.json``.

    ``rows_in`` must equal ``rows_out``: failures are rows with a status, not lost rows.
    """

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # e.g. rows per status / reason
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def check(self) -> "StageStats":
        if self.rows_in != self.rows_out:
            raise AssertionError(f"{self.stage}: {self.rows_in} rows in but {self.rows_out} rows out")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, out_dir: str | Path, name: str = "stats.json") -> Path:
        return write_json(self.to_dict(), Path(out_dir) / name)


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
