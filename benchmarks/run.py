"""Benchmark: sn_kernels against PyTorch's spectral norm on whatever device is present.

Providers x shape sets x modes x dtypes; medians with p20/p80, GB/s under the
bytes model of docs/design.md#bytes-model and the fraction of the device's copy bandwidth measured
in the same run.  Writes benchmarks/results/<device>.csv (+ a PNG when matplotlib
is installed) and prints a summary table last.

    python benchmarks/run.py                      # everything that runs here
    python benchmarks/run.py --sets sngan_cifar_d --modes fwd_bwd --dtypes float32
    python benchmarks/run.py --out X.csv --resume # add the cases X.csv lacks (rows are written as they come)
    python benchmarks/run.py --report X.csv       # summary, targets and plot of an existing CSV

Each (provider, shape set, dtype) is built once and serves every mode.  ``torch_compile``
(torch.compile(fullgraph=True) of PyTorch's parametrization) is compiled there, warmed up, and timed
under ``torch._dynamo.config.error_on_recompile``: a recompile during timing fails the case instead
of timing an eager fallback; dynamo is reset before each compiled case (every case recompiles the same
code, past dynamo's recompile limit otherwise).  On a GPU the L2 cache is flushed right before every
timed sample (in "bwd" mode after the untimed forward), so a small set is read from memory as in
training.  ``--per-weight SETS`` times each weight of those sets on its own (set name ``set/shape``).
Each row records the sn_kernels version and git commit of the tree measured ("+dirty": modified;
"unknown": no git) and the Python version.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import sn_kernels  # noqa: E402
from _common import (Holder, copy_bandwidth, device_name, git_commit, l2_flush, load_shapes, percentile,  # noqa: E402
                     pyplot, timer, triton_version, write_csv)

MODES = ("fwd", "bwd", "fwd_bwd", "train_step")
# sets beside shapes.json (which is shared): large weights normalized along dim=1 (ConvTranspose
# layout; a 2-D one is the transposed-kernel case), each of 64 MB in float32 but the first
EXTRA_SETS = {
    "single_dim1": [{"name": "convT512x256x4x4", "shape": [512, 256, 4, 4], "dim": 1},
                    {"name": "convT1024x1024x4x4", "shape": [1024, 1024, 4, 4], "dim": 1},
                    {"name": "4096x4096.dim1", "shape": [4096, 4096], "dim": 1}],
}
FIELDS = ["provider", "shape_set", "mode", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw",
          "copy_gbps", "weight_mb", "torch", "triton", "reps", "note", "sn_kernels", "python"]
# minimum device traffic per weight, in units of |W| (docs/design.md#bytes-model, W streamed);
# a training step also runs convolutions, so it has no bytes model
BYTES_MODEL = {"fwd": 4, "bwd": 4, "fwd_bwd": 8, "train_step": float("nan")}
TRAIN_BATCH = {"cuda": 64, "cpu": 8}  # batch 64 as specified on a GPU; 8 keeps a CPU run short


def find_shapes(path: str | None) -> dict:
    """shapes.json (--shapes, else ../shared/shapes.json beside the repository, else the bundled
    copy) plus EXTRA_SETS."""
    return {**EXTRA_SETS, **load_shapes(path)}  # the file wins


def cases(shape_sets: dict, names: list[str], per_weight: set[str]) -> list[tuple[str, list[tuple]]]:
    """(case name, [(shape, dim)]) per set, or per weight for the sets in ``per_weight``."""
    out = []
    for name in names:
        entries = [(tuple(e["shape"]), e.get("dim", 0)) for e in shape_sets[name]]
        if name in per_weight:
            out += [(f"{name}/{'x'.join(map(str, shape))}" + (f".dim{dim}" if dim else ""), [(shape, dim)])
                    for shape, dim in entries]
        else:
            out.append((name, entries))
    return out


class _Container(nn.Module):
    """All holders of a set as one model, so ``sn_kernels.group`` can normalize them together."""

    def __init__(self, holders):
        super().__init__()
        self.holders = nn.ModuleList(holders)

    def forward(self):
        return [h() for h in self.holders]


def wrap(provider: str, modules) -> None:
    """Apply ``provider``'s spectral norm to the ``weight`` of each module (along its ``dim``, if any)."""
    if provider == "torch_hook":
        sn = torch.nn.utils.spectral_norm
    elif provider in ("torch_param", "torch_compile"):
        sn = torch.nn.utils.parametrizations.spectral_norm
    elif provider.startswith("sn_kernels_"):
        sn = sn_kernels.parametrizations.spectral_norm
    else:
        raise ValueError(f"unknown provider {provider!r}")
    for m in modules:
        if getattr(m, "dim", 0):
            sn(m, dim=m.dim)
        else:
            sn(m)


