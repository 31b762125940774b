"""Start a real Prefect server (SQLite, its own PREFECT_HOME) and a process worker on 127.0.0.1.

    python infra/prefect_stack.py [--port 4200] [--home .prefect/stack] [--pool vlp-process]

It prints ``PREFECT_API_URL=http://127.0.0.1:<port>/api`` once the API answers, then
``ready``, and keeps both processes running until Ctrl-C / SIGTERM, which stops them.  In
another shell::

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    vlp deploy                      # the nightly deployment on the process pool
    prefect deployment run 'vlp-nightly/nightly'

See infra/README.md for running past one machine (Postgres, Dask/Ray, DVC S3 remote).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


def stack_env(home: Path, port: int) -> dict[str, str]:
    """The environment of the server, the worker and any client of this stack."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": env.get("PREFECT_UI_ENABLED", "true"),
        "PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
    })
    return env


def _prefect() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def wait_healthy(port: int, timeout: float = 120.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Wait until ``/api/health`` answers (or raise, with the server's exit code if it died)."""
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server on 127.0.0.1:{port} not healthy after {timeout:.0f} s")


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(_prefect() + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=stack_env(home, port), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_worker(home: Path, port: int, pool: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(_prefect() + ["worker", "start", "--pool", pool, "--type", "process"],
                                env=stack_env(home, port), cwd=str(REPO_ROOT), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: Optional[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--home", default=".prefect/stack", help="PREFECT_HOME of the server (SQLite DB inside)")
    ap.add_argument("--pool", default="vlp-process", help="process work pool the worker serves")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    args = ap.parse_args(argv)
    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    server = worker = None

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server = start_server(home, args.port, home / "server.log")
        wait_healthy(args.port, args.timeout, server)
        print(f"PREFECT_API_URL=http://127.0.0.1:{args.port}/api", flush=True)
        worker = start_worker(home, args.port, args.pool, home / "worker.log")
        print(f"server log: {home / 'server.log'}\nworker log: {home / 'worker.log'}\nready", flush=True)
        while server.poll() is None and worker.poll() is None:
            time.sleep(1)
        print("a process exited: stopping", flush=True)
        return 1
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    finally:
        stop(worker)
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
