#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite, in parallel on every core.
#   bash scripts/test.sh [--set NAME] [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
. scripts/sets.sh "$@"
cd "$SRC"
# the Triton kernels run under its interpreter on CPU tensors; xdist spreads the files over the cores
exec "$VENV_ABS/bin/python" -m pytest tests -n auto "${REST[@]}"
