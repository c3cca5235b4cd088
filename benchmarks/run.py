"""Benchmark: sn_kernels against PyTorch's spectral norm on whatever device is present.

Providers x shape sets x modes x dtypes; medians with p20/p80, GB/s under the
bytes model of DESIGN.md and the fraction of the device's copy bandwidth measured
in the same run.  Writes benchmarks/results/<device>.csv (+ a PNG when matplotlib
is installed) and prints a summary table last.

    python benchmarks/run.py                      # everything that runs here
    python benchmarks/run.py --sets sngan_cifar_d --modes fwd_bwd --dtypes float32
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
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

MODES = ("fwd", "bwd", "fwd_bwd", "train_step")
# minimum device traffic per weight, in units of |W| (DESIGN.md section 2, W streamed);
# a training step also runs convolutions, so it has no bytes model
BYTES_MODEL = {"fwd": 4, "bwd": 4, "fwd_bwd": 8, "train_step": float("nan")}
TRAIN_BATCH = {"cuda": 64, "cpu": 8}  # batch 64 as specified on a GPU; 8 keeps a CPU run short


def find_shapes(path: str | None) -> dict:
    """shapes.json: --shapes, else ../shared/shapes.json beside the repository, else the bundled copy."""
    for cand in ([Path(path)] if path else []) + [ROOT.parent / "shared" / "shapes.json",
                                                   ROOT / "benchmarks" / "shapes.json"]:
        if cand.is_file():
            return json.loads(cand.read_text())
    raise SystemExit("shapes.json not found: pass --shapes PATH")


class Holder(nn.Module):
    """A module whose forward returns its (spectrally normalized) weight."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) / shape[-1] ** 0.5)

    def forward(self):
        return self.weight


class _Container(nn.Module):
    """All holders of a set as one model, so ``sn_kernels.group`` can normalize them together."""

    def __init__(self, holders):
        super().__init__()
        self.holders = nn.ModuleList(holders)

    def forward(self):
        return [h() for h in self.holders]


def wrap(provider: str, modules) -> None:
    """Apply ``provider``'s spectral norm to the ``weight`` of each module."""
    if provider == "torch_hook":
        sn = torch.nn.utils.spectral_norm
    elif provider in ("torch_param", "torch_compile"):
        sn = torch.nn.utils.parametrizations.spectral_norm
    elif provider.startswith("sn_kernels_"):
        sn = sn_kernels.parametrizations.spectral_norm
    else:
        raise ValueError(f"unknown provider {provider!r}")
    for m in modules:
        sn(m)


def build(provider: str, shapes, dtype, device):
    """Holders wrapped by ``provider``; returns a callable producing the normalized weights."""
    holders = [Holder(s, dtype, device) for s in shapes]
    wrap(provider, holders)
    if provider == "sn_kernels_grouped":
        container = _Container(holders)
        sn_kernels.group(container)
        return holders, container

    def forward():
        return [h() for h in holders]

    if provider == "torch_compile":
        forward = torch.compile(forward)
    return holders, forward


def copy_bandwidth(device, sync) -> float:
    """Device copy bandwidth in GB/s (bytes read + written), median of repeats."""
    n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def timer(device):
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
    return measure, (lambda: None)


