"""Host side of the "triton" backend's grouped path (``sn_kernels.group``): every weight of one
(device, dtype) group in a fixed number of launches, whatever the number of weights.

    training, k iterations   2k mat-vec passes + 1 division (3 for k = 1)
    eval                    1 pass (sigma = u . W v) + 1 division
    backward                2 passes (<G, W>, then the gradient)

Each launch covers a table of equal-sized work items over all the weights (group_kernels.py):
a mat-vec item is one tile of BLOCK rows (columns) and a split of about ITEM_ELEMS / BLOCK
columns (rows), an elementwise item CHUNK elements, so weights whose sizes differ by 10^4x
balance across the programs.  The tables depend on the shapes only: they are built once
per plan (``group_plan``, cached) and kept on the device with the plan, so they go when the
plan's cache drops it, and so are the results' reduction orders (deterministic).  The
weights' addresses go to the kernels in a small int64 table, cached by the addresses: in a
training loop the parameters, buffers and, mostly, the gradients keep their addresses, so a
step copies nothing to the device; a new set is one non-blocking copy from pinned memory.
Both kinds of table are kept per (device, stream), like the ticket counters (host.py): a
table is only read on the stream whose copy wrote it, and freed memory is reused in order.

The reduction order differs from the per-weight kernels' (their tiles depend on each
shape), so the results match the per-module triton path to fp32 rounding, not bit for bit.
Outputs (W/sigma, u_used, v_used, sigma, grad_W) are views into one buffer per kind.

CUDA graphs: a capture uses the tables built before it (run one step eagerly first), on the
capture stream or, as torch.cuda.graph synchronizes the device before it captures, on any other
stream of the device (PyTorch's warm-up on a side stream); on an address table it has not seen
(the backward's gradients live in the graph's pool) it runs the per-weight kernels instead, which
capture as usual.  Tables used by a capture are never freed
(``_pinned_forever``: the graph may replay after their plan or address set was dropped).

``group_forward``/``group_backward`` are the backend contract's (in place, lists);
``group_forward_flat``/``group_backward_flat`` serve the ops a compiled grouped model takes
(group_ops.py: functional, flat outputs, the backward reading G, u, v, sigma from flat buffers).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import triton

from ..contract import accumulation_dtype
from . import group_kernels as GK
from . import host

ROW_TILE = (16, 256, 4)   # (BLOCK_M, BLOCK_N, warps) of the W x pass
COL_TILE = (64, 64, 4)    # ... of the W^T x pass
ITEM_ELEMS = 16384        # elements of W per mat-vec item (tile x split)
CHUNK = 16384             # elements per elementwise item (a multiple of host.ELEM_BLOCK)
TABLES_KEPT = 64          # address tables cached per process (beyond those used by graph captures)

META_FIELDS = ("M", "N", "B", "ROW_TILES", "ROW_SPLITS", "ROW_K", "COL_TILES", "COL_SPLITS", "COL_K", "WS",
               "PARTIALS", "SPLITBUF", "COUNTERS", "USED", "OUT", "NUMEL", "CHUNKS")
assert len(META_FIELDS) == GK.NF and all(getattr(GK, "F_" + f) == i for i, f in enumerate(META_FIELDS))


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (one per geometry list)
class GroupPlan:
    """The work tables of one list of (M, N, B) geometries (CPU int64 tensors) and buffer sizes."""

    meta: torch.Tensor
    row_items: torch.Tensor
    col_items: torch.Tensor
    elem_items: torch.Tensor
    ws: int                      # workspace floats (accumulation dtype)
    counters: int                # int32 tickets
    used: int                    # sum of M + N: u_used, v_used
    out: int                     # sum of numel: W/sigma or grad_W
    offsets: tuple               # per weight: (used offset, out offset)
    split: bool                  # some weight's matrix view needs the general addressing (dim > 0)
    row_two_stage: bool          # some weight's row pass has several splits
    col_two_stage: bool
    # {(device, stream): (meta, row items, col items, elem items) there}: freed with the plan
    device_tables: dict = field(default_factory=dict, repr=False)


def _splits(k: int, block: int, width: int) -> tuple[int, int]:
    """(splits, split length) of a reduced dimension ``k`` for tiles ``width`` wide: about
    ITEM_ELEMS elements per item, the length a multiple of ``block``."""
    length = max(block, (ITEM_ELEMS // width) // block * block)
    if k <= length:
        return 1, max(k, 1)
    return triton.cdiv(k, length), length


@functools.lru_cache(maxsize=256)
def group_plan(geoms: tuple) -> GroupPlan:
    """The plan for weights with matrix views ``geoms`` = ((M, N, B), ...), in that order."""
    meta, row_items, col_items, elem_items, offsets = [], [], [], [], []
    ws = counters = used = out = 0
    split = row_two = col_two = False
    bm_r, bn_r = ROW_TILE[:2]
    bm_c, bn_c = COL_TILE[:2]
    for w, (m, n, b) in enumerate(geoms):
        numel = m * n
        row_tiles = triton.cdiv(m, bm_r)
        row_splits, row_k = _splits(n, bn_r, bm_r)
        col_tiles = triton.cdiv(n, bn_c)
        col_splits, col_k = _splits(m, bm_c, bn_c)
        chunks = triton.cdiv(numel, CHUNK)
        partials = max(row_tiles, col_tiles, row_tiles * row_splits, chunks)
        splitbuf = max(row_splits * m if row_splits > 1 else 0, col_splits * n if col_splits > 1 else 0)
        meta.append((m, n, b, row_tiles, row_splits, row_k, col_tiles, col_splits, col_k, ws,
                     ws + 2 * (m + n), ws + 2 * (m + n) + partials, counters, used, out, numel, chunks))
        offsets.append((used, out))
        row_items += [(w, t, s) for t in range(row_tiles) for s in range(row_splits)]
        col_items += [(w, t, s) for t in range(col_tiles) for s in range(col_splits)]
        elem_items += [(w, c) for c in range(chunks)]
        ws += 2 * (m + n) + partials + splitbuf
        counters += 1 + max(row_tiles, col_tiles)
        used += m + n
        out += numel
        split |= b != n
        row_two |= row_splits > 1
        col_two |= col_splits > 1
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int64).reshape(-1)  # noqa: E731
    return GroupPlan(as_tensor(meta), as_tensor(row_items), as_tensor(col_items), as_tensor(elem_items),
                     ws, counters, used, out, tuple(offsets), split, row_two, col_two)


_address_tables: OrderedDict = OrderedDict()
# tables a CUDA graph capture used, by id (each kept once, however many captured calls read it): its
# replays read them
_pinned_forever: dict = {}


def _pin(table) -> None:
    """Keep ``table`` for good: a captured graph reads it at every replay."""
    _pinned_forever[id(table)] = table


def _to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cpu`` on ``device`` without blocking the host (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _key_on_another_stream(tables: dict, match):
    """During a capture: the first key of ``tables`` that ``match`` accepts (the table sought, built on
    another stream of the device), or None.

    torch.cuda.graph captures on a stream of its own and the warm-up runs on another (PyTorch's recipe,
    make_graphed_callables), so the tables it built are keyed by another stream.  A capture may read them
    all the same: torch.cuda.graph synchronizes the device before it begins, so the copies that wrote
    them have finished, and the capture pins them (``_pinned_forever``), so their memory is never reused
    under a replay, the hazard the per-stream keys guard against in eager mode."""
    return next((key for key in tables if match(key)), None)


def _tables(plan: GroupPlan, device: torch.device):
    """(meta, row items, col items, elem items) of ``plan`` on ``device`` (copied once, kept on the
    plan), or None when they are not there yet and a graph is being captured."""
    # per stream: a table is only ever read on the stream that copied it, so when the plan is dropped
    # its memory is reused in order after the launches that read it (as an evicted address table)
    key = host._stream_key(device)
    tabs = plan.device_tables.get(key)
    capturing = _capturing(device)
    if tabs is None and capturing:
        tabs = plan.device_tables.get(_key_on_another_stream(plan.device_tables, lambda k: k[:2] == key[:2]))
    if tabs is None:
        if capturing:
            return None
        tabs = tuple(_to_device(t, device) for t in (plan.meta, plan.row_items, plan.col_items, plan.elem_items))
        plan.device_tables[key] = tabs
    elif capturing:
        _pin(tabs)  # the graph's replays read them, after the plan may be gone
    return tabs


def _addresses(tensors: list, device: torch.device):
    """The int64 device table of the tensors' addresses (cached by them), or None when it is new
    and a graph is being captured (a host-to-device copy there would be replayed from freed memory)."""
    addrs = tuple(t.data_ptr() for t in tensors)
    key = (host._stream_key(device), addrs)  # per stream, as the plan tables (an evicted one is reused safely)
    table = _address_tables.get(key)
    capturing = _capturing(device)
    if table is None and capturing:
        dev = key[0][:2]
        key = _key_on_another_stream(_address_tables, lambda k: k[1] == addrs and k[0][:2] == dev) or key
        table = _address_tables.get(key)
    if table is not None:
        _address_tables.move_to_end(key)
        if capturing:
            _pin(table)
        return table
    if capturing:
        return None
    table = _to_device(torch.tensor(addrs, dtype=torch.int64), device)
    _address_tables[key] = table
    if len(_address_tables) > TABLES_KEPT:
        _address_tables.popitem(last=False)  # the caching allocator keeps it alive until its copy ran
    return table


def _geometries(weights, dims) -> tuple:
    """((M, N, B), ...) of the contiguous weights' matrix views."""
    return tuple(host.matrix_view(w, dim) for w, dim in zip(weights, dims))


