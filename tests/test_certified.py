"""Spectral normalization by a certified upper bound (``bound="upper"``, sn_kernels/certified.py).

The guarantee is checked against the exact float64 SVD of the normalized weight's matrix
view at every forward of short Adam runs whose steps move W a lot (lr 0.1): the same runs
with ``bound="estimate"`` (PyTorch's behaviour) exceed ``coeff``, so the check can fail.
"""
from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import sn_kernels
from helpers import assert_close, record
from sn_kernels import bounds, certified
from sn_kernels import parametrizations as P
from sn_kernels.backends import native
from sn_kernels.cholesky_bound import EIGH_MAX_SIDE, cholesky_top, cholesky_upper_bound
from sn_kernels.conv_norm import dense_operator_norm
from sn_kernels.find import find
from sn_kernels.testing import svd_sigma

pytestmark = pytest.mark.usefixtures("one_thread")

SLACK = 1e-12  # the float64 SVD's own error, relative: the bound is checked to this
WRAP = {"hook": sn_kernels.spectral_norm, "param": P.spectral_norm}
ORIGINAL = {"hook": "weight_orig", "param": "parametrizations.weight.original"}


def state_of(module, api):
    return find(module, "weight").state


def make_layer(kind: str, dtype=torch.float32):
    """(layer, input shape, matrix-view dim) of a small Linear / Conv2d / ConvTranspose2d (dim=1)."""
    if kind == "linear":
        return nn.Linear(24, 16).to(dtype), (8, 24), 0
    if kind == "conv":
        return nn.Conv2d(4, 6, 3, padding=1).to(dtype), (4, 4, 6, 6), 0
    return nn.ConvTranspose2d(6, 4, 3, padding=1).to(dtype), (4, 6, 5, 5), 1


def exact(module, dim) -> float:
    """sigma of the matrix view of ``module.weight`` (inside ``parametrize.cached()``: the weight the
    last forward used, not a new training forward)."""
    return svd_sigma(module.weight.detach(), dim).item()


def train(module, in_shape, steps, dtype, seed=1, lr=0.1, check=None):
    """Adam steps on a random linear loss; ``check(module)`` after every forward (before the step), the
    parametrized weight cached so that reading it does not run the parametrization again."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(in_shape, generator=gen, dtype=dtype)
        with parametrize.cached():
            y = module(x)
            if check is not None:
                check(module)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=dtype)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- the guarantee

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bound_every", [1, 5])
@pytest.mark.parametrize("coeff", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["linear", "conv", "convT"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_norm_at_most_coeff_at_every_step(api, kind, coeff, bound_every, dtype):
    """sigma(W_sn) <= coeff at every training forward (the first included) and in eval mode, while the
    same run normalized by the power-iteration estimate goes above coeff."""
    torch.manual_seed(0)
    base, in_shape, dim = make_layer(kind, dtype)
    seen = {"estimate": [], "upper": []}
    for bound in seen:
        layer = copy.deepcopy(base)
        WRAP[api](layer, coeff=coeff, bound=bound, bound_every=bound_every)
        train(layer, in_shape, 30, dtype, check=lambda m, b=bound: seen[b].append(exact(m, dim) / coeff))
        if bound == "upper":
            layer.eval()
            for _ in range(2):
                layer(torch.randn(in_shape, dtype=dtype))
                seen[bound].append(exact(layer, dim) / coeff)
    worst = max(seen["upper"])
    record(f"certified sigma(W_sn)/coeff {api}", torch.tensor(worst, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    assert worst <= 1 + SLACK, f"sigma(W_sn) = {worst!r} coeff"
    assert max(seen["estimate"]) > 1.01  # the run does push sigma_hat-normalized weights above coeff
    # tight at the refreshes: training forwards 0, k, 2k, ... (the parametrization refreshed at registration:
    # k - 1, 2k - 1, ..., and its forward 0 carries at W = W_ref)
    refreshes = seen["upper"][0:30:bound_every] if api == "hook" else seen["upper"][bound_every - 1:30:bound_every]
    assert min(refreshes + seen["upper"][:1]) > 0.98


@pytest.mark.parametrize("bound", ["upper", "operator"])
@pytest.mark.parametrize("bound_every", [1, 3])
@pytest.mark.parametrize("case", ["zero-fp32", "1e-40-fp32", "1e-30-fp16", "1e-320-fp64", "zero-bf16"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_zero_and_tiny_weights_stay_finite(api, case, bound_every, bound):
    """A zero (or nearly zero) weight has a bound so small that coeff / bound overflows the accumulation
    dtype: the scale is capped there, so W_sn is finite (0 for a zero weight, as plain spectral norm gives)
    and its gradient too, never 0 * inf = NaN; the norm stays at most coeff."""
    scale, dtype = {"zero-fp32": (0.0, torch.float32), "1e-40-fp32": (1e-40, torch.float32),
                    "1e-30-fp16": (1e-30, torch.float16), "1e-320-fp64": (1e-320, torch.float64),
                    "zero-bf16": (0.0, torch.bfloat16)}[case]
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, dtype=torch.float64) * scale)
    layer = layer.to(dtype)
    WRAP[api](layer, bound=bound, bound_every=bound_every)
    x = torch.randn(2, 4, dtype=dtype)
    for _ in range(4):  # refreshes and, with bound_every=3, carries
        with parametrize.cached():
            y = layer(x)
            w_sn = layer.weight.detach()
        assert torch.isfinite(y).all() and torch.isfinite(w_sn).all()
        assert svd_sigma(w_sn.double(), 0).item() <= 1 + SLACK
        if scale == 0.0:
            assert not w_sn.any()
        y.sum().backward()
        grad = dict(layer.named_parameters())[ORIGINAL[api]].grad
        assert torch.isfinite(grad).all()
        grad.zero_()


@pytest.mark.parametrize("bound_every", [1, 3])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_non_finite_weight_then_recovery(api, bound_every):
    """A NaN or Inf entry in the weight at a refresh gives the bound +inf (no error from the eigensolver):
    the finite entries of W_sn are 0; once the weight is finite again the next refresh certifies it."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    WRAP[api](layer, bound="upper", bound_every=bound_every)
    original = dict(layer.named_parameters())[ORIGINAL[api]]
    x = torch.randn(3, 6)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            good = original.clone()
            original[1, 2] = bad
        with parametrize.cached():
            layer(x)
            w_sn = layer.weight.detach()
        finite = torch.isfinite(original.detach())
        assert torch.equal(w_sn[finite], torch.zeros_like(w_sn[finite]))
        with torch.no_grad():
            original.copy_(good)
        for _ in range(bound_every):  # through the next refresh
            with parametrize.cached():
                layer(x)
                w_sn = layer.weight.detach()
        assert torch.isfinite(w_sn).all()
        assert 0.99 < svd_sigma(w_sn.double(), 0).item() <= 1 + SLACK


