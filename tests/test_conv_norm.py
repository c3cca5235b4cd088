"""Spectral norm by the convolution operator norm (sn_kernels.conv_norm)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from helpers import check, record
from sn_kernels.conv_norm import (
    conv_adjoint,
    conv_apply,
    conv_power_iteration,
    conv_spec,
    conv_spectral_normalize,
    dense_operator_norm,
    fft_operator_norm,
    remove_spectral_norm_conv,
    reset_spectral_norm_conv,
    spectral_norm_conv,
)
from sn_kernels.testing import as_matrix

# (constructor, input spatial size): every padding mode, stride 1/2, 'same'/'valid',
# asymmetric 'same', dilation, groups, output_padding, 1-D/2-D/3-D, transposed
CONFIGS = [
    (lambda: nn.Conv1d(3, 4, 3), (9,)),
    (lambda: nn.Conv1d(3, 4, 4, stride=2, padding=1, dilation=2, padding_mode="circular"), (9,)),
    (lambda: nn.Conv1d(4, 6, 3, padding="same", groups=2, padding_mode="replicate"), (7,)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 6)),
    (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (7, 6)),
    (lambda: nn.Conv2d(4, 4, 4, padding="same"), (5, 6)),  # asymmetric zero 'same'
    (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2), (6, 5)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, padding_mode="reflect"), (7, 7)),
    (lambda: nn.Conv2d(3, 4, (3, 2), padding=(1, 2), padding_mode="circular"), (5, 6)),
    (lambda: nn.Conv2d(2, 3, 2, padding="same", padding_mode="reflect"), (5, 5)),  # asymmetric reflect
    (lambda: nn.Conv2d(3, 4, 3, padding="valid", stride=(2, 1)), (7, 6)),
    (lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (5, 4, 5)),
    (lambda: nn.Conv3d(2, 4, 2, padding="same", padding_mode="replicate", groups=2), (4, 3, 4)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (6,)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 5)),
    (lambda: nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (4, 4)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=3, dilation=2, output_padding=2), (3, 3)),
    (lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1), (3, 3, 2)),
]
IDS = [f"cfg{i}" for i in range(len(CONFIGS))]


def make(i, dtype=torch.float64):
    ctor, spatial = CONFIGS[i]
    torch.manual_seed(i)
    return ctor().to(dtype), spatial


def input_shape(module, spatial):
    c_in = module.in_channels
    return (1, c_in, *spatial)


def wrapped_and_run(i, api="hook"):
    """Layer ``i`` wrapped by ``spectral_norm_conv`` and run once on a random input: (module, input)."""
    m, spatial = make(i)
    spectral_norm_conv(m, api=api)
    x = torch.randn(input_shape(m, spatial), dtype=torch.float64)
    m(x)
    return m, x


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]


def converged_sigma(spec, weight, shape, max_iters=4000, chunk=50):
    """(u, v, sigma) after power iteration from a fixed random start, run until sigma stops
    moving (sigma rises monotonically: a change below 1e-13 over a chunk means converged)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(shape, generator=g, dtype=weight.dtype)
    u = conv_apply(spec, weight, v)
    u, v, sigma = conv_power_iteration(spec, weight, u / u.norm(), v / v.norm(), chunk, 1e-12)
    for _ in range(max_iters // chunk):
        previous = sigma
        u, v, sigma = conv_power_iteration(spec, weight, u, v, chunk, 1e-12)
        if sigma - previous <= 1e-13 * sigma:
            break
    return u, v, sigma


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_operator_and_adjoint(i):
    """A is the layer's map without bias; <A x, y> = <x, A^T y>; A^T equals autograd's vjp."""
    m, spatial = make(i)
    spec = conv_spec(m)
    x = torch.randn(input_shape(m, spatial), dtype=torch.float64)
    w = m.weight.detach()
    with torch.no_grad():
        y_layer = m(x)
    ax = conv_apply(spec, w, x)
    bias = m.bias.detach().view(1, -1, *([1] * spec.ndim))
    check("conv A vs layer", ax + bias, y_layer)
    y = torch.randn_like(ax)
    aty = conv_adjoint(spec, w, y, x.shape)
    assert aty.shape == x.shape
    lhs, rhs = (ax * y).sum(), (x * aty).sum()
    check("conv adjoint identity", lhs.reshape(1), rhs.reshape(1), scale=10)
    xr = torch.zeros_like(x, requires_grad=True)
    (vjp,) = torch.autograd.grad(conv_apply(spec, w, xr), xr, y)
    check("conv adjoint vs vjp", aty, vjp)


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_sigma_matches_dense_norm(i):
    m, spatial = make(i)
    spec = conv_spec(m)
    shape = input_shape(m, spatial)
    _, _, sigma = converged_sigma(spec, m.weight.detach(), shape)
    dense = dense_operator_norm(m, shape)
    record("conv sigma vs dense", sigma.reshape(1), dense.reshape(1))
    torch.testing.assert_close(sigma, dense, rtol=1e-6, atol=0)


@pytest.mark.parametrize("k,n", [(3, 8), (5, 7)])
def test_sigma_matches_fft_norm_circular(k, n):
    m = nn.Conv2d(4, 5, k, padding="same", padding_mode="circular").double()
    spec = conv_spec(m)
    shape = (1, 4, n, n)
    _, _, sigma = converged_sigma(spec, m.weight.detach(), shape)
    fft = fft_operator_norm(m.weight.detach(), (n, n))
    dense = dense_operator_norm(m, shape)
    record("conv sigma vs fft", sigma.reshape(1), fft.reshape(1))
    torch.testing.assert_close(fft, dense, rtol=1e-10, atol=0)
    torch.testing.assert_close(sigma, fft, rtol=1e-6, atol=0)


def test_operator_norm_differs_from_matrix_sigma():
    """The reshaped-matrix sigma is a proxy whose ratio to the operator norm depends on stride."""
    torch.manual_seed(0)
    ratios = []
    for stride in (1, 2):
        m = nn.Conv2d(4, 4, 3, stride=stride, padding=1).double()
        matrix_sigma = torch.linalg.svdvals(as_matrix(m.weight.detach(), 0))[0]
        ratios.append((dense_operator_norm(m, (1, 4, 8, 8)) / matrix_sigma).item())
    assert all(abs(r - 1) > 0.1 for r in ratios), ratios
    assert abs(ratios[0] - ratios[1]) > 0.1, ratios


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("i", [4, 7, 14], ids=["conv_s2", "reflect", "convT_groups"])
def test_normalized_layer_has_unit_norm(api, i):
    m, spatial = make(i)
    spectral_norm_conv(m, api=api, n_power_iterations=50)
    x = torch.randn(input_shape(m, spatial), dtype=torch.float64)
    for _ in range(6):
        m(x)
    m.eval()
    m(x)
    norm = dense_operator_norm(m, x.shape)
    record("conv W/sigma dense norm", norm.reshape(1), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(norm, torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("i", [3, 9, 14], ids=["conv", "reflect_same", "convT"])
def test_gradcheck_eval(i):
    m, spatial = make(i)
    spec = conv_spec(m)
    shape = input_shape(m, spatial)
    u = torch.randn(conv_apply(spec, m.weight.detach(), torch.zeros(shape, dtype=torch.float64)).shape,
                    dtype=torch.float64)
    v = torch.randn(shape, dtype=torch.float64)
    w = m.weight.detach().clone().requires_grad_()
    f = lambda w: conv_spectral_normalize(spec, w, u, v, training=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,), fast_mode=True)


def test_gradcheck_training_at_convergence():
    m, spatial = make(3)
    spec = conv_spec(m)
    u, v, _ = converged_sigma(spec, m.weight.detach(), input_shape(m, spatial))
    w = m.weight.detach().clone().requires_grad_()
    f = lambda w: conv_spectral_normalize(spec, w, u.clone(), v.clone(), training=True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,), atol=1e-5, rtol=1e-4, fast_mode=True)


def test_training_gradient_matches_autograd_formula():
    """grad of W/sigma with u, v constants equals autograd through sigma_attached = <u, A_W v>."""
    m, spatial = make(7)
    spec = conv_spec(m)
    shape = input_shape(m, spatial)
    v0 = torch.randn(shape, dtype=torch.float64)  # u, v far from converged on purpose
    u0 = conv_apply(spec, m.weight.detach(), v0)
    u, v = u0.clone(), v0.clone()
    w = m.weight.detach().clone().requires_grad_()
    out, sigma = conv_spectral_normalize(spec, w, u, v, training=True)
    G = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, w, G)
    w2 = m.weight.detach().clone().requires_grad_()
    s_att = (u * conv_apply(spec, w2, v)).sum()  # u, v: the updated buffers = the vectors used
    (ref,) = torch.autograd.grad(w2 / (sigma + (s_att - s_att.detach())), w2, G)
    check("conv grad vs autograd", grad, ref)


