# Shared by the GPU steps (sourced, with the output folder as $1).  See benchmarks/gpu/README.md.
#
# - Every step builds the extension unless this machine already built these sources (a fresh
#   machine starts bare: each step must stand alone), then runs its parts under `timeout`, each
#   part capped by what is left of the step's budget (STEP_BUDGET seconds, default 420 = 7 min).
# - Output goes to files in the caller's folder as it is produced (PYTHONUNBUFFERED): at most
#   8 files, plain names, one level down, as the device tool brings back.
# - Caches live in $SN_GPU_WORK (default build/gpu_work, git-ignored and kept between commands on a
#   warm machine): the Triton cache (TRITON_CACHE_DIR), the inductor cache, the build stamp and the
#   benchmark CSV that step 3 resumes.
# - SN_GPU_REHEARSAL=1: the CPU dress rehearsal: no build, the installed extension, the Triton
#   interpreter, tiny shapes; the same scripts and files otherwise (about 3 min on 2 cores).
#   SN_GPU_DRY=1 also skips every command run() would run (the scripts' own logic only; CI,
#   tests/test_gpu_check_smoke.py), touching instead the files of $OUTDIR and $WORK it names, so that a
#   dry run's folder holds the files a real run writes.
# - The build log stays in $WORK (build.log) unless the build fails or the step asks for it
#   (`ensure_built --keep-log`, step 1): step 3 writes 8 files without it.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
OUTDIR=${1:?usage: bash benchmarks/gpu/stepN_....sh OUTPUT_FOLDER}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
export PYTHONUNBUFFERED=1
REHEARSAL=${SN_GPU_REHEARSAL:-0}
WORK=${SN_GPU_WORK:-$ROOT/build/gpu_work}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton_cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the H100/H200 only: half the nvcc time of 8.0;9.0+PTX
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$WORK" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if [ "$REHEARSAL" = 1 ]; then
  export TRITON_INTERPRET=1
  unset SN_KERNELS_BACKEND
fi
STEP_BUDGET=${STEP_BUDGET:-420}
STEP_T0=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
FAILED=0

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - STEP_T0 ))s] $*" | tee -a "$SUMMARY"; }

left() { echo $(( STEP_BUDGET - ($(date +%s) - STEP_T0) )); }

# run LOG SECONDS CMD...: CMD under `timeout` (SECONDS, or what is left of the budget if less), its
# output appended to $OUTDIR/LOG as it comes; a failure is logged and counted, not fatal
run() {
  local name=$1 secs=$2 rc
  shift 2
  local rest; rest=$(( $(left) - 10 ))
  if [ "$rest" -lt 20 ]; then
    log "skip $name: ${rest}s left of the step's budget"
    FAILED=$((FAILED + 1))
    return 124
  fi
  [ "$secs" -gt "$rest" ] && secs=$rest
  log "start $name (timeout ${secs}s): $*"
  echo "### $* (timeout ${secs}s)" >> "$OUTDIR/$name"
  if [ "${SN_GPU_DRY:-0}" = 1 ]; then
    local arg
    for arg in "$@"; do
      case "$arg" in "$OUTDIR"/* | "$WORK"/*) [ -e "$arg" ] || touch "$arg" ;; esac
    done
    log "end $name: dry run"
    return 0
  fi
  timeout --kill-after=10 "$secs" "$@" >> "$OUTDIR/$name" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  log "end $name: rc=$rc$([ "$rc" = 124 ] && echo ' (TIMEOUT)')"
  return "$rc"
}

# whether sn_kernels._C has its CUDA kernels
has_cuda() {
  "$PY" -c "import sys, sn_kernels.backends.native as n; sys.exit(0 if n.has_kernel('cuda') else 1)" 2> /dev/null
}

# why sn_kernels has or lacks its CUDA kernels (the build record), into the summary
explain_cuda() {
  "$PY" -c "import sn_kernels; print(sn_kernels.explain('cuda'))" 2>&1 | tail -20 | tee -a "$SUMMARY"
}

# a failed build: the compiler's errors and the log's end into the summary (the end of the output);
# the log stays in the folder, and no stamp is written, so the next step tries again
build_failed() {
  log "build failed: $1; the errors, then the end of build.log:"
  grep -E "error|Error|fatal" "$OUTDIR/build.log" | tail -30 | tee -a "$SUMMARY"
  tail -15 "$OUTDIR/build.log" | tee -a "$SUMMARY"
  return 1
}

# build sn_kernels._C with its CUDA kernels (SN_KERNELS_BUILD=cuda: no C++-only fallback) unless this
# machine already built these sources; `--keep-log`: leave build.log in the step's folder
ensure_built() {
  if [ "$REHEARSAL" = 1 ]; then
    log "rehearsal: no build, the installed extension"
    return 0
  fi
  local stamp
  stamp=$(cat csrc/* setup.py pyproject.toml sn_kernels/_build.py 2> /dev/null | sha256sum | cut -c1-16)
  if [ "$(cat "$WORK/build.stamp" 2> /dev/null)" = "$stamp" ] && has_cuda; then
    log "extension already built from these sources"
    return 0
  fi
  rm -f "$WORK/build.stamp"
  if ! run build.log 240 env SN_KERNELS_BUILD=cuda "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .; then
    build_failed "pip exited with an error"
    return 1
  fi
  if ! has_cuda; then  # pip succeeded, yet no CUDA kernels load: say why
    FAILED=$((FAILED + 1))
    explain_cuda
    build_failed "sn_kernels._C has no CUDA kernels"
    return 1
  fi
  echo "$stamp" > "$WORK/build.stamp"
  [ "${1:-}" = --keep-log ] || mv "$OUTDIR/build.log" "$WORK/build.log"
  explain_cuda
}

# machine facts, once per step
facts() {
  [ "${SN_GPU_DRY:-0}" = 1 ] && return 0
  log "host $(hostname), $(nproc) cores; python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  nvidia-smi -L 2> /dev/null | tee -a "$SUMMARY"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$SUMMARY"
}

# print the summary last (the device tool returns the end of the output) and exit with the count
finish() {
  log "done: $FAILED part(s) failed; files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
  echo
  cat "$SUMMARY"
  exit $((FAILED > 0))
}
