"""Mixed precision, awkward inputs and determinism, on every backend that runs here."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sn_kernels
from helpers import check

def test_autocast_bfloat16_close_to_float32(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 1))
    sn_kernels.apply_spectral_norm(model)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y_ref = ref(x)
    assert torch.isfinite(y).all()
    check("autocast bf16 vs fp32", y.float(), y_ref, dtype=torch.bfloat16, scale=5)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_no_eps_underflow(backend, dtype):
    """W v underflows in half precision (PyTorch's fp16 path turns that into 0/0 = NaN);
    accumulating in float32 keeps it finite and right."""
    torch.manual_seed(0)
    lin32 = nn.Linear(16, 8)
    with torch.no_grad():
        lin32.weight.mul_(1e-4)
    lin = copy.deepcopy(lin32).to(dtype)
    torch.manual_seed(1)
    sn_kernels.spectral_norm(lin)
    torch.manual_seed(1)
    sn_kernels.spectral_norm(lin32)
    with torch.no_grad():
        lin.weight_u.mul_(1e-4)  # tiny vectors: their products underflow in fp16
        lin32.weight_u.mul_(1e-4)
    x = torch.randn(3, 16)
    for _ in range(3):
        y, y32 = lin(x.to(dtype)), lin32(x)
    assert torch.isfinite(y).all() and torch.isfinite(lin.weight_u).all()
    check("half weights vs fp32", y.float(), y32, dtype=dtype, scale=5)


def test_weight_changing_shape_after_wrapping_is_refused_and_state_kept(backend):
    lin = sn_kernels.spectral_norm(nn.Linear(4, 3))
    u, v = lin.weight_u.clone(), lin.weight_v.clone()
    lin.weight_orig.data = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"u must have shape \(5,\)"):
        lin(torch.randn(2, 4))
    assert torch.equal(lin.weight_u, u) and torch.equal(lin.weight_v, v)


@pytest.mark.parametrize("kind", ["u_dtype", "v_device"])
def test_wrong_vector_dtype_or_device(kind):
    w = torch.randn(4, 3)
    u, v = torch.randn(4), torch.randn(3)
    if kind == "u_dtype":
        with pytest.raises(TypeError, match="dtype"):
            sn_kernels.spectral_normalize(w, u.half(), v)
    else:
        with pytest.raises(ValueError, match="meta"):
            sn_kernels.spectral_normalize(w, u, v.to("meta"))


def test_meta_weights():
    with torch.device("meta"):
        lin = nn.Linear(4, 6)
        sn_kernels.spectral_norm(lin)
        par = sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 6))
        x = torch.randn(2, 4)
    for m in (lin, par):
        y = m(x)
        assert y.device.type == "meta" and y.shape == (2, 6)


def test_non_contiguous_and_channels_last_weights(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    assert not conv_cl.weight.is_contiguous()
    for m in (conv, conv_cl):
        torch.manual_seed(1)
        sn_kernels.spectral_norm(m)
    x = torch.randn(2, 4, 5, 5)
    for _ in range(2):
        check("channels_last vs contiguous", conv_cl(x), conv(x))
    check("channels_last u", conv_cl.weight_u, conv.weight_u)

    w = torch.randn(7, 5)
    u, v = torch.randn(5), torch.randn(7)
    wt = w.t()  # (5, 7), non-contiguous
    a, sa = sn_kernels.spectral_normalize(wt, u.clone(), v.clone())
    b, sb = sn_kernels.spectral_normalize(wt.contiguous(), u.clone(), v.clone())
    check("transposed view vs contiguous", a, b)


def _train(seed, backend):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 1))
    sn_kernels.apply_spectral_norm(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8, generator=g)).square().mean().backward()
        opt.step()
    return [t.clone() for t in list(model.parameters()) + list(model.buffers())]


def test_deterministic_under_use_deterministic_algorithms(backend):
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _train(3, backend), _train(3, backend)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["matrix", "conv"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_autocast_leaves_the_power_iteration_in_float32(backend, api, mode):
    """Autocast lowers the layer's own matmul, not the spectral norm's: u, v and sigma of a float32
    weight are the float32 run's (PyTorch's spectral norm keeps them in float32 too), and so is the
    weight gradient's formula."""
    torch.manual_seed(0)
    if mode == "matrix":
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 1))
        sn_kernels.apply_spectral_norm(model, api=api)
        x = torch.randn(4, 64)
    else:  # the power iteration on the convolution operator (conv_norm.py)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
        for layer in (model[0], model[2]):
            (sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm)(layer, mode="conv")
        x = torch.randn(2, 3, 8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # draws u, v for this input size (and warms them up) under autocast
    ref = copy.deepcopy(model)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        ref(x)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(s.dtype == torch.float32 for s in sn_kernels.sigmas(model).values())
    torch.testing.assert_close(torch.stack(list(sn_kernels.sigmas(model).values())),
                               torch.stack(list(sn_kernels.sigmas(ref).values())), rtol=1e-5, atol=0)


TORCH_WRAPS = {"hook": torch.nn.utils.spectral_norm, "parametrization": torch.nn.utils.parametrizations.spectral_norm}


@pytest.mark.parametrize("n", [np.int64(2), torch.tensor(2)], ids=["numpy", "tensor"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_convert_takes_any_integer_n_power_iterations(api, n):
    """PyTorch's front ends take a NumPy integer or a one-element tensor as n_power_iterations (so do ours):
    a converted layer keeps running, as PyTorch's, with the int the op wants."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(TORCH_WRAPS[api](nn.Linear(3, 4), n_power_iterations=n))
    ref, ours = layers
    sn_kernels.convert(ours)
    state = ours._forward_pre_hooks if api == "hook" else ours.parametrizations.weight
    assert all(type(s.n_power_iterations) is int and s.n_power_iterations == 2 for s in
               (state.values() if api == "hook" else state) if type(s).__module__.startswith("sn_kernels"))
    x = torch.randn(2, 3)
    for _ in range(2):  # training forwards: 2 power iterations each, as PyTorch's
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def _meta_built(api):
    with torch.device("meta"):
        model = nn.Sequential(sn_kernels.SNLinear(3, 4, api=api), sn_kernels.SNLinear(4, 5, api=api))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for b in model.buffers():
            b.normal_()  # the vectors' "uninitialised memory", made deterministic
    return model


@pytest.mark.parametrize("n", [0, -1, 15.0, "15"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_reset_uv_refuses_before_changing_anything(api, n):
    """A refused n_power_iterations leaves every u, v and the meta-device guards as they were: the model
    built on meta still refuses its forward."""
    model = _meta_built(api)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((TypeError, ValueError), match="n_power_iterations"):
        sn_kernels.reset_uv(model, n_power_iterations=n)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    with pytest.raises(RuntimeError, match="meta device"):
        model(torch.randn(2, 3))


@pytest.mark.parametrize("n", [np.int64(3), torch.tensor(3)], ids=["numpy", "tensor"])
def test_reset_uv_takes_the_integers_the_front_ends_take(n):
    """reset_uv takes n_power_iterations as the wrapping front ends do: a NumPy integer or a one-element
    tensor is the int it holds."""
    results = []
    for steps in (3, n):
        torch.manual_seed(0)
        model = nn.Sequential(sn_kernels.SNLinear(3, 4), sn_kernels.SNLinear(4, 5, api="parametrization"))
        sn_kernels.reset_uv(model, n_power_iterations=steps)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], t) for k, t in results[1].items())


def test_reset_uv_refuses_a_pytorch_eps_it_cannot_iterate_before_changing_anything():
    """PyTorch's hook accepts eps=0, which the op refuses: reset_uv says so before the first layer's u, v
    are redrawn."""
    model = nn.Sequential(sn_kernels.SNLinear(3, 4), torch.nn.utils.spectral_norm(nn.Linear(4, 2), eps=0.0))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="eps"):
        sn_kernels.reset_uv(model)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


class _Scale(nn.Module):
    """A layer with a 0-d weight (a custom type passed in ``layer_types``)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))


def _long_weight_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(torch.ones(2, 4, dtype=torch.long), requires_grad=False)
    return model


REFUSED_LATER = {  # a model whose layer 1 the front end refuses, and apply_spectral_norm's options
    "hook_no_rows": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 0)), {}),
    "integer_hook": (_long_weight_model, {}),
    "integer_param": (_long_weight_model, dict(api="parametrization")),
    "0d_hook": (lambda: nn.Sequential(nn.Linear(3, 4), _Scale()), dict(layer_types=(nn.Linear, _Scale))),
    "0d_param": (lambda: nn.Sequential(nn.Linear(3, 4), _Scale()),
                 dict(api="parametrization", layer_types=(nn.Linear, _Scale))),
    "tiny_coeff_half_hook": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).half()),
                             dict(bound="upper", coeff=1e-30)),
    "tiny_coeff_half_param": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).half()),
                              dict(api="parametrization", bound="upper", coeff=1e-30)),
    "upper_complex_param": (lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3).to(torch.complex64)),
                            dict(api="parametrization", bound="upper")),
    "conv_mode_linear": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 2)), dict(mode="conv")),
}


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature", "ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("case", list(REFUSED_LATER))
def test_apply_spectral_norm_refuses_what_a_front_end_refuses_as_a_whole(case):
    """A layer that the front end itself refuses, after others it takes, is refused (with the error type the
    front end raises, naming the layer) before anything is wrapped."""
    build, options = REFUSED_LATER[case]
    wrap = sn_kernels.spectral_norm if options.get("api", "hook") == "hook" else \
        sn_kernels.parametrizations.spectral_norm
    front = {k: v for k, v in options.items() if k not in ("api", "layer_types")}
    with pytest.raises(Exception) as direct:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex modules warn
            wrap(build()[1], **front)
    model = build()
    with pytest.raises(direct.type, match=r"1\.weight.*nothing was wrapped"):
        sn_kernels.apply_spectral_norm(model, **options)
    assert not any(sn_kernels.is_spectral_normalized(m) for m in model)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_apply_spectral_norm_takes_one_layer_type_and_no_exclude(api):
    """``layer_types`` may be one type (as isinstance takes it), ``exclude`` None (nothing excluded)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1), nn.Linear(4, 2))
    sn_kernels.apply_spectral_norm(model, api=api, layer_types=nn.Linear, exclude=None)
    assert [sn_kernels.is_spectral_normalized(m) for m in model] == [True, False, True]


@pytest.mark.parametrize("helper", ["convert", "freeze", "reset_uv", "sigmas", "apply_spectral_norm"])
def test_model_helpers_refuse_what_is_not_a_module(helper):
    with pytest.raises(TypeError, match=rf"{helper}.*nn\.Module.*NoneType"):
        getattr(sn_kernels, helper)(None)


# eps below the normal range of the accumulation dtype: 1e-50 rounds to 0 in float32, and 1e-40 (a float32
# subnormal) is flushed to 0 under torch.set_flush_denormal(True); either way a zero weight's sigma would be
# |s|^2 / max(|s|, 0) = 0/0 = NaN (as in PyTorch), where README promises 0 and "eps never underflows"
_TINY32 = torch.finfo(torch.float32).tiny


def _zero_weight_inputs(dtype, m=4, n=3):
    return (torch.zeros(m, n, dtype=dtype), torch.full((m,), m ** -0.5, dtype=dtype),
            torch.full((n,), n ** -0.5, dtype=dtype))


@pytest.mark.parametrize("eps", [1e-50, 1e-40, _TINY32 * (1 - 2 ** -24), 1e-320])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_op_refuses_an_eps_below_the_accumulation_dtypes_normal_range(backend, dtype, eps):
    """Refused, naming eps and the weight's dtype, before u and v change (float64 weights accumulate in
    float64, where only eps=1e-320 is that small)."""
    if dtype == torch.float64 and eps > 1e-300:
        pytest.skip("a normal float64")
    w, u, v = _zero_weight_inputs(dtype)
    u0, v0 = u.clone(), v.clone()
    with pytest.raises(ValueError, match=rf"eps.*{dtype}"):
        sn_kernels.spectral_normalize(w, u, v, eps=eps)
    assert torch.equal(u, u0) and torch.equal(v, v0)


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("dtype, eps", [(torch.float32, _TINY32), (torch.bfloat16, _TINY32), (torch.float64, 1e-50),
                                        (torch.float64, torch.finfo(torch.float64).tiny)])
def test_smallest_eps_taken_keeps_a_zero_weight_at_zero(backend, dtype, eps, flush_denormal):
    """The smallest eps taken is normal in the accumulation dtype, so even flushing subnormals to zero leaves
    a zero weight's W / sigma 0 with a zero gradient (not 0/0 = NaN)."""
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        w, u, v = _zero_weight_inputs(dtype)
        w.requires_grad_()
        out, sigma = sn_kernels.spectral_normalize(w, u, v, eps=eps)
        out.float().sum().backward()
    finally:
        torch.set_flush_denormal(False)
    assert sigma.item() == 0 and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(w.grad, torch.zeros_like(w))


