"""The native backend (compiled extension sn_kernels._C) against the float64 oracle and the torch backend."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sn_kernels
from sn_kernels.backends import native, pytorch
from sn_kernels.testing import pytorch_formula

from helpers import assert_close, planted, sample_inputs

_REASON = native.why_not(torch.device("cpu"), auto=True)  # never builds
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"native extension not available: {_REASON}")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and native.has_kernel("cuda") else [])
# more than 32 rows: the CPU "uv" step's one-pass W v + W^T s over several row chunks (with a
# remainder chunk and rows beyond the groups of four), which the shared SHAPES never reach
# (the shared SHAPES, on every backend, and the eval forward and backward: tests/test_contract.py)
CHUNKED = [((70, 45), 0), ((129, 33), 0), ((40, 3, 3, 3), 0)]


def _ops():
    return torch.ops.sn_kernels


def _inputs(shape, dim, dtype, device="cpu", seed=0, converged=False):
    """helpers.sample_inputs; ``converged``: 50 warm-up steps, a realistic sigma."""
    return sample_inputs(device, dtype, shape, dim, seed=seed, warmup=50 if converged else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CHUNKED, ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_training_forward_matches_oracle(device, dtype, shape, dim, order, n_iter):
    w, u, v = _inputs(shape, dim, dtype, device)
    w_sn_ref, sigma_ref, u_ref, v_ref = pytorch_formula(w.cpu(), u.cpu(), v.cpu(), n_iter, 1e-12, dim, order, True)
    u0, v0 = u.clone(), v.clone()
    sigma, u_used, v_used = _ops().native_power_iteration(w, u, v, n_iter, 1e-12, dim, order, True)
    assert sigma.shape == () and sigma.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert u_used.dtype == dtype and v_used.dtype == dtype
    assert_close(sigma.cpu(), sigma_ref, dtype, msg="sigma")
    assert_close(u.cpu(), u_ref, dtype, msg="u in place")
    assert_close(v.cpu(), v_ref, dtype, msg="v in place")
    assert torch.equal(u_used, u) and torch.equal(v_used, v)
    assert u_used.data_ptr() != u.data_ptr() and v_used.data_ptr() != v.data_ptr()
    w_sn = _ops().native_normalize(w, u_used, v_used, sigma, dim)
    assert w_sn.dtype == dtype and w_sn.shape == w.shape
    assert_close(w_sn.cpu(), w_sn_ref, dtype, msg="weight_sn")
    # the torch backend from the same start: same numbers to rounding
    u1, v1 = u0.clone(), v0.clone()
    sigma_t, _, _ = pytorch.backend.power_iteration(w, u1, v1, n_iter, 1e-12, dim, order, True)
    assert_close(sigma, sigma_t, dtype)
    assert_close(u, u1, dtype)
    assert_close(v, v1, dtype)


# CUDA plans the shared shapes never reach: a row split over several warps (few rows, long rows),
# many row chunks, the transposed kernels (inner == 1: dim = the last dimension), the flattened
# non-vector row pass (outer > 1, inner 16 and 70), rows that do not fill a vector
CUDA_PLANS = [((3, 5000), 0), ((5000, 3), 0), ((700, 300), 1), ((64, 40, 4, 4), 1), ((37, 1001), 0),
              ((9, 11, 70), 1), ((6, 50, 8), 2)]


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device with the native CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim", CUDA_PLANS, ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_plans_match_oracle(dtype, shape, dim, order, training):
    w, u, v = _inputs(shape, dim, dtype, "cuda", converged=not training)
    w_ref, sigma_ref, u_ref, v_ref = pytorch_formula(w.cpu(), u.cpu(), v.cpu(), 2, 1e-12, dim, order, training)
    sigma, u_used, v_used = _ops().native_power_iteration(w, u, v, 2, 1e-12, dim, order, training)
    assert_close(sigma.cpu(), sigma_ref, dtype, msg="sigma")
    assert_close(u.cpu(), u_ref, dtype, msg="u")
    assert_close(v.cpu(), v_ref, dtype, msg="v")
    assert torch.equal(u_used, u) and torch.equal(v_used, v)
    assert_close(_ops().native_normalize(w, u_used, v_used, sigma, dim).cpu(), w_ref, dtype, msg="weight_sn")
    G = torch.randn(w.shape, dtype=torch.float64).to("cuda", dtype)
    grad = _ops().native_backward(G, w, u, v, sigma, dim)
    grad_ref = pytorch.backward(G.double(), w.double(), u.double(), v.double(), sigma.double(), dim)
    assert_close(grad.cpu(), grad_ref.cpu(), dtype, scale=1 if dtype == torch.float32 else 4, msg="backward")
    again = _ops().native_power_iteration(w, u.clone(), v.clone(), 2, 1e-12, dim, order, training)
    assert torch.equal(again[0], _ops().native_power_iteration(w, u.clone(), v.clone(), 2, 1e-12, dim, order,
                                                                training)[0]), "not deterministic"


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device with the native CUDA kernels")
def test_cuda_ops_refuse_vectors_and_gradients_on_another_device():
    """The dispatcher sends any call with a CUDA tensor to the CUDA kernels: a CPU grad or sigma is refused
    by name, not read through a host pointer."""
    w, u, v = _inputs((6, 5), 0, torch.float32, "cuda")
    sigma, u_used, v_used = torch.ops.sn_kernels.native_power_iteration(w, u, v, 1, 1e-12, 0, "uv", True)
    g = torch.randn_like(w)
    with pytest.raises(RuntimeError, match="on the weight's device"):
        torch.ops.sn_kernels.native_backward(g.cpu(), w, u_used, v_used, sigma, 0)
    with pytest.raises(RuntimeError, match="on the weight's device"):
        torch.ops.sn_kernels.native_backward(g, w, u_used, v_used, sigma.cpu(), 0)
    with pytest.raises(RuntimeError, match="on the weight's device"):
        torch.ops.sn_kernels.native_normalize(w, u_used, v_used, sigma.cpu(), 0)


@pytest.mark.parametrize("scale", [1e-18, 1e17])
def test_extreme_scales_match_oracle(scale):
    """Weights near the ends of float32's range, where W^T (W v) over- or underflows although
    W^T u does not: the one-pass "uv" step must fall back, not skip the update or lose precision."""
    w, u, v = _inputs((70, 45), 0, torch.float64)
    w = w * scale
    _, sigma_ref, u_ref, v_ref = pytorch_formula(w, u, v, 2, 1e-37, 0, "uv", True)
    w32, u32, v32 = w.float(), u.float(), v.float()
    sigma, _, _ = _ops().native_power_iteration(w32, u32, v32, 2, 1e-37, 0, "uv", True)
    assert_close(sigma.double() / scale, sigma_ref / scale, torch.float32, msg="sigma")
    assert_close(u32, u_ref, torch.float32, msg="u")
    assert_close(v32, v_ref, torch.float32, msg="v")


def _f64_inputs(m=6, n=5, seed=0):
    W = planted(m, n, seed=seed)
    u, v = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    _, _, u, v = pytorch_formula(W, u, v, 200)  # converged
    return W, u, v


def test_eager_path_is_the_cpp_autograd_function():
    """Eager calls go through native_spectral_normalize_eager (C++ autograd), not a Python Function."""
    assert native.backend.eager_checks_args
    assert torch.ops.sn_kernels.native_spectral_normalize_eager in native.backend.ops
    w, u, v = _inputs((6, 3, 2, 2), 0, torch.float32)
    w.requires_grad_()
    u0, v0 = u.clone(), v.clone()
    out, sigma = sn_kernels.spectral_normalize(w, u, v, order="uv", backend="native")
    assert "NormalizeFunction" in out.grad_fn.name(), out.grad_fn.name()
    assert not sigma.requires_grad and sigma.grad_fn is None
    # the same numbers as the separate ops, and u, v updated in place
    uu, vv = u0.clone(), v0.clone()
    s2, a, b = _ops().native_power_iteration(w.detach(), uu, vv, 1, 1e-12, 0, "uv", True)
    assert torch.equal(sigma, s2) and torch.equal(u, uu) and torch.equal(v, vv)
    assert torch.equal(out.detach(), _ops().native_normalize(w.detach(), a, b, s2, 0))
    G = torch.randn_like(w)
    out.backward(G)
    assert torch.equal(w.grad, _ops().native_backward(G, w.detach(), a, b, s2, 0))
    # no graph under no_grad / inference_mode (the op's below-autograd kernel)
    with torch.no_grad():
        assert sn_kernels.spectral_normalize(w, u, v, backend="native")[0].grad_fn is None
    with torch.inference_mode():
        y, _ = sn_kernels.spectral_normalize(w, u, v, backend="native")
        assert y.grad_fn is None
    # the eager W / sigma op alone (the Lipschitz variant's path)
    y = _ops().native_normalize_eager(w, a, b, s2, 0)
    y.backward(G)
    assert torch.equal(w.grad, 2 * _ops().native_backward(G, w.detach(), a, b, s2, 0))


def test_ops_version_and_schema_digest():
    """The library's ops are the version this Python code calls, and their schemas are the ones recorded with
    that version: a schema changed without bumping OPS_VERSION (here and in csrc/sn_kernels_cpu.cpp) fails."""
    assert torch.ops.sn_kernels.native_ops_version() == native.OPS_VERSION
    assert native.ops_schema_digest() == native.OPS_SCHEMA_DIGEST, (
        "a native_* schema changed: bump kOpsVersion (csrc/sn_kernels_cpu.cpp) and OPS_VERSION "
        f"(sn_kernels/backends/native.py) together, and set OPS_SCHEMA_DIGEST = {native.ops_schema_digest()!r}")


def test_a_library_of_another_version_is_refused_with_the_reason(monkeypatch):
    """A prebuilt library whose ops are of another version (built from older sources) is refused at load with
    a reason naming both versions and the fix; "auto" then falls back, as for a missing one."""
    assert native._stale_reason() is None
    monkeypatch.setattr(native, "OPS_VERSION", native.OPS_VERSION + 1)
    reason = native._stale_reason()
    assert reason is not None and f"version {native.OPS_VERSION}" in reason and "rebuild" in reason
    monkeypatch.setitem(native._state, "loaded", False)
    monkeypatch.setitem(native._state, "error", None)
    assert native._load(build=False) == reason
    assert native.why_not(torch.device("cpu"), auto=True) == reason


def _direct():
    """sn_kernels._C.spectral_normalize_eager, or skip (a just-in-time build has no Python module)."""
    entry = native._direct_entry()
    if entry is None:
        pytest.skip("the extension was loaded without its Python module sn_kernels._C")
    return entry


def test_prebuilt_extension_has_the_direct_entry():
    """The installed extension (what CI and users import) gives the eager path its direct entry."""
    if importlib.util.find_spec("sn_kernels._C") is None:
        pytest.skip("no prebuilt extension")
    assert native._direct_entry() is not None
    from sn_kernels import _C

    # and sn_kernels.group's forward its own (NOTES G10), which the backend's group_eager enters first
    assert callable(_C.group_normalize_eager)
    assert native.backend.group_eager is not native._raw("native_group_normalize_eager")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", [((1, 7), 0), ((7, 1), 0), ((6, 3, 2, 2), 1), ((70, 45), 0)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_direct_entry_is_the_op(dtype, shape, dim, training):
    """The direct entry gives the op's bits: W / sigma, sigma, u, v updated in place (versions moved as by
    the op), the same autograd node and gradient."""
    direct = _direct()
    w, u, v = _inputs(shape, dim, dtype)
    w = torch.nn.Parameter(w)  # the front ends' weight: a Parameter, taken as a plain tensor
    u1, v1, u2, v2 = u.clone(), v.clone(), u.clone(), v.clone()
    versions = u1._version, v1._version
    out1, sigma1 = direct(w, u1, v1, 2, 1e-12, dim, "uv", training)
    out2, sigma2 = _ops().native_spectral_normalize_eager(w, u2, v2, 2, 1e-12, dim, "uv", training)
    assert torch.equal(out1, out2) and torch.equal(sigma1, sigma2)
    assert torch.equal(u1, u2) and torch.equal(v1, v2)
    assert (u1._version > versions[0]) == training and (v1._version > versions[1]) == training
    assert type(out1) is torch.Tensor and out1.grad_fn.name() == out2.grad_fn.name()
    G = torch.randn_like(w)
    g1, = torch.autograd.grad(out1, w, G)
    g2, = torch.autograd.grad(out2, w, G)
    assert torch.equal(g1, g2)


def _lipschitz_composed(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft):
    """The Lipschitz variant composed of the two ops and contract.lipschitz_scale (the other backends' route):
    what the fused op must reproduce bit for bit."""
    from sn_kernels.backends.contract import composed_eager

    return composed_eager(_ops().native_power_iteration, _ops().native_normalize_eager)(
        weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", [((1, 7), 0), ((7, 1), 0), ((6, 3, 2, 2), 1), ((70, 45), 0)], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("coeff,soft", [(0.7, False), (3.0, False), (0.7, True), (1e6, True)], ids=str)
def test_lipschitz_variants_in_the_fused_op(dtype, shape, dim, training, coeff, soft):
    """coeff / soft inside native_spectral_normalize_eager (through the front end, the direct entry and
    torch.ops) give the composed route's bits: W / sigma, the unscaled sigma, u and v in place, and the
    gradient; soft with a huge coeff is the inactive side (W passes through, no gradient via sigma)."""
    w, u, v = _inputs(shape, dim, dtype, converged=True)
    w = torch.nn.Parameter(w)
    calls = {
        "front end": lambda w, u, v: sn_kernels.spectral_normalize(
            w, u, v, n_power_iterations=2, dim=dim, order="uv", training=training, coeff=coeff, soft=soft,
            backend="native"),
        "torch.ops": lambda w, u, v: _ops().native_spectral_normalize_eager(
            w, u, v, 2, 1e-12, dim, "uv", training, coeff, soft),
    }
    if native._direct_entry() is not None:
        calls["direct"] = lambda w, u, v: native._direct_entry()(w, u, v, 2, 1e-12, dim, "uv", training, coeff, soft)
    ur, vr = u.clone(), v.clone()
    out_r, sigma_r = _lipschitz_composed(w, ur, vr, 2, 1e-12, dim, "uv", training, coeff, soft)
    G = torch.randn_like(w)
    g_r, = torch.autograd.grad(out_r, w, G)
    if soft and coeff > 1e3:
        assert torch.equal(out_r.detach(), w.detach()), "the inactive soft variant passes W through"
    for name, call in calls.items():
        uc, vc = u.clone(), v.clone()
        out, sigma = call(w, uc, vc)
        assert "NormalizeFunction" in out.grad_fn.name(), name
        assert torch.equal(out, out_r) and torch.equal(sigma, sigma_r), name
        assert torch.equal(uc, ur) and torch.equal(vc, vr), name
        g, = torch.autograd.grad(out, w, G)
        assert torch.equal(g, g_r), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("coeff,soft", [(None, False), (0.5, True)])
def test_gain_in_the_fused_op(dtype, training, coeff, soft):
    """The learnable gain inside native_spectral_normalize_eager: the front end, the direct entry and torch.ops
    give the same bits, with the gain's node (GainNormalizeFunction) and under no_grad / inference_mode (no
    node, the same decision); W's gradient alone (gamma a buffer), and gamma's alone (a frozen W, composed, to
    rounding); a gain that is a tensor subclass is left to torch.ops by the direct entry."""
    w, u, v = _inputs((9, 6, 2), 1, dtype, converged=True)
    w = torch.nn.Parameter(w)
    gain = torch.nn.Parameter(torch.tensor([1.25], dtype=dtype))
    args = (2, 1e-12, 1, "uv", training, coeff, soft)
    runs = {
        "front end": lambda w, u, v, g: sn_kernels.spectral_normalize(
            w, u, v, n_power_iterations=2, dim=1, order="uv", training=training, coeff=coeff, soft=soft, gain=g,
            backend="native"),
        "torch.ops": lambda w, u, v, g: _ops().native_spectral_normalize_eager(w, u, v, *args, g),
        "direct": lambda w, u, v, g: _direct()(w, u, v, *args, g),
    }
    G = torch.randn_like(w)
    ref = None
    for name, run in runs.items():
        uc, vc = u.clone(), v.clone()
        out, sigma = run(w, uc, vc, gain)
        assert "GainNormalize" in out.grad_fn.name(), name
        gw, gg = torch.autograd.grad(out, (w, gain), G)
        got = (out.detach(), sigma, uc, vc, gw, gg)
        if ref is None:
            ref = got
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), name
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out, _ = runs["front end"](w, u.clone(), v.clone(), gain)
        assert out.grad_fn is None and torch.equal(out, ref[0]), ctx.__name__
    out, _ = runs["front end"](w.detach(), u.clone(), v.clone(), gain)  # a frozen W composes (the next test)
    assert out.grad_fn.name() == "MulBackward0"
    assert_close(torch.autograd.grad(out, gain, G)[0], ref[5], dtype, scale=4, msg="gamma's gradient, W frozen")
    out, _ = runs["front end"](w, u.clone(), v.clone(), gain.detach())
    assert torch.equal(torch.autograd.grad(out, w, G)[0], ref[4])
    assert _direct()(w, u.clone(), v.clone(), *args, gain.detach().as_subclass(_Logged)) is NotImplemented


def test_gain_composes_where_the_fused_node_would_differ():
    """Where the fused gain would not give the composition's values or would refuse what it allows, the op composes
    (W / sigma_eff) * gamma: sigma_eff / gamma below float32's normal range (a tiny weight, a large gamma), a
    forward-mode tangent on gamma, a frozen weight with a trained gamma (an inference tensor, or W changed in place
    before gamma's backward); and a gamma updated in place after the forward leaves the fused backward with the
    forward's gamma."""
    torch.manual_seed(0)
    w0, u, v = _inputs((4, 3), 0, torch.float32, converged=True)

    def call(w, g, **kw):
        return sn_kernels.spectral_normalize(w, u.clone(), v.clone(), gain=g, training=False, backend="native", **kw)[0]

    def reference(w, g):  # float64 gamma W / (u . W v)
        return g.double() * w.double() / torch.dot(u.double(), w.double() @ v.double())

    tiny = (w0 * 1e-28).requires_grad_()
    big = torch.tensor([2.0 ** 59], requires_grad=True)
    out = call(tiny, big)
    assert out.grad_fn.name() == "MulBackward0"
    assert_close(out, reference(tiny.detach(), big.detach()), torch.float32, msg="tiny sigma over a large gamma")
    assert "GainNormalize" in call((w0 * 1e-20).requires_grad_(), big).grad_fn.name()  # sigma_eff / gamma normal

    import torch.autograd.forward_ad as fwAD
    g = torch.tensor([1.3])
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(call(w0, fwAD.make_dual(g, torch.ones(1)))).tangent
    assert_close(tangent, reference(w0, torch.ones(1)), torch.float32, msg="gamma's tangent")

    with torch.inference_mode():
        frozen = w0.clone()
    g = torch.tensor([1.5], requires_grad=True)
    out = call(frozen, g)
    assert out.grad_fn.name() == "MulBackward0"
    G = torch.randn_like(out)
    expected = (G.double() * reference(w0, torch.ones(1))).sum()
    assert_close(torch.autograd.grad(out, g, G)[0], expected.reshape(1), torch.float32, msg="frozen inference W")
    frozen = w0.clone()
    out = call(frozen, g)
    frozen.mul_(0.5)
    assert_close(torch.autograd.grad(out, g, G)[0], expected.reshape(1), torch.float32, msg="W changed after")

    w = w0.clone().requires_grad_()
    g64 = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    out = call(w, g64)
    assert "GainNormalize" in out.grad_fn.name()
    before = torch.autograd.grad(out, w, G, retain_graph=True)[0]
    with torch.no_grad():
        g64.mul_(0.9)
    assert torch.equal(torch.autograd.grad(out, w, G)[0], before), "the forward's gamma"


class _Logged(torch.Tensor):
    """A subclass with its own __torch_function__: torch.ops must take its calls."""
    seen = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_direct_entry_declines_what_torch_ops_must_handle():
    """NotImplemented (the caller then takes torch.ops) for a tensor subclass with __torch_function__, under
    a torch function mode, and for arguments not of the schema's exact Python types."""
    direct = _direct()
    w, u, v = _inputs((5, 4), 0, torch.float32)
    args = (1, 1e-12, 0, "uv", True)
    u0, v0 = u.clone(), v.clone()
    assert direct(w.as_subclass(_Logged), u, v, *args) is NotImplemented
    assert direct(w, u, v, True, 1e-12, 0, "uv", True) is NotImplemented  # a bool as n_power_iterations
    assert direct(w, u, v, 1, 1e-12, 0.0, "uv", True) is NotImplemented  # a float as dim
    assert direct(w, u, v, 1, 1, 0, "uv", True) is NotImplemented  # an int as eps
    assert direct(w, u, v, 1, 1e-12, 0, "uv", 1) is NotImplemented
    assert direct(w, u, v, 1 << 70, 1e-12, 0, "uv", True) is NotImplemented  # the front end says it is out of range
    with pytest.raises(ValueError, match="n_power_iterations must fit in 64 bits"):
        sn_kernels.spectral_normalize(w, u, v, n_power_iterations=2**63, backend="native")
    assert direct(w, u, v) is NotImplemented
    assert direct(w, u, v, *args, 1, False) is NotImplemented  # an int as coeff
    assert direct(w, u, v, *args, 0.5, 0) is NotImplemented  # an int as soft
    assert direct(w, u, v, *args, None) is NotImplemented  # coeff without soft
    assert direct(w, u, v, 1, 1e-12, 0, "u\ud800", True) is NotImplemented  # no UTF-8 form: torch.ops says so

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert direct(w, u, v, *args) is NotImplemented
    assert torch.equal(u, u0) and torch.equal(v, v0)  # nothing declined moved u, v
    # the front end then gives torch.ops' result, and the subclass saw the call
    _Logged.seen = 0
    out, _ = sn_kernels.spectral_normalize(w.as_subclass(_Logged), u, v, backend="native")
    assert _Logged.seen > 0
    out2, _ = sn_kernels.spectral_normalize(w, u0, v0, backend="native")
    assert torch.equal(out.as_subclass(torch.Tensor), out2) and torch.equal(u, u0) and torch.equal(v, v0)


def test_direct_entry_raises_as_torch_ops():
    """A refused call raises the op's exception type and message, and moves no u, v."""
    direct = _direct()
    w, u, v = _inputs((5, 4), 0, torch.float32)
    bad = torch.randn(3)
    with pytest.raises(RuntimeError) as ops_error:
        _ops().native_spectral_normalize_eager(w, bad, v, 1, 1e-12, 0, "uv", True)
    with pytest.raises(type(ops_error.value)) as direct_error:
        direct(w, bad, v, 1, 1e-12, 0, "uv", True)
    assert str(direct_error.value) == str(ops_error.value)
    with pytest.raises(RuntimeError, match="order"):
        direct(w, u, v, 1, 1e-12, 0, "sideways", True)
    from sn_kernels import _C

    with pytest.raises(TypeError, match="subclasses of torch.Tensor"):
        _C._set_plain_types(int)
    assert direct(torch.nn.Parameter(w), u, v, 1, 1e-12, 0, "uv", True) is not NotImplemented  # kept as it was


def _group_entry():
    """sn_kernels._C.group_normalize_eager, or skip (a just-in-time build has no Python module)."""
    _direct()
    from sn_kernels import _C

    return _C.group_normalize_eager


def _group_inputs(dtype):
    """A group of four weights (1 x n, n x 1, a 4-d one along dim 1, a chunked one) as the grouped path passes
    them: Parameters, with their u, v and dims."""
    cases = [((1, 7), 0), ((7, 1), 0), ((6, 3, 2, 2), 1), ((70, 45), 0)]
    ins = [_inputs(shape, dim, dtype, seed=k) for k, (shape, dim) in enumerate(cases)]
    return ([torch.nn.Parameter(w) for w, _, _ in ins], [u for _, u, _ in ins], [v for _, _, v in ins],
            [dim for _, dim in cases])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_group_entry_is_the_op(dtype, training, shared):
    """``_C.group_normalize_eager`` (NOTES G10) gives ``native_group_normalize_eager``'s bits through torch.ops:
    W / sigma, sigma, u, v updated in place (versions moved as by the op), one node of the same name, the same
    gradients."""
    entry = _group_entry()
    ws, us, vs, dims = _group_inputs(dtype)
    us1, vs1, us2, vs2 = ([t.clone() for t in ts] for ts in (us, vs, us, vs))
    versions = [t._version for t in us1 + vs1]
    outs1, sigmas1 = entry(ws, us1, vs1, dims, 2, 1e-12, "uv", training, shared)
    outs2, sigmas2 = _ops().native_group_normalize_eager(ws, us2, vs2, dims, 2, 1e-12, "uv", training, shared)
    assert type(outs1) is list and type(sigmas1) is list and len(outs1) == len(ws)
    for a, b in zip(outs1 + sigmas1 + us1 + vs1, outs2 + sigmas2 + us2 + vs2):
        assert torch.equal(a, b)
    assert [t._version > n for t, n in zip(us1 + vs1, versions)] == [training] * 8
    assert outs1[0].grad_fn is outs1[-1].grad_fn and outs1[0].grad_fn.name() == outs2[0].grad_fn.name()
    grads = [torch.randn_like(w) for w in ws]
    g1 = torch.autograd.grad(outs1, ws, grads)
    g2 = torch.autograd.grad(outs2, ws, grads)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_group_entry_declines_what_torch_ops_must_handle_and_raises_as_it():
    """NotImplemented, moving no u, v, for a tensor subclass in a list, a tuple for a list, a dim or a count not
    of the schema's exact type, an int eps, and under a torch function mode; a refused call raises torch.ops'
    exception and message; the backend's ``group_eager`` then takes torch.ops and gives its result."""
    entry = _group_entry()
    ws, us, vs, dims = _group_inputs(torch.float32)
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    tail = (1, 1e-12, "uv", True, False)
    declined = [
        ([ws[0].as_subclass(_Logged)] + ws[1:], us, vs, dims, *tail),
        (tuple(ws), us, vs, dims, *tail),
        (ws, us, vs, [0, 0, 1.0, 0], *tail),
        (ws, us, vs, dims, True, 1e-12, "uv", True, False),
        (ws, us, vs, dims, 1, 1, "uv", True, False),
        (ws, us, vs, dims, 1, 1e-12, "uv", 1, False),
        (ws, us, vs, dims, 1 << 70, 1e-12, "uv", True, False),
        (ws, us, vs, dims, *tail[:-1]),
        (ws, us, vs, dims, 1, 1e-12, "u\ud800", True, False),  # a str with no UTF-8 form: torch.ops' message
    ]
    for args in declined:
        assert entry(*args) is NotImplemented, args[3:]

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert entry(ws, us, vs, dims, *tail) is NotImplemented
    assert all(torch.equal(a, b) for a, b in zip(us + vs, u0 + v0))
    bad = us[:1] + [torch.randn(3)] + us[2:]
    with pytest.raises(RuntimeError) as ops_error:
        _ops().native_group_normalize_eager(ws, bad, vs, dims, *tail)
    with pytest.raises(type(ops_error.value)) as entry_error:
        entry(ws, bad, vs, dims, *tail)
    assert str(entry_error.value) == str(ops_error.value)
    group_eager = native.backend.group_eager
    _Logged.seen = 0
    outs, _ = group_eager([ws[0].as_subclass(_Logged)] + ws[1:], us, vs, dims, *tail)
    assert _Logged.seen > 0
    expected, _ = _ops().native_group_normalize_eager(ws, u0, v0, dims, *tail)
    assert all(torch.equal(a.as_subclass(torch.Tensor), b) for a, b in zip(outs, expected))


def test_direct_entry_under_a_dispatch_mode():
    """A TorchDispatchMode sees the op called through the direct entry, as through torch.ops."""
    _direct()
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w, u, v = _inputs((5, 4), 0, torch.float32)
    with Record():
        sn_kernels.spectral_normalize(w, u, v, backend="native")
    assert any("native_spectral_normalize_eager" in name or "native_power_iteration" in name for name in seen), seen


@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck_float64(training):
    """create_graph=True: the C++ backward switches to the differentiable formula (WGAN-GP): exact in eval
    mode (u, v are inputs), and in training the same second derivatives as the torch backend (both hold the
    power iteration's u, v constant)."""
    W, u, v = _f64_inputs()
    f64 = dict(dtype=torch.float64)
    conv = (torch.randn(3, 4, 2, 2, **f64), torch.randn(4, **f64), torch.randn(12, **f64), 1)
    for x, uu, vv, dim in ((W, u, v, 0), conv):
        xr = x.clone().requires_grad_()

        def f(t, uu=uu, vv=vv, dim=dim):
            return sn_kernels.spectral_normalize(t, uu.clone(), vv.clone(), dim=dim, order="uv", training=training,
                                                 backend="native")[0]

        if not training:
            assert torch.autograd.gradgradcheck(f, (xr,), eps=1e-6, atol=1e-5)
        # the same second derivatives as the torch backend
        G = torch.randn_like(x)

        def hvp(backend):
            t = x.clone().requires_grad_()
            y = sn_kernels.spectral_normalize(t, uu.clone(), vv.clone(), dim=dim, order="uv", training=training,
                                              backend=backend)[0]
            (g,) = torch.autograd.grad(y, t, G, create_graph=True)
            (h,) = torch.autograd.grad(g.square().sum(), t)
            return g.detach(), h

        for a, b in zip(hvp("native"), hvp("torch")):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape,dim", [((300, 700), 0), ((1100, 1000), 0), ((64, 96, 10, 10), 1), ((20, 40000), 0)],
                         ids=str)
