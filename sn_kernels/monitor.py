"""Top-k singular values of a (spectrally normalized) weight, for logging.

``singular_values(module, k)`` runs a few steps of block power (subspace)
iteration on the matrix view of the raw weight, keeping the orthonormal basis
between calls as a non-persistent buffer, so each call is cheap (two thin
matmuls and a thin QR per step) and the estimates sharpen over training as the
power iteration of spectral norm itself does.  It never touches u, v or the
normalization, nor the state_dict keys, nor torch's global RNG.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backends.contract import accumulation_dtype
from .backends.pytorch import as_matrix
from .checks import default_dim
from .find import _kind, find, input_of

BASIS_PREFIX = "_sn_svd_basis_"


def raw_weight(module: nn.Module, name: str = "weight") -> tuple[Tensor, int]:
    """(the un-normalized weight, the matrix-view dim) of ``module.<name>``, wrapped by
    either API (sn_kernels' or PyTorch's, matrix or conv mode) or not at all."""
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        norms = [p for p in plist if _kind(p) is not None]
        dims = [p.dim for p in norms if isinstance(getattr(p, "dim", None), int)]  # mode="conv" has none
        dim = dims[0] if dims else default_dim(module)
        if plist.is_tensor:
            return plist.original, dim
        # the first parametrization takes several tensors (weight_norm's): the first norm's input
        return (input_of(plist, norms[0]) if norms else plist()), dim
    if name + "_orig" in module._parameters:  # hook API (matrix or conv mode)
        site = find(module, name, kind="hook")
        return module._parameters[name + "_orig"], site.state.dim if site is not None else default_dim(module)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module {type(module).__name__} has no weight named {name!r}")
    return weight, default_dim(module)


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _random_columns(n: int, k: int, like: Tensor, seed: int) -> Tensor:
    # a private generator: logging must not shift the training run's random stream
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=like.dtype, device="cpu").to(like.device)  # the generator's device


@torch.no_grad()
def singular_values(module: nn.Module, k: int = 1, iters: int = 1, name: str = "weight") -> Tensor:
    """The k largest singular values (descending, detached) of the matrix view of
    ``module.<name>``'s raw weight, estimated by ``iters`` steps of subspace iteration
    V <- orth(W^T W V) from the basis kept in ``module._sn_svd_basis_<name>``,
    then Rayleigh-Ritz (svd of W V).  float32 for half weights."""
    weight, dim = raw_weight(module, name)
    W = as_matrix(weight.detach(), dim)
    if not W.is_complex():  # complex weights stay complex (conjugate transposes below)
        W = W.to(accumulation_dtype(weight.dtype))
    m, n = W.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"k must be an int in [1, min(m, n) = {min(m, n)}] for a {m}x{n} weight, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    key = BASIS_PREFIX + name
    V = module._buffers.get(key)
    if V is None or V.shape[0] != n or V.dtype != W.dtype or V.device != W.device:
        V = _orth(_random_columns(n, k, W, seed=0))
    elif V.shape[1] > k:
        V = V[:, :k]  # Ritz vectors are stored in descending order: keep the top ones
    elif V.shape[1] < k:
        V = _orth(torch.cat([V, _random_columns(n, k - V.shape[1], W, seed=V.shape[1])], dim=1))
    for _ in range(iters):
        V = _orth(W.mH @ (W @ V))
    # Rayleigh-Ritz: the singular values of W on span(V); rotating V onto the Ritz vectors
    # orders its columns, so a later call with a smaller k keeps the right ones
    _, S, Vh = torch.linalg.svd(W @ V, full_matrices=False)
    V = V @ Vh.mH
    if key in module._buffers:
        module._buffers[key] = V
    else:
        module.register_buffer(key, V, persistent=False)
    return S
