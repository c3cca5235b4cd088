"""Spectral normalization under ``torch.func`` transforms (grad, vjp, jacrev, jvp, vmap) and forward-mode
AD (``torch.autograd.forward_ad``).

The transforms run plain ATen ops only: they refuse C++ autograd functions (the native
backend's eager entry), autograd.Functions without ``setup_context`` (the other backends'),
and in-place copies into captured tensors (the buffers u, v).  PyTorch's own spectral
norm works under them, so ours must too: while a transform is active (for forward-mode AD: while
the call's weight carries a tangent, the level being one for the whole process), ``functional``
takes this route instead of a backend.

The formulation is the torch backend's, written as the transforms allow:

- the power iteration under ``no_grad`` (never differentiated), in the accumulation dtype,
  each new vector written into u or v by an ``out=`` op (the in-place form a grad transform
  allows on a captured tensor: PyTorch's own spectral norm writes them with
  ``F.normalize(..., out=u)``); a step whose norm is zero or not finite keeps the previous
  vector, as every backend does;
- sigma = u . (W v) with u, v held constant (detached, also when they require grad) and W / sigma
  differentiated by the transform:
  the gradient is the analytic (G - <G, W_sn> u v^T) / sigma of the other routes.

Values equal the eager backends' to rounding (sigma from u . (W v), not from the last
norm).  ``coeff``, ``soft`` and ``gain`` work; certified bounds and ``mode="conv"`` do not
(they raise).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._C import _functorch

from .backends.contract import accumulation_dtype
from .backends.pytorch import as_matrix, power_iteration, safe_sigma


def active(weight: Tensor | None = None) -> bool:
    """Whether a torch.func transform is running (its interpreter stack, per thread, is not empty) or a
    forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``: C++ autograd functions have
    no jvp); never while torch.compile traces (the compiled route applies there: functional.py).  The
    forward-AD level is one for the whole process, open for every thread alike: given the ``weight`` of
    the call, only one that carries a tangent at it counts (another thread's level is not this call's)."""
    if torch.compiler.is_compiling():
        return False
    if _functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:
        return False
    return weight is None or forward_ad.unpack_dual(weight).tangent is not None


def active_for(weights) -> bool:
    """``active`` for a call over several ``weights`` (a group): any of them."""
    if torch.compiler.is_compiling():
        return False
    if _functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0 and any(active(w) for w in weights)


def refuse(what: str, weight: Tensor | None = None) -> None:
    """Raise for a feature the transforms cannot run through, when one is active (for ``weight``: see
    ``active``)."""
    if active(weight):
        raise NotImplementedError(f"sn_kernels: {what} is not supported under torch.func transforms "
                                  "(grad, vjp, jacrev, vmap); the plain spectral norm is")


def _plain(t: Tensor) -> Tensor | None:
    """``t`` without the transforms' wrappers (for logging sigma past the transform); None when a
    vmap batches it (no single value to log)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return None
        t = _functorch.get_unwrapped(t)
    return t


def spectral_normalize(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int,
                       order: str, training: bool, coeff: float | None, soft: bool) -> tuple[Tensor, Tensor | None]:
    """``functional.spectral_normalize``'s eager forward, in ops the transforms run (module docstring);
    returns (W_sn, sigma for logging: detached and unwrapped, or None under vmap)."""
    acc = accumulation_dtype(weight.dtype)
    W = as_matrix(weight, dim).to(acc)
    with torch.no_grad():
        # detached: u, v are constants, as on the autograd route (a same-dtype .to() would return u itself,
        # and a u that requires grad, e.g. passed through functional_call, would be differentiated in eval)
        ua, va = u.detach().to(acc), v.detach().to(acc)
        if training:
            # W detached too: no_grad stops no forward-mode tangent, and one carried into u, v would be refused
            # by the out= copies below (forward AD of mul_out) and is not wanted (u, v are constants)
            ua, va, _ = power_iteration(W.detach(), ua, va, n_power_iterations, eps, order)
            torch.mul(ua, 1, out=u)  # u.copy_(ua) is refused on a captured tensor; out= is not
            torch.mul(va, 1, out=v)
    sigma = torch.dot(ua, W @ va)  # differentiable in W only: u, v are constants
    safe = safe_sigma(sigma)
    if coeff is not None:
        safe = safe / coeff
        if soft:
            safe = safe.clamp_min(1.0)
    weight_sn = (weight.to(acc) / safe).to(weight.dtype)
    return weight_sn, _plain(sigma.detach())
