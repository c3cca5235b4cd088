"""The triton backend's grouped ops, for a grouped model under torch.compile (grouped._compiled_group).

    triton_group_forward(Tensor[] weights, Tensor[] us, Tensor[] vs, int[] dims, int n_power_iterations,
        float eps, str order, bool training) -> (Tensor weight_sns, Tensor sigmas, Tensor uvs)
    triton_group_backward(Tensor grad, Tensor[] weights, Tensor uvs, Tensor sigmas, int[] dims) -> Tensor

Functional (the stored u, v are not written: the caller copies the new ones in, as for the native
grouped op) and flat: W/sigma of every weight one after the other, and u_new then v_new of every
weight, so no two outputs alias (a custom op's outputs must not) and the caller takes views.  The
autograd formula is one ``triton_group_backward`` (group_host.py: two launches for the group).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..contract import accumulation_dtype
from . import group_host, host


@torch.library.custom_op("sn_kernels::triton_group_forward", mutates_args=())
def triton_group_forward(weights: list[Tensor], us: list[Tensor], vs: list[Tensor], dims: list[int],
                         n_power_iterations: int, eps: float, order: str,
                         training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Power iteration and W/sigma of every weight of a group: (flat W/sigma, sigmas, flat u, v)."""
    host.check_op_args(weights[0].dtype, n_power_iterations, eps, order)
    return group_host.group_forward_flat(weights, us, vs, dims, n_power_iterations, eps, order, training)


@triton_group_forward.register_fake
def _(weights, us, vs, dims, n_power_iterations, eps, order, training):
    w0 = weights[0]
    return (w0.new_empty(sum(w.numel() for w in weights)),
            w0.new_empty(len(weights), dtype=accumulation_dtype(w0.dtype)),
            w0.new_empty(sum(u.numel() + v.numel() for u, v in zip(us, vs))))


@torch.library.custom_op("sn_kernels::triton_group_backward", mutates_args=())
def triton_group_backward(grad: Tensor, weights: list[Tensor], uvs: Tensor, sigmas: Tensor,
                          dims: list[int]) -> Tensor:
    """Flat grad_W of every weight, from the flat gradient of ``triton_group_forward``'s W/sigma."""
    return group_host.group_backward_flat(grad, weights, uvs, sigmas, dims)


@triton_group_backward.register_fake
def _(grad, weights, uvs, sigmas, dims):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    weights, dims = inputs[0], inputs[3]
    _, sigmas, uvs = output
    ctx.dims, ctx.n_inputs = list(dims), len(inputs)
    ctx.mark_non_differentiable(sigmas, uvs)
    ctx.save_for_backward(*weights, uvs, sigmas)


def _backward(ctx, grad, grad_sigmas, grad_uvs):
    if torch.is_grad_enabled():
        raise RuntimeError("sn_kernels: double backward through the grouped op (a compiled grouped model) "
                           "is not supported; eager calls support it")
    *weights, uvs, sigmas = ctx.saved_tensors
    flat = triton_group_backward(grad, weights, uvs, sigmas, ctx.dims)
    grads, o = [], 0
    for w in weights:
        grads.append(flat[o:o + w.numel()].view(w.shape))
        o += w.numel()
    k = len(weights)
    return (grads, [None] * k, [None] * k) + (None,) * (ctx.n_inputs - 3)  # the structure of the inputs


triton_group_forward.register_autograd(_backward, setup_context=_setup_context)
