"""torch.compile benchmark: a discriminator's training step with no SN, PyTorch's SN and sn_kernels'.

The model is the SNGAN standard-CNN discriminator (benchmarks/models.py: 7 convolutions and
1 linear layer, every one spectrally normalized), batch 8 on the CPU (64 on a GPU).  A step is
forward + backward of the mean output, gradients reset to None first.

    step      (default) in one process: every variant eager and compiled (torch.compile, default
              mode, fullgraph=True), warmed up, then timed in interleaved rounds (each round runs
              every case once, in the balanced orders of ``_common.balanced_orders``: each case runs right
              after each other one equally often).  Per round, a variant's SN
              overhead is its step minus the no-SN step of the same round and mode, and its ratio
              is its step over torch_param's; medians with p20-p80 over the rounds.
    compile   compile time: each run is a fresh process with an empty inductor cache
              (TORCHINDUCTOR_CACHE_DIR in a new temporary folder) that times its first compiled
              step (compilation + one step, as a user sees it) and reports dynamo's graph count
              and graph breaks; variants interleaved run by run, the ratio to the no-SN run of
              the same round.
    profile   where a compiled step's time goes: torch.profiler self time per op (inductor's
              C++ kernels by name), per step.

Variants: none, torch_param / torch_hook (torch.nn.utils.parametrizations.spectral_norm /
torch.nn.utils.spectral_norm), sn_param / sn_hook (sn_kernels' drop-ins, backend "auto"),
sn_param_group / sn_hook_group (the same with sn_kernels.group(model): one grouped op per step) and
sn_param_native / sn_param_torch (the parametrization with backend "native": both its custom ops under
compile; "torch": the traced formulation, power iteration included, on any device; "auto" on the CPU
calls the native power-iteration op and the W / sigma op that writes channels-last for a convolution).

    python benchmarks/compile_step.py --rounds 40
    python benchmarks/compile_step.py --measure compile --runs 4
    python benchmarks/compile_step.py --measure profile --rounds 20 --variants none,sn_param

Rows are added to (or replace the same rows of) benchmarks/results/cpu_compile_step.csv
(cuda_compile_step.csv on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sn_kernels  # noqa: E402
from _common import balanced_orders, device_name, quantiles  # noqa: E402
from models import SNGANCNNDiscriminator  # noqa: E402

VARIANTS = ("none", "torch_param", "torch_hook", "sn_param", "sn_hook", "sn_param_group", "sn_hook_group",
            "sn_param_native", "sn_param_torch")
DEFAULT_VARIANTS = VARIANTS[:5]
BATCH = {"cpu": 8, "cuda": 64}
CLOCKS = ("wall", "cpu")  # perf_counter; process_time (all threads' CPU time: robust to preemption)
COLUMNS = ["measure", "model", "variant", "mode", "clock", "median", "p20", "p80", "unit", "ratio", "ratio_p20", "ratio_p80",
           "ratio_to", "runs", "batch", "threads", "device", "torch", "note"]


def wrap_fn(variant: str):
    return {"none": None,
            "torch_param": torch.nn.utils.parametrizations.spectral_norm,
            "torch_hook": torch.nn.utils.spectral_norm,
            "sn_param": sn_kernels.parametrizations.spectral_norm,
            "sn_hook": sn_kernels.spectral_norm,
            "sn_param_group": sn_kernels.parametrizations.spectral_norm,
            "sn_hook_group": sn_kernels.spectral_norm,
            "sn_param_native": sn_kernels.parametrizations.spectral_norm,
            "sn_param_torch": sn_kernels.parametrizations.spectral_norm}[variant]


def backend_ctx(variant: str):
    """sn_param_native / sn_param_torch run (and compile) under use_backend("native" / "torch");
    the rest with the backend selected ("auto" unless SN_KERNELS_BACKEND says otherwise)."""
    backend = variant.removeprefix("sn_param_") if variant in ("sn_param_native", "sn_param_torch") else None
    return sn_kernels.use_backend(backend) if backend else contextlib.nullcontext()


def build(variant: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = SNGANCNNDiscriminator().to(device)
    wrap = wrap_fn(variant)
    if wrap is not None:
        with backend_ctx(variant):
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    wrap(m)
    if variant.endswith("_group"):
        sn_kernels.group(model)
    return model


def make_step(variant: str, model: nn.Module, compiled: bool, x: torch.Tensor, sync):
    """One training step (forward + backward) of ``model``, eager or compiled."""
    run = torch.compile(model, fullgraph=True) if compiled else model
    params = list(model.parameters())

    def step():
        with backend_ctx(variant):
            for p in params:
                p.grad = None
            run(x).mean().backward()
        sync()
    return step


def row(measure, variant, mode, clock, values, unit, ratios, ratio_to, args, device, note=""):
    med, p20, p80 = quantiles(values)
    rmed, r20, r80 = quantiles(ratios) if ratios else (float("nan"),) * 3
    return dict(measure=measure, model="sngan_cnn_d", variant=variant, mode=mode, clock=clock, median=med, p20=p20,
                p80=p80,
                unit=unit, ratio=rmed, ratio_p20=r20, ratio_p80=r80, ratio_to=ratio_to, runs=len(values),
                batch=args.batch, threads=torch.get_num_threads(), device=device_name(device).replace(" ", "_"),
                torch=torch.__version__, note=note)


def measure_steps(args, device) -> list[dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    cases = {}
    for variant in args.variants:
        for mode in args.modes:
            step = make_step(variant, build(variant, device), mode == "compiled", x, sync)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            print(f"# {variant:16s} {mode:8s} warm-up {time.perf_counter() - t0:7.1f} s", flush=True)
            cases[(variant, mode)] = step
    keys = list(cases)
    times = {(k, clock): [] for k in keys for clock in CLOCKS}
    orders = balanced_orders(len(keys))
    for r in range(args.rounds):
        for k in (keys[i] for i in orders[r % len(orders)]):
            w0, c0 = time.perf_counter(), time.process_time()
            cases[k]()
            times[(k, "wall")].append(time.perf_counter() - w0)
            times[(k, "cpu")].append(time.process_time() - c0)
    rows = []
    for ((variant, mode), clock), ts in times.items():
        ms = [t * 1e3 for t in ts]
        base = times.get((("torch_param", mode), clock))
        ratios = [a / b for a, b in zip(ts, base)] if base and variant != "torch_param" else []
        rows.append(row("step", variant, mode, clock, ms, "ms", ratios, "torch_param", args, device))
        none = times.get((("none", mode), clock))
        if none and variant != "none":
            over = [(a - b) * 1e3 for a, b in zip(ts, none)]
            rows.append(row("sn_overhead", variant, mode, clock, over, "ms", [], "", args, device,
                            "step minus the no-SN step of the same round"))
    over = {(r["variant"], r["mode"], r["clock"]): r["median"] for r in rows if r["measure"] == "sn_overhead"}
    for r in rows:
        base = over.get(("torch_param", r["mode"], r["clock"]))
        if r["measure"] == "sn_overhead" and r["variant"] != "torch_param" and base:
            r.update(ratio=r["median"] / base, ratio_to="torch_param (medians)")
    return rows


def child(variant: str, batch: int, device: str) -> None:
    """In a fresh process: the first compiled step (compilation + one step), then one more."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    step = make_step(variant, build(variant, dev), True, x, sync)
    cpu_before = time.process_time()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    second, second_cpu = time.perf_counter() - t0, time.process_time() - c0
    counters = torch._dynamo.utils.counters
    print(json.dumps(dict(first_s=first, second_s=second, cpu_before_s=cpu_before, second_cpu_s=second_cpu,
                          graphs=counters["stats"]["unique_graphs"],
                          graph_breaks=sum(counters["graph_break"].values()))))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_compile(args, device) -> list[dict]:
    """Wall: the first step in the child.  CPU: the CPU time of the child's whole process tree
    (compile workers, C++ compilers) after the model was built, less the second step's."""
    firsts = {(v, clock): [] for v in args.variants for clock in CLOCKS}
    info = {}
    orders = balanced_orders(len(args.variants))
    for r in range(args.runs):
        for variant in (args.variants[i] for i in orders[r % len(orders)]):
            with tempfile.TemporaryDirectory(prefix="sn_compile_") as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                cpu0 = _children_cpu()
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                                      "--device", str(device), "--threads", str(torch.get_num_threads())],
                                     env=env, capture_output=True, text=True)
                tree_cpu = _children_cpu() - cpu0
            if out.returncode != 0:
                raise SystemExit(f"{variant}: the child failed:\n{out.stdout}\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            firsts[(variant, "wall")].append(res["first_s"])
            firsts[(variant, "cpu")].append(tree_cpu - res["cpu_before_s"] - res["second_cpu_s"])
            info[variant] = res
            print(f"# run {r} {variant:16s} first step {res['first_s']:6.1f} s, compile CPU "
                  f"{firsts[(variant, 'cpu')][-1]:6.1f} s, graphs {res['graphs']}, graph breaks {res['graph_breaks']}",
                  flush=True)
    rows = []
    for (variant, clock), ts in firsts.items():
        base = firsts.get(("none", clock))
        ratios = [a / b for a, b in zip(ts, base)] if base and variant != "none" else []
        note = f"graphs {info[variant]['graphs']}, graph breaks {info[variant]['graph_breaks']}"
        what = "first step incl. compilation" if clock == "wall" else "CPU of the process tree minus import/build"
        rows.append(row("compile_time", variant, "compiled", clock, ts, "s", ratios, "none", args, device,
                        f"fresh process and inductor cache; {what}; {note}"))
    return rows


def profile(args, device) -> None:
    """torch.profiler of ``--rounds`` compiled steps per variant (inductor's C++ kernels named, as
    TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1 does): self time per op, per step, largest first."""
    torch._inductor.config.cpp.enable_kernel_profile = True
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for variant in args.variants:
        step = make_step(variant, build(variant, device), True, x, sync)
        for _ in range(args.warmup):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.rounds):
                step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / args.rounds / 1e3
        print(f"\n## {variant}: {total:.2f} ms self CPU time per step")
        for e in events[:args.top]:
            print(f"{e.self_cpu_time_total / args.rounds / 1e3:8.3f} ms {e.count / args.rounds:5.1f}x  {e.key[:110]}")


