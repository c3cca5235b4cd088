"""torch.library registration: opcheck of the torch backend's ops, and
torch.compile(fullgraph=True) of a discriminator with either API matching eager."""
import copy

import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels import reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles the same front-end code for a new model: start from an empty
    cache so the recompile limit counts this test only."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sample_args(dtype=torch.float32, shape=(6, 4, 3, 3), dim=0):
    w = torch.randn(shape, dtype=dtype)
    m, n = reference.as_matrix(w, dim).shape
    u = torch.nn.functional.normalize(torch.randn(m, dtype=dtype), dim=0)
    v = torch.nn.functional.normalize(torch.randn(n, dtype=dtype), dim=0)
    return w, u, v


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("order", ["vu", "uv"])
def test_opcheck_torch_backend(dim, training, order):
    w, u, v = _sample_args(torch.float64, dim=dim)
    ops = reference.ops
    torch.library.opcheck(ops.power_iteration, (w, u, v, 2, 1e-12, dim, order, training))
    sigma, uu, vv = ops.power_iteration(w, u.clone(), v.clone(), 1, 1e-12, dim, order, training)
    torch.library.opcheck(ops.normalize, (w.requires_grad_(), uu, vv, sigma, dim))


def _disc():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.ConvTranspose2d(8, 4, 2), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 1))


# the Triton interpreter is not compilable; triton is checked on the GPU (benchmarks/gpu_check.py)
COMPILED_BACKENDS = [b for b in sn_kernels.available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_compile_fullgraph_matches_eager(api, backend):
    sn_kernels.set_backend(backend)
    try:
        _compare_compiled(api, "aot_eager")
    finally:
        sn_kernels.set_backend("auto")


def test_compile_inductor_matches_eager():
    """The real compiler too (once: it builds C++ on the CPU)."""
    _compare_compiled("hook", "inductor")


def _compare_compiled(api, compiler):
    torch.manual_seed(0)
    eager = _disc()
    sn_kernels.apply_spectral_norm(eager, api=api)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        y1, y2 = eager(x), compiled(x)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
        y1.square().sum().backward()
        y2.square().sum().backward()
        for a, b in zip(compiled_model.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(compiled_model.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    eager.eval(), compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
