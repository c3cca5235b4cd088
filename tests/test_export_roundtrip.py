"""Saving and loading what torch.export and torch.jit.trace make of a model, as PyTorch's own spectral
norm allows: the loaded program or trace gives eager's outputs, u, v updates and gradients, call after
call, on every backend that runs on the CPU (triton under TRITON_INTERPRET=1, tests/conftest.py)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import sn_kernels
from helpers import assert_steps_match

APIS = ["hook", "parametrization"]
BACKENDS = ["native", "triton", "torch"]
VARIANTS = {"plain": {}, "soft_lipschitz": {"coeff": 0.5, "soft": True}}


def model(api, **options):
    """A convolution and a linear layer, both spectrally normalized."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    for i in (0, 3):
        wrap(m[i], **options)
    return m


def need(backend):
    if backend not in sn_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("api", APIS)
def test_exported_program_round_trips_save_load(api, training, backend, variant):
    """torch.export.save then torch.export.load: no grad-mode region of the program is empty (the
    loader's verifier refuses one, its node has no value), and the loaded program matches eager."""
    need(backend)
    torch._dynamo.reset()
    with sn_kernels.use_backend(backend):
        m = model(api, **VARIANTS[variant]).train(training)
        eager = copy.deepcopy(m)
        x = torch.randn(2, 2, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "tensor attributes assigned during export"
            exported = torch.export.export(m, (x,))
        buf = io.BytesIO()
        torch.export.save(exported, buf)
        buf.seek(0)
        loaded = torch.export.load(buf).module()
        assert_steps_match(loaded, eager, x, training)


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("api", APIS)
def test_jit_trace_saves_and_loads(api, training, backend):
    """torch.jit.trace records every backend's computation as ops that torch.jit.save can store (the
    torch and triton backends' eager W / sigma is a Python autograd.Function, which it cannot); the
    loaded trace matches eager, gradients included (the analytic ones)."""
    need(backend)
    with sn_kernels.use_backend(backend):
        m = model(api).train(training)
        x = torch.randn(2, 2, 4, 4)
        # training: each call updates u, v, so a second run of the trace (its check) differs by design
        traced = torch.jit.trace(m, x, check_trace=not training)
        eager = copy.deepcopy(m)  # the state the trace left: its forward updated u, v in training
        assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        assert_steps_match(loaded, eager, x, training)


@pytest.mark.parametrize("api", APIS)
def test_jit_trace_gives_no_trace_warning(api):
    """Tracing an sn_kernels layer warns nothing about Python values taken from tensors (the warning
    that a trace might be incorrect), as PyTorch's own spectral norm traces."""
    m = model(api).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(m, torch.randn(2, 2, 4, 4))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], caught
