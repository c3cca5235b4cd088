"""The native CPU kernels on the layouts with short rows: weights viewed along dim != 0 with a short
trailing extent (ConvTranspose 1x1 / 2x2 kernels at dim=1, Linear dim=1, last-dim views: inner 1 to 17)
and tall narrow weights (m x 1 .. m x 17, m around the row-chunk boundaries of W^T u).  These take the
many-rows-per-call loops (dot_rows, add_rows_outer, grad_rows of csrc/cpu_f32_loops.h, the memory-order
sweeps of csrc/sn_kernels_cpu.cpp).  Every op against the float64 formula, and bit-identical for any
number of threads (the partition of every sum depends on the shape alone)."""
from __future__ import annotations

import pytest
import torch

from sn_kernels.backends import pytorch
from sn_kernels.testing import pytorch_formula

from helpers import check, per_thread_count, sample_inputs

ops = torch.ops.sn_kernels
EPS = 1e-12
DTYPES = [torch.float32, torch.float64, torch.bfloat16]

# (shape, dim), small: inner = prod(shape[dim + 1:]) in 1, 2, 4, 9 and 15-17 (the short-row threshold 16)
SHORT_INNER = [
    ((37, 45), 1), ((5, 33, 2), 1), ((16, 16, 3), 2), ((12, 35, 2, 2), 1), ((6, 40, 3, 3), 1), ((5, 70, 1, 1), 1),
    ((6, 4, 3, 3), 3), ((4, 34, 1, 3, 3), 1), ((3, 33, 2, 1, 1), 1), ((2, 3, 5, 2, 2), 2), ((2, 1100, 1), 1),
    ((4, 40, 15), 1), ((4, 40, 16), 1), ((4, 40, 17), 1),
]
# row blocks of dot_rows' (row, k) partial sums (4096 per block: len 2 -> 2048 rows, len 9 -> 448 (float32) or 455
# rows, len 128 -> 32) and either side of its longest tiled piece (128); outer large enough that the rows are
# split over the threads too (at least GRAIN / n rows a task)
BLOCKS = [((16, 2100, 2), 1), ((40, 500, 9), 1), ((30, 70, 128), 1), ((30, 40, 129), 1)]
# tall narrow along dim 0: m around the row chunks of W^T u (32 rows at least, 32 chunks at most)
TALL = [((m, n), 0) for m in (31, 32, 33, 1024, 1025, 1057) for n in (1, 2)] + [
    ((1057, n), 0) for n in (3, 4, 15, 16, 17)]
# big enough (>= 2 x 32768 elements) that every loop is split over the threads
BIG = [((300, 260), 1), ((40, 300, 2, 2), 1), ((30, 270, 3, 3), 1), ((8, 270, 2, 3, 3), 1), ((2, 3, 120, 100, 1), 3),
       ((130, 129, 4), 2), ((70000, 1), 0), ((70001, 2), 0), ((65537, 4), 0), ((40000, 16), 0)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_ops(w, u, v, G, dim):
    """Every native op that reads W as a matrix: training steps in both orders, eval sigma, backward
    (from W and from W / sigma), each from copies of u and v."""
    out = {}
    for order in ("uv", "vu"):
        uu, vv = u.clone(), v.clone()
        sigma, _, _ = ops.native_power_iteration(w, uu, vv, 2, EPS, dim, order, True)
        out["train " + order] = (sigma, uu, vv)
    sigma = ops.native_power_iteration(w, u.clone(), v.clone(), 1, EPS, dim, "uv", False)[0]
    out["eval sigma"] = (sigma,)
    out["backward"] = (ops.native_backward(G, w, u, v, sigma, dim),)
    w_sn = ops.native_normalize(w, u, v, sigma, dim)
    out["layout backward"] = (ops.native_normalize_layout_backward(G, w_sn, u, v, sigma, dim, False, None),)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHORT_INNER + BLOCKS + TALL, ids=str)
def test_ops_match_float64_formula(shape, dim, dtype):
    """Power iteration (both orders, two steps), eval sigma and both backwards against PyTorch's recipe
    and sn_kernels.backends.pytorch.backward in float64."""
    w, u, v, G = sample_inputs("cpu", dtype, shape, dim, warmup=5, warmup_order="uv", grad=True)
    out = run_ops(w, u, v, G, dim)
    for order in ("uv", "vu"):
        _, sigma_ref, u_ref, v_ref = pytorch_formula(w, u, v, 2, EPS, dim, order, True)
        sigma, u_new, v_new = out["train " + order]
        assert sigma.dtype == _acc(dtype)
        check(f"layouts: sigma ({order})", sigma, sigma_ref, dtype)
        check(f"layouts: u ({order})", u_new, u_ref, dtype)
        check(f"layouts: v ({order})", v_new, v_ref, dtype)
    _, sigma_ref, _, _ = pytorch_formula(w, u, v, 1, EPS, dim, "uv", False)
    (sigma,) = out["eval sigma"]
    check("layouts: eval sigma", sigma, sigma_ref, dtype)
    grad_ref = pytorch.backward(G.double(), w.double(), u.double(), v.double(), sigma.double(), dim)
    for what in ("backward", "layout backward"):
        (grad,) = out[what]
        assert grad.dtype == dtype and grad.shape == w.shape
        # the layout backward takes <G, W / sigma> from the rounded W / sigma: half types' table, twice
        check(f"layouts: {what}", grad, grad_ref, dtype, scale=2 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,dim", BIG + BLOCKS + TALL[-7:], ids=str)
def test_bit_identical_for_any_thread_count(shape, dim, dtype):
    """Every op's outputs with 1, 2 and 3 threads are the same bits."""
    w, u, v, G = sample_inputs("cpu", dtype, shape, dim, warmup=2, warmup_order="uv", grad=True)
    results = per_thread_count(lambda: run_ops(w, u, v, G, dim))
    for threads, res in zip((2, 3), results[1:]):
        for what, tensors in res.items():
            for a, b in zip(tensors, results[0][what]):
                assert torch.equal(a, b), f"{what}: {threads} threads differ from 1"
