"""Complex weights: the parametrization API against PyTorch's (conjugate transposes),
gradcheck, backend routing, and the hook API's refusal."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sn_kernels
from sn_kernels import dispatch
from sn_kernels.backends import pytorch
from helpers import check, hook_of

COMPLEX = [torch.complex64, torch.complex128]
REAL_TOL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _pair(dtype, factory):
    torch.manual_seed(1)
    ref = factory(dtype)
    ours = copy.deepcopy(ref)
    torch.manual_seed(2)
    torch.nn.utils.parametrizations.spectral_norm(ref)
    torch.manual_seed(2)
    sn_kernels.parametrizations.spectral_norm(ours)
    return ref, ours


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("layer", ["linear", "tall", "wide"])
def test_parametrization_matches_pytorch_step_by_step(dtype, layer):
    shapes = {"linear": (5, 4), "tall": (3, 9), "wide": (9, 3)}
    ref, ours = _pair(dtype, lambda dt: nn.Linear(*shapes[layer], dtype=dt))
    tol = REAL_TOL[dtype]
    opt_ref, opt_ours = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, shapes[layer][0], dtype=dtype)
        y_ref, y_ours = ref(x), ours(x)
        check("complex output vs PyTorch", y_ours, y_ref, dtype=tol)
        for name in ("_u", "_v"):
            check(f"complex {name} vs PyTorch", getattr(ours.parametrizations.weight[0], name),
                  getattr(ref.parametrizations.weight[0], name), dtype=tol)
        g = torch.randn_like(y_ref)
        for opt, y in ((opt_ref, y_ref), (opt_ours, y_ours)):
            opt.zero_grad()
            y.backward(g)
            opt.step()
        check("complex grad vs PyTorch", ours.parametrizations.weight.original.grad,
              ref.parametrizations.weight.original.grad, dtype=tol, scale=10)
    ref.eval(), ours.eval()
    x = torch.randn(2, shapes[layer][0], dtype=dtype)
    check("complex eval output vs PyTorch", ours(x), ref(x), dtype=tol)


@pytest.mark.parametrize("dtype", COMPLEX)
def test_sigma_is_the_top_singular_value(dtype):
    w = torch.randn(6, 4, dtype=dtype)
    u = F.normalize(torch.randn(6, dtype=dtype), dim=0)
    v = F.normalize(torch.randn(4, dtype=dtype), dim=0)
    w_sn, sigma = sn_kernels.spectral_normalize(w, u, v, n_power_iterations=200, order="uv")
    assert sigma.dtype == REAL_TOL[dtype] and not sigma.requires_grad
    exact = torch.linalg.svdvals(w)[0]
    torch.testing.assert_close(sigma, exact.to(sigma.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.linalg.svdvals(w_sn)[0], torch.ones((), dtype=sigma.dtype), rtol=1e-5, atol=1e-6)
    assert torch.linalg.vector_norm(u).item() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("order", ["uv", "vu"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck(order, dim):
    w = torch.randn(4, 3, 2, dtype=torch.complex128, requires_grad=True)
    m, n = pytorch.as_matrix(w, dim).shape
    u0 = F.normalize(torch.randn(m, dtype=torch.complex128), dim=0)
    v0 = F.normalize(torch.randn(n, dtype=torch.complex128), dim=0)
    u0, v0, _ = pytorch.power_iteration(pytorch.as_matrix(w.detach(), dim), u0, v0, 3, 1e-12, order)

    def eval_mode(weight):  # sigma = u^H W v with u, v fixed: a function of W alone
        return sn_kernels.spectral_normalize(weight, u0.clone(), v0.clone(), dim=dim, order=order,
                                             training=False)[0]

    assert torch.autograd.gradcheck(eval_mode, (w,))
    assert torch.autograd.gradgradcheck(eval_mode, (w,))


def test_gradcheck_through_a_module_in_both_modes():
    """As PyTorch's test: u, v reset before each evaluation, train and eval forwards in one graph."""
    m = sn_kernels.parametrizations.spectral_norm(nn.Linear(3, 4, dtype=torch.complex128))
    sn = m.parametrizations.weight[0]
    saved = sn._u.clone(), sn._v.clone()

    def fn(x):
        sn._u.data.copy_(saved[0])
        sn._v.data.copy_(saved[1])
        outs = []
        for training in (True, False, True):
            m.train(training)
            outs.append(m(x))
        return sum(outs)

    assert torch.autograd.gradcheck(fn, (torch.randn(2, 3, dtype=torch.complex128, requires_grad=True),))
    m.eval()
    assert torch.autograd.gradcheck(lambda w: m(torch.ones(1, 3, dtype=torch.complex128)),
                                    (m.parametrizations.weight.original,))


