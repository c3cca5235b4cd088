"""The "triton" backend against the "torch" backend and the float64 references.

On a machine without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1
(conftest.py sets it): shapes stay small.  With a GPU the same tests run on CUDA.
"""
from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

import sn_kernels
from sn_kernels import dispatch
from sn_kernels.functional import spectral_normalize

from helpers import assert_close, sample_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def _tb():
    import sn_kernels.backends.triton as tb
    return tb


def _inputs(shape, dim, dtype, seed=0, converged=False):
    """helpers.sample_inputs on DEV; ``converged``: 5 "uv" warm-up steps (well-conditioned eval sigma)."""
    return sample_inputs(DEV, dtype, shape, dim, seed=seed, warmup=5 if converged else 0, warmup_order="uv")


def test_why_not():
    tb = _tb()
    assert tb.why_not(torch.device("cpu"), auto=True) is not None  # auto never picks the interpreter
    assert dispatch.why_not("triton", "cpu", auto=True) is not None
    if DEV.type == "cpu":
        assert tb.why_not(torch.device("cpu")) is None
        assert "triton" not in [b for b in dispatch.BACKENDS if dispatch.why_not(b, "cpu", auto=True) is None]
    else:
        assert tb.why_not(DEV) is None and tb.why_not(DEV, auto=True) is None
    assert tb.why_not(torch.device("meta")) is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deterministic(training):
    w, u, v = _inputs((64, 48), 0, torch.float32)
    g = torch.randn_like(w)
    results = []
    for _ in range(2):
        ww = w.clone().requires_grad_(True)
        uu, vv = u.clone(), v.clone()
        out, sigma = spectral_normalize(ww, uu, vv, n_power_iterations=2, training=training, backend="triton")
        out.backward(g)
        results.append((out, sigma, uu, vv, ww.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


class _Count:
    """Counts kernel launches by wrapping the kernels that host.py looks up at call time."""

    def __init__(self, kernels):
        self.kernels, self.n, self.saved = kernels, 0, {}

    def __enter__(self):
        for name in ("row_pass_kernel", "col_pass_kernel", "eval_pass_kernel", "divide_kernel",
                     "dot_pass_kernel", "grad_pass_kernel"):
            fn = getattr(self.kernels, name)
            self.saved[name] = fn
            count = self

            class Proxy:
                def __getitem__(self, grid, fn=fn):
                    count.n += 1
                    return fn[grid]

            setattr(self.kernels, name, Proxy())
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.kernels, name, fn)


@pytest.mark.parametrize("shape", [(13, 29), (200, 3), (3, 200), (70, 90)], ids=str)
def test_launch_budget(shape):
    from sn_kernels.backends.triton import kernels

    w, u, v = _inputs(shape, 0, torch.float32)
    with _Count(kernels) as c:
        spectral_normalize(w, u, v, training=True, backend="triton")
    assert c.n == 3  # pass 1 mat-vec, pass 2 mat-vec + normalization, pass 3 division
    with _Count(kernels) as c:
        spectral_normalize(w, u, v, training=False, backend="triton")
    assert c.n == 2
    with _Count(kernels) as c:
        spectral_normalize(w, u, v, n_power_iterations=3, training=True, backend="triton")
    assert c.n == 7
    ww = w.clone().requires_grad_(True)
    out, _ = spectral_normalize(ww, u, v, backend="triton")
    with _Count(kernels) as c:
        out.backward(torch.ones_like(out))
    assert c.n == 2


def _hook_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.ConvTranspose2d(6, 4, 2),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 7))


@pytest.mark.parametrize("front", ["hooks", "parametrizations"])
def test_front_ends_match_torch_backend(front):
    wrap = sn_kernels.spectral_norm if front == "hooks" else sn_kernels.parametrizations.spectral_norm
    x = torch.randn(2, 3, 6, 6, device=DEV)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        with sn_kernels.use_backend(backend):
            model = _hook_model().to(DEV)
            for mod in model:
                if hasattr(mod, "weight"):
                    wrap(mod)
            for _ in range(2):
                model.train()
                y = model(x)
                y.square().sum().backward()
            model.eval()
            y_eval = model(x)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results.append((y, y_eval, list(model.state_dict().values()), grads))
    (y, ye, sd, gr), (y_t, ye_t, sd_t, gr_t) = results
    assert_close(y, y_t)
    assert_close(ye, ye_t)
    assert len(sd) == len(sd_t) and len(gr) == len(gr_t) > 0
    for a, b in zip(sd, sd_t):
        assert_close(a, b)
    for a, b in zip(gr, gr_t):
        assert_close(a, b, scale=10)  # gradients of a 3-layer net: rounding adds up through the layers


def test_tile_table_covers_classes():
    from sn_kernels.backends.triton import host

    assert {host.shape_class(m, n) for m, n in [(4, 4), (8, 4096), (4096, 8), (512, 512)]} == set(host.TILES)
    # a "large" matrix runs under the interpreter too (several programs per pass: the ticket logic)
    w, u, v = _inputs((70, 90), 0, torch.float32)
    assert host.shape_class(70, 90) == "large"
    u2, v2 = u.clone(), v.clone()
    out, s = spectral_normalize(w, u, v, n_power_iterations=2, backend="triton")
    out_t, s_t = spectral_normalize(w, u2, v2, n_power_iterations=2, backend="torch")
    assert_close(out, out_t)
    assert_close(u, u2)
    assert_close(v, v2)


