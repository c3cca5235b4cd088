"""CPU benchmark of the native backend through the parametrization front end.

For every spectral-norm weight of a shape set (default: sngan_cifar_d and biggan128_d from
shapes.json), one training step's spectral-norm work in float32:

    forward  = access module.weight (power iteration + W / sigma)
    backward = module.weight.backward(G) per weight with a fixed G ("per-weight"), or one
               torch.autograd.backward over all weights ("one": the shape of a training step)

``sn_kernels.parametrizations.spectral_norm`` with use_backend("native") against
``torch.nn.utils.parametrizations.spectral_norm`` in one process, in paired rounds (both
providers back to back, alternating which goes first); medians (p20, p80) of the times and
of the per-round speedups.  Also measures the machine's copy bandwidth (copy_ of a large
tensor: bytes read + written / time) and reports GB/s under docs/design.md#bytes-model, forward
4|W| + backward 4|W|.  The native "uv" forward reads W twice, not three times (W v and
W^T (W v) in one pass), so it moves 3|W| + 4|W|, mostly reads, while a copy's writes also
cost a read for ownership: the fraction of the copy bandwidth can pass 100 %.

    python benchmarks/cpu_native.py [--shapes PATH] [--sets sngan_cifar_d biggan128_d] [--rounds N]
        [--backward per-weight one]

Writes benchmarks/results/cpu_native.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this tree's sn_kernels, not an installed copy (as run.py)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sn_kernels  # noqa: E402
from _common import Holder, copy_bandwidth, load_shapes, quantiles, write_csv  # noqa: E402
from sn_kernels import dispatch  # noqa: E402
from sn_kernels.parametrizations import spectral_norm as sn_spectral_norm  # noqa: E402

COLUMNS = ["provider", "shape_set", "mode", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "gbps", "speedup",
           "speedup_p20", "speedup_p80", "torch", "note"]


def make_modules(shapes, provider):
    torch.manual_seed(0)
    mods = []
    for shape in shapes:
        h = Holder(shape, scale=0.05)
        if provider == "torch":
            torch.nn.utils.parametrizations.spectral_norm(h)
        else:
            with sn_kernels.use_backend("native"):
                sn_spectral_norm(h)
        h.train()
        mods.append(h)
    return mods


def one_step(mods, grads, backward="per-weight"):
    """Forward + backward of every weight; returns (total, forward) seconds.

    backward="per-weight": each weight's own ``backward(G)`` call (the autograd engine starts
    once per weight); "one": every weight accessed, then one ``torch.autograd.backward`` over
    all of them, the shape of a training step."""
    for h in mods:
        h.parametrizations.weight.original.grad = None
    t0 = time.perf_counter()
    if backward == "one":
        ws = [h.weight for h in mods]
        tf = time.perf_counter() - t0
        torch.autograd.backward(ws, grads)
        return time.perf_counter() - t0, tf
    tf = 0.0
    for h, G in zip(mods, grads):
        a = time.perf_counter()
        w = h.weight
        tf += time.perf_counter() - a
        w.backward(G)
    return time.perf_counter() - t0, tf


def time_providers(mods_by_provider, grads, rounds, backward, warmup=3):
    """Paired rounds: every round times each provider once, back to back, first one then the
    other alternately, so a machine whose speed drifts (a shared VM) slows both alike.  Returns
    per provider (totals, median forward, median backward) and the per-round ratios torch/native."""
    out = {p: ([], []) for p in mods_by_provider}
    ratios = []
    names = list(mods_by_provider)
    for r in range(warmup + rounds):
        this = {}
        for provider in (names if r % 2 == 0 else names[::-1]):
            ctx = sn_kernels.use_backend("native") if provider == "native" else contextlib.nullcontext()
            with ctx:
                this[provider] = one_step(mods_by_provider[provider], grads, backward)
        if r >= warmup:
            for provider, (total, fwd) in this.items():
                out[provider][0].append(total)
                out[provider][1].append(fwd)
            ratios.append(this["torch"][0] / this["native"][0])
    res = {p: (t, statistics.median(f), statistics.median(t) - statistics.median(f)) for p, (t, f) in out.items()}
    return res, ratios


def overhead_breakdown(shapes, repeats=50):
    """Where the time goes for small weights: op calls alone vs the front end."""
    from sn_kernels import spectral_normalize

    ws = [torch.randn(s) for s in shapes]
    us = [torch.randn(s[0]) for s in shapes]
    vs = [torch.randn(w.numel() // s[0]) for w, s in zip(ws, shapes)]
    out = {}

    def bench(fn):
        xs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return statistics.median(xs) * 1e3

    ops = torch.ops.sn_kernels

    def raw_ops():
        for w, u, v in zip(ws, us, vs):
            s, a, b = ops.native_power_iteration(w, u, v, 1, 1e-12, 0, "uv", True)
            ops.native_normalize(w, a, b, s, 0)

    def functional():
        for w, u, v in zip(ws, us, vs):
            spectral_normalize(w, u, v, order="uv", backend="native")

    def raw_backward():
        for w, u, v in zip(ws, us, vs):
            ops.native_backward(w, w, u, v, torch.tensor(1.0), 0)

    out["raw_ops_forward_ms"] = bench(raw_ops)
    out["functional_forward_ms"] = bench(functional)
    out["raw_backward_ms"] = bench(raw_backward)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None, help="default: ../shared/shapes.json beside the repository, else "
                    "benchmarks/shapes.json")
    ap.add_argument("--sets", nargs="+", default=["sngan_cifar_d", "biggan128_d"])
    ap.add_argument("--rounds", type=int, default=0, help="paired rounds (default: 300 small sets, 7 large)")
    ap.add_argument("--backward", nargs="+", default=["per-weight", "one"], choices=["per-weight", "one"],
                    help="one backward call per weight, or one for all weights (a training step)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_native.csv"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--append", action="store_true", help="append rows to the CSV instead of rewriting it")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    reason = dispatch.why_not("native", torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"native backend unavailable: {reason}")
    torch.set_grad_enabled(True)
    shape_sets = load_shapes(args.shapes)  # --shapes, else ../shared/shapes.json, else the bundled copy
    # 512 MB, median of 7: copy_ into an existing tensor, then clone (a fresh tensor)
    copy_gbps = copy_bandwidth("cpu", 512 * 2**20 // 4, repeats=7)
    clone_gbps = copy_bandwidth("cpu", 512 * 2**20 // 4, repeats=7, clone=True)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(f"THP_MEM_ALLOC_ENABLE={thp} (1: torch backs large CPU tensors with huge pages: fewer page faults)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {copy_gbps:.1f} GB/s "
          f"(copy_), {clone_gbps:.1f} GB/s (clone, incl. allocation)")
    rows = []
    for set_name in args.sets:
        shapes = [tuple(e["shape"]) for e in shape_sets[set_name]]
        nbytes = sum(torch.Size(s).numel() * 4 for s in shapes)
        rounds = args.rounds or (300 if nbytes < 64 * 2**20 else 7)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(s, generator=g) for s in shapes]
        mods = {p: make_modules(shapes, p) for p in ("torch", "native")}
        for backward in args.backward:
            timed, ratios = time_providers(mods, grads, rounds, backward)
            r_med, r20, r80 = quantiles(ratios)
            for provider in ("torch", "native"):
                totals, fwd, bwd = timed[provider]
                med, p20, p80 = quantiles(totals)
                gbps = 8 * nbytes / med / 1e9
                speedup = "" if provider == "torch" else (
                    f"{r_med:.2f}x vs torch (median of {len(ratios)} paired rounds, p20 {r20:.2f}, p80 {r80:.2f}); ")
                note = (f"fwd {fwd * 1e3:.2f} ms, bwd {bwd * 1e3:.2f} ms; {speedup}"
                        f"{gbps / copy_gbps:.0%} of copy bandwidth {copy_gbps:.1f} GB/s (copy_ into an existing "
                        f"tensor), {gbps / clone_gbps:.0%} of clone bandwidth {clone_gbps:.1f} GB/s (fresh tensor: "
                        f"page faults); {len(shapes)} weights, {nbytes / 2**20:.1f} MiB; THP_MEM_ALLOC_ENABLE={thp}")
                rows.append(dict(provider=provider, shape_set=set_name,
                                 mode=f"fwd+bwd ({backward} backward),{torch.get_num_threads()}thr", dtype="float32",
                                 device="cpu", median_ms=f"{med * 1e3:.3f}", p20_ms=f"{p20 * 1e3:.3f}",
                                 p80_ms=f"{p80 * 1e3:.3f}", gbps=f"{gbps:.2f}",
                                 speedup="" if provider == "torch" else f"{r_med:.3f}",
                                 speedup_p20="" if provider == "torch" else f"{r20:.3f}",
                                 speedup_p80="" if provider == "torch" else f"{r80:.3f}",
                                 torch=torch.__version__, note=note))
                print(f"{set_name:14s} {backward:10s} {provider:7s} median {med * 1e3:9.2f} ms "
                      f"(p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})  {note}")
        del mods
        print(f"{set_name:14s} floor: 8|W| at copy bandwidth {8 * nbytes / copy_gbps / 1e6:.2f} ms, "
              f"at clone bandwidth {8 * nbytes / clone_gbps / 1e6:.2f} ms")
        if nbytes < 64 * 2**20:
            br = overhead_breakdown(shapes)
            print(f"{set_name:14s} where the time goes (all {len(shapes)} weights): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in br.items()))
            rows.append(dict(provider="native-breakdown", shape_set=set_name, mode="fwd", dtype="float32",
                             device="cpu", median_ms=f"{br['functional_forward_ms']:.3f}", p20_ms="", p80_ms="",
                             gbps="", torch=torch.__version__,
                             note="; ".join(f"{k} {v:.3f}" for k, v in br.items())))
    write_csv(args.out, rows, COLUMNS, append=args.append)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