def test_eval_leaves_uv_and_training_updates():
    m, x = wrapped_and_run(3)
    u, v = m.weight_u.clone(), m.weight_v.clone()
    m.eval()
    m(x)
    assert torch.equal(u, m.weight_u) and torch.equal(v, m.weight_v)
    m.train()
    m(x)
    assert not torch.equal(u, m.weight_u)


def test_front_ends_agree_and_keys():
    outs, keys = [], []
    for api in ("hook", "parametrization"):
        m, spatial = make(4)
        spectral_norm_conv(m, api=api)
        x = torch.randn(input_shape(m, spatial), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(5)
        outs.append(m(x))
        keys.append(sorted(m.state_dict()))
    assert torch.equal(outs[0], outs[1])
    assert keys[0] == ["bias", "weight_orig", "weight_u", "weight_v"]
    assert keys[1] == ["bias", "parametrizations.weight.0._u", "parametrizations.weight.0._v",
                       "parametrizations.weight.original"]


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_state_dict_round_trip(api):
    a, x = wrapped_and_run(5, api)
    a(x)
    b, _ = make(5)
    spectral_norm_conv(b, api=api)
    b.load_state_dict(a.state_dict())
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    # a second round trip through a deepcopy-ed, already initialised module of another size
    c = copy.deepcopy(b)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(x), a(x))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_input_size_change(api):
    m, _ = make(3)
    spectral_norm_conv(m, api=api)
    m(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"initialised for input size \(8, 8\) but got \(6, 5\)"):
        m(torch.randn(1, 3, 6, 5, dtype=torch.float64))
    reset_spectral_norm_conv(m)
    m(torch.randn(2, 3, 6, 5, dtype=torch.float64))
    m2, _ = make(3)
    spectral_norm_conv(m2, api=api, reinit_on_resize=True)
    m2(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    m2(torch.randn(3, 6, 5, dtype=torch.float64))  # unbatched, new size: re-drawn
    v = m2.weight_v if api == "hook" else m2.parametrizations.weight[0]._v
    assert v.shape == (1, 3, 6, 5)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_remove(api):
    m, x = wrapped_and_run(14, api)
    m.eval()
    y = m(x)
    remove_spectral_norm_conv(m)
    assert isinstance(m.weight, nn.Parameter) and not parametrize.is_parametrized(m)
    assert not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs and not m._load_state_dict_pre_hooks
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)
    assert sorted(m.state_dict()) == ["bias", "weight"]
    with pytest.raises(ValueError):
        remove_spectral_norm_conv(m)


