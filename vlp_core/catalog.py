"""The DuckDB catalog of dataset and model versions: record, list, diff, read-only query.

One ``.duckdb`` file (``params.catalog.path``) holds, for every recorded *version*:

* ``versions``    -- name, created, git revision, DVC hashes (JSON, from ``dvc.lock``),
                     params (JSON), round, corpus folder;
* ``stage_stats`` -- one row per ``stats.json`` (stage, rows in/out, seconds, counts JSON);
* ``metrics``     -- one row per numeric metric of each ``metrics.json`` (flattened keys);
* ``corpus``      -- the light columns of the version's CapFilt corpus (no pixels): key, url,
                     shard, candidate, text, source, itc, itm, kept, reason, round;
* ``version_states`` -- the quality gate's verdict on a version (``vlp_core/gate.py``): state
                     (``promoted`` / ``rejected``), reason, parent.  A table of its own, so a
                     catalog written before the gate still opens (its versions have no state;
                     a read-only open of such a file reads every state as NULL).

A comparison is then a query over two snapshots, with no checkout.  Rows of two versions
are matched by their *identity* ``(coalesce(url, key), candidate)``: the same image and the
same candidate slot (0 = the web/human text, 1..K = synthetic captions).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa

from vlp_core import versioning
from vlp_core.config import Params
from vlp_core.errors import VlpError
from vlp_core.gate import STATES
from vlp_core.io import read_parquet
from vlp_core.layout import CORPUS_DIR, as_written
from vlp_core.schema import CORPUS_SCHEMA, C

VERSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
CORPUS_COLUMNS = (C.KEY, C.URL, C.SHARD, C.CANDIDATE, C.TEXT, C.SOURCE, C.ITC, C.ITM, C.KEPT, C.REASON, C.ROUND)

_DDL = f"""
CREATE TABLE IF NOT EXISTS versions (
    name VARCHAR PRIMARY KEY, created TIMESTAMP, git_rev VARCHAR, dvc_hashes VARCHAR,
    params VARCHAR, round INTEGER, corpus_dir VARCHAR);
CREATE TABLE IF NOT EXISTS stage_stats (
    version VARCHAR, stage VARCHAR, path VARCHAR, rows_in BIGINT, rows_out BIGINT,
    seconds DOUBLE, counts VARCHAR, extra VARCHAR);