def test_deterministic_across_thread_counts(shape, dim):
    w, u, v = _inputs(shape, dim, torch.float32)
    G = torch.randn(shape)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for order in ("vu", "uv"):
                uu, vv = u.clone(), v.clone()
                sigma, a, b = _ops().native_power_iteration(w, uu, vv, 2, 1e-12, dim, order, True)
                results.append((order, threads, sigma, a, b, _ops().native_normalize(w, a, b, sigma, dim),
                                _ops().native_backward(G, w, a, b, sigma, dim)))
    finally:
        torch.set_num_threads(before)
    for order in ("vu", "uv"):
        rs = [r for r in results if r[0] == order]
        for r in rs[1:]:
            for x, y in zip(rs[0][2:], r[2:]):
                assert torch.equal(x, y), f"threads {rs[0][1]} vs {r[1]} differ ({order})"


def _grads_equal(make, x, backend_a="native", backend_b="torch", dtype=torch.float32):
    outs = []
    for backend in (backend_a, backend_b):
        torch.manual_seed(0)
        with sn_kernels.use_backend(backend):
            mod = make()
            for _ in range(2):
                mod.zero_grad()
                y = mod(x)
                y.square().sum().backward()
            outs.append((y.detach(), {k: b.detach().clone() for k, b in mod.named_buffers()},
                         {k: p.grad.clone() for k, p in mod.named_parameters()}))
    (ya, ba, ga), (yb, bb, gb) = outs
    assert_close(ya, yb, dtype, msg="output")
    assert ba.keys() == bb.keys() and ga.keys() == gb.keys()
    for k in ba:
        assert_close(ba[k], bb[k], dtype, msg=k)
    for k in ga:
        assert_close(ga[k], gb[k], dtype, scale=10, msg=k)


