#!/usr/bin/env bash
# Start a Prefect server (SQLite under infra's own PREFECT_HOME) and a process worker on
# 127.0.0.1, then keep them running until Ctrl-C.  Usage: infra/start.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-4200}"
PY="${PY:-.venv/bin/python}"
exec "$PY" infra/prefect_stack.py --port "$PORT" --home "${VLP_PREFECT_HOME:-.prefect/stack}" \
  --pool "${VLP_WORK_POOL:-vlp-process}"