def _fits(weights, vectors) -> bool:
    """Whether the multi-tensor kernels take these tensors: non-empty weights within int32 range
    of elements per weight, and 1-D contiguous vectors of the weights' dtype within half of it (the
    mat-vec kernels form the workspace offset 2 M in int32, which wrapped for a (2^30, 1) weight)."""
    dtype = weights[0].dtype
    return (all(0 < w.numel() <= host.MAX_INDEX for w in weights)
            and all(t.dtype == dtype and t.is_contiguous() and 2 * t.numel() <= host.MAX_INDEX for t in vectors))


def _views(flat: torch.Tensor, offsets, shapes, which: int) -> list:
    """Per-weight views of a flat buffer at ``offsets[w][which]`` with ``shapes``."""
    out = []
    for off, shape in zip(offsets, shapes):
        o = off[which]
        k = 1
        for s in shape:
            k *= s
        out.append(flat[o:o + k].view(shape))
    return out


def _per_weight_forward(weights, us, vs, dims, n_power_iterations, eps, order, training):
    outs, sigmas, us_used, vs_used = [], [], [], []
    for w, u, v, dim in zip(weights, us, vs, dims):
        sigma, u_used, v_used = host.power_iteration(w, u, v, n_power_iterations, eps, dim, order, training)
        outs.append(host.normalize(w, u_used, v_used, sigma, dim))
        sigmas.append(sigma)
        us_used.append(u_used)
        vs_used.append(v_used)
    return outs, sigmas, us_used, vs_used


