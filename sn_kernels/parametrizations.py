"""Drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

A real ``torch.nn.utils.parametrize`` parametrization with PyTorch's buffer
names (``parametrizations.weight.original``, ``parametrizations.weight.0._u``,
``._v``), its initialisation (15 power iterations) and its iteration order
("uv"), computed by ``sn_kernels.spectral_normalize``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import conv_norm
from .backends.pytorch import as_matrix, exact_top_singular
from .certified import Certifier, OperatorBound, operator_bound
from .checks import (INIT_ITERATIONS, call_iterations, check_bound, check_mode, check_not_lazy, check_variant,
                     check_weight_args, default_dim, front_end_iterations, take_pending)
from .find import TorchSpectralNorm
from .functional import spectral_normalize
from .meta import guard_if_meta

__all__ = ["spectral_norm", "SpectralNormParametrization", "TorchSpectralNorm"]


class SpectralNormParametrization(nn.Module):
    """The parametrization module: ``forward(W) = W / sigma(W)``."""

    sn_kind = "param"
    coeff: float | None = None
    soft: bool = False
    pending: Tensor | None = None  # W/sigma computed ahead by sn_kernels.group, used by the next access
    certifier: Certifier | None = None  # bound="upper"/"operator" (sn_kernels/certified.py); None: sigma_hat

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 *, coeff: float | None = None, soft: bool = False, gain: bool = False, bound: str = "estimate",
                 bound_every: int = 1, operator: OperatorBound | None = None) -> None:
        super().__init__()
        n_power_iterations = front_end_iterations(n_power_iterations)
        self.dim = check_weight_args(weight, n_power_iterations, eps, dim)
        check_variant(weight, coeff, soft, bool(gain))
        if check_bound(bound, bound_every, weight, gain=gain):
            # bound="operator" without ``operator``: the weight's own matrix (more dims are refused)
            self.certifier = Certifier.make(bound, bound_every, weight, operator)
        ndim = weight.ndim
        self.eps = eps
        self.coeff, self.soft = coeff, soft
        self.gain = None
        # with a gain, gamma, u and v start at the exact top singular triple: wrapping leaves the output unchanged
        top = exact_top_singular(as_matrix(weight.detach(), self.dim)) if gain and ndim > 1 else None
        if gain:
            gamma = torch.linalg.vector_norm(weight.detach()) if ndim == 1 else top[0]
            self.gain = nn.Parameter(gamma.to(weight.dtype))
        self.sigma: Tensor | None = None  # latest sigma (detached), not in the state_dict
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            h, w = as_matrix(weight, self.dim).shape
            # same draws, in the same order, as PyTorch: seeded runs give identical u, v
            u = weight.new_empty(h).normal_(0, 1)
            v = weight.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            with torch.no_grad():
                spectral_normalize(weight.detach(), self._u, self._v, n_power_iterations=INIT_ITERATIONS,
                                   eps=self.eps, dim=self.dim, order="uv")
                if top is not None:
                    self._u.copy_(top[1])
                    self._v.copy_(top[2])

    def forward(self, weight: Tensor) -> Tensor:
        # a grouped pre-computation (sn_kernels.group) is used once, then it is per access again
        pending = take_pending(self)
        return self.compute(weight) if pending is None else pending

    @property
    def bound(self):
        """What the weight is divided by: "estimate" (sigma_hat), or a certified "upper" / "operator" bound.

        Settable: a subclass of PyTorch's ``_SpectralNorm`` (ours while patched) may keep its own ``bound``
        (SNGP's bounded spectral norm does); that value is returned from then on, and ours is unchanged."""
        if "_own_bound" in self.__dict__:
            return self.__dict__["_own_bound"]
        return "estimate" if self.certifier is None else self.certifier.bound

    @bound.setter
    def bound(self, value) -> None:
        self.__dict__["_own_bound"] = value

    # PyTorch's _SpectralNorm helpers, with its semantics: subclasses of _SpectralNorm (ours while patched)
    # and code reaching into parametrizations.weight[0] call them

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        """The (m, n) matrix view of ``weight`` (``self.dim`` first), as PyTorch's."""
        if weight.ndim <= 1:
            raise AssertionError(f"Expected weight to have more than 1 dimension, got {weight.ndim}")
        return as_matrix(weight, self.dim)

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        """``n_power_iterations`` steps of PyTorch's power iteration on ``weight_mat`` ("uv" order, in its
        dtype), updating the buffers ``_u``, ``_v`` in place."""
        if weight_mat.ndim <= 1:
            raise AssertionError(f"Expected weight_mat to have more than 1 dimension, got {weight_mat.ndim}")
        u, v = self._u, self._v
        for _ in range(n_power_iterations):
            F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps, out=u)
            F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=self.eps, out=v)

    def compute(self, weight: Tensor) -> Tensor:
        """W / sigma(W) (one power iteration in training mode)."""
        if self.certifier is not None:
            buffers = self._buffers
            iterations, training = call_iterations(getattr(self, "n_power_iterations", 1), self.training)
            weight_sn, sigma = self.certifier.normalize(
                weight, buffers.get("_u"), buffers.get("_v"), n_power_iterations=iterations,
                eps=self.eps, dim=self.dim, order="uv", training=training, coeff=self.coeff, soft=self.soft)
            self.__dict__["sigma"] = sigma
            return weight_sn
        if weight.ndim == 1 and self.coeff is None:
            # a vector's spectral norm is its length: exact, as in PyTorch
            out = F.normalize(weight, dim=0, eps=self.eps)
            return out if self.gain is None else out * self.gain
        if weight.ndim == 1:
            raise NotImplementedError("coeff is not supported for 1-D weights")
        # runs on every access of the parametrized weight: buffers read from _buffers and sigma stored
        # in __dict__ directly (what nn.Module's __getattr__/__setattr__ do, minus their generic lookups)
        buffers = self._buffers
        u, v = buffers.get("_u"), buffers.get("_v")
        if u is None or v is None:  # not registered (yet): the attribute lookup raises as before
            u, v = self._u, self._v
        iterations, training = call_iterations(self.n_power_iterations, self.training)
        weight_sn, sigma = spectral_normalize(
            weight, u, v, n_power_iterations=iterations, eps=self.eps,
            dim=self.dim, order="uv", training=training, coeff=self.coeff, soft=self.soft, gain=self.gain,
        )
        # None: batched by vmap (transforms.py); sigmas() then recomputes it from u, v
        self.__dict__["sigma"] = sigma.detach() if sigma is not None and sigma.requires_grad else sigma
        return weight_sn

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.__dict__["sigma"] = None  # sigmas() computes it from the loaded state
        if self.certifier is not None:  # a loaded weight: the next forward refreshes the bound
            self.certifier.invalidate()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, n_power_iterations={getattr(self, 'n_power_iterations', None)}"


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, coeff: float | None = None, soft: bool = False,
                  gain: bool = False, bound: str = "estimate", bound_every: int = 1, mode: str = "matrix",
                  **conv_options) -> nn.Module:
    """Register a spectral-norm parametrization on ``module.<name>``.

    Same signature, defaults, state_dict keys and numbers as
    ``torch.nn.utils.parametrizations.spectral_norm``; undo with
    ``torch.nn.utils.parametrize.remove_parametrizations``.  Variants as in
    ``sn_kernels.spectral_norm``: ``coeff``, ``soft``, ``gain`` (the trainable
    scalar is ``parametrizations.<name>.0.gain``), ``mode="conv"``, and ``bound="upper"``
    or ``"operator"`` (a certified divisor of the matrix view or of the layer's operator,
    refreshed every ``bound_every`` training forwards).
    """
    check_bound(bound, bound_every, gain=gain, mode=mode)
    if check_mode(mode, dim, coeff, soft, gain, conv_options):
        return conv_norm.spectral_norm_conv(module, name, n_power_iterations, eps, api="parametrization",
                                            **conv_options)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    check_not_lazy(weight)
    # a second spectral norm on the same parameter stacks, as PyTorch's does (W / sigma1 / sigma2)
    if dim is None:
        dim = default_dim(module)
    operator = operator_bound(module, name, weight) if bound == "operator" else None
    parametrize.register_parametrization(
        module, name, SpectralNormParametrization(weight, n_power_iterations, dim, eps, coeff=coeff, soft=soft,
                                                  gain=gain, bound=bound, bound_every=bound_every,
                                                  operator=operator))
    if weight.ndim > 1 or gain:  # a vector has no u, v, but its gain is uninitialised after to_empty() too
        guard_if_meta(module, f"parametrizations.{name}.{len(module.parametrizations[name]) - 1}._u", weight)
    return module


# the name under which models pickled before 0.1.0's restructure refer to the class
_SpectralNorm = SpectralNormParametrization
