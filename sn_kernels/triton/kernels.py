"""The @triton.jit kernels of the "triton" backend.

Every reduction across programs is deterministic and free of float atomics:
each program writes one partial to a buffer, takes an int32 ticket with
``atomic_add``, and the program that draws the last ticket sums the partials in
a fixed order (a tl.sum over a fixed-size block), finishes the pass and resets
the counter to 0.  Which program finishes varies from run to run; the order
of the sums does not, so results are bit-identical.

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


@triton.jit
def _safe_div(x, s):
    """x / s, or x / inf (0, keeping NaN/inf of x) where s == 0: a zero weight normalizes
    to 0 rather than 0/0 (reference.safe_sigma), without an inf literal."""
    return tl.where(s == 0, x * 0.0, x / s)


@triton.jit
def _finish_normalize(y_raw, y_prev, partials, n_parts, L, y_acc, y_out, y_copy, sigma, eps,
                      FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Last program of a mat-vec pass: y = y_raw / max(|y_raw|, eps) and sigma = |y|^2 / max(|y|, eps).

    A zero or non-finite norm keeps the previous vector ``y_prev`` (reference._normalize),
    so u, v survive a bad step.  Writes the accumulation-dtype vector for the next pass
    and, on the final pass, the weight-dtype vector in place plus its copy (no extra launch)."""
    norm = tl.sqrt(_sum_partials(partials, n_parts, BLOCK))
    denom = tl.maximum(norm, eps)
    accept = (norm > 0) & (norm * 0.0 == 0.0)  # x * 0 == 0 exactly when x is finite
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, L, BLOCK):
        idx = i0 + offs
        mask = idx < L
        y = tl.load(y_raw + idx, mask=mask, other=0.0, volatile=True) / denom
        prev = tl.load(y_prev + idx, mask=mask, other=0.0).to(y.dtype)
        y = tl.where(accept, y, prev)
        tl.store(y_acc + idx, y, mask=mask)
        if FINAL:
            tl.store(y_out + idx, y.to(y_out.dtype.element_ty), mask=mask)
            tl.store(y_copy + idx, y.to(y_copy.dtype.element_ty), mask=mask)
    tl.store(sigma, norm * norm / denom)


@triton.jit
def _publish(y, idx, mask, y_raw, y_prev, partials, counter, L, y_acc, y_out, y_copy, sigma, eps,
             FINAL: tl.constexpr, BLOCK_V: tl.constexpr):
    """Store this program's slice of y and its partial |y|^2; the last program to take a
    ticket combines the partials in a fixed order and normalizes y (deterministic)."""
    tl.store(y_raw + idx, y, mask=mask)
    tl.store(partials + tl.program_id(0), tl.sum(y * y, axis=0))
    # every thread's stores must precede the ticket (release), and the last program
    # reads the others' stores after it (acquire, volatile loads)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1)
    if ticket == tl.num_programs(0) - 1:
        _finish_normalize(y_raw, y_prev, partials, tl.num_programs(0), L, y_acc, y_out, y_copy, sigma, eps,
                          FINAL, BLOCK_V)
        tl.atomic_xchg(counter, 0)


@triton.jit
def row_pass_kernel(W, x, y_raw, y_prev, partials, counter, y_acc, y_out, y_copy, sigma,
                    M, N, B, MB, eps,
                    SPLIT: tl.constexpr, FINAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """y = normalize(W x): one program per BLOCK_M rows, looping over all columns.

    ``x`` may be the weight-dtype vector (first pass) or the accumulation-dtype
    one of the previous pass: it is cast to ACC on load either way."""
    ACC = y_raw.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(x + cols, mask=cmask, other=0.0).to(ACC)
        acc += w.to(ACC) * xv[None, :]
    _publish(tl.sum(acc, axis=1), rows, rmask, y_raw, y_prev, partials, counter, M, y_acc, y_out, y_copy, sigma,
             eps, FINAL, BLOCK_V)


@triton.jit
def col_pass_kernel(W, x, y_raw, y_prev, partials, counter, y_acc, y_out, y_copy, sigma,
                    M, N, B, MB, eps,
                    SPLIT: tl.constexpr, FINAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """y = normalize(W^T x): one program per BLOCK_N columns, looping over all rows."""
    ACC = y_raw.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for i0 in range(0, M, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(x + rows, mask=rmask, other=0.0).to(ACC)
        acc += w.to(ACC) * xv[:, None]
    _publish(tl.sum(acc, axis=0), cols, cmask, y_raw, y_prev, partials, counter, N, y_acc, y_out, y_copy, sigma,
             eps, FINAL, BLOCK_V)


@triton.jit
def eval_pass_kernel(W, u, v, partials, counter, u_copy, v_copy, sigma,
                     M, N, B, MB,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """sigma = u . (W v) in one pass; also writes the copies of u and v."""
    ACC = partials.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + _offsets(rows, cols, N, B, MB, SPLIT), mask=rmask[:, None] & cmask[None, :], other=0.0)
        xv = tl.load(v + cols, mask=cmask, other=0.0)
        # program 0 copies v on the way; the scalar test is broadcast to the block by hand
        # (the triton 3.9 interpreter refuses a block mask `&` a scalar bool)
        tl.store(v_copy + cols, xv, mask=cmask & ((cols * 0 + pid) == 0))
        acc += w.to(ACC) * xv.to(ACC)[None, :]
    s = tl.sum(acc, axis=1)
    ur = tl.load(u + rows, mask=rmask, other=0.0)
    tl.store(u_copy + rows, ur, mask=rmask)
    tl.store(partials + pid, tl.sum(ur.to(ACC) * s, axis=0))
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1)
    if ticket == tl.num_programs(0) - 1:
        tl.store(sigma, _sum_partials(partials, tl.num_programs(0), BLOCK_V))
        tl.atomic_xchg(counter, 0)


@triton.jit
def divide_kernel(W, sigma, out, numel, BLOCK: tl.constexpr):
    """out = W / sigma (0 where sigma == 0) elementwise, divided in the accumulation dtype; sigma read on device."""
    s = tl.load(sigma)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(out + offs, _safe_div(w.to(sigma.dtype.element_ty), s).to(out.dtype.element_ty), mask=mask)


@triton.jit
def dot_pass_kernel(G, W, partials, counter, sigma, c_out, numel, BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """c = <G, W> / sigma: per-program partials, the last program sums them in fixed order."""
    ACC = partials.dtype.element_ty
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    w = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
    tl.store(partials + pid, tl.sum(g * w, axis=0))
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1)
    if ticket == tl.num_programs(0) - 1:
        tl.store(c_out, _safe_div(_sum_partials(partials, tl.num_programs(0), BLOCK_V), tl.load(sigma)))
        tl.atomic_xchg(counter, 0)


@triton.jit
def grad_pass_kernel(G, u, v, c_ptr, sigma, out, numel, M, B, BLOCK: tl.constexpr):
    """grad = (G - c u_i v_j) / sigma over the weight's memory; (i, j) from the flat index."""
    ACC = c_ptr.dtype.element_ty
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    i = (offs // B) % M
    j = (offs // (M * B)) * B + offs % B
    c = tl.load(c_ptr)
    s = tl.load(sigma)
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    ui = tl.load(u + i, mask=mask, other=0.0).to(ACC)
    vj = tl.load(v + j, mask=mask, other=0.0).to(ACC)
    tl.store(out + offs, _safe_div(g - c * (ui * vj), s).to(out.dtype.element_ty), mask=mask)
