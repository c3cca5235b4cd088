"""Cost and tightness of spectral normalization by a certified bound (``bound="upper"``, ``"operator"``).

For each weight shape of a shape set (default: sngan_cifar_d from shapes.json, ../shared/shapes.json
else the bundled copy; layers of the same shape measured once, the ``layers`` column names them),
float32 on the CPU, parametrization API (sn_kernels.parametrizations.spectral_norm, PyTorch's default
init of the layer, seeded):

* cost: one training step's spectral-norm work, forward (access ``module.weight``: power
  iteration + the normalization) and backward (``module.weight.backward(G)``, a fixed G), for
  ``plain`` (bound="estimate", W / sigma_hat), ``upper_every1`` (bound="upper", a Gram refresh
  at every forward) and ``upper_every10`` (a refresh every 10 training forwards, Weyl carries in
  between: its median is the carry's cost, its mean the amortized cost), and the same two for
  ``bound="operator"`` (``operator_every1``, ``operator_every10``: a 4-D weight is an nn.Conv2d with
  padding (k - 1) / 2, certified as a convolution operator at every input size).  Paired rounds: every
  round runs each provider once, back to back, in balanced orders (``_common.balanced_orders``);
  medians (p20, p80) of the times and of the per-round ratios to ``plain``.  ``total`` rows: the sums
  over all the set's layers (shapes times their count) of the medians and means.
* tightness: B' / sigma_exact (B' the divisor, what ``sn_kernels.sigmas`` reports; sigma_exact the
  float64 SVD of the raw weight) right after a refresh, and after 9 carry steps, each after one
  Adam step (SNGAN's D optimizer: lr 2e-4, betas (0, 0.9)) on a random Gaussian gradient.
  For ``operator`` rows the reference is the convolution's operator norm on 32x32 inputs
  (``sn_kernels.sigma_bounds(layer, input_shape=(32, 32))``, the upper end of its enclosure: so
  the ratio is a lower estimate of the looseness, by at most that enclosure's width, which is
  printed) instead of the matrix view's sigma.

    python benchmarks/certified.py [--sets sngan_cifar_d] [--rounds 200] [--threads 1] [--device cuda]
    python benchmarks/certified.py --sets biggan128_d --rounds 10 --providers upper_every10,operator_every10 \
        --out benchmarks/results/cpu_certified_biggan128_d.csv

(the second: 10 rounds of every10 providers hold one refresh each, so their mean is the amortized
cost; the every1 providers would refresh 1536 x 13824 weights in float64 at every round.)

Writes benchmarks/results/cpu_certified.csv (``--device cuda``: <device>_certified.csv; device and
versions in every row; on a GPU each timed step ends with a synchronize, and the operator-norm
reference still runs on the CPU).  About 45 s on a shared 2-core machine by default.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import sn_kernels  # noqa: E402
from _common import device_name, find_shapes, load_shapes, quantiles, write_csv  # noqa: E402
from grouped_cpu import paired  # noqa: E402  (paired rounds in balanced orders, after a warm-up)
from sn_kernels import parametrizations as P  # noqa: E402
from sn_kernels.find import find  # noqa: E402
from sn_kernels.testing import svd_sigma  # noqa: E402

PROVIDERS = {"plain": {}, "upper_every1": dict(bound="upper", bound_every=1),
             "upper_every10": dict(bound="upper", bound_every=10),
             "operator_every1": dict(bound="operator", bound_every=1),
             "operator_every10": dict(bound="operator", bound_every=10)}
OPERATOR_INPUT = (32, 32)  # the input size of the operator-norm reference
FIELDS = ["set", "layers", "count", "weight_shape", "provider", "median_ms", "p20_ms", "p80_ms", "mean_ms",
          "vs_plain", "vs_plain_p20", "vs_plain_p80", "b_over_sigma_refresh", "b_over_sigma_carry9", "rounds",
          "threads", "dtype", "device", "torch", "sn_kernels"]


DEVICE = torch.device("cpu")  # --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def layer_of(shape) -> nn.Module:
    """An nn.Linear or nn.Conv2d ("same" zero padding, no bias) of that weight shape, PyTorch's default init."""
    torch.manual_seed(0)
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False)
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), padding=tuple((k - 1) // 2 for k in shape[2:]),
                     bias=False)


