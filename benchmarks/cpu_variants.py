"""CPU cost of the variants (Lipschitz coefficient hard/soft, learnable gain) against plain
spectral norm: forward+backward of one weight through ``spectral_normalize``, training
mode, median of repeats, on the backend "auto" picks.  Writes
benchmarks/results/cpu_variants.csv (--out) and prints a table.

    python benchmarks/cpu_variants.py [--reps 20] [--out CSV]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's sn_kernels, not an installed copy (as run.py)
sys.path.insert(0, str(ROOT / "benchmarks"))
import sn_kernels  # noqa: E402
from _common import device_name, git_commit, write_csv  # noqa: E402

SHAPES = [(64, 64), (128, 1152), (512, 4608), (1536, 13824)]
SMALL = 100_000  # a weight of fewer elements runs 20x the repeats: each takes microseconds
VARIANTS = {
    "plain": {},
    "coeff_hard": {"coeff": 0.9},
    "coeff_soft": {"coeff": 0.9, "soft": True},
    "gain": {},  # the Parameter is made per run
}


def time_variants(shape, reps, warmup=3):
    """Samples (seconds) per variant, measured round-robin on the same tensors so that
    allocation, page faults and machine noise fall on every variant alike."""
    w = torch.randn(shape, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(shape[0]), dim=0)
    v = torch.nn.functional.normalize(torch.randn(shape[1]), dim=0)
    G = torch.randn(shape)
    kwargs = {name: dict(kw) for name, kw in VARIANTS.items()}
    kwargs["gain"]["gain"] = torch.nn.Parameter(torch.tensor(1.0))
    samples = {name: [] for name in VARIANTS}
    for i in range(warmup + reps):
        for name, kw in kwargs.items():
            w.grad = None
            t0 = time.perf_counter()
            out, _ = sn_kernels.spectral_normalize(w, u, v, **kw)
            out.backward(G)
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_variants.csv"))
    args = ap.parse_args(argv)
    rows = []
    extra = dict(device=device_name(torch.device("cpu")), threads=torch.get_num_threads(), torch=torch.__version__,
                 sn_kernels=f"{sn_kernels.__version__}+{git_commit()}")
    print(f"# {extra['device']}, {extra['threads']} threads, torch {extra['torch']}, sn_kernels {extra['sn_kernels']}; "
          f"backend on cpu: {sn_kernels.available_backends('cpu')[0]} (auto)")
    print(f"{'shape':>12s} {'variant':>11s} {'median ms':>10s} {'x plain':>8s}")
    for shape in SHAPES:
        samples = time_variants(shape, args.reps * (20 if shape[0] * shape[1] < SMALL else 1))
        base = statistics.median(samples["plain"])
        for name, xs in samples.items():
            med, lo, hi = statistics.median(xs), min(xs), max(xs)
            rows.append(dict(shape="x".join(map(str, shape)), variant=name, median_ms=med * 1e3, min_ms=lo * 1e3,
                             max_ms=hi * 1e3, ratio_to_plain=med / base, **extra))
            print(f"{rows[-1]['shape']:>12s} {name:>11s} {med * 1e3:10.3f} {med / base:8.2f}")
    write_csv(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
