"""``bound="operator"``: a certified bound on the layer's linear map, a convolution's included
(sn_kernels/certified.py: ``OperatorBound``, ``operator_bound``).

Checked against the exact float64 SVD of the dense Jacobian of small convolutions at every
forward of short Adam runs (lr 0.1), for every stride, padding mode, dilation and groups
setting and for transposed convolutions; the same runs with ``bound="upper"`` (the matrix
view) go above ``coeff`` on the operator, so the check can fail.  Tightness: a kernel that
repeats one matrix at every tap reaches the bound exactly with circular padding.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import sn_kernels
from helpers import record
from sn_kernels import certified
from sn_kernels import parametrizations as P
from sn_kernels.conv_norm import conv_spec, dense_operator_norm
from sn_kernels.find import find
from sn_kernels.hooks import SpectralNorm
from sn_kernels.testing import svd_sigma

pytestmark = pytest.mark.usefixtures("one_thread")

SLACK = 1e-12  # the float64 SVD's own error, relative
WRAP = {"hook": sn_kernels.spectral_norm, "param": P.spectral_norm}
ORIGINAL = {"hook": "weight_orig", "param": "parametrizations.weight.original"}

# (layer, input shape without the batch): every stride, padding mode, dilation and groups setting,
# transposed convolutions, inputs as small as each padding mode allows
LAYERS = {
    "conv2d": lambda: (nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),
    "stride2": lambda: (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
    "dilation": lambda: (nn.Conv2d(2, 4, (1, 3), dilation=2, padding=(0, 2)), (2, 5, 6)),
    "groups": lambda: (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
    "same_even": lambda: (nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 5, 5)),
    "circular": lambda: (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), (3, 5, 5)),
    "circular_wide": lambda: (nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"), (2, 2, 3)),
    "reflect": lambda: (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 3, 4)),
    "replicate": lambda: (nn.Conv2d(2, 2, 3, padding=2, padding_mode="replicate"), (2, 1, 3)),
    "conv1d": lambda: (nn.Conv1d(3, 2, 5, padding=2), (3, 9)),
    "conv3d": lambda: (nn.Conv3d(2, 2, 3, padding=1, stride=(1, 2, 1)), (2, 3, 4, 3)),
    "convT2d": lambda: (nn.ConvTranspose2d(4, 3, 3, padding=1), (4, 5, 5)),
    "convT_stride": lambda: (nn.ConvTranspose2d(3, 4, 4, stride=2, output_padding=1, groups=1), (3, 4, 4)),
    "convT_groups": lambda: (nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, dilation=2), (4, 6)),
}


def repeat_taps(layer: nn.Module) -> nn.Module:
    """The same matrix at every tap: the operator norm is as far above the matrix view's as it gets."""
    w = layer.weight
    with torch.no_grad():
        first = w[(Ellipsis,) + (slice(0, 1),) * (w.dim() - 2)]
        w.copy_(first.expand_as(w).clone())
    return layer


def train(module, in_shape, steps, check, lr=0.1, dtype=torch.float32):
    """Adam steps on a random linear loss, ``check(module)`` after every forward (the weight cached)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn((2,) + in_shape, generator=gen, dtype=dtype)
        with parametrize.cached():
            y = module(x)
            check(module)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=dtype)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("bound_every", [1, 3])
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("api", ["hook", "param"])
def test_operator_norm_at_most_coeff_at_every_step(api, name, bound_every):
    """The exact operator norm of W_sn (dense Jacobian, float64 SVD) is <= coeff at every training forward,
    the first included, and in eval mode; with bound="upper" the same run goes above coeff."""
    torch.manual_seed(0)
    base, shape = LAYERS[name]()
    repeat_taps(base)
    coeff = 0.5 if name in ("groups", "conv1d") else 1.0
    seen = {"upper": [], "operator": []}
    for bound in seen:
        layer = copy.deepcopy(base)
        WRAP[api](layer, bound=bound, bound_every=bound_every, coeff=coeff)
        train(layer, shape, 6, lambda m, b=bound: seen[b].append(dense_operator_norm(m, shape).item() / coeff))
        if bound == "operator":
            layer.eval()
            layer(torch.randn((1,) + shape))
            seen[bound].append(dense_operator_norm(layer, shape).item() / coeff)
    worst = max(seen["operator"])
    record(f"operator-certified ||conv(W_sn)||/coeff {api}", torch.tensor(worst), torch.tensor(1.0))
    assert worst <= 1 + SLACK, f"||conv(W_sn)|| = {worst!r} coeff"
    assert max(seen["upper"]) > 1.05  # the matrix view's certificate does not bound the operator
    assert find(layer, "weight").state.bound == "operator"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_tight_for_repeated_taps_with_circular_padding(api, dtype):
    """One matrix K at every tap, circular "same" padding: the operator norm is T sigma(K) (the zero
    frequency), and so is the bound (sqrt(T) times sigma of either view, sqrt(T) sigma(K)): W_sn's
    operator norm is coeff up to the rounding margins; a bound with a larger factor would fail this."""
    torch.manual_seed(0)
    layer, shape = repeat_taps(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").to(dtype)), (3, 5, 5)
    WRAP[api](layer, bound="operator", coeff=0.8)
    layer(torch.randn((1,) + shape, dtype=dtype))
    ratio = dense_operator_norm(layer, shape).item() / 0.8
    # float64: the refresh's margins (1e-12) and the Cholesky certificate's slack sqrt(1 + 2^-40) with its
    # backward error (cholesky_bound.py) leave W_sn's norm within 2e-12 of coeff
    assert 1 - (1e-5 if dtype == torch.float32 else 2e-12) < ratio <= 1 + SLACK


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("pad", [1, 2, 3])
def test_padding_multiplicity_is_the_most_reads_of_one_tap(mode, pad):
    """``_padding_multiplicity`` against a brute-force count: a kernel with a single identity tap is a 0/1
    matrix whose squared operator norm is the most times that tap reads one input element.  Over every
    tap and every input size PyTorch accepts (up to 9) the count never exceeds the multiplicity, and
    reaches it for some size."""
    k = 3
    conv = nn.Conv1d(1, 1, k, padding=pad, padding_mode=mode, bias=False)
    mult = certified._padding_multiplicity(conv_spec(conv))
    most = 0
    for n in range(1, 10):
        if (mode == "circular" and pad > n) or (mode == "reflect" and pad >= n):
            continue  # refused by F.pad
        for tap in range(k):
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[0, 0, tap] = 1
            count = round(dense_operator_norm(conv, (1, n)).item() ** 2)
            assert count <= mult, (n, tap)
            most = max(most, count)
    assert most == mult


def test_linear_is_its_matrix():
    """For a Linear layer the operator is the matrix: bound="operator" gives bound="upper"'s W_sn bit for bit."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    out = {}
    for bound in ("upper", "operator"):
        layer = copy.deepcopy(base)
        P.spectral_norm(layer, bound=bound, bound_every=2)
        train(layer, (7,), 4, lambda m: None)
        out[bound] = layer.weight.detach()
        assert find(layer, "weight").state.certifier.operator == (None if bound == "upper" else
                                                                    certified.OperatorBound())
    assert torch.equal(out["upper"], out["operator"])


