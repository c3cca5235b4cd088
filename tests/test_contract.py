"""The backend contract (sn_kernels/backends/contract.py), written once and run on every backend
that runs here: on the CPU "native", "triton" (under TRITON_INTERPRET=1 without a GPU: small
shapes) and "torch", and on the GPU the backends that run there.

Every backend is held to the float64 oracles of sn_kernels.testing with the one tolerance table
(helpers.check), and the backends that are not "torch" to the torch backend from the same start.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels.backends import native, pytorch
from sn_kernels.testing import pytorch_formula
from torch.testing._internal.optests.generate_tests import DEFAULT_TEST_UTILS

from helpers import SHAPES, check, planted, sample_inputs

# the CPU, and the GPU when there is one (TRITON_INTERPRET=1 runs triton on CPU tensors instead)
BACKEND_DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-12


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_backend():
    return pytorch.backend


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_forward_matches_formula(backend, backend_device, dtype, shape, dim, order, training, n_iter):
    """power_iteration + normalize and the eager front end against PyTorch's recipe in float64:
    sigma (in the accumulation dtype), u and v updated in place (left alone in eval), the returned
    u_used, v_used copies of them, and W / sigma in the weight's dtype and shape."""
    w, u, v = sample_inputs(backend_device, dtype, shape, dim, warmup=0 if training else 5, warmup_order="uv")
    u0, v0 = u.clone(), v.clone()
    w_ref, sigma_ref, u_ref, v_ref = pytorch_formula(w.cpu(), u0.cpu(), v0.cpu(), n_iter, EPS, dim, order, training)

    sigma, u_used, v_used = backend.power_iteration(w, u, v, n_iter, EPS, dim, order, training)
    assert sigma.shape == () and sigma.dtype == _acc(dtype)
    assert u_used.dtype == dtype and v_used.dtype == dtype
    check("sigma vs float64 formula", sigma.cpu(), sigma_ref, dtype)
    check("u vs float64 formula", u.cpu(), u_ref, dtype)
    check("v vs float64 formula", v.cpu(), v_ref, dtype)
    if not training:
        assert torch.equal(u, u0) and torch.equal(v, v0), "eval must not touch u, v"
    assert torch.equal(u_used, u) and torch.equal(v_used, v)
    assert u_used.data_ptr() != u.data_ptr() and v_used.data_ptr() != v.data_ptr(), "u_used, v_used must be copies"
    w_sn = backend.normalize(w, u_used, v_used, sigma, dim)
    assert w_sn.dtype == dtype and w_sn.shape == w.shape
    check("op vs float64 formula", w_sn.cpu(), w_ref, dtype)

    # the eager front end (Backend.eager) from the same start
    ue, ve = u0.clone(), v0.clone()
    out, s = sn_kernels.spectral_normalize(w, ue, ve, n_power_iterations=n_iter, dim=dim, order=order,
                                           training=training, backend=backend.name)
    assert out.dtype == dtype and out.shape == w.shape and s.shape == () and s.dtype == _acc(dtype)
    check("eager vs float64 formula", out.cpu(), w_ref, dtype)
    check("eager sigma vs float64 formula", s.cpu(), sigma_ref, dtype)
    check("eager u vs float64 formula", ue.cpu(), u_ref, dtype)
    check("eager v vs float64 formula", ve.cpu(), v_ref, dtype)

    if backend.name != "torch":  # and the torch backend from the same start: the same numbers to rounding
        ut, vt = u0.clone(), v0.clone()
        sigma_t, ut_used, vt_used = _torch_backend().power_iteration(w, ut, vt, n_iter, EPS, dim, order, training)
        check("sigma vs torch backend", sigma, sigma_t, dtype)
        check("u vs torch backend", u, ut, dtype)
        check("v vs torch backend", v, vt, dtype)
        check("op vs torch backend", w_sn, _torch_backend().normalize(w, ut_used, vt_used, sigma_t, dim), dtype)
        ut, vt = u0.clone(), v0.clone()
        out_t, s_t = sn_kernels.spectral_normalize(w, ut, vt, n_power_iterations=n_iter, dim=dim, order=order,
                                                   training=training, backend="torch")
        assert s.dtype == s_t.dtype
        check("eager vs torch backend", out, out_t, dtype)
        check("eager sigma vs torch backend", s, s_t, dtype)
        check("eager u vs torch backend", ue, ut, dtype)
        check("eager v vs torch backend", ve, vt, dtype)


