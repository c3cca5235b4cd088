"""One-call check of a backend ("triton" by default, or "native") on the lent GPU; prints a short table last.

    python benchmarks/gpu_check.py --backend triton --out DIR      # on the GPU machine
    python benchmarks/gpu_check.py --smoke --backend triton         # the CPU dress rehearsal (CI)

Steps: (1) optionally the test suite (--pytest; output streamed to DIR/pytest_<backend>.log),
(2) large shapes against the torch backend, (3) bit-for-bit determinism over two runs, (4) CUDA-graph
capture + replay of a forward + backward and of a whole SNGAN discriminator training step against
the same steps run eagerly (independent optimizer states), (5) float16/bfloat16 autocast, (6)
torch.compile(fullgraph=True) of a small SN discriminator against eager, (7) sn_kernels.group of the
SNGAN-CIFAR weights against per-module, with the CUDA kernels it launches (profiler), (8) a few
timings (CUDA events).  Each step is independent: one failing does not hide the others.  Every row is written to
DIR/gpu_check_<device>_<backend>.csv as soon as it is known.

--smoke runs the same path on the CPU with tiny shapes (the triton backend under
TRITON_INTERPRET=1): CUDA-graph capture becomes a stand-in that re-runs the step eagerly, autocast
runs on the CPU in bfloat16, and the timings are skipped; harness bugs then fail CI, not a GPU run.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import sn_kernels  # noqa: E402
from _common import triton_version  # noqa: E402
from sn_kernels.functional import spectral_normalize  # noqa: E402
from sn_kernels.testing import TOL  # noqa: E402  (the one tolerance table: dtype -> (rtol, atol))

LARGE = [(1, 7), (257, 1023), (1536, 13824), (4096, 4096), (13824, 1536), (3, 100000), (100000, 3)]
SMOKE = [(1, 7), (33, 17), (40, 90)]

ROWS: list[dict] = []
CSV_PATH: Path | None = None  # set by main; every row is appended as soon as it is recorded
FIELDS = ["step", "case", "ok", "detail"]


def record(step: str, case: str, ok: bool, detail: str = "") -> None:
    row = {"step": step, "case": case, "ok": "PASS" if ok else "FAIL", "detail": detail}
    ROWS.append(row)
    print(f"[{row['ok']}] {step} {case} {detail}", flush=True)
    if CSV_PATH is not None:
        with open(CSV_PATH, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row)


def guarded(step):
    """Run a step; a crash becomes one FAIL row instead of ending the script."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                fn(*a, **k)
            except Exception as exc:
                record(step, "crash", False, f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            print(f"    ({fn.__name__}: {time.time() - t0:.1f}s)", flush=True)
        return run
    return wrap


def _inputs(shape, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(shape[0], generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(w[0].numel(), generator=g, dtype=torch.float64), dim=0)
    return w.to(dev, dtype), u.to(dev, dtype), v.to(dev, dtype)


def _step(backend, w, u, v, g, training=True, n_iter=1):
    ww = w.clone().requires_grad_(True)
    out, sigma = spectral_normalize(ww, u, v, n_power_iterations=n_iter, training=training, backend=backend)
    out.backward(g)
    return out.detach(), sigma, u, v, ww.grad


@guarded("pytest")
def run_pytest(out: Path, backend: str, workers: int, timeout: float):
    """The whole suite with a GPU visible, its output streamed to out/pytest_<backend>.log (a timeout
    keeps what ran).  The backend test files put their tensors on the GPU when one is visible."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("SN_KERNELS_BACKEND", None)
    log = out / f"pytest_{backend}.log"
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--durations=25"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    tail = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or "error" in ln),
                lines[-1] if lines else "")
    record("pytest", "whole suite, GPU visible", rc == 0, f"{tail} [{time.time() - t0:.0f}s, rc={rc}, {log}]")


@guarded("vs-torch")
def check_against_torch(backend, dev, shapes, dtypes):
    for dtype in dtypes:
        for shape in shapes:
            for order in ("vu", "uv"):
                w, u, v = _inputs(shape, dtype, dev)
                g = torch.randn_like(w)
                a = _stepo(backend, w, u.clone(), v.clone(), g, order)
                b = _stepo("torch", w, u.clone(), v.clone(), g, order)
                rtol, atol = TOL[dtype]
                worst = 0.0
                ok = True
                for x, y, scale in zip(a, b, (1, 1, 1, 1, 4)):  # gradients: a difference of O(1) terms
                    ok &= bool(torch.allclose(x.double(), y.double(), rtol=rtol * scale, atol=atol * scale))
                    worst = max(worst, ((x.double() - y.double()).abs().max() / y.double().abs().max()
                                         .clamp_min(1e-300)).item())
                record("vs-torch", f"{tuple(shape)} {str(dtype)[6:]} {order}", ok, f"max rel dev {worst:.1e}")


def _stepo(backend, w, u, v, g, order):
    ww = w.clone().requires_grad_(True)
    out, sigma = spectral_normalize(ww, u, v, order=order, backend=backend)
    out.backward(g)
    return out.detach(), sigma, u, v, ww.grad


@guarded("determinism")
def check_determinism(backend, dev, shapes):
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            w, u, v = _inputs(shape, dtype, dev)
            g = torch.randn_like(w)
            runs = [_step(backend, w, u.clone(), v.clone(), g, n_iter=2) for _ in range(2)]
            ok = all(torch.equal(x, y) for x, y in zip(*runs))
            record("determinism", f"{tuple(shape)} {str(dtype)[6:]}", ok, "bit-identical" if ok else "differs")


class Replay:
    """CUDA-graph capture of ``fn`` (nothing runs at capture) and ``replay()``; read ``out`` after a
    replay.  On the CPU (the dress rehearsal) a stand-in: capture does nothing, a replay runs ``fn``
    eagerly, so the comparisons around it run unchanged."""

    def __init__(self, fn, dev):
        self.fn, self.out, self.graph = fn, None, None
        if dev.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()

    def replay(self):
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()


def _warm_up(fn, dev, n):
    """``n`` calls of ``fn`` (on a side stream on a GPU, as capture wants)."""
    if dev.type != "cuda":
        for _ in range(n):
            fn()
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@guarded("cuda-graph")
def check_cuda_graph(backend, dev, shape):
    w, u0, v0 = _inputs(shape, torch.float32, dev)
    g = torch.randn_like(w)
    weight = w.clone().requires_grad_(True)
    u, v = u0.clone(), v0.clone()

    def fwd_bwd():
        weight.grad = None  # the captured backward assigns the gradient; a replay rewrites it
        out, sigma = spectral_normalize(weight, u, v, backend=backend)
        out.backward(g)
        return out, sigma

    _warm_up(fwd_bwd, dev, 2)  # compiles the kernels
    graph = Replay(fwd_bwd, dev)
    u.copy_(u0)
    v.copy_(v0)
    graph.replay()
    graph.replay()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out_g, sigma_g = graph.out
    got = (out_g.detach().clone(), sigma_g.clone(), u.clone(), v.clone(), weight.grad.clone())
    uu, vv = u0.clone(), v0.clone()
    _step(backend, w, uu, vv, g)
    ref = _step(backend, w, uu, vv, g)  # two eager steps, as two replays
    ok = all(torch.equal(a, b) for a, b in zip(got, ref))
    what = "CUDA graph" if dev.type == "cuda" else "stand-in (CPU)"
    record("cuda-graph", f"fwd+bwd {shape[0]}x{shape[1]} fp32, 2 replays, {what}", ok,
           "equal to eager" if ok else "differs from eager")


def _storages(opt) -> set[int]:
    return {t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}


@guarded("cuda-graph")
def check_train_step_graph(backend, dev, ch, batch, size, small=False):
    """A whole discriminator training step (forward x2, hinge loss, backward, Adam) captured in one
    CUDA graph and replayed, against the same steps run eagerly on an independent copy (model and
    optimizer state deep-copied before the capture).  The SNGAN ResNet discriminator; ``small``
    (the dress rehearsal): a 3-layer one, as every launch costs about 50 ms under the interpreter."""
    from models import SNGANDiscriminator, hinge_d_loss

    cuda = dev.type == "cuda"
    name = "3-layer D" if small else "SNGAN D"
    with sn_kernels.use_backend(backend):
        torch.manual_seed(0)
        D = (_plain_discriminator(ch, size) if small else SNGANDiscriminator(ch=ch)).to(dev)
        sn_kernels.apply_spectral_norm(D)  # the hook API, on the weights already on dev
        opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=cuda)
        real, fake = torch.randn(batch, 3, size, size, device=dev), torch.randn(batch, 3, size, size, device=dev)

        def step(model, optim):
            optim.zero_grad(set_to_none=False)
            loss = hinge_d_loss(model(real), model(fake))
            loss.backward()
            optim.step()
            return loss

        _warm_up(lambda: step(D, opt), dev, 1 if small else 3)  # also creates the Adam state
        twin = copy.deepcopy(D)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=cuda)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: load_state_dict keeps the tensors
        shared = _storages(opt) & _storages(twin_opt)
        record("cuda-graph", "train step: independent Adam states", not shared,
               f"{len(shared)} shared state tensors" if shared else "no shared state tensor")
        graph = Replay(lambda: step(D, opt), dev)
        # the capture ran nothing; in case it touched state anyway, restart both from the snapshot, in place
        with torch.no_grad():
            for a, b in zip(D.state_dict().values(), twin.state_dict().values()):
                a.copy_(b)
            for p, q in zip(D.parameters(), twin.parameters()):
                for k, t in opt.state[p].items():
                    if torch.is_tensor(t):
                        t.copy_(twin_opt.state[q][k])
        losses = []
        for _ in range(2 if small else 3):
            graph.replay()
            eager_loss = step(twin, twin_opt)
            losses.append((graph.out.item(), eager_loss.item()))
    if cuda:
        torch.cuda.synchronize()
    dev_max = max((a.float() - b.float()).abs().max().item()
                  for a, b in zip(D.state_dict().values(), twin.state_dict().values()))
    loss_dev = max(abs(a - b) for a, b in losses)
    ok = dev_max < 1e-4 and loss_dev < 1e-4
    what = "CUDA graph" if cuda else "stand-in (CPU)"
    record("cuda-graph", f"{name} train step ({backend}, {what}), {len(losses)} replays vs eager", ok,
           f"max |state diff| {dev_max:.1e}, max |loss diff| {loss_dev:.1e}")


@guarded("autocast")
def check_autocast(backend, dev, ch):
    """float16 and bfloat16 autocast (bfloat16 on the CPU) of a small SN discriminator: finite, close
    to float32."""
    with sn_kernels.use_backend(backend):
        torch.manual_seed(0)
        model = _discriminator(dev, ch)
        ref = copy.deepcopy(model)
        x = torch.randn(8, 3, 16, 16, device=dev)
        y_ref = ref(x)
        for dtype in (torch.float16, torch.bfloat16) if dev.type == "cuda" else (torch.bfloat16,):
            m = copy.deepcopy(model)
            with torch.autocast(dev.type, dtype=dtype):
                y = m(x)
            y.float().sum().backward()
            finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(p.grad).all()) for p in m.parameters())
            err = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
            record("autocast", f"{dtype} ({backend}, {dev.type})", finite and err < 5e-2, f"rel err {err:.1e}")


def _plain_discriminator(ch, size):
    """Two convolutions and a linear layer for ``size`` x ``size`` inputs, no SN applied."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, ch, 3, padding=1), torch.nn.LeakyReLU(0.1),
        torch.nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.1),
        torch.nn.Flatten(), torch.nn.Linear(2 * ch * (size // 2) ** 2, 1))


def _discriminator(dev, ch=32):
    """A small SN discriminator for 16x16 inputs, built on ``dev`` and then wrapped (wrapping runs
    the backend on the weights, which must already be on ``dev``)."""
    from sn_kernels.parametrizations import spectral_norm as sn

    model = _plain_discriminator(ch, 16).to(dev)
    for i in (0, 2, 5):
        sn(model[i])
    return model


@guarded("torch.compile")
def check_compile(backend, dev, compile_backend, ch, steps):
    torch.manual_seed(0)
    torch._dynamo.reset()
    with sn_kernels.use_backend(backend):
        eager = _discriminator(dev, ch)
        compiled_model = copy.deepcopy(eager)
        cfn = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
        x = torch.randn(8, 3, 16, 16, device=dev)
        for _ in range(steps):
            ye = eager(x)
            ye.sum().backward()
            yc = cfn(x)
            yc.sum().backward()
    ok = torch.allclose(ye, yc, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        ok &= bool(torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5))
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        ok &= bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))  # u, v updated in place by both
    record("torch.compile", f"fullgraph SN discriminator ({compile_backend}), {steps} steps", ok,
           f"max |dy| {(ye - yc).abs().max().item():.1e}")


class _Weights(torch.nn.ModuleList):
    """Modules whose forward is their spectrally normalized weight: the SN work alone."""

    def forward(self):
        return [m.weight for m in self]


def _weights_model(dev, shapes):
    from sn_kernels.parametrizations import spectral_norm as sn

    model = _Weights()
    for shape in shapes:
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(torch.randn(shape, device=dev) / (torch.Size(shape).numel() / shape[0]) ** 0.5)
        sn(m)
        model.append(m)
    return model


def _cuda_kernels(fn) -> int:
    """The CUDA kernels ``fn`` launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


@guarded("grouped")
def check_grouped(backend, dev, shapes, steps):
    """sn_kernels.group (every weight of the SNGAN-CIFAR discriminator) against the per-module path on
    the same backend, training steps then eval; on CUDA the kernels one grouped forward + backward
    launches (the multi-tensor kernels of the triton and native backends: 3 + 2 for one group)."""
    torch.manual_seed(0)
    with sn_kernels.use_backend(backend):
        per_module = _weights_model(dev, shapes)
        grouped = copy.deepcopy(per_module)
        sn_kernels.group(grouped)
        grads = [torch.randn(s, device=dev) for s in shapes]
        worst = 0.0
        for training in [True] * steps + [False]:
            per_module.train(training), grouped.train(training)
            outs, refs = grouped(), per_module()
            torch.autograd.backward(outs, grads)
            torch.autograd.backward(refs, grads)
            worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(outs, refs)])
        tensors = lambda m: [p.grad for p in m.parameters()] + list(m.buffers())  # noqa: E731
        ok = worst < 1e-5 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                                  for a, b in zip(tensors(grouped), tensors(per_module)))
        record("grouped", f"group() vs per-module, {len(shapes)} weights, {steps} steps + eval", ok,
               f"max |dW_sn| {worst:.1e}")
        if dev.type != "cuda":
            return
        grouped.train(), per_module.train()

        def step(model):
            return lambda: torch.autograd.backward(model(), grads)

        for model in (grouped, per_module):
            step(model)()  # warm: address tables, autotuning, allocator
        n_grouped, n_per_module = _cuda_kernels(step(grouped)), _cuda_kernels(step(per_module))
        # 3 forward + 2 backward launches; native's functional op adds one _foreach_copy_ of u, v into the buffers
        ok = n_grouped <= {"triton": 5, "native": 6}.get(backend, n_grouped)
        record("grouped", f"CUDA kernels per fwd+bwd, {len(shapes)} weights", ok,
               f"grouped {n_grouped}, per-module {n_per_module}")


@guarded("timing")
def timings(backends, dev, shapes):
    if dev.type != "cuda":
        record("timing", "skipped", True, "no CUDA device")
        return
    for shape in shapes:
        for backend in backends:
            w, u, v = _inputs(shape, torch.float32, dev)
            g = torch.randn_like(w)
            weight = w.clone().requires_grad_(True)

            def once():
                out, _ = spectral_normalize(weight, u, v, backend=backend)
                out.backward(g)

            for _ in range(3):
                once()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                once()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            gbs = 8 * w.numel() * 4 / ms / 1e6  # 4|W| forward + 4|W| backward
            record("timing", f"{tuple(shape)} fp32 fwd+bwd {backend}", True, f"{ms * 1e3:.1f} us, {gbs:.0f} GB/s eff")


# the SN weights of the SNGAN-CIFAR discriminator (shapes.json: sngan_cifar_d)
SNGAN_SHAPES = [(128, 3, 3, 3), (128, 128, 3, 3), (128, 3, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3),
                (128, 128, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (1, 128)]


def main(argv=None) -> int:
    global CSV_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the CPU dress rehearsal: tiny shapes, CPU stand-ins")
    ap.add_argument("--backend", default=None, help="default: triton (torch with --smoke)")
    ap.add_argument("--pytest", action="store_true", help="also run the test suite (streamed to a log)")
    ap.add_argument("--no-pytest", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for --pytest")
    ap.add_argument("--pytest-timeout", type=float, default=420)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    backend = args.backend or ("torch" if args.smoke else "triton")
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    header = f"device {name}; torch {torch.__version__}; triton {triton_version()}; backend {backend}"
    print(header, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("smoke" if args.smoke else name.replace(" ", "_").replace("/", "_")) + f"_{backend}"
    CSV_PATH = out / f"gpu_check_{tag}.csv"
    with open(CSV_PATH, "w", newline="") as f:
        f.write(f"# {header}\n")
        csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    t0 = time.time()
    if args.pytest and not args.smoke:
        run_pytest(out, backend, args.workers, args.pytest_timeout)
    small = args.smoke
    check_against_torch(backend, dev, SMOKE if small else LARGE,
                        [torch.float32] if small else [torch.float32, torch.float16, torch.bfloat16, torch.float64])
    check_determinism(backend, dev, SMOKE if small else [(1536, 13824), (8192, 8192), (100000, 3)])
    check_cuda_graph(backend, dev, (24, 40) if small else (1536, 4608))
    if small:
        check_train_step_graph(backend, dev, ch=8, batch=2, size=8, small=True)
    else:
        check_train_step_graph(backend, dev, ch=64, batch=16, size=32)
    check_autocast(backend, dev, 8 if small else 32)
    check_compile(backend, dev, "aot_eager" if small else "inductor", 8 if small else 32, 2 if small else 3)
    check_grouped(backend, dev, [(8, 3, 3, 3), (8, 8, 3, 3), (1, 8)] if small else SNGAN_SHAPES, 2)
    timings([backend, "torch"] if backend != "torch" else ["torch"], dev,
            [(256, 1152), (1536, 13824), (8192, 8192)])

    print(f"\n{header}\nwrote {CSV_PATH} ({time.time() - t0:.0f}s)\n")
    width = max(len(r["step"]) + len(r["case"]) for r in ROWS) + 3
    for r in ROWS:
        print(f"{r['ok']:4s}  {(r['step'] + ': ' + r['case']).ljust(width)} {r['detail']}")
    failed = sum(r["ok"] != "PASS" for r in ROWS)
    print(f"\n{len(ROWS) - failed}/{len(ROWS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
