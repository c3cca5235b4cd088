"""CPU benchmark of sn_kernels.group against PyTorch's parametrization, in paired rounds (one process).

1. Forward + backward over all the SN weights of a shape set (sngan_cifar_d, biggan128_d, and
   ``tiny_11``: SNGAN's 11 weights shrunk to 8x4x3x3 and 1x8, which times the host overhead alone;
   float32; parametrization API):
   access every ``module.weight`` (power iteration + W / sigma), then one backward over all of them
   with fixed gradients (``_common.engine_backward``: the autograd engine called as
   ``torch.autograd.backward`` calls it, without its per-tensor Python checks, which a training step
   does not pay per weight).  Providers:
   ``torch_param`` (torch.nn.utils.parametrizations.spectral_norm), ``native`` (sn_kernels,
   per module), ``grouped`` (sn_kernels.group: one C++ call forward, one node / one C++ call
   backward per group, csrc/sn_kernels_grouped_cpu.cpp).  Each row also gives GB/s under the bytes
   model (docs/design.md#bytes-model: 8|W| per forward + backward), its fraction of the copy
   bandwidth measured in the same run, and the speed-up over torch_param that the bytes model
   allows at that bandwidth (``ceiling_vs_torch_param`` = torch_param time / (8|W| / copy bandwidth)).
2. The SNGAN discriminator training step (benchmarks/models.py, hinge loss, Adam lr 2e-4,
   betas (0, 0.9), batch ``--batch`` real + ``--batch`` fake 32x32 images): ``torch_param``,
   ``native`` per module, ``grouped_call`` (sn_kernels.group(D): per-module semantics) and
   ``grouped_step`` (sn_kernels.group(D, optimizer=opt): D(real) and D(fake) share one power
   iteration and one W / sigma per optimizer step).

Every round runs each provider once, back to back, in orders balanced so that each provider runs
right after each other one equally often (``_common.balanced_orders``); medians (p20, p80)
of the times and of the per-round speed-ups against torch_param and against per-module native.

    python benchmarks/grouped_cpu.py [--rounds N] [--big-rounds N] [--step-rounds N] [--batch B]

Writes benchmarks/results/cpu_grouped.csv (device, versions and copy bandwidth in every row).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sn_kernels  # noqa: E402
from _common import (BUNDLED_SHAPES, Holder, balanced_orders, copy_bandwidth, device_name, engine_backward,  # noqa: E402
                     load_shapes, write_csv)
from models import SNGANDiscriminator, hinge_d_loss  # noqa: E402

BYTES_MODEL_FWD_BWD = 8  # |W| per forward + backward (docs/design.md#bytes-model)
# SNGAN-CIFAR's 11 SN weights shrunk to a few hundred elements each: the kernels take next to nothing,
# so these rows time the host overhead per step (Python, dispatcher, autograd) of each provider
TINY = "tiny_11"
TINY_SHAPES = [(8, 4, 3, 3)] * 10 + [(1, 8)]


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


def paired(providers: dict, rounds: int, warmup: int = 3) -> dict:
    """{name: [seconds per round]}: every round runs each provider once, in the orders of
    ``balanced_orders`` taken in turn (after ``warmup`` unrecorded rounds)."""
    names = list(providers)
    orders = balanced_orders(len(names))
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in (names[i] for i in orders[r % len(orders)]):
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
    models["native"] = sn_kernels.convert(copy.deepcopy(tp))
    grp = sn_kernels.convert(copy.deepcopy(tp))
    sn_kernels.group(grp)
    models["grouped"] = grp

    def step(model):
        params = list(model.parameters())

        def run():
            engine_backward(model(), grads)
            for p in params:
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
    Ds = {"torch_param": D_t}
    for name in ("native", "grouped_call", "grouped_step"):
        Ds[name] = sn_kernels.convert(copy.deepcopy(D_t))
    opts = {k: torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9)) for k, D in Ds.items()}
    sn_kernels.group(Ds["grouped_call"])
    sn_kernels.group(Ds["grouped_step"], optimizer=opts["grouped_step"])
    real, fake = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)

    def step(D, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            hinge_d_loss(D(real), D(fake)).backward()
            opt.step()
        return run

    with sn_kernels.use_backend("native"):
        return paired({k: step(D, opts[k]) for k, D in Ds.items()}, rounds)


def summarize(label, times, rows, extra, nbytes=None, copy_gbps=None):
    ref, nat = times["torch_param"], times["native"]
    for name, ts in times.items():
        speed = [a / b for a, b in zip(ref, ts)]
        vs_native = [a / b for a, b in zip(nat, ts)]
        med = statistics.median(ts)
        row = dict(bench=label, provider=name, rounds=len(ts), median_ms=med * 1e3,
                   p20_ms=q(ts, 0.2) * 1e3, p80_ms=q(ts, 0.8) * 1e3,
                   speedup_vs_torch_param=statistics.median(speed), speedup_p20=q(speed, 0.2),
                   speedup_p80=q(speed, 0.8), speedup_vs_native=statistics.median(vs_native),
                   vs_native_p20=q(vs_native, 0.2), vs_native_p80=q(vs_native, 0.8),
                   weight_mb=float("nan"), gbps=float("nan"), frac_copy_bw=float("nan"),
                   ceiling_vs_torch_param=float("nan"), **extra)
        if nbytes is not None:
            floor_s = BYTES_MODEL_FWD_BWD * nbytes / (copy_gbps * 1e9)  # the bytes model at copy bandwidth
            row.update(weight_mb=nbytes / 1e6, gbps=BYTES_MODEL_FWD_BWD * nbytes / med / 1e9,
                       ceiling_vs_torch_param=statistics.median(ref) / floor_s)
            row["frac_copy_bw"] = row["gbps"] / copy_gbps
        rows.append(row)
        line = (f"{label:18s} {name:13s} {row['median_ms']:9.3f} ms  (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
                f"  x{row['speedup_vs_torch_param']:.2f} torch_param (p20 {row['speedup_p20']:.2f}, p80 "
                f"{row['speedup_p80']:.2f}), x{row['speedup_vs_native']:.2f} native")
        if nbytes is not None:
            line += (f"; {row['gbps']:.1f} GB/s = {row['frac_copy_bw'] * 100:.0f}% of copy bw, bytes-model ceiling "
                     f"x{row['ceiling_vs_torch_param']:.1f}")
        print(line, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--big-rounds", type=int, default=20)
    ap.add_argument("--step-rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_grouped.csv"))
    args = ap.parse_args()
    shapes = load_shapes(search=[BUNDLED_SHAPES])  # benchmarks/shapes.json
    cpu = torch.device("cpu")
    bw = [copy_bandwidth(cpu, (64 << 20) // 4, repeats=8, warmup=2)]
    extra = dict(device=device_name(cpu), threads=torch.get_num_threads(), torch=torch.__version__,
                 sn_kernels=f"{sn_kernels.__version__}+{git_commit()}", batch="", copy_gbps=float("nan"))
    print(f"# {extra['device']}, {extra['threads']} threads, torch {extra['torch']}, sn_kernels {extra['sn_kernels']}, "
          f"copy {bw[0]:.1f} GB/s", flush=True)
    rows = []
    results = []
    for name, rounds in (("sngan_cifar_d", args.rounds), ("biggan128_d", args.big_rounds), (TINY, args.rounds)):
        sh = TINY_SHAPES if name == TINY else [tuple(e["shape"]) for e in shapes[name]]
        nbytes = sum(torch.Size(s).numel() for s in sh) * 4
        results.append((name, weights_bench(sh, rounds), nbytes))
        bw.append(copy_bandwidth(cpu, (64 << 20) // 4, repeats=8, warmup=2))
    copy_gbps = max(bw)  # the fastest copy of the run: the most generous ceiling
    extra["copy_gbps"] = copy_gbps
    print(f"# copy bandwidth (64 MiB float32 copy_, read + write) before / between / after: "
          + ", ".join(f"{b:.1f}" for b in bw) + f" GB/s; using {copy_gbps:.1f}", flush=True)
    for name, times, nbytes in results:
        summarize(name + " fwd_bwd", times, rows, extra, nbytes, copy_gbps)
    step_extra = dict(extra, batch=args.batch)
    summarize(f"sngan_d_step_b{args.batch}", sngan_step_bench(args.step_rounds, args.batch), rows, step_extra)
    write_csv(args.out, rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
