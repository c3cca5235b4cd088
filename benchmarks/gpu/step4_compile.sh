#!/usr/bin/env bash
# GPU step 4 (optional, < 7 min; after steps 1-3 when device time is left): issue 17's table on the
# GPU (benchmarks/compile_step.py: the CNN discriminator's training step eager and under
# torch.compile, no SN / PyTorch's two APIs / ours / grouped), then issue 16's bounds on BigGAN's
# weights (benchmarks/certified.py, one refresh in ten rounds: the amortized cost).
#   bash benchmarks/gpu/step4_compile.sh OUTDIR
#   -> OUTDIR/{summary.txt,compile_step.csv,compile_step.log,certified_biggan.csv,certified.log}
. "$(dirname "$0")/common.sh"
facts
ensure_built || finish
if [ "$REHEARSAL" = 1 ]; then
  dev=(--device cpu)
  steps=(--rounds 2 --warmup 1 --variants none,sn_param --modes compiled)
  cert=(--sets sngan_cifar_d --rounds 2)
else
  dev=(--device cuda)
  steps=(--rounds 30 --variants none,torch_param,torch_hook,sn_param,sn_hook,sn_param_group,sn_hook_group)
  cert=(--sets biggan128_d --rounds 10)
fi
# the certified run first: short and bounded; the compile run takes what is left
run certified.log 120 "$PY" benchmarks/certified.py "${dev[@]}" "${cert[@]}" --providers upper_every10 \
  --out "$OUTDIR/certified_biggan.csv"
run compile_step.log 400 "$PY" benchmarks/compile_step.py "${dev[@]}" "${steps[@]}" --out "$OUTDIR/compile_step.csv"
grep "| step \|sn_overhead" "$OUTDIR/compile_step.log" 2> /dev/null | grep -v "| cpu |" | tee -a "$SUMMARY"
finish
