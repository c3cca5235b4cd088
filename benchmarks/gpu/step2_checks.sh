#!/usr/bin/env bash
# GPU step 2 of 3 (< 8 min): benchmarks/gpu_check.py for the triton and the native backend (large
# shapes against the torch backend in 4 dtypes, determinism, CUDA-graph capture and replay of a
# training step, autocast, torch.compile, timings), then compute-sanitizer memcheck of the ops.
#   bash benchmarks/gpu/step2_checks.sh OUTDIR
#   -> OUTDIR/{summary.txt,gpu_check_triton.log,gpu_check_native.log,gpu_check_<device>_<backend>.csv,sanitizer.log}
. "$(dirname "$0")/common.sh"
facts
ensure_built || finish
smoke=()
[ "$REHEARSAL" = 1 ] && smoke=(--smoke)
run gpu_check_triton.log 250 "$PY" benchmarks/gpu_check.py "${smoke[@]}" --backend triton --out "$OUTDIR"
run gpu_check_native.log 150 "$PY" benchmarks/gpu_check.py "${smoke[@]}" --backend native --out "$OUTDIR"
for b in triton native; do
  grep -E "^(PASS|FAIL) |checks passed" "$OUTDIR/gpu_check_$b.log" | grep -E "FAIL|checks passed" | tee -a "$SUMMARY"
done
if [ "$REHEARSAL" != 1 ] && command -v compute-sanitizer > /dev/null; then
  # out-of-bounds accesses of every op on small odd shapes (kernels already in the Triton cache)
  run sanitizer.log 90 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/gpu/ops.py \
    --sanitize --reps 1 --out "$WORK/sanitize.csv"
  grep -E "ERROR SUMMARY" "$OUTDIR/sanitizer.log" | tee -a "$SUMMARY"
fi
finish