@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vectors_in_place_and_copies(backend, backend_device, order, training):
    w, u, v = sample_inputs(backend_device, torch.float32, (13, 29), 0)
    u0, v0 = u.clone(), v.clone()
    sigma, u_used, v_used = backend.power_iteration(w, u, v, 2, EPS, 0, order, training)
    assert u_used.data_ptr() != u.data_ptr() and v_used.data_ptr() != v.data_ptr()
    assert torch.equal(u_used, u) and torch.equal(v_used, v)
    if training:
        assert not torch.equal(u, u0) and not torch.equal(v, v0)
    else:
        assert torch.equal(u, u0) and torch.equal(v, v0)
    # the copies stay what sigma was computed with when the buffers move on
    u_kept, v_kept = u_used.clone(), v_used.clone()
    backend.power_iteration(w, u, v, 1, EPS, 0, order, True)
    assert not torch.equal(u, u_kept)
    assert torch.equal(u_used, u_kept) and torch.equal(v_used, v_kept)


@pytest.mark.parametrize("case", ["u is v", "u overlaps v", "u in the weight", "v in the weight"])
def test_vectors_sharing_memory_are_refused_in_training(backend, backend_device, case):
    """A training step writes u and v in place between its reads: u and v sharing memory with each other or
    with the weight are refused with the reason, nothing changed.  Eval only reads them (accepted), and
    disjoint slices of one buffer are fine."""
    buffer = torch.randn(48, device=backend_device)
    w, x = buffer[:36].view(6, 6), buffer[36:]
    u, v = {"u is v": (x[:6], x[:6]), "u overlaps v": (x[:6], x[3:9]), "u in the weight": (w[2], x[:6]),
            "v in the weight": (x[:6], w[5])}[case]
    before = buffer.clone()
    with pytest.raises(ValueError, match="share memory"):
        sn_kernels.spectral_normalize(w, u, v, backend=backend.name)
    assert torch.equal(buffer, before)
    sn_kernels.spectral_normalize(w, u.clone(), v.clone(), backend=backend.name)  # the same values, apart: fine
    if case in ("u is v", "u overlaps v"):
        sn_kernels.spectral_normalize(w, u, v, backend=backend.name, training=False)
    sn_kernels.spectral_normalize(w, x[:6], x[6:12], backend=backend.name)  # one buffer, disjoint: fine


def test_vectors_sharing_memory_through_another_storage_are_refused(backend, backend_device):
    """Views of one numpy buffer through different tensor storages are seen too (addresses, not storage
    objects, are compared)."""
    if backend_device.type != "cpu":
        pytest.skip("numpy memory is host memory")
    np = pytest.importorskip("numpy")
    array = np.random.default_rng(0).standard_normal(48).astype(np.float32)
    w = torch.from_numpy(array)[:36].view(6, 6)
    for u in (torch.from_numpy(array)[12:18], torch.from_numpy(array[12:])[:6]):
        with pytest.raises(ValueError, match="u and the weight share memory"):
            sn_kernels.spectral_normalize(w, u, torch.from_numpy(array[36:42].copy()), backend=backend.name)
    sn_kernels.spectral_normalize(w, torch.from_numpy(array[36:42]), torch.from_numpy(array[42:48]),
                                  backend=backend.name)