def test_parametrization_before_forward_and_input_size():
    m, _ = make(3)
    spectral_norm_conv(m, api="parametrization")
    with pytest.raises(RuntimeError, match="first forward"):
        m.weight
    m2, _ = make(3)
    spectral_norm_conv(m2, api="parametrization", input_size=(8, 8))
    assert m2.parametrizations.weight[0]._v.shape == (1, 3, 8, 8)
    m2.weight  # now fine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights(dtype):
    m = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    spectral_norm_conv(m)
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    m(x).float().sum().backward()
    hook = next(iter(m._forward_pre_hooks.values()))
    assert m.weight_u.dtype == dtype and m.weight_v.dtype == dtype and hook.sigma.dtype == torch.float32
    assert m.weight.dtype == dtype and m.weight_orig.grad.dtype == dtype
    ref = dense_operator_norm(m, x.shape, weight=m.weight_orig.detach())
    torch.testing.assert_close(hook.sigma.double(), ref, rtol=2e-2, atol=0)


def test_bad_module_type():
    with pytest.raises(TypeError, match="Linear"):
        conv_spec(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="Embedding"):
        spectral_norm_conv(nn.Embedding(3, 4))
    m = nn.Conv2d(3, 4, 3)
    spectral_norm_conv(m)
    with pytest.raises(RuntimeError, match="two"):
        spectral_norm_conv(m)
    with pytest.raises(ValueError, match="api"):
        spectral_norm_conv(nn.Conv2d(3, 4, 3), api="nope")


