"""Grouped spectral norm: every SN weight of a model normalized up front, once per model call.

``sn_kernels.group(model)`` registers a forward pre-hook on ``model`` that computes
the normalized weight of every sn_kernels spectral norm inside it (both APIs,
matrix mode) before the model runs; each layer then uses its pre-computed weight
instead of computing its own.  The semantics are exactly the per-module ones: one
power iteration per layer per model call, the same u, v, outputs and gradients.

This is the seam for a multi-tensor launch (all weights of a model in one launch
per dependent pass, as ``multi_tensor_apply`` does for optimizers); today every
weight still goes through ``spectral_normalize`` one at a time.

Cases handled per layer, exactly as without grouping:
  * a layer called twice in one model call: the second call (or, for a
    parametrization, the second access of ``module.weight``) computes normally,
    running a second power iteration as PyTorch would;
  * weights on several devices or of several dtypes: each is computed on its own.
Not grouped: ``mode="conv"`` layers and PyTorch's own spectral norm (call
``sn_kernels.convert`` first).  A layer that the model does not call in some
forward still had its power iteration run by the group: this is the one
difference from per-module semantics, and grouping is opt-in for that reason.
"""
from __future__ import annotations

from torch import nn

from . import hooks, parametrizations
from .nn import _sn_weights


def _members(model: nn.Module):
    """(state, compute) for every sn_kernels matrix-mode spectral norm in ``model``."""
    for _, kind, module, name, state in _sn_weights(model):
        if kind == "hook" and isinstance(state, hooks.SpectralNorm):
            yield state, (lambda m=module, h=state: h.compute_weight(m, do_power_iteration=m.training))
        elif kind == "param" and isinstance(state, parametrizations._SpectralNorm) \
                and len(module.parametrizations[name]) == 1:
            plist = module.parametrizations[name]
            yield state, (lambda pl=plist, p=state: p.compute(pl.original))


class SNGroup:
    """Handle returned by ``sn_kernels.group``; ``remove()`` restores per-layer computation."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.members = list(_members(model))
        if not self.members:
            raise ValueError("sn_kernels.group: the model has no sn_kernels spectral norm to group")
        self._handle = model.register_forward_pre_hook(self._normalize_all)

    def _normalize_all(self, model: nn.Module, inputs) -> None:
        for state, compute in self.members:
            state.pending = compute()

    def remove(self) -> None:
        """Stop grouping; drop any pre-computed weight not yet used."""
        self._handle.remove()
        for state, _ in self.members:
            state.pending = None

    def __len__(self) -> int:
        return len(self.members)


def group(model: nn.Module) -> SNGroup:
    """Normalize every sn_kernels SN weight of ``model`` up front at each model call."""
    return SNGroup(model)
