#!/usr/bin/env bash
# The base-size benchmarks on one CUDA GPU, in about 5 minutes (issue 20):
#   1. CapFilt at 384 px, random base-size BLIP folders: ours (capfilt.precision auto => bf16, and
#      fp32) vs transformers' BLIP in fp32 and in bf16 autocast, with the bf16/fp32 agreement;
#   2. one blip-base pretraining step (ITC+ITM+LM), fp32 vs bf16 autocast.
#
#   bench/gpu.sh                # on a machine with a CUDA device; fails at once without one
#   bench/gpu.sh --cpu-smoke    # tiny sizes on the CPU: checks that the script runs (no numbers worth keeping)
#
# Python: $PYTHON, else .venv/bin/python, else python3.  Output: stdout, and bench/gpu-<time>.log.
# Needs torch, torchvision, transformers, timm, numpy, pillow, pyarrow and pydantic (not prefect,
# duckdb, dvc or img2dataset): a stock CUDA image with PyTorch plus pydantic runs it (README: "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (the one option is --cpu-smoke)" >&2; exit 2 ;;
  esac
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $SMOKE == 0 ]]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or with --cpu-smoke to check the script on the CPU" >&2
    exit 1
  fi
  export TORCH_NUM_THREADS="${TORCH_NUM_THREADS:-8}"  # CPU side: JPEG decode, tokenization
  CAPFILT=(--arch blip-base --device cuda --n-throughput 256 --batch-size 64 --rounds 3 --max-new-tokens 20)
  STEP=(--arch blip-base --device cuda --batch 32 --steps 8 --rounds 2)
else
  CAPFILT=(--arch smoke --device cpu --n-throughput 4 --batch-size 4 --rounds 1 --max-new-tokens 8)
  STEP=(--arch tiny --device cpu --batch 8 --steps 3 --rounds 1)
fi
LOG="bench/gpu-$(date +%Y%m%d-%H%M%S).log"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
{
  echo "== bench/gpu.sh $* ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  "$PY" -c 'import torch; print("torch", torch.__version__, "| cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  echo "== 1. CapFilt: bench/capfilt.py ${CAPFILT[*]}"
  # exit 1 there means a target was NOT MET: keep going, the table is printed
  "$PY" bench/capfilt.py "${CAPFILT[@]}" || rc=$?
  [[ ${rc:-0} -le 1 ]] || exit "$rc"
  echo "== 2. training step: bench/train_step.py ${STEP[*]}"
  "$PY" bench/train_step.py "${STEP[@]}" --out "$OUT/train_step"
} 2>&1 | grep --line-buffered -v -e 'Loading weights' -e 'Writing model shards' | tee "$LOG"
exit "${PIPESTATUS[0]}"
