"""sn_kernels: fused spectral normalization for PyTorch.

One op (``spectral_normalize``), three backends ("native", "triton", "torch")
chosen by ``set_backend``, and drop-ins for both PyTorch front ends:
``sn_kernels.spectral_norm`` (= ``torch.nn.utils.spectral_norm``) and
``sn_kernels.parametrizations.spectral_norm``
(= ``torch.nn.utils.parametrizations.spectral_norm``); ``patch_torch()`` or
``convert(model)`` switch existing code over.
"""
from . import native, parametrizations  # native: the extension's utilities (build_info, cache_stats)
from .bounds import lipschitz_bound, sigma_bounds
from .dispatch import available_backends, explain, get_backend, set_backend, use_backend
from .freeze import freeze
from .functional import spectral_normalize
from .grouped import SNGroup, group
from .hooks import SpectralNorm, remove_spectral_norm, spectral_norm
from .monitor import singular_values
from .nn import (
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNConvTranspose1d,
    SNConvTranspose2d,
    SNConvTranspose3d,
    SNEmbedding,
    SNLinear,
    apply_spectral_norm,
    convert,
    is_spectral_normalized,
    sigmas,
)
from .patch import is_patched, patch_torch, unpatch_torch
from .uv import reset_uv

__version__ = "0.1.0"

__all__ = [
    "spectral_normalize", "spectral_norm", "remove_spectral_norm", "parametrizations",
    "available_backends", "set_backend", "get_backend", "use_backend", "explain",
    "apply_spectral_norm", "convert", "sigmas", "is_spectral_normalized", "singular_values", "group", "SNGroup",
    "SNLinear", "SNConv1d", "SNConv2d", "SNConv3d",
    "SNConvTranspose1d", "SNConvTranspose2d", "SNConvTranspose3d", "SNEmbedding",
    "SpectralNorm", "patch_torch", "unpatch_torch", "is_patched", "freeze", "reset_uv",
    "sigma_bounds", "lipschitz_bound",
]
