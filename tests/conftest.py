"""Shared test set-up: an offline, disposable environment for every test.

PREFECT_HOME and TMPDIR point into a throwaway folder, telemetry is off, and nothing but
127.0.0.1 is ever contacted.  Shared fixtures live in ``fixtures_*.py`` beside this file,
one file per area, imported here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="vlp-tests-"))
(_SCRATCH / "tmp").mkdir(exist_ok=True)
os.environ["TMPDIR"] = str(_SCRATCH / "tmp")
tempfile.tempdir = str(_SCRATCH / "tmp")
os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect")
os.environ.pop("PREFECT_API_URL", None)  # ephemeral API unless a test sets one

from vlp_core.env import apply_offline_env  # noqa: E402

apply_offline_env()
os.environ["HF_HOME"] = str(_SCRATCH / "hf")
os.environ.setdefault("TORCH_NUM_THREADS", "2")

from fixtures_world import *  # noqa: E402,F401,F403  (synthetic world, served and ingested)
from fixtures_model import *  # noqa: E402,F401,F403  (tiny models and tokenizers)