@pytest.mark.parametrize("route", ["complex", "forward AD", "torch.func"])
def test_vectors_sharing_memory_are_refused_on_every_route(route):
    """The routes that do not reach a backend's eager call (complex weights, a forward-AD level, torch.func
    transforms) refuse u sharing memory with the weight as well."""
    import torch.autograd.forward_ad as fwad

    dtype = torch.complex128 if route == "complex" else torch.float64
    buffer = torch.randn(48, dtype=dtype)
    w, u, v = buffer[:36].view(6, 6), buffer[12:18], buffer[36:42].clone()
    with pytest.raises(ValueError, match="share memory"):
        if route == "forward AD":
            with fwad.dual_level():
                sn_kernels.spectral_normalize(fwad.make_dual(w, torch.randn_like(w)), u, v)
        elif route == "torch.func":
            torch.func.jacrev(lambda x: sn_kernels.spectral_normalize(x, u, v)[0])(w)
        else:
            sn_kernels.spectral_normalize(w, u, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_sigma_is_accumulation_dtype(backend, backend_device, dtype):
    w, u, v = sample_inputs(backend_device, dtype, (4, 3), 0)
    for training in (True, False):
        assert backend.power_iteration(w, u.clone(), v.clone(), 1, EPS, 0, "vu", training)[0].dtype == _acc(dtype)
        assert sn_kernels.spectral_normalize(w, u.clone(), v.clone(), training=training,
                                             backend=backend.name)[1].dtype == _acc(dtype)


# ------------------------------------------------------------------ backward


def _autograd_reference(G, w, u_used, v_used, dim):
    """Autograd through W / (u . W v) in float64 with the vectors the forward used held constant."""
    W = w.detach().cpu().double().requires_grad_()
    sigma = torch.dot(u_used.cpu().double(), pytorch.as_matrix(W, dim) @ v_used.cpu().double())
    (W / sigma).backward(G.cpu().double())
    return W.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_formula(backend, backend_device, dtype, shape, dim, order, training):
    """``backward`` against sn_kernels.backends.pytorch.backward in float64, and the gradient of the
    eager call against autograd through the float64 formula (u, v constant) and the torch backend."""
    w, u, v, G = sample_inputs(backend_device, dtype, shape, dim, warmup=50, grad=True)
    u0, v0 = u.clone(), v.clone()
    sigma, u_used, v_used = backend.power_iteration(w, u, v, 1, EPS, dim, order, training)
    _, sigma_ref, _, _ = pytorch_formula(w.cpu(), u0.cpu(), v0.cpu(), 1, EPS, dim, order, training)
    check("sigma (converged start) vs float64 formula", sigma.cpu(), sigma_ref, dtype)
    if not training:
        assert torch.equal(u, u0) and torch.equal(v, v0), "eval must not touch u, v"
        assert torch.equal(u_used, u0) and torch.equal(v_used, v0) and u_used.data_ptr() != u.data_ptr()
    grad = backend.backward(G, w, u_used, v_used, sigma, dim)
    grad_ref = pytorch.backward(G.double(), w.double(), u_used.double(), v_used.double(), sigma.double(), dim)
    assert grad.dtype == dtype and grad.shape == w.shape
    check("backward vs float64", grad.cpu(), grad_ref.cpu(), dtype)

    # through autograd: the gradient is a difference of two O(1) terms, 4x the table for half types
    scale = 1 if dtype in (torch.float64, torch.float32) else 4
    ww = w.clone().requires_grad_()
    ue, ve = u0.clone(), v0.clone()
    out, _ = sn_kernels.spectral_normalize(ww, ue, ve, dim=dim, order=order, training=training, backend=backend.name)
    out.backward(G)
    assert ww.grad.dtype == dtype and ww.grad.shape == w.shape
    check("grad vs float64 autograd", ww.grad.cpu(), _autograd_reference(G, w, ue, ve, dim), dtype, scale=scale)
    if backend.name != "torch":
        wt = w.clone().requires_grad_()
        out_t, _ = sn_kernels.spectral_normalize(wt, u0.clone(), v0.clone(), dim=dim, order=order, training=training,
                                                 backend="torch")
        out_t.backward(G)
        check("grad vs torch backend", ww.grad, wt.grad, dtype, scale=scale)


def _gain_reference(G, w, u_used, v_used, dim, gamma, coeff, soft):
    """gamma W / sigma_eff with sigma_eff = u . W v (over coeff; soft: at least 1) in float64, u, v held
    constant: the output and the gradients of W and gamma by autograd."""
    W = w.detach().cpu().double().requires_grad_()
    g = torch.tensor(float(gamma), dtype=torch.float64, requires_grad=True)
    sigma = torch.dot(u_used.cpu().double(), pytorch.as_matrix(W, dim) @ v_used.cpu().double())
    if coeff is not None:
        sigma = sigma / coeff
        sigma = torch.clamp_min(sigma, 1.0) if soft else sigma
    out = g * W / sigma
    out.backward(G.cpu().double())
    return out.detach(), W.grad, g.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant,gamma", [((None, False), 1.7), ((0.5, False), -0.4), ((0.5, True), 1.7),
                                           ((1e4, True), 1.7), ((None, False), 0.0), ((0.5, True), 1e-30)], ids=str)
