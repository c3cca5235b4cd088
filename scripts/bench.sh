#!/usr/bin/env bash
# Set up (see setup.sh) and run the benchmark against PyTorch on whatever device is
# present; writes benchmarks/results/<device>.csv and .png.
#   bash scripts/bench.sh [--set NAME] [benchmarks/run.py arguments, see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
. scripts/sets.sh "$@"
exec "$VENV/bin/python" benchmarks/run.py "${REST[@]}"
