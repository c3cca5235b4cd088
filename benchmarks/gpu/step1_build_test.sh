#!/usr/bin/env bash
# GPU step 1 of 3 (< 8 min on an H200 with 16 cores): build the extension, run the test suite
# with the GPU visible (the backend tests put their tensors on CUDA), 8 pytest workers.
#   bash benchmarks/gpu/step1_build_test.sh OUTDIR    -> OUTDIR/{summary.txt,build.log,pytest.log}
# The AOT test is left to CI (it compiles for sm_90 on any machine, with the same compilers).
. "$(dirname "$0")/common.sh"
facts
ensure_built --keep-log || finish
if [ "$REHEARSAL" = 1 ]; then  # the path, not the suite: a few tests, 2 workers
  run pytest.log 120 "$PY" -m pytest tests/test_triton.py tests/test_cuda_concurrency.py -k "why_not or concurrency" \
    -q -n 0 -p no:cacheprovider
else
  run pytest.log 420 "$PY" -m pytest tests -q -n "${SN_GPU_WORKERS:-8}" -p no:cacheprovider --durations=30 \
    --ignore=tests/test_triton_aot.py -o faulthandler_timeout=400
fi
grep -E "passed|failed|error" "$OUTDIR/pytest.log" | tail -3 | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR) " "$OUTDIR/pytest.log" | head -40 | tee -a "$SUMMARY"
finish