def test_gain_matches_formula(backend, backend_device, dtype, shape, dim, training, variant, gamma):
    """The eager call with a learnable gain: gamma W / sigma_eff and the gradients of W and gamma against
    float64 autograd through the formula (u, v as the call used them).  gamma 0 and 1e-30 are where the
    native CPU op composes instead of dividing by sigma / gamma (csrc/sn_kernels_autograd.cpp)."""
    coeff, soft = variant
    w, u, v, G = sample_inputs(backend_device, dtype, shape, dim, warmup=50, grad=True)
    u0, v0 = u.clone(), v.clone()
    ww = w.clone().requires_grad_()
    # gamma in the weight's dtype, as a converted module holds it, and in float32 beside a half-precision weight
    gain_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    gain = torch.tensor([gamma], dtype=gain_dtype, device=backend_device, requires_grad=True)
    out, sigma = sn_kernels.spectral_normalize(ww, u, v, dim=dim, training=training, coeff=coeff, soft=soft,
                                               gain=gain, backend=backend.name)
    out.backward(G)
    u_used, v_used = (u, v) if training else (u0, v0)
    out_r, grad_r, gain_r = _gain_reference(G, w, u_used, v_used, dim, gain.item(), coeff, soft)
    assert out.dtype == dtype and ww.grad.dtype == dtype and gain.grad.dtype == gain_dtype
    assert gain.grad.shape == (1,)
    scale = 1 if dtype in (torch.float64, torch.float32) else 4
    check("gain output vs float64", out.detach().cpu(), out_r, dtype)
    check("gain: W's gradient vs float64", ww.grad.cpu(), grad_r, dtype, scale=scale)
    # gamma's gradient <G, W> / sigma_eff is a sum over all of W: its rounding grows with sqrt(numel)
    check("gain: gamma's gradient vs float64", gain.grad.cpu().reshape(()), gain_r, dtype,
          scale=scale * max(1.0, w.numel() ** 0.5))
    fused = backend.name == "native" and backend_device.type == "cpu" and 2.0 ** -60 <= abs(gamma)
    assert ("GainNormalize" in out.grad_fn.name()) == fused, out.grad_fn.name()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", [(None, False), (0.5, True)], ids=str)
def test_gain_gradcheck(backend, backend_device, training, variant):
    """gradcheck of (W, gamma) -> gamma W / sigma with converged vectors, and in eval gradgradcheck (a double
    backward through the gain; in training the iterated u, v move with W at second order, which the
    gradient, holding them constant as PyTorch's does, leaves out)."""
    coeff, soft = variant
    w = _f64(planted(7, 5), backend_device)
    ones = torch.ones(7, dtype=torch.float64, device=backend_device), torch.ones(5, dtype=torch.float64,
                                                                                 device=backend_device)
    _, _, u, v = pytorch_formula(w, *ones, n_power_iterations=200)
    w.requires_grad_(True)
    gain = torch.tensor([1.3], dtype=torch.float64, device=backend_device, requires_grad=True)

    def f(weight, g):
        return sn_kernels.spectral_normalize(weight, u.clone(), v.clone(), training=training, coeff=coeff, soft=soft,
                                             gain=g, backend=backend.name)[0]

    assert torch.autograd.gradcheck(f, (w, gain), eps=1e-6, atol=1e-6)
    if not training:
        assert torch.autograd.gradgradcheck(f, (w, gain), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3), (4, 6)], ids=str)