def test_front_ends_match_torch_backend():
    from sn_kernels.parametrizations import spectral_norm as sn_param

    x = torch.randn(4, 3, 8, 8)
    _grads_equal(lambda: sn_param(torch.nn.Conv2d(3, 5, 3)), x)
    _grads_equal(lambda: sn_kernels.spectral_norm(torch.nn.Conv2d(3, 5, 3)), x)
    _grads_equal(lambda: sn_kernels.spectral_norm(torch.nn.ConvTranspose2d(3, 5, 3)), x)
    _grads_equal(lambda: sn_param(torch.nn.ConvTranspose2d(3, 5, 3), n_power_iterations=2), x)
    _grads_equal(lambda: sn_param(torch.nn.Linear(7, 4)), torch.randn(3, 7))
    with sn_kernels.use_backend("native"):
        lin = sn_param(torch.nn.Linear(7, 4)).eval()
        y = lin(torch.randn(2, 7))
    assert y.shape == (2, 4)


def test_why_not():
    assert native.why_not(torch.device("cpu")) is None
    assert native.why_not(torch.device("cpu"), auto=True) is None
    assert sn_kernels.dispatch.why_not("native", "cpu") is None
    reason = native.why_not(torch.device("meta"))
    assert reason is not None


def test_cuda_kernels_registered_in_cuda_builds():
    if not torch.version.cuda:
        pytest.skip("torch is not a CUDA build")
    if os.environ.get("SN_KERNELS_BUILD", "auto").lower() in ("cpu", "none"):
        pytest.skip("SN_KERNELS_BUILD asks for a CPU-only extension")
    from sn_kernels import _build

    if _build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit here, so the extension was built CPU-only")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sn_kernels::native_normalize", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sn_kernels::native_power_iteration", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sn_kernels::native_backward", "CUDA")


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def _library_path() -> str:
    spec = importlib.util.find_spec("sn_kernels._C")
    assert spec is not None and spec.origin, "sn_kernels._C not found"
    return spec.origin


