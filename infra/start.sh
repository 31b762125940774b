#!/usr/bin/env bash
# A Prefect server (SQLite in its own PREFECT_HOME) and a process worker on 127.0.0.1, with
# Prefect's own commands: `prefect server start` (its log in $PREFECT_HOME/server.log),
# `prefect server status --wait` until the API answers, then `prefect worker start` in the
# foreground.  Ctrl-C (or SIGTERM to the script's process group) stops the worker, and the
# server with it.  Usage: infra/start.sh [PORT]
#   PY=path/to/python (default .venv/bin/python), VLP_PREFECT_HOME (default .prefect/stack),
#   VLP_WORK_POOL (default vlp-process)
# Not `prefect server start --background`: it leaves the server writing into a pipe whose reader
# has exited, and the server died at the first flow run when we tried it (Prefect 3.8.8).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-4200}"
PY="${PY:-.venv/bin/python}"
POOL="${VLP_WORK_POOL:-vlp-process}"
mkdir -p "${VLP_PREFECT_HOME:-.prefect/stack}"
export PREFECT_HOME="$(cd "${VLP_PREFECT_HOME:-.prefect/stack}" && pwd)"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"

"$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
"$PY" -m prefect server status --wait --timeout 120 >/dev/null || { tail -20 "$PREFECT_HOME/server.log"; exit 1; }
echo "PREFECT_API_URL=${PREFECT_API_URL}"
echo "server log: ${PREFECT_HOME}/server.log"
echo "ready"
"$PY" -m prefect worker start --pool "$POOL" --type process
