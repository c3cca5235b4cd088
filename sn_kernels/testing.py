"""References for checking spectral norm: float64 oracles and the tolerance table.

Used by the test suite and ``benchmarks/gpu_check.py``; users may call them to check a
build on their own machine.  Nothing here runs in the op itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends.pytorch import as_matrix

__all__ = ["TOL", "as_matrix", "pytorch_formula", "svd_sigma"]

#: (rtol, atol) by dtype for comparing against float64 references and PyTorch: the one table
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def pytorch_formula(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int = 1, eps: float = 1e-12,
                    dim: int = 0, order: str = "vu", training: bool = True):
    """PyTorch's own recipe, literally (third mat-vec for sigma), in float64, functional:
    returns (weight_sn, sigma, u_new, v_new) and leaves the inputs alone."""
    W = as_matrix(weight.double(), dim)
    u, v = u.double(), v.double()
    normalize = torch.nn.functional.normalize
    if training:
        for _ in range(n_power_iterations):
            if order == "vu":
                v = normalize(W.t() @ u, dim=0, eps=eps)
                u = normalize(W @ v, dim=0, eps=eps)
            else:
                u = normalize(W @ v, dim=0, eps=eps)
                v = normalize(W.t() @ u, dim=0, eps=eps)
    sigma = torch.dot(u, W @ v)
    return weight.double() / sigma, sigma, u, v


def svd_sigma(weight: Tensor, dim: int = 0) -> Tensor:
    """The exact largest singular value of the matrix view, in float64."""
    return torch.linalg.svdvals(as_matrix(weight.double(), dim))[0]
