"""One-call check of a backend ("triton" by default, or "native") on the lent GPU; prints a short table last.

    python benchmarks/gpu_check.py            # on the GPU machine (writes CSV under $OUT)
    python benchmarks/gpu_check.py --smoke    # anywhere: CPU, "torch" backend, no pytest

Steps: (1) the test suite with SN_KERNELS_BACKEND=triton, (2) large shapes against
the torch backend, (3) bit-for-bit determinism over two runs, (4) CUDA-graph
capture + replay of a forward + backward and of a whole SNGAN discriminator training
step, (5) float16/bfloat16 autocast, (6) torch.compile(fullgraph=True) of a small SN
discriminator against eager, (7) a few timings (CUDA events).
Each step is independent: one failing does not hide the others.
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

import torch  # noqa: E402

import sn_kernels  # noqa: E402
from sn_kernels.functional import spectral_normalize  # noqa: E402

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (1e-2, 1e-3),
       torch.bfloat16: (2e-2, 1e-2)}
LARGE = [(1, 7), (257, 1023), (1536, 13824), (4096, 4096), (13824, 1536), (3, 100000), (100000, 3)]
SMOKE = [(1, 7), (33, 17), (257, 1023)]

ROWS: list[dict] = []


def record(step: str, case: str, ok: bool, detail: str = "") -> None:
    ROWS.append({"step": step, "case": case, "ok": "PASS" if ok else "FAIL", "detail": detail})
    print(f"[{'PASS' if ok else 'FAIL'}] {step} {case} {detail}", flush=True)


def guarded(step):
    """Run a step; a crash becomes one FAIL row instead of ending the script."""
    def wrap(fn):
        def run(*a, **k):
            try:
                fn(*a, **k)
            except Exception as exc:
                record(step, "crash", False, f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
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
def run_pytest(backend):
    # the backend test files (test_triton.py, test_native.py) put their tensors on the GPU
    # when one is visible; the rest of the suite runs as in CI
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("SN_KERNELS_BACKEND", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    record("pytest", "whole suite, GPU visible", proc.returncode == 0, f"{tail} [{time.time() - t0:.0f}s]")


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


@guarded("cuda-graph")
def check_cuda_graph(backend, dev):
    if dev.type != "cuda":
        record("cuda-graph", "skipped", True, "no CUDA device")
        return
    w, u0, v0 = _inputs((1536, 4608), torch.float32, dev)
    g = torch.randn_like(w)
    weight = w.clone().requires_grad_(True)
    u, v = u0.clone(), v0.clone()

    def fwd_bwd():
        weight.grad = None
        out, sigma = spectral_normalize(weight, u, v, backend=backend)
        out.backward(g)
        return out, sigma

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles the kernels, allocates the ticket counter
        for _ in range(2):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    weight.grad = None
    with torch.cuda.graph(graph):
        out_g, sigma_g = spectral_normalize(weight, u, v, backend=backend)
        out_g.backward(g)
    u.copy_(u0)
    v.copy_(v0)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    got = (out_g.detach().clone(), sigma_g.clone(), u.clone(), v.clone(), weight.grad.clone())
    uu, vv = u0.clone(), v0.clone()
    _step(backend, w, uu, vv, g)
    ref = _step(backend, w, uu, vv, g)  # two eager steps, as two replays
    ok = all(torch.equal(a, b) for a, b in zip(got, ref))
    record("cuda-graph", "fwd+bwd 1536x4608 fp32, 2 replays", ok, "equal to eager" if ok else "differs from eager")


@guarded("cuda-graph")
def check_train_step_graph(backend, dev):
    """A whole SNGAN discriminator training step (forward x2, hinge loss, backward, Adam)
    captured in one CUDA graph and replayed, against the same steps run eagerly."""
    if dev.type != "cuda":
        record("cuda-graph", "train step skipped", True, "no CUDA device")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import SNGANDiscriminator, hinge_d_loss

    with sn_kernels.use_backend(backend):
        torch.manual_seed(0)
        D = SNGANDiscriminator(ch=64).to(dev)
        sn_kernels.apply_spectral_norm(D)
        opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=True)
        real, fake = torch.randn(16, 3, 32, 32, device=dev), torch.randn(16, 3, 32, 32, device=dev)

        def step():
            opt.zero_grad(set_to_none=False)
            loss = hinge_d_loss(D(real), D(fake))
            loss.backward()
            opt.step()
            return loss

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        twin = copy.deepcopy(D)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=True)
        twin_opt.load_state_dict(opt.state_dict())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()
        # capture does not run the step: replay from the snapshot, compare with eager steps on the twin
        with torch.no_grad():
            for a, b in zip(D.state_dict().values(), twin.state_dict().values()):
                a.copy_(b)
        opt.load_state_dict(twin_opt.state_dict())
        losses = []
        for _ in range(3):
            graph.replay()
            losses.append(static_loss.item())
            twin_opt.zero_grad(set_to_none=False)
            eager_loss = hinge_d_loss(twin(real), twin(fake))
            eager_loss.backward()
            twin_opt.step()
            losses.append(eager_loss.item())
    torch.cuda.synchronize()
    dev_max = max((a.float() - b.float()).abs().max().item()
                  for a, b in zip(D.state_dict().values(), twin.state_dict().values()))
    ok = dev_max < 1e-4
    record("cuda-graph", f"SNGAN D train step ({backend}), 3 replays vs eager", ok, f"max |state diff| {dev_max:.1e}")


@guarded("autocast")
def check_autocast(backend, dev):
    """float16 and bfloat16 autocast of a small SN discriminator: finite, close to float32."""
    if dev.type != "cuda":
        record("autocast", "skipped", True, "no CUDA device")
        return
    with sn_kernels.use_backend(backend):
        torch.manual_seed(0)
        model = _discriminator().to(dev)
        ref = copy.deepcopy(model)
        x = torch.randn(8, 3, 16, 16, device=dev)
        y_ref = ref(x)
        for dtype in (torch.float16, torch.bfloat16):
            m = copy.deepcopy(model)
            with torch.autocast("cuda", dtype=dtype):
                y = m(x)
            y.float().sum().backward()
            finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(p.grad).all()) for p in m.parameters())
            err = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
            record("autocast", f"{dtype} ({backend})", finite and err < 5e-2, f"rel err {err:.1e}")


def _discriminator():
    from sn_kernels.parametrizations import spectral_norm as sn

    return torch.nn.Sequential(
        sn(torch.nn.Conv2d(3, 32, 3, padding=1)), torch.nn.LeakyReLU(0.1),
        sn(torch.nn.Conv2d(32, 64, 4, stride=2, padding=1)), torch.nn.LeakyReLU(0.1),
        torch.nn.Flatten(), sn(torch.nn.Linear(64 * 8 * 8, 1)))


@guarded("torch.compile")
def check_compile(backend, dev, compile_backend):
    torch.manual_seed(0)
    with sn_kernels.use_backend(backend):
        eager = _discriminator().to(dev)
        compiled_model = copy.deepcopy(eager)
        cfn = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
        x = torch.randn(8, 3, 16, 16, device=dev)
        for step in range(3):
            ye = eager(x)
            ye.sum().backward()
            yc = cfn(x)
            yc.sum().backward()
    ok = torch.allclose(ye, yc, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        ok &= bool(torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5))
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        ok &= bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))  # u, v updated in place by both
    record("torch.compile", f"fullgraph SN discriminator ({compile_backend}), 3 steps", ok,
           f"max |dy| {(ye - yc).abs().max().item():.1e}")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU + torch backend, no pytest: checks the script itself")
    ap.add_argument("--backend", default=None, help="default: triton (torch with --smoke)")
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    backend = args.backend or ("torch" if args.smoke else "triton")
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    header = f"device {name}; torch {torch.__version__}; triton {triton_version}; backend {backend}"
    print(header, flush=True)

    if not (args.smoke or args.no_pytest):
        run_pytest(backend)
    check_against_torch(backend, dev, SMOKE if args.smoke else LARGE,
                        [torch.float32] if args.smoke else [torch.float32, torch.float16, torch.bfloat16,
                                                            torch.float64])
    check_determinism(backend, dev, SMOKE if args.smoke else [(1536, 13824), (8192, 8192), (100000, 3)])
    check_cuda_graph(backend, dev)
    check_train_step_graph(backend, dev)
    check_autocast(backend, dev)
    check_compile(backend, dev, "aot_eager" if args.smoke else "inductor")
    timings([backend, "torch"] if backend != "torch" else ["torch"], dev,
            [(256, 1152), (1536, 13824), (8192, 8192)])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else name.replace(" ", "_")
    path = out / f"gpu_check_{tag}.csv"
    with open(path, "w", newline="") as f:
        f.write(f"# {header}\n")
        wr = csv.DictWriter(f, fieldnames=["step", "case", "ok", "detail"])
        wr.writeheader()
        wr.writerows(ROWS)
    print(f"\n{header}\nwrote {path}\n")
    width = max(len(r["step"]) + len(r["case"]) for r in ROWS) + 3
    for r in ROWS:
        print(f"{r['ok']:4s}  {(r['step'] + ': ' + r['case']).ljust(width)} {r['detail']}")
    failed = sum(r["ok"] != "PASS" for r in ROWS)
    print(f"\n{len(ROWS) - failed}/{len(ROWS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
