"""Damaged inputs give one line naming the file, exit 2 and no output folder (issue 17, item 5)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from vlp_core.cli import main
from vlp_core.io import ParquetReadError, read_parquet, write_parquet
from vlp_core.schema import CORPUS_SCHEMA, conform

N = 200


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def bad(tmp_path):
    """A truncated ingest manifest, and a truncated CapFilt corpus inside a stage folder."""
    keys = [f"{i:09d}" for i in range(N)]
    manifest = write_parquet(pa.table({
        "key": keys, "url": [f"http://127.0.0.1/{k}.jpg" for k in keys], "caption": ["a red cube"] * N,
        "status": ["success"] * N, "shard": ["shards/00000.tar"] * N}), tmp_path / "ingest" / "manifest.parquet")
    corpus = write_parquet(conform(pa.table({
        "key": keys, "url": [f"/web/{k}.jpg" for k in keys], "shard": ["shards/00000.tar"] * N,
        "candidate": [0] * N, "text": ["a red cube"] * N, "source": ["web"] * N, "itc": [0.1] * N,
        "itm": [0.5] * N, "kept": [True] * N, "reason": [None] * N, "round": [0] * N}), CORPUS_SCHEMA),
        tmp_path / "capfilt" / "corpus" / "00000.parquet")
    return _truncate(manifest), _truncate(corpus), tmp_path


def test_read_parquet_names_a_truncated_file(bad):
    manifest, _, _ = bad
    with pytest.raises(ParquetReadError, match=rf"{manifest}: not a readable Parquet file"):
        read_parquet(manifest)


@pytest.mark.parametrize("command", ["pretrain", "pretrain-corpus", "capfilt", "capfilt-calibration", "features",
                                     "record", "rethreshold"])
def test_truncated_parquet_is_one_line_and_no_output(bad, command, capsys):
    manifest, corpus, root = bad
    out = root / "out"
    good_manifest = write_parquet(pa.table({"key": ["a"], "url": ["u"], "caption": ["c"], "status": ["success"],
                                            "shard": ["s"]}), root / "good" / "manifest.parquet")
    argv, damaged = {
        "pretrain": (["pretrain", "--train", f"{manifest}:web", "--out", str(out)], manifest),
        "pretrain-corpus": (["pretrain", "--train", str(root / "capfilt"), "--out", str(out)], corpus),
        "capfilt": (["capfilt", "--manifest", str(manifest), "--captioner", str(root / "m"), "--filter",
                     str(root / "m"), "--out", str(out)], manifest),
        "capfilt-calibration": (["capfilt", "--manifest", str(good_manifest), "--captioner", str(root / "m"),
                                 "--filter", str(root / "m"), "--out", str(out), "--calibration", str(manifest),
                                 "-S", "capfilt.threshold_mode=calibrated"], manifest),
        "features": (["features", "--corpus", str(root / "capfilt"), "--model", str(root / "m"), "--out", str(out)],
                     corpus),
        "record": (["record", "--name", "r0", "--corpus", str(root / "capfilt"), "--catalog", str(out / "c.duckdb")],
                   corpus),
        "rethreshold": (["capfilt", "rethreshold", "--corpus", str(root / "capfilt"), "--out", str(out),
                         "--itm-threshold", "0.3"], corpus),
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {damaged}: ") and "\n" not in err, err
    assert not out.exists()