def test_backward_of_the_op_with_sigma_beyond_float16_range(backend, backend_device, shape):
    """The op's own autograd formula (the torch.compile route; the eager call has its own node) on a
    float16 weight whose sigma (float32) exceeds float16's 65504 while W and W / sigma are finite: the
    gradient is finite and right (sigma * u formed in float16 overflowed to inf)."""
    w = torch.full(shape, 50000.0, dtype=torch.float16, device=backend_device)
    w[0, 0] = 40000.0  # u, v not all equal
    m, n = shape
    u = torch.full((m,), m ** -0.5, dtype=torch.float16, device=backend_device)
    v = torch.full((n,), n ** -0.5, dtype=torch.float16, device=backend_device)
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(w)
    sigma, u_used, v_used = backend.power_iteration(w, u, v, 1, EPS, 0, "uv", True)
    assert sigma.item() > 65504
    ww = w.clone().requires_grad_()
    backend.normalize(ww, u_used, v_used, sigma, 0).backward(G)
    ref = pytorch.backward(G.double(), w.double(), u_used.double(), v_used.double(), sigma.double(), 0)
    assert torch.isfinite(ww.grad).all(), ww.grad
    check("op gradient vs float64", ww.grad.cpu(), ref.cpu(), torch.float16, scale=4)


# ------------------------------------------------------------------ zero and non-finite weights


@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("n_iter", [1, 2])
@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("m", [6, 70])
def test_faulty_weight_keeps_vectors(backend, backend_device, order, n_iter, bad, m):
    """Zero or non-finite weight: u, v keep their previous values (as the torch backend);
    a zero weight normalizes to 0 (sigma 0, not 0/0) with a zero gradient."""
    dev = backend_device
    for dtype in (torch.float32, torch.float16, torch.float64):
        w = torch.full((m, 5), bad, dtype=dtype, device=dev) if bad == 0 else torch.randn(m, 5).to(dev, dtype)
        if bad != 0:
            w[2, 3] = bad
        u = torch.nn.functional.normalize(torch.randn(m), dim=0).to(dev, dtype)
        v = torch.nn.functional.normalize(torch.randn(5), dim=0).to(dev, dtype)
        u0, v0 = u.clone(), v.clone()
        sigma, uu, vv = backend.power_iteration(w, u, v, n_iter, EPS, 0, order, True)
        assert torch.equal(u, u0) and torch.equal(v, v0) and torch.equal(uu, u0) and torch.equal(vv, v0)
        if backend.name != "torch":
            ur, vr = u0.clone(), v0.clone()
            sigma_t, _, _ = _torch_backend().power_iteration(w, ur, vr, n_iter, EPS, 0, order, True)
            assert torch.equal(u, ur) and torch.equal(v, vr)
            torch.testing.assert_close(sigma, sigma_t, equal_nan=True)
        if bad == 0:
            assert sigma.item() == 0
            out = backend.normalize(w, uu, vv, sigma, 0)
            assert torch.equal(out, torch.zeros_like(w))
            g = backend.backward(torch.randn(m, 5).to(dev, dtype), w, uu, vv, sigma, 0)
            assert torch.equal(g, torch.zeros_like(w))
            # the eager front end, through autograd
            wz = w.clone().requires_grad_(True)
            out, s = sn_kernels.spectral_normalize(wz, u, v, n_power_iterations=n_iter, order=order,
                                                   backend=backend.name)
            assert s.item() == 0.0 and torch.equal(out, torch.zeros_like(out))
            assert torch.equal(u, u0) and torch.equal(v, v0)
            out.backward(torch.randn_like(out))
            assert torch.equal(wz.grad, torch.zeros_like(wz.grad))
        else:
            assert not torch.isfinite(sigma)


def test_zero_weight_and_vectors(backend, backend_device):
    """All zero (weight, u and v): sigma 0 and no NaN in the returned vectors (the eps clamp)."""
    w = torch.zeros(4, 5, device=backend_device)
    u, v = torch.zeros(4, device=backend_device), torch.zeros(5, device=backend_device)
    sigma, uu, vv = backend.power_iteration(w, u, v, 1, EPS, 0, "vu", True)
    assert sigma.item() == 0 and not torch.isnan(uu).any() and not torch.isnan(vv).any()
    assert not torch.isnan(u).any() and not torch.isnan(v).any()
    assert torch.equal(backend.normalize(w, uu, vv, sigma, 0), torch.zeros_like(w))


