"""Top-k singular values for monitoring (sn_kernels.monitor)."""
import pytest
import torch
from torch import nn

import sn_kernels
from helpers import check, planted
from sn_kernels.conv_norm import spectral_norm_conv
from sn_kernels.monitor import BASIS_PREFIX, singular_values
from sn_kernels.testing import as_matrix


pytestmark = pytest.mark.usefixtures("one_thread")


WRAPPERS = {
    "plain": lambda m: m,
    "ours_hook": sn_kernels.spectral_norm,
    "ours_param": sn_kernels.parametrizations.spectral_norm,
    "torch_hook": torch.nn.utils.spectral_norm,
    "torch_param": torch.nn.utils.parametrizations.spectral_norm,
    "conv_hook": lambda m: spectral_norm_conv(m, api="hook"),
    "conv_param": lambda m: spectral_norm_conv(m, api="parametrization"),
}


def planted_module(kind: str, dtype=torch.float64):
    """A module whose raw weight's matrix view (along its SN dim) has a planted spectrum."""
    if kind == "linear":
        m = nn.Linear(20, 12)
        W, dim = planted(12, 20), 0
    elif kind == "conv":
        m = nn.Conv2d(5, 8, 3)
        W, dim = planted(8, 45), 0
    else:  # ConvTranspose: torch's SN dim is 1
        m = nn.ConvTranspose2d(6, 7, 2)
        W, dim = planted(7, 24), 1
    m = m.to(dtype)
    with torch.no_grad():
        shape = list(m.weight.shape)
        shape.insert(0, shape.pop(dim))
        m.weight.copy_(W.reshape(shape).movedim(0, dim))
    return m, W.to(dtype)


@pytest.mark.parametrize("kind,wrap", [(kind, wrap) for kind in ("linear", "conv", "convT") for wrap in WRAPPERS
                                       if kind != "linear" or not wrap.startswith("conv_")])  # conv mode: convs only
def test_converges_to_svdvals(kind, wrap):
    m, W = planted_module(kind)
    WRAPPERS[wrap](m)
    expected = torch.linalg.svdvals(W)[:4]
    s = singular_values(m, k=4, iters=30)
    assert s.shape == (4,) and not s.requires_grad
    check("monitor top-k vs svdvals", s, expected)
    check("monitor top-1 vs svdvals", singular_values(m, k=1, iters=30), expected[:1])


@pytest.mark.parametrize("wrap", ["ours_hook", "ours_param", "torch_hook", "torch_param", "conv_hook", "conv_param"])
def test_leaves_state_alone(wrap):
    m, _ = planted_module("conv")
    WRAPPERS[wrap](m)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    m(x)
    before = {k: t.clone() for k, t in m.state_dict().items()}
    m.eval()
    y = m(x)
    rng = torch.get_rng_state()
    singular_values(m, k=3, iters=2)
    singular_values(m, k=5, iters=1)
    assert torch.equal(rng, torch.get_rng_state())
    after = m.state_dict()
    assert list(before) == list(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k  # u, v, weights untouched
    assert BASIS_PREFIX + "weight" in m._buffers and m._buffers[BASIS_PREFIX + "weight"].shape == (45, 5)
    assert torch.equal(m(x), y)


def test_basis_persists_across_calls():
    """One step per call: the estimates converge over calls, as during training."""
    m, W = planted_module("linear")
    sn_kernels.spectral_norm(m)
    expected = torch.linalg.svdvals(W)[:3]
    errors = []
    for _ in range(40):
        errors.append((singular_values(m, k=3, iters=1) - expected).abs().max().item())
    assert errors[-1] < 1e-10 and errors[-1] < errors[0]
    # fewer values after: kept columns are the top Ritz vectors, still converged
    check("monitor k shrink", singular_values(m, k=2, iters=0), expected[:2])


def test_dtypes():
    m, W = planted_module("linear", dtype=torch.float32)
    assert singular_values(m, k=2, iters=20).dtype == torch.float32
    m16 = nn.Linear(8, 6).to(torch.bfloat16)
    s = singular_values(m16, k=2, iters=20)
    assert s.dtype == torch.float32
    expected = torch.linalg.svdvals(m16.weight.float())[:2]
    check("monitor bf16 weight", s, expected, dtype=torch.float32)


@pytest.mark.parametrize("k", [0, 13, 2.0, True])
def test_bad_k(k):
    m, _ = planted_module("linear")
    with pytest.raises(ValueError, match="k must be"):
        singular_values(m, k=k)


def test_bad_iters_and_name():
    m, _ = planted_module("linear")
    with pytest.raises(ValueError, match="iters"):
        singular_values(m, iters=-1)
    with pytest.raises(ValueError, match="no weight"):
        singular_values(m, name="nope")


def test_uses_sn_dim():
    """A custom dim on the hook is honoured: the values are those of that matrix view."""
    m = nn.Linear(9, 5).double()
    sn_kernels.spectral_norm(m, dim=1)
    expected = torch.linalg.svdvals(as_matrix(m.weight_orig.detach(), 1))[:2]
    check("monitor dim=1", singular_values(m, k=2, iters=200), expected, scale=1e3)


def test_singular_values_of_a_complex_weight():
    """A complex weight (parametrization API): the singular values of W itself, not of its real part."""
    torch.manual_seed(0)
    m = sn_kernels.parametrizations.spectral_norm(nn.Linear(6, 5).to(torch.complex128))
    w = m.parametrizations.weight.original.detach()
    got = sn_kernels.singular_values(m, k=2, iters=60)
    torch.testing.assert_close(got, torch.linalg.svdvals(w)[:2], rtol=1e-8, atol=0)


def test_tools_under_another_default_device():
    """sigma_bounds, lipschitz_bound and singular_values of a CPU model inside ``with torch.device("meta")``
    (or set_default_device): the numbers they give outside it (they made host tensors on the default device)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    outside = (sn_kernels.sigma_bounds(model[0], input_shape=(2, 5, 5)),
               sn_kernels.lipschitz_bound(model, (1, 2, 5, 5)), singular_values(model[3], k=2, iters=5))
    del model[3]._buffers[BASIS_PREFIX + "weight"]  # a first call again
    with torch.device("meta"):
        inside = (sn_kernels.sigma_bounds(model[0], input_shape=(2, 5, 5)),
                  sn_kernels.lipschitz_bound(model, (1, 2, 5, 5)), singular_values(model[3], k=2, iters=5))
    assert inside[:2] == outside[:2]
    torch.testing.assert_close(inside[2], outside[2], rtol=0, atol=0)
