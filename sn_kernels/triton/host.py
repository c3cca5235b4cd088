"""Host side of the "triton" backend: allocation, grids and the tile-size table.

Launches (no host sync anywhere, so every path is CUDA-graph capturable):

    training, k iterations   2k mat-vec passes (each reads |W| once)
    eval                    1 pass (reads |W|)
    normalize               1 elementwise pass (reads |W|, writes |W|)
    backward                2 passes (<G, W>: reads 2|W|; grad: reads |G|, writes |W|)
"""
from __future__ import annotations

import torch
import triton

from ..functional import accumulation_dtype, matrix_shape
from . import kernels as K

# Tile table by shape class (not tuned to one shape).  "row" is the program per
# BLOCK_M rows looping over columns (W v); "col" the program per BLOCK_N columns
# looping over rows (W^T u).  Values: (BLOCK_M, BLOCK_N, num_warps).
TILES = {
    "tiny": {"row": (64, 64, 4), "col": (64, 64, 4)},     # m*n <= 4096: one program, one tile
    "wide": {"row": (16, 256, 4), "col": (16, 256, 4)},   # m <= 16 < n
    "tall": {"row": (256, 16, 4), "col": (256, 16, 4)},   # n <= 16 < m
    "large": {"row": (16, 256, 4), "col": (64, 64, 4)},   # enough programs on either side
}
ELEM_BLOCK, ELEM_WARPS = 1024, 4     # elementwise and <G, W> passes
FINISH_BLOCK = 1024                  # block of the last program's fixed-order reduction
MAX_INDEX = 2**31 - 1                # kernels index with int32


def shape_class(m: int, n: int) -> str:
    """The TILES row for an (m, n) matrix."""
    if m * n <= 4096:
        return "tiny"
    if m <= 16:
        return "wide"
    if n <= 16:
        return "tall"
    return "large"


_counters: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor:
    """A persistent zeroed int32 ticket counter per device; every kernel resets it to 0.

    Allocated once (before any CUDA graph capture: a warm-up call does it), so a
    call costs no memset launch.  Kernels on one device share it, which assumes
    they are ordered on one stream (as a training step is)."""
    c = _counters.get(device)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sn_kernels triton backend: run one call eagerly before CUDA graph capture")
        c = torch.zeros(1, dtype=torch.int32, device=device)
        _counters[device] = c
    return c


def _geometry(weight: torch.Tensor, dim: int):
    """(contiguous weight, M, N, B, split): the matrix view's addressing (see kernels.py)."""
    w = weight if weight.is_contiguous() else weight.contiguous()  # at most one copy
    if w.numel() > MAX_INDEX:
        raise ValueError(f"the triton backend indexes with int32; weight has {w.numel()} elements")
    m, n = matrix_shape(w, dim)
    b = 1
    for s in w.shape[dim + 1:]:
        b *= s
    return w, m, n, b, b != n  # b == n exactly when dim == 0 (or every leading size is 1)


def _launch_pass(kernel, tiles, W, x, prev, ws, out, final, m, n, b, split, eps):
    """One mat-vec pass reading ``x``; ``prev`` is the vector kept on a zero/non-finite
    step; ``out`` = (y_acc, y_out, y_copy, sigma)."""
    bm, bn, warps = tiles
    y_raw, partials = ws
    grid = (triton.cdiv(m, bm),) if kernel is K.row_pass_kernel else (triton.cdiv(n, bn),)
    kernel[grid](W, x, y_raw, prev, partials, _counter(W.device), *out, m, n, b, m * b, eps,
                 SPLIT=split, FINAL=final, BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=FINISH_BLOCK, num_warps=warps)


