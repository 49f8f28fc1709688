#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu_suite.py says what it measures):
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--smoke] [more benchmarks.gpu_suite options]
#
# From the repository root of the GPU machine (its own python3, jax and torch). Packages
# the image lacks come as the wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh downloads
# them elsewhere), installed into /tmp/site only when they do not import already.
# Writes OUT_DIR/gpu_suite.json, gpu_suite.md (rewritten as each part finishes) and
# gpu_suite.log. Set PYTHON to use another interpreter.
set -uo pipefail
start=$(date +%s)
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]" >&2
  exit 2
fi
out=$1
shift
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)

needed="import grain.python, tensorflow_datasets, ml_collections, array_record, tensorboardX, \
shapely, imagecodecs"
if ! "$py" -c "$needed" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: grain, tensorflow-datasets, shapely, ... are not importable and" \
      ".whl/ holds no wheels: run benchmarks/fetch_gpu_wheels.sh first, carry .whl" >&2
    exit 1
  fi
  echo "installing ${#wheels[@]} wheels from .whl/ into /tmp/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  "$py" -c "$needed" || { echo "error: the wheels installed but do not import" >&2; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
"$py" -m benchmarks.gpu_suite "$out" --started_at="$start" "$@" 2>&1 | tee "$out/gpu_suite.log"
