"""The torch.compile route of the "torch" backend: plain torch ops that inductor sees through
(also "auto"'s on the CPU when the native extension is missing; with it, "auto" compiles to
native ops laid out for inductor instead: ``functional._compiled_backend``, benchmarks/NOTES.md C4).

Under ``torch.compile`` an opaque custom op costs more than its kernels: inductor cannot
fuse it with its neighbours and must hand it the strides it was traced with.  In a
convolutional model inductor lays the weights out channels-last, so each SN weight is
copied back to contiguous for the ops and W / sigma copied again to channels-last for the
convolution, forward and backward (benchmarks/NOTES.md, "torch.compile").  Traced as torch
ops, the power iteration, W / sigma and its analytic backward fuse with those layout
changes instead, and the u, v updates become buffer mutations that functionalization
writes back once per graph.

The numbers are the torch backend's (``backends/pytorch.py``): sigma from the last norm of the
iteration, a step with a zero or non-finite norm keeps the previous vector, a zero weight
normalizes to 0, and the backward is grad_W = (G - <G, W_sn> u v^T) / sigma with u, v
held constant.  ``power_iteration`` and ``normalize`` take the arguments of the backend contract's two ops
(backends/contract.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import accumulation_dtype, exporting
from .pytorch import normalize_step, outer_like, safe_sigma


def _mv(W: Tensor, v: Tensor, dim: int) -> Tensor:
    """W v for the (m, n) matrix view of ``W`` (``dim`` first), as a multiply-and-sum over W's
    own dims: inductor orders the loops by the layout it picks for W (channels-last for a
    convolution's weight).  On the flattened view (``pytorch.as_matrix``) the column index
    of a channels-last weight is not affine, and every load becomes a gather."""
    others = [d for d in range(W.dim()) if d != dim]
    return (W * v.view([W.shape[d] for d in others]).unsqueeze(dim)).sum(others)


def _mtv(W: Tensor, u: Tensor, dim: int) -> Tensor:
    """W^T u for the matrix view, the same way (the other dims flattened in order)."""
    shape = [1] * W.dim()
    shape[dim] = -1
    return (W * u.view(shape)).sum(dim).reshape(-1)


def _pinned_copy(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of u, v taken before the power iteration updates them in place, as an op that
    AOTAutograd's partitioner never recomputes and inductor fuses.

    The partitioner may recompute a value in the backward instead of saving it, re-reading graph
    inputs there; for u, v, which the forward has updated by then, that gives silently wrong
    gradients (W^T u recomputed with the new u; pytorch/pytorch#197039; tests/test_compile.py's
    "mlp" model fails with a plain ``clone``).  It only recomputes ops of its allowlist
    (``get_default_op_list`` in torch/_functorch/partitioners.py: pointwise ops, views, clone,
    sum, amax, ...), and ``amin`` is not on it, so every chain it replays starts from these
    copies.  Over one element ``amin`` is the identity (NaN included), and inductor lowers it
    as a plain load that fuses with the power iteration.

    An opaque custom op would do the same for the partitioner, but inductor's CPU backend ends
    its current C++ kernel at every opaque call: one more kernel to compile per layer (SNGAN CNN
    discriminator: 23 kernels against 16, benchmarks/NOTES.md)."""
    return u.unsqueeze(0).amin(0), v.unsqueeze(0).amin(0)


def power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """``pytorch._power_iteration`` with ``_mv``, ``_mtv``: u, v updated in place (training);
    returns (sigma, u, v copies).  Called under ``composed_eager``'s no_grad (no nested one: see there)."""
    acc = accumulation_dtype(weight.dtype)
    W = weight.to(acc) if weight.dim() > 1 else weight.to(acc).unsqueeze(1)
    if not training:
        return torch.dot(u.to(acc), _mv(W, v.to(acc), dim)), u.clone(), v.clone()
    ua, va = (x.to(acc) for x in _pinned_copy(u, v))
    for _ in range(n_power_iterations):
        if order == "vu":
            va, _ = normalize_step(_mtv(W, ua, dim), va, eps)
            ua, sigma = normalize_step(_mv(W, va, dim), ua, eps)
        else:
            ua, _ = normalize_step(_mv(W, va, dim), ua, eps)
            va, sigma = normalize_step(_mtv(W, ua, dim), va, eps)
    u.copy_(ua)
    v.copy_(va)
    return sigma, u.clone(), v.clone()


class _Normalize(torch.autograd.Function):
    """W / sigma with its analytic backward, grad_W = (G - <G, W_sn> u v^T) / sigma; dynamo
    traces both into the graph.  The backward reads W_sn, which the convolution's backward
    keeps anyway, not W: a W kept for the backward is an extra copy in the layout inductor
    picks for it (channels-last next to a convolution), written every step.

    No no-op ``.to(dtype)`` in ``forward``: under dynamo (torch 2.11) an autograd.Function
    whose forward contains one gets a zero gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        if weight.dtype == sigma.dtype:
            out = weight / safe_sigma(sigma)
        else:
            out = (weight.to(sigma.dtype) / safe_sigma(sigma)).to(weight.dtype)
        ctx.dim = dim
        ctx.save_for_backward(out, u, v, sigma)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight_sn, u, v, sigma = ctx.saved_tensors
        acc = sigma.dtype
        G = grad.to(acc)
        uvT = outer_like(u.to(acc), v.to(acc), weight_sn, ctx.dim)
        grad_weight = (G - (G * weight_sn.to(acc)).sum() * uvT) / safe_sigma(sigma)
        return grad_weight.to(grad.dtype), None, None, None, None


def _attached(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """W / sigma with sigma re-attached to W through d sigma / dW = u v^T (the value unchanged): plain
    autograd then gives the analytic gradient (G - <G, W_sn> u v^T) / sigma."""
    acc = sigma.dtype
    W = weight.to(acc)
    uvT = outer_like(u.to(acc), v.to(acc), weight, dim)
    return (W / (safe_sigma(sigma) + (uvT * (W - W.detach())).sum())).to(weight.dtype)


def normalize(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """W / sigma with the analytic gradient: ``_Normalize`` under torch.compile; under torch.export,
    which keeps a program's forward ops but not an autograd.Function's backward (the exported program's
    gradient would be G / sigma alone), the same value and gradient by plain autograd (``_attached``)."""
    if exporting():
        return _attached(weight, u, v, sigma, dim)
    return _Normalize.apply(weight, u, v, sigma, dim)
