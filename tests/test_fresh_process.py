"""in_fresh_process (vlp_core/train/loop.py): a killed parent takes its training child with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has stopped; only its exit status waits to be read


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_parent_takes_its_training_child_with_it(tmp_path, how):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]\n"
        "from fixtures_proc import write_pid_and_sleep\n"
        "from vlp_core.train.loop import in_fresh_process\n"
        "if __name__ == '__main__':\n"
        f"    in_fresh_process(write_pid_and_sleep, {str(pid_file)!r})\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()):
            assert parent.poll() is None, "the parent stopped before its child started"
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), f"the training child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