def _launch_forward(W, us, vs, dims, n_power_iterations, eps, order, training, in_place):
    """(W/sigma, sigmas, u/v used, plan): flat buffers in the plan's layout, or None when the
    multi-tensor kernels cannot take the call.  ``in_place``: the final pass also writes the stored u, v."""
    dev = W[0].device
    ptrs = _addresses([t for trio in zip(W, us, vs) for t in trio], dev) if _fits(W, us + vs) else None
    plan = group_plan(_geometries(W, dims)) if ptrs is not None else None
    tabs = _tables(plan, dev) if plan is not None else None
    if tabs is None:
        return None
    meta, row_items, col_items, elem_items = tabs
    acc = accumulation_dtype(W[0].dtype)
    ws = torch.empty(max(plan.ws, 1), dtype=acc, device=dev)
    sigmas = torch.empty(len(W), dtype=acc, device=dev)
    used = torch.empty(plan.used, dtype=W[0].dtype, device=dev)
    counters = host._counters(dev, plan.counters)
    n_row, n_col = row_items.numel() // 3, col_items.numel() // 3
    if not training:
        bm, bn, warps = ROW_TILE
        GK.group_eval_kernel[(n_row,)](ptrs, meta, row_items, ws, counters, used, sigmas, SPLIT=plan.split,
                                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=host.FINISH_BLOCK, num_warps=warps)
    else:
        def run(kernel, items, n_items, tile, two_stage, it, first, final):
            bm, bn, warps = tile
            kernel[(n_items,)](ptrs, meta, items, ws, counters, used, sigmas, float(eps), int(final),
                               X_STORED=it == 0 and first, PREV_STORED=it == 0, IN_PLACE=in_place,
                               SPLIT=plan.split, TWO_STAGE=two_stage, BLOCK_M=bm, BLOCK_N=bn,
                               BLOCK_V=host.FINISH_BLOCK, SPLIT_BLOCK=host.SPLIT_BLOCK, num_warps=warps)

        to_u = (GK.group_row_kernel, row_items, n_row, ROW_TILE, plan.row_two_stage)
        to_v = (GK.group_col_kernel, col_items, n_col, COL_TILE, plan.col_two_stage)
        for it in range(n_power_iterations):
            final = it == n_power_iterations - 1
            first, second = (to_v, to_u) if order == "vu" else (to_u, to_v)
            run(*first, it, True, final)
            run(*second, it, False, final)
    out = torch.empty(plan.out, dtype=W[0].dtype, device=dev)
    GK.group_divide_kernel[(elem_items.numel() // 2,)](ptrs, meta, elem_items, sigmas, out, CHUNK=CHUNK,
                                                       BLOCK=host.ELEM_BLOCK, num_warps=host.ELEM_WARPS)
    return out, sigmas, used, plan


def _contiguous(tensors) -> list:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


@host._on_weight_device
def group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training):
    """Power iteration and W/sigma for every weight of one (device, dtype) group (contract:
    backends/contract.py, ``Backend.group_forward``): u, v updated in place when training."""
    W = _contiguous(weights)
    res = _launch_forward(W, us, vs, dims, n_power_iterations, eps, order, training, in_place=True)
    if res is None:
        return _per_weight_forward(weights, us, vs, dims, n_power_iterations, eps, order, training)
    out, sigmas, used, plan = res
    us_used = _views(used, plan.offsets, [u.shape for u in us], 0)
    vs_used = [used[o[0] + u.numel():o[0] + u.numel() + v.numel()] for o, u, v in zip(plan.offsets, us, vs)]
    return _views(out, plan.offsets, [w.shape for w in W], 1), list(sigmas.unbind(0)), us_used, vs_used


