"""The @triton.jit kernels of the "triton" backend.

Every reduction across programs is deterministic and free of float atomics:
each program writes one partial to a buffer, takes an int32 ticket with
``atomic_add``, and the program that draws the last ticket sums the partials in
a fixed order (a tl.sum over a fixed-size block), finishes the pass and resets
the counter to 0.  Which program finishes varies from run to run; the order
of the sums does not, so results are bit-identical.

The mat-vec passes run on a (tiles, splits) grid: program (t, s) reduces split s
of the reduced dimension for output tile t.  With more than one split
(``TWO_STAGE``) each program stores its partial vector, the last split of a tile
to take a ticket of that tile (``counter[1 + t]``) sums the splits in a fixed
order, and then publishes the tile as a one-stage program does (``counter[0]``).
The split count depends on the shape only (host.py), so the sums do too.

The accumulation dtype ``ACC`` (float32, or float64 for float64 weights) is
read from the element type of a workspace pointer, so one kernel body serves
every dtype.  Only core ``tl`` APIs are used (triton 3.6 to 3.9).

Matrix view of a contiguous weight with ``dim`` moved first: with
A = prod(shape[:dim]), M = shape[dim], B = prod(shape[dim+1:]), element (i, j)
of the (M, A*B) matrix lives at ``(j // B) * M * B + i * B + j % B``; for
dim == 0 (A == 1) that is ``i * N + j`` (``SPLIT=False``, no integer division).
"""
import triton
import triton.language as tl


@triton.jit
def _offsets(rows, cols, N, B, MB, SPLIT: tl.constexpr):
    """Memory offsets of the (rows, cols) tile of the matrix view."""
    if SPLIT:
        off = (cols // B)[None, :] * MB + rows[:, None] * B + (cols % B)[None, :]
    else:
        off = rows[:, None] * N + cols[None, :]
    return off


@triton.jit
def _sum_partials(partials, n_parts, BLOCK: tl.constexpr):
    """Fixed-order sum of ``partials[:n_parts]`` (volatile: written by other programs)."""
    offs = tl.arange(0, BLOCK)
    tot = tl.zeros([BLOCK], dtype=partials.dtype.element_ty)
    for p0 in range(0, n_parts, BLOCK):
        tot += tl.load(partials + p0 + offs, mask=p0 + offs < n_parts, other=0.0, volatile=True)
    return tl.sum(tot, axis=0)


# fp32 square roots and divisions rounded to nearest (IEEE), as PyTorch's CUDA kernels compute them:
# tl.sqrt compiles to sqrt.approx.ftz.f32, which flushes a subnormal |y|^2 to 0 (sigma 0 for
# eps < |y| < 1.08e-19), and `/` to div.full.f32 (1 ulp off for many W/sigma elements).  sqrt_rn and
# div_rn take fp32 only; fp64 is IEEE either way.  The passes are memory-bound, so the exact forms should
# cost little (not yet timed on a GPU).
@triton.jit
def _sqrt(x):
    """sqrt(x), rounded to nearest in x's dtype."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _div(x, y):
    """x / y, rounded to nearest in x's dtype (x and y of the same dtype)."""
    if x.dtype == tl.float32:
        r = tl.div_rn(x, y)
    else:
        r = x / y
    return r


@triton.jit
def _safe_div(x, s):
    """x / s, or x / inf (0, keeping NaN/inf of x) where s == 0: a zero weight normalizes
    to 0 rather than 0/0 (pytorch.safe_sigma), without an inf literal."""
    return tl.where(s == 0, x * 0.0, _div(x, s))


@triton.jit
def _finish_normalize(y_raw, y_prev, partials, n_parts, L, y_acc, y_out, y_copy, sigma, eps, final,
                      BLOCK: tl.constexpr):
    """Last program of a mat-vec pass: y = y_raw / max(|y_raw|, eps) and sigma = |y|^2 / max(|y|, eps).

    A zero or non-finite norm keeps the previous vector ``y_prev`` (pytorch.normalize_step),
    so u, v survive a bad step.  Writes the accumulation-dtype vector for the next pass
    and, on the final pass, the weight-dtype vector in place plus its copy (no extra launch)."""
    norm = _sqrt(_sum_partials(partials, n_parts, BLOCK))
    # eps in the accumulation dtype: compiled, the kernels take it as fp64 (their annotation; a plain
    # float argument is fp32, which made float64 results fp32-accurate where eps decides), the
    # interpreter passes the Python float; tl.full converts either (fp32: the launcher's old rounding)
    denom = tl.maximum(norm, tl.full([], eps, norm.dtype))
    accept = (norm > 0) & (norm * 0.0 == 0.0)  # x * 0 == 0 exactly when x is finite
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, L, BLOCK):
        idx = i0 + offs
        mask = idx < L
        y = _div(tl.load(y_raw + idx, mask=mask, other=0.0, volatile=True), denom)
        prev = tl.load(y_prev + idx, mask=mask, other=0.0).to(y.dtype)
        y = tl.where(accept, y, prev)
        tl.store(y_acc + idx, y, mask=mask)
        if final:
            tl.store(y_out + idx, y.to(y_out.dtype.element_ty), mask=mask)
            tl.store(y_copy + idx, y.to(y_copy.dtype.element_ty), mask=mask)
    tl.store(sigma, _safe_div(norm * norm, denom))  # 0, not 0/0, for a zero y with an eps that rounds to 0