def wrapped(shape, **kw) -> nn.Module:
    layer = layer_of(shape).to(DEVICE)
    P.spectral_norm(layer, **kw)
    return layer


def cost(shape, rounds: int, providers) -> dict:
    layers = {name: wrapped(shape, **PROVIDERS[name]) for name in providers}
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step(layer):
        original = layer.parametrizations.weight.original

        def run():
            layer.weight.backward(grad)
            original.grad = None
            _sync()
        return run

    return paired({name: step(layer) for name, layer in layers.items()}, rounds)


def exact(layer: nn.Module, bound: str, operator_max_channels: int) -> float:
    """sigma of the matrix view ("upper"), or the operator norm at OPERATOR_INPUT ("operator": the upper end
    of sigma_bounds' enclosure of a convolution; a Linear's matrix); NaN for a convolution with more than
    ``operator_max_channels`` input or output channels (its enclosure at 32x32 would take hours on a CPU)."""
    weight = layer.parametrizations.weight.original.detach()
    if bound == "upper" or weight.dim() == 2 or weight[0, 0].numel() == 1:  # a 1x1 conv (no padding) is its matrix
        return svd_sigma(weight).item()
    if max(weight.shape[:2]) > operator_max_channels:
        print(f"  operator norm of {tuple(weight.shape)} not computed (more than {operator_max_channels} channels)",
              flush=True)
        return float("nan")
    plain = layer_of(tuple(weight.shape))
    with torch.no_grad():
        plain.weight.copy_(weight.cpu())
    lower, upper = sn_kernels.sigma_bounds(plain, input_shape=OPERATOR_INPUT)
    print(f"  operator norm of {tuple(weight.shape)} at {OPERATOR_INPUT}: [{lower:.6f}, {upper:.6f}]", flush=True)
    return upper