def power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """Power iteration (training) or sigma = u . (W v) (eval); see functional.py for the contract."""
    W, m, n, b, split = _geometry(weight, dim)
    acc = accumulation_dtype(weight.dtype)
    dev = weight.device
    sigma = torch.empty((), dtype=acc, device=dev)
    u_used, v_used = torch.empty_like(u), torch.empty_like(v)
    tiles = TILES[shape_class(m, n)]
    if not training:
        bm, bn, warps = tiles["row"]
        grid = (triton.cdiv(m, bm),)
        partials = torch.empty(grid[0], dtype=acc, device=dev)
        K.eval_pass_kernel[grid](W, u, v, partials, _counter(dev), u_used, v_used, sigma, m, n, b, m * b,
                                 SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=FINISH_BLOCK, num_warps=warps)
        return sigma, u_used, v_used
    # workspace: raw and normalized vectors in the accumulation dtype, one partial per program
    n_parts = max(triton.cdiv(m, tiles["row"][0]), triton.cdiv(n, tiles["col"][1]))
    ws = torch.empty(2 * (m + n) + n_parts, dtype=acc, device=dev)
    u_raw, u_acc, v_raw, v_acc = ws[:m], ws[m:2 * m], ws[2 * m:2 * m + n], ws[2 * m + n:2 * (m + n)]
    partials = ws[2 * (m + n):]
    eps = float(eps)
    u_in, v_in = u, v  # the first pass reads the stored vector, later ones the fp32/fp64 one
    for it in range(n_power_iterations):
        final = it == n_power_iterations - 1
        if order == "vu":
            _launch_pass(K.col_pass_kernel, tiles["col"], W, u_in, v_in, (v_raw, partials), (v_acc, v, v_used, sigma),
                         final, m, n, b, split, eps)
            _launch_pass(K.row_pass_kernel, tiles["row"], W, v_acc, u_in, (u_raw, partials), (u_acc, u, u_used, sigma),
                         final, m, n, b, split, eps)
        else:
            _launch_pass(K.row_pass_kernel, tiles["row"], W, v_in, u_in, (u_raw, partials), (u_acc, u, u_used, sigma),
                         final, m, n, b, split, eps)
            _launch_pass(K.col_pass_kernel, tiles["col"], W, u_acc, v_in, (v_raw, partials), (v_acc, v, v_used, sigma),
                         final, m, n, b, split, eps)
        u_in, v_in = u_acc, v_acc
    return sigma, u_used, v_used


def _dense_like(weight: torch.Tensor):
    """(weight or a contiguous copy, output with the same strides): the elementwise
    kernels walk raw memory, valid when the layout is dense and non-overlapping."""
    out = torch.empty_like(weight)  # preserve_format keeps e.g. channels_last
    if out.stride() == weight.stride() and _is_dense(weight):
        return weight, out
    w = weight.contiguous()
    return w, torch.empty_like(w)


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are a permuted contiguous layout."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def normalize(weight, u, v, sigma, dim):
    """W / sigma (0 where sigma == 0) in the weight's layout and dtype; one launch, sigma read on device."""
    W, out = _dense_like(weight)
    numel = W.numel()
    if numel > MAX_INDEX:
        raise ValueError(f"the triton backend indexes with int32; weight has {numel} elements")
    K.divide_kernel[(triton.cdiv(numel, ELEM_BLOCK),)](W, sigma, out, numel, BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return out


def backward(grad, weight, u, v, sigma, dim):
    """grad_W = (G - <G, W>/sigma u v^T) / sigma in two launches (4|W| bytes)."""
    W, m, n, b, _ = _geometry(weight, dim)
    G = grad.contiguous()
    numel = W.numel()
    grid = (triton.cdiv(numel, ELEM_BLOCK),)
    ws = torch.empty(grid[0] + 1, dtype=sigma.dtype, device=W.device)  # partials, then c
    partials, c = ws[:grid[0]], ws[grid[0]:]
    K.dot_pass_kernel[grid](G, W, partials, _counter(W.device), sigma, c, numel,
                            BLOCK=ELEM_BLOCK, BLOCK_V=FINISH_BLOCK, num_warps=ELEM_WARPS)
    out = torch.empty_like(W)
    K.grad_pass_kernel[grid](G, u, v, c, sigma, out, numel, m, b, BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return out