def backend_context(provider: str):
    """``use_backend`` for an ``sn_kernels_<backend>`` provider; ``sn_kernels_grouped`` is the native
    backend's grouped kernels and ``sn_kernels_grouped_triton`` the triton backend's (named, so that a
    missing backend fails the case instead of timing the torch backend under the grouped label)."""
    backend = provider.removeprefix("sn_kernels_") if provider.startswith("sn_kernels_") else None
    if backend is not None and backend.startswith("grouped"):
        backend = backend.removeprefix("grouped").removeprefix("_") or "native"
    return sn_kernels.use_backend(backend) if backend is not None else contextlib.nullcontext()


class Case:
    """One provider's holders for a shape set, built once and timed in every mode.

    ``torch_compile``: the forward is compiled once here (fullgraph) and warmed up by the first
    samples; timing then runs under error_on_recompile."""

    def __init__(self, provider, entries, dtype, device, compile_backend="inductor"):
        self.provider, self.device = provider, device
        self.ctx = lambda: backend_context(provider)  # a fresh context per use (use_backend is one-shot)
        with self.ctx():
            self.holders = [Holder(shape, dtype, device, dim) for shape, dim in entries]
            wrap(provider, self.holders)
            if provider.startswith("sn_kernels_grouped"):
                self.container = _Container(self.holders)
                sn_kernels.group(self.container)
                self.forward = self.container
            else:
                def forward():
                    return [h() for h in self.holders]
                self.forward = forward
        self.compiled = provider == "torch_compile"
        if self.compiled:
            _fresh_dynamo()
            self.forward = torch.compile(self.forward, fullgraph=True, backend=compile_backend)
        self.grads = [torch.randn(shape, dtype=dtype, device=device) for shape, _ in entries]
        self.first_call_s = None

    def samples(self, mode, reps, warmup, measure, sync, flush):
        """Seconds per call of ``mode`` over all weights: ``reps`` samples after ``warmup`` calls."""
        grads = self.grads
        out = []
        with self.ctx():
            for i in range(warmup + reps):
                for h in self.holders:
                    for p in h.parameters():
                        p.grad = None
                with _no_recompile(self.compiled and i >= warmup):
                    if mode == "bwd":  # the untimed forward reads W: flush after it
                        outs = self.forward()
                        sync()
                        fn = lambda: torch.autograd.backward(outs, grads)  # noqa: E731
                    elif mode == "fwd":
                        fn = self.forward
                    else:
                        fn = lambda: torch.autograd.backward(self.forward(), grads)  # noqa: E731
                    flush()
                    t = measure(fn)
                if self.first_call_s is None:
                    self.first_call_s = t
                if i >= warmup:
                    out.append(t)
        return out


def _fresh_dynamo() -> None:
    """Forget every compiled graph before compiling a case: each case recompiles the same code (a new
    parametrized class per module), and from dynamo's recompile limit (8) on a fullgraph compile fails."""
    torch._dynamo.reset()


def _no_recompile(on: bool):
    """Make a dynamo recompile an error (a recompile while timing would time compilation, or an
    eager fallback after the recompile limit, under the torch_compile label)."""
    return torch._dynamo.config.patch(error_on_recompile=True) if on else contextlib.nullcontext()


