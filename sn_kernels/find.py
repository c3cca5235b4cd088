"""Finding the spectral norms on a module: the one place that knows where each kind lives.

A spectral norm is a ``Site``: a forward pre-hook (the hook API, ours or PyTorch's), a
parametrization (ours or PyTorch's), or the convolution-operator norm of ``mode="conv"``
in either API.  Our classes say which they are with a class attribute ``sn_kind``;
PyTorch's are recognised by their classes, taken here at import (``patch_torch`` later
replaces the module attribute, not the class of existing layers).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

# the module, not the function that torch.nn.utils re-exports under the same name
torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")
#: PyTorch's parametrization class
TorchSpectralNorm = torch.nn.utils.parametrizations._SpectralNorm

@dataclass(frozen=True)
class Site:
    """One spectrally normalized weight: ``module.<name>``, normalized by ``state`` (the hook
    object or the parametrization module).  ``kind``: "hook", "param" (matrix mode) or
    "conv" (mode="conv"); ``api``: "hook" or "parametrization"; ``key``: the hook's key in
    ``module._forward_pre_hooks`` (None for a parametrization)."""

    kind: str
    api: str
    module: nn.Module
    name: str
    state: Any
    key: int | None = None

    def stored(self) -> torch.Tensor:
        """The tensor stored for the weight, before normalization: the hook API's ``<name>_orig``, or the
        parametrization list's ``original`` (``original0`` when its first parametrization takes several)."""
        if self.api == "hook":
            return getattr(self.module, self.name + "_orig")
        plist = self.module.parametrizations[self.name]
        return plist.original if plist.is_tensor else plist.original0


def _kind(obj) -> str | None:
    kind = getattr(type(obj), "sn_kind", None)
    if kind is not None:
        return kind
    if isinstance(obj, torch_sn.SpectralNorm):
        return "hook"
    if isinstance(obj, TorchSpectralNorm):
        return "param"
    return None


def sites(module: nn.Module, name: str | None = None) -> list[Site]:
    """The spectral norms on ``module`` itself (not its children), of ``module.<name>`` or,
    with ``name=None``, of every parameter; hooks first, then parametrizations in order."""
    out = []
    for key, hook in module._forward_pre_hooks.items():
        kind = _kind(hook)
        if kind is not None and (name is None or hook.name == name):
            out.append(Site(kind, "hook", module, hook.name, hook, key))
    if parametrize.is_parametrized(module):
        for pname, plist in module.parametrizations.items():
            if name is None or pname == name:
                out.extend(Site(kind, "parametrization", module, pname, p)
                           for p in plist if (kind := _kind(p)) is not None)
    return out


def find(module: nn.Module, name: str = "weight", kind: str | None = None, api: str | None = None) -> Site | None:
    """The first spectral norm of ``module.<name>`` (of that ``kind`` and ``api`` when given), or None."""
    return next((s for s in sites(module, name) if (kind is None or s.kind == kind)
                 and (api is None or s.api == api)), None)


def walk(model: nn.Module) -> Iterator[tuple[str, Site]]:
    """(qualified weight name such as ``"block1.c1.weight"``, site) for every spectral norm in ``model``."""
    for mod_name, module in model.named_modules():
        for site in sites(module):
            yield (f"{mod_name}.{site.name}" if mod_name else site.name), site


def input_of(plist: nn.Module, target: nn.Module) -> torch.Tensor:
    """The tensor the parametrization ``target`` receives: ``original`` through the ones before it (eval).
    A first parametrization of several tensors (``right_inverse`` returned a sequence, as
    ``parametrizations.weight_norm``'s does) takes ``original0``, ``original1``, ..."""
    if plist.is_tensor:
        x, before = plist.original, list(plist)
    else:
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
        x, before = _eval_call(plist[0], *originals), list(plist)[1:]
    for p in before:
        if p is target:
            return x
        x = _eval_call(p, x)
    raise ValueError("parametrization not in its list")


def _eval_call(p: nn.Module, *tensors: torch.Tensor) -> torch.Tensor:
    """``p(*tensors)`` in eval mode (a spectral norm then leaves its u, v alone), its mode restored."""
    training = p.training
    p.eval()
    try:
        return p(*tensors)
    finally:
        p.train(training)
