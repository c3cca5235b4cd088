"""Faults: zero and non-finite weights must not poison u, v or produce NaN from 0/0."""
import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels.testing import svd_sigma
from helpers import check

@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_weight_gives_zero_not_nan(backend, order, training, dtype):
    w = torch.zeros(6, 5, dtype=dtype, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(6), dim=0).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(5), dim=0).to(dtype)
    u0, v0 = u.clone(), v.clone()
    w_sn, sigma = sn_kernels.spectral_normalize(w, u, v, order=order, training=training)
    assert torch.equal(w_sn, torch.zeros_like(w_sn)) and sigma.item() == 0
    assert torch.equal(u, u0) and torch.equal(v, v0), "a zero step must keep the previous vectors"
    w_sn.backward(torch.randn_like(w_sn))
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_skips_update_and_recovers(backend, order, bad):
    torch.manual_seed(0)
    w = torch.randn(8, 5)
    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    v = torch.nn.functional.normalize(torch.randn(5), dim=0)
    sn_kernels.spectral_normalize(w, u, v, order=order)
    u0, v0 = u.clone(), v.clone()
    poisoned = w.clone()
    poisoned[2, 3] = bad
    sn_kernels.spectral_normalize(poisoned, u, v, order=order)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    for _ in range(100):  # finite again: training continues normally
        w_sn, sigma = sn_kernels.spectral_normalize(w, u, v, order=order)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    check("sigma after recovery vs SVD", sigma, svd_sigma(w).float(), scale=10)


def test_non_finite_gradient_in_training(backend):
    """A NaN gradient step makes the weight NaN; after restoring it, training goes on."""
    torch.manual_seed(0)
    lin = sn_kernels.spectral_norm(nn.Linear(6, 4))
    good = lin.weight_orig.detach().clone()
    lin(torch.randn(3, 6)).sum().backward()
    lin.weight_orig.grad.fill_(float("nan"))
    with torch.no_grad():
        lin.weight_orig.sub_(lin.weight_orig.grad)
    u0 = lin.weight_u.clone()
    lin(torch.randn(3, 6))
    assert torch.equal(lin.weight_u, u0)
    with torch.no_grad():
        lin.weight_orig.copy_(good)
    for _ in range(60):
        y = lin(torch.randn(3, 6))
    assert torch.isfinite(y).all()
    check("sigma after NaN step vs SVD", sn_kernels.sigmas(lin)["weight"], svd_sigma(good).float(), scale=10)
