"""CPU cost of the two spectral-norm variants: conv operator norm and top-k monitoring.

Per training step, the spectral-norm work of one conv layer in float32 (hook API):

    step = the forward pre-hook (power iteration + W / sigma) + weight_sn.backward(G)

for three providers: "conv" (sn_kernels.conv_norm.spectral_norm_conv, the operator norm:
one conv + one conv adjoint per iteration, a conv weight-gradient in the backward),
"matrix" (sn_kernels.spectral_norm, the reshaped-matrix sigma) and "torch_matrix"
(torch.nn.utils.spectral_norm).  Then ``sn_kernels.monitor.singular_values`` per call
(k=1 and k=5, one subspace step).  Median (p20, p80) of alternating runs.

    python benchmarks/cpu_variants_conv.py [--repeats N] [--threads T]

Writes benchmarks/results/cpu_variants_conv.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this tree's sn_kernels, not an installed copy (as run.py)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sn_kernels  # noqa: E402
from _common import device_name, quantiles, write_csv  # noqa: E402
from sn_kernels.conv_norm import spectral_norm_conv  # noqa: E402
from sn_kernels.monitor import singular_values  # noqa: E402

COLUMNS = ["provider", "layer", "op", "weight_shape", "input", "median_ms", "p20_ms", "p80_ms", "threads",
           "torch", "device"]

LAYERS = {
    "64->64 3x3 s1 @32x32": (lambda: nn.Conv2d(64, 64, 3, padding=1), (32, 32)),
    "128->128 3x3 s2 @16x16": (lambda: nn.Conv2d(128, 128, 3, stride=2, padding=1), (16, 16)),
    "convT 64->32 4x4 s2 @16x16": (lambda: nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), (16, 16)),
}
PROVIDERS = {
    "conv": spectral_norm_conv,
    "matrix": sn_kernels.spectral_norm,
    "torch_matrix": torch.nn.utils.spectral_norm,
}


def sn_step(module, x, G):
    """One training step's spectral-norm work: the pre-hooks (they only read x's shape) + backward."""
    for hook in module._forward_pre_hooks.values():
        hook(module, (x,))
    module.weight.backward(G)


def time_alternating(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Runs alternate between the callables (fair under a changing machine load)."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: quantiles(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_variants_conv.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = device_name("cpu")
    rows = []
    for layer, (ctor, spatial) in LAYERS.items():
        torch.manual_seed(0)
        mods, fns = {}, {}
        for provider, wrap in PROVIDERS.items():
            torch.manual_seed(0)
            m = wrap(ctor())
            x = torch.zeros(1, m.in_channels, *spatial)  # only its shape matters to the hooks
            sn_step(m, x, torch.zeros(m.weight_orig.shape))  # initialises conv mode's u, v
            G = torch.randn(m.weight_orig.shape)
            mods[provider] = m
            fns[provider] = (lambda m=m, x=x, G=G: sn_step(m, x, G))
        plain = ctor()
        for k in (1, 5):
            singular_values(plain, k=k, iters=1)  # allocate the basis once
            fns[f"svals_k{k}"] = (lambda k=k: singular_values(plain, k=k, iters=1))
        results = time_alternating(fns, args.repeats)
        shape = "x".join(map(str, mods["conv"].weight_orig.shape))
        for name, (med, p20, p80) in results.items():
            if name in PROVIDERS:
                provider, op = name, "sn_fwd_bwd"
            else:
                provider, op = "monitor", name.replace("svals_", "singular_values_")
            rows.append(dict(provider=provider, layer=layer, op=op, weight_shape=shape,
                             input="x".join(map(str, spatial)),
                             median_ms=f"{med * 1e3:.4f}", p20_ms=f"{p20 * 1e3:.4f}", p80_ms=f"{p80 * 1e3:.4f}",
                             threads=args.threads, torch=torch.__version__, device=device))
    write_csv(args.out, rows, COLUMNS)
    print(f"torch {torch.__version__}, {device}, threads={args.threads}, float32, repeats={args.repeats}")
    print(f"{'layer':28s} {'provider':13s} {'op':20s} {'median ms':>10s} {'p20':>8s} {'p80':>8s}")
    for r in rows:
        print(f"{r['layer']:28s} {r['provider']:13s} {r['op']:20s} {r['median_ms']:>10s} {r['p20_ms']:>8s} "
              f"{r['p80_ms']:>8s}")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
