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


def _avx2_table() -> bool:
    """Whether the native CPU kernels run their AVX2+FMA loops here (what the float64 dot's bits depend on)."""
    import os

    if os.environ.get("SN_KERNELS_CPU_ISA", "").lower() == "baseline":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def _dot_f64_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The AVX2 table's float64 dot (dot_f64) of each row of a (at most 16 elements) with b, in its order: lane l
    holds a_l b_l (zero past the row), lanes l, l + 4, l + 8, l + 12 summed as (l + l+8) + (l+4 + l+12), then the
    four as (0 + 2) + (1 + 3).  Signs of zero aside."""
    p = torch.zeros(a.shape[0], 16, dtype=torch.float64)
    p[:, :a.shape[1]] = a * b + 0.0
    c = [p[:, 4 * j:4 * j + 4] for j in range(4)]
    t = (c[0] + c[2]) + (c[1] + c[3])
    return (t[:, 0] + t[:, 2]) + (t[:, 1] + t[:, 3])


@pytest.mark.skipif(not _avx2_table(), reason="the float64 dot's order is the AVX2 table's")
@pytest.mark.parametrize("n", range(1, 17))
def test_float64_short_rows_have_the_dots_bits(n):
    """Rows of 1-16 float64 elements along dim 0 (whole chunks loaded with their tail lanes cleared, v's lanes
    loaded once: csrc/cpu_f32_loops.h, NOTES L12) give dot_f64's bits exactly, on the rows at the ends of the
    row blocks of 512 and of the weight, and with products that underflow.  (Rows of Inf or NaN would make every
    sigma NaN here; their neighbours' lanes are cleared bit by bit, and an A/B of the op before and after the
    change gave the same bits on such weights: NOTES L12.)"""
    torch.manual_seed(n)
    m = 1027
    w = torch.randn(m, n, dtype=torch.float64)
    w[2::13] *= 1e-170  # products below the smallest subnormal
    v = torch.randn(n, dtype=torch.float64) * torch.where(torch.arange(n) % 3 == 0, 1e-170, 1.0)
    expected = _dot_f64_bits(w, v)
    rows = sorted({0, 1, 2, 3, 4, 5, 6, 13, 15, 26, 510, 511, 512, 513, 514, 1022, 1023, 1024, 1025, 1026})
    got = []
    for i in rows:
        u = torch.zeros(m, dtype=torch.float64)
        u[i] = 1.0  # sigma = u . (W v) is then row i's dot (the final dot adds +0 products to it)
        got.append(ops.native_power_iteration(w, u, v.clone(), 1, EPS, 0, "vu", False)[0])
    got = torch.stack(got) + 0.0
    want = expected[rows] + 0.0
    assert torch.equal(got.view(torch.int64), want.view(torch.int64)), (got - want)
