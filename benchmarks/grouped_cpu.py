"""CPU benchmark of sn_kernels.group against PyTorch's parametrization, in paired rounds.

1. Forward + backward over all the SN weights of a shape set (float32; parametrization API):
   access every ``module.weight`` (power iteration + W / sigma), then one
   ``torch.autograd.backward`` over all of them with fixed gradients.  Providers:
   ``torch_param`` (torch.nn.utils.parametrizations.spectral_norm), ``native`` (sn_kernels,
   per module), ``grouped`` (sn_kernels.group: one C++ call forward, one node / one C++ call
   backward per group).
2. The SNGAN discriminator training step (benchmarks/models.py, hinge loss, Adam lr 2e-4,
   betas (0, 0.9), batch ``--batch`` real + fake 32x32 images): ``torch_param``, ``native`` per
   module, ``grouped_step`` (sn_kernels.group(D, optimizer=opt): D(real) and D(fake) share one
   power iteration and one W / sigma).

Every round runs each provider once, back to back, in a rotating order; medians (p20, p80)
of the times and of the per-round speedups against torch_param.

    python benchmarks/grouped_cpu.py [--rounds N] [--big-rounds N] [--step-rounds N] [--batch B]

Writes benchmarks/results/grouped_cpu.csv.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sn_kernels  # noqa: E402
from _common import BUNDLED_SHAPES, Holder, load_shapes, write_csv  # noqa: E402
from models import SNGANDiscriminator, hinge_d_loss  # noqa: E402


class Weights(nn.Module):
    """One parametrized holder per weight shape; calling it returns every normalized weight."""

    def __init__(self, shapes):
        super().__init__()
        self.holders = nn.ModuleList(Holder(shape) for shape in shapes)

    def forward(self):
        return [h.weight for h in self.holders]


def q(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def paired(providers: dict, rounds: int, warmup: int = 2) -> dict:
    names = list(providers)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            providers[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def weights_bench(shapes, rounds):
    torch.manual_seed(0)
    base = Weights(shapes)
    grads = [torch.randn(*s) for s in shapes]
    models = {}
    tp = copy.deepcopy(base)
    for h in tp.holders:
        torch.nn.utils.parametrizations.spectral_norm(h)
    models["torch_param"] = tp
    nat = sn_kernels.convert(copy.deepcopy(tp))
    models["native"] = nat
    grp = sn_kernels.convert(copy.deepcopy(tp))
    sn_kernels.group(grp)
    models["grouped"] = grp

    def step(model):
        def run():
            ws = model()
            torch.autograd.backward(ws, grads)
            for p in model.parameters():
                p.grad = None
        return run

    with sn_kernels.use_backend("native"):
        return paired({n: step(m) for n, m in models.items()}, rounds)


def sngan_step_bench(rounds, batch):
    torch.manual_seed(0)
    base = SNGANDiscriminator()
    D_t = copy.deepcopy(base)
    for m in D_t.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.nn.utils.parametrizations.spectral_norm(m)
    D_n = sn_kernels.convert(copy.deepcopy(D_t))
    D_g = sn_kernels.convert(copy.deepcopy(D_t))
    opts = {k: torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.0, 0.9))
            for k, m in (("torch_param", D_t), ("native", D_n), ("grouped_step", D_g))}
    sn_kernels.group(D_g, optimizer=opts["grouped_step"])
    real, fake = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)

    def step(D, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            hinge_d_loss(D(real), D(fake)).backward()
            opt.step()
        return run

    with sn_kernels.use_backend("native"):
        return paired({"torch_param": step(D_t, opts["torch_param"]), "native": step(D_n, opts["native"]),
                       "grouped_step": step(D_g, opts["grouped_step"])}, rounds)


def summarize(label, times, rows, extra):
    ref = times["torch_param"]
    for name, ts in times.items():
        speed = [a / b for a, b in zip(ref, ts)]
        row = dict(bench=label, provider=name, rounds=len(ts), median_ms=statistics.median(ts) * 1e3,
                   p20_ms=q(ts, 0.2) * 1e3, p80_ms=q(ts, 0.8) * 1e3, speedup_vs_torch_param=statistics.median(speed),
                   speedup_p20=q(speed, 0.2), speedup_p80=q(speed, 0.8), **extra)
        rows.append(row)
        print(f"{label:18s} {name:13s} {row['median_ms']:9.3f} ms  (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
              f"  x{row['speedup_vs_torch_param']:.2f} (p20 {row['speedup_p20']:.2f}, p80 {row['speedup_p80']:.2f})",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--big-rounds", type=int, default=20)
    ap.add_argument("--step-rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "grouped_cpu.csv"))
    args = ap.parse_args()
    shapes = load_shapes(search=[BUNDLED_SHAPES])  # benchmarks/shapes.json
    extra = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", threads=torch.get_num_threads(),
                 torch=torch.__version__)
    rows = []
    for name, rounds in (("sngan_cifar_d", args.rounds), ("biggan128_d", args.big_rounds)):
        summarize(name, weights_bench([tuple(e["shape"]) for e in shapes[name]], rounds), rows, extra)
    summarize(f"sngan_d_step_b{args.batch}", sngan_step_bench(args.step_rounds, args.batch), rows, extra)
    write_csv(args.out, rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