@triton.jit
def _publish(y, idx, mask, slot, n_parts, y_raw, y_prev, partials, counter, L, y_acc, y_out, y_copy, sigma, eps,
             final, BLOCK_V: tl.constexpr):
    """Store this tile's slice of y and its partial |y|^2 in ``partials[slot]``; the last of the
    ``n_parts`` tiles to take a ticket combines the partials in a fixed order and normalizes y."""
    tl.store(y_raw + idx, y, mask=mask)
    tl.store(partials + slot, tl.sum(y * y, axis=0))
    # every thread's stores must precede the ticket (release), and the last program
    # reads the others' stores after it (acquire, volatile loads)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1)
    if ticket == n_parts - 1:
        _finish_normalize(y_raw, y_prev, partials, n_parts, L, y_acc, y_out, y_copy, sigma, eps, final, BLOCK_V)
        tl.atomic_xchg(counter, 0)


@triton.jit
def _sum_splits(y_part, idx, mask, L, n_split, SPLIT_BLOCK: tl.constexpr):
    """Fixed-order sum over s of ``y_part[s * L + idx]`` (volatile: written by other programs).

    SPLIT_BLOCK splits are loaded as one [SPLIT_BLOCK, len(idx)] tile, so their loads are
    in flight together, and summed by a fixed tree."""
    srange = tl.arange(0, SPLIT_BLOCK)
    tot = tl.zeros(idx.shape, dtype=y_part.dtype.element_ty)
    for s0 in range(0, n_split, SPLIT_BLOCK):
        s = s0 + srange
        part = tl.load(y_part + s[:, None] * L + idx[None, :], mask=(s < n_split)[:, None] & mask[None, :],
                       other=0.0, volatile=True)
        tot += tl.sum(part, axis=0)
    return tot