@host._on_weight_device
def group_forward_flat(weights, us, vs, dims, n_power_iterations, eps, order, training):
    """The functional form (the ``triton_group_forward`` op): the stored u, v untouched; returns flat
    (W/sigma of every weight, one after the other; sigmas; u_new, v_new of every weight, one after the other)."""
    W = _contiguous(weights)
    res = _launch_forward(W, us, vs, dims, n_power_iterations, eps, order, training, in_place=False)
    if res is not None:
        return res[:3]
    us, vs = [u.clone() for u in us], [v.clone() for v in vs]  # the per-weight kernels write them
    outs, sigmas, us_used, vs_used = _per_weight_forward(W, us, vs, dims, n_power_iterations, eps, order, training)
    return (torch.cat([o.reshape(-1) for o in outs]), torch.stack(sigmas),
            torch.cat([t for pair in zip(us_used, vs_used) for t in pair]))


@host._on_weight_device
def group_backward(grads, weights, us, vs, sigmas, dims):
    """grad_W = (G - <G, W>/sigma u v^T) / sigma for every weight of one group in two launches
    (contract: ``Backend.group_backward``)."""
    W = _contiguous(weights)
    G = [g if g.is_contiguous() and g.dtype == w.dtype else g.to(w.dtype).contiguous() for g, w in zip(grads, W)]
    acc = accumulation_dtype(W[0].dtype)
    ok = _fits(W, us + vs) and all(s.dtype == acc and s.numel() == 1 for s in sigmas)
    ptrs = _addresses([t for five in zip(G, W, us, vs, sigmas) for t in five], W[0].device) if ok else None
    launched = _launch_backward(ptrs, W, dims, flat=None)
    if launched is None:
        return [host.backward(g, w, u, v, s, d) for g, w, u, v, s, d in zip(grads, weights, us, vs, sigmas, dims)]
    out, plan = launched
    return _views(out, plan.offsets, [w.shape for w in W], 1)


