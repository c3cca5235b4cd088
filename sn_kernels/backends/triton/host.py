"""Host side of the "triton" backend: allocation, grids and the tile-size table.

Launches (no host sync anywhere, so every path is CUDA-graph capturable):

    training, k iterations   2k mat-vec passes (each reads |W| once)
    eval                    1 pass (reads |W|)
    normalize               1 elementwise pass (reads |W|, writes |W|)
    backward                2 passes (<G, W>: reads 2|W|; grad: reads |G|, writes |W|)

Every launch runs on the weight's device (a device guard when it is not the current
one) and on that device's current stream.  The ticket counters the kernels use are
per (device, stream) and never freed; under CUDA graph capture each launch gets
counters of its own, owned by the graph (see ``_counters``).
"""
from __future__ import annotations

import functools
import math

import torch
import triton

from ...checks import EPS_MIN, check_eps_in
from ..contract import ORDERS, accumulation_dtype, matrix_shape
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
SPLIT_BLOCK = 16                     # splits a tile's last program sums per load (two-stage passes)
TARGET_PROGRAMS = 1024               # programs wanted per mat-vec pass (about 8 per SM on an H100/H200)
MIN_SPLIT_STEPS = 4                  # a split covers at least this many tile steps of the reduced dim
MAX_DOT_PROGRAMS = 1024              # programs of the <G, W> pass
# kernels index with int32, and a pass's last program forms the end of its range (lo + its chunk or split
# length, up to about numel / 1024 + 2048 elements) before clamping it to numel: that end must not wrap
MAX_INDEX = 2**31 - 1 - 2**22


def shape_class(m: int, n: int) -> str:
    """The TILES row for an (m, n) matrix."""
    if m * n <= 4096:
        return "tiny"
    if m <= 16:
        return "wide"
    if n <= 16:
        return "tall"
    return "large"


def splits(tiles: int, k: int, block_k: int) -> tuple[int, int]:
    """(number of splits, length of each) of the reduced dimension ``k`` for a pass of ``tiles``
    programs: enough programs to fill the device, each split at least MIN_SPLIT_STEPS tile steps.
    Depends on the shape only, so the fixed-order sums are the same on every run."""
    if tiles >= TARGET_PROGRAMS // 2:
        return 1, max(k, 1)
    n = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(k, block_k * MIN_SPLIT_STEPS)))
    length = triton.cdiv(triton.cdiv(k, n), block_k) * block_k
    return triton.cdiv(k, length), length