@pytest.mark.parametrize("api", ["hook", "param"])
def test_soft_and_vector_weights(api):
    """soft=True: W / max(1, B / coeff) is <= coeff and leaves a weight below coeff untouched; a 1-D
    parametrized weight is divided by a bound on its norm."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight.mul_(0.01)  # sigma well below coeff
    WRAP[api](layer, coeff=2.0, soft=True, bound="upper")
    w_orig = dict(layer.named_parameters())[ORIGINAL[api]].detach().clone()
    layer(torch.randn(2, 10))
    assert torch.equal(layer.weight.detach(), w_orig)  # below coeff: passes through unchanged
    train(layer, (8, 10), 15, torch.float32, check=lambda m: None, lr=0.5)
    layer(torch.randn(2, 10))
    assert svd_sigma(layer.weight.detach()).item() <= 2.0 * (1 + SLACK)
    bias = nn.Linear(5, 7)
    P.spectral_norm(bias, name="bias", bound="upper", coeff=0.5)
    assert torch.linalg.vector_norm(bias.bias.double()).item() <= 0.5
    assert torch.linalg.vector_norm(bias.bias.double()).item() > 0.5 * (1 - 1e-5)


def test_conv_operator_norm_claim():
    """What docs/lipschitz.md says about convolutions: the operator norm can exceed the matrix view's
    sigma (bound='upper' does not bound it), but by at most sqrt(prod(kernel_size)) with zero or
    circular padding, any stride or dilation (each input element is read by at most prod(k) windows)."""
    torch.manual_seed(0)
    above = 0
    for layer, shape in [
        (nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)), (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), (3, 5, 5)),
        (nn.Conv2d(2, 4, (1, 3), dilation=2, padding=(0, 2)), (2, 5, 6)), (nn.Conv1d(3, 2, 5, padding=2), (3, 9)),
        (nn.ConvTranspose2d(4, 3, 3, padding=1), (4, 5, 5)), (nn.ConvTranspose2d(3, 2, 4, stride=2), (3, 4, 4)),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 5, 5)),
    ]:
        with torch.no_grad():  # the same matrix at every tap: the operator norm is far above the matrix view's
            first = layer.weight[..., :1, :1] if layer.weight.dim() == 4 else layer.weight[..., :1]
            layer.weight.copy_(first.expand_as(layer.weight).clone())
        dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        op = dense_operator_norm(layer, shape).item()
        mat = svd_sigma(layer.weight.detach(), dim).item()
        k = math.prod(layer.kernel_size)
        assert op <= math.sqrt(k) * mat * (1 + 1e-12), type(layer).__name__
        above += op > mat * 1.5
    assert above >= 3  # the matrix view is not the operator norm


# ----------------------------------------------------------------------------- tightness

def _spectrum(m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tightness(dtype):
    """B / sigma right after a refresh: within k^(1/2^11) for a flat spectrum (the Gram worst case),
    near 1 for random weights of SNGAN's shapes; after Adam carries it grows with ||W - W_ref||_F."""
    g = torch.Generator().manual_seed(0)
    cases = {"randn 128x1152": torch.randn(128, 1152, generator=g, dtype=torch.float64) / 34,
             "randn 128x27": torch.randn(128, 27, generator=g, dtype=torch.float64),
             "flat 64x64": _spectrum(64, 64, [1.0] * 64, 1), "flat 16x40": _spectrum(16, 40, [2.0] * 16, 2),
             "1x128": torch.randn(1, 128, generator=g, dtype=torch.float64)}
    for name, w in cases.items():
        w = w.to(dtype)
        sigma = svd_sigma(w).item()
        b = certified.gram_upper_bound(w).item()
        ratio = b / sigma
        record(f"certified B/sigma after refresh {name}", torch.tensor(ratio, dtype=torch.float64),
               torch.tensor(1.0, dtype=torch.float64))
        assert 1 <= ratio <= min(w.shape) ** (1 / 2 ** (certified.GRAM_STEPS + 1)) * (1 + 1e-9), name
        assert ratio <= 1.005
    # a layer: the divisor at a refresh, then at the carries after 1..9 small Adam steps, then a refresh
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, 3).to(dtype)
    sn_kernels.spectral_norm(layer, bound="upper", bound_every=10)
    state = state_of(layer, "hook")
    ratios = []
    train(layer, (2, 16, 5, 5), 11, dtype, lr=1e-3,
          check=lambda m: ratios.append(state.sigma.item() / svd_sigma(m.weight_orig).item()))
    assert ratios[0] <= 1.005 and ratios[10] <= 1.005 and all(r >= 1 for r in ratios)
    assert ratios[9] > ratios[1] > ratios[0]  # the carry loosens as W moves
    record("certified B/sigma after 9 carries (lr 1e-3)", torch.tensor(ratios[9], dtype=dtype),
           torch.tensor(1.0, dtype=dtype))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("step", ["refresh", "carry"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_gradcheck(api, step, soft):
    """gradcheck (and gradgradcheck) of the layer's output as a function of the raw weight, float64:
    a refresh (bound_every=1: every call is one) and a carry (W away from W_ref)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 2).double()
    WRAP[api](layer, bound="upper", bound_every=1 if step == "refresh" else 10 ** 9, coeff=0.7, soft=soft)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer(x)  # the refresh that carry steps start from
    w = dict(layer.named_parameters())[ORIGINAL[api]].detach().clone()
    if step == "carry":
        w += 0.05 * torch.randn_like(w)
    if soft:
        w *= 3  # the soft form active (B > coeff)
    w.requires_grad_(True)
    state = state_of(layer, api)
    left = state.certifier.left

    def f(weight):
        return functional_call(layer, {ORIGINAL[api]: weight}, (x,))

    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))
    f(w)
    if step == "carry":
        assert state.certifier.left < left  # every call carried: none refreshed
        assert not torch.equal(state.certifier.ref, w.detach())
    else:
        assert torch.equal(state.certifier.ref, w.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 1152), (40, 16), (1, 64)], ids=str)
def test_refresh_gradient_below_float64_is_float64s_to_float32_rounding(dtype, shape):
    """The Gram bound's gradient is not part of the certificate, so for a weight below float64 it is formed
    in float32 (``_GramBound.backward``): it matches the float64 computation on the same values to float32
    rounding, and the bound itself (float64 throughout) is the same bits."""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) / shape[1] ** 0.5).to(dtype)
    low, high = w.clone().requires_grad_(), w.double().requires_grad_()
    b_low, b_high = certified.gram_upper_bound(low), certified.gram_upper_bound(high)
    assert torch.equal(b_low, b_high)
    b_low.backward()
    b_high.backward()
    assert low.grad.dtype == dtype
    assert_close(low.grad, high.grad, dtype=dtype, msg=f"{shape} {dtype}")


def test_carry_gradient_at_the_reference_is_the_subgradient_zero():
    """At W = W_ref the carry's ||W - W_ref|| contributes the subgradient 0: the gradient is that of
    coeff W / B_ref with B_ref constant."""
    layer = nn.Linear(5, 4).double()
    P.spectral_norm(layer, bound="upper", bound_every=3)
    layer(torch.randn(1, 5, dtype=torch.float64))  # after registration's refresh: a carry at W = W_ref
    w = layer.parametrizations.weight.original
    g = torch.randn(4, 5, dtype=torch.float64)
    w.grad = None
    layer.weight.backward(g)
    den = state_of(layer, "param").sigma
    torch.testing.assert_close(w.grad, g / den, rtol=1e-14, atol=0)


def test_coeff_beyond_the_dtype_is_refused():
    """A certified W_sn has entries of at most coeff: a coeff above the weight dtype's largest value could
    overflow to inf, so it is refused at wrapping and after a conversion to that dtype (at the next refresh)."""
    with pytest.raises(ValueError, match="above the largest finite torch.float16"):
        P.spectral_norm(nn.Linear(4, 4).half(), bound="upper", coeff=1e5)
    layer = P.spectral_norm(nn.Linear(4, 4), bound="upper", coeff=1e30)
    layer.half()
    with pytest.raises(ValueError, match="above the largest finite torch.float16"):
        layer(torch.randn(2, 4).half())
    w_sn = P.spectral_norm(nn.Linear(4, 4).half(), bound="upper", coeff=6e4).weight
    assert torch.isfinite(w_sn).all()


NATIVE_WHY = native.why_not(torch.device("cpu"), auto=True)


@pytest.mark.skipif(NATIVE_WHY is not None, reason=f"native extension not available: {NATIVE_WHY}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "coeff", "soft-active", "soft-clamped", "at-ref"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_native_carry_matches_the_tensor_ops(kind, variant, dtype, monkeypatch):
    """The CPU carry ops (csrc/sn_kernels_carry_cpu.cpp, the "native" backend's) give the tensor-op route's
    W_sn, B' and gradient ("torch" backend) to the dtype's rounding: a carry away from W_ref, at W_ref
    (nrm = 0: the subgradient 0), with coeff, and with soft active or clamped (s = 1: no gradient
    through B').  Whether the C++ route ran is counted, so the comparison cannot be of one route with
    itself."""
    torch.manual_seed(0)
    layer = (nn.Linear(37, 23) if kind == "linear" else nn.Conv2d(5, 7, 3)).to(dtype)
    kw = dict(coeff=0.5) if variant == "coeff" else {}
    if variant.startswith("soft"):
        kw = dict(soft=True, coeff=0.5 if variant == "soft-active" else 1e4)
    P.spectral_norm(layer, bound="upper", bound_every=10 ** 9, **kw)  # registration refreshed: all carries now
    w = layer.parametrizations.weight.original
    if variant != "at-ref":
        with torch.no_grad():
            w.add_(0.05 * torch.randn_like(w))
    g = torch.randn(w.shape, dtype=dtype)
    ran = []
    real = certified._native_carry_step
    monkeypatch.setattr(certified, "_native_carry_step", lambda *a: ran.append(1) or real(*a))
    out = {}
    for backend in ("native", "torch"):
        with sn_kernels.use_backend(backend):
            w.grad = None
            w_sn = layer.weight
            w_sn.backward(g)
            out[backend] = (w_sn.detach(), state_of(layer, "param").sigma, w.grad.clone())
    assert ran == [1]  # the native route once, the torch route never
    (a_sn, a_den, a_g), (b_sn, b_den, b_g) = out["native"], out["torch"]
    torch.testing.assert_close(a_den, b_den, rtol=4e-16, atol=0)  # float64, sums in another order
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(a_sn, b_sn, rtol=eps, atol=0)  # fl(W fl(s)): s equal or 1 ulp of float64 apart
    # G s + (W - W_ref) t: one rounding to the dtype natively, three (two products, their sum) by tensor ops
    scale = (g.abs().double() * (a_sn.double() / w.double()).abs().nan_to_num()).max().item()
    torch.testing.assert_close(a_g.double(), b_g.double(), rtol=4 * eps, atol=4 * eps * scale)
    if variant in ("soft-clamped", "at-ref"):  # no gradient through B': G s exactly
        s = (1.0 if variant == "soft-clamped" else 1.0 / a_den.item())
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        torch.testing.assert_close(a_g, (g.to(acc) * torch.tensor(s, dtype=torch.float64).to(acc)).to(dtype), rtol=0, atol=0)


@pytest.mark.skipif(NATIVE_WHY is not None, reason=f"native extension not available: {NATIVE_WHY}")
def test_native_carry_ops_name_the_refused_argument():
    """The carry ops refuse a reference or gradient unlike the weight, naming which one."""
    w = torch.randn(4, 5)
    base = torch.tensor(1.0, dtype=torch.float64)
    fwd, bwd = torch.ops.sn_kernels.native_carry_forward, torch.ops.sn_kernels.native_carry_backward
    with pytest.raises(RuntimeError, match="reference must have the weight's shape"):
        fwd(w, torch.zeros(5, 4), base, 1.0, 1.0, False)
    _, den, nrm = fwd(w, torch.zeros_like(w), base, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="reference must have the weight's shape and dtype"):
        bwd(torch.ones_like(w), w, torch.zeros_like(w).double(), den, nrm, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="gradient must have the weight's shape and dtype"):
        bwd(torch.ones(4, 6), w, torch.zeros_like(w), den, nrm, 1.0, 1.0, False)


# ----------------------------------------------------------------------------- host synchronisation

SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Every Python-level read of a tensor's value raises while the fixture's context is active."""
    calls = []

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return fn

    class Guard:
        def __enter__(self):
            for name in SYNCS:
                monkeypatch.setattr(torch.Tensor, name, refuse(name))

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Guard(), calls


@pytest.mark.parametrize("api", ["hook", "param"])
def test_no_host_sync_cpu(api, no_host_reads):
    """A carry step and a refresh step (forward and backward) read no tensor value on the host:
    Tensor.item/tolist/__bool__/__float__/... are never called."""
    guard, calls = no_host_reads
    layer = nn.Conv2d(3, 5, 3)
    WRAP[api](layer, bound="upper", bound_every=2)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()  # first calls: warm-ups and lazy imports outside the guard
    layer(x).sum().backward()
    with guard:
        for _ in range(4):  # refresh and carry steps alternate
            layer(x).sum().backward()
        layer.eval()
        layer(x)
    assert calls == []
    with guard, pytest.raises(AssertionError, match="host synchronisation"):  # the guard does catch reads
        bounds._pow2(torch.tensor([3]))  # checked: compares on the host
    assert calls


def test_no_host_sync_cholesky_bound(no_host_reads):
    """The CPU refresh's bound on a weight whose estimate takes Lanczos (breakdown selection included) and
    on one that takes eigh, forward and backward: no tensor value read on the host."""
    guard, calls = no_host_reads
    mats = [torch.randn(EIGH_MAX_SIDE + 8, EIGH_MAX_SIDE + 40, requires_grad=True),
            torch.randn(20, 7, requires_grad=True)]
    for mat in mats:
        cholesky_upper_bound(mat).backward()  # warm-up outside the guard (lazy imports)
    with guard:
        for mat in mats:
            cholesky_upper_bound(mat).backward()
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("api", ["hook", "param"])
def test_no_host_sync_cuda(api):
    """torch.cuda.set_sync_debug_mode('error') through refresh and carry steps, forward and backward."""
    layer = nn.Conv2d(3, 5, 3).cuda()
    WRAP[api](layer, bound="upper", bound_every=2)
    x = torch.randn(2, 3, 6, 6, device="cuda")
    layer(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert svd_sigma(layer.weight.detach().cpu()).item() <= 1 + SLACK


# ----------------------------------------------------------------------------- state

@pytest.mark.parametrize("api", ["hook", "param"])
def test_state_dict_keys_unchanged(api):
    torch.manual_seed(0)
    plain, cert = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    WRAP[api](plain)
    WRAP[api](cert, bound="upper", bound_every=4)
    cert(torch.randn(1, 3, 5, 5))
    assert list(cert.state_dict()) == list(plain.state_dict())
    assert [k for k, _ in cert.named_buffers()] == [k for k, _ in plain.named_buffers()]
    cert.load_state_dict(plain.state_dict())  # checkpoints interchange both ways
    plain.load_state_dict(cert.state_dict())


def _copies(layer, api):
    """Copies of ``layer``: deepcopy, and for the hook API pickle and torch.save (PyTorch refuses to
    pickle parametrized modules: state_dict only)."""
    if api == "param":
        return {"deepcopy": copy.deepcopy(layer)}
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(layer), "pickle": pickle.loads(pickle.dumps(layer)),
            "torch.save": torch.load(buf, weights_only=False)}


@pytest.mark.parametrize("api", ["hook", "param"])
def test_copies_loads_and_moves_refresh(api):
    """After a deepcopy, a pickle, load_state_dict or a change of dtype, the first forward refreshes:
    W_ref is the weight the layer now has, never the one the bound was computed for before."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    WRAP[api](layer, bound="upper", bound_every=100)
    x = torch.randn(3, 6)
    layer(x)
    cert = state_of(layer, api).certifier
    assert cert.ref is not None and cert.left > 0
    pickled = pickle.loads(pickle.dumps(cert))  # the state object itself, either API
    assert pickled.ref is None and pickled.ref_bound is None and pickled.bound_every == 100
    for how, copied in _copies(layer, api).items():
        c = state_of(copied, api).certifier
        assert c.ref is None and c.ref_bound is None, how
        copied(x)
        w = dict(copied.named_parameters())[ORIGINAL[api]]
        assert torch.equal(c.ref, w.detach()) and c.ref is not w, how
        assert c.left == 99, how
    other = nn.Linear(6, 5)
    WRAP[api](other)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3)
    layer.load_state_dict(other.state_dict())
    assert cert.ref is None
    layer(x)
    assert torch.equal(cert.ref, dict(layer.named_parameters())[ORIGINAL[api]].detach())
    assert svd_sigma(layer.weight.detach()).item() <= 1 + SLACK
    layer.double()
    layer(x.double())
    assert cert.ref.dtype == torch.float64 and cert.left == 99


def test_stale_reference_stays_certified():
    """The carry holds for any W_ref: a weight rewritten behind the layer's back (through .data, which no
    hook sees) makes the bound loose, not wrong."""
    layer = nn.Linear(8, 8)
    P.spectral_norm(layer, bound="upper", bound_every=1000)
    with torch.no_grad():
        layer.parametrizations.weight.original.data = torch.randn(8, 8) * 5
    layer(torch.randn(1, 8))
    assert svd_sigma(layer.weight.detach()).item() <= 1 + SLACK


# ----------------------------------------------------------------------------- integration

@pytest.mark.parametrize("api", ["hook", "param"])
def test_sigmas_reports_the_divisor(api):
    """sigmas(): the certified divisor B' (float64) >= the exact sigma; the power iteration still runs
    (u, v move) and its estimate is kept beside."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    WRAP[api](layer, bound="upper", coeff=0.5)
    state = state_of(layer, api)
    before = sn_kernels.sigmas(layer)["weight"]  # not run yet (hook) or after registration (param)
    u0 = (layer.weight_u if api == "hook" else layer.parametrizations.weight[0]._u).clone()
    layer(torch.randn(2, 12))
    sigma = sn_kernels.sigmas(layer)["weight"]
    w = dict(layer.named_parameters())[ORIGINAL[api]]
    true = svd_sigma(w).item()
    assert sigma.dtype == torch.float64 and true <= sigma.item() <= true * 1.001
    assert before.item() == pytest.approx(sigma.item(), rel=1e-6)
    assert state.certifier.estimate is not None and state.certifier.estimate.item() <= true * (1 + 1e-5)
    u1 = layer.weight_u if api == "hook" else layer.parametrizations.weight[0]._u
    assert not torch.equal(u0, u1)


@pytest.mark.parametrize("api", ["hook", "param"])
@pytest.mark.parametrize("bound_every", [1, 5])
def test_sigmas_bounds_the_weight_after_an_optimizer_step(api, bound_every):
    """Training ends on optimizer.step(): the divisor sigmas() reports must bound sigma of the weight as it
    is then, not the latest forward's weight (a divisor below sigma would void a certificate logged from it)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    WRAP[api](layer, bound="upper", bound_every=bound_every)
    opt = torch.optim.Adam(layer.parameters(), lr=5e-2)
    w = dict(layer.named_parameters())[ORIGINAL[api]]
    for _ in range(3):
        opt.zero_grad()
        (layer(torch.randn(8, 16)) ** 2).sum().neg().backward()  # pushes the weight's sigma up
        opt.step()
        true = svd_sigma(w).item()
        assert sn_kernels.sigmas(layer)["weight"].item() >= true


@pytest.mark.parametrize("api", ["hook", "param"])
def test_remove_freeze_eval(api):
    """remove_spectral_norm / remove_parametrizations and freeze keep the certified W_sn (eval mode's)."""
    torch.manual_seed(0)
    for how in ("remove", "freeze"):
        layer = nn.Conv2d(3, 4, 3)
        WRAP[api](layer, bound="upper", bound_every=3, coeff=0.5)
        train(layer, (2, 3, 5, 5), 4, torch.float32)
        layer.eval()
        layer(torch.zeros(1, 3, 5, 5))
        w_sn = layer.weight.detach().clone()  # eval mode's W_sn
        if how == "freeze":
            sn_kernels.freeze(layer)
        elif api == "hook":
            sn_kernels.remove_spectral_norm(layer)
        else:
            parametrize.remove_parametrizations(layer, "weight")
        assert not sn_kernels.is_spectral_normalized(layer)
        torch.testing.assert_close(layer.weight.detach(), w_sn, rtol=0, atol=0)
        assert svd_sigma(layer.weight.detach()).item() <= 0.5 * (1 + SLACK)


@pytest.mark.parametrize("api", ["hook", "param"])
def test_sigma_bounds_leave_the_refresh_schedule_alone(api):
    """sigma_bounds/lipschitz_bound on a certified layer (before its first forward, and mid-carry) change
    nothing of its state: the next forwards refresh and carry as they would have."""
    layers = []
    for _ in range(2):  # built alike (a deep copy would drop the certifier state: its own first forward refreshes)
        torch.manual_seed(0)
        layers.append(WRAP[api](nn.Linear(5, 4), bound="upper", bound_every=3))
    layer, twin = layers
    x = torch.randn(2, 5)
    for step in range(5):
        sn_kernels.sigma_bounds(layer)
        sn_kernels.lipschitz_bound(layer, (1, 5))
        assert state_of(layer, api).certifier.left == state_of(twin, api).certifier.left, step
        torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)


def _kept_tensors(model):
    """{(layer, attribute): tensor} of what the certifiers of ``model`` keep across calls."""
    return {(i, k): v for i, m in enumerate(model) if sn_kernels.is_spectral_normalized(m)
            for k, v in vars(find(m, "weight").state.certifier).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("scenario", ["eval-then-input-grad", "eval-then-train", "train-then-train"])
@pytest.mark.parametrize("bound", ["upper", "operator"])
@pytest.mark.parametrize("api", ["hook", "param"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_inference_mode_forward_keeps_no_inference_tensor(backend, api, bound, scenario):
    """A forward under torch.inference_mode that refreshes (a validation pass right after load_state_dict, or a
    hook-API model's first) keeps W_ref, B_ref and the rest as ordinary tensors, exactly those a forward under
    no_grad keeps: later forwards with autograd that carry from them (eval-mode input gradients, training with
    bound_every > 1) neither fail ("Inference tensors cannot be saved for backward") nor differ.
    sigma_bounds/lipschitz_bound under inference_mode leave nothing either."""
    if backend == "native" and NATIVE_WHY is not None:
        pytest.skip(f"native extension not available: {NATIVE_WHY}")
    first_train = scenario.startswith("train")

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
        for i in (0, 3):
            WRAP[api](model[i], bound=bound, bound_every=1 if scenario == "eval-then-input-grad" else 5)
        return model

    x = torch.randn(2, 2, 4, 4)
    runs = []
    with sn_kernels.use_backend(backend):
        for mode in (torch.inference_mode, torch.no_grad):
            model = build()
            model.load_state_dict(build().state_dict())  # a checkpoint loaded: the next forward refreshes
            model.train(first_train)
            with mode():
                sn_kernels.sigma_bounds(model[0], input_shape=(4, 4))
                sn_kernels.lipschitz_bound(model, (1, 2, 4, 4))
                model(x)
            kept = _kept_tensors(model)
            assert kept and not [k for k, v in kept.items() if v.is_inference()], mode.__name__
            outs = []
            if scenario == "eval-then-input-grad":
                model.eval()
                xi = x.clone().requires_grad_()
                outs.append(model(xi))
                outs[-1].sum().backward()
                outs.append(xi.grad)
            else:
                model.train()
                for _ in range(3):  # carries from the kept reference
                    outs.append(model(x))
                    outs[-1].square().sum().backward()
                outs.extend(p.grad for p in model.parameters())
            runs.append((kept, outs))
    (kept, outs), (kept_ng, outs_ng) = runs
    assert kept.keys() == kept_ng.keys()
    for k in kept:
        torch.testing.assert_close(kept[k], kept_ng[k], rtol=0, atol=0, msg=str(k))
    for a, b in zip(outs, outs_ng):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lipschitz_bound_of_a_certified_chain():
    """lipschitz_bound reads certified layers at their eval-mode W_sn: a chain of Linear layers held to
    coeff (matrix view = operator for Linear) is certified <= coeff^3, and the layers' state_dict is
    untouched by the bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3))
    sn_kernels.apply_spectral_norm(model, api="parametrization", bound="upper", coeff=0.9, bound_every=4)
    train(model, (8, 10), 6, torch.float32)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    bound = sn_kernels.lipschitz_bound(model, (1, 10))
    exact_product = math.prod(svd_sigma(model[i].weight.detach()).item() for i in (0, 2, 4))  # eval W_sn
    assert exact_product <= bound <= 0.9 ** 3 * (1 + 1e-9)
    assert bound == pytest.approx(exact_product, rel=1e-6)  # the chain of Linear layers: the product is exact
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _model(api_first, api_second):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 25, 4))
    WRAP[api_first](model[0], bound="upper", bound_every=2)
    WRAP[api_second](model[2], bound="upper", coeff=0.8)
    WRAP[api_first](model[5])  # a plain one, grouped
    return model


@pytest.mark.parametrize("refresh", ["call", "step"])
def test_group_leaves_certified_layers_unchanged(refresh):
    """sn_kernels.group routes certified layers to their own computation: the same numbers as without it."""
    base = _model("hook", "param")
    grouped = copy.deepcopy(base)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (base, grouped)]
    sn_kernels.group(grouped, optimizer=opts[1] if refresh == "step" else None)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(2, 3, 5, 5, generator=gen)
        outs = []
        for model, opt in zip((base, grouped), opts):
            out = model(x)
            opt.zero_grad()
            out.square().sum().backward()
            opt.step()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for i in (0, 2):
        torch.testing.assert_close(grouped[i].weight, base[i].weight, rtol=0, atol=0)
        assert svd_sigma(grouped[i].weight.detach()).item() <= 1 + SLACK


def test_apply_and_layers_forward_the_keywords():
    model = sn_kernels.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), api="parametrization",
                                           bound="upper", bound_every=3)
    assert all(find(m, "weight").state.bound == "upper" for m in model)
    for api in ("hook", "parametrization"):
        layer = sn_kernels.SNConv2d(3, 4, 3, api=api, bound="upper", bound_every=7, coeff=0.5)
        state = find(layer, "weight").state
        assert state.bound == "upper" and state.certifier.bound_every == 7
        layer(torch.randn(1, 3, 5, 5))
        assert svd_sigma(layer.weight.detach()).item() <= 0.5 * (1 + SLACK)
    assert find(sn_kernels.SNLinear(3, 3), "weight").state.bound == "estimate"


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True, backend='aot_eager') of a model with certified layers of both APIs
    gives eager's outputs and gradients (training and eval).  Compiled training refreshes at every
    forward whatever bound_every says (a step counter would recompile): it matches eager bound_every=1."""
    torch._dynamo.reset()
    eager = _model("hook", "param")
    for m in (eager[0], eager[2]):
        find(m, "weight").state.certifier.bound_every = 1
    compiled_model = _model("hook", "param")  # model[0] with bound_every=2: refreshed every step when compiled
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    try:
        for step in range(3):
            x = torch.randn(2, 3, 5, 5, generator=gen)
            outs = [eager(x), compiled(x)]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-7)
            for out in outs:
                out.square().sum().backward()
            for a, b in zip(eager.parameters(), compiled_model.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
                with torch.no_grad():
                    a -= 0.05 * a.grad
                    b -= 0.05 * b.grad
                a.grad = b.grad = None
        eager.eval()
        compiled_model.eval()
        x = torch.randn(2, 3, 5, 5, generator=gen)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-7)
        for i in (0, 2):
            assert svd_sigma(compiled_model[i].weight.detach()).item() <= 1 + SLACK
    finally:
        torch._dynamo.reset()


def test_compiled_cpu_refresh_is_one_opaque_op():
    """Compiled, a CPU refresh's estimate and Cholesky certificate are one call of the custom op
    ``sn_kernels::cholesky_top``, not the unrolled Lanczos steps and factorizations (which made a 300-wide
    layer compile in 110 s instead of 19 s): no factorization and no eigvalsh anywhere in the graphs."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    k = EIGH_MAX_SIDE + 20  # the Lanczos estimate
    layer = nn.Linear(k + 30, k)
    P.spectral_norm(layer, bound="upper")
    try:
        torch.compile(layer, fullgraph=True, backend=capture)(torch.randn(2, k + 30))
    finally:
        torch._dynamo.reset()
    targets = [str(node.target) for gm in graphs for mod in gm.modules() if isinstance(mod, torch.fx.GraphModule)
               for node in mod.graph.nodes if node.op == "call_function"]
    assert sum("cholesky_top" in t for t in targets) == 1
    assert not [t for t in targets if ("cholesky" in t or "eigvalsh" in t) and "cholesky_top" not in t]


@pytest.mark.parametrize("k", [1, 7, 300])
def test_opcheck_cholesky_top(k):
    """torch.library.opcheck of the certificate op (schema, fake, AOT dispatch) on Gram matrices whose
    estimate takes eigvalsh (k = 7), Lanczos (k = 300) and none (1 x 1)."""
    x = torch.randn(k + 5, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    torch.library.opcheck(cholesky_top, (x.mT @ x,))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("api", ["hook", "param"])
def test_errors(api):
    wrap = WRAP[api]
    with pytest.raises(ValueError, match="bound must be one of"):
        wrap(nn.Linear(3, 3), bound="exact")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="bound_every"):
            wrap(nn.Linear(3, 3), bound="upper", bound_every=bad)
    for bad in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="bound_every"):
            wrap(nn.Linear(3, 3), bound="upper", bound_every=bad)
    with pytest.raises(ValueError, match="gain"):
        wrap(nn.Linear(3, 3), bound="upper", gain=True)
    with pytest.raises(ValueError, match="mode='matrix'"):
        wrap(nn.Conv2d(2, 2, 3), bound="upper", mode="conv")
    with pytest.raises((TypeError, ValueError), match="complex"):
        wrap(nn.Linear(3, 3).to(torch.complex64), bound="upper")
    with pytest.raises(ValueError, match="soft=True needs"):
        wrap(nn.Linear(3, 3), bound="upper", soft=True)
    layer = nn.Linear(3, 3).half()
    with pytest.raises(ValueError, match="too small"):  # at wrapping, both APIs: no forward moves u, v first
        wrap(layer, bound="upper", coeff=1e-9)
    assert not sn_kernels.is_spectral_normalized(layer)
    layer = nn.Linear(3, 3)  # nothing half-registered by a refused call
    with pytest.raises(ValueError):
        wrap(layer, bound="upper", bound_every=0)
    assert not sn_kernels.is_spectral_normalized(layer)
    with pytest.raises(ValueError, match="matrix"):
        certified.gram_upper_bound(torch.randn(2, 3, 4))
    with pytest.raises(TypeError):
        certified.gram_upper_bound(torch.randn(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="matrix"):
        cholesky_upper_bound(torch.randn(2, 3, 4))
    with pytest.raises(TypeError):
        cholesky_upper_bound(torch.randn(2, 3, dtype=torch.complex64))


def _peak_live_bytes(fn) -> int:
    """The peak of live CPU bytes allocated while ``fn`` runs, above those alive before (the profiler's
    running total of the allocator: ATen's allocations, not the native kernels' block cache)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("measured"):
            fn()
    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    mark = next(e for e in events if e.name == "measured")
    allocs = sorted((e.start_time_ns, e.extra_fields.total_allocated) for e in events
                    if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")
    before = [total for t, total in allocs if t < mark.start_time_ns]
    inside = [total for t, total in allocs if mark.start_time_ns <= t <= mark.end_time_ns]
    base = before[-1] if before else 0
    return max([base] + inside) - base


def test_cpu_refresh_frees_its_copies_before_factorizing():
    """The CPU refresh (a Gram product and Cholesky factorizations in float64) keeps at most about ten
    float32 weights' worth of memory alive at once: the float64 copies of W and the Gram product are freed
    before the factorizations, and each slack's matrix and factor before the next (16 before)."""
    from sn_kernels.cholesky_bound import cholesky_upper_bound
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    peak = _peak_live_bytes(lambda: cholesky_upper_bound(w))
    assert peak <= 11 * w.numel() * w.element_size(), peak / (w.numel() * w.element_size())
