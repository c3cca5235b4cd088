"""The "triton" backend: Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Registers ``sn_kernels::triton_power_iteration``, ``sn_kernels::triton_normalize``
(with the contract's shared fake implementations and analytic gradient) and
``sn_kernels::triton_backward``, the gradient as a custom op of its own so
torch.compile can trace it.  ``sn_kernels.group`` runs the multi-tensor kernels of
group_host.py; a compiled grouped model calls them through the ops of group_ops.py.  Importing this module never fails because triton
is missing: ``why_not`` then says so.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import pytorch
from ..contract import Backend, composed_eager, define_ops, differentiable

try:
    import triton  # noqa: F401

    from . import group_host as _group_host
    from . import group_ops as _group_ops
    from . import host as _host
    from . import kernels as _kernels
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: keep the reason for why_not
    _host = _kernels = _group_host = _group_ops = None
    _IMPORT_ERROR = f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"


# whether the kernels were built by the interpreter (TRITON_INTERPRET=1 before import); decided once
_INTERPRETED = _kernels is not None and type(_kernels.divide_kernel).__name__ == "InterpretedFunction"


def _interpreted() -> bool:
    """Whether the kernels were built by the interpreter (TRITON_INTERPRET=1 before import)."""
    return _INTERPRETED


def why_not(device: torch.device, auto: bool = False) -> str | None:
    """None when the backend can run on ``device``; otherwise the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreted():
            return "triton was imported with TRITON_INTERPRET=1, which runs on cpu tensors only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if auto:
            return "auto never picks the Triton interpreter"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "cpu tensors need TRITON_INTERPRET=1 (set before the first import of triton)"
        if not _interpreted():
            return "TRITON_INTERPRET=1 was set after triton was imported"
        return None
    return f"triton does not run on {device.type} tensors"


def _unavailable(*args, **kwargs):
    raise RuntimeError(_IMPORT_ERROR)


@torch.library.custom_op("sn_kernels::triton_backward", mutates_args=())
def triton_backward(grad: Tensor, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """grad_W = (G - <G, W>/sigma u v^T) / sigma (two launches)."""
    if _host is None:
        _unavailable()
    return _host.backward(grad, weight, u, v, sigma, dim)


@triton_backward.register_fake
def _(grad, weight, u, v, sigma, dim):
    return torch.empty_like(weight)


def backward(grad: Tensor, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """The backward callable of the contract: one custom-op call."""
    return triton_backward(grad, weight, u, v, sigma, dim)


_power_iteration = _host.power_iteration if _host is not None else _unavailable
_normalize = _host.normalize if _host is not None else _unavailable


def _checked_power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """The op's power iteration: the native op's checks first (the eager route's caller checks its
    arguments, Backend.eager_checks_args; an op caller may not)."""
    if _host is None:
        _unavailable()
    _host.check_op_args(weight.dtype, n_power_iterations, eps, order)
    return _host.power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training)


_power_iteration_op, _normalize_op = define_ops("triton", _checked_power_iteration, _normalize, backward)

backend = Backend(
    name="triton", device_types=("cuda", "cpu"), why_not=why_not,
    power_iteration=_power_iteration_op, normalize=_normalize_op, backward=backward,
    eager=composed_eager(_power_iteration, differentiable(_normalize, backward, pytorch.backward),
                         traced_by=(_power_iteration_op, _normalize_op)),
    ops=(_power_iteration_op, _normalize_op, triton_backward)
    + ((_group_ops.triton_group_forward, _group_ops.triton_group_backward) if _group_ops is not None else ()),
    group_forward=_group_host.group_forward if _group_host is not None else None,
    group_backward=_group_host.group_backward if _group_host is not None else None,
)
