"""Multi-tensor kernels of the "triton" backend: one launch per pass for every weight of a group.

As in apex's ``multi_tensor_apply``, a launch walks a table of work items, one program per
item, so a 3x64 weight and a 1536x13824 one share the launch and the large one is cut into
many items of about the same size (group_host.py builds the tables):

    ptrs[w, :]        addresses of weight w's tensors (forward: W, stored u, stored v;
                      backward: G, W, u, v, sigma, or W alone with ``FLAT``), cast to
                      pointers in the kernel
    meta[w, F_*]      weight w's geometry, tiles and splits, and its offsets into the
                      shared workspace, counters and flat output buffers (int64)
    items[p, :]       program p's (weight, tile, split) or (weight, chunk)

Every program runs the per-weight kernels' helpers (kernels.py) on its item, so the
arithmetic, the fixed-order sums and the ticket protocol are the same; the tickets and
partials are per weight (``counters + meta[w, F_COUNTERS]``), so the last program of
each weight finishes that weight.  Deterministic: the items depend on the shapes only.
"""
import triton
import triton.language as tl

from .kernels import (_col_tile, _divide_block, _dot_range, _eval_tile, _finish_tile, _grad_block, _last_ticket,
                      _row_tile, _safe_div, _sum_partials)

# fields of a meta row (group_host.META_FIELDS names them in the same order)
F_M = tl.constexpr(0)             # rows of the matrix view
F_N = tl.constexpr(1)             # columns
F_B = tl.constexpr(2)             # prod(shape[dim+1:]): addressing of the view (kernels._offsets)
F_ROW_TILES = tl.constexpr(3)     # row pass (W x): tiles of BLOCK_M rows
F_ROW_SPLITS = tl.constexpr(4)    # ... splits of the columns
F_ROW_K = tl.constexpr(5)         # ... columns per split
F_COL_TILES = tl.constexpr(6)     # column pass (W^T x): tiles of BLOCK_N columns
F_COL_SPLITS = tl.constexpr(7)
F_COL_K = tl.constexpr(8)
F_WS = tl.constexpr(9)            # workspace: u_raw, u_acc (M each), v_raw, v_acc (N each), partials, split partials
F_PARTIALS = tl.constexpr(10)     # offset of the partials in the workspace
F_SPLITBUF = tl.constexpr(11)     # offset of the split partial vectors
F_COUNTERS = tl.constexpr(12)     # offset of the weight's ticket counters
F_USED = tl.constexpr(13)         # offset of u_used (M), then v_used (N), in the flat vector buffer
F_OUT = tl.constexpr(14)          # offset of the weight in the flat output buffer
F_NUMEL = tl.constexpr(15)
F_CHUNKS = tl.constexpr(16)       # elementwise items of the weight
NF = tl.constexpr(17)


@triton.jit
def _ptr(ptrs, w, k, K: tl.constexpr, DT: tl.constexpr):
    """Pointer ``k`` of weight ``w`` in the address table, to elements of type DT."""
    return tl.load(ptrs + w * K + k).to(tl.pointer_type(DT))


# The tables are int64, but every size and index within one weight, 2 M included, fits int32
# (group_host._fits), and the kernels index in int32 as the per-weight ones do: int64 element offsets
# double the registers of the mat-vec tiles (254 against 128 in the general-addressing variant, ptxas)
# and make its div/mod 64-bit.  Only the offsets into the group's shared buffers (F_WS, F_USED, F_OUT, ...) stay int64.
@triton.jit
def _size(row, field):
    """A size or count field of a meta row, as int32."""
    return tl.load(row + field).to(tl.int32)


@triton.jit
def _tile_item(items, meta):
    """This program's (weight, tile, split) item of a pass: (w, t, s, its meta row, M, N, B), int32."""
    pid = tl.program_id(0)
    w = tl.load(items + 3 * pid).to(tl.int32)
    row = meta + w * NF
    return (w, tl.load(items + 3 * pid + 1).to(tl.int32), tl.load(items + 3 * pid + 2).to(tl.int32), row,
            _size(row, F_M), _size(row, F_N), _size(row, F_B))


@triton.jit
def _chunk_item(items, meta):
    """This program's (weight, chunk) item of an elementwise launch: (w, c, its meta row), int32."""
    pid = tl.program_id(0)
    w = tl.load(items + 2 * pid).to(tl.int32)
    return w, tl.load(items + 2 * pid + 1).to(tl.int32), meta + w * NF


