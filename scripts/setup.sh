#!/usr/bin/env bash
# Create .venv (if missing) with a CUDA build of torch, the test/bench tools, and
# sn_kernels installed editable with its compiled extension.  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# plain `torch` is the CUDA build (needed to compile the .cu sources even without a GPU);
# numpy < 2.4 because the Triton 3.6 interpreter needs it
python -m pip install -q torch "numpy<2.4" pytest ninja matplotlib setuptools wheel
# --no-build-isolation: the extension is built against the torch installed above
python -m pip install -q --no-build-isolation -e . 2>&1 | tail -n 20
python - <<'PY'
import torch, sn_kernels
print(f"sn_kernels ready: torch {torch.__version__}, backends on cpu: {sn_kernels.available_backends('cpu')}")
PY
