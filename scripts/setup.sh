#!/usr/bin/env bash
# Create a virtual environment with one pinned, tested set of versions and sn_kernels
# built into it (CUDA and CPU kernels; no GPU needed).  Idempotent: a second run with
# the same set and sources only checks that it is ready.
#
#   bash scripts/setup.sh                 # the default set -> .venv, sn_kernels editable from this tree
#   bash scripts/setup.sh --set newest    # another set (requirements/<set>.txt) -> .venv-<set>, built
#                                         # from a copy of this tree in .venv-<set>/src
#
# PYTHON picks the interpreter (default python3).  SN_KERNELS_BUILD=cuda makes a missing
# CUDA build an error (CI); the default (auto) builds the CPU kernels and says why.
# Nothing's output is filtered: a failing command shows all it printed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/sets.sh "$@"

PIP_VERSION=26.3
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
if [ "$SET" != default ]; then
    # a separate tree per set: an editable build writes sn_kernels/_C*.so into its tree,
    # and two torch versions cannot share one
    mkdir -p "$SRC"
    git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$SRC"
fi

stamp="$VENV/.sn_kernels-stamp"
want=$(cat "$LOCK" setup.py pyproject.toml sn_kernels/_build.py csrc/* | sha256sum | cut -c1-16)-${SN_KERNELS_BUILD:-auto}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && (cd "$SRC" && "$VENV_ABS/bin/python" -c "import sn_kernels._C") 2>/dev/null; then
    echo "== $VENV is up to date with $LOCK and the sources"
else
    rm -f "$stamp"
    echo "== installing $LOCK into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check "pip==$PIP_VERSION"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -r "$LOCK"
    echo "== building sn_kernels in $SRC (a minute or two: the CUDA kernels compile for sm_80 and sm_90)"
    # --no-build-isolation: built against the torch just installed; --no-deps: the lock has them all;
    # -v only shows the toolkit choice and the compiler lines, which a failure needs anyway
    (cd "$SRC" && "$VENV_ABS/bin/python" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . \
        > "$VENV_ABS/build.log" 2>&1) || { cat "$VENV/build.log"; echo "== the build failed: its whole log is above" >&2; exit 1; }
    grep "^ *sn_kernels:" "$VENV/build.log" | sort -u || true
    echo "$want" > "$stamp"
fi
(cd "$SRC" && "$VENV_ABS/bin/python" - <<'PY'
import torch, triton, sn_kernels
from sn_kernels import native
info = native.build_info()
print(f"== sn_kernels ready: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}; "
      f"CUDA kernels built: {info.get('cuda_kernels')} ({info.get('why', 'no build record')}); "
      f"backends on cpu: {sn_kernels.available_backends('cpu')}")
PY
)