CREATE TABLE IF NOT EXISTS metrics (
    version VARCHAR, stage VARCHAR, metric VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS corpus (
    version VARCHAR, {C.KEY} VARCHAR, {C.URL} VARCHAR, {C.SHARD} VARCHAR, {C.CANDIDATE} SMALLINT,
    {C.TEXT} VARCHAR, {C.SOURCE} VARCHAR, {C.ITC} FLOAT, {C.ITM} FLOAT, {C.KEPT} BOOLEAN,
    {C.REASON} VARCHAR, {C.ROUND} INTEGER);
CREATE TABLE IF NOT EXISTS version_states (
    version VARCHAR, state VARCHAR, reason VARCHAR, parent VARCHAR);
"""


class CatalogError(VlpError, ValueError):
    """A bad version name, a missing version or file, or a refused query."""


def check_version_name(name: str) -> str:
    """Return ``name`` if it is a safe version name (letters, digits, ``._+-``; no ``/``,
    no leading dot, no ``..``), else raise :class:`CatalogError`."""
    if not isinstance(name, str) or not VERSION_NAME_RE.match(name) or ".." in name:
        raise CatalogError(
            f"version name {name!r} refused: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit, and no '..' or '/'"
        )
    return name


EXP_NAME_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for every stage command of an experiment


def experiment_version_name(base: str, exp_name: Optional[str]) -> str:
    """The catalog name of version ``base`` (e.g. ``round0``) recorded inside DVC experiment
    ``exp_name``: ``<base>+<exp_name>`` (characters a version name refuses become ``-``, cut to
    fit 128), so an experiment never replaces the version of the same round; ``base`` itself
    outside an experiment (``exp_name`` empty or None)."""
    check_version_name(base)
    if not exp_name or not exp_name.strip():
        return base
    exp = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_+-]", "-", exp_name.strip())).strip("-") or "exp"
    return check_version_name(f"{base}+{exp}"[:128])


def version_name(base: str, env: Optional[dict[str, str]] = None) -> str:
    """``base``, or its experiment name (:func:`experiment_version_name`) when the environment
    (default ``os.environ``) says a ``dvc exp run`` is running (``DVC_EXP_NAME``)."""
    return experiment_version_name(base, (os.environ if env is None else env).get(EXP_NAME_ENV))


# --------------------------------------------------------------------------- connection
def connect(path: str | Path, read_only: bool = False):
    """Open the catalog (creating the file and tables unless ``read_only``)."""
    import duckdb

    path = Path(path)
    if read_only:
        if not path.exists():
            raise CatalogError(f"{path}: catalog not found (record a version first: vlp record ...)")
        if not path.is_file():
            raise CatalogError(f"{path}: not a catalog file (a folder)")
        try:
            return duckdb.connect(str(path), read_only=True, config={"enable_external_access": False})
        except duckdb.Error as exc:
            raise _open_error(path, exc) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise _open_error(path, exc) from None
    con.execute(_DDL)
    return con


def _open_error(path: Path, exc: Exception) -> CatalogError:
    """One line for a catalog DuckDB cannot open: another process holds it, or not DuckDB."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "lock" in msg.lower():
        return CatalogError(f"{path}: the catalog is held open by another process (wait for it to finish, or "
                            f"query a copy)")
    return CatalogError(f"{path}: not a DuckDB catalog, or damaged ({msg[:200]})")


def catalog_path(params: Params) -> Path:
    return Path(params.catalog.path)


# --------------------------------------------------------------------------- reading inputs
def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The corpus Parquet files of a CapFilt stage folder (``corpus/`` inside it), a corpus
    folder, or a single file."""
    p = Path(corpus_dir)
    if p.is_file():
        return [p]
    if (p / CORPUS_DIR).is_dir():
        p = p / CORPUS_DIR
    if not p.is_dir():
        raise CatalogError(f"{corpus_dir}: corpus folder not found")
    return sorted(f for f in p.glob("*.parquet") if not f.name.startswith("."))


def read_corpus_light(corpus_dir: str | Path) -> pa.Table:
    """The light columns (:data:`CORPUS_COLUMNS`) of every corpus file, one table."""
    tables = []
    for f in corpus_files(corpus_dir):
        t = read_parquet(f)
        missing = [c for c in (C.KEY, C.CANDIDATE, C.SOURCE, C.KEPT) if c not in t.column_names]
        if missing:
            raise CatalogError(f"{f}: not a corpus file, missing column(s) {', '.join(missing)}")
        cols = []
        for name in CORPUS_COLUMNS:
            typ = CORPUS_SCHEMA.field(name).type
            cols.append(t.column(name).cast(typ) if name in t.column_names else pa.nulls(t.num_rows, typ))
        tables.append(pa.Table.from_arrays(cols, names=list(CORPUS_COLUMNS)))
    if not tables:
        return pa.Table.from_arrays([pa.array([], CORPUS_SCHEMA.field(n).type) for n in CORPUS_COLUMNS],
                                    names=list(CORPUS_COLUMNS))
    return pa.concat_tables(tables)


def flatten_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"a.b": value}``; other leaves dropped, and
    so is the top-level ``settings`` record of ``metrics.json`` (settings, not results; the
    version's ``params`` already holds them)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not prefix and k == "settings":
                continue
            out.update(flatten_metrics(v, f"{prefix}{k}." if prefix or k else ""))
        return out
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return out
    out[prefix.rstrip(".")] = float(obj)
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: {what} is not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- record
@dataclass
class RecordSummary:
    name: str
    git_rev: Optional[str]
    corpus_rows: int
    stats: int
    metrics: int


def record_version(
    params: Params,
    name: str,
    corpus_dir: str | Path | None = None,
    stats_paths: Sequence[str | Path] = (),
    metrics_paths: Sequence[str | Path] = (),
    repo_dir: str | Path | None = ".",
    round: Optional[int] = None,
    catalog: str | Path | None = None,
    state: Optional[str] = None,
    reason: Optional[str] = None,
    parent: Optional[str] = None,
) -> RecordSummary:
    """Record (or replace) version ``name`` in the catalog at ``catalog`` (default
    ``params.catalog.path``).  The git revision and DVC hashes are read from ``repo_dir``
    when it is a git/DVC repo (else left empty); the stats and corpus paths are stored relative
    to it (:func:`vlp_core.layout.as_written`).  ``state`` (``promoted`` / ``rejected``, with
    the gate's ``reason`` and the ``parent`` it compared with) is stored in ``version_states``;
    None records no state.  All inserts are one transaction."""
    check_version_name(name)
    if state is not None and state not in STATES:
        raise CatalogError(f"version {name!r}: state {state!r} refused (one of {', '.join(STATES)})")
    corpus = read_corpus_light(corpus_dir) if corpus_dir is not None else None
    stats_rows = []
    for sp in stats_paths:
        s = _read_json(Path(sp), "stats")
        if not isinstance(s, dict):
            raise CatalogError(f"{sp}: stats must be a JSON object")
        stats_rows.append((name, str(s.get("stage") or Path(sp).parent.name), as_written(sp, repo_dir or "."),
                           s.get("rows_in"),
                           s.get("rows_out"), s.get("seconds"), json.dumps(s.get("counts", {}), sort_keys=True),
                           json.dumps(s.get("extra", {}), sort_keys=True, default=str)))
    metric_rows = []
    for mp in metrics_paths:
        m = _read_json(Path(mp), "metrics")
        for k, v in sorted(flatten_metrics(m).items()):
            metric_rows.append((name, Path(mp).parent.name, k, v))
    git_rev = versioning.git_rev(repo_dir) if repo_dir is not None else None
    dvc_hashes = versioning.dvc_lock_hashes(repo_dir) if repo_dir is not None else {}
    if round is None and corpus is not None and corpus.num_rows:
        round = int(pa.compute.max(corpus.column(C.ROUND)).as_py() or 0)

    con = connect(catalog or catalog_path(params))
    try:
        con.execute("BEGIN TRANSACTION")
        for table in ("versions", "stage_stats", "metrics"):
            con.execute(f"DELETE FROM {table} WHERE {'name' if table == 'versions' else 'version'} = ?", [name])
        con.execute("DELETE FROM corpus WHERE version = ?", [name])
        con.execute("DELETE FROM version_states WHERE version = ?", [name])
        con.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
            [name, _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), git_rev,
             json.dumps(dvc_hashes, sort_keys=True), json.dumps(params.to_dict(), sort_keys=True), round,
             as_written(corpus_dir, repo_dir or ".") if corpus_dir is not None else None],
        )
        if state is not None:
            con.execute("INSERT INTO version_states VALUES (?, ?, ?, ?)", [name, state, reason, parent])
        if stats_rows:
            con.executemany("INSERT INTO stage_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?)", stats_rows)
        if metric_rows:
            con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", metric_rows)
        if corpus is not None and corpus.num_rows:
            snap = corpus  # noqa: F841  (read by DuckDB's replacement scan)
            cols = ", ".join(CORPUS_COLUMNS)
            con.execute(f"INSERT INTO corpus SELECT ? AS version, {cols} FROM snap", [name])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return RecordSummary(name, git_rev, corpus.num_rows if corpus is not None else 0, len(stats_rows),
                         len(metric_rows))


def update_version_revision(catalog: str | Path, name: str, repo_dir: str | Path) -> tuple[Optional[str], int]:
    """Store ``repo_dir``'s git revision and ``dvc.lock`` hashes on version ``name``, already
    recorded: a round is recorded before its stages are ``dvc commit``-ted and its ``dvc.lock``
    committed and tagged, so the flows call this afterwards.  Returns (git revision, number of
    stages with hashes)."""
    check_version_name(name)
    git_rev = versioning.git_rev(repo_dir)
    hashes = versioning.dvc_lock_hashes(repo_dir)
    con = connect(catalog)
    try:
        if not con.execute("SELECT count(*) FROM versions WHERE name = ?", [name]).fetchone()[0]:
            raise CatalogError(f"{catalog}: version {name!r} not found (record it first)")
        con.execute("UPDATE versions SET git_rev = ?, dvc_hashes = ? WHERE name = ?",
                    [git_rev, json.dumps(hashes, sort_keys=True), name])
    finally:
        con.close()
    return git_rev, len(hashes)


# --------------------------------------------------------------------------- list
def has_table(con, table: str) -> bool:
    """Whether the open catalog holds ``table`` (a file written by an older version may not)."""
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchone()[0])


def list_versions(path: str | Path) -> list[dict[str, Any]]:
    """One dict per version, oldest first: name, created, round, git_rev, rows, kept, metrics,
    and the gate's state, state_reason and parent (None for a version recorded without one)."""
    con = connect(path, read_only=True)
    try:
        states = ("version_states" if has_table(con, "version_states")
                  else "(SELECT NULL::VARCHAR AS version, NULL::VARCHAR AS state, NULL::VARCHAR AS reason, "
                       "NULL::VARCHAR AS parent WHERE false)")
        rows = con.execute(
            f"""SELECT v.name, v.created, v.round, v.git_rev,
                       count(c.version) AS rows, count(*) FILTER (WHERE c.kept) AS kept,
                       any_value(s.state), any_value(s.reason), any_value(s.parent)
                FROM versions v LEFT JOIN corpus c ON c.version = v.name
                     LEFT JOIN {states} s ON s.version = v.name
                GROUP BY v.name, v.created, v.round, v.git_rev ORDER BY v.created, v.name"""
        ).fetchall()
        names = ["name", "created", "round", "git_rev", "rows", "kept", "state", "state_reason", "parent"]
        out = [dict(zip(names, r)) for r in rows]
        for d in out:
            d["metrics"] = dict(con.execute(
                "SELECT stage || '.' || metric, value FROM metrics WHERE version = ? ORDER BY 1", [d["name"]]
            ).fetchall())
        return out
    finally:
        con.close()


# --------------------------------------------------------------------------- diff
@dataclass
class VersionDiff:
    """What changed from version ``a`` to version ``b`` (rows matched by identity)."""

    a: str
    b: str
    rows_a: int = 0
    rows_b: int = 0
    rows_added: int = 0  # identities in b only
    rows_removed: int = 0  # identities in a only
    rows_matched: int = 0
    kept_gained: int = 0  # matched rows dropped in a, kept in b
    kept_lost: int = 0  # matched rows kept in a, dropped in b
    text_changed: int = 0  # matched rows whose text differs
    itm_mean_shift: Optional[float] = None  # mean(itm_b - itm_a) over matched rows with both scores
    itm_mean_abs_shift: Optional[float] = None
    itc_mean_shift: Optional[float] = None
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {rows_a, kept_a, rows_b, kept_b}
    metrics: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)  # metric -> {a, b, delta}
    params_changed: dict[str, dict[str, Any]] = field(default_factory=dict)  # "capfilt.itm_threshold" -> {a, b}
    examples: list[dict[str, Any]] = field(default_factory=list)  # captions that changed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_IDENT = f"coalesce({C.URL}, {C.KEY})"


def diff_versions(path: str | Path, a: str, b: str, n_examples: int = 5) -> VersionDiff:
    """Compare the snapshots of versions ``a`` and ``b``."""
    check_version_name(a)
    check_version_name(b)
    con = connect(path, read_only=True)
    try:
        known = {r[0] for r in con.execute("SELECT name FROM versions").fetchall()}
        for v in (a, b):
            if v not in known:
                raise CatalogError(f"{path}: no version {v!r} (known: {', '.join(sorted(known)) or 'none'})")
        d = VersionDiff(a, b)
        d.rows_a, d.rows_b = (con.execute("SELECT count(*) FROM corpus WHERE version = ?", [v]).fetchone()[0]
                              for v in (a, b))
        joined = f"""
            WITH ca AS (SELECT {_IDENT} AS ident, * FROM corpus WHERE version = $a),
                 cb AS (SELECT {_IDENT} AS ident, * FROM corpus WHERE version = $b)
        """
        d.rows_added, d.rows_removed, d.rows_matched = con.execute(
            joined + f"""SELECT count(*) FILTER (WHERE ca.ident IS NULL),
                                count(*) FILTER (WHERE cb.ident IS NULL),
                                count(*) FILTER (WHERE ca.ident IS NOT NULL AND cb.ident IS NOT NULL)
                         FROM ca FULL OUTER JOIN cb
                           ON ca.ident = cb.ident AND ca.{C.CANDIDATE} = cb.{C.CANDIDATE}""",
            {"a": a, "b": b},
        ).fetchone()
        (d.kept_gained, d.kept_lost, d.text_changed, d.itm_mean_shift, d.itm_mean_abs_shift,
         d.itc_mean_shift) = con.execute(
            joined + f"""SELECT count(*) FILTER (WHERE NOT ca.kept AND cb.kept),
                                count(*) FILTER (WHERE ca.kept AND NOT cb.kept),
                                count(*) FILTER (WHERE ca.text IS DISTINCT FROM cb.text),
                                avg(cb.itm - ca.itm), avg(abs(cb.itm - ca.itm)), avg(cb.itc - ca.itc)
                         FROM ca JOIN cb ON ca.ident = cb.ident AND ca.{C.CANDIDATE} = cb.{C.CANDIDATE}""",
            {"a": a, "b": b},
        ).fetchone()
        for src, v, rows, kept in con.execute(
            f"""SELECT {C.SOURCE}, version, count(*), count(*) FILTER (WHERE kept) FROM corpus
                WHERE version IN ($a, $b) GROUP BY ALL ORDER BY 1, 2""", {"a": a, "b": b}
        ).fetchall():
            slot = d.by_source.setdefault(src, {"rows_a": 0, "kept_a": 0, "rows_b": 0, "kept_b": 0})
            suffix = "a" if v == a else "b"
            slot[f"rows_{suffix}"], slot[f"kept_{suffix}"] = rows, kept
            if a == b:
                slot["rows_b"], slot["kept_b"] = rows, kept
        for metric, va, vb in con.execute(
            """SELECT coalesce(ma.k, mb.k), ma.value, mb.value FROM
                 (SELECT stage || '.' || metric AS k, value FROM metrics WHERE version = $a) ma
                 FULL OUTER JOIN (SELECT stage || '.' || metric AS k, value FROM metrics WHERE version = $b) mb
                 ON ma.k = mb.k ORDER BY 1""", {"a": a, "b": b}
        ).fetchall():
            d.metrics[metric] = {"a": va, "b": vb, "delta": (vb - va) if va is not None and vb is not None else None}
        pa_json, pb_json = (con.execute("SELECT params FROM versions WHERE name = ?", [v]).fetchone()[0]
                            for v in (a, b))
        fa, fb = _flatten_params(json.loads(pa_json or "{}")), _flatten_params(json.loads(pb_json or "{}"))
        d.params_changed = {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb))
                            if fa.get(k) != fb.get(k)}
        ex = con.execute(
            joined + f"""SELECT ca.{C.KEY}, ca.{C.URL}, ca.{C.CANDIDATE}, ca.{C.SOURCE}, ca.text, cb.text,
                                ca.kept, cb.kept, ca.itm, cb.itm
                         FROM ca JOIN cb ON ca.ident = cb.ident AND ca.{C.CANDIDATE} = cb.{C.CANDIDATE}
                         WHERE ca.text IS DISTINCT FROM cb.text OR ca.kept IS DISTINCT FROM cb.kept
                         ORDER BY (ca.text IS DISTINCT FROM cb.text) DESC, ca.ident, ca.{C.CANDIDATE}
                         LIMIT $n""",
            {"a": a, "b": b, "n": int(n_examples)},
        ).fetchall()
        names = ["key", "url", "candidate", "source", "text_a", "text_b", "kept_a", "kept_b", "itm_a", "itm_b"]
        d.examples = [dict(zip(names, r)) for r in ex]
        for k in ("itm_mean_shift", "itm_mean_abs_shift", "itc_mean_shift"):
            v = getattr(d, k)
            setattr(d, k, None if v is None else round(float(v), 6))
        return d
    finally:
        con.close()


