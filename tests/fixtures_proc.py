"""Functions a spawned child runs in the process tests (importable by name, as spawn needs)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def write_pid_and_sleep(pid_file: str, seconds: float = 120.0) -> None:
    """The stand-in for a long training run: say who we are, then take a while."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