@host._on_weight_device
def group_backward_flat(grad, weights, used, sigmas, dims):
    """The ``triton_group_backward`` op: flat grad_W of every weight from the flat gradient of the
    forward's W/sigma and its flat u/v and sigmas."""
    W = _contiguous(weights)
    ptrs = _addresses(W, W[0].device) if _fits(W, [used]) and sigmas.dtype == accumulation_dtype(W[0].dtype) else None
    launched = _launch_backward(ptrs, W, dims, flat=(grad.contiguous(), used, sigmas))
    if launched is not None:
        return launched[0]
    plan = group_plan(_geometries(W, dims))
    parts = []
    for k, (w, dim, (uo, oo)) in enumerate(zip(W, dims, plan.offsets)):
        m, n, _ = host.matrix_view(w, dim)
        g = grad[oo:oo + w.numel()].view(w.shape)
        parts.append(host.backward(g, w, used[uo:uo + m], used[uo + m:uo + m + n], sigmas[k], dim).reshape(-1))
    return torch.cat(parts)


def _launch_backward(ptrs, W, dims, flat):
    """The two backward launches into a flat grad_W, returned with the group's plan (None when the
    kernels cannot take the call): reading G, u, v, sigma through ``ptrs`` (eager) or from ``flat`` =
    (G, used, sigmas)."""
    if ptrs is None:
        return None
    dev = W[0].device
    plan = group_plan(_geometries(W, dims))
    tabs = _tables(plan, dev)
    if tabs is None:
        return None
    meta, _, _, elem_items = tabs
    n_items = elem_items.numel() // 2
    acc = accumulation_dtype(W[0].dtype)
    ws = torch.empty(max(plan.ws, 1), dtype=acc, device=dev)
    cs = torch.empty(len(W), dtype=acc, device=dev)
    out = torch.empty(plan.out, dtype=W[0].dtype, device=dev)
    g_flat, used, sigmas = flat if flat is not None else (out, out, cs)  # unused without FLAT
    GK.group_dot_kernel[(n_items,)](ptrs, meta, elem_items, ws, host._counters(dev, plan.counters), cs, out, g_flat,
                                    sigmas, FLAT=flat is not None, CHUNK=CHUNK, BLOCK=host.ELEM_BLOCK,
                                    BLOCK_V=host.FINISH_BLOCK, num_warps=host.ELEM_WARPS)
    GK.group_grad_kernel[(n_items,)](ptrs, meta, elem_items, cs, out, g_flat, used, sigmas, FLAT=flat is not None,
                                     CHUNK=CHUNK, BLOCK=host.ELEM_BLOCK, num_warps=host.ELEM_WARPS)
    return out, plan
