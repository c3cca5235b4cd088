"""sn_kernels.group on the "triton" backend: the multi-tensor kernels (group_kernels.py).

Every weight of a (device, dtype) group in a fixed number of launches: training 2k + 1 for k
power iterations, eval 2, backward 2, whatever the number and sizes of the weights.  The
reduction order differs from the per-weight kernels' (one tile shape for every weight), so the
numbers match the per-module triton path to the dtype's tolerance (helpers.TOL), not bit for bit;
two runs of the grouped path are bit-identical.  Under TRITON_INTERPRET=1 (conftest.py) on a
machine without a GPU.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import sn_kernels

from helpers import assert_close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


class _Count:
    """Counts the launches of the kernels modules' ``*_kernel`` functions (looked up at call time)."""

    def __init__(self):
        from sn_kernels.backends.triton import group_kernels, kernels
        self.modules = (kernels, group_kernels)
        self.names, self.saved = [], []

    def __enter__(self):
        for mod in self.modules:
            for name in [n for n in vars(mod) if n.endswith("_kernel")]:
                fn = getattr(mod, name)
                self.saved.append((mod, name, fn))
                count = self

                class Proxy:
                    def __getitem__(self, grid, fn=fn, name=name):
                        count.names.append(name)
                        return fn[grid]

                setattr(mod, name, Proxy())
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


class _Weight(nn.Module):
    def __init__(self, shape, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, dtype=dtype, device=DEV) / shape[-1] ** 0.5)

    def forward(self):
        return self.weight


class _Weights(nn.ModuleList):
    def forward(self):
        return [m() for m in self]


# one item each; a weight of one row and one of one column; several column splits of the row pass
# (16 x 2100: 3 splits of 1024); several row splits of the column pass (520 x 40: 3 of 256); a 4-D
# convolution weight; dim=1 with rows before it (the general addressing); float64 (a group of its own)
SHAPES = [((4, 3), 0), ((1, 128), 0), ((7, 1), 0), ((16, 2100), 0), ((520, 40), 0), ((6, 4, 3, 3), 0),
          ((5, 7, 3), 1), ((33, 65), 0, torch.float64)]


def _models(api, iterations, shapes=SHAPES):
    torch.manual_seed(0)
    model = _Weights([_Weight(e[0], *e[2:]) for e in shapes])
    for m, e in zip(model, shapes):
        if api == "hook":
            sn_kernels.spectral_norm(m, n_power_iterations=iterations, dim=e[1])
        else:
            sn_kernels.parametrizations.spectral_norm(m, n_power_iterations=iterations, dim=e[1])
    return model, copy.deepcopy(model)


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _grads(model):
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("api", ["hook", "parametrization"])  # orders "vu" and "uv"
def test_triton_group_matches_per_module_in_fixed_launches(api, iterations):
    """W/sigma, u, v, sigma and the weight gradients as the per-module triton path, step after step,
    in training and eval; launches per group: 2k + 1 forward (2 in eval), 2 backward."""
    grouped, per_module = _models(api, iterations)
    sn_kernels.group(grouped)
    grads = [torch.randn(e[0], dtype=(e[2:] or (torch.float32,))[0], device=DEV) for e in SHAPES]
    with sn_kernels.use_backend("triton"):
        for training in (True, True, False):
            grouped.train(training), per_module.train(training)
            with _Count() as fwd:
                outs = grouped()
            with _Count() as bwd:
                torch.autograd.backward(outs, grads)
            refs = per_module()
            torch.autograd.backward(refs, grads)
            for a, b in zip(outs, refs):
                assert_close(a, b)
            groups = 2  # float32 and float64
            per_group = ["group_row_kernel", "group_col_kernel"] * iterations if training else ["group_eval_kernel"]
            assert sorted(fwd.names) == sorted((per_group + ["group_divide_kernel"]) * groups)
            assert sorted(bwd.names) == sorted(["group_dot_kernel", "group_grad_kernel"] * groups)
            for a, b in zip(_state(grouped) + _grads(grouped), _state(per_module) + _grads(per_module)):
                assert_close(a, b)


def test_triton_group_launches_do_not_grow_with_weights():
    """200 weights, and weights whose sizes differ by 10^4 x: still 3 launches forward, 2 backward
    (compared with the per-module torch backend: 1000 per-weight launches are slow in the interpreter)."""
    shapes = [((2 + k % 7, 3 + k % 5), 0) for k in range(200)] + [((3, 4), 0), ((200, 600), 0)]
    grouped, per_module = _models("parametrization", 1, shapes)
    sn_kernels.group(grouped)
    with sn_kernels.use_backend("triton"):
        with _Count() as fwd:
            outs = grouped()
        with _Count() as bwd:
            sum((o * o).sum() for o in outs).backward()
    with sn_kernels.use_backend("torch"):
        refs = per_module()
        sum((o * o).sum() for o in refs).backward()
    assert len(fwd.names) == 3 and len(bwd.names) == 2
    for a, b in zip(outs + _state(grouped) + _grads(grouped), refs + _state(per_module) + _grads(per_module)):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_group_half_types_accumulate_in_fp32(dtype):
    """float16/bfloat16 weights: sigma in float32, everything within the dtype's tolerance of the
    per-module path (which accumulates in float32 too) and of a float64 reference."""
    shapes = [((16, 2100), 0, dtype), ((6, 4, 3, 3), 0, dtype), ((9, 5), 0, dtype)]
    grouped, per_module = _models("parametrization", 1, shapes)
    reference = copy.deepcopy(per_module).double()
    sn_kernels.group(grouped)
    with sn_kernels.use_backend("triton"):
        outs = grouped()
        refs = per_module()
    with sn_kernels.use_backend("torch"):
        exact = reference()
    for a, b, c, m in zip(outs, refs, exact, grouped):
        assert a.dtype == dtype and m.parametrizations.weight[0].sigma.dtype == torch.float32
        assert_close(a, b)
        assert_close(a, c.to(dtype), scale=2.0)


def test_triton_group_is_deterministic_and_updates_buffers_in_place():
    results = []
    for _ in range(2):
        grouped, _ = _models("hook", 2)
        buffers = [b.data_ptr() for b in grouped.buffers()]
        sn_kernels.group(grouped)
        with sn_kernels.use_backend("triton"):
            outs = grouped()
            sum((o * o).sum() for o in outs).backward()
        assert [b.data_ptr() for b in grouped.buffers()] == buffers
        results.append(outs + _state(grouped) + _grads(grouped))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_triton_group_channels_last_and_refresh_per_step():
    """A channels_last convolution weight (copied to contiguous for the kernels) and the once-per-step
    refresh: two forwards share one iteration (3 launches), then the optimizer step refreshes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).to(DEV)
    model[2].to(memory_format=torch.channels_last)
    sn_kernels.apply_spectral_norm(model, api="parametrization")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sn_kernels.group(model, optimizer=opt)
    x = torch.randn(2, 3, 9, 9, device=DEV)
    with sn_kernels.use_backend("triton"):
        with _Count() as c:
            y1 = model(x)
            y2 = model(x)
        assert len(c.names) == 3
        (y1.sum() + y2.sum()).backward()
        opt.step()
        with _Count() as c:
            model(x)
        assert len(c.names) == 3
        assert_close(y1, ref(x))
