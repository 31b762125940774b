"""Read a URL list (Parquet, CSV, TSV, JSONL or plain text) into a two-column table.

Whatever the input, the result is ``url`` and ``caption`` string columns, one row per input
row and in input order (so the row number is the manifest's ``row_index``).  A Parquet or
JSONL list may also carry ``regions`` (box annotations with their phrases,
:data:`vlp_core.schema.REGIONS_TYPE`, e.g. COCO's or Visual Genome's for X-VLM); it is checked
(:func:`vlp_core.schema.normalise_regions`) and kept as a third column.  Bad files are
refused with one :class:`InputFileError` that names the file and the column or row.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from vlp_core.config import IngestParams
from vlp_core.errors import VlpError
from vlp_core.schema import REGIONS_TYPE, C, normalise_regions

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_EXT = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
        ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt", ".urls": "txt"}


class InputFileError(VlpError, ValueError):
    """A URL list that cannot be read: the message names the file and the column or row."""


def detect_format(path: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    fmt = _EXT.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(f"{path}: cannot tell the format from the name; set -S ingest.input_format="
                             f"one of {', '.join(FORMATS)}")
    return fmt


def _check_text(path: Path, head: bytes) -> None:
    """Refuse binary files.  A few NUL bytes in otherwise UTF-8 text are not binary: they are
    removed from the captions (:func:`vlp_core.ingest.validate.normalise_caption`)."""
    nul = head.find(b"\x00")
    text = head.replace(b"\x00", b"") if nul >= 0 else head
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(text) - 4:  # not just a multi-byte char cut by the read size
            if nul >= 0:
                raise InputFileError(f"{path}: binary data in a text URL list (NUL byte at offset {nul})") from None
            raise InputFileError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    if nul >= 0 and head.count(b"\x00") * 100 > len(head):  # more than 1%: UTF-16 or binary
        raise InputFileError(f"{path}: binary data in a text URL list (NUL byte at offset {nul})")


def _other_delimiter(header: str, delimiter: str) -> str | None:
    for name, d in (("tab", "\t"), ("comma", ","), ("semicolon", ";"), ("pipe", "|")):
        if d != delimiter and d in header:
            return name
    return None


def _read_delimited(path: Path, delimiter: str, url_col: str, caption_col: str) -> pa.Table:
    kind = "TSV" if delimiter == "\t" else "CSV"
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    names = header.split(delimiter)
    if url_col not in [n.strip().strip('"') for n in names]:
        other = _other_delimiter(header, delimiter)
        hint = f"; the header looks {other}-separated, not {kind}" if other else ""
        raise InputFileError(f"{path}: no url column {url_col!r} in the {kind} header "
                             f"(columns: {', '.join(repr(n) for n in names)}){hint}")
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={url_col: pa.string(), caption_col: pa.string()},
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        msg = str(exc).splitlines()[0]
        raise InputFileError(f"{path}: cannot parse as {kind} ({msg})") from None
    return table


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputFileError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def _as_strings(values: list) -> pa.Array:
    return pa.array([None if v is None else (v if isinstance(v, str) else str(v)) for v in values], pa.string())


def _regions(path: Path, values: list, first_line: int) -> pa.Array:
    """The ``regions`` column checked row by row (an error names the file and the row)."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(normalise_regions(v))
        except ValueError as exc:
            where = f"line {first_line + i}" if first_line else f"row {i}"
            raise InputFileError(f"{path}: {where}: column {C.REGIONS!r}: {exc}") from None
    return pa.array(out, REGIONS_TYPE)


def read_url_list(path: str | Path, params: IngestParams) -> pa.Table:
    """The URL list at ``path`` as a table with string columns ``url`` and ``caption`` (and
    ``regions`` when a Parquet or JSONL list has them)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, expected a URL list file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: empty file (no header and no rows)")
    fmt = detect_format(path, params.input_format)
    url_col, caption_col = params.url_col, params.caption_col
    regions = None
    if fmt != "parquet":
        with open(path, "rb") as f:
            _check_text(path, f.read(65536))
    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
            raise InputFileError(f"{path}: not a Parquet file ({str(exc).splitlines()[0]})") from None
        names = pf.schema_arrow.names
        if url_col not in names:
            raise InputFileError(f"{path}: no url column {url_col!r} (columns: {', '.join(names)}); "
                                 f"set -S ingest.url_col=NAME")
        cols = [url_col] + ([caption_col] if caption_col in names else []) + \
            ([C.REGIONS] if C.REGIONS in names else [])
        table = pf.read(columns=cols)
        urls = _as_strings(table.column(url_col).to_pylist())
        caps = (_as_strings(table.column(caption_col).to_pylist()) if caption_col in names
                else pa.nulls(table.num_rows, pa.string()))
        if C.REGIONS in names:
            regions = _regions(path, table.column(C.REGIONS).to_pylist(), 0)
    elif fmt in ("csv", "tsv"):
        table = _read_delimited(path, "," if fmt == "csv" else "\t", url_col, caption_col)
        urls = _as_strings(table.column(url_col).to_pylist())
        caps = (_as_strings(table.column(caption_col).to_pylist()) if caption_col in table.column_names
                else pa.nulls(table.num_rows, pa.string()))
    elif fmt == "jsonl":
        rows = _read_jsonl(path)
        if rows and not any(url_col in r for r in rows):
            raise InputFileError(f"{path}: no url column {url_col!r} in any JSON line "
                                 f"(keys of line 1: {', '.join(rows[0]) or 'none'})")
        urls = _as_strings([r.get(url_col) for r in rows])
        caps = _as_strings([r.get(caption_col) for r in rows])
        if any(C.REGIONS in r for r in rows):
            regions = _regions(path, [r.get(C.REGIONS) for r in rows], 1)
    elif fmt == "txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        urls = _as_strings([ln.strip() or None for ln in lines])
        caps = pa.nulls(len(lines), pa.string())
    else:
        raise InputFileError(f"{path}: unknown input format {fmt!r} (one of {', '.join(FORMATS)})")
    if len(urls) == 0:
        raise InputFileError(f"{path}: no rows (the file has a header or schema but no data)")
    if regions is not None:
        return pa.table({C.URL: urls, C.CAPTION: caps, C.REGIONS: regions})
    return pa.table({C.URL: urls, C.CAPTION: caps})
