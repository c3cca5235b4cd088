#!/usr/bin/env bash
# Set up (see setup.sh) and run the benchmark against PyTorch on whatever device is
# present; writes benchmarks/results/<device>.csv and .png.
#   bash scripts/bench.sh [--set NAME] [benchmarks/run.py arguments, see --help]
# It runs in the set's tree (as test.sh: .venv-NAME/src for a set other than the default, where
# sn_kernels is built against that set's torch), so relative paths in the arguments are taken from
# there; the results and ../shared/shapes.json are the repository's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
. scripts/sets.sh "$@"
TOP=$(pwd)
defaults=(--out-dir "$TOP/benchmarks/results")
[ -f ../shared/shapes.json ] && defaults+=(--shapes "$(cd ../shared && pwd)/shapes.json")
cd "$SRC"
exec "$VENV_ABS/bin/python" benchmarks/run.py "${defaults[@]}" "${REST[@]}"
