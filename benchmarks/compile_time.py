"""torch.compile time of the SNGAN discriminator: no spectral norm, PyTorch's, sn_kernels'.

Each measurement is a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR
in a new temporary folder), so nothing compiled earlier is reused.  The process builds
benchmarks/models.py's SNGANDiscriminator, wraps every Conv2d/Linear, compiles it
(default inductor), and times the first training step (one forward of real and fake
together, hinge loss, backward; compilation happens inside it) and two more.  Compile
time = first - the faster of the other two, as wall time and as CPU time (this process
and the compiler processes it waits for; one compile thread), which a busy shared
machine disturbs far less.  It also reports dynamo's graph count and graph breaks.

One forward, not D(real) then D(fake): with two compiled forwards before one backward,
PyTorch's own spectral norm fails under inductor in torch 2.11 ("modified by an inplace
operation"), so it could not be timed.  Variants run in interleaved rounds so that load
on a shared machine hits all alike.

    python benchmarks/compile_time.py --rounds 2

The medians and runs also go to benchmarks/results/cpu_compile_time.csv (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "torch_hook", "torch_param", "sn_kernels_hook", "sn_kernels_param", "sn_kernels_param_group",
            "sn_kernels_hook_group", "sn_kernels_param_native", "sn_kernels_param_torch", "sn_kernels_hook_torch")
# a variant's suffix: "_group" (sn_kernels.group(D)), or a backend by name ("auto" without one)
BACKEND_SUFFIXES = ("_native", "_torch")
SUFFIXES = ("_group",) + BACKEND_SUFFIXES


def _api(variant: str) -> str:
    """The variant without its suffix (``SUFFIXES``)."""
    for suffix in SUFFIXES:
        variant = variant.removesuffix(suffix)
    return variant


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of the finished processes it waited for."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def child(variant: str, batch: int) -> dict:
    """Run in the fresh process: one compiled training step, then a second one."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from torch import nn

    import sn_kernels
    from models import SNGANDiscriminator, hinge_d_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    D = SNGANDiscriminator()
    wrap = {"torch_hook": torch.nn.utils.spectral_norm,
            "torch_param": torch.nn.utils.parametrizations.spectral_norm,
            "sn_kernels_hook": sn_kernels.spectral_norm,
            "sn_kernels_param": sn_kernels.parametrizations.spectral_norm}.get(_api(variant))
    if wrap is not None:
        for m in D.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                wrap(m)
    if variant.endswith("_group"):
        sn_kernels.group(D)  # the compiled "call" refresh: one grouped op forward, one backward
    model = torch.compile(D)
    both = torch.randn(2 * batch, 3, 32, 32)  # real and fake in one batch

    def step():
        t, c = time.perf_counter(), cpu_seconds()
        D.zero_grad(set_to_none=True)
        out = model(both)
        hinge_d_loss(out[:batch], out[batch:]).backward()
        return time.perf_counter() - t, cpu_seconds() - c

    try:
        first = step()
        steady = min(step(), step())
    except RuntimeError as exc:  # reported, not fatal: PyTorch's own hook API can fail here
        return {"variant": variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    stats = torch._dynamo.utils.counters
    return {"variant": variant, "step_s": steady[0], "compile_s": first[0] - steady[0],
            "compile_cpu_s": first[1] - steady[1],
            "graphs": stats["stats"]["unique_graphs"], "graph_breaks": sum(stats["graph_break"].values()),
            "torch": torch.__version__}


def measure(variant: str, batch: int) -> dict:
    """One fresh process with an empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   TORCHINDUCTOR_COMPILE_THREADS="1")
        if variant.endswith(BACKEND_SUFFIXES):  # a backend by name: its custom ops / the traced formulation
            env["SN_KERNELS_BACKEND"] = variant.rsplit("_", 1)[1]
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(batch)],
                             env=env, capture_output=True, text=True, check=True)
        # inductor compiles each C++ kernel of the graphs to a module of its own: the main cost
        kernels = sum(f.endswith(".cpp") for _, _, files in os.walk(cache) for f in files)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), cpp_kernels=kernels)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded runs before the first round")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_compile_time.csv"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch)))
        return
    variants = args.variants.split(",")
    # the first compile of a session also pays one-time costs outside the fresh inductor cache
    # (measured: ~8 s CPU more for whichever variant ran first), so one unrecorded run goes first
    for _ in range(args.warmup):
        measure(variants[0], args.batch)
    results = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    last = {}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            res = measure(v, args.batch)
            if "error" in res:
                print(f"round {r} {v:18s} {res['error']}", flush=True)
                continue
            results[v].append(res["compile_s"])
            cpu[v].append(res["compile_cpu_s"])
            last[v] = res
            print(f"round {r} {v:18s} compile {res['compile_s']:7.2f} s wall, {res['compile_cpu_s']:7.2f} s CPU "
                  f"(step {res['step_s'] * 1e3:.0f} ms, {res['graphs']} graphs, {res['graph_breaks']} breaks, "
                  f"{res['cpp_kernels']} C++ kernels)",
                  flush=True)
    base = statistics.median(cpu["none"]) if cpu.get("none") else float("nan")
    print("\n| variant | compile CPU time (median) | CPU runs | wall runs | CPU × no SN |\n|---|---|---|---|---|")
    for v in variants:
        if not results[v]:
            print(f"| {v} | failed | | | |")
            continue
        med = statistics.median(cpu[v])
        print(f"| {v} | {med:.1f} s | {', '.join(f'{x:.1f}' for x in cpu[v])} | "
              f"{', '.join(f'{x:.1f}' for x in results[v])} | {med / base:.2f}× |")
    write_rows(args.out, variants, cpu, results, last, base, args.batch)


def write_rows(path, variants, cpu, wall, last, base, batch) -> None:
    """One CSV row per variant and clock: the median, the runs, the ratio of the medians to no SN (CPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import device_name, write_csv

    today = datetime.date.today().isoformat()
    rows = []
    for v in variants:
        if not cpu[v]:
            continue
        for clock, runs in (("cpu", cpu[v]), ("wall", wall[v])):
            med = statistics.median(runs)
            rows.append(dict(model="sngan_resnet_d", variant=v, clock=clock, median_s=round(med, 2),
                             runs=" ".join(f"{x:.2f}" for x in runs),
                             ratio_to_none=round(med / base, 3) if clock == "cpu" else "",
                             cpp_kernels=last[v]["cpp_kernels"], graphs=last[v]["graphs"],
                             graph_breaks=last[v]["graph_breaks"], batch=batch, compile_threads=1,
                             device=device_name("cpu"), torch=last[v]["torch"], date=today))
    write_csv(path, rows)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
