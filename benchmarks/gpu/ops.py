"""Per-op timings of the CUDA backends: the numbers benchmarks/NOTES.md predicts.

For each backend ("native", "triton"), weight and dtype, times with CUDA events (median of --reps
samples, L2 flushed before each, outside the timed region):

    pi_vu, pi_uv   one training power-iteration step (a column pass and a row pass; 2|W| read)
    eval           sigma = u . (W v) (one row pass; |W| read)
    normalize      W / sigma (|W| read, |W| written)
    backward       the analytic gradient (<G, W>: 2|W| read; grad: |W| read, |W| written)

and reports GB/s under that bytes model and as a fraction of the copy bandwidth measured here.

    python benchmarks/gpu/ops.py --out ops.csv [--backends native,triton] [--dtypes float32,bfloat16]
    python benchmarks/gpu/ops.py --smoke --out ops.csv    # CPU rehearsal: tiny shapes, host timer
    compute-sanitizer --tool memcheck python benchmarks/gpu/ops.py --sanitize --reps 1
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sn_kernels  # noqa: E402,F401  (registers the ops)
from _common import copy_bandwidth, l2_flush, timer  # noqa: E402
from sn_kernels import dispatch  # noqa: E402

# (shape, dim): the NOTES cases (N1-N6) and the 64 MB targets
SHAPES = [((4096, 4096), 0), ((1536, 13824), 0), ((13824, 1536), 0), ((8192, 8192), 0), ((3, 100000), 0),
          ((100000, 3), 0), ((1, 1 << 20), 0), ((512, 256, 4, 4), 1), ((1024, 1024, 4, 4), 1), ((4096, 4096), 1)]
SMOKE_SHAPES = [((33, 17), 0), ((4, 6, 3, 3), 1)]
# odd shapes for compute-sanitizer (--sanitize): every plan and tile class, remainders everywhere
SANITIZE_SHAPES = [((1, 7), 0), ((7, 1), 0), ((33, 17), 1), ((37, 1001), 0), ((3, 5000), 0), ((5000, 3), 0),
                   ((300, 300), 0), ((4, 6, 3, 3), 1), ((9, 11, 70), 1), ((6, 50, 8), 2), ((20, 40, 8, 8), 1)]
BYTES = {"pi_vu": 2, "pi_uv": 2, "eval": 1, "normalize": 2, "backward": 4}  # in units of |W|


def ops_of(backend: str, device: torch.device):
    """The backend's ops (.power_iteration, .normalize, .backward) on ``device``, after why_not passed."""
    return dispatch.resolve(torch.device(device), backend)


def time_op(fn, reps, flush, cuda=True):
    """Median microseconds of ``fn`` (CUDA events, L2 flushed before each sample; host timer off a GPU)."""
    measure, _ = timer(torch.device("cuda" if cuda else "cpu"))
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        flush()
        out.append(measure(fn) * 1e6)
    return statistics.median(out)


def copy_gbps(device):
    """Copy bandwidth (GB/s): 256 MB (16 MB off a GPU), median of 10 copies timed as the ops are."""
    measure, _ = timer(device)
    return copy_bandwidth(device, (256 << 18) if device.type == "cuda" else (16 << 18), repeats=10, warmup=6,
                          measure=measure)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="native,triton")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="ops.csv")
    ap.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny shapes, host timer")
    ap.add_argument("--sanitize", action="store_true", help="odd shapes, for compute-sanitizer")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ops.py: no CUDA device")
        return 0
    cuda = device.type == "cuda"
    bw = copy_gbps(device)
    flush = l2_flush(device)
    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, copy {bw:.0f} GB/s", flush=True)
    fields = ["backend", "shape", "dim", "dtype", "op", "us", "gbps", "frac_copy_bw", "mb"]
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for backend in args.backends.split(","):
            why = dispatch.why_not(backend, device)
            if why is not None:
                print(f"# {backend}: {why}")
                continue
            ops = ops_of(backend, device)
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                for shape, dim in SMOKE_SHAPES if args.smoke else SANITIZE_SHAPES if args.sanitize else SHAPES:
                    w = torch.randn(shape, device=device, dtype=dtype)
                    m = shape[dim]
                    u = torch.nn.functional.normalize(torch.randn(m, device=device), dim=0).to(dtype)
                    v = torch.nn.functional.normalize(torch.randn(w.numel() // m, device=device), dim=0).to(dtype)
                    g = torch.randn_like(w)
                    sigma, uu, vv = ops.power_iteration(w, u.clone(), v.clone(), 1, 1e-12, dim, "vu", True)
                    cases = {
                        "pi_vu": lambda: ops.power_iteration(w, u, v, 1, 1e-12, dim, "vu", True),
                        "pi_uv": lambda: ops.power_iteration(w, u, v, 1, 1e-12, dim, "uv", True),
                        "eval": lambda: ops.power_iteration(w, u, v, 1, 1e-12, dim, "vu", False),
                        "normalize": lambda: ops.normalize(w, uu, vv, sigma, dim),
                        "backward": lambda: ops.backward(g, w, uu, vv, sigma, dim),
                    }
                    mb = w.numel() * w.element_size() / 1e6
                    for op, fn in cases.items():
                        try:
                            us = time_op(fn, args.reps, flush, cuda)
                        except Exception as exc:
                            print(f"{backend} {shape} {op}: {type(exc).__name__}: {exc}")
                            continue
                        gbps = BYTES[op] * mb * 1e6 / (us * 1e-6) / 1e9
                        row = dict(backend=backend, shape="x".join(map(str, shape)), dim=dim, dtype=dtype_name, op=op,
                                   us=round(us, 2), gbps=round(gbps, 1), frac_copy_bw=round(gbps / bw, 3),
                                   mb=round(mb, 2))
                        wr.writerow(row)
                        f.flush()
                        print(f"{backend:7s} {row['shape']:>14s} dim{dim} {dtype_name:8s} {op:9s} {us:9.1f} us "
                              f"{gbps:7.0f} GB/s {gbps / bw * 100:4.0f}%", flush=True)
                    del w, u, v, g
    return 0


if __name__ == "__main__":
    sys.exit(main())