def _copies(device, nbytes: int) -> int:
    """How many copies of a weight set to rotate through so that each call reads weights
    that are not in L2 from the previous call (GPU only; capped)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(32, -(-2 * l2 // max(nbytes, 1))))


def run_case(provider, shapes, dtype, device, mode, reps, warmup):
    """Seconds per call of ``mode`` over all weights of a set: list of ``reps`` samples."""
    backend = provider.removeprefix("sn_kernels_") if provider.startswith("sn_kernels_") else None
    backend = None if backend == "grouped" else backend  # grouping runs on the "auto" backend
    ctx = sn_kernels.use_backend(backend) if backend else _null()
    with ctx:
        if mode == "train_step":
            return train_step_samples(provider, dtype, device, reps, warmup)
        nbytes = sum(torch.Size(s).numel() for s in shapes) * torch.empty((), dtype=dtype).element_size()
        sets = [build(provider, shapes, dtype, device) for _ in range(_copies(device, nbytes))]
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        measure, sync = timer(device)

        samples = []
        for i in range(warmup + reps):
            holders, forward = sets[i % len(sets)]
            for h in holders:
                for p in h.parameters():
                    p.grad = None
            if mode == "fwd":
                t = measure(forward)
            elif mode == "bwd":
                outs = forward()
                sync()
                t = measure(lambda: torch.autograd.backward(outs, grads))
            else:
                t = measure(lambda: torch.autograd.backward(forward(), grads))
            if i >= warmup:
                samples.append(t)
    return samples


def train_step_samples(provider, dtype, device, reps, warmup):
    """One discriminator step of the SNGAN ResNet (CIFAR, batch 64, hinge loss, Adam)."""
    from models import SNGANDiscriminator, hinge_d_loss

    torch.manual_seed(0)
    D = SNGANDiscriminator().to(device=device, dtype=dtype)
    wrap(provider, [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    model = torch.compile(D) if provider == "torch_compile" else D
    if provider == "sn_kernels_grouped":
        sn_kernels.group(D)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9))
    batch = TRAIN_BATCH.get(device.type, 8)
    real = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    fake = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    measure, _ = timer(device)

    def step():
        opt.zero_grad(set_to_none=True)
        hinge_d_loss(model(real), model(fake)).backward()
        opt.step()

    samples = [measure(step) for _ in range(warmup + reps)]
    return samples[warmup:]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma list (default: all that run here)")
    ap.add_argument("--sets", default="sngan_cifar_d,biggan128_d,single")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtypes", default=None, help="default float32,bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<device>.csv)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dev_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    shape_sets = find_shapes(args.shapes)
    args.dtypes = args.dtypes or ("float32,bfloat16" if on_gpu else "float32")
    backends = sn_kernels.available_backends(device)
    providers = (args.providers.split(",") if args.providers else
                 ["torch_hook", "torch_param"] + (["torch_compile"] if on_gpu else [])
                 + [f"sn_kernels_{b}" for b in backends if not (b == "triton" and not on_gpu)]
                 + ["sn_kernels_grouped"])
    reps = args.reps or (100 if on_gpu else 5)
    warmup = 5 if on_gpu else 1
    measure, sync = timer(device)
    copy_gbps = copy_bandwidth(device, sync)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    print(f"# device {dev_name}, torch {torch.__version__}, triton {triton_version}, copy {copy_gbps:.1f} GB/s",
          flush=True)

    rows = []
    for set_name in args.sets.split(","):
        shapes = [tuple(e["shape"]) for e in shape_sets[set_name]]
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            nbytes = sum(torch.Size(s).numel() for s in shapes) * torch.empty((), dtype=dtype).element_size()
            for mode in args.modes.split(","):
                if mode == "train_step" and set_name != "sngan_cifar_d":
                    continue  # the training step is the SNGAN discriminator's
                for provider in providers:
                    try:
                        samples = run_case(provider, shapes, dtype, device, mode, reps, warmup)
                        note = f"batch {TRAIN_BATCH.get(device.type, 8)}" if mode == "train_step" else ""
                    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                        samples, note = [float("nan")], f"{type(exc).__name__}: {exc}"[:200]
                    med = statistics.median(samples)
                    gbps = BYTES_MODEL[mode] * nbytes / med / 1e9
                    rows.append(dict(provider=provider, shape_set=set_name, mode=mode, dtype=dtype_name,
                                     device=dev_name, median_ms=med * 1e3, p20_ms=percentile(samples, 0.2) * 1e3,
                                     p80_ms=percentile(samples, 0.8) * 1e3, gbps=gbps,
                                     frac_copy_bw=gbps / copy_gbps, copy_gbps=copy_gbps, weight_mb=nbytes / 1e6,
                                     torch=torch.__version__, triton=triton_version, reps=len(samples), note=note))
                    print(f"{set_name:14s} {dtype_name:8s} {mode:7s} {provider:20s} {med * 1e3:10.3f} ms"
                          f" {gbps:8.2f} GB/s {note}", flush=True)

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        dev_name.replace(" ", "_").replace("/", "_") + ".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# wrote {out}")
    summary(rows)
    plot(rows, out.with_suffix(".png"))


def summary(rows):
    """Speed-up of each sn_kernels provider over torch_param, per set/dtype/mode."""
    base = {(r["shape_set"], r["dtype"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "torch_param"}
    print("\n| shape set | dtype | mode | provider | median ms | GB/s | × torch_param |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["provider"] == "torch_param":
            continue
        b = base.get((r["shape_set"], r["dtype"], r["mode"]))
        speedup = b / r["median_ms"] if b else float("nan")
        print(f"| {r['shape_set']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['median_ms']:.3f} |"
              f" {r['gbps']:.1f} | {speedup:.2f} |")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("# matplotlib not installed: no plot")
        return
    base = {(r["shape_set"], r["dtype"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "torch_param"}
    cases = sorted({(r["shape_set"], r["dtype"], r["mode"]) for r in rows})
    providers = sorted({r["provider"] for r in rows} - {"torch_param"})
    fig, ax = plt.subplots(figsize=(max(6, len(cases) * 0.6), 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ys = []
        for c in cases:
            r = next((r for r in rows if r["provider"] == p and (r["shape_set"], r["dtype"], r["mode"]) == c), None)
            ys.append(base[c] / r["median_ms"] if r and c in base else 0)
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=p)
    ax.axhline(1, color="k", lw=0.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(["/".join(c) for c in cases], rotation=70, fontsize=6)
    ax.set_ylabel("speed-up over torch_param")
    ax.set_title(rows[0]["device"])
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