def test_pickle_and_output_size():
    import io

    m = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
    spectral_norm_conv(m)
    x = torch.randn(1, 3, 5, 5)
    m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    with pytest.raises(NotImplementedError, match="output_size"):
        m(x, output_size=(10, 10))


def test_zero_weight_keeps_vectors_finite():
    m = nn.Conv2d(2, 3, 3, padding=1)
    spectral_norm_conv(m)
    x = torch.randn(1, 2, 5, 5)
    m(x)
    with torch.no_grad():
        m.weight_orig.zero_()
    m(x)
    # sigma = 0: u, v keep their last finite values and recover
    assert torch.isfinite(m.weight_u).all() and torch.isfinite(m.weight_v).all()
    with torch.no_grad():
        m.weight_orig.normal_()
    m(x)
    assert torch.isfinite(m.weight).all()


def wrap_api(api):
    """The public front end of ``api`` (mode="conv" is passed by the caller)."""
    import sn_kernels

    return sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_first_forward_under_inference_mode_then_training(api, dtype):
    """u, v drawn under torch.inference_mode (a validation pass before training, or after
    reset_spectral_norm_conv) are normal tensors: the next training forward updates them in place."""
    m = wrap_api(api)(nn.Conv2d(3, 4, 3, padding=1).to(dtype), mode="conv")
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    for first in range(2):
        if first:
            with torch.inference_mode():
                reset_spectral_norm_conv(m)
        m.eval()
        with torch.inference_mode():
            m(x)
        assert not any(b.is_inference() for b in m.buffers())
        m.train()
        m(x).sum().backward()
        assert torch.isfinite(next(p for n, p in m.named_parameters() if "orig" in n or "original" in n).grad).all()


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_weight_normalizes_to_zero(api, training):
    """A zero weight gives W / sigma = 0 and a zero gradient (README "Faults"), as matrix mode does, not 0/0."""
    x = torch.randn(2, 3, 6, 6)
    outs = []
    for mode in ("matrix", "conv"):
        torch.manual_seed(0)  # the same bias
        layer = nn.Conv2d(3, 4, 3, padding=1)
        nn.init.zeros_(layer.weight)
        m = wrap_api(api)(layer, mode=mode, **({"input_size": (6, 6)} if mode == "conv" else {}))
        m.train(training)
        y = m(x)
        y.sum().backward()
        orig = m.weight_orig if api == "hook" else m.parametrizations.weight.original
        assert torch.equal(m.weight, torch.zeros_like(m.weight)), mode
        assert torch.equal(orig.grad, torch.zeros_like(orig.grad)), mode
        outs.append(y)
    assert torch.equal(outs[0], outs[1])


def test_zero_weight_normalizes_to_zero_when_exporting(monkeypatch):
    """The torch.export form of W / sigma (sigma re-attached to W) is 0 for a zero weight, with a zero gradient."""
    import sn_kernels.conv_norm as conv_norm

    monkeypatch.setattr(conv_norm, "exporting", lambda: True)
    m = nn.Conv2d(2, 3, 3, padding=1)
    spec = conv_spec(m)
    weight = torch.zeros_like(m.weight, requires_grad=True)
    u, v = F.normalize(torch.randn(1, 3, 5, 5).flatten(), dim=0).view(1, 3, 5, 5), \
        F.normalize(torch.randn(1, 2, 5, 5).flatten(), dim=0).view(1, 2, 5, 5)
    for training in (True, False):
        weight.grad = None
        out, sigma = conv_spectral_normalize(spec, weight, u, v, training=training)
        out.sum().backward()
        assert sigma == 0 and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(weight.grad, torch.zeros_like(weight))