def tightness(shape, bound: str, operator_max_channels: int) -> tuple[float, float]:
    """B' / sigma_exact after a refresh and after 9 carries (one Adam step before each)."""
    layer = wrapped(shape, bound=bound, bound_every=10)
    state = find(layer, "weight").state
    original = layer.parametrizations.weight.original
    opt = torch.optim.Adam(layer.parameters(), lr=2e-4, betas=(0.0, 0.9))
    gen = torch.Generator().manual_seed(2)
    state.certifier.invalidate()  # the next forward refreshes (registration's did already: restart the schedule)
    ratios = []
    for step in range(10):
        w = layer.weight
        if step in (0, 9):
            ratios.append(state.sigma.item() / exact(layer, bound, operator_max_channels))
        opt.zero_grad()
        w.backward(torch.randn(shape, generator=gen).to(DEVICE))
        opt.step()
    return ratios[0], ratios[1]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="shapes.json (default: ../shared/shapes.json, else the bundled)")
    ap.add_argument("--sets", nargs="+", default=["sngan_cifar_d"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"comma list of {list(PROVIDERS)} (plain always runs: the ratios are to it)")
    ap.add_argument("--operator-max-channels", type=int, default=256,
                    help="no operator-norm reference for a convolution with more channels (tightness left blank)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/cpu_certified.csv (CPU), "
                                                "<device>_certified.csv beside it (GPU)")
    args = ap.parse_args()
    unknown = sorted(set(args.providers.split(",")) - set(PROVIDERS))
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(PROVIDERS)}")
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = "cpu" if DEVICE.type == "cpu" else device_name(DEVICE).replace(" ", "_").replace("/", "_")
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{name}_certified.csv")
    sets = load_shapes(args.shapes)
    extra = dict(rounds=args.rounds, threads=args.threads, dtype="float32", device=device_name(DEVICE),
                 torch=torch.__version__, sn_kernels=f"{sn_kernels.__version__}+{git_commit()}")
    print(f"shapes: {find_shapes(args.shapes)}; sets {args.sets}; torch {extra['torch']}, {extra['device']}, "
          f"threads={args.threads}, rounds={args.rounds}, backend {sn_kernels.get_backend()}", flush=True)
    rows = []
    t_start = time.perf_counter()
    with sn_kernels.use_backend("auto"):
        for set_name in args.sets:
            groups: dict = {}
            for entry in sets[set_name]:
                groups.setdefault(tuple(entry["shape"]), []).append(entry["name"])
            providers = ["plain"] + [p for p in args.providers.split(",") if p != "plain"]
            totals = {name: [0.0, 0.0] for name in providers}
            for shape, names in groups.items():
                times = cost(shape, args.rounds, providers)
                bounds_run = {p.split("_")[0] for p in providers if p != "plain"}
                tight = {bound: tightness(shape, bound, args.operator_max_channels) for bound in bounds_run}
                for name, ts in times.items():
                    med, p20, p80 = quantiles(ts)
                    ratio = [a / b for a, b in zip(ts, times["plain"])]
                    r_med, r_p20, r_p80 = quantiles(ratio)
                    upper = name != "plain"
                    refresh, carry9 = tight[name.split("_")[0]] if upper else (None, None)
                    rows.append(dict(set=set_name, layers=" ".join(names), count=len(names),
                                     weight_shape="x".join(map(str, shape)), provider=name,
                                     median_ms=f"{med * 1e3:.4f}", p20_ms=f"{p20 * 1e3:.4f}",
                                     p80_ms=f"{p80 * 1e3:.4f}", mean_ms=f"{statistics.fmean(ts) * 1e3:.4f}",
                                     vs_plain=f"{r_med:.3f}", vs_plain_p20=f"{r_p20:.3f}", vs_plain_p80=f"{r_p80:.3f}",
                                     b_over_sigma_refresh=f"{refresh:.6f}" if upper else "",
                                     b_over_sigma_carry9=f"{carry9:.6f}" if upper else "", **extra))
                    totals[name][0] += med * len(names)
                    totals[name][1] += statistics.fmean(ts) * len(names)
                    print(f"{set_name} {'x'.join(map(str, shape)):>12s} x{len(names)} {name:14s} "
                          f"{med * 1e3:8.3f} ms (p20 {p20 * 1e3:.3f}, p80 {p80 * 1e3:.3f}; "
                          f"mean {statistics.fmean(ts) * 1e3:.3f})"
                          f"  x{r_med:.2f} plain (p20 {r_p20:.2f}, p80 {r_p80:.2f})"
                          + (f"  B/sigma refresh {refresh:.5f}, after 9 carries {carry9:.5f}" if upper else ""),
                          flush=True)
            plain_total = totals["plain"][0]
            for name, (med_sum, mean_sum) in totals.items():
                rows.append(dict(set=set_name, layers="total", count=sum(len(v) for v in groups.values()),
                                 weight_shape="", provider=name, median_ms=f"{med_sum * 1e3:.4f}", p20_ms="",
                                 p80_ms="", mean_ms=f"{mean_sum * 1e3:.4f}", vs_plain=f"{med_sum / plain_total:.3f}",
                                 vs_plain_p20="", vs_plain_p80="", b_over_sigma_refresh="", b_over_sigma_carry9="",
                                 **extra))
                print(f"{set_name} total {name:14s} {med_sum * 1e3:8.3f} ms (sum of medians; of means "
                      f"{mean_sum * 1e3:.3f})  x{med_sum / plain_total:.2f} plain", flush=True)
    write_csv(args.out, rows, FIELDS)
    print(f"{len(rows)} rows in {time.perf_counter() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