def save(rows: list[dict], path: Path) -> None:
    """Replace the rows of the same (measure, variant, mode, clock, device, threads) in ``path``; keep the rest."""
    old = []
    if path.is_file():
        with path.open() as f:
            old = list(csv.DictReader(f))
    key = lambda r: tuple(str(r[k]) for k in ("measure", "variant", "mode", "clock", "device", "threads"))  # noqa: E731
    keys = {key(r) for r in rows}
    kept = [r for r in old if key(r) not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in kept + rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"# wrote {path}")


def show(rows: list[dict]) -> None:
    print("\n| measure | variant | mode | clock | median | p20-p80 | ratio (p20-p80) | ratio to |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["clock"], r["measure"], r["mode"])):
        print(f"| {r['measure']} | {r['variant']} | {r['mode']} | {r['clock']} | {r['median']:.2f} {r['unit']} | "
              f"{r['p20']:.2f}-{r['p80']:.2f} | {r['ratio']:.3f} ({r['ratio_p20']:.3f}-{r['ratio_p80']:.3f}) | "
              f"{r['ratio_to']} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", choices=("step", "compile", "profile"), default="step")
    ap.add_argument("--top", type=int, default=25, help="ops listed per variant (profile)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {VARIANTS}")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds (step)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per variant (compile)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.batch = args.batch or BATCH.get(device.type, 8)
    if args.threads:
        torch.set_num_threads(args.threads)  # before compiling: inductor's C++ kernels take it as their width
    if args.child:
        return child(args.child, args.batch, args.device)
    args.variants = args.variants.split(",")
    args.modes = args.modes.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    print(f"# {device_name(device).replace(' ', '_')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}", flush=True)
    if args.measure == "profile":
        return profile(args, device)
    rows = measure_steps(args, device) if args.measure == "step" else measure_compile(args, device)
    show(rows)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{device.type}_compile_step.csv"
    save(rows, out)


if __name__ == "__main__":
    main()
