"""The "torch" backend: plain PyTorch, any device (docs/design.md#iteration-orders).

The backend computes in float32 for float16/bfloat16 weights (float64 stays
float64), keeps u and v in the weight's dtype, and takes sigma from the last
norm of the power iteration instead of a third matrix-vector product:

    "vu": sigma = u . (W v) = |W v|^2 / max(|W v|, eps)
    "uv": sigma = v . (W^T u) = |W^T u|^2 / max(|W^T u|, eps)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import Backend, accumulation_dtype, composed_eager, define_ops, differentiable, without_autocast


def why_not(device: torch.device, auto: bool = False) -> str | None:
    """The torch backend runs wherever PyTorch does (on CUDA devices when CUDA is available)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def as_matrix(weight: Tensor, dim: int) -> Tensor:
    """The (m, n) matrix view: ``dim`` moved to the front, the rest flattened
    (the same element order as PyTorch's ``permute(dim, *others).reshape(m, -1)``)."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.flatten(1) if weight.dim() > 1 else weight.reshape(weight.shape[0], -1)  # flatten: 0 rows too


def outer_like(u: Tensor, v: Tensor, weight: Tensor, dim: int) -> Tensor:
    """u v^T laid out like ``weight`` (the inverse of ``as_matrix``)."""
    shape = list(weight.shape)
    shape.insert(0, shape.pop(dim))
    return torch.outer(u, v).reshape(shape).movedim(0, dim)


def normalize_step(x: Tensor, previous: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / max(|x|, eps), |x|^2 / max(|x|, eps)): the new vector and x . new vector.

    A step whose norm is zero or not finite (a zero or non-finite weight) keeps the
    previous vector, so u and v recover once the weight is finite again; the choice
    is a tensor op, not a host synchronisation.
    """
    norm = torch.linalg.vector_norm(x)
    denom = norm.clamp_min(eps)
    accept = torch.isfinite(norm) & (norm > 0)
    return torch.where(accept, x / denom, previous), norm * norm / denom


def power_iteration(W: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, order: str):
    """Run the power iteration on the matrix ``W``; return (u, v, sigma) without touching inputs."""
    for _ in range(n_power_iterations):
        if order == "vu":
            v, _ = normalize_step(W.t() @ u, v, eps)
            u, sigma = normalize_step(W @ v, u, eps)
        else:
            u, _ = normalize_step(W @ v, u, eps)
            v, sigma = normalize_step(W.t() @ u, v, eps)
    return u, v, sigma


def iterate_buffers(u: Tensor, v: Tensor, acc: torch.dtype, training: bool, iterate, evaluate):
    """The power iteration's use of the buffers u, v, in the accumulation dtype ``acc``: in training
    ``iterate(u_acc, v_acc) -> (u_acc, v_acc, sigma)`` and the new vectors copied into u, v; in eval
    sigma = ``evaluate(u_acc, v_acc)`` and u, v untouched.  Returns (sigma, u_acc, v_acc)."""
    ua, va = u.to(acc), v.to(acc)
    if training:
        ua, va, sigma = iterate(ua, va)
        u.copy_(ua)
        v.copy_(va)
    else:
        sigma = evaluate(ua, va)
    return sigma, ua, va


def safe_sigma(sigma: Tensor) -> Tensor:
    """sigma, or +inf where sigma == 0: a zero weight normalizes to 0 (and gets a zero
    gradient) instead of 0/0 = NaN."""
    return torch.where(sigma == 0, torch.full_like(sigma, float("inf")), sigma)


@without_autocast
def _power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """Plain-PyTorch power iteration: updates u, v in place (training); returns (sigma, u, v copies).
    Runs under ``composed_eager``'s no_grad, or as the custom op's kernel, below autograd."""
    W = as_matrix(weight, dim).to(accumulation_dtype(weight.dtype))
    sigma, _, _ = iterate_buffers(u, v, W.dtype, training,
                                  lambda a, b: power_iteration(W, a, b, n_power_iterations, eps, order),
                                  lambda a, b: torch.dot(a, W @ b))
    return sigma, u.clone(), v.clone()


def _normalize_weight(weight, u, v, sigma, dim):
    """W / sigma, divided in the accumulation dtype (0 where sigma == 0)."""
    return (weight.to(sigma.dtype) / safe_sigma(sigma)).to(weight.dtype)


@without_autocast
def backward(grad, weight, u, v, sigma, dim):
    """grad_W = (G - <G, W> / sigma * u v^T) / sigma, in plain torch ops.

    Differentiable itself (create_graph=True): sigma is re-attached to W through
    d sigma / dW = u v^T, so double backward is exact with u, v held constant.
    """
    acc = sigma.dtype
    sigma = safe_sigma(sigma)
    G, W = grad.to(acc), weight.to(acc)
    uvT = outer_like(u.to(acc), v.to(acc), weight, dim)
    if torch.is_grad_enabled() and W.requires_grad:
        sigma = sigma + (uvT * (W - W.detach())).sum()  # same value, gradient u v^T
    c = (G * W).sum() / sigma
    return ((G - c * uvT) / sigma).to(weight.dtype)




def complex_spectral_normalize(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float,
                               dim: int, order: str, training: bool) -> tuple[Tensor, Tensor]:
    """Complex weights, as ``torch.nn.utils.parametrizations.spectral_norm``: power iteration
    with conjugate transposes (u, v updated in place), then W / sigma with sigma = u^H W v
    differentiated by autograd (u, v constants; a complex sigma, as PyTorch's).  Returns
    (W / sigma, real part of sigma, detached); a zero sigma divides by 1 (a zero weight stays 0)."""
    W = as_matrix(weight, dim)
    if training:
        with torch.no_grad():
            Wd = W.detach()
            uu, vv = u, v
            for _ in range(n_power_iterations):
                if order == "vu":
                    vv = normalize_step(Wd.mH @ uu, vv, eps)[0]
                    uu = normalize_step(Wd @ vv, uu, eps)[0]
                else:
                    uu = normalize_step(Wd @ vv, uu, eps)[0]
                    vv = normalize_step(Wd.mH @ uu, vv, eps)[0]
            u.copy_(uu)
            v.copy_(vv)
    # copies: a later call updates the buffers in place before this graph's backward runs
    sigma = torch.vdot(u.clone(), W @ v.clone())
    weight_sn = weight / torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    return weight_sn, sigma.detach().real


def exact_top_singular(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sigma_1, u_1, v_1) of a matrix by SVD, in its dtype (computed in float32 or better)."""
    work = mat.detach().to(torch.promote_types(mat.dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return S[0].to(mat.dtype), U[:, 0].contiguous().to(mat.dtype), Vh[0].contiguous().to(mat.dtype)


_power_iteration_op, _normalize_op = define_ops("torch", _power_iteration, _normalize_weight, backward)

backend = Backend(
    name="torch", device_types=("*",), why_not=why_not,
    power_iteration=_power_iteration_op, normalize=_normalize_op, backward=backward,
    eager=composed_eager(_power_iteration, differentiable(_normalize_weight, backward, backward),
                         traced_by=(_power_iteration_op, _normalize_op)),
    ops=(_power_iteration_op, _normalize_op),
)