def _layout(m):
    return sorted(m._parameters), sorted(m._buffers), len(m._forward_pre_hooks), type(m).__name__


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("input_size", [None, (6, 6)])
def test_lazy_module_refused_and_left_usable(api, input_size):
    """A lazy module is refused with PyTorch's message before anything changes; after its dummy forward it wraps."""
    m = nn.LazyConv2d(4, 3)
    before = _layout(m)
    with pytest.raises(ValueError) as mine:
        wrap_api(api)(m, mode="conv", input_size=input_size)
    with pytest.raises(ValueError) as torchs:
        torch.nn.utils.spectral_norm(nn.LazyConv2d(4, 3))
    assert str(mine.value) == str(torchs.value)
    assert _layout(m) == before and not parametrize.is_parametrized(m)
    x = torch.randn(1, 3, 6, 6)
    m(x)  # materializes the weight: an nn.Conv2d now
    wrap_api(api)(m, mode="conv")
    m(x).sum().backward()


@pytest.mark.parametrize("first,second", [("matrix", "conv"), ("conv", "matrix"), ("torch", "conv"),
                                          ("conv", "conv")])
def test_two_hooks_on_one_parameter_refused_as_pytorch(first, second):
    """Any two hook-API spectral norms on one parameter, mode="conv" among them, are refused with
    PyTorch's message, and the refusal leaves the module as it was."""
    import sn_kernels

    wraps = {"matrix": sn_kernels.spectral_norm, "conv": lambda m: sn_kernels.spectral_norm(m, mode="conv"),
             "torch": torch.nn.utils.spectral_norm}
    m = wraps[first](nn.Conv2d(3, 4, 3))
    before = _layout(m), sorted(m.state_dict())
    with pytest.raises(RuntimeError, match="^Cannot register two spectral_norm hooks on the same parameter weight$"):
        wraps[second](m)
    assert (_layout(m), sorted(m.state_dict())) == before
    m(torch.randn(1, 3, 6, 6)).sum().backward()


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_load_under_inference_mode_then_training(api):
    """A checkpoint loaded under torch.inference_mode into a fresh wrap (u, v resized to the checkpoint's)
    leaves normal buffers, as a plain layer's load does: the next training forward updates them in place."""
    x = torch.randn(1, 3, 6, 6)
    a = wrap_api(api)(nn.Conv2d(3, 4, 3), mode="conv")
    a(x)
    b = wrap_api(api)(nn.Conv2d(3, 4, 3), mode="conv")
    with torch.inference_mode():
        b.load_state_dict(a.state_dict())
    assert not any(t.is_inference() for t in b.buffers())
    b(x).sum().backward()


def _uv(m, api):
    return (m.weight_u, m.weight_v) if api == "hook" else (m.parametrizations.weight[0]._u,
                                                           m.parametrizations.weight[0]._v)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("ctor,good", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 8)),
    (lambda: nn.Conv2d(4, 6, 3, padding=2, groups=2, padding_mode="reflect"), (4, 8, 8)),  # batch-less
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
], ids=["conv", "groups-reflect-unbatched", "transposed-groups"])
def test_input_the_conv_refuses_draws_nothing(api, ctor, good):
    """An input the layer's conv refuses (here channels-last by mistake) fails with the conv's own error
    before u, v are drawn for it: the corrected input then works (and with reinit_on_resize=True a refused
    input leaves the u, v drawn before)."""
    torch.manual_seed(0)
    bad = torch.randn(good).movedim(-3, -1)  # (..., H, W, C)
    plain = ctor()
    with pytest.raises(RuntimeError) as torchs:
        plain(bad)
    for reinit in (False, True):
        m = wrap_api(api)(copy.deepcopy(plain), mode="conv", reinit_on_resize=reinit)
        with pytest.raises(RuntimeError) as mine:
            m(bad)
        assert str(mine.value) == str(torchs.value)
        assert all(t.numel() == 0 for t in _uv(m, api))
        m(torch.randn(good)).sum().backward()
        u, v = (t.clone() for t in _uv(m, api))
        with pytest.raises(RuntimeError if reinit else ValueError):  # without reinit: refused as a resize
            m(bad)
        assert all(torch.equal(a, b) for a, b in zip((u, v), _uv(m, api)))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("size", [(2, 2), (8,), (8, 8, 8), 8, (0, 8), (-1, 8), (8.0, 8), "88", None],
                         ids=lambda s: repr(s))
