"""Fold spectral norm into plain weights for inference and export: ``freeze(model)``."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from . import conv_norm, hooks
from .find import walk
from .nn import check_model


def freeze(model: nn.Module) -> nn.Module:
    """Replace every spectral norm in ``model`` (either API, ours or PyTorch's, either mode)
    by a plain parameter holding W / sigma as eval mode computes it (no power iteration,
    u, v and the other SN state dropped), in place.

    The frozen model gives the outputs of the unfrozen one in eval mode, its state_dict
    has the plain ``<name>`` keys of an unwrapped layer, and ``torch.export`` or any
    runtime sees ordinary layers.  A parametrized tensor carrying spectral norm is
    folded with all its parametrizations (``remove_parametrizations``).
    """
    check_model(model, "freeze")
    found = list(walk(model))
    for qual, site in found:  # checked before anything changes: no half-frozen model
        if site.kind == "conv" and _conv_v(site).numel() == 0:
            raise RuntimeError(f"freeze: {qual} (mode=\"conv\") has not run a forward yet, so its sigma is "
                               "unknown (u, v depend on the input size); nothing was frozen")
    for _, site in found:
        kind, module, name = site.kind, site.module, site.name
        if not _still_wrapped(module, name):
            continue  # a stacked second spectral norm, folded with the first
        if parametrize.is_parametrized(module, name):
            module.parametrizations[name].eval()  # fold the eval-mode value: no power iteration
        if kind == "conv":
            conv_norm.remove_spectral_norm_conv(module, name)
        elif kind == "hook":
            hooks.remove_spectral_norm(module, name)  # computes W / sigma without iterating
        else:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def _still_wrapped(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) or name + "_orig" in module._parameters


def _conv_v(site):
    """The v buffer of a mode="conv" spectral norm (empty until its first forward draws it)."""
    return getattr(site.module, site.name + "_v") if site.api == "hook" else site.state._v
