"""Atomic writes: outputs get the mode a plain open() gives (not the temp file's 0600), and a
failed write leaves nothing behind."""
from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from vlp_core.io import atomic_path, write_json, write_parquet, write_text


def test_outputs_have_the_usual_file_mode(tmp_path):
    """The mode a plain open() gives under this process's umask (0644 under the usual 022)."""
    made = [write_parquet(pa.table({"a": [1]}), tmp_path / "t.parquet"), write_json({"a": 1}, tmp_path / "s.json"),
            write_text("x", tmp_path / "r.txt")]
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert want == 0o666 & ~mask
    assert [stat.S_IMODE(p.stat().st_mode) for p in made] == [want] * 3


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
