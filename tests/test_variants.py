"""Variants: Lipschitz coefficient (hard and soft) and learnable gain, through the op and
both front ends, against float64 / SVD references."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_kernels
from sn_kernels.testing import svd_sigma
from helpers import check, planted

WRAPS = {"hook": sn_kernels.spectral_norm, "param": sn_kernels.parametrizations.spectral_norm}


def _unit(n, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, dtype=dtype), dim=0)


@pytest.mark.parametrize("coeff,soft", [(0.5, False), (2.0, False), (0.5, True), (10.0, True)])
def test_lipschitz_forward_matches_reference(coeff, soft):
    w = torch.randn(9, 6, dtype=torch.float64)
    u, v = _unit(9), _unit(6)
    w_sn, sigma = sn_kernels.spectral_normalize(w, u, v, training=False, coeff=coeff, soft=soft)
    expected = w / max(1.0, sigma.item() / coeff) if soft else w * coeff / sigma
    check("coeff output vs float64", w_sn, expected)


@pytest.mark.parametrize("coeff,soft", [(0.5, False), (0.5, True), (100.0, True)])
@pytest.mark.parametrize("training", [False, True])
def test_lipschitz_gradcheck(coeff, soft, training):
    """coeff=100 (soft) keeps sigma < coeff: W passes through; 0.5: sigma > coeff."""
    mat = planted(7, 5, gap=0.3)
    U, _, Vh = torch.linalg.svd(mat)
    u0, v0 = U[:, 0].contiguous(), Vh[0].contiguous()
    w = mat.clone().requires_grad_()

    def fn(x):
        return sn_kernels.spectral_normalize(x, u0.clone(), v0.clone(), training=training, coeff=coeff,
                                             soft=soft)[0]

    assert torch.autograd.gradcheck(fn, (w,), atol=1e-6)


@pytest.mark.parametrize("coeff,soft,expected_norm", [(0.7, False, 0.7), (3.0, False, 3.0), (0.7, True, 0.7),
                                                      (5.0, True, 3.0)])
def test_lipschitz_spectral_norm_by_svd(coeff, soft, expected_norm):
    """At convergence |W_sn|_2 = coeff (hard) or min(sigma, coeff) (soft); planted sigma = 3."""
    w = planted(20, 12, gap=0.5)
    u, v = _unit(20), _unit(12)
    for _ in range(60):
        w_sn, _ = sn_kernels.spectral_normalize(w, u, v, coeff=coeff, soft=soft)
    check("coeff |W_sn|_2 vs SVD", torch.linalg.matrix_norm(w_sn, ord=2), torch.tensor(expected_norm,
                                                                                         dtype=torch.float64))


def test_soft_pitfall_gradient_is_radially_zero_above_coeff():
    """Documented pitfall: once sigma > coeff the soft form is scale-invariant in W, so the
    gradient has no component along W (it cannot shrink sigma back below coeff); below
    coeff the gradient is G itself."""
    w = planted(8, 6, gap=0.4)  # sigma = 3
    U, _, Vh = torch.linalg.svd(w)
    G = torch.randn(8, 6, dtype=torch.float64)
    for coeff, radial in ((1.0, 0.0), (10.0, None)):
        x = w.clone().requires_grad_()
        sn_kernels.spectral_normalize(x, U[:, 0].clone(), Vh[0].clone(), coeff=coeff, soft=True)[0].backward(G)
        if radial is not None:
            assert abs((x.grad * w).sum().item()) < 1e-12
        else:
            check("soft below coeff grad = G", x.grad, G)


@pytest.mark.parametrize("api", list(WRAPS))
def test_coeff_through_front_ends(api):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    WRAPS[api](lin, coeff=0.5)
    for _ in range(80):
        lin(torch.randn(2, 12))
    lin.eval()
    check("front-end coeff |W_sn|_2", svd_sigma(lin.weight.detach()).float(), torch.tensor(0.5), scale=100)
    plain, lipschitz = WRAPS[api](nn.Linear(3, 3)), WRAPS[api](nn.Linear(3, 3), coeff=0.5)
    assert list(lipschitz.state_dict()) == list(plain.state_dict())  # coeff adds no state


@pytest.mark.parametrize("api", list(WRAPS))
@pytest.mark.parametrize("layer", ["linear", "conv_transpose"])
def test_learnable_gain(api, layer):
    torch.manual_seed(0)
    if layer == "linear":
        mod, x = nn.Linear(10, 6), torch.randn(3, 10)
    else:
        mod, x = nn.ConvTranspose2d(4, 3, 3), torch.randn(2, 4, 5, 5)
    y_before = mod(x).detach()
    weight = mod.weight.detach().clone()
    WRAPS[api](mod, gain=True)
    gain = mod.weight_gain if api == "hook" else mod.parametrizations.weight[0].gain
    dim = 1 if layer == "conv_transpose" else 0
    check("gain init vs SVD", gain.detach().double(), svd_sigma(weight, dim), dtype=torch.float32)
    check("gain: wrapping keeps the output", mod(x), y_before, scale=10)
    mod(x).sum().backward()
    assert gain.grad is not None and gain.grad.abs() > 0
    key = "weight_gain" if api == "hook" else "parametrizations.weight.0.gain"
    assert key in mod.state_dict()
    mod.eval()
    y = mod(x).detach()
    if api == "hook":
        sn_kernels.remove_spectral_norm(mod)
        assert not hasattr(mod, "weight_gain")
    else:
        parametrize.remove_parametrizations(mod, "weight")
    check("gain: removal keeps gamma W / sigma", mod(x), y)


def test_bad_variant_arguments():
    w, u, v = torch.randn(4, 3), _unit(4, torch.float32), _unit(3, torch.float32)
    with pytest.raises(ValueError, match="coeff"):
        sn_kernels.spectral_normalize(w, u, v, coeff=0)
    with pytest.raises(ValueError, match="soft=True needs"):
        sn_kernels.spectral_normalize(w, u, v, soft=True)
    with pytest.raises(TypeError, match="gain"):
        sn_kernels.spectral_normalize(w, u, v, gain=torch.ones(2))
    with pytest.raises(ValueError, match="coeff"):
        sn_kernels.spectral_norm(nn.Linear(3, 3), coeff=-1.0)


@pytest.mark.parametrize("api", list(WRAPS))
def test_conv_mode_through_front_ends(api):
    from sn_kernels.conv_norm import dense_operator_norm

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    WRAPS[api](conv, mode="conv")
    assert sn_kernels.is_spectral_normalized(conv)
    x = torch.randn(1, 2, 6, 6)
    for _ in range(200):
        conv(x)
    sigma = sn_kernels.sigmas(conv)["weight"]
    raw = conv.weight_orig if api == "hook" else conv.parametrizations.weight.original
    check("conv mode sigma vs dense operator norm", sigma.double(),
          dense_operator_norm(conv, (2, 6, 6), weight=raw.detach()), dtype=torch.float32, scale=10)
    if api == "hook":
        sn_kernels.remove_spectral_norm(conv)
        assert not sn_kernels.is_spectral_normalized(conv)
    with pytest.raises(ValueError, match="mode='conv'"):
        WRAPS[api](nn.Conv2d(2, 3, 3), mode="conv", coeff=1.0)
    with pytest.raises(ValueError, match="mode must be"):
        WRAPS[api](nn.Conv2d(2, 3, 3), mode="operator")


def test_singular_values_is_exported():
    lin = sn_kernels.spectral_norm(nn.Linear(8, 6))
    s = sn_kernels.singular_values(lin, k=3, iters=50)
    check("singular_values vs svdvals", s.double(), torch.linalg.svdvals(lin.weight_orig.detach().double())[:3],
          dtype=torch.float32, scale=100)
