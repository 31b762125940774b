"""A real Prefect server (SQLite) and a process worker on 127.0.0.1, started by infra/start.sh (Prefect's
own `prefect server start`, `prefect server status --wait` and `prefect worker start`): `vlp deploy` creates the scheduled
nightly deployment, a run is triggered through the server, the worker runs it (a real incremental
ingest of the served synthetic web) and the run reaches Completed; SIGTERM stops the worker and the
server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

TRIGGER = r"""
import json, sys
from prefect.deployments import run_deployment
from prefect import get_client
from prefect.utilities.asyncutils import run_coro_as_sync
run = run_deployment(sys.argv[1], timeout=float(sys.argv[2]), poll_interval=1)
async def schedules():
    async with get_client() as c:
        d = await c.read_deployment_by_name(sys.argv[1])
        return [s.schedule.cron for s in d.schedules]
print(json.dumps({"state": run.state.type.value, "name": run.state.name, "cron": run_coro_as_sync(schedules()),
                  "parameters": run.parameters}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    """The stack starts as from a terminal: an ignored signal is inherited across exec, and a
    non-interactive bash cannot trap one it inherited ignored -- earlier tests in this process
    (DVC ignores SIGINT while a stage runs) must not leave Ctrl-C or SIGTERM ignored in the stack."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start_stack(port: int, home: Path, pool: str, log: Path) -> subprocess.Popen:
    """``infra/start.sh PORT`` in its own process group (so one signal reaches the worker and the server)."""
    env = {**os.environ, "PY": sys.executable, "VLP_PREFECT_HOME": str(home), "VLP_WORK_POOL": pool,
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    with open(log, "wb") as out:
        return subprocess.Popen([str(REPO / "infra" / "start.sh"), str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_signals)


def stop_or_kill(proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Wait for the stack to stop after SIGTERM (a graceful worker and server shutdown takes a
    while on 2 busy cores); past ``timeout``, kill the group so no process outlives the test, and fail."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        alive = subprocess.run(["ps", "-o", "pid,stat,etime,ignored,caught,args", "-g", str(proc.pid)], capture_output=True,
                               text=True).stdout
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        raise AssertionError(f"infra/start.sh did not stop within {timeout:.0f} s of SIGTERM; still running:\n"
                             f"{alive}") from None


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "ready" in log.read_text(errors="replace").splitlines():
            return
        assert proc.poll() is None, f"infra/start.sh exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"infra/start.sh not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:  # noqa: S310 - loopback
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_deployment_run_completes_on_real_server_and_worker(tmp_path, tiny_world, world_server):
    from fixtures_world import TINY_INGEST, TINY_SIZES
    from vlp_core.synthetic.server import write_url_list

    # the work dir the deployment runs in: tiny params and the web URL list
    work = tmp_path / "work"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_SIZES, **TINY_INGEST}.items():
        section, key = dotted.split(".")
        data[section][key] = value
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(data))
    write_url_list(tiny_world, "web", world_server.base_url, work / "data" / "urls" / "web.parquet")

    port, home, log = _free_port(), tmp_path / "prefect-home", tmp_path / "stack.log"
    stack = start_stack(port, home, "vlp-test-pool", log)
    try:
        wait_ready(stack, log)
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        dep = subprocess.run(
            [sys.executable, "-m", "flows.cli", "deploy", "--workdir", str(work), "--name", "smoke",
             "--pool", "vlp-test-pool", "--cron", "30 3 * * *", "-S", "ingest.timeout=7"],
            env=env, cwd=work, capture_output=True, text=True, timeout=120)
        assert dep.returncode == 0, dep.stderr[-2000:]
        info = json.loads([ln for ln in dep.stdout.splitlines() if ln.startswith("{")][-1])
        assert info["name"] == "vlp-nightly/smoke" and info["cron"] == "30 3 * * *"
        t0 = time.monotonic()
        trig = subprocess.run([sys.executable, "-c", TRIGGER, "vlp-nightly/smoke", "150"], env=env, cwd=work,
                              capture_output=True, text=True, timeout=200)
        assert trig.returncode == 0, trig.stderr[-2000:]
        out = json.loads(trig.stdout.strip().splitlines()[-1])
        logs = log.read_text(errors="replace")[-3000:]
        assert out["state"] == "COMPLETED", f"{out} after {time.monotonic() - t0:.0f} s\n{logs}"
        assert out["cron"] == ["30 3 * * *"]
        assert out["parameters"]["overrides"] == ["ingest.timeout=7"]  # -S reaches every scheduled run
        # the worker really ran the ingest in the work dir
        stats = json.loads((work / "data" / "ingest" / "web" / "stats.json").read_text())
        assert stats["rows_in"] == stats["rows_out"] == 300
        assert (work / "data" / ".flow" / "ingest_web.json").exists()
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGTERM)  # as Ctrl-C would: the worker stops, then `prefect server stop`
            stop_or_kill(stack)
    assert not _healthy(port), "the server outlived infra/start.sh"
    assert f"http://127.0.0.1:{port}" in (home / "server.log").read_text()  # the server's own log, kept


def test_deploy_without_a_persistent_api_is_refused_in_one_line(tmp_path):
    """Without PREFECT_API_URL Prefect would deploy to a temporary server that stops when the
    command exits (exit 0, nothing scheduled): `vlp deploy` refuses instead."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--workdir", str(tmp_path), "--name", "x"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: vlp deploy needs a Prefect server that outlives it") and r.stderr.count("\n") == 1