# Shapes whose passes split the reduced dimension (host.splits): the wide row pass, the tall
# column pass and the column pass of a matrix with few column tiles; with a dim=1 layout too.
TWO_STAGE = [((3, 5000), 0), ((5000, 3), 0), ((300, 300), 0), ((20, 40, 8, 8), 1)]


def test_split_plans():
    from sn_kernels.backends.triton import host

    for (shape, dim), passes in zip(TWO_STAGE, [("row",), ("col",), ("col",), ("row",)]):
        m = shape[dim]
        pl = host.plan(m, torch.Size(shape).numel() // m)
        for name in passes:
            tiles, n_split, length, (bm, bn, _) = pl[name]
            assert n_split > 1 and pl["counters"] >= 1 + tiles, (shape, name, pl)
            k = torch.Size(shape).numel() // m if name == "row" else m
            assert length % (bn if name == "row" else bm) == 0 and (n_split - 1) * length < k <= n_split * length
    # enough programs already: one stage; the split depends on the shape only
    assert host.splits(host.TARGET_PROGRAMS, 10**6, 64) == (1, 10**6)
    assert host.splits(4, 4096, 64) == host.splits(4, 4096, 64)
    n, chunk = host.dot_grid(10**7)
    assert n <= host.MAX_DOT_PROGRAMS and chunk % host.ELEM_BLOCK == 0 and (n - 1) * chunk < 10**7 <= n * chunk


def test_ranges_never_wrap_int32():
    """The kernels index with int32 and each program forms the end of its range (lo + chunk or split
    length) before clamping it: for every weight the backends accept, the largest end stays below 2^31
    (46341 x 46340 weights wrapped: the last program summed nothing).  Host arithmetic only."""
    from sn_kernels.backends.triton import group_host, host

    limit = 2**31
    top = host.MAX_INDEX
    for m, n in ((1, top), (top, 1), (46340, top // 46340), (top // 46340, 46340), (8176, top // 8176)):
        numel = m * n
        assert numel <= top
        programs, chunk = host.dot_grid(numel)
        assert programs * chunk < limit
        assert triton_cdiv(numel, host.ELEM_BLOCK) * host.ELEM_BLOCK < limit
        pl = host.plan(m, n)
        for name in ("row", "col"):
            _, n_split, length, _ = pl[name]
            assert n_split * length < limit, (m, n, name)
        for k, block, width in ((n, group_host.ROW_TILE[1], group_host.ROW_TILE[0]),
                                (m, group_host.COL_TILE[0], group_host.COL_TILE[1])):
            splits, length = group_host._splits(k, block, width)
            assert splits * length < limit
        assert triton_cdiv(numel, group_host.CHUNK) * group_host.CHUNK < limit
    with pytest.raises(ValueError, match="int32"):  # one element more: refused (a meta tensor: no memory)
        host._geometry(torch.empty(top + 1, device="meta").view(1, -1), 0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("shape,dim", TWO_STAGE, ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
def test_two_stage_passes_match_torch_backend(shape, dim, order):
    """Split reductions (tickets per tile, fixed-order sums of the splits) against the torch backend,
    training with two iterations (first and later passes) and eval, and bit-identical on a rerun."""
    w, u, v = _inputs(shape, dim, torch.float32, converged=True)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEV, torch.float32)
    for training in (True, False):
        runs = []
        for backend in ("triton", "triton", "torch"):
            ww, uu, vv = w.clone().requires_grad_(True), u.clone(), v.clone()
            out, sigma = spectral_normalize(ww, uu, vv, n_power_iterations=2, dim=dim, order=order,
                                            training=training, backend=backend)
            out.backward(g)
            runs.append((out.detach(), sigma, uu, vv, ww.grad))
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)
        for a, b, scale in zip(runs[0], runs[2], (1, 1, 1, 1, 4)):
            assert_close(a, b, scale=scale)


def test_counters_per_stream_never_freed():
    """The eager counters: one zeroed buffer per (device, stream), grown by retiring the old one."""
    from sn_kernels.backends.triton import host

    dev = torch.device(DEV)
    small = host._counters(dev, 3)
    assert small.dtype == torch.int32 and small.numel() >= 3 and not small.any()
    assert host._counters(dev, 2) is small  # reused: no allocation, no memset per call
    big = host._counters(dev, small.numel() + 1)
    assert big is not small and not big.any() and any(r is small for r in host._retired)
    assert host._counters(dev, 1) is big
    if dev.type == "cuda":
        with torch.cuda.stream(torch.cuda.Stream()):
            assert host._counters(dev, 1) is not big  # another stream, other counters


# (shape, dim < 0): dims -1, -2 and -ndim of 2-D and 4-D weights
NEGATIVE_DIMS = [((5, 7), -1), ((5, 7), -2), ((4, 6, 3, 3), -1), ((4, 6, 3, 3), -2), ((4, 6, 3, 3), -4)]


@pytest.mark.parametrize("shape,dim", NEGATIVE_DIMS, ids=str)
def test_contract_ops_take_a_negative_dim(shape, dim):
    """The backend's ops (power_iteration, normalize, backward) take dim < 0 as dim + ndim, as the torch
    backend's do: a dim of -1 addressed the whole weight as one block (sigma 1e12 off, reads out of bounds)."""
    w, u, v, g = sample_inputs(DEV, torch.float32, shape, dim % len(shape), grad=True)
    for training in (True, False):
        runs = []
        for name in ("triton", "torch"):
            be = dispatch.resolve(DEV, name)
            uu, vv = u.clone(), v.clone()
            sigma, u_used, v_used = be.power_iteration(w, uu, vv, 2, 1e-12, dim, "vu", training)
            runs.append((sigma, u_used, v_used, uu, vv, be.normalize(w, u_used, v_used, sigma, dim),
                         be.backward(g, w, u_used, v_used, sigma, dim)))
        for a, b, scale in zip(*runs, (1,) * 6 + (4,)):
            assert_close(a, b, scale=scale)


@pytest.mark.parametrize("order", ["vu", "uv"])
def test_float64_eps_in_float64(order):
    """eps reaches the kernels in the accumulation dtype: a float64 weight with |W^T u|, |W v| below eps
    (eps decides every step) matches PyTorch's float64 recipe to float64's tolerance (it reached them as
    fp32: 1.6e-7 off); the same holds on the grouped path (test_grouped_triton.py)."""
    from sn_kernels.testing import pytorch_formula

    w, u, v = sample_inputs(DEV, torch.float64, (5, 7), 0, seed=1)
    w = w * 1e-3
    eps = 1e-2
    uu, vv = u.clone(), v.clone()
    out, sigma = spectral_normalize(w, uu, vv, n_power_iterations=2, eps=eps, order=order, backend="triton")
    ref_out, ref_sigma, ref_u, ref_v = pytorch_formula(w.cpu(), u.cpu(), v.cpu(), 2, eps, 0, order)
    for a, b in ((out, ref_out), (sigma, ref_sigma), (uu, ref_u), (vv, ref_v)):
        assert_close(a.cpu(), b)


def test_zero_weight_with_an_eps_that_rounds_to_zero():
    """sigma = |y|^2 / max(|y|, eps) is 0, not 0/0, for a zero weight when eps is 0 in the accumulation
    dtype (1e-50 in fp32: the kernels see eps in that dtype); W/sigma and the gradient are 0 too.
    Through host.py: the front ends may refuse such an eps before the kernels see it."""
    from sn_kernels.backends.triton import host

    w = torch.zeros(4, 3, device=DEV)
    u, v = torch.full((4,), 0.5, device=DEV), torch.full((3,), 3 ** -0.5, device=DEV)
    sigma, u_used, v_used = host.power_iteration(w, u, v, 1, 1e-50, 0, "vu", True)
    assert sigma.item() == 0 and torch.equal(u_used, u) and torch.equal(v_used, v)
    assert not host.normalize(w, u_used, v_used, sigma, 0).any()
    assert not host.backward(torch.ones_like(w), w, u_used, v_used, sigma, 0).any()


@pytest.mark.parametrize("args,error,match", [
    ((0, 1e-12, "uv"), RuntimeError, "n_power_iterations must be positive"),
    ((1, 1e-12, "bogus"), RuntimeError, 'order must be "vu" or "uv", got "bogus"'),
    ((1, 0.0, "uv"), RuntimeError, "eps must be positive and finite"),
    ((1, -1.0, "uv"), RuntimeError, "eps must be positive and finite"),
    ((1, float("inf"), "uv"), RuntimeError, "eps must be positive and finite"),
    ((1, 1e-50, "uv"), ValueError, "Expected eps to be at least"),
], ids=["n=0", "order", "eps=0", "eps<0", "eps=inf", "eps=1e-50"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_refuses_what_the_native_op_refuses(args, error, match, training):
    """``triton_power_iteration`` refuses n_power_iterations <= 0 (it returned an uninitialised sigma),
    an unknown order and an eps out of range, with the native op's messages, before touching u, v."""
    w, u, v = sample_inputs(DEV, torch.float32, (6, 4), 0)
    n, eps, order = args
    uu, vv = u.clone(), v.clone()
    names = ["triton"] + (["native"] if "native" in sn_kernels.available_backends(DEV.type) else [])
    for name in names:
        op = dispatch.resolve(DEV, name).power_iteration
        with pytest.raises(error, match=re.escape(match)):
            op(w, uu, vv, n, eps, 0, order, training)
    assert torch.equal(uu, u) and torch.equal(vv, v)
    with pytest.raises(error, match=re.escape(match)):
        torch.ops.sn_kernels.triton_group_forward([w], [u], [v], [0], n, eps, order, training)