_WRAPS = {
    "hook": lambda m, eps: sn_kernels.spectral_norm(m, eps=eps),
    "parametrization": lambda m, eps: sn_kernels.parametrizations.spectral_norm(m, eps=eps),
    "apply_hook": lambda m, eps: sn_kernels.apply_spectral_norm(nn.Sequential(m), eps=eps),
    "apply_parametrization": lambda m, eps: sn_kernels.apply_spectral_norm(nn.Sequential(m), api="parametrization",
                                                                           eps=eps),
}


@pytest.mark.parametrize("wrap", list(_WRAPS))
def test_front_ends_refuse_an_eps_below_the_weights_accumulation_range_unchanged(wrap):
    """At wrap time, where the weight is known; a float64 layer takes the same eps."""
    lin = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"eps.*torch\.float32.*eps=1e-50"):
        _WRAPS[wrap](lin, 1e-50)
    assert not sn_kernels.is_spectral_normalized(lin) and [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    lin64 = nn.Linear(3, 4).double()
    _WRAPS[wrap](lin64, 1e-50)
    with torch.no_grad():
        (lin64.parametrizations.weight.original if wrap.endswith("parametrization") else lin64.weight_orig).zero_()
    assert torch.equal(lin64(torch.ones(1, 3, dtype=torch.float64)), lin64.bias.detach()[None])


@pytest.mark.parametrize("grouped", [False, True], ids=["per_layer", "group"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_forward_refuses_an_eps_the_weights_new_dtype_cannot_hold(backend, api, grouped):
    """A float64 layer wrapped with eps=1e-300, then made float32: its forward (and a group's) refuses, naming
    eps and the new dtype, before u and v change."""
    model = sn_kernels.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4)).double(), api=api, eps=1e-300).float()
    if grouped:
        sn_kernels.group(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"eps.*torch\.float32.*eps=1e-300"):
        model(torch.randn(2, 3))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_native_op_refuses_a_tiny_eps_in_check_calls_words():
    """The C++ op's own refusal (it checks its arguments; Python's check_call only names a refusal) is a
    ValueError with check_call's message, for each accumulation dtype."""
    from sn_kernels import checks
    from sn_kernels.backends import native
    if native.why_not(torch.device("cpu"), auto=True) is not None:
        pytest.skip("native extension not available")
    for dtype, eps in [(torch.float32, 1e-50), (torch.float16, 1e-40), (torch.bfloat16, 1e-40),
                       (torch.float64, 1e-320)]:
        w, u, v = _zero_weight_inputs(dtype)
        with pytest.raises(ValueError) as cpp:
            torch.ops.sn_kernels.native_power_iteration(w, u, v, 1, eps, 0, "vu", True)
        with pytest.raises(ValueError) as py:
            checks.check_call(w, u, v, 1, eps, 0, "vu")
        assert str(cpp.value) == str(py.value)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_conv_mode_refuses_an_eps_below_the_weights_accumulation_range(api):
    """mode="conv" too: at wrap time, and at a forward after the layer was made float32."""
    conv = nn.Conv2d(2, 3, 3)
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    with pytest.raises(ValueError, match=r"eps.*torch\.float32.*eps=1e-50"):
        wrap(conv, mode="conv", eps=1e-50)
    assert not sn_kernels.is_spectral_normalized(conv)
    model = nn.Sequential(wrap(nn.Conv2d(2, 3, 3).double(), mode="conv", eps=1e-300)).float()
    with pytest.raises(ValueError, match=r"eps.*torch\.float32.*eps=1e-300"):
        model(torch.randn(1, 2, 6, 6))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_convert_refuses_a_pytorch_eps_the_weight_cannot_hold_as_a_whole(api):
    """convert refuses a PyTorch spectral norm whose eps is 0 in its weight's computation dtype before
    converting any layer (its first forward would refuse it later)."""
    wrap = torch.nn.utils.spectral_norm if api == "hook" else torch.nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(wrap(nn.Linear(3, 4)), wrap(nn.Linear(4, 2), eps=1e-50))
    with pytest.raises(ValueError, match=r"Linear\.weight.*eps=1e-50.*nothing was converted"):
        sn_kernels.convert(model)
    assert not any(isinstance(s.state, (sn_kernels.hooks.SpectralNorm,
                                        sn_kernels.parametrizations.SpectralNormParametrization))
                   for _, s in sn_kernels.find.walk(model))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_reset_uv_refuses_an_eps_a_moved_weight_cannot_hold_before_changing_anything(api):
    """A layer wrapped in float64 with eps=1e-300, then made float32: reset_uv refuses before redrawing the
    layers before it."""
    model = sn_kernels.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double(), api=api,
                                           eps=1e-300)
    model[1].float()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"eps.*torch\.float32.*eps=1e-300"):
        sn_kernels.reset_uv(model)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