@triton.jit
def _finish_tile(y, idx, mask, tile, n_tiles, split, n_split, y_part, y_raw, y_prev, partials, counter, L, y_acc,
                 y_out, y_copy, sigma, eps, final,
                 TWO_STAGE: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """End of a mat-vec program holding the partial ``y`` of split ``split`` of tile ``tile``: publish
    it directly (one split) or, with several splits, let the tile's last split sum them first.
    ``counter[0]`` counts published tiles, ``counter[1 + tile]`` the tile's finished splits."""
    if TWO_STAGE:  # a grouped launch mixes weights with one split and with several
        if n_split > 1:
            tl.store(y_part + split * L + idx, y, mask=mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(counter + 1 + tile, 1)
            if ticket == n_split - 1:
                tl.atomic_xchg(counter + 1 + tile, 0)
                _publish(_sum_splits(y_part, idx, mask, L, n_split, SPLIT_BLOCK), idx, mask, tile, n_tiles, y_raw,
                         y_prev, partials, counter, L, y_acc, y_out, y_copy, sigma, eps, final, BLOCK_V)
        else:
            _publish(y, idx, mask, tile, n_tiles, y_raw, y_prev, partials, counter, L, y_acc, y_out, y_copy, sigma,
                     eps, final, BLOCK_V)
    else:
        _publish(y, idx, mask, tile, n_tiles, y_raw, y_prev, partials, counter, L, y_acc, y_out, y_copy, sigma,
                 eps, final, BLOCK_V)


@triton.jit
def _row_tile(W, x, rows, lo, hi, M, N, B, MB, ACC: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over columns [lo, hi) of W[rows, j] x[j], in ACC (x cast to ACC on load)."""
    rmask = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(x + cols, mask=cmask, other=0.0).to(ACC)
        acc += w.to(ACC) * xv[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _col_tile(W, x, cols, lo, hi, M, N, B, MB, ACC: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over rows [lo, hi) of W[i, cols] x[i], in ACC."""
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for i0 in range(lo, hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(x + rows, mask=rmask, other=0.0).to(ACC)
        acc += w.to(ACC) * xv[:, None]
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["final"])  # a runtime flag: one compiled kernel, not two
def row_pass_kernel(W, x, y_raw, y_prev, partials, counter, y_acc, y_out, y_copy, sigma, y_part,
                    M, N, B, MB, eps: tl.float64, K_SPLIT, final,
                    SPLIT: tl.constexpr, TWO_STAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """y = normalize(W x): program (t, s) reduces columns [s*K_SPLIT, (s+1)*K_SPLIT) of rows tile t.

    ``x`` may be the weight-dtype vector (first pass) or the accumulation-dtype
    one of the previous pass: it is cast to ACC on load either way."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = tl.program_id(1) * K_SPLIT
    y = _row_tile(W, x, rows, lo, tl.minimum(N, lo + K_SPLIT), M, N, B, MB, y_raw.dtype.element_ty, SPLIT,
                  BLOCK_M, BLOCK_N)
    _finish_tile(y, rows, rows < M, tl.program_id(0), tl.num_programs(0), tl.program_id(1), tl.num_programs(1),
                 y_part, y_raw, y_prev, partials, counter, M, y_acc, y_out, y_copy, sigma, eps, final,
                 TWO_STAGE, BLOCK_V, SPLIT_BLOCK)


@triton.jit(do_not_specialize=["final"])  # a runtime flag: one compiled kernel, not two
def col_pass_kernel(W, x, y_raw, y_prev, partials, counter, y_acc, y_out, y_copy, sigma, y_part,
                    M, N, B, MB, eps: tl.float64, K_SPLIT, final,
                    SPLIT: tl.constexpr, TWO_STAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """y = normalize(W^T x): program (t, s) reduces rows [s*K_SPLIT, (s+1)*K_SPLIT) of columns tile t."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.program_id(1) * K_SPLIT
    y = _col_tile(W, x, cols, lo, tl.minimum(M, lo + K_SPLIT), M, N, B, MB, y_raw.dtype.element_ty, SPLIT,
                  BLOCK_M, BLOCK_N)
    _finish_tile(y, cols, cols < N, tl.program_id(0), tl.num_programs(0), tl.program_id(1), tl.num_programs(1),
                 y_part, y_raw, y_prev, partials, counter, N, y_acc, y_out, y_copy, sigma, eps, final,
                 TWO_STAGE, BLOCK_V, SPLIT_BLOCK)


@triton.jit
def _last_ticket(partials, slot, value, counter, n_parts):
    """Store this program's scalar partial in ``partials[slot]`` and take a ticket: whether it is
    the last of the ``n_parts`` programs (which then sums the partials and resets ``counter``)."""
    tl.store(partials + slot, value)
    tl.debug_barrier()
    return tl.atomic_add(counter, 1) == n_parts - 1


@triton.jit
def _eval_tile(W, u, v, u_copy, v_copy, rows, lo, hi, tile, split, M, N, B, MB, ACC: tl.constexpr,
               SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over rows tile ``rows`` and columns [lo, hi) of u_i W_ij v_j; tile 0 copies v, split 0 copies u."""
    rmask = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(v + cols, mask=cmask, other=0.0)
        # the programs of rows tile 0 copy v on the way; the scalar test is broadcast to the block by
        # hand (the triton 3.9 interpreter refuses a block mask `&` a scalar bool)
        tl.store(v_copy + cols, xv, mask=cmask & ((cols * 0 + tile) == 0))
        acc += w.to(ACC) * xv.to(ACC)[None, :]
    s = tl.sum(acc, axis=1)
    ur = tl.load(u + rows, mask=rmask, other=0.0)
    tl.store(u_copy + rows, ur, mask=rmask & ((rows * 0 + split) == 0))  # split 0 copies u
    return tl.sum(ur.to(ACC) * s, axis=0)


@triton.jit
def eval_pass_kernel(W, u, v, partials, counter, u_copy, v_copy, sigma,
                     M, N, B, MB, K_SPLIT,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """sigma = u . (W v) in one pass; also writes the copies of u and v.

    Program (t, s) adds u_i (W v)_i over rows tile t and columns split s: every program's
    partial is a scalar, so one fixed-order sum over all programs finishes it."""
    pid = tl.program_id(0)
    ps = tl.program_id(1)
    lo = ps * K_SPLIT
    part = _eval_tile(W, u, v, u_copy, v_copy, pid * BLOCK_M + tl.arange(0, BLOCK_M), lo, tl.minimum(N, lo + K_SPLIT),
                      pid, ps, M, N, B, MB, partials.dtype.element_ty, SPLIT, BLOCK_M, BLOCK_N)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    if _last_ticket(partials, pid * tl.num_programs(1) + ps, part, counter, nprog):
        tl.store(sigma, _sum_partials(partials, nprog, BLOCK_V))
        tl.atomic_xchg(counter, 0)


@triton.jit
def _divide_block(W, s, out, offs, mask):
    """out = W / s (0 where s == 0) at ``offs``, divided in the dtype of ``s``."""
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(out + offs, _safe_div(w.to(s.dtype), s).to(out.dtype.element_ty), mask=mask)


@triton.jit
def divide_kernel(W, sigma, out, numel, BLOCK: tl.constexpr):
    """out = W / sigma (0 where sigma == 0) elementwise, divided in the accumulation dtype; sigma read on device."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _divide_block(W, tl.load(sigma), out, offs, offs < numel)


@triton.jit
def _dot_range(G, W, lo, hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """sum of G * W over elements [lo, hi), BLOCK at a time (a fixed order for a fixed range)."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k0 in range(lo, hi, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < hi
        acc += tl.load(G + offs, mask=mask, other=0.0).to(ACC) * tl.load(W + offs, mask=mask, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def dot_pass_kernel(G, W, partials, counter, sigma, c_out, numel, CHUNK, BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """c = <G, W> / sigma: program p sums elements [p*CHUNK, (p+1)*CHUNK) (CHUNK a multiple of
    BLOCK, shape-only), the last program sums the partials in fixed order."""
    pid = tl.program_id(0)
    lo = pid * CHUNK
    part = _dot_range(G, W, lo, tl.minimum(numel, lo + CHUNK), partials.dtype.element_ty, BLOCK)
    if _last_ticket(partials, pid, part, counter, tl.num_programs(0)):
        tl.store(c_out, _safe_div(_sum_partials(partials, tl.num_programs(0), BLOCK_V), tl.load(sigma)))
        tl.atomic_xchg(counter, 0)


@triton.jit
def _grad_block(G, u, v, c, s, out, offs, mask, M, B):
    """grad = (G - c u_i v_j) / s at ``offs``; (i, j) from the flat index, in the dtype of ``s``."""
    ACC = s.dtype
    i = (offs // B) % M
    j = (offs // (M * B)) * B + offs % B
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    ui = tl.load(u + i, mask=mask, other=0.0).to(ACC)
    vj = tl.load(v + j, mask=mask, other=0.0).to(ACC)
    tl.store(out + offs, _safe_div(g - c * (ui * vj), s).to(out.dtype.element_ty), mask=mask)


@triton.jit
def grad_pass_kernel(G, u, v, c_ptr, sigma, out, numel, M, B, BLOCK: tl.constexpr):
    """grad = (G - c u_i v_j) / sigma over the weight's memory; (i, j) from the flat index."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _grad_block(G, u, v, tl.load(c_ptr), tl.load(sigma), out, offs, offs < numel, M, B)