def train_step_samples(provider, dtype, device, reps, warmup, compile_backend="inductor"):
    """One discriminator step of the SNGAN ResNet (CIFAR, batch 64 real + 64 fake in one forward, hinge
    loss, Adam)."""
    from models import SNGANDiscriminator, hinge_d_loss

    torch.manual_seed(0)
    with backend_context(provider):
        D = SNGANDiscriminator().to(device=device, dtype=dtype)
        wrap(provider, [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
        compiled = provider == "torch_compile"
        if compiled:
            _fresh_dynamo()
        model = torch.compile(D, fullgraph=True, backend=compile_backend) if compiled else D
        if provider.startswith("sn_kernels_grouped"):
            sn_kernels.group(D)
        opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9))
        batch = TRAIN_BATCH.get(device.type, 8)
        # real and fake in one forward, for every provider (as compile_time.py): D(real), D(fake), then one
        # backward fails under torch.compile with PyTorch's parametrization (torch 2.11: "modified by an
        # inplace operation")
        both = torch.randn(2 * batch, 3, 32, 32, device=device, dtype=dtype)
        measure, _ = timer(device)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(both)
            hinge_d_loss(out[:batch], out[batch:]).backward()
            opt.step()

        samples = []
        for i in range(warmup + reps):
            with _no_recompile(compiled and i >= warmup):
                samples.append(measure(step))
    return samples[warmup:]


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV written by main, numbers converted."""
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw", "copy_gbps", "weight_mb"):
                r[k] = float(r[k])
            rows.append(r)
    return rows


def start_csv(out: Path, resume: bool) -> list[dict]:
    """The rows already in ``out`` when resuming (the file rewritten under FIELDS if it was written with
    other columns, e.g. before sn_kernels/python existed: appended rows would not line up), else none
    and a new file with FIELDS' header."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (resume and out.is_file()):
        write_csv(out, [], FIELDS)
        return []
    rows = read_rows(out)
    with out.open() as f:
        header = next(csv.reader(f), [])
    if header != FIELDS:
        write_csv(out, rows, FIELDS)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma list (default: all that run here)")
    ap.add_argument("--sets", default=None, help="default sngan_cifar_d,biggan128_d,single on a GPU; without "
                    "single on the CPU, where its large weights alone take minutes per provider")
    ap.add_argument("--per-weight", default="", help="comma list of sets whose weights are timed one by one")
    ap.add_argument("--min-mb", type=float, default=0.0, help="per-weight cases: only weights of at least this size")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtypes", default=None, help="default float32,bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of torch_compile")
    ap.add_argument("--out", default=None, help="CSV path (default OUT_DIR/<device>.csv)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="folder of the default --out (default: benchmarks/results of this tree)")
    ap.add_argument("--resume", action="store_true", help="keep the CSV's rows and run only the cases it lacks")
    ap.add_argument("--report", default=None, metavar="CSV", help="only print the summary and plot of this CSV")
    args = ap.parse_args(argv)
    if args.report:
        rows = read_rows(Path(args.report))
        summary(rows)
        targets(rows)
        plot(rows, Path(args.report).with_suffix(".png"))
        return

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dev_name = device_name(device)
    shape_sets = find_shapes(args.shapes)
    args.dtypes = args.dtypes or ("float32,bfloat16" if on_gpu else "float32")
    args.sets = args.sets or ("sngan_cifar_d,biggan128_d,single" if on_gpu else "sngan_cifar_d,biggan128_d")
    backends = sn_kernels.available_backends(device)
    providers = (args.providers.split(",") if args.providers else
                 ["torch_hook", "torch_param"] + (["torch_compile"] if on_gpu else [])
                 + [f"sn_kernels_{b}" for b in backends if not (b == "triton" and not on_gpu)]
                 + ["sn_kernels_grouped"] + (["sn_kernels_grouped_triton"] if on_gpu and "triton" in backends else []))
    reps = args.reps or (100 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    measure, sync = timer(device)
    flush = l2_flush(device)
    # 256 MB on a GPU, 64 MB on the CPU; median of 8 after 2 warm-up copies
    copy_gbps = copy_bandwidth(device, ((256 << 20) if on_gpu else (64 << 20)) // 4, repeats=8, warmup=2, sync=sync)
    triton_ver = triton_version()
    provenance = dict(sn_kernels=f"{sn_kernels.__version__}+{git_commit(ROOT)}", python=platform.python_version())
    print(f"# device {dev_name}, torch {torch.__version__}, triton {triton_ver}, copy {copy_gbps:.1f} GB/s; "
          f"sn_kernels {provenance['sn_kernels']} from {ROOT}, python {provenance['python']}", flush=True)

    out = Path(args.out) if args.out else Path(args.out_dir) / (dev_name.replace(" ", "_").replace("/", "_") + ".csv")
    rows = start_csv(out, args.resume)
    done = {(r["provider"], r["shape_set"], r["mode"], r["dtype"]) for r in rows}

    def add(row):
        rows.append(row)
        with out.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
        gb = f"{row['gbps']:8.2f} GB/s ({row['frac_copy_bw'] * 100:3.0f}%)" if row["gbps"] == row["gbps"] else ""
        print(f"{row['shape_set']:28s} {row['dtype']:8s} {row['mode']:10s} {row['provider']:20s}"
              f" {row['median_ms']:10.3f} ms {gb} {row['note']}", flush=True)

    modes = args.modes.split(",")
    per_weight = set(filter(None, args.per_weight.split(",")))
    for case_name, entries in cases(shape_sets, args.sets.split(","), per_weight):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            size = torch.empty((), dtype=dtype).element_size()
            nbytes = sum(torch.Size(shape).numel() for shape, _ in entries) * size
            if "/" in case_name and nbytes < args.min_mb * 1e6:
                continue
            base = dict(shape_set=case_name, dtype=dtype_name, device=dev_name, copy_gbps=copy_gbps,
                        weight_mb=nbytes / 1e6, torch=torch.__version__, triton=triton_ver, **provenance)
            for provider in providers:
                todo = [m for m in modes if (provider, case_name, m, dtype_name) not in done
                        and (m != "train_step" or case_name == "sngan_cifar_d")]  # the SNGAN D's step
                if not todo:
                    continue
                case, build_note = None, ""
                if any(m != "train_step" for m in todo):
                    try:
                        case = Case(provider, entries, dtype, device, args.compile_backend)
                    except Exception as exc:  # a provider that cannot run this set is reported, not fatal
                        build_note = f"{type(exc).__name__}: {exc}"[:200]
                for mode in todo:
                    note = build_note
                    try:
                        if mode == "train_step":
                            samples = train_step_samples(provider, dtype, device, reps, warmup, args.compile_backend)
                            note = f"batch {TRAIN_BATCH.get(device.type, 8)}"
                        elif case is None:
                            raise RuntimeError(build_note)
                        else:
                            samples = case.samples(mode, reps, warmup, measure, sync, flush)
                            if case.compiled:
                                note = f"compiled, first call {case.first_call_s:.1f}s, no recompile while timing"
                    except Exception as exc:
                        samples, note = [float("nan")], f"{type(exc).__name__}: {exc}"[:200]
                    med = statistics.median(samples)
                    gbps = BYTES_MODEL[mode] * nbytes / med / 1e9
                    add(dict(provider=provider, mode=mode, median_ms=med * 1e3, p20_ms=percentile(samples, 0.2) * 1e3,
                             p80_ms=percentile(samples, 0.8) * 1e3, gbps=gbps, frac_copy_bw=gbps / copy_gbps,
                             reps=len(samples), note=note, **base))
                del case

    print(f"# wrote {out}")
    summary(rows)
    targets(rows)
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


def targets(rows):
    """Issue 14's targets (float32 fwd_bwd): single weights of 64 MB or more at 80 % of the copy
    bandwidth or better (per-weight cases), and biggan128_d at least 2.5x torch_param and faster
    than torch_compile; issue 13's on a GPU: sngan_cifar_d grouped at least 20x torch_param and
    faster than torch_compile."""
    fb = [r for r in rows if r["dtype"] == "float32" and r["mode"] == "fwd_bwd"]
    lines = []
    for r in fb:
        if "/" in r["shape_set"] and r["weight_mb"] >= 64 and r["provider"] in ("sn_kernels_native",
                                                                                  "sn_kernels_triton"):
            ok = r["frac_copy_bw"] >= 0.8
            lines.append(f"{'met ' if ok else 'MISS'} {r['shape_set']} {r['provider']}: "
                         f"{r['frac_copy_bw'] * 100:.0f}% of copy bandwidth (target 80%)")
    big = {r["provider"]: r["median_ms"] for r in fb if r["shape_set"] == "biggan128_d"}
    for p in ("sn_kernels_native", "sn_kernels_triton", "sn_kernels_grouped"):
        if p in big and "torch_param" in big:
            x = big["torch_param"] / big[p]
            c = big.get("torch_compile", float("nan"))
            ok = x >= 2.5 and big[p] < c
            lines.append(f"{'met ' if ok else 'MISS'} biggan128_d {p}: {x:.2f}x torch_param (target 2.5x), "
                         f"{big[p]:.3f} ms vs torch_compile {c:.3f} ms")
    small = {r["provider"]: r["median_ms"] for r in fb if r["shape_set"] == "sngan_cifar_d"}
    for p in ("sn_kernels_grouped", "sn_kernels_grouped_triton"):  # issue 13, on a GPU
        if p in small and "torch_param" in small and "torch_compile" in small:
            x = small["torch_param"] / small[p]
            ok = x >= 20 and small[p] < small["torch_compile"]
            lines.append(f"{'met ' if ok else 'MISS'} sngan_cifar_d {p}: {x:.1f}x torch_param (target 20x), "
                         f"{small[p]:.3f} ms vs torch_compile {small['torch_compile']:.3f} ms")
    if lines:
        print("\n# targets (float32 fwd_bwd)")
        print("\n".join(lines))


def plot(rows, path):
    plt = pyplot()
    if plt is None:
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