@pytest.mark.parametrize("first", ["extension", "python"])
def test_load_order(first):
    path = _library_path()
    code = f"""
        import torch
        if {first == "extension"!r}:
            torch.ops.load_library({path!r})   # the C++ TORCH_LIBRARY before any Python fragment
        import sn_kernels
        from sn_kernels.backends import native
        if {first == "python"!r}:
            torch.ops.load_library({path!r})   # again, after the Python fragments: a no-op
        assert native.why_not(torch.device("cpu")) is None, native.why_not(torch.device("cpu"))
        w = torch.randn(5, 4); u = torch.randn(5); v = torch.randn(4)
        with sn_kernels.use_backend("native"):
            a, sa = sn_kernels.spectral_normalize(w, u.clone(), v.clone())
        b, sb = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), backend="torch")
        torch.testing.assert_close(a, b)
        print("ok")
    """
    r = _run_python(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_not_built_message_without_building():
    code = """
        import sys
        sys.modules["sn_kernels._C"] = None   # as if the extension were not built
        import torch
        from sn_kernels import dispatch
        from sn_kernels.backends import native
        reason = native.why_not(torch.device("cpu"), auto=True)
        assert reason is not None and "not built" in reason, reason
        assert dispatch.why_not("native", "cpu", auto=True) is not None
        print("ok")
    """
    r = _run_python(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert "building" not in r.stderr


def test_baseline_isa_matches():
    """The float32 loops have a baseline and an AVX2+FMA build; both must agree with the oracle."""
    code = """
        import torch
        import sn_kernels.backends.native
        from sn_kernels.testing import pytorch_formula
        w = torch.randn(70, 45); u = torch.randn(70); v = torch.randn(45); G = torch.randn(70, 45)
        ops = torch.ops.sn_kernels
        for order in ("vu", "uv"):
            uu, vv = u.clone(), v.clone()
            s, a, b = ops.native_power_iteration(w, uu, vv, 2, 1e-12, 0, order, True)
            ref = pytorch_formula(w, u, v, 2, 1e-12, 0, order, True)
            torch.testing.assert_close(s.double(), ref[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ops.native_normalize(w, a, b, s, 0).double(), ref[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ops.native_backward(G, w, a, b, s, 0).double(),
                (G.double() - (G.double() * w.double()).sum() / s.double() * torch.outer(a.double(), b.double()))
                / s.double(), rtol=1e-5, atol=1e-6)
        print("ok")
    """
    env = dict(os.environ, SN_KERNELS_CPU_ISA="baseline")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_cpu_output_cache_reuses_blocks():
    """Large CPU outputs come from the block cache: a freed output's memory serves the next one
    of its size, the values are right, and empty_cache() gives idle blocks back."""
    w, u, v = _inputs((96, 200), 0, torch.float32)  # 75 KiB: above the 64 KiB threshold
    sigma, a, b = _ops().native_power_iteration(w, u, v, 1, 1e-12, 0, "uv", True)
    native.empty_cache()
    before = native.cache_stats()
    out = _ops().native_normalize(w, a, b, sigma, 0)
    ptr = out.data_ptr()
    del out
    assert native.cache_stats()["idle_blocks"] == before["idle_blocks"] + 1
    out = _ops().native_normalize(w, a, b, sigma, 0)
    assert out.data_ptr() == ptr and native.cache_stats()["hits"] == before["hits"] + 1
    assert_close(out, w.double() / sigma.double(), torch.float32)
    G = torch.randn_like(w)
    grad = _ops().native_backward(G, w, a, b, sigma, 0)  # a second block of the same size
    assert grad.data_ptr() != ptr
    assert_close(grad, pytorch.backward(G.double(), w.double(), a.double(), b.double(), sigma.double(), 0),
                 torch.float32)
    out.resize_(200, 200)  # a cached storage can still grow
    out.fill_(1.0)
    del out, grad
    assert native.cache_stats()["idle_bytes"] > 0
    native.empty_cache()
    stats = native.cache_stats()
    assert stats["idle_bytes"] == 0 and stats["idle_blocks"] == 0
    small = _ops().native_normalize(w[:8], a[:8], b, sigma, 0)  # below the threshold: plain malloc
    assert native.cache_stats()["misses"] == stats["misses"] and small.shape == (8, 200)


def test_cpu_output_cache_off():
    """SN_KERNELS_CPU_CACHE_MB=0 turns the cache off: nothing is kept, results are unchanged."""
    code = textwrap.dedent("""
        import torch
        from sn_kernels.backends import native
        w = torch.randn(96, 200)
        u, v = torch.randn(96), torch.randn(200)
        s, a, b = torch.ops.sn_kernels.native_power_iteration(w, u, v, 1, 1e-12, 0, "uv", True)
        for _ in range(3):
            out = torch.ops.sn_kernels.native_normalize(w, a, b, s, 0)
        torch.testing.assert_close(out, w / s)
        del out
        st = native.cache_stats()
        assert st["hits"] == st["misses"] == st["idle_bytes"] == 0, st
        print("ok")
    """)
    env = dict(os.environ, SN_KERNELS_CPU_CACHE_MB="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_cpu_output_cache_evicts_sizes_idle_longest():
    """A full cache makes room by freeing the blocks idle longest, whatever their size: a deleted
    model's sizes must not keep a later model's outputs out (SN_KERNELS_CPU_CACHE_MB=1 here)."""
    code = textwrap.dedent("""
        import torch
        from sn_kernels.backends import native
        def normalize(rows):  # one output of rows x 1024 floats (4 KiB per row)
            w = torch.randn(rows, 1024)
            s, a, b = torch.ops.sn_kernels.native_power_iteration(w, torch.randn(rows), torch.randn(1024), 1,
                                                                  1e-12, 0, "uv", True)
            return torch.ops.sn_kernels.native_normalize(w, a, b, s, 0)
        old = [normalize(32 + i) for i in range(6)]  # a first model's outputs: 6 sizes, 0.8 MiB in all
        del old
        st = native.cache_stats()
        assert st["idle_blocks"] == 6 and st["idle_bytes"] <= 2 ** 20, st
        for _ in range(3):  # a second model, other sizes: its blocks push the first model's out
            out = [normalize(100), normalize(101)]
            del out
        st = native.cache_stats()
        assert st["hits"] >= 4 and st["idle_bytes"] <= 2 ** 20, st
        print("ok")
    """)
    env = dict(os.environ, SN_KERNELS_CPU_CACHE_MB="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_cpu_output_cache_after_fork():
    """A forked child (a DataLoader worker) can still take and free cached outputs."""
    code = textwrap.dedent("""
        import os, torch
        from sn_kernels.backends import native
        w = torch.randn(96, 200)
        u, v = torch.randn(96), torch.randn(200)
        s, a, b = torch.ops.sn_kernels.native_power_iteration(w, u, v, 1, 1e-12, 0, "uv", True)
        kept = torch.ops.sn_kernels.native_normalize(w, a, b, s, 0)
        pid = os.fork()
        if pid == 0:
            for _ in range(3):
                out = torch.ops.sn_kernels.native_normalize(w, a, b, s, 0)
                ok = torch.equal(out, kept)
                del out
            os._exit(0 if ok and native.cache_stats()["hits"] >= 2 else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "child 0" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ the layout ops of the compiled CPU route

# 4-d weights with dim 0 and 1 (the block-transposed gradient path), dim 2 (through contiguous copies),
# kernel positions and channels of 1 (both layouts at once), and weights that are not 4-d
LAYOUT_SHAPES = [((6, 5, 3, 3), 0), ((5, 6, 3, 2), 1), ((6, 5, 3, 3), 2), ((7, 4, 1, 1), 0), ((7, 1, 3, 3), 0),
                 ((13, 29), 0), ((13, 29), 1), ((4, 3, 5), 1)]


def _layouts(t):
    """``t`` contiguous and, when 4-d, channels-last."""
    return [t] + ([t.to(memory_format=torch.channels_last)] if t.dim() == 4 else [])


def _layout_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", LAYOUT_SHAPES, ids=str)
def test_normalize_layout_is_native_normalize_in_the_asked_layout(dtype, shape, dim):
    """``native_normalize_layout``: native_normalize's values bit for bit, from a contiguous or
    channels-last weight, written channels-last or contiguous as asked."""
    w, u, v = _inputs(shape, dim, dtype)
    sigma = torch.tensor(2.75, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expected = _ops().native_normalize(w, u, v, sigma, dim)
    for weight in _layouts(w):
        for channels_last in ([False, True] if w.dim() == 4 else [False]):
            out = _ops().native_normalize_layout(weight, u, v, sigma, dim, channels_last)
            assert out.is_contiguous(memory_format=_layout_format(channels_last))
            assert torch.equal(out, expected), (weight.stride(), channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", LAYOUT_SHAPES, ids=str)
def test_normalize_layout_backward_matches_oracle(dtype, shape, dim):
    """``native_normalize_layout_backward``: (G - <G, W_sn> u v^T) / sigma against float64, for the
    gradient and W / sigma contiguous or channels-last and the output in either layout; inputs
    stored in one order give the same bits whatever the output layout."""
    w, u, v = _inputs(shape, dim, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sigma = torch.tensor(2.75, dtype=acc)
    w_sn = _ops().native_normalize(w, u, v, sigma, dim)
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    # the reference: W_sn = W / sigma, so <G, W_sn> u v^T = (<G, W>/sigma) (sigma u) v^T, native_backward's formula
    _, _, u64, v64 = u.double(), None, u.double(), v.double()
    uvT = torch.outer(u64, v64).reshape([shape[dim]] + [s for d, s in enumerate(shape) if d != dim]).movedim(0, dim)
    expected = (G.double() - (G.double() * w_sn.double()).sum() * uvT) / 2.75
    for g, ws in zip(_layouts(G), _layouts(w_sn)):
        outs = []
        for channels_last in ([False, True] if w.dim() == 4 else [False]):
            out = _ops().native_normalize_layout_backward(g, ws, u, v, sigma, dim, channels_last)
            assert out.is_contiguous(memory_format=_layout_format(channels_last))
            assert_close(out, expected, scale=4, msg=f"grad {g.stride()}, out channels_last={channels_last}")
            outs.append(out)
        assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", LAYOUT_SHAPES, ids=str)
def test_normalize_layout_twice_is_two_copies_whose_gradients_add(dtype, shape, dim):
    """``native_normalize_layout_twice`` (the hook API's compiled route): two tensors in separate
    storage with ``native_normalize_layout``'s bits, the first in the layout asked for, the second in
    the weight's own (C6); the backward's ``kept`` gradient is added to ``grad`` as autograd would (the
    result is the backward of grad + kept, bit for bit), a ``kept`` of zeros (either sign) is not added
    (the backward of grad alone, -0 entries of grad included: eager's result), and through the op's
    autograd formula either output's gradient reaches the weight."""
    w0, u, v = _inputs(shape, dim, dtype)
    sigma = torch.tensor(2.75, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(5)
    G, K = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    G.view(-1)[::3] = -0.0  # signed zeros, which a sum with a zero kept would turn into +0
    for w in _layouts(w0):
        own = w.dim() == 4 and not w.is_contiguous()
        for channels_last in ([False, True] if w.dim() == 4 else [False]):
            a, b = _ops().native_normalize_layout_twice(w, u, v, sigma, dim, channels_last)
            expected = _ops().native_normalize_layout(w, u, v, sigma, dim, channels_last)
            assert torch.equal(a, expected) and torch.equal(b, expected) and a.stride() == expected.stride()
            assert b.stride() == _ops().native_normalize_layout(w, u, v, sigma, dim, own).stride()
            # the weight's memory format (as empty_like(w), eager's module.weight, has it; strides of size-1 dims aside)
            assert all(b.is_contiguous(memory_format=f) == w.is_contiguous(memory_format=f)
                       for f in (torch.contiguous_format, torch.channels_last))
            assert a.data_ptr() != b.data_ptr()
            g, k = (t.contiguous(memory_format=_layout_format(channels_last)) for t in (G, K))
            for kept in (k, b.new_empty(b.shape).copy_(K)):  # kept in a's layout or in b's
                both = _ops().native_normalize_layout_backward(g, a, u, v, sigma, dim, channels_last, kept)
                assert torch.equal(both, _ops().native_normalize_layout_backward(g + k, a, u, v, sigma, dim,
                                                                                 channels_last))
            alone = _ops().native_normalize_layout_backward(g, a, u, v, sigma, dim, channels_last)
            for zero in (torch.zeros_like(b), torch.full_like(b, -0.0)):
                skipped = _ops().native_normalize_layout_backward(g, a, u, v, sigma, dim, channels_last, zero)
                assert torch.equal(skipped, alone) and torch.equal(skipped.signbit(), alone.signbit())
            # one nonzero entry, the last in storage order, is added: 1.0 (the result is grad + kept's), and
            # the dtype's smallest normal (a float64 one is 0 as a float32), seen alone with a zero grad
            for value in (1.0, torch.finfo(dtype).tiny):
                one = torch.zeros(shape, dtype=dtype)
                one.view(-1)[-1] = value
                for kept in (one, torch.zeros_like(b).copy_(one)):
                    added = _ops().native_normalize_layout_backward(g, a, u, v, sigma, dim, channels_last, kept)
                    assert torch.equal(added, _ops().native_normalize_layout_backward(g + kept, a, u, v, sigma, dim,
                                                                                      channels_last))
                    alone_kept = _ops().native_normalize_layout_backward(torch.zeros_like(g), a, u, v, sigma, dim,
                                                                         channels_last, kept)
                    assert alone_kept.count_nonzero() > 0, value
    weight = w0.clone().requires_grad_()
    for outs in ((G, None), (None, K), (G, K)):
        weight.grad = None
        first, second = _ops().native_normalize_layout_twice(weight, u, v, sigma, dim, False)
        used = [(o, t) for o, t in zip((first, second), outs) if t is not None]
        torch.autograd.backward([o for o, _ in used], [t for _, t in used])
        total = sum(t for t in outs if t is not None)
        assert torch.equal(weight.grad, _ops().native_normalize_layout_backward(total, first, u, v, sigma, dim,
                                                                                 False)), outs
    with pytest.raises(RuntimeError, match="grad must have the weight's shape"):
        _ops().native_normalize_layout_backward(G, a, u, v, sigma, dim, False, K.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(96, 64, 3, 3), (70, 1000), (5, 2, 1, 1)], ids=str)
def test_normalize_layout_twice_in_one_pass_has_the_layout_ops_bits(dtype, shape):
    """The one-pass ``native_normalize_layout_twice`` (NOTES C8: the kept output divided from W, the other copied
    from it, as it is or transposed per output channel) gives ``native_normalize_layout``'s bits and strides in
    each output, over weights of several of the cores' chunks, with NaN, Inf and -0 entries, on 1 and 2 threads."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    flat = w0.view(-1)
    flat[::97], flat[1::89], flat[2::83] = float("nan"), float("-inf"), -0.0
    u, v = torch.randn(shape[0], dtype=dtype), torch.randn(w0[0].numel(), dtype=dtype)
    sigma = torch.tensor(2.75, dtype=dtype)
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for w in _layouts(w0):
                own = w.dim() == 4 and not w.is_contiguous()
                for channels_last in ([False, True] if w.dim() == 4 else [False]):
                    pair = _ops().native_normalize_layout_twice(w, u, v, sigma, 0, channels_last)
                    for out, layout in zip(pair, (channels_last, own)):
                        expected = _ops().native_normalize_layout(w, u, v, sigma, 0, layout)
                        assert out.stride() == expected.stride()
                        assert torch.equal(out.flatten().view(bits), expected.flatten().view(bits)), (n, channels_last)
    finally:
        torch.set_num_threads(threads)


def test_layout_ops_refuse_bad_arguments():
    """Clear errors: channels-last for a weight that is not 4-d, a gradient of another shape or dtype."""
    w, u, v = _inputs((13, 29), 0, torch.float32)
    sigma = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="channels_last needs a 4-d weight"):
        _ops().native_normalize_layout(w, u, v, sigma, 0, True)
    with pytest.raises(RuntimeError, match="channels_last needs a 4-d weight"):
        _ops().native_normalize_layout_backward(w, w, u, v, sigma, 0, True)
    with pytest.raises(RuntimeError, match="grad must have the weight's shape"):
        _ops().native_normalize_layout_backward(w[:, :5], w, u, v, sigma, 0, False)
    with pytest.raises(RuntimeError, match="grad must have the weight's dtype"):
        _ops().native_normalize_layout_backward(w.double(), w, u, v, sigma, 0, False)
    with pytest.raises(RuntimeError, match="u must have shape"):
        _ops().native_normalize_layout(w, v, u, sigma, 0, False)


def test_layout_op_autograd_gives_the_gradient_in_the_weight_layout():
    """The op's autograd formula (what a compiled graph records): the gradient of native_normalize's
    C++ formula, laid out as the weight (a channels-last parameter gets a channels-last gradient);
    building the graph of the gradient (for a double backward) is refused."""
    w0, u, v = _inputs((6, 5, 3, 3), 0, torch.float64)
    sigma = torch.tensor(1.7, dtype=torch.float64)
    G = torch.randn_like(w0)
    expected = _ops().native_backward(G, w0, u, v, sigma, 0)
    for w in _layouts(w0):
        for channels_last in (False, True):
            weight = w.clone().requires_grad_()
            out = _ops().native_normalize_layout(weight, u, v, sigma, 0, channels_last)
            out.backward(G)
            assert weight.grad.stride() == w.stride()
            assert_close(weight.grad, expected)
    weight = w0.clone().requires_grad_()
    out = _ops().native_normalize_layout(weight, u, v, sigma, 0, False)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, weight, G, create_graph=True)


def _disjoint(shape, dtype, scale=1.0):
    """G and W with disjoint supports: <G, W> is exactly zero, so every CPU grad_W kernel gives G times
    grad_factor(sigma) = 1 / sigma, or G / sigma where it divides, with no other rounding."""
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(shape, dtype=torch.float64, generator=gen) * scale
    W = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.5
    return G.masked_fill(mask, 0).to(dtype), W.masked_fill(~mask, 0).to(dtype)


def _grad_routes(G, W, sigma, dim):
    """grad_W of every CPU route: the per-weight op, the layout op (from W as its saved output; G channels-last
    for a 4-d weight along dim 0, its block-transposed loop) and the grouped op."""
    m = W.shape[dim]
    u = torch.nn.functional.normalize(torch.ones(m, dtype=W.dtype), dim=0)
    v = torch.nn.functional.normalize(torch.ones(W.numel() // m, dtype=W.dtype), dim=0)
    out = {"native_backward": _ops().native_backward(G, W, u, v, sigma, dim),
           "layout": _ops().native_normalize_layout_backward(G, W, u, v, sigma, dim, False, None),
           "group": _ops().native_group_backward([G], [W], [u], [v], [sigma], [dim])[0]}
    if W.dim() == 4 and dim == 0:
        cl = torch.channels_last
        out["layout, transposed"] = _ops().native_normalize_layout_backward(
            G.contiguous(memory_format=cl), W.contiguous(memory_format=cl), u, v, sigma, dim, False, None)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,dim", [((37, 53), 0), ((40, 1), 0), ((6, 5, 7), 1), ((8, 6, 3, 3), 0),
                                       ((300, 260), 1)], ids=str)
def test_grad_w_multiplies_by_the_reciprocal_of_a_normal_sigma(shape, dim, dtype):
    """grad_W = (G - c u v^T) * (1 / sigma) where sigma and 1 / sigma are normal numbers (a multiply instead of
    a division per element: benchmarks/NOTES.md, L13), and the division where 1 / sigma would lose bits
    (sigma subnormal or near the dtype's largest power of two); every CPU route alike."""
    G, W = _disjoint(shape, dtype)
    sigma = torch.tensor(3.0, dtype=dtype)
    for route, grad in _grad_routes(G, W, sigma, dim).items():
        assert torch.equal(grad, G * (1 / sigma)), route
        assert not torch.equal(grad, G / sigma), route  # the two differ on these G: the test tells them apart
    info = torch.finfo(dtype)
    tiny = torch.tensor(info.tiny, dtype=dtype) / 16  # subnormal: 1 / sigma overflows or loses nothing useful
    huge = torch.tensor(info.max, dtype=dtype) / 2  # 1 / sigma subnormal
    for sigma, scale in ((tiny, info.tiny), (huge, 1.0)):
        G, W = _disjoint(shape, dtype, scale)
        for route, grad in _grad_routes(G, W, sigma, dim).items():
            assert torch.equal(grad, G / sigma), (route, float(sigma))


def _division_probe(n: int, seed: int) -> torch.Tensor:
    """float32 values for W / sigma: random bit patterns, normal values over the exponent range, runs of plain
    values (whole blocks of eight on the reciprocal route, csrc/cpu_f32_loops.h), and +-0, infinities, NaN
    payloads, subnormals and the bounds of that route's range and their neighbours sprinkled between them."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)
    wide = torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-37, 38, (n,), generator=g).float())
    plain = torch.randn(n, generator=g)
    w = torch.where(torch.arange(n) % 3 == 0, bits, torch.where(torch.arange(n) % 3 == 1, wide, plain))
    w[torch.arange(n) % 96 < 48] = plain[torch.arange(n) % 96 < 48]  # half the blocks in range throughout
    edges = []
    for sigma in (1.0, 3.0, 0.3, 1e-30, 3e37):
        a = torch.tensor(sigma)
        for bound in (2.0 ** -100 * torch.clamp(a, min=1), 2.0 ** 100 * torch.clamp(a, max=1)):
            edges += [bound, torch.nextafter(bound, torch.tensor(0.0)), torch.nextafter(bound, torch.tensor(1e38))]
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-40, 1.17549435e-38,
                             3.4028235e38, -3.4028235e38] + [float(e) for e in edges])
    nan = torch.tensor([0x7FC00001, 0x7F800123, -0x00400001, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    where = torch.randint(0, n, (2 * (len(specials) + len(nan)),), generator=g)
    values = torch.cat([specials, nan, specials, nan])
    w[where] = values
    return w


def test_w_over_sigma_has_the_bits_of_the_division():
    """W / sigma on every float32 CPU route (per weight, the layout op's same-order route, the grouped op) is
    the division's result bit for bit, where the AVX2 table computes it from 1 / sigma with two FMAs
    (benchmarks/NOTES.md, L15; on a CPU without AVX2 and FMA the table divides, and this checks that): random
    bit patterns of W, NaN payloads, +-0, infinities, subnormals, the route's range bounds; sigma normal,
    tiny, huge, negative, subnormal, or with 1 / sigma subnormal."""
    ops = torch.ops.sn_kernels
    n = 5 * 13109  # rows of odd length, a tail after the blocks of eight
    for seed, sigma in enumerate((1.7, 3.0, 0.3, 1e-30, 3e37, -2.5, 2.0 ** -126, 1.5 * 2.0 ** 127, 1e-39, 1e-20)):
        w = _division_probe(n, seed).view(5, -1)
        u, v = torch.zeros(5), torch.zeros(w.shape[1])
        s = torch.tensor(sigma)
        expected = (w / s).view(torch.int32)
        for route, got in (("normalize", ops.native_normalize(w, u, v, s, 0)),
                           ("normalize dim 1", ops.native_normalize(w, u, v, s, 1)),
                           ("layout", ops.native_normalize_layout(w, u, v, s, 0, False))):
            assert torch.equal(got.view(torch.int32), expected), (route, sigma)
    # the grouped op divides by the sigma it computes: weights whose sigma stays finite, with zeros and
    # subnormals among plain values, a small weight (one item) and a large one (the phases), two threads
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(shape, generator=g) for shape in ((37, 53), (600, 520))]
    for w in weights:
        w.view(-1)[::97] = 0.0
        w.view(-1)[5::101] = -0.0
        w.view(-1)[9::89] = 1e-41
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g), dim=0) for w in weights]
    vs = [torch.nn.functional.normalize(torch.randn(w.shape[1], generator=g), dim=0) for w in weights]
    outs, sigmas, _, _ = ops.native_group_forward(weights, us, vs, [0, 0], 1, 1e-12, "uv", True)
    for w, out, sigma in zip(weights, outs, sigmas):
        assert torch.equal(out.view(torch.int32), (w / sigma).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_w_over_sigma_has_the_bits_of_the_float32_detour_for_every_value(dtype):
    """float16 and bfloat16 W / sigma (the AVX2 table's loops, which keep the division: benchmarks/NOTES.md, L15)
    equal PyTorch's own `W / sigma` in that dtype (a float32 division, rounded once)
    for every one of the 65536 bit patterns, each in blocks of plain values and beside them, and a tail.  NaN
    results are NaN; their bits are compared for float16 only: ATen's vectorized bfloat16 rounding makes
    every NaN 0xFFFF where its scalar one (c10::BFloat16, what these loops follow) makes 0x7FC0."""
    ops = torch.ops.sn_kernels
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    plain = torch.randn(every.numel(), generator=torch.Generator().manual_seed(3)).to(dtype)
    # each pattern both among other patterns and as the one odd lane of a block of plain values
    lone = plain.clone().view(-1, 8)
    lone[:, 3] = every.view(-1, 8)[:, 0]
    w = torch.cat([every, plain, lone.flatten(), every[:5]]).view(1, -1)
    u, v = torch.zeros(1, dtype=dtype), torch.zeros(w.shape[1], dtype=dtype)
    for sigma in (1.7, 0.3, 3e-5, 7e4, -2.5, 2.0 ** -126, 1e-39, 3e37):
        s = torch.tensor(sigma)
        expected = w / s  # ATen: float32 opmath, rounded to the dtype
        nan = expected.isnan()
        if dtype == torch.bfloat16:
            expected = expected.masked_fill(nan, 0)
        for route, got in (("normalize", ops.native_normalize(w, u, v, s, 0)),
                           ("layout", ops.native_normalize_layout(w, u, v, s, 0, False))):
            assert got.dtype == dtype and torch.equal(got.isnan(), nan), (route, sigma)
            if dtype == torch.bfloat16:
                got = got.masked_fill(nan, 0)
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (route, sigma)


_STREAM_CODE = """
import sys, torch
import sn_kernels
ops = torch.ops.sn_kernels
torch.manual_seed(0)
out = []
for shape, dim in (((1025, 2049), 0), ((4, 1000, 600), 1), ((2, 2100, 500), 1)):
    w = torch.randn(shape)
    G = torch.randn(shape)
    m = shape[dim]
    u = torch.nn.functional.normalize(torch.randn(m), dim=0)
    v = torch.nn.functional.normalize(torch.randn(w.numel() // m), dim=0)
    sigma = ops.native_power_iteration(w, u.clone(), v.clone(), 1, 1e-12, dim, "uv", False)[0]
    out += [ops.native_normalize(w, u, v, sigma, dim), ops.native_backward(G, w, u, v, sigma, dim),
            ops.native_normalize_layout(w, u, v, sigma, dim, False)]
    ws, sigmas, _, _ = ops.native_group_forward([w], [u.clone()], [v.clone()], [dim], 1, 1e-12, "uv", True)
    out += [ws[0], sigmas[0], ops.native_group_backward([G], [w], [u], [v], [sigma], [dim])[0]]
torch.save(out, sys.argv[1])
"""


def test_large_outputs_written_around_the_caches_have_the_same_bits(tmp_path):
    """W / sigma and grad_W of STREAM_MIN elements or more (csrc/cpu_stream.h: non-temporal stores through an L1
    buffer, rows from 500 to 2049 elements, unaligned row starts) are the bits of the plain stores
    (SN_KERNELS_STREAM=0), for the per-weight ops, the layout op and the grouped ops."""
    results = []
    for stream in ("1", "0"):
        path = tmp_path / f"out{stream}.pt"
        env = dict(os.environ, SN_KERNELS_STREAM=stream)
        r = subprocess.run([sys.executable, "-c", _STREAM_CODE, str(path)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(torch.load(path))
    assert len(results[0]) == 18
    for k, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and a.stride() == b.stride(), k
        assert torch.equal(a.view(torch.int32) if a.dim() else a, b.view(torch.int32) if b.dim() else b), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim", [((16, 12, 3, 3), 0), ((16, 12, 3, 3), 1), ((40, 70, 1, 3), 0), ((5, 2, 1, 1), 1)],
                         ids=str)
def test_layout_backward_reads_a_channels_last_grad_with_the_same_bits(shape, dim, dtype):
    """The layout op's backward from a channels-last G (the compiled convolution's, read block-transposed) gives
    the bits of the same-order route: the same row loop (grad_row_range) on each transposed block, so the
    float32 AVX2 loop's fused multiply-add is in both.  Integer-valued G and W make <G, W / sigma>'s sum exact in
    either storage order, so only the per-element arithmetic can differ; sigma 1 and 3 (multiplied by 1/3)."""
    gen = torch.Generator().manual_seed(3)
    G = torch.randint(-8, 9, shape, generator=gen).to(dtype)
    W = torch.randint(-8, 9, shape, generator=gen).to(dtype)
    m = shape[dim]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.nn.functional.normalize(torch.randn(m, generator=gen, dtype=torch.float64), dim=0).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(W.numel() // m, generator=gen, dtype=torch.float64), dim=0).to(dtype)
    cl = torch.channels_last
    for value in (1.0, 3.0):
        sigma = torch.tensor(value, dtype=acc)
        same = _ops().native_normalize_layout_backward(G, W, u, v, sigma, dim, False, None)
        moved = _ops().native_normalize_layout_backward(G.contiguous(memory_format=cl), W.contiguous(memory_format=cl),
                                                        u, v, sigma, dim, False, None)
        assert moved.is_contiguous() and same.is_contiguous()
        assert torch.equal(moved, same), (value, (moved != same).sum().item())
