"""Switch an existing code base to sn_kernels without editing it: ``patch_torch()``.

While patched, PyTorch's three entry points build sn_kernels' spectral norm:

* ``torch.nn.utils.spectral_norm``, both as the attribute of ``torch.nn.utils`` and as
  the function of the ``torch.nn.utils.spectral_norm`` module (the two import styles);
* ``torch.nn.utils.parametrizations.spectral_norm``;
* the classes those functions look up when called: ``SpectralNorm.apply`` of the hook
  API (also called directly, as StyleGAN-T-style code does) and the parametrization
  class ``torch.nn.utils.parametrizations._SpectralNorm``.  So a reference to
  PyTorch's function taken before the patch (``from torch.nn.utils import
  spectral_norm`` at a library's import) builds ours too, as long as the model is
  built while the patch is active.  A subclass of ``_SpectralNorm`` defined while patched
  (SNGP-style bounded spectral norms) inherits ours, which has PyTorch's helpers
  ``_reshape_weight_to_matrix`` and ``_power_method``.

Layers wrapped before the patch (a model built at import time, or unpickled) keep
PyTorch's spectral norm: ``sn_kernels.convert(model)`` swaps those, and is the route
that works in every case.
"""
from __future__ import annotations

import importlib

import torch

from . import hooks, parametrizations
from .find import torch_sn

_torch_param = importlib.import_module("torch.nn.utils.parametrizations")


def _targets():
    """(owner, attribute, sn_kernels replacement) for every patched name."""
    return [
        (torch.nn.utils, "spectral_norm", hooks.spectral_norm),
        (torch_sn, "spectral_norm", hooks.spectral_norm),
        (torch_sn.SpectralNorm, "apply", hooks.SpectralNorm.__dict__["apply"]),
        (_torch_param, "spectral_norm", parametrizations.spectral_norm),
        (_torch_param, "_SpectralNorm", parametrizations.SpectralNormParametrization),
    ]


_saved: list[tuple[object, str, object]] = []  # (owner, attribute, PyTorch's original) while patched


def is_patched() -> bool:
    """Whether ``patch_torch`` is in effect."""
    return bool(_saved)


class TorchPatch:
    """Returned by ``patch_torch``; as a context manager it undoes the patch it applied on exit."""

    def __init__(self, applied: bool):
        self.applied = applied

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            unpatch_torch()


def patch_torch() -> TorchPatch:
    """Make PyTorch's spectral-norm entry points build sn_kernels' (see the module docstring).

    Idempotent; undo with ``unpatch_torch()``, or use ``with sn_kernels.patch_torch(): ...``.
    """
    if _saved:
        return TorchPatch(applied=False)
    for owner, attr, ours in _targets():
        _saved.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, ours)
    return TorchPatch(applied=True)


def unpatch_torch() -> None:
    """Restore PyTorch's own spectral norm entry points (no-op when not patched)."""
    while _saved:
        owner, attr, original = _saved.pop()
        setattr(owner, attr, original)
