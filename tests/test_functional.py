"""The op itself through the front end: gradcheck, SVD, bad input (PyTorch's formula in float64 on
every backend: tests/test_contract.py)."""
import pytest
import torch

import sn_kernels
from sn_kernels.testing import as_matrix, svd_sigma
from helpers import SHAPES, check, planted



def _vectors(weight, dim, dtype=None):
    m, n = as_matrix(weight, dim).shape
    dtype = dtype or weight.dtype
    u = torch.nn.functional.normalize(torch.randn(m, dtype=torch.float64), dim=0).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(n, dtype=torch.float64), dim=0).to(dtype)
    return u, v


def test_eval_leaves_vectors_alone():
    weight = torch.randn(6, 9)
    u, v = _vectors(weight, 0)
    u0, v0 = u.clone(), v.clone()
    _, sigma = sn_kernels.spectral_normalize(weight, u, v, training=False)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    torch.testing.assert_close(sigma, torch.dot(u, weight @ v))


def test_sigma_is_last_norm_not_third_matvec():
    """sigma from the last norm equals u . (W v) with the updated vectors."""
    weight = torch.randn(20, 30, dtype=torch.float64)
    for order in ("vu", "uv"):
        u, v = _vectors(weight, 0)
        _, sigma = sn_kernels.spectral_normalize(weight, u, v, order=order)
        check("sigma last norm vs u.Wv", sigma, torch.dot(u, weight @ v))


@pytest.mark.parametrize("shape,dim", SHAPES)
def test_gradcheck_eval(shape, dim):
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    u, v = _vectors(weight.detach(), dim)
    fn = lambda w: sn_kernels.spectral_normalize(w, u, v, dim=dim, training=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight,))
    assert torch.autograd.gradgradcheck(fn, (weight,))


@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("m,n,dim", [(8, 5, 0), (1, 6, 0), (6, 1, 0), (4, 6, 1)])
def test_gradcheck_training_at_convergence(order, m, n, dim):
    """With u, v at the singular vectors the iteration is stationary, so the analytic
    gradient (u, v constant) is the true derivative of the training-mode op."""
    mat = planted(m, n, gap=0.3)
    U, S, Vh = torch.linalg.svd(mat)
    weight = (mat if dim == 0 else mat.t().contiguous()).requires_grad_()
    u0, v0 = U[:, 0].contiguous(), Vh[0].contiguous()

    def fn(w):
        return sn_kernels.spectral_normalize(w, u0.clone(), v0.clone(), dim=dim, order=order)[0]

    assert torch.autograd.gradcheck(fn, (weight,), atol=1e-6)


@pytest.mark.parametrize("m,n", [(40, 30), (1, 9), (9, 1), (64, 17)])
@pytest.mark.parametrize("order", ["vu", "uv"])
def test_svd_convergence_and_gradient(m, n, order):
    """sigma -> svdvals[0]; W/sigma has spectral norm 1; the gradient equals autograd
    through W / matrix_norm(W, ord=2)."""
    weight = planted(m, n, gap=0.5, seed=m + n)
    u, v = _vectors(weight, 0)
    for _ in range(60):
        w_sn, sigma = sn_kernels.spectral_normalize(weight, u, v, order=order)
    check("sigma vs SVD", sigma, svd_sigma(weight))
    check("|W/sigma|_2 vs 1", torch.linalg.matrix_norm(w_sn, ord=2), torch.ones((), dtype=torch.float64))

    G = torch.randn(m, n, dtype=torch.float64)
    w1 = weight.clone().requires_grad_()
    sn_kernels.spectral_normalize(w1, u, v, order=order)[0].backward(G)
    w2 = weight.clone().requires_grad_()
    (w2 / torch.linalg.matrix_norm(w2, ord=2)).backward(G)
    check("grad vs SVD autograd", w1.grad, w2.grad, scale=100)  # power-iteration residual ~ gap**60


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_backward_matches_float64(dtype):
    weight64 = torch.randn(12, 7, dtype=torch.float64)
    G = torch.randn(12, 7, dtype=torch.float64)
    u, v = _vectors(weight64, 0)
    grads = {}
    for dt in (torch.float64, dtype):
        w = weight64.to(dt).detach().clone().requires_grad_()
        sn_kernels.spectral_normalize(w, u.to(dt), v.to(dt), training=False)[0].backward(G.to(dt))
        grads[dt] = w.grad
    check("grad vs float64", grads[dtype], grads[torch.float64], dtype)


# ------------------------------------------------------------------ bad input


def _args():
    w = torch.randn(4, 6)
    return w, torch.randn(4), torch.randn(6)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_power_iterations=0), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=-1), ValueError, "n_power_iterations"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-12), ValueError, "eps"),
    (dict(eps=float("inf")), ValueError, "eps"),  # PyTorch runs, and its u, v become zero for good
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(n_power_iterations=2.0), TypeError, "n_power_iterations must be an int"),
    (dict(n_power_iterations=True), TypeError, "n_power_iterations must be an int"),
    (dict(order="xy"), ValueError, "order"),
    (dict(dim=2), IndexError, "Dimension out of range"),
    (dict(backend="cuda"), ValueError, "unknown sn_kernels backend"),
])
def test_bad_arguments(kwargs, exc, match):
    w, u, v = _args()
    u0, v0 = u.clone(), v.clone()
    with pytest.raises(exc, match=match):
        sn_kernels.spectral_normalize(w, u, v, **kwargs)
    assert torch.equal(u, u0) and torch.equal(v, v0)


def test_bad_tensors():
    w, u, v = _args()
    with pytest.raises(TypeError, match="floating-point"):
        sn_kernels.spectral_normalize(torch.ones(4, 6, dtype=torch.long), u, v)
    with pytest.raises(ValueError, match="0-d"):
        sn_kernels.spectral_normalize(torch.tensor(1.0), u, v)
    with pytest.raises(ValueError, match=r"u must have shape \(4,\)"):
        sn_kernels.spectral_normalize(w, torch.randn(5), v)
    with pytest.raises(ValueError, match=r"v must have shape \(6,\)"):
        sn_kernels.spectral_normalize(w, u, torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        sn_kernels.spectral_normalize(w, u.double(), v)
    with pytest.raises(ValueError, match="contiguous"):
        sn_kernels.spectral_normalize(w, torch.randn(8)[::2], v)
    with pytest.raises(ValueError, match=r"v must have shape \(3,\)"):  # an empty weight's vectors checked too
        sn_kernels.spectral_normalize(torch.randn(0, 3), torch.randn(0), torch.randn(0))


def test_gain_flag_on_the_op_is_refused_by_name():
    """The front ends' gain=True is a flag; the op takes gamma itself (a one-element tensor)."""
    w, u, v = _args()
    with pytest.raises(TypeError, match="gain must be a one-element tensor"):
        sn_kernels.spectral_normalize(w, u, v, gain=True)