@pytest.mark.parametrize("step", ["refresh", "carry"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_gradcheck(api, step):
    """gradcheck of the layer's output as a function of the raw weight (float64), at a refresh (the min of
    the two views' Gram bounds) and at a carry."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 2, 2, padding=1, padding_mode="reflect").double()
    WRAP[api](layer, bound="operator", bound_every=1 if step == "refresh" else 10 ** 9, coeff=0.7)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer(x)
    w = dict(layer.named_parameters())[ORIGINAL[api]].detach().clone()
    if step == "carry":
        w += 0.05 * torch.randn_like(w)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda weight: functional_call(layer, {ORIGINAL[api]: weight}, (x,)), (w,))


def test_sigmas_layers_and_copies():
    """sigmas() reports the operator divisor: 3 min(sigma(R), sigma(S)) for a 3x3 kernel with zero padding,
    up to the Gram iteration's looseness, and above the exact operator norm at the input size used; the SN*
    layers forward the keyword; a deep copy keeps the OperatorBound and refreshes."""
    torch.manual_seed(0)
    layer = sn_kernels.SNConv2d(2, 3, 3, padding=1, bound="operator", coeff=0.5)
    layer(torch.randn(1, 2, 6, 6))
    state = find(layer, "weight").state
    assert state.bound == "operator" and state.certifier.operator.conv
    den = sn_kernels.sigmas(layer)["weight"].item()
    w = layer.weight_orig.detach()
    formula = 3 * min(torch.linalg.svdvals(v.double())[0].item() for v in state.certifier.operator.views(w))
    assert formula <= den <= formula * 1.003
    assert den >= dense_operator_norm(layer, (2, 6, 6), weight=w).item()
    twin = copy.deepcopy(layer)
    assert find(twin, "weight").state.certifier.operator == state.certifier.operator
    assert find(twin, "weight").state.certifier.ref is None


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True, backend="aot_eager") of a certified convolution (the two views and their
    minimum traced): eager's output and gradient (bound_every=1, the schedule compiled code follows; the
    front ends' compiled paths are tests/test_certified.py's)."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    P.spectral_norm(model, bound="operator", coeff=0.8)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    out, ref = compiled(x), eager(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_errors():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4, 5))

    for wrap in WRAP.values():
        with pytest.raises(ValueError, match="bound='operator' knows"):
            wrap(Odd(), bound="operator")
        with pytest.raises(ValueError, match="mode='matrix'"):
            wrap(nn.Conv2d(2, 2, 3), bound="operator", mode="conv")
        with pytest.raises(ValueError, match="gain"):
            wrap(nn.Conv2d(2, 2, 3), bound="operator", gain=True)
    layer = Odd()
    with pytest.raises(ValueError):
        P.spectral_norm(layer, bound="operator")
    assert not sn_kernels.is_spectral_normalized(layer)  # nothing half-registered
    with pytest.raises(ValueError, match="knows"):  # a bare conv weight: its operator is unknown
        P.SpectralNormParametrization(nn.Conv2d(2, 2, 3).weight, bound="operator")
    with pytest.raises(ValueError, match="OperatorBound"):
        SpectralNorm(bound="operator")