def test_bad_input_size_refused_and_module_left_as_it_was(api, size):
    """A wrong input_size= (not 2 positive ints for a Conv2d, or no output for the 5x5 kernel) is a
    ValueError naming input_size that leaves the module unwrapped; a retry with a good one works."""
    m = nn.Conv2d(3, 4, 5)
    before = _layout(m), sorted(m.state_dict())
    if size is None:  # a bad input_size inside a list, not the argument itself
        size = [8, None]
    with pytest.raises(ValueError, match=r"^input_size"):
        wrap_api(api)(m, mode="conv", input_size=size)
    assert (_layout(m), sorted(m.state_dict())) == before and not parametrize.is_parametrized(m)
    wrap_api(api)(m, mode="conv", input_size=[8, 8])
    assert _uv(m, api)[1].shape == (1, 3, 8, 8)
    m(torch.randn(1, 3, 8, 8)).sum().backward()


def _trained(ctor, api, spatial, mode="conv"):
    """``ctor()`` wrapped by ``api`` in ``mode`` (or by PyTorch's own, mode="torch") and run once on ``spatial``."""
    torch.manual_seed(0)
    if mode == "torch":
        wrap = torch.nn.utils.spectral_norm if api == "hook" else torch.nn.utils.parametrizations.spectral_norm
        m = wrap(ctor())
    else:
        m = wrap_api(api)(ctor(), mode=mode)
    m(torch.randn(1, m.in_channels, *spatial))
    return m


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_load_conv_checkpoint_of_another_input_size(api, i):
    """A conv-mode checkpoint taken at another input size (or before any forward) loads strictly into a
    layer initialised at its own size: u, v take the checkpoint's shapes and values."""
    ctor, spatial = CONFIGS[i]
    other = tuple(s + 1 for s in spatial)
    src = _trained(ctor, api, other)
    dst = _trained(ctor, api, spatial)
    dst.load_state_dict(src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_uv(src, api), _uv(dst, api)))
    src.eval(), dst.eval()
    x = torch.randn(1, src.in_channels, *other)
    assert torch.equal(src(x), dst(x))
    dst.load_state_dict(wrap_api(api)(ctor(), mode="conv").state_dict())  # not drawn yet: u, v forgotten
    assert all(t.shape == (0,) for t in _uv(dst, api))
    dst(x)


