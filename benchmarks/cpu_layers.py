"""Every layer type x dtype x dim on the CPU, against PyTorch's spectral norm: where is sn_kernels slower?

For each case (a layer of ``LAYERS``, a dtype, the default dim and dim=1), two copies of the layer, one with
``torch.nn.utils.parametrizations.spectral_norm`` and one with ``sn_kernels.parametrizations.spectral_norm``
(native backend), timed in paired rounds: every round runs both, in alternating order, for

* ``train``: ``module.weight`` (power iteration + W / sigma) then its backward with a fixed gradient;
* ``eval``: ``module.weight`` under ``no_grad`` in eval mode (sigma = u^T W v, then W / sigma).

Reports per case the median times and the median per-round ratio ours / PyTorch (p20-p80); a ratio above 1
is a case where PyTorch's own spectral norm is faster.  This is the sweep of benchmarks/NOTES.md L4-L5.

    python benchmarks/cpu_layers.py [--threads 1] [--rounds 15] [--only Conv2d Linear(1024] [--out CSV]

Writes benchmarks/results/cpu_layers.csv (device, versions and commit in every row) and, with matplotlib,
a plot of the ratios beside it (.png).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's sn_kernels, not an installed copy (as run.py)
sys.path.insert(0, str(ROOT / "benchmarks"))
import sn_kernels  # noqa: E402
from _common import balanced_orders, device_name, git_commit, pyplot, quantiles, write_csv  # noqa: E402

# name -> constructor: the odd shapes (1 x n, m x 1, ~10 K elements), the common ones (3x3, 1x1, 4x4
# transposed), grouped and 1-d / 3-d convolutions, and large matrices
LAYERS = {
    "Linear(1,4096)": lambda: nn.Linear(1, 4096),
    "Linear(4096,1)": lambda: nn.Linear(4096, 1),
    "Linear(10,1000)": lambda: nn.Linear(10, 1000),
    "Linear(1000,10)": lambda: nn.Linear(1000, 10),
    "Linear(1024,1024)": lambda: nn.Linear(1024, 1024),
    "Linear(13824,1536)": lambda: nn.Linear(13824, 1536),
    "Embedding(50000,128)": lambda: nn.Embedding(50000, 128),
    "Embedding(1000,1536)": lambda: nn.Embedding(1000, 1536),
    "Conv1d(256,256,3)": lambda: nn.Conv1d(256, 256, 3),
    "Conv1d(512,512,41,groups=4)": lambda: nn.Conv1d(512, 512, 41, groups=4),
    "Conv2d(3,64,3)": lambda: nn.Conv2d(3, 64, 3),
    "Conv2d(256,256,3)": lambda: nn.Conv2d(256, 256, 3),
    "Conv2d(512,512,1)": lambda: nn.Conv2d(512, 512, 1),
    "Conv2d(64,64,7)": lambda: nn.Conv2d(64, 64, 7),
    "Conv2d(1024,1,4)": lambda: nn.Conv2d(1024, 1, 4),
    "Conv2d(32,32,3,groups=32)": lambda: nn.Conv2d(32, 32, 3, groups=32),
    "Conv3d(64,64,3)": lambda: nn.Conv3d(64, 64, 3),
    "ConvTranspose1d(256,128,4)": lambda: nn.ConvTranspose1d(256, 128, 4),
    "ConvTranspose2d(512,256,4)": lambda: nn.ConvTranspose2d(512, 256, 4),
    "ConvTranspose2d(100,512,4)": lambda: nn.ConvTranspose2d(100, 512, 4),
    "ConvTranspose2d(64,3,4)": lambda: nn.ConvTranspose2d(64, 3, 4),
    "ConvTranspose2d(256,256,5)": lambda: nn.ConvTranspose2d(256, 256, 5),
    "ConvTranspose3d(64,32,4)": lambda: nn.ConvTranspose3d(64, 32, 4),
}
DTYPES = ["float32", "bfloat16", "float16", "float64"]


def pair(make, dtype, dim):
    """(PyTorch's, ours): the same layer, weights and u, v, normalized along ``dim`` (None: the default)."""
    torch.manual_seed(0)
    theirs, ours = make().to(dtype), make().to(dtype)
    kw = {} if dim is None else {"dim": dim}
    torch.nn.utils.parametrizations.spectral_norm(theirs, **kw)
    sn_kernels.parametrizations.spectral_norm(ours, **kw)
    ours.load_state_dict(theirs.state_dict())  # the same weight, u and v
    return theirs, ours


def step(module, mode, grad):
    """One timed call: the training forward + backward, or the eval forward."""
    original = module.parametrizations.weight.original
    if mode == "train":
        def run():
            module.weight.backward(grad)
            original.grad = None
    else:
        def run():
            with torch.no_grad():
                module.weight
    return run


def paired(theirs, ours, rounds, warmup=2):
    """Seconds per round of each, the two run back to back in alternating order."""
    times = ([], [])
    orders = balanced_orders(2)
    for r in range(warmup + rounds):
        for i in orders[r % len(orders)]:
            fn = (theirs, ours)[i]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[i].append(dt)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", nargs="*", default=[], help="substrings of layer names to keep (all by default)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_layers.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep = args.only
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    meta = {"threads": args.threads, "rounds": args.rounds, "device": device_name("cpu"),
            "torch": torch.__version__, "commit": git_commit(), "date": datetime.date.today().isoformat()}
    rows = []
    with sn_kernels.use_backend("native"):
        for name, make in LAYERS.items():
            if keep and not any(k in name for k in keep):
                continue
            for dtype in dtypes:
                for dim in (None, 1):
                    if dim == 1 and name.startswith("Embedding"):
                        continue  # an embedding is normalized along its rows only
                    theirs, ours = pair(make, dtype, dim)
                    grad = torch.randn(theirs.weight.shape, dtype=dtype)
                    for mode in ("train", "eval"):
                        for m in (theirs, ours):
                            m.train(mode == "train")
                        t_theirs, t_ours = paired(step(theirs, mode, grad), step(ours, mode, grad), args.rounds)
                        ratios = [a / b for a, b in zip(t_ours, t_theirs)]
                        med, q20, q80 = quantiles(ratios)
                        rows.append({"layer": name, "dtype": str(dtype).removeprefix("torch."),
                                     "dim": "default" if dim is None else dim, "mode": mode,
                                     "torch_ms": round(statistics.median(t_theirs) * 1e3, 4),
                                     "sn_kernels_ms": round(statistics.median(t_ours) * 1e3, 4),
                                     "ratio": round(med, 3), "ratio_p20": round(q20, 3),
                                     "ratio_p80": round(q80, 3), **meta})
                        r = rows[-1]
                        flag = "  <-- slower" if r["ratio"] > 1.1 else ""
                        print(f"{name:28s} {r['dtype']:9s} dim={r['dim']!s:7s} {mode:5s} ours {r['sn_kernels_ms']:9.3f} ms "
                              f"torch {r['torch_ms']:9.3f} ms  ratio {r['ratio']:.2f} ({q20:.2f}-{q80:.2f}){flag}",
                              flush=True)
    write_csv(args.out, rows)
    summary(rows)
    plot(rows, Path(args.out).with_suffix(".png"))


def summary(rows):
    """Per mode and dtype: the median ratio, the worst case and how many cases are slower than PyTorch."""
    for mode in ("train", "eval"):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            if not sel:
                continue
            worst = max(sel, key=lambda r: r["ratio"])
            slower = sum(r["ratio"] > 1.1 for r in sel)
            print(f"{mode:5s} {dtype:9s} median ratio {statistics.median(r['ratio'] for r in sel):.2f}, "
                  f"slower than PyTorch (> 1.1x) in {slower} of {len(sel)}, worst {worst['ratio']:.2f} "
                  f"({worst['layer']} dim={worst['dim']})")


def plot(rows, path):
    """Ratios per case, one panel per mode (skipped without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for ax, mode in zip(axes, ("train", "eval")):
        for dtype, marker in zip(DTYPES, "os^D"):
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            ax.scatter(range(len(sel)), [r["ratio"] for r in sel], marker=marker, label=dtype, s=18)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{mode}: ours / PyTorch")
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("case (layer x dim, in LAYERS order)")
    fig.suptitle(f"sn_kernels native vs torch.nn.utils.parametrizations.spectral_norm, CPU, "
                 f"{rows[0]['threads']} thread(s), {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