# ------------------------------------------------------------------ gradcheck (float64)


def _f64(t, device):
    return t.to(device, torch.float64)


@pytest.mark.parametrize("shape,dim", [((13, 29), 0), ((4, 6, 3, 3), 1), ((1, 7), 0), ((5,), 0)], ids=str)
def test_gradcheck_eval(backend, backend_device, shape, dim):
    w, u, v = sample_inputs(backend_device, torch.float64, shape, dim, warmup=5, warmup_order="uv")
    w.requires_grad_(True)

    def f(weight):
        return sn_kernels.spectral_normalize(weight, u.clone(), v.clone(), dim=dim, training=False,
                                             backend=backend.name)[0]

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-7)


def test_gradcheck_eval_unnormalized_vectors(backend, backend_device):
    """Eval with u, v that are not unit vectors (sigma = u . W v as given), conv-shaped, dim=1."""
    g = torch.Generator().manual_seed(0)
    W4 = _f64(torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), backend_device).requires_grad_()
    u4 = _f64(torch.randn(4, generator=g, dtype=torch.float64), backend_device)
    v4 = _f64(torch.randn(12, generator=g, dtype=torch.float64), backend_device)
    assert torch.autograd.gradcheck(
        lambda x: sn_kernels.spectral_normalize(x, u4.clone(), v4.clone(), dim=1, training=False,
                                                backend=backend.name)[0], (W4,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("m,n", [(9, 6), (6, 5)])
def test_gradcheck_training_converged(backend, backend_device, order, m, n):
    """With converged u, v the iteration barely moves them, so treating them as
    constants (as PyTorch's autograd does) matches the finite differences."""
    w = _f64(planted(m, n), backend_device)
    ones = torch.ones(m, dtype=torch.float64, device=backend_device), torch.ones(n, dtype=torch.float64,
                                                                                  device=backend_device)
    _, _, u, v = pytorch_formula(w, *ones, n_power_iterations=200, order=order)
    w.requires_grad_(True)

    def f(weight):
        return sn_kernels.spectral_normalize(weight, u.clone(), v.clone(), order=order, backend=backend.name)[0]

    def f_eval(weight):
        return sn_kernels.spectral_normalize(weight, u.clone(), v.clone(), training=False, backend=backend.name)[0]

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(f_eval, (w,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ opcheck of every registered op


def _op_name(op) -> str:
    name = getattr(op, "_name", None) or getattr(op, "__name__", None) or str(op)
    return str(name).split("::")[-1].split(".")[-1]


def _sample_args(op_name, w, u, v, dim, order, training):
    """Valid sample arguments for each of the ops' schemas (several calls per op)."""
    sigma, uu, vv = _torch_backend().power_iteration(w, u.clone(), v.clone(), 1, EPS, dim, "uv", True)
    sigma = sigma.to(w.dtype if w.dtype == torch.float64 else torch.float32)
    G = torch.randn_like(w)
    wg = w.clone().requires_grad_()
    w2, u2, v2 = sample_inputs(w.device, w.dtype, (5, 3), 0, seed=1)
    s2, uu2, vv2 = _torch_backend().power_iteration(w2, u2.clone(), v2.clone(), 1, EPS, 0, "uv", True)
    kind = op_name.split("_", 1)[1]
    if op_name == "triton_group_forward":  # flat outputs (backends/triton/group_ops.py)
        return [([w, w2], [u.clone(), u2.clone()], [v.clone(), v2.clone()], [dim, 0], 2, EPS, order, training)]
    if op_name == "triton_group_backward":
        flat, sigmas, uvs = torch.ops.sn_kernels.triton_group_forward([w, w2], [u, u2], [v, v2], [dim, 0], 1, EPS,
                                                                      order, training)
        return [(torch.randn_like(flat), [w, w2], uvs, sigmas, [dim, 0])]
    if kind == "power_iteration":
        return [(w, u.clone(), v.clone(), 2, EPS, dim, order, training),
                (w, u.clone(), v.clone(), 1, EPS, dim, order, training)]
    if kind == "spectral_normalize_eager":  # plain, and with coeff and a gain (gamma's gradient too)
        gain = torch.tensor([1.7], dtype=w.dtype, device=w.device, requires_grad=True)
        return [(w, u.clone(), v.clone(), 2, EPS, dim, order, training),
                (w, u.clone(), v.clone(), 1, EPS, dim, order, training),
                (wg, u.clone(), v.clone(), 1, EPS, dim, order, training, 0.5, True, gain)]
    if kind in ("normalize", "normalize_eager"):
        return [(w, uu, vv, sigma, dim), (wg, uu, vv, sigma, dim)]
    if kind == "backward":
        return [(G, w, uu, vv, sigma, dim)]
    if kind == "backward_gain":  # the final divisor sigma / gamma
        return [(G, w, uu, vv, sigma, sigma / 1.7, dim)]
    if kind in ("normalize_layout", "normalize_layout_twice"):  # native: W / sigma contiguous or channels-last
        return [(x, uu, vv, sigma, dim, cl) for x in (w, wg) for cl in ([False, True] if w.dim() == 4 else [False])]
    if kind == "normalize_layout_backward":  # the gradient in either layout (a compiled convolution's is channels-last),
        # with and without the kept output's gradient
        laid = [(G, w)] + ([(G.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last))]
                           if w.dim() == 4 else [])
        return [(g, x, uu, vv, sigma, dim, cl) + kept for g, x in laid
                for cl in ([False, True] if w.dim() == 4 else [False]) for kept in ((), (torch.randn_like(g),))]
    if kind in ("group_forward", "group_normalize_eager"):
        return [([w, w2], [u.clone(), u2.clone()], [v.clone(), v2.clone()], [dim, 0], 2, EPS, order, training)]
    if kind == "group_backward":
        return [([G, torch.randn_like(w2)], [w, w2], [uu, uu2], [vv, vv2], [sigma, s2.to(sigma.dtype)], [dim, 0])]
    raise AssertionError(f"no sample arguments for {op_name}: add them to tests/test_contract.py")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,dim", [((7, 3, 2), 1), ((6, 4, 3, 3), 0)], ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_every_op(backend, backend_device, dtype, shape, dim, order, training):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of every op in
    ``backend.ops``, the two contract ops first."""
    ops = list(backend.ops)
    assert backend.power_iteration in ops and backend.normalize in ops
    names = [_op_name(op) for op in ops]
    assert all(n.startswith(backend.name + "_") for n in names), names
    w, u, v = sample_inputs(backend_device, dtype, shape, dim)
    for op, name in zip(ops, names):
        for args in _sample_args(name, w, u, v, dim, order, training):
            torch.library.opcheck(op, args, test_utils=DEFAULT_TEST_UTILS)


def test_native_registers_the_grouped_ops():
    """The native backend lists its layout ops and, when its extension has them (sn_kernels.grouped),
    the grouped ops, so test_opcheck_every_op checks them."""
    if "native" not in sn_kernels.available_backends("cpu"):
        pytest.skip("native extension not available")
    from sn_kernels import dispatch

    names = {_op_name(op) for op in dispatch.resolve(torch.device("cpu"), "native").ops}
    assert {"native_power_iteration", "native_normalize", "native_backward", "native_normalize_eager",
            "native_spectral_normalize_eager", "native_normalize_layout", "native_normalize_layout_backward",
            "native_normalize_layout_twice"} <= names
    assert ({"native_group_forward", "native_group_backward"} <= names) == native.has_op("native_group_forward")
    assert ("native_group_normalize_eager" in names) == native.has_op("native_group_normalize_eager")


# ------------------------------------------------------------------ layouts


def test_non_contiguous_weight(backend, backend_device):
    """channels_last, permuted and transposed weights: the same numbers as a contiguous one, and a
    channels_last weight normalizes to a channels_last output."""
    dev = backend_device
    w = torch.randn(8, 6, 3, 3).to(dev).to(memory_format=torch.channels_last)
    u, v = torch.randn(8, device=dev), torch.randn(54, device=dev)
    for training in (True, False):
        uu, vv = u.clone(), v.clone()
        sigma, uu2, vv2 = backend.power_iteration(w, uu, vv, 1, EPS, 0, "vu", training)
        _, sigma_ref, _, _ = pytorch_formula(w.cpu(), u.cpu(), v.cpu(), 1, EPS, 0, "vu", training)
        check("channels_last sigma vs float64 formula", sigma.cpu(), sigma_ref, torch.float32)
        out = backend.normalize(w, uu2, vv2, sigma, 0)
        assert out.is_contiguous(memory_format=torch.channels_last)
        check("channels_last op vs W / sigma", out, w.double() / sigma.double(), torch.float32)
        eager, s = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), training=training, backend=backend.name)
        assert eager.is_contiguous(memory_format=torch.channels_last)
        check("channels_last eager sigma vs float64 formula", s.cpu(), sigma_ref, torch.float32)
        check("channels_last eager vs W / sigma", eager, w.double() / sigma.double(), torch.float32)
    # a permuted layout (neither contiguous nor channels_last) against the torch backend
    w, u, v = sample_inputs(dev, torch.float32, (6, 4, 3, 3), 0)
    weird = w.transpose(2, 3).contiguous().transpose(2, 3)
    u1, v1, u2, v2 = u.clone(), v.clone(), u.clone(), v.clone()
    out, s = sn_kernels.spectral_normalize(weird, u1, v1, backend=backend.name)
    out_c, s_c = sn_kernels.spectral_normalize(weird.contiguous(), u2, v2, backend="torch")
    check("permuted layout vs contiguous", out, out_c)
    check("permuted layout sigma vs contiguous", s, s_c)
    # a strided transpose, dim=1
    wt = torch.randn(20, 30, device=dev).t()
    u, v = torch.randn(20, device=dev), torch.randn(30, device=dev)
    sigma, uu2, vv2 = backend.power_iteration(wt, u.clone(), v.clone(), 2, EPS, 1, "uv", True)
    check("transposed sigma vs float64 formula", sigma.cpu(),
          pytorch_formula(wt.cpu(), u.cpu(), v.cpu(), 2, EPS, 1, "uv", True)[1], torch.float32)
    G = torch.randn(20, 30, device=dev).t()
    check("transposed backward vs float64", backend.backward(G, wt, uu2, vv2, sigma, 1),
          pytorch.backward(G.double(), wt.double(), uu2.double(), vv2.double(), sigma.double(), 1), torch.float32)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("variant", [{}, {"coeff": 0.5}])
def test_training_forward_moves_the_versions_of_u_v(backend, api, variant):
    """A training forward updates u, v in place and moves their version counters, as PyTorch's does: a
    user's graph that saved them (a penalty on u . W v) then refuses a later backward instead of running
    silently on the new u, v; an eval forward moves nothing."""
    torch.manual_seed(0)
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    m = wrap(nn.Linear(6, 5), **variant)
    W, u, v = ((m.weight_orig, m.weight_u, m.weight_v) if api == "hook" else
               (m.parametrizations.weight.original, m.parametrizations.weight[0]._u,
                m.parametrizations.weight[0]._v))
    x = torch.randn(3, 6)
    m.eval()
    before = (u._version, v._version)
    m(x)
    assert (u._version, v._version) == before
    m.train()
    penalty = torch.dot(u, torch.mv(W, v))
    m(x)
    assert u._version > before[0] and v._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.backward()


def test_matrix_shape_of_an_empty_weight_with_a_negative_dim():
    """A negative dim counts from the end also for a weight with no entries, whose n comes from the shape
    around dim (it came out 0 for dim=-1: the slice after dim was the whole shape)."""
    from sn_kernels.backends.contract import matrix_shape
    for shape, dim, want in (((3, 0), -1, (0, 3)), ((3, 0), 1, (0, 3)), ((0, 2, 4), -3, (0, 8)),
                             ((2, 0, 5), -2, (0, 10))):
        assert matrix_shape(torch.empty(shape), dim) == want
    with pytest.raises(IndexError):
        matrix_shape(torch.empty(3, 0), -3)
