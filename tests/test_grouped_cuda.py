"""sn_kernels.group on the native backend's CUDA kernels: the multi-tensor kernels
(csrc/sn_kernels_grouped_cuda.cu).

Every contiguous weight of a (device, dtype) group in a fixed number of launches: training 2k + 1
for k power iterations, eval 2, backward 2, whatever the number and sizes of the weights.  Each
weight's blocks run the per-weight kernels' bodies over the same plan (csrc/cuda_common.cuh), so
the results are bit-identical to the per-module native path (torch.equal, not a tolerance).
Skipped without a CUDA device with the native CUDA kernels.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels import native

from helpers import assert_close, channels_last_group, model_grads as _grads, model_state as _state, weight_models

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and native.has_kernel("cuda")),
                                reason="no CUDA device with the native CUDA kernels")

DEV = torch.device("cuda")
GROUP_KERNELS = ("group_matvec_kernel", "group_eval_kernel", "group_divide_kernel", "group_dot_kernel",
                 "group_grad_kernel")
PER_WEIGHT_KERNELS = ("row_dot_kernel", "col_partial_kernel", "normalize_kernel", "dot_partial_kernel",
                      "grad_kernel")


def _launches(fn) -> Counter:
    """The sn_kernels CUDA kernels ``fn`` launches, by name (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return Counter(k for n in names for k in GROUP_KERNELS + PER_WEIGHT_KERNELS if re.search(rf"\b{k}\b", n))


# (shape, dim[, dtype]): one row, one column, a row split over several warps (16 x 2100), many row
# chunks (520 x 40), a 4-D convolution weight, dim = 1 with rows before it (the flattened row pass),
# dim = the last dimension (the transposed kernels), float64 and bfloat16 (groups of their own)
SHAPES = [((4, 3), 0), ((1, 128), 0), ((7, 1), 0), ((16, 2100), 0), ((520, 40), 0), ((6, 4, 3, 3), 0),
          ((5, 7, 3), 1), ((33, 17), 1), ((33, 65), 0, torch.float64), ((9, 40), 1, torch.float64),
          ((16, 2100), 0, torch.bfloat16), ((6, 4, 3, 3), 1, torch.bfloat16)]


def _models(api, iterations, shapes=SHAPES):
    return weight_models(api, iterations, shapes, DEV)


def _assert_equal(actual, expected):
    """Bit for bit (NaN where the other has NaN)."""
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert same, f"max deviation {(a.double() - b.double()).abs().max().item()}"


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("api", ["hook", "parametrization"])  # orders "vu" and "uv"
def test_cuda_group_matches_per_module_in_fixed_launches(api, iterations):
    """W/sigma, u, v, sigma and the weight gradients bit-identical to the per-module native path, step
    after step, in training and eval; launches per (dtype) group: 2k + 1 forward (2 in eval), 2 backward,
    and no per-weight kernel."""
    grouped, per_module = _models(api, iterations)
    sn_kernels.group(grouped)
    grads = [torch.randn(e[0], dtype=_dtype(e), device=DEV) for e in SHAPES]
    groups = len({_dtype(e) for e in SHAPES})
    with sn_kernels.use_backend("native"):
        for training in (True, True, False):
            grouped.train(training), per_module.train(training)
            outs = []
            fwd = _launches(lambda: outs.extend(grouped()))
            bwd = _launches(lambda: torch.autograd.backward(outs, grads))
            refs = per_module()
            torch.autograd.backward(refs, grads)
            _assert_equal(outs, refs)
            _assert_equal(_state(grouped) + _grads(grouped), _state(per_module) + _grads(per_module))
            if training:
                assert fwd == Counter({"group_matvec_kernel": 2 * iterations * groups, "group_divide_kernel": groups})
            else:
                assert fwd == Counter({"group_eval_kernel": groups, "group_divide_kernel": groups})
            assert bwd == Counter({"group_dot_kernel": groups, "group_grad_kernel": groups})


def test_cuda_group_launches_do_not_grow_with_weights():
    """200 weights, and weights whose sizes differ by 10^4 x: still 3 launches forward, 2 backward, the
    results bit-identical to the per-module native path."""
    shapes = [((2 + k % 7, 3 + k % 5), 0) for k in range(200)] + [((3, 4), 0), ((300, 400), 0)]
    grouped, per_module = _models("parametrization", 1, shapes)
    sn_kernels.group(grouped)
    with sn_kernels.use_backend("native"):
        outs = []
        fwd = _launches(lambda: outs.extend(grouped()))
        bwd = _launches(lambda: sum((o * o).sum() for o in outs).backward())
        refs = per_module()
        sum((o * o).sum() for o in refs).backward()
    assert sum(fwd.values()) == 3 and sum(bwd.values()) == 2
    _assert_equal(outs + _state(grouped) + _grads(grouped), refs + _state(per_module) + _grads(per_module))


# the CUDA plans of tests/test_native.py (a row split over several warps, many row chunks, the
# transposed kernels, the flattened non-vector row pass, rows that do not fill a vector) in one list
OP_SHAPES = [((3, 5000), 0), ((5000, 3), 0), ((700, 300), 1), ((64, 40, 4, 4), 1), ((37, 1001), 0),
             ((9, 11, 70), 1), ((6, 50, 8), 2), ((1, 9), 0), ((9, 1), 0), ((5, 3), 1)]


def _op_inputs(dtype, shapes=OP_SHAPES):
    g = torch.Generator().manual_seed(1)
    ws, us, vs, dims = [], [], [], []
    for shape, dim in shapes:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        m = shape[dim]
        n = w.numel() // m
        ws.append(w.to(DEV, dtype))
        us.append(nn.functional.normalize(torch.randn(m, generator=g, dtype=torch.float64), dim=0).to(DEV, dtype))
        vs.append(nn.functional.normalize(torch.randn(n, generator=g, dtype=torch.float64), dim=0).to(DEV, dtype))
        dims.append(dim)
    return ws, us, vs, dims


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("order", ["vu", "uv"])
@pytest.mark.parametrize("iterations,training", [(1, True), (2, True), (1, False)], ids=["k1", "k2", "eval"])
def test_cuda_group_ops_match_per_weight_ops(dtype, order, iterations, training):
    """native_group_forward / native_group_backward on CUDA: the per-weight ops' results bit for bit,
    the stored u, v untouched (the op is functional), sigma in the accumulation dtype."""
    ws, us, vs, dims = _op_inputs(dtype)
    stored = [t.clone() for t in us + vs]
    ops = torch.ops.sn_kernels
    outs, sigmas, new_us, new_vs = ops.native_group_forward(ws, us, vs, dims, iterations, 1e-12, order, training)
    _assert_equal(us + vs, stored)
    grads = [torch.randn_like(w) for w in ws]
    grad_ws = ops.native_group_backward(grads, ws, new_us, new_vs, sigmas, dims)
    for i, (w, dim) in enumerate(zip(ws, dims)):
        u, v = us[i].clone(), vs[i].clone()
        sigma, u_used, v_used = ops.native_power_iteration(w, u, v, iterations, 1e-12, dim, order, training)
        out = ops.native_normalize(w, u_used, v_used, sigma, dim)
        grad_w = ops.native_backward(grads[i], w, u_used, v_used, sigma, dim)
        assert sigmas[i].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _assert_equal([outs[i], sigmas[i], new_us[i], new_vs[i], grad_ws[i]], [out, sigma, u_used, v_used, grad_w])


def test_cuda_group_ops_keep_the_previous_vectors_on_a_zero_weight():
    """A zero weight (a rejected step keeps the stored u, v; sigma 0, W/sigma 0) and a non-finite one
    beside ordinary weights: each as the per-weight ops give it."""
    ws, us, vs, dims = _op_inputs(torch.float32, [((5, 7), 0), ((6, 4), 0), ((8, 3), 1)])
    ws[1].zero_()
    ws[2][0, 0] = float("inf")
    ops = torch.ops.sn_kernels
    for training in (True, False):
        res = ops.native_group_forward(ws, us, vs, dims, 2, 1e-12, "uv", training)
        for i, (w, dim) in enumerate(zip(ws, dims)):
            sigma, u_used, v_used = ops.native_power_iteration(w, us[i].clone(), vs[i].clone(), 2, 1e-12, dim, "uv",
                                                               training)
            out = ops.native_normalize(w, u_used, v_used, sigma, dim)
            _assert_equal([r[i] for r in res], [out, sigma, u_used, v_used])
        assert torch.equal(res[2][1], us[1]) and torch.equal(res[3][1], vs[1])


def test_cuda_group_is_deterministic_and_updates_buffers_in_place():
    results = []
    for _ in range(2):
        grouped, _ = _models("hook", 2)
        buffers = [b.data_ptr() for b in grouped.buffers()]
        sn_kernels.group(grouped)
        with sn_kernels.use_backend("native"):
            outs = grouped()
            sum((o.float() ** 2).sum() for o in outs).backward()
        assert [b.data_ptr() for b in grouped.buffers()] == buffers
        results.append(outs + _state(grouped) + _grads(grouped))
    _assert_equal(*results)


def test_cuda_group_captures_in_a_cuda_graph():
    """The grouped ops captured in a CUDA graph (the per-launch tables are kernel arguments: nothing to
    copy to the device): replays equal the eager calls, also after the weights changed in place."""
    ws, us, vs, dims = _op_inputs(torch.float32, OP_SHAPES + [((300, 400), 0), ((3, 4), 0)])
    grads = [torch.randn_like(w) for w in ws]
    ops = torch.ops.sn_kernels

    def step():
        outs, sigmas, new_us, new_vs = ops.native_group_forward(ws, us, vs, dims, 2, 1e-12, "uv", True)
        return [outs, sigmas, new_us, new_vs, ops.native_group_backward(grads, ws, new_us, new_vs, sigmas, dims)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for scale in (1.0, 0.5):
        with torch.no_grad():
            for w in ws:
                w.mul_(scale)
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            _assert_equal(a, b)


def test_cuda_group_channels_last_weight_takes_the_per_weight_kernels():
    """A channels_last convolution weight (not contiguous) runs the per-weight kernels inside the same
    call, beside the multi-tensor launches of the contiguous one; the once-per-step refresh: two forwards
    share one iteration, the optimizer step refreshes."""
    model, ref, opt, x = channels_last_group(DEV)
    with sn_kernels.use_backend("native"):
        ys = []
        launched = _launches(lambda: ys.extend([model(x), model(x)]))
        assert launched == Counter({"group_matvec_kernel": 2, "group_divide_kernel": 1, "row_dot_kernel": 1,
                                    "col_partial_kernel": 1, "normalize_kernel": 1})
        (ys[0].sum() + ys[1].sum()).backward()
        opt.step()
        assert sum(_launches(lambda: model(x)).values()) == 6
        assert_close(ys[0], ref(x))
