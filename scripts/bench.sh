#!/usr/bin/env bash
# Set up (see setup.sh) and run the benchmark against PyTorch on whatever device is
# present; writes benchmarks/results/<device>.csv and .png.  Extra arguments go to
# benchmarks/run.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/run.py "$@"