def _assert_load_refused(dst, sd, api, strict, bad):
    """load_state_dict(sd) fails on a size mismatch for u or v (``bad``), before replacing either by a
    tensor of another shape; the layer still runs at its input size."""
    u, v = (t.clone() for t in _uv(dst, api))
    prefix = "weight" if api == "hook" else "parametrizations.weight.0."
    with pytest.raises(RuntimeError, match=rf"size mismatch for {prefix}{bad}\b"):
        dst.load_state_dict(sd, strict=strict)
    assert [t.shape for t in _uv(dst, api)] == [u.shape, v.shape]
    i = ("_u", "_v").index(bad)
    assert torch.equal(_uv(dst, api)[i], (u, v)[i])
    if v.numel():
        dst(torch.randn(1, dst.in_channels, *v.shape[2:])).sum().backward()


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("source", ["matrix", "torch"])
def test_load_matrix_checkpoint_into_conv_refused(source, api, strict):
    """A matrix-mode (or PyTorch) checkpoint, u of shape (C_out,), is a size mismatch for a mode="conv"
    layer at load, as PyTorch reports one, whether the layer ran already or not and whatever
    reinit_on_resize: not a load that succeeds and fails (or silently redraws u, v) at the next forward."""
    ctor = lambda: nn.Conv2d(3, 4, 3, padding=1)  # noqa: E731
    sd = _trained(ctor, api, (6, 6), mode=source).state_dict()
    if not strict:
        sd = {k: t for k, t in sd.items() if k.endswith(("_u", "_v"))}
    for reinit in (False, True):
        for ran in (False, True):
            dst = wrap_api(api)(ctor(), mode="conv", reinit_on_resize=reinit)
            if ran:
                dst(torch.randn(2, 3, 6, 6))
            _assert_load_refused(dst, sd, api, strict, "_u")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("src_ctor,dst_ctor,bad", [
    (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: nn.Conv2d(3, 4, 3, padding=1), "_u"),
    (lambda: nn.Conv2d(2, 4, 3, padding=1), lambda: nn.Conv2d(3, 4, 3, padding=1), "_v"),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.Conv2d(4, 4, 3, groups=2), "_u"),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, groups=2),
     "_u"),
    (lambda: nn.ConvTranspose2d(2, 3, 3), lambda: nn.ConvTranspose2d(4, 3, 3), "_v"),
    (lambda: nn.Conv1d(3, 4, 3), lambda: nn.Conv2d(3, 4, 3), "_v"),  # (1, 3, 6): one spatial dim short
], ids=["conv-out", "conv-in", "groups-out", "transposed-groups-out", "transposed-in", "conv1d-into-2d"])
def test_load_conv_checkpoint_of_other_channels_refused(src_ctor, dst_ctor, bad, api, strict):
    """conv-mode u, v of a layer with other channel counts (or dims) are a size mismatch at load, with
    strict=True (whose other keys mismatch too) and with strict=False on u, v alone; u, v keep their shapes."""
    spatial = (6, 6)
    src = _trained(src_ctor, api, spatial[:len(src_ctor().kernel_size)])
    sd = src.state_dict()
    if not strict:
        sd = {k: t for k, t in sd.items() if k.endswith(("_u", "_v"))}
    for ran in (False, True):
        dst = wrap_api(api)(dst_ctor(), mode="conv")
        if ran:
            dst(torch.randn(1, dst.in_channels, *spatial))
        _assert_load_refused(dst, sd, api, strict, bad)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_load_uv_of_two_input_sizes_refused(api):
    """u of one input size with v of another is no layer's state: a size mismatch, not buffers resized apart."""
    ctor = lambda: nn.Conv2d(3, 4, 3, stride=2)  # noqa: E731
    sd = _trained(ctor, api, (7, 7)).state_dict()
    v_key = next(k for k in sd if k.endswith("_v"))
    sd[v_key] = _trained(ctor, api, (9, 9)).state_dict()[v_key]
    for strict in (True, False):
        _assert_load_refused(_trained(ctor, api, (6, 6)), sd, api, strict, "_u")


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("input_size", [None, (8, 8)])
@pytest.mark.parametrize("ctor", [lambda: nn.Conv2d(2, 3, 3), lambda: nn.ConvTranspose2d(2, 3, 3)],
                         ids=["conv", "transposed"])
def test_parameter_other_than_the_kernel_refused(ctor, input_size, api):
    """mode="conv" on a parameter other than the conv's kernel (here the bias, which no convolution operator
    has) is a ValueError at wrap time that points to mode="matrix", and leaves the module as it was: not an
    IndexError at the first forward (or deep inside input_size=)."""
    m = ctor()
    before = _layout(m), sorted(m.state_dict())
    with pytest.raises(ValueError, match=r'mode="conv" normalizes the convolution operator.*mode="matrix"'):
        wrap_api(api)(m, name="bias", mode="conv", input_size=input_size)
    assert (_layout(m), sorted(m.state_dict())) == before and not parametrize.is_parametrized(m)
    wrap_api(api)(m, mode="conv", input_size=input_size)
    m(torch.randn(1, 2, 8, 8)).sum().backward()
