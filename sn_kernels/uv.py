"""(Re)initialise the power-iteration vectors u, v of every spectral norm in a model.

For a model built on the meta device and materialised with ``to_empty()`` (u, v are
then uninitialised memory), and for a weight-averaged copy (EMA, SWA) whose u, v no
longer match its averaged weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import conv_norm
from .checks import check_eps_in, check_iterations_eps, front_end_iterations
from .functional import spectral_normalize
from .backends.pytorch import as_matrix, exact_top_singular
from .find import input_of, walk
from .meta import remove_guards
from .nn import check_model


def _fresh(vec: Tensor, eps: float, redraw: bool) -> None:
    """Set ``vec`` to a unit vector: itself normalized (``redraw=False``, when finite and nonzero), else a draw."""
    if not redraw:
        norm = torch.linalg.vector_norm(vec)
        if torch.isfinite(norm) and norm > 0:
            vec.div_(norm)
            return
    vec.copy_(F.normalize(torch.randn_like(vec), dim=0, eps=eps))


@torch.no_grad()
def reset_uv(model: nn.Module, n_power_iterations: int = 15, *, redraw: bool = True) -> nn.Module:
    """Re-initialise u, v of every spectral norm in ``model`` (either API, ours or PyTorch's), in place.

    ``redraw=True``: fresh random unit vectors (torch's global RNG), then
    ``n_power_iterations`` power-iteration steps on the current weight, as
    ``parametrizations.spectral_norm`` does at wrapping time.  Call it after
    ``to_empty()`` once the weights are initialised (it also lifts the meta-device
    guard, and there sets a ``gain`` as wrapping does: the exact sigma, u and v the
    exact singular vectors).  ``redraw=False``: start from the current u, v (normalized; only vectors
    that are zero or not finite are redrawn), e.g. on an EMA model after averaging.
    ``mode="conv"`` weights forget u, v; their next forward draws them.
    ``n_power_iterations`` is any integer a front end takes; it and every spectral norm's eps are
    checked before anything changes.
    """
    check_model(model, "reset_uv")
    n_power_iterations = front_end_iterations(n_power_iterations)
    found = [site for _, site in walk(model)]
    for site in found:  # a refusal leaves every u, v and meta guard as it was
        check_iterations_eps(n_power_iterations, site.state.eps)
        check_eps_in(site.state.eps, site.stored().dtype)  # an eps the weight's dtype cannot hold (moved since)
    for site in found:
        kind, module, name, state = site.kind, site.module, site.name, site.state
        on_meta = remove_guards(module)  # wrapped on meta: the gain too holds uninitialised memory
        if getattr(state, "sigma", None) is not None:
            state.sigma = None  # stale: sigmas() recomputes it from the new u, v
        if kind == "conv":
            conv_norm.reset_spectral_norm_conv(module, name)
            continue
        if kind == "hook":
            weight, u, v, order = (getattr(module, name + "_orig"), getattr(module, name + "_u"),
                                   getattr(module, name + "_v"), "vu")
        else:
            weight = input_of(module.parametrizations[name], state)
            if weight.ndim == 1:
                if on_meta and state.gain is not None:  # a vector's gain: its length, as at wrapping
                    with torch.no_grad():
                        state.gain.copy_(torch.linalg.vector_norm(weight.detach()).to(state.gain.dtype))
                continue  # a vector needs no u, v
            u, v, order = state._u, state._v, "uv"
        if kind == "hook":  # a flag on ours (the parameter beside the weight); PyTorch's hook has none
            gain = getattr(module, name + "_gain") if getattr(state, "gain", False) else None
        else:
            gain = getattr(state, "gain", None)
        if on_meta and gain is not None:  # as at wrapping: gamma, u, v the exact top singular triple
            with torch.no_grad():
                gamma, u1, v1 = exact_top_singular(as_matrix(weight.detach(), state.dim))
                gain.copy_(gamma.reshape(gain.shape).to(gain.dtype))
                u.copy_(u1)
                v.copy_(v1)
            continue
        _fresh(u, state.eps, redraw)
        _fresh(v, state.eps, redraw)
        spectral_normalize(weight.detach(), u, v, n_power_iterations=n_power_iterations, eps=state.eps,
                           dim=state.dim, order=order, training=True)
    return model
