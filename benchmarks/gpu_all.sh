#!/usr/bin/env bash
# Everything the lent GPU should run, in one call (see the device tool's METHOD.md):
#   build the extension, check the triton and native backends (tests, CUDA graphs,
#   autocast, torch.compile, determinism), run the benchmark suite, print tables last.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_all.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import sn_kernels; print(sn_kernels.explain('cuda'))"
python benchmarks/gpu_check.py --backend triton --out "$OUT" > "$OUT/gpu_check_triton.log" 2>&1
echo "gpu_check triton (and the pytest suite): exit $?"
python benchmarks/gpu_check.py --backend native --no-pytest --out "$OUT" > "$OUT/gpu_check_native.log" 2>&1
echo "gpu_check native: exit $?"
python benchmarks/run.py --out "$OUT/$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))').csv" \
    > "$OUT/bench.log" 2>&1
echo "benchmark: exit $?"
for b in triton native; do tail -25 "$OUT/gpu_check_$b.log"; done
grep "^|" "$OUT/bench.log" | head -80