def _flatten_params(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def format_diff(d: VersionDiff) -> str:
    """A human-readable report of a :class:`VersionDiff`."""

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:+.4f}" if isinstance(v, float) else str(v))

    lines = [
        f"versions {d.a} -> {d.b}",
        f"  rows           {d.rows_a} -> {d.rows_b}  (added {d.rows_added}, removed {d.rows_removed}, "
        f"matched {d.rows_matched})",
        f"  kept flips     dropped->kept {d.kept_gained}, kept->dropped {d.kept_lost}",
        f"  text changed   {d.text_changed} matched rows",
        f"  score shift    itm mean {f(d.itm_mean_shift)} (mean |d| {f(d.itm_mean_abs_shift)}), "
        f"itc mean {f(d.itc_mean_shift)}",
        "  by source      source      rows_a  kept_a  rows_b  kept_b",
    ]
    for src, s in sorted(d.by_source.items()):
        lines.append(f"                 {src:<10} {s['rows_a']:>7} {s['kept_a']:>7} {s['rows_b']:>7} {s['kept_b']:>7}")
    if d.params_changed:
        lines.append("  params changed " + ", ".join(f"{k}: {v['a']!r} -> {v['b']!r}"
                                                       for k, v in d.params_changed.items()))
    if d.metrics:
        lines.append("  metrics        name                               a          b      delta")
        for m, v in d.metrics.items():
            fa = "-" if v["a"] is None else f"{v['a']:.4f}"
            fb = "-" if v["b"] is None else f"{v['b']:.4f}"
            lines.append(f"                 {m:<30} {fa:>10} {fb:>10} {f(v['delta']):>10}")
    if d.examples:
        lines.append("  changed captions (key/candidate: a -> b)")
        for e in d.examples:
            ka = "kept" if e["kept_a"] else "dropped"
            kb = "kept" if e["kept_b"] else "dropped"
            lines.append(f"    {e['key']}/{e['candidate']} [{e['source']}] {e['text_a']!r} ({ka}) -> "
                         f"{e['text_b']!r} ({kb})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- query
_COMMENT_RE = re.compile(r"(--[^\n]*\n?)|(/\*.*?\*/)", re.S)
_READ_VERBS = ("select", "with", "from")


def check_read_only_sql(sql: str) -> str:
    """Return ``sql`` if it is a single SELECT / WITH / FROM query, else raise."""
    body = _COMMENT_RE.sub(" ", sql).strip().rstrip(";").strip()
    if not body:
        raise CatalogError("query refused: empty statement")
    if ";" in body:
        raise CatalogError("query refused: one statement at a time (found ';')")
    verb = body.split(None, 1)[0].lower()
    if verb not in _READ_VERBS:
        raise CatalogError(
            f"query refused: the catalog is read-only here, only SELECT/WITH queries run (got {verb.upper()})"
        )
    return body


def query(path: str | Path, sql: str, limit: Optional[int] = None,
          timeout: Optional[float] = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only query; returns ``(column names, rows)``.  The database is opened
    read-only with external file access off, and non-SELECT statements are refused.  A query
    still running after ``timeout`` seconds is interrupted (:class:`CatalogError`)."""
    import duckdb

    body = check_read_only_sql(sql)
    con = connect(path, read_only=True)
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(timeout, stop) if timeout else None
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            cur = con.execute(body)
            cols = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchmany(limit) if limit else cur.fetchall()
        except (duckdb.Error, RuntimeError) as exc:
            if fired.is_set():
                raise CatalogError(f"{path}: query stopped after {timeout:g} s (catalog.query_timeout_seconds; "
                                   f"narrow the query or raise the limit)") from None
            raise CatalogError(f"query failed: {str(exc).splitlines()[0]}") from None
        if fired.is_set():
            raise CatalogError(f"{path}: query stopped after {timeout:g} s (catalog.query_timeout_seconds; "
                               f"narrow the query or raise the limit)")
        return cols, rows
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def format_table(cols: Sequence[str], rows: Iterable[Sequence[Any]], max_width: int = 60) -> str:
    """Plain-text table."""

    def cell(v: Any) -> str:
        s = "NULL" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(out)


__all__ = [
    "EXP_NAME_ENV", "CatalogError", "RecordSummary", "VersionDiff", "check_read_only_sql", "check_version_name",
    "connect", "diff_versions", "experiment_version_name", "format_diff", "format_table", "has_table",
    "list_versions", "query", "read_corpus_light", "record_version", "update_version_revision", "version_name",
]
