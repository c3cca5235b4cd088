"""float16 weights on the CPU: the native ops convert W (and G, u, v) to float32 with ATen's conversion, run
the float32 kernels and convert W / sigma, grad_W, u and v back (benchmarks/NOTES.md, L2).

Held to the float64 formula (helpers.check, the one tolerance table), to the float32 ops' own bits on the
converted inputs (what says the float32 kernels ran: the generic half loops sum in another order), to the
in-place contract on u, v, and to bit-identity across thread counts.
"""
from __future__ import annotations

import pytest
import torch

from sn_kernels.backends import native, pytorch
from sn_kernels.testing import pytorch_formula

from helpers import check, per_thread_count, sample_inputs

_REASON = native.why_not(torch.device("cpu"), auto=True)  # never builds
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"native extension not available: {_REASON}")

HALF = torch.float16
EPS = 1e-12
# 2-d and 4-d weights, dim 0 and 1, channels-last 4-d ones
SHAPES = [((13, 29), 0), ((33, 17), 1), ((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((70, 45), 0)]
# big enough (>= 2 x 32768 elements) that every loop is split over the threads
BIG = [((300, 260), 1), ((40, 300, 2, 2), 1), ((256, 300), 0)]


def ops():
    return torch.ops.sn_kernels


def _layouts(w):
    """The weight as given and, for a 4-d one, channels-last."""
    return [w] + ([w.contiguous(memory_format=torch.channels_last)] if w.dim() == 4 else [])


def run_all(w, u, v, G, dim, cast=None):
    """Every CPU op on a float16 weight, each power iteration from copies of u, v: {name: tuple of outputs}.
    With ``cast`` (``Tensor.float``) every op gets its float16 inputs cast: the float32 kernels on the
    values a float16 op converts (the layout backward's saved W / sigma as float16 rounded it, its G plus
    kept summed in float16, as the float16 op sums them)."""
    c = cast or (lambda t: t)
    out = {}
    for order in ("uv", "vu"):
        uu, vv = c(u.clone()), c(v.clone())
        sigma, u_used, v_used = ops().native_power_iteration(c(w), uu, vv, 2, EPS, dim, order, True)
        out["train " + order] = (sigma, uu, vv, u_used, v_used)
    sigma = ops().native_power_iteration(c(w), c(u.clone()), c(v.clone()), 1, EPS, dim, "uv", False)[0]
    out["eval"] = (sigma,)
    w_sn = ops().native_normalize(c(w), c(u), c(v), sigma, dim)
    out["normalize"] = (w_sn,)
    out["backward"] = (ops().native_backward(c(G), c(w), c(u), c(v), sigma, dim),)
    saved = c(w_sn.to(HALF))
    grads = [("", c(G), None), (" kept", c(G + G.flip(0)), None) if cast else (" kept", G, G.flip(0))]
    for cl in ([False, True] if w.dim() == 4 else [False]):
        out[f"layout {cl}"] = (ops().native_normalize_layout(c(w), c(u), c(v), sigma, dim, cl),)
        out[f"twice {cl}"] = ops().native_normalize_layout_twice(c(w), c(u), c(v), sigma, dim, cl)
        for what, g, kept in grads:
            out[f"layout backward{what} {cl}"] = (
                ops().native_normalize_layout_backward(g, saved, c(u), c(v), sigma, dim, cl, kept),)
    return out


@pytest.mark.parametrize("shape,dim,channels_last",
                         [(s, d, False) for s, d in SHAPES] + [(s, d, True) for s, d in SHAPES if len(s) == 4], ids=str)
def test_float16_ops_match_float64_formula(shape, dim, channels_last):
    """Training (both orders) and eval power iteration, W / sigma in every layout op, and both backwards
    (with and without the kept gradient) against PyTorch's recipe and the backward formula in float64."""
    w, u, v, G = sample_inputs("cpu", HALF, shape, dim, warmup=5, warmup_order="uv", grad=True)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    out = run_all(w, u, v, G, dim)
    for order in ("uv", "vu"):
        _, sigma_ref, u_ref, v_ref = pytorch_formula(w.double(), u.double(), v.double(), 2, EPS, dim, order, True)
        sigma, u_new, v_new, u_used, v_used = out["train " + order]
        assert sigma.dtype == torch.float32 and u_new.dtype == HALF and u_used.dtype == HALF
        check(f"half: sigma ({order})", sigma, sigma_ref, HALF)
        check(f"half: u ({order})", u_new, u_ref, HALF)
        check(f"half: v ({order})", v_new, v_ref, HALF)
        assert torch.equal(u_used, u_new) and torch.equal(v_used, v_new)
    _, sigma_ref, _, _ = pytorch_formula(w.double(), u.double(), v.double(), 1, EPS, dim, "uv", False)
    (sigma,) = out["eval"]
    check("half: eval sigma", sigma, sigma_ref, HALF)
    w_sn_ref = w.double() / sigma.double()
    grad_ref = pytorch.backward(G.double(), w.double(), u.double(), v.double(), sigma.double(), dim)
    grad_kept_ref = pytorch.backward((G + G.flip(0)).double(), w.double(), u.double(), v.double(),
                                     sigma.double(), dim)
    for name, outs in out.items():
        if name.startswith(("normalize", "layout False", "layout True", "twice")):
            for t in outs:
                assert t.dtype == HALF and t.shape == w.shape
                check(f"half: {name}", t, w_sn_ref, HALF)
        elif name.startswith(("backward", "layout backward")):
            (t,) = outs
            assert t.dtype == HALF and t.shape == w.shape
            # the layout backward takes <G, W / sigma> from the rounded W / sigma: twice the table
            ref = grad_kept_ref if "kept" in name else grad_ref
            check(f"half: {name}", t, ref, HALF, scale=2)
    for cl in ([False, True] if w.dim() == 4 else [False]):
        (y,) = out[f"layout {cl}"]
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("shape,dim", SHAPES + BIG[:1], ids=str)
def test_float16_is_the_float32_kernels_rounded(shape, dim):
    """Each float16 op gives the float32 op's result on the float32 copies of its inputs, rounded once
    to float16 (round-to-nearest-even, ATen's conversion): sigma's bits equal, u, v, W / sigma and grad_W
    equal to the float32 results rounded.  The generic half loops summed in another order: before the
    change this failed on (33, 17) dim=1 and (300, 260) dim=1 (the power iteration's u, v)."""
    w, u, v, G = sample_inputs("cpu", HALF, shape, dim, warmup=5, warmup_order="uv", grad=True)
    for wl in _layouts(w):
        half = run_all(wl, u, v, G, dim)
        single = run_all(wl, u, v, G, dim, cast=torch.Tensor.float)
        assert half.keys() == single.keys()
        for name in half:
            for h, s in zip(half[name], single[name]):
                expected = s if s.dtype == torch.float32 and h.dtype == torch.float32 else s.half()
                assert h.dtype == expected.dtype, name
                assert h.stride() == expected.stride(), name
                assert torch.equal(h, expected), f"{name}: float16 is not the float32 kernel rounded"


@pytest.mark.parametrize("order", ["uv", "vu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_u_v_written_in_place(order, training):
    """u, v are the caller's float16 tensors, updated in place in training (their version counters move)
    and left alone in eval (versions unchanged); the returned u_used, v_used are copies."""
    w, u, v = sample_inputs("cpu", HALF, (33, 17), 1, warmup=0)
    u0, v0 = u.clone(), v.clone()
    pu, pv, ver_u, ver_v = u.data_ptr(), v.data_ptr(), u._version, v._version
    sigma, u_used, v_used = ops().native_power_iteration(w, u, v, 1, EPS, 1, order, training)
    assert u.data_ptr() == pu and v.data_ptr() == pv and u.dtype == HALF
    assert u_used.data_ptr() != pu and v_used.data_ptr() != pv
    assert torch.equal(u_used, u) and torch.equal(v_used, v)
    if training:
        _, _, u_ref, v_ref = pytorch_formula(w.double(), u0.double(), v0.double(), 1, EPS, 1, order, True)
        assert not torch.equal(u, u0) and not torch.equal(v, v0)
        check("half in place: u", u, u_ref, HALF)
        check("half in place: v", v, v_ref, HALF)
        assert u._version > ver_u and v._version > ver_v, "a training step must move u's and v's versions"
    else:
        assert torch.equal(u, u0) and torch.equal(v, v0), "eval must not touch u, v"
        assert u._version == ver_u and v._version == ver_v, "eval must not move the versions"


@pytest.mark.parametrize("shape,dim", BIG, ids=str)
def test_float16_bits_do_not_depend_on_threads(shape, dim):
    """Every float16 op's outputs are bit-identical with 1, 2 and 3 threads (the conversions are
    elementwise; the float32 kernels' partitions are fixed by the shape)."""
    w, u, v, G = sample_inputs("cpu", HALF, shape, dim, warmup=5, warmup_order="uv", grad=True)
    runs = per_thread_count(
        lambda: {f"{i} {k}": o for i, wl in enumerate(_layouts(w)) for k, o in run_all(wl, u, v, G, dim).items()})
    for other in runs[1:]:
        for name, outs in runs[0].items():
            for a, b in zip(outs, other[name]):
                assert torch.equal(a, b), f"{name} depends on the thread count"



# eval sigma widens W as it reads it (NOTES L9-L10).  Along dim 0: rows of 16 (the 16-lane tree), every tail of the
# 32-lane dot (17-31, 33-40, ...), whole blocks (32, 64, 128), rows long enough to split over threads.  Along dim 1
# ((outer, m, inner) pieces through the L1 buffer): one-element pieces, pieces tiled over 8 rows (< 32), unrolled
# (32-128), long pieces (129-4096, and 4097: the float32 copy), rows past one block of partial sums (4096 / len
# rows), a split over threads
EVAL_CASES = [((37, n), 0) for n in (16, 17, 23, 24, 31, 32, 33, 40, 57, 64, 100, 128, 129, 515)] + [
    ((300, 515), 0), ((41, 600), 1), ((5, 70, 3), 1), ((3, 700, 7), 1), ((4, 9, 31), 1), ((6, 40, 2, 16), 1),
    ((3, 5, 128), 1), ((2, 7, 129), 1), ((2, 3, 4096), 1), ((2, 3, 4097), 1), ((9, 300, 5, 5), 1), ((64, 2, 3), 2)]


@pytest.mark.parametrize("shape,dim", EVAL_CASES, ids=str)
def test_float16_eval_sigma_is_the_float32_kernel(shape, dim):
    """Eval sigma of a float16 weight has the float32 op's bits on the widened W, u, v, for 1, 2 and 3 threads,
    for layouts that take each branch of the float32 loops (a loop that adds a tail's lanes or a piece's partial
    sums in another order, or reads past a row, fails)."""
    w, u, v = sample_inputs("cpu", HALF, shape, dim, warmup=3, warmup_order="uv")
    expected = ops().native_power_iteration(w.float(), u.float(), v.float(), 1, EPS, dim, "uv", False)[0]
    for sigma in per_thread_count(lambda: ops().native_power_iteration(w, u.clone(), v.clone(), 1, EPS, dim, "uv",
                                                                       False)[0]):
        assert sigma.dtype == torch.float32
        assert torch.equal(sigma, expected), f"{shape} dim={dim}: float16 eval sigma is not the float32 kernel's"


@pytest.mark.parametrize("shape,dim,channels_last", [((37, 100), 0, False), ((9, 300, 5, 5), 1, False),
                                                     ((9, 300, 5, 5), 1, True), ((40, 12, 3, 3), 0, True)], ids=str)
def test_float16_eval_sigma_bits_of_any_value(shape, dim, channels_last):
    """The same on random float16 bit patterns (subnormals, signed zeros, every exponent; finite, scaled so the
    sums stay finite) in W, u and v, and on channels-last weights (made contiguous first)."""
    g = torch.Generator().manual_seed(11)

    def bits(*size):
        x = torch.randint(-32768, 32768, size, generator=g, dtype=torch.int16).view(HALF)
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        return torch.where(x.abs() > 1e3, x / 1024, x)  # finite products and sums: the comparison is of bits
    w = bits(*shape)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    m = shape[dim]
    u, v = bits(m), bits(w.numel() // m)
    expected = ops().native_power_iteration(w.float(), u.float(), v.float(), 1, EPS, dim, "uv", False)[0]
    sigma = ops().native_power_iteration(w, u.clone(), v.clone(), 1, EPS, dim, "uv", False)[0]
    assert torch.isfinite(expected) and torch.equal(sigma, expected)


def _every_value(dtype):
    """Every 16-bit pattern of ``dtype`` (all finite values of both signs, subnormals, infinities, NaNs), then
    five more so that the length (65541) is not a multiple of the vector width; float64: random values over
    many binades with the special ones."""
    if dtype == torch.float64:
        g = torch.Generator().manual_seed(7)
        w = torch.randn(70001, generator=g, dtype=dtype) * torch.exp2(torch.randint(-30, 16, (70001,), generator=g))
        w[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0])
        return w
    every = torch.arange(-32768, 32768, dtype=torch.int16).view(dtype)
    return torch.cat([every, torch.tensor([1.0, -2.5, 0.0, 3.0, -0.0], dtype=dtype)])


# sigma: three fixed scales (results that round, underflow to subnormals, overflow) and 21 random ones.  For
# float16 about a hundred of the float32 quotients are exact ties between two float16 values (subnormal
# results), so the ties' rounding is checked; for bfloat16 none is, so a loop that truncates fails here but
# one that rounds ties another way would not
SIGMAS = [3.0, 1.7e-3, 6.1e4] + torch.empty(21).uniform_(0.5, 8.0, generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_normalize_rounds_as_aten(dtype):
    """W / sigma of the non-float32 dtypes (one pass over W with F16C, or the AVX2 loops of bfloat16 and
    float64; NOTES L5) has the bits of float32 (float64) division of ATen's conversion of W, rounded once by
    ATen's conversion: for every 16-bit weight and 24 sigmas, so roundings, subnormal and overflowing
    results, signed zeros, infinities and NaNs (where, not their payload), a tail that is not a multiple of the
    vector width, split over the threads."""
    w = _every_value(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u, v = torch.ones(w.numel(), dtype=dtype), torch.ones(1, dtype=dtype)
    bits = torch.int64 if dtype == torch.float64 else torch.int16
    for sigma in SIGMAS:
        s = torch.tensor(sigma, dtype=acc)
        expected = (w.to(acc) / s).to(dtype)
        nan = torch.isnan(expected)
        for name, y in [("normalize", ops().native_normalize(w, u, v, s, 0)),
                        ("layout", ops().native_normalize_layout(w, u, v, s, 0, False))]:
            assert torch.equal(torch.isnan(y), nan), name
            assert torch.equal(y[~nan].view(bits), expected[~nan].view(bits)), \
                f"{name}: {dtype} W / {sigma} is not ATen's"
