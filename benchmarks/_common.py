"""Helpers shared by the benchmark scripts (benchmarks/*.py and benchmarks/gpu/*.py).

The scripts are run as files (``python benchmarks/run.py``), so they import this module by
putting its folder on ``sys.path`` first::

    sys.path.insert(0, str(Path(__file__).resolve().parent))           # benchmarks/*.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # benchmarks/gpu/*.py
    from _common import quantiles  # noqa: E402

Nothing here imports sn_kernels, so the helpers do not depend on its layout.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED_SHAPES = ROOT.parent / "shared" / "shapes.json"  # ../shared/shapes.json beside the repository
BUNDLED_SHAPES = ROOT / "benchmarks" / "shapes.json"  # the copy in this repository
SHAPES_SEARCH = (SHARED_SHAPES, BUNDLED_SHAPES)


def _nothing() -> None:
    """A sync that does nothing (off a GPU)."""


def find_shapes(path: str | os.PathLike | None = None, search=SHAPES_SEARCH) -> Path:
    """The shapes.json to use: ``path`` (--shapes) if given, else the first of ``search`` that exists."""
    for cand in ([Path(path)] if path else []) + [Path(p) for p in search]:
        if cand.is_file():
            return Path(os.path.abspath(cand))
    raise SystemExit("shapes.json not found: pass --shapes PATH")


def load_shapes(path: str | os.PathLike | None = None, search=SHAPES_SEARCH) -> dict:
    """The shape sets ({set name: [{"name", "shape", "dim"?}, ...]}) of ``find_shapes(path, search)``."""
    return json.loads(find_shapes(path, search).read_text())


def percentile(xs, q: float):
    """The ``q`` quantile (0..1) of ``xs``: the sample nearest to rank ``q * (n - 1)``."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def quantiles(xs):
    """(median, p20, p80) of ``xs``."""
    return statistics.median(xs), percentile(xs, 0.2), percentile(xs, 0.8)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` providers for paired rounds, a Williams design: over the n orders (2n for an odd n)
    each provider runs in each position equally often and right after each other provider equally
    often, so that what one provider leaves behind (caches, freed memory) does not always land on the
    same other one, as a plain rotation makes it."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(k + i) % n for k in first] for i in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


class Holder(nn.Module):
    """A module whose forward returns its weight: randn / sqrt(shape[-1]), or randn * ``scale``."""

    def __init__(self, shape, dtype=None, device=None, dim=0, scale=None):
        super().__init__()
        self.dim = dim
        w = torch.randn(shape, dtype=dtype, device=device)
        self.weight = nn.Parameter(w * scale if scale is not None else w / shape[-1] ** 0.5)

    def forward(self):
        return self.weight


def engine_backward(outputs, grads) -> None:
    """``torch.autograd.backward(outputs, grads)`` without its Python argument checks: the same engine
    call, gradients accumulated into ``.grad``.  Those checks compare each gradient's shape with its
    output's (symbolic-shape equality, about 4 µs per tensor on a CPU), a cost of the harness, not of
    what it times: a training step's backward starts from one scalar loss (benchmarks/NOTES.md, G7)."""
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(outputs), tuple(grads), False, False, (), True, True)  # keep_graph, create_graph, inputs,
    # allow_unreachable, accumulate_grad: what torch.autograd.backward passes


def timer(device):
    """(measure, sync): ``measure(fn)`` = seconds of one call (CUDA events on a GPU, else the host clock)."""
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return measure, torch.cuda.synchronize

    def measure(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return measure, _nothing


def l2_flush(device):
    """A callable that evicts the L2 cache (writes twice its size), or does nothing off a GPU."""
    if device.type != "cuda":
        return _nothing
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    buf = torch.empty(2 * l2, dtype=torch.int8, device=device)
    return buf.zero_


def copy_bandwidth(device, numel: int, repeats: int, warmup: int = 0, sync=_nothing, measure=None,
                   clone: bool = False) -> float:
    """GB/s (bytes read + written) of copying ``numel`` float32 on ``device``, median of ``repeats`` calls."""
    # dst.copy_(src) into an existing tensor, or src.clone() (a fresh tensor, its allocation and page
    # faults included); ``warmup`` untimed calls first.  Timed with ``measure(fn)`` (seconds) if given,
    # else the host clock between two ``sync()`` calls, the result kept alive until the clock is read.
    src = torch.randn(numel, device=device)
    dst = None if clone else torch.empty_like(src)
    fn = src.clone if clone else (lambda: dst.copy_(src))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if measure is not None:
            times.append(measure(fn))
            continue
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
        del out
    return 2 * numel * 4 / statistics.median(times) / 1e9


def device_name(device) -> str:
    """The GPU's name, or cpu-<machine>-<N>cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def triton_version() -> str:
    """triton.__version__, or "none" where triton cannot be imported."""
    try:
        import triton
        return triton.__version__
    except Exception:
        return "none"


def git_commit(tree=ROOT) -> str:
    """The short commit of the git checkout holding ``tree``, with "+dirty" if its files differ from it;
    where git cannot tell (no git, or a copy without .git such as the GPU machine's), $SN_KERNELS_COMMIT
    (set by whoever sends the copy) or "unknown"."""
    def git(*args):
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SN_KERNELS_COMMIT") or "unknown"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (saying so) where matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("# matplotlib not installed: no plot")
        return None
    return plt


def write_csv(path, rows: list[dict], fields=None, append: bool = False) -> None:
    """Write ``rows`` under a header (``fields``, default row 0's keys), or append them to an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    append = append and path.is_file()
    with path.open("a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        if not append:
            w.writeheader()
        w.writerows(rows)
