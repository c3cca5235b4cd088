#!/usr/bin/env bash
# GPU step 3 of 3 (< 8 min): per-op timings (the NOTES.md predictions), then the benchmark suite,
# reduced matrix first (float32 fwd_bwd: both discriminator sets, the single weights of 64 MB or
# more, dim 0 and dim 1), then the rest (float32 fwd, bwd, train step; bfloat16) for as long as the
# budget lasts.  The CSV lives in $SN_GPU_WORK and is resumed, so running this step again on a warm
# machine adds the missing cases.
#   bash benchmarks/gpu/step3_bench.sh OUTDIR
#   -> OUTDIR/{summary.txt,ops.csv,bench.log,<device>.csv,<device>.png,report.md,certified.csv,certified.log}
. "$(dirname "$0")/common.sh"
facts
ensure_built || finish
if [ "$REHEARSAL" = 1 ]; then
  dev=cpu-rehearsal
  cat > "$WORK/rehearsal_shapes.json" << 'JSON'
{"sngan_cifar_d": [{"name": "a", "shape": [16, 3, 3, 3]}, {"name": "b", "shape": [16, 16, 3, 3]}],
 "biggan128_d": [{"name": "c", "shape": [24, 40]}],
 "single": [{"name": "d", "shape": [40, 30]}],
 "single_dim1": [{"name": "e", "shape": [6, 8, 2, 2], "dim": 1}]}
JSON
  common=(--device cpu --shapes "$WORK/rehearsal_shapes.json" --compile-backend aot_eager --reps 2 --warmup 1
          --providers torch_param,torch_compile,sn_kernels_native,sn_kernels_triton)
  rest=(--modes fwd,bwd)  # no train step: a CPU ResNet step under the interpreter takes minutes
  run bench.log 60 "$PY" benchmarks/gpu/ops.py --smoke --reps 2 --out "$OUTDIR/ops.csv"
else
  dev=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').replace('/', '_'))")
  common=()
  rest=()
  run bench.log 100 "$PY" benchmarks/gpu/ops.py --reps 30 --out "$OUTDIR/ops.csv"
fi
csv="$WORK/$dev.csv"
sets=(--sets sngan_cifar_d,biggan128_d,single,single_dim1 --per-weight single,single_dim1)
# reduced matrix first: what the targets need
run bench.log 240 "$PY" benchmarks/run.py "${common[@]}" "${sets[@]}" --min-mb 60 --modes fwd_bwd --dtypes float32 \
  --out "$csv" --resume
# then the rest, float32 before bfloat16, resumed into the same CSV
run bench.log 200 "$PY" benchmarks/run.py "${common[@]}" "${sets[@]}" "${rest[@]}" --min-mb 8 --dtypes float32 \
  --out "$csv" --resume
# issue 16: bound="upper" / "operator" on the device (its own CSV), before bfloat16 takes what is left
if [ "$REHEARSAL" = 1 ]; then
  run certified.log 90 "$PY" benchmarks/certified.py --device cpu --rounds 2 --out "$OUTDIR/certified.csv"
else
  run certified.log 120 "$PY" benchmarks/certified.py --device cuda --rounds 100 --out "$OUTDIR/certified.csv"
fi
run bench.log 200 "$PY" benchmarks/run.py "${common[@]}" "${sets[@]}" "${rest[@]}" --min-mb 8 --dtypes bfloat16 \
  --out "$csv" --resume
cp "$csv" "$OUTDIR/$dev.csv" 2> /dev/null
"$PY" benchmarks/run.py --report "$OUTDIR/$dev.csv" > "$OUTDIR/report.md" 2>&1
grep -A30 "^# targets" "$OUTDIR/report.md" | tee -a "$SUMMARY"
finish
