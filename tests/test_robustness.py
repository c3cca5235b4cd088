"""Mixed precision, awkward inputs and determinism, on every backend that runs here."""
import copy

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