def dot_grid(numel: int) -> tuple[int, int]:
    """(programs, elements per program) of the <G, W> pass: at most MAX_DOT_PROGRAMS programs
    over contiguous chunks of whole blocks (shape-only, so the partial sums are too)."""
    n = max(1, min(MAX_DOT_PROGRAMS, triton.cdiv(numel, ELEM_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(numel, n), ELEM_BLOCK) * ELEM_BLOCK
    return triton.cdiv(numel, chunk), chunk


@functools.lru_cache(maxsize=1024)
def plan(m: int, n: int):
    """Grids and workspace sizes of the passes for an (m, n) matrix (host arithmetic, cached).

    Returns a dict: ``row``/``col``/``eval``: (tiles, splits, split length, (BLOCK_M, BLOCK_N,
    warps)); ``partials``: floats for the per-program partials; ``split``: floats for the
    split partial vectors; ``counters``: int32 tickets a launch needs (1 + tiles of a
    two-stage pass)."""
    tiles = TILES[shape_class(m, n)]
    bm, bn, _ = tiles["row"]
    row_tiles = triton.cdiv(m, bm)
    row = (row_tiles, *splits(row_tiles, n, bn), tiles["row"])
    bm, bn, _ = tiles["col"]
    col_tiles = triton.cdiv(n, bn)
    col = (col_tiles, *splits(col_tiles, m, bm), tiles["col"])
    two = [p for p in (row, col) if p[1] > 1]
    return {
        "row": row, "col": col, "eval": row,  # the eval pass runs on the row pass's grid
        "partials": max(row[0], col[0]),
        "split": max([row[1] * m if row[1] > 1 else 0, col[1] * n if col[1] > 1 else 0]),
        "counters": 1 + max([p[0] for p in two], default=0),
    }


_counter_buffers: dict[tuple, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counter buffers: never freed (a queued kernel may still use one)


def _stream_key(device: torch.device) -> tuple:
    """(device type, index, current raw stream) of ``device``."""
    if device.type != "cuda":
        return (device.type, device.index, 0)
    return ("cuda", device.index, torch._C._cuda_getCurrentRawStream(device.index))


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 ticket counters, all 0, for the launches about to be made on ``device``'s
    current stream; every kernel resets the counters it used to 0.

    Eager: one buffer per (device, stream), zeroed once on that stream and never freed
    (it grows by retiring the old one), so kernels on two streams never share a counter
    and a call costs no memset.  Under CUDA graph capture: a fresh zeroed tensor from the
    graph's private pool, its memset captured before the kernel, so a graph's counters are
    its own (two graphs, or a graph and eager calls, can run at once on any streams)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = _stream_key(device)
    c = _counter_buffers.get(key)
    if c is None or c.numel() < n:
        if c is not None:
            _retired.append(c)
        c = torch.zeros(max(64, 1 << (n - 1).bit_length()), dtype=torch.int32, device=device)
        _counter_buffers[key] = c
    return c


def _on_weight_device(fn):
    """Run ``fn`` with the device of its first argument (a tensor, or a list of them: the grouped
    path) current, as Triton launches on the current device and stream."""
    @functools.wraps(fn)
    def run(t, *args):
        dev = (t[0] if isinstance(t, list) else t).device
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(t, *args)
        return fn(t, *args)
    return run


def matrix_view(weight: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(M, N, B) of the weight's matrix view with ``dim`` first (kernels.py's addressing); a ``dim`` < 0
    counts from the end, as the other backends' ops take it (B slices the shape after ``dim``)."""
    m, n = matrix_shape(weight, dim)  # an IndexError for a dim out of range, with PyTorch's message
    return m, n, weight.shape[dim % weight.dim() + 1:].numel()


def _geometry(weight: torch.Tensor, dim: int):
    """(contiguous weight, M, N, B, split): the matrix view's addressing (see kernels.py)."""
    w = weight if weight.is_contiguous() else weight.contiguous()  # at most one copy
    if w.numel() > MAX_INDEX:
        raise ValueError(f"the triton backend indexes with int32; weight has {w.numel()} elements")
    m, n, b = matrix_view(w, dim)
    return w, m, n, b, b != n  # b == n exactly when dim == 0 (or every leading size is 1)


def _launch_pass(kernel, p, W, x, prev, ws, out, final, m, n, b, split, eps, counters):
    """One mat-vec pass reading ``x`` with plan ``p`` = (tiles, splits, split length, tiles
    config); ``prev`` is the vector kept on a zero/non-finite step; ``ws`` = (y_raw,
    partials, split partials); ``out`` = (y_acc, y_out, y_copy, sigma)."""
    tiles, n_split, length, (bm, bn, warps) = p
    y_raw, partials, y_part = ws
    kernel[(tiles, n_split)](W, x, y_raw, prev, partials, counters, *out, y_part, m, n, b, m * b, eps, length,
                             int(final), SPLIT=split, TWO_STAGE=n_split > 1, BLOCK_M=bm, BLOCK_N=bn,
                             BLOCK_V=FINISH_BLOCK, SPLIT_BLOCK=SPLIT_BLOCK, num_warps=warps)


def check_op_args(dtype: torch.dtype, n_power_iterations: int, eps: float, order: str) -> None:
    """Refuse what the native op refuses, with its messages (csrc/common.h, check_power_iteration_args):
    n_power_iterations <= 0 (no pass would write sigma), eps not positive and finite or below the
    accumulation dtype's range (checks.check_eps_in), an order other than "vu" and "uv"."""
    if n_power_iterations <= 0:
        raise RuntimeError("sn_kernels: n_power_iterations must be positive")
    if not 0 < eps < math.inf:
        raise RuntimeError("sn_kernels: eps must be positive and finite")
    if eps < EPS_MIN:
        check_eps_in(eps, dtype)
    if order not in ORDERS:
        raise RuntimeError(f'sn_kernels: order must be "vu" or "uv", got "{order}"')


@_on_weight_device
def power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """Power iteration (training) or sigma = u . (W v) (eval); see backends/contract.py for the contract."""
    W, m, n, b, split = _geometry(weight, dim)
    acc = accumulation_dtype(weight.dtype)
    dev = weight.device
    sigma = torch.empty((), dtype=acc, device=dev)
    u_used, v_used = torch.empty_like(u), torch.empty_like(v)
    pl = plan(m, n)
    if not training:
        tiles, n_split, length, (bm, bn, warps) = pl["eval"]
        partials = torch.empty(tiles * n_split, dtype=acc, device=dev)
        K.eval_pass_kernel[(tiles, n_split)](W, u, v, partials, _counters(dev, 1), u_used, v_used, sigma,
                                             m, n, b, m * b, length, SPLIT=split, BLOCK_M=bm, BLOCK_N=bn,
                                             BLOCK_V=FINISH_BLOCK, num_warps=warps)
        return sigma, u_used, v_used
    # workspace: raw and normalized vectors in the accumulation dtype, one partial per program,
    # the split partial vectors of a two-stage pass
    ws = torch.empty(2 * (m + n) + pl["partials"] + max(pl["split"], 1), dtype=acc, device=dev)
    u_raw, u_acc, v_raw, v_acc = ws[:m], ws[m:2 * m], ws[2 * m:2 * m + n], ws[2 * m + n:2 * (m + n)]
    partials = ws[2 * (m + n):2 * (m + n) + pl["partials"]]
    y_part = ws[2 * (m + n) + pl["partials"]:]
    counters = _counters(dev, pl["counters"])
    eps = float(eps)
    u_in, v_in = u, v  # the first pass reads the stored vector, later ones the fp32/fp64 one

    def to_v(x, final):  # v = normalize(W^T x)
        _launch_pass(K.col_pass_kernel, pl["col"], W, x, v_in, (v_raw, partials, y_part), (v_acc, v, v_used, sigma),
                     final, m, n, b, split, eps, counters)

    def to_u(x, final):  # u = normalize(W x)
        _launch_pass(K.row_pass_kernel, pl["row"], W, x, u_in, (u_raw, partials, y_part), (u_acc, u, u_used, sigma),
                     final, m, n, b, split, eps, counters)

    for it in range(n_power_iterations):
        final = it == n_power_iterations - 1
        if order == "vu":
            to_v(u_in, final)
            to_u(v_acc, final)
        else:
            to_u(v_in, final)
            to_v(u_acc, final)
        u_in, v_in = u_acc, v_acc
    # written in place by the kernels: the version counters move as an in-place op's do (a graph that
    # saved u or v refuses a later backward instead of reading the new values)
    torch.autograd.graph.increment_version(u)
    torch.autograd.graph.increment_version(v)
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


@_on_weight_device
def normalize(weight, u, v, sigma, dim):
    """W / sigma (0 where sigma == 0) in the weight's layout and dtype; one launch, sigma read on device."""
    W, out = _dense_like(weight)
    numel = W.numel()
    if numel > MAX_INDEX:
        raise ValueError(f"the triton backend indexes with int32; weight has {numel} elements")
    K.divide_kernel[(triton.cdiv(numel, ELEM_BLOCK),)](W, sigma, out, numel, BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return out


@_on_weight_device
def backward(grad, weight, u, v, sigma, dim):
    """grad_W = (G - <G, W>/sigma u v^T) / sigma in two launches (4|W| bytes)."""
    W, m, n, b, _ = _geometry(weight, dim)
    G = grad.contiguous()
    numel = W.numel()
    n_dot, chunk = dot_grid(numel)
    ws = torch.empty(n_dot + 1, dtype=sigma.dtype, device=W.device)  # partials, then c
    partials, c = ws[:n_dot], ws[n_dot:]
    K.dot_pass_kernel[(n_dot,)](G, W, partials, _counters(W.device, 1), sigma, c, numel, chunk,
                                BLOCK=ELEM_BLOCK, BLOCK_V=FINISH_BLOCK, num_warps=ELEM_WARPS)
    out = torch.empty_like(W)
    K.grad_pass_kernel[(triton.cdiv(numel, ELEM_BLOCK),)](G, u, v, c, sigma, out, numel, m, b,
                                                          BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return out