def test_auto_routes_complex_to_torch_and_real_only_backends_say_why():
    w = torch.randn(4, 3, dtype=torch.complex64)
    u, v = F.normalize(torch.randn(4, dtype=w.dtype), dim=0), F.normalize(torch.randn(3, dtype=w.dtype), dim=0)
    dispatch.check_complex("auto")  # complex weights run on the torch backend: no refusal
    dispatch.check_complex("torch")
    for name in ("native", "triton"):
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run complex weights: .*real dtypes"):
            sn_kernels.spectral_normalize(w, u.clone(), v.clone(), backend=name)
    with sn_kernels.use_backend("auto"):
        ref = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), backend="torch")[0]
        torch.testing.assert_close(sn_kernels.spectral_normalize(w, u.clone(), v.clone())[0], ref, rtol=0, atol=0)
    assert "complex weights: torch backend" in sn_kernels.explain("cpu")


def test_refusals():
    m = nn.Linear(3, 4, dtype=torch.complex64)
    for kwargs in ({"coeff": 2.0}, {"gain": True}):
        with pytest.raises(ValueError, match="real weights only"):
            sn_kernels.parametrizations.spectral_norm(m, **kwargs)
    with pytest.raises(TypeError, match="hook API .* refuses complex weights"):
        sn_kernels.spectral_norm(m)
    assert not sn_kernels.is_spectral_normalized(m)
    w = m.weight.detach()
    u, v = F.normalize(torch.randn(4, dtype=w.dtype), dim=0), F.normalize(torch.randn(3, dtype=w.dtype), dim=0)
    with pytest.raises(ValueError, match="real weights only"):
        sn_kernels.spectral_normalize(w, u, v, coeff=1.0)


def test_convert_leaves_pytorch_hook_on_complex_weight():
    """PyTorch's hook gets sigma wrong for complex weights; convert keeps it (and says so) instead of
    silently changing the numbers."""
    m = torch.nn.utils.spectral_norm(nn.Linear(3, 4, dtype=torch.complex64))
    p = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4, dtype=torch.complex64))
    model = nn.Sequential(m, p)
    with pytest.warns(UserWarning, match="complex weight"):
        sn_kernels.convert(model)
    assert not isinstance(hook_of(m), sn_kernels.hooks.SpectralNorm)
    assert isinstance(p.parametrizations.weight[0], sn_kernels.parametrizations.SpectralNormParametrization)


def test_complex_vector_and_sigmas():
    m = nn.Linear(3, 4, dtype=torch.complex128)
    sn_kernels.parametrizations.spectral_norm(m, "bias")
    torch.testing.assert_close(torch.linalg.vector_norm(m.bias), torch.ones((), dtype=torch.float64))
    sn_kernels.parametrizations.spectral_norm(m)
    sigma = sn_kernels.sigmas(m)["weight"]
    assert sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, torch.linalg.svdvals(m.parametrizations.weight.original)[0].detach(),
                               rtol=1e-3, atol=0)


@pytest.mark.filterwarnings("ignore:Complex modules")  # PyTorch's note on .to(complex64)
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_hook_refuses_complex_weight_after_to(grouped, training):
    """A real layer wrapped by the hook API, then ``.to(complex64)``: its forward raises the wrap-time
    refusal (PyTorch's hook would run with plain transposes, ours with conjugate ones: neither is both
    PyTorch's and right), before any u, v moves, also when ``sn_kernels.group`` computes the weights."""
    with pytest.raises(TypeError) as at_wrap:
        sn_kernels.spectral_norm(nn.Linear(6, 5, dtype=torch.complex64))
    model = nn.Sequential(sn_kernels.spectral_norm(nn.Linear(6, 5)), sn_kernels.spectral_norm(nn.Linear(5, 4)))
    model.to(torch.complex64).train(training)
    if grouped:
        sn_kernels.group(model)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(TypeError) as at_forward:
        model(torch.randn(2, 6, dtype=torch.complex64))
    # the group checks every layer before any iterates, and names the first refused
    want = f"sn_kernels.group: 0.weight: {at_wrap.value}" if grouped else str(at_wrap.value)
    assert str(at_forward.value) == want
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, state[k], rtol=0, atol=0, msg=k)
