"""torch.compile time of the SNGAN discriminator: no spectral norm, PyTorch's, sn_kernels'.

Each measurement is a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR
in a new temporary folder), so nothing compiled earlier is reused.  The process builds
benchmarks/models.py's SNGANDiscriminator, wraps every Conv2d/Linear, compiles it
(default inductor), and times the first training step (one forward of real and fake
together, hinge loss, backward; compilation happens inside it) and two more; compile
time = first - the faster of the other two.  It also reports dynamo's graph count and
graph breaks.  One forward, not D(real) then D(fake): with two compiled forwards before
one backward, PyTorch's own spectral norm fails under inductor in torch 2.11 ("modified
by an inplace operation"), so it could not be timed.
Variants run in interleaved rounds so that load on a shared machine hits all alike.

    python benchmarks/compile_time.py --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "torch_hook", "torch_param", "sn_kernels_hook", "sn_kernels_param")


def child(variant: str, batch: int) -> dict:
    """Run in the fresh process: one compiled training step, then a second one."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from torch import nn

    import sn_kernels
    from models import SNGANDiscriminator, hinge_d_loss

    torch.manual_seed(0)
    D = SNGANDiscriminator()
    wrap = {"torch_hook": torch.nn.utils.spectral_norm,
            "torch_param": torch.nn.utils.parametrizations.spectral_norm,
            "sn_kernels_hook": sn_kernels.spectral_norm,
            "sn_kernels_param": sn_kernels.parametrizations.spectral_norm}.get(variant)
    if wrap is not None:
        for m in D.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                wrap(m)
    model = torch.compile(D)
    both = torch.randn(2 * batch, 3, 32, 32)  # real and fake in one batch

    def step():
        t = time.perf_counter()
        D.zero_grad(set_to_none=True)
        out = model(both)
        hinge_d_loss(out[:batch], out[batch:]).backward()
        return time.perf_counter() - t

    try:
        first = step()
        steady = min(step(), step())
    except RuntimeError as exc:  # reported, not fatal: PyTorch's own hook API can fail here
        return {"variant": variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    stats = torch._dynamo.utils.counters
    return {"variant": variant, "first_s": first, "step_s": steady, "compile_s": first - steady,
            "graphs": stats["stats"]["unique_graphs"], "graph_breaks": sum(stats["graph_break"].values()),
            "torch": torch.__version__}


def measure(variant: str, batch: int) -> dict:
    """One fresh process with an empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(batch)],
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch)))
        return
    variants = args.variants.split(",")
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            res = measure(v, args.batch)
            if "error" in res:
                print(f"round {r} {v:18s} {res['error']}", flush=True)
                continue
            results[v].append(res["compile_s"])
            print(f"round {r} {v:18s} compile {res['compile_s']:7.2f} s (step {res['step_s'] * 1e3:.0f} ms, "
                  f"{res['graphs']} graphs, {res['graph_breaks']} breaks)", flush=True)
    base = statistics.median(results["none"]) if "none" in results else float("nan")
    print("\n| variant | compile time (median) | runs | × no SN |\n|---|---|---|---|")
    for v in variants:
        if not results[v]:
            print(f"| {v} | failed | | |")
            continue
        med = statistics.median(results[v])
        print(f"| {v} | {med:.1f} s | {', '.join(f'{x:.1f}' for x in results[v])} | {med / base:.2f}× |")


if __name__ == "__main__":
    main()