@triton.jit(do_not_specialize=["final"])
def group_row_kernel(ptrs, meta, items, ws, counters, used, sigmas, eps: tl.float64, final,
                     X_STORED: tl.constexpr, PREV_STORED: tl.constexpr, IN_PLACE: tl.constexpr, SPLIT: tl.constexpr,
                     TWO_STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """u = normalize(W x) for every weight; program p does item (weight, rows tile, columns split).

    ``x`` is the stored v (``X_STORED``: the iteration's first pass) or the previous pass's v in
    the workspace; a rejected step keeps the stored u (``PREV_STORED``: first iteration) or the
    workspace's.  The final pass writes u into ``used`` and, ``IN_PLACE``, into the stored u (the
    functional op, ``triton_group_forward``, leaves the stored vectors alone)."""
    DT = used.dtype.element_ty
    w, t, s, row, M, N, B = _tile_item(items, meta)
    base = ws + tl.load(row + F_WS)
    u_buf = _ptr(ptrs, w, 1, 3, DT)
    u_copy = used + tl.load(row + F_USED)
    if IN_PLACE:
        u_out = u_buf
    else:
        u_out = u_copy
    if X_STORED:
        x = _ptr(ptrs, w, 2, 3, DT)
    else:
        x = base + 2 * M + N  # v_acc
    if PREV_STORED:
        prev = u_buf
    else:
        prev = base + M  # u_acc
    K = _size(row, F_ROW_K)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = s * K
    y = _row_tile(_ptr(ptrs, w, 0, 3, DT), x, rows, lo, tl.minimum(N, lo + K), M, N, B, M * B,
                  ws.dtype.element_ty, SPLIT, BLOCK_M, BLOCK_N)
    _finish_tile(y, rows, rows < M, t, _size(row, F_ROW_TILES), s, _size(row, F_ROW_SPLITS),
                 ws + tl.load(row + F_SPLITBUF), base, prev, ws + tl.load(row + F_PARTIALS),
                 counters + tl.load(row + F_COUNTERS), M, base + M, u_out, u_copy, sigmas + w, eps, final,
                 TWO_STAGE, BLOCK_V, SPLIT_BLOCK)


@triton.jit(do_not_specialize=["final"])
def group_col_kernel(ptrs, meta, items, ws, counters, used, sigmas, eps: tl.float64, final,
                     X_STORED: tl.constexpr, PREV_STORED: tl.constexpr, IN_PLACE: tl.constexpr, SPLIT: tl.constexpr,
                     TWO_STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """v = normalize(W^T x) for every weight; program p does item (weight, columns tile, rows split)."""
    DT = used.dtype.element_ty
    w, t, s, row, M, N, B = _tile_item(items, meta)
    base = ws + tl.load(row + F_WS)
    v_buf = _ptr(ptrs, w, 2, 3, DT)
    v_copy = used + tl.load(row + F_USED) + M
    if IN_PLACE:
        v_out = v_buf
    else:
        v_out = v_copy
    if X_STORED:
        x = _ptr(ptrs, w, 1, 3, DT)
    else:
        x = base + M  # u_acc
    if PREV_STORED:
        prev = v_buf
    else:
        prev = base + 2 * M + N  # v_acc
    K = _size(row, F_COL_K)
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = s * K
    y = _col_tile(_ptr(ptrs, w, 0, 3, DT), x, cols, lo, tl.minimum(M, lo + K), M, N, B, M * B,
                  ws.dtype.element_ty, SPLIT, BLOCK_M, BLOCK_N)
    _finish_tile(y, cols, cols < N, t, _size(row, F_COL_TILES), s, _size(row, F_COL_SPLITS),
                 ws + tl.load(row + F_SPLITBUF), base + 2 * M, prev, ws + tl.load(row + F_PARTIALS),
                 counters + tl.load(row + F_COUNTERS), N, base + 2 * M + N, v_out, v_copy, sigmas + w, eps, final,
                 TWO_STAGE, BLOCK_V, SPLIT_BLOCK)


@triton.jit
def group_eval_kernel(ptrs, meta, items, ws, counters, used, sigmas,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """sigma = u . (W v) for every weight (eval), on the row pass's items; copies u and v into ``used``."""
    DT = used.dtype.element_ty
    w, t, s, row, M, N, B = _tile_item(items, meta)
    K = _size(row, F_ROW_K)
    n_split = _size(row, F_ROW_SPLITS)
    lo = s * K
    u_copy = used + tl.load(row + F_USED)
    part = _eval_tile(_ptr(ptrs, w, 0, 3, DT), _ptr(ptrs, w, 1, 3, DT), _ptr(ptrs, w, 2, 3, DT), u_copy, u_copy + M,
                      t * BLOCK_M + tl.arange(0, BLOCK_M), lo, tl.minimum(N, lo + K), t, s, M, N, B, M * B,
                      ws.dtype.element_ty, SPLIT, BLOCK_M, BLOCK_N)
    n_parts = _size(row, F_ROW_TILES) * n_split
    partials = ws + tl.load(row + F_PARTIALS)
    counter = counters + tl.load(row + F_COUNTERS)
    if _last_ticket(partials, t * n_split + s, part, counter, n_parts):
        tl.store(sigmas + w, _sum_partials(partials, n_parts, BLOCK_V))
        tl.atomic_xchg(counter, 0)


@triton.jit
def group_divide_kernel(ptrs, meta, items, sigmas, out, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """W / sigma for every weight into the flat ``out``; program p does elements chunk (weight, c)."""
    w, c, row = _chunk_item(items, meta)
    W = _ptr(ptrs, w, 0, 3, out.dtype.element_ty)
    dst = out + tl.load(row + F_OUT)
    hi = tl.minimum(_size(row, F_NUMEL), (c + 1) * CHUNK)
    s = tl.load(sigmas + w)
    for k0 in range(c * CHUNK, hi, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        _divide_block(W, s, dst, offs, offs < hi)


# The backward reads its tensors in one of two ways: eager (``sn_kernels.group``), an address table of
# (G, W, u, v, sigma) per weight; ``FLAT`` (the ``triton_group_backward`` op under torch.compile), G, u, v
# and sigma in the flat buffers of the forward's layout and a table of the weights' addresses only.
@triton.jit
def group_dot_kernel(ptrs, meta, items, ws, counters, cs, out, g_flat, sigmas, FLAT: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """c_w = <G_w, W_w> / sigma_w for every weight; program p sums chunk (weight, c), the weight's
    last program sums its partials in a fixed order.  ``out`` only gives the weight dtype."""
    DT = out.dtype.element_ty
    ACC = ws.dtype.element_ty
    w, c, row = _chunk_item(items, meta)
    if FLAT:
        G = g_flat + tl.load(row + F_OUT)
        W = _ptr(ptrs, w, 0, 1, DT)
    else:
        G = _ptr(ptrs, w, 0, 5, DT)
        W = _ptr(ptrs, w, 1, 5, DT)
    lo = c * CHUNK
    part = _dot_range(G, W, lo, tl.minimum(_size(row, F_NUMEL), lo + CHUNK), ACC, BLOCK)
    n_parts = _size(row, F_CHUNKS)
    partials = ws + tl.load(row + F_PARTIALS)
    counter = counters + tl.load(row + F_COUNTERS)
    if _last_ticket(partials, c, part, counter, n_parts):
        if FLAT:
            sigma = tl.load(sigmas + w)
        else:
            sigma = tl.load(_ptr(ptrs, w, 4, 5, ACC))
        tl.store(cs + w, _safe_div(_sum_partials(partials, n_parts, BLOCK_V), sigma))
        tl.atomic_xchg(counter, 0)


@triton.jit
def group_grad_kernel(ptrs, meta, items, cs, out, g_flat, used, sigmas, FLAT: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    """grad_W = (G - c u v^T) / sigma for every weight into the flat ``out``; program p does chunk (weight, c)."""
    DT = out.dtype.element_ty
    ACC = cs.dtype.element_ty
    w, c, row = _chunk_item(items, meta)
    M = _size(row, F_M)
    B = _size(row, F_B)
    if FLAT:
        G = g_flat + tl.load(row + F_OUT)
        u = used + tl.load(row + F_USED)
        v = u + M
        sigma = tl.load(sigmas + w)
    else:
        G = _ptr(ptrs, w, 0, 5, DT)
        u = _ptr(ptrs, w, 2, 5, DT)
        v = _ptr(ptrs, w, 3, 5, DT)
        sigma = tl.load(_ptr(ptrs, w, 4, 5, ACC))
    cw = tl.load(cs + w)
    dst = out + tl.load(row + F_OUT)
    hi = tl.minimum(_size(row, F_NUMEL), (c + 1) * CHUNK)
    for k0 in range(c * CHUNK, hi, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        _grad_block(G, u, v, cw, sigma, dst, offs, offs < hi, M, B)
