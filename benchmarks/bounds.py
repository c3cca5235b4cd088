"""Cost and tightness of the certified spectral-norm bounds (sn_kernels.sigma_bounds).

For each layer of the shape sets in shapes.json (../shared/shapes.json, else the bundled copy),
with PyTorch's default init (seeded), and each method:

* ``matrix``: the dense matrix view (dim 0), methods auto / gram / exact; exact reference: the
  float64 SVD (``sn_kernels.testing.svd_sigma``) where the matrix has at most --max-svd entries.
* ``conv_zeros``: a 4-D weight as the conv operator it is in the model, stride 1, zero padding
  k // 2, at the input size the layer sees (``INPUT_SIZE``: SNGAN's CIFAR-10 D at 32x32 input,
  blocks at 32, 16, 8, 8; BigGAN-128's D at 128x128 input, blocks at 128 (b0), 64 (attn, b1),
  32, 16, 8, 4); methods auto (= fft) / gram.  No exact reference is affordable: upper/lower is
  the certified width.
* ``conv_circular``: the same layer with circular padding; exact reference: the per-frequency
  SVD of the FFT (``sn_kernels.conv_norm.fft_operator_norm``), an independent float64 path.

Layers of the same shape and input size are measured once (the ``layers`` column names them all).
Time: median of --reps calls of ``sigma_bounds`` (fewer for a case whose calls took --budget s),
one torch thread by default (a shared 2-core machine).  The default run (all three sets, but matrices of more than
1M entries and convs whose input size times channels squared passes 128^2 * 32^2) takes about
2 minutes on 2 cores; ``--all`` runs everything (hours: BigGAN's 1536-channel matrices and its
128x128 convs), ``--sets`` picks sets.

    python benchmarks/bounds.py [--sets sngan_cifar_d biggan128_d single] [--all] [--reps 3] [--threads 1]

Writes benchmarks/results/cpu_bounds.csv.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import sn_kernels  # noqa: E402
from _common import device_name, find_shapes, load_shapes, write_csv  # noqa: E402
from sn_kernels.conv_norm import fft_operator_norm  # noqa: E402
from sn_kernels.testing import svd_sigma  # noqa: E402

FIELDS = ["set", "layers", "weight_shape", "operator", "input", "method", "median_ms", "min_ms", "lower", "upper",
          "exact", "upper_over_exact", "lower_over_exact", "upper_over_lower", "reps", "threads", "torch", "device"]
DEFAULT_SETS = ("sngan_cifar_d", "biggan128_d", "single")
#: the input size each layer's conv sees, by layer-name prefix (see the docstring)
INPUT_SIZE = {
    "sngan_cifar_d": {"block1": 32, "block2": 16, "block3": 8, "block4": 8},
    "biggan128_d": {"b0": 128, "attn": 64, "b1": 64, "b2": 32, "b3": 16, "b4": 8, "b5": 4},
}
#: the default run skips what takes minutes on 2 cores (--all runs it)
DEFAULT_MAX_MATRIX = 1024 * 1024  # entries of a matrix view bounded by default
EXACT_METHOD_MAX_SIDE = 1024  # 'exact' (eigh certificate) by default up to this smaller side


def conv_layer(shape, padding_mode: str) -> nn.Conv2d:
    c_out, c_in, kh, kw = shape
    return nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2), padding_mode=padding_mode, bias=False)


def timed(fn, reps: int, budget_s: float):
    """(result, median s, min s) of up to ``reps`` calls, fewer once ``budget_s`` is spent (at least one;
    the first call is timed too: these are float64 CPU computations without a warm-up effect to speak of)."""
    times, out = [], None
    while len(times) < reps and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times), len(times)


def cases(sets: dict, names, full: bool):
    """(set, [layer names], shape, operator, input size or None), same shape and input measured once."""
    seen = {}
    for set_name in names:
        for entry in sets[set_name]:
            shape = tuple(entry["shape"])
            ops = [("matrix", None)]
            size = next((s for p, s in INPUT_SIZE.get(set_name, {}).items() if entry["name"].startswith(p)), None)
            if len(shape) == 4 and size is not None:
                ops += [("conv_zeros", size), ("conv_circular", size)]
            for op, n in ops:
                if not full and op == "matrix" and shape[0] * math.prod(shape[1:]) > DEFAULT_MAX_MATRIX:
                    continue
                if not full and op != "matrix" and n * n * shape[0] * shape[1] > 128 * 128 * 32 * 32:
                    continue
                key = (set_name, shape, op, n)
                seen.setdefault(key, []).append(entry["name"])
    return [(k[0], v, k[1], k[2], k[3]) for k, v in seen.items()]


def fmt(x) -> str:
    return "" if x is None else f"{x:.12g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="shapes.json (default: ../shared/shapes.json, else the bundled)")
    ap.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
    ap.add_argument("--all", action="store_true", help="every set and every layer, however slow")
    ap.add_argument("--reps", type=int, default=3, help="calls per case (median)")
    ap.add_argument("--budget", type=float, default=4.0, help="no further calls of a case once it took this many s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-svd", type=int, default=1024 * 1024, help="largest matrix (entries) given an SVD reference")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_bounds.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = load_shapes(args.shapes)
    names = [k for k in sets if not k.startswith("_")] if args.all else args.sets
    device = device_name("cpu")
    print(f"shapes: {find_shapes(args.shapes)}; sets {names}; torch {torch.__version__}, {device}, "
          f"threads={args.threads}, reps={args.reps}")
    rows = []
    t_start = time.perf_counter()
    for set_name, layers, shape, op, n in cases(sets, names, args.all):
        torch.manual_seed(0)
        if op == "matrix":
            weight = (nn.Linear(shape[1], shape[0]).weight.detach() if len(shape) == 2
                      else conv_layer(shape, "zeros").weight.detach())
            target, kwargs = weight, {}
            mat_entries = weight.numel()
            exact = svd_sigma(weight).item() if mat_entries <= args.max_svd else None
            methods = ["auto", "gram"]
            if args.all or min(shape[0], math.prod(shape[1:])) <= EXACT_METHOD_MAX_SIDE:
                methods.append("exact")
        else:
            target = conv_layer(shape, op.split("_")[1])
            kwargs = {"input_shape": (n, n)}
            exact = fft_operator_norm(target.weight, (n, n)).item() if op == "conv_circular" else None
            methods = ["auto", "gram"]
        for method in methods:
            (lo, hi), med, best, reps = timed(lambda: sn_kernels.sigma_bounds(target, method=method, **kwargs),
                                              args.reps, args.budget)
            row = dict(set=set_name, layers=" ".join(layers), weight_shape="x".join(map(str, shape)), operator=op,
                       input="" if n is None else f"{n}x{n}", method=method, median_ms=f"{med * 1e3:.3f}",
                       min_ms=f"{best * 1e3:.3f}", lower=fmt(lo), upper=fmt(hi), exact=fmt(exact),
                       upper_over_exact=fmt(hi / exact if exact else None),
                       lower_over_exact=fmt(lo / exact if exact else None),
                       upper_over_lower=fmt(hi / lo if lo > 0 else None), reps=reps, threads=args.threads,
                       torch=torch.__version__, device=device)
            rows.append(row)
            print(f"{set_name:14s} {row['weight_shape']:14s} {op:13s} {row['input']:8s} {method:6s} "
                  f"{row['median_ms']:>10s} ms  up/ex {row['upper_over_exact'][:14]:14s} "
                  f"lo/ex {row['lower_over_exact'][:14]:14s} up/lo {row['upper_over_lower'][:14]}", flush=True)
    write_csv(args.out, rows, FIELDS)
    print(f"{len(rows)} rows in {time.perf_counter() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
