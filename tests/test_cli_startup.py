"""The command line starts light: ``vlp --help`` imports none of the heavy libraries, and the
catalog commands (``vlp versions``, ``vlp query``) never import torch, transformers, timm or
Prefect -- each is checked in a fresh interpreter, on a real (empty) catalog."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "timm", "prefect", "img2dataset", "dvc")
PROBE = """
import json, sys
from flows.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in %r + ("duckdb", "pydantic") if m in sys.modules)}),
      file=sys.stderr)
""" % (HEAVY,)


def vlp_in_fresh_interpreter(args: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    probe = json.loads(proc.stderr.strip().splitlines()[-1])
    return probe["rc"], proc.stdout, probe["loaded"]


def test_help_imports_nothing_heavy(tmp_path):
    rc, out, loaded = vlp_in_fresh_interpreter(["--help"], tmp_path)
    assert rc == 0 and out.startswith("usage: vlp")
    # pydantic (the settings models, about 0.15 s) may load; nothing of HEAVY and no catalog may
    assert not set(loaded) - {"pydantic"}, f"vlp --help imported {loaded}"


@pytest.fixture()
def empty_catalog(tmp_path) -> Path:
    from vlp_core.catalog import connect

    (tmp_path / "data").mkdir()
    connect(tmp_path / "data" / "catalog.duckdb").close()  # the tables, no version yet
    return tmp_path


@pytest.mark.parametrize("args", [["versions", "list", "--help"], ["versions", "list"],
                                  ["versions", "list", "--catalog", "data/catalog.duckdb"],
                                  ["query", "SELECT count(*) AS n FROM versions"]])
def test_catalog_commands_never_import_torch(empty_catalog, args):
    rc, out, loaded = vlp_in_fresh_interpreter(args, empty_catalog)
    assert rc == 0, out
    assert not set(loaded) & set(HEAVY), f"vlp {' '.join(args)} imported {sorted(set(loaded) & set(HEAVY))}"
    if args[-1] != "--help":
        assert "duckdb" in loaded  # it did open the catalog
        assert out.splitlines()[0].split()[0] in ("name", "n")
