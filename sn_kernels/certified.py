"""Spectral normalization by a certified upper bound: ``bound="upper"``.

Power iteration estimates sigma from below, so W / sigma_hat can have a spectral norm
above 1.  With ``bound="upper"`` the front ends divide by a number B that is certified
to be >= sigma(W) instead, so that the normalized weight

    W_sn = coeff * W / B          (soft=True: W / max(1, B / coeff))

has spectral norm <= coeff at every forward, training and eval, the first included.
sigma is that of the matrix view (``dim`` first, the rest flattened), not the operator
norm of a convolution (docs/lipschitz.md).

B comes from two host-free computations, every ``bound_every`` training forwards the
first, in between the second:

* refresh: the Gram-iteration bound (Delattre et al., ICML 2023) of W in float64,
  ``GRAM_STEPS`` steps, with the rounding accounting of ``sn_kernels.bounds`` (its
  ``_rescale``/``_unwind``/``_fro_up``, run with p clamped instead of checked, so that
  nothing is read back to the host) and its final margin ``_margin``.  W_ref := W and
  B_ref := that bound are kept.
* carry (Weyl's inequality): sigma(W) <= sigma(W_ref) + ||W - W_ref||_2
  <= B_ref + ||W - W_ref||_F, the Frobenius norm computed in float64 from the difference
  taken in the weight's dtype (one rounding per entry, relative u of that dtype, covered by
  the factor 1 / (1 - 2 u)) and bounded by ``bounds._inflate``; every scalar step rounded up.

The carry holds for ANY pair (W_ref, B_ref) with B_ref >= sigma(W_ref): a W_ref that no
longer resembles W (a checkpoint loaded in place, a write through ``.data``) makes B
loose, never wrong.  ``Certifier.invalidate`` (called on load_state_dict; copies and
pickles drop the pair; a change of device or dtype is seen) makes the next forward
refresh, for tightness.

The final rounding of W_sn: W_sn = fl(W fl(coeff / B')), each entry off by a relative
delta (the division in float64, the factor's cast to the accumulation dtype, the product
and the cast to the weight's dtype) plus the subnormal spacing eta, so
||W_sn||_2 <= coeff / B' sigma(W) (1 + delta sqrt(k)) + sqrt(m n) eta (k = min(m, n)).
The divisor is B' = B * ``output_factor``, which makes that <= coeff: the guarantee is
about the tensor actually stored, not about W / B in exact arithmetic.

Gradient: W_sn = coeff W / B(W), differentiated by autograd with B's gradient attached to
its certified value (the rounding steps ``nextafter`` have no derivative; the margins,
~1e-12 relative, are held constant):

* refresh: the Gram bound in exact arithmetic is the Schatten-2^(T+1) norm
  prod_t 2^(p_t / 2^(t-1)) ||G_T||_F^(1/2^T) (p_t piecewise constant), so
  dB = B / 2^T d log ||G_T||_F, through the T float64 matrix products (second derivatives too);
* carry: dB = (W - W_ref) / ||W - W_ref||_F (times the constant rounding factors), with
  W_ref and B_ref constants; at W = W_ref the subgradient 0 (what ``vector_norm`` gives).

Under ``torch.compile`` the refresh schedule is not followed: a Python step counter would
make dynamo recompile at every step, so every compiled training forward refreshes (eval
forwards carry from the last refresh).  Eager training follows ``bound_every``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.contract import accumulation_dtype, matrix_shape
from .backends.pytorch import as_matrix
from .bounds import _U, _fro_up, _inflate, _margin, _rescale, _unwind, _up
from .functional import spectral_normalize

__all__ = ["GRAM_STEPS", "Certifier", "gram_upper_bound", "output_factor"]

#: Gram steps of a refresh: the bound is within k^(1/2^11) of sigma (k the smaller side; 1.0034 for
#: k = 1024, 1.0024 for k = 128 in the worst case, a flat spectrum), much closer with a spectral gap
GRAM_STEPS = 10
_TINY = 2.0 ** -1022  # log of a zero Gram matrix: no gradient instead of -inf - (-inf)


def gram_upper_bound(mat: Tensor, steps: int = GRAM_STEPS) -> Tensor:
    """A certified upper bound on the largest singular value of the 2-D ``mat`` (real arithmetic,
    the rounding of every step accounted for): a 0-d float64 tensor on ``mat``'s device, computed
    without host synchronisation.  Differentiable: the gradient of the Gram bound in exact arithmetic
    (module docstring).  ``steps`` Gram steps on the smaller side; 0 gives the Frobenius norm."""
    if mat.dim() != 2:
        raise ValueError(f"gram_upper_bound takes a matrix, got a {mat.dim()}-d tensor")
    if mat.is_complex():
        raise TypeError("gram_upper_bound: complex matrices are not supported")
    x = mat.to(torch.float64)
    if x.shape[0] < x.shape[1]:
        x = x.mT  # G = x^T x is k x k, k the smaller side
    cur, chain = x.unsqueeze(0), []
    for _ in range(steps):
        h, p, e = _rescale(cur, checked=False)
        cur = h.mT @ h
        chain.append((p, e.detach()))
    with torch.no_grad():
        upper = _unwind(_fro_up(cur), chain, upper=True, checked=False)[0]
        upper = _up(upper * (1 + _margin(*mat.shape)))
    if not (torch.is_grad_enabled() and cur.requires_grad):
        return upper
    # B = exp(log ||G_T||_F / 2^T + c) in exact arithmetic: exp of the change (1 in value) gives its
    # gradient and second derivative at the certified value
    log_fro = torch.log(torch.linalg.vector_norm(cur).clamp_min(_TINY))
    return upper * torch.exp((log_fro - log_fro.detach()) / 2 ** steps)


def output_factor(weight: Tensor, dim: int, coeff: float) -> float:
    """The factor f >= (1 + delta sqrt(k)) / (1 - sqrt(m n) eta / coeff) by which the bound is raised
    so that the rounded W_sn = fl(W fl(coeff / (f B))) still has spectral norm <= coeff (module
    docstring); from the weight's dtype and shape only (no tensor data)."""
    fd, fa = torch.finfo(weight.dtype), torch.finfo(accumulation_dtype(weight.dtype))
    m, n = matrix_shape(weight, dim)
    # (1 + u64)(1 + u_acc)^2 (1 + u_dtype) - 1, doubled for the higher-order terms
    delta = 2 * (_U + fa.eps + fd.eps / 2)
    eta = fd.smallest_normal * fd.eps + fa.smallest_normal * fa.eps  # two subnormal spacings
    room = 1 - math.sqrt(m * n) * eta / coeff
    if room < 0.5:
        raise ValueError(f"coeff={coeff} is too small for a certified {weight.dtype} weight of shape "
                         f"{tuple(weight.shape)}: its rounding to subnormals alone could exceed it")
    return math.nextafter((1 + delta * math.sqrt(min(m, n))) / room * (1 + 8 * _U), math.inf)


def _subtraction_factor(dtype: torch.dtype) -> float:
    """1 / (1 - 2 u) rounded up: fl(a - b) = (a - b)(1 + d), |d| <= 2 u (u of ``dtype``; 2 u: a half
    subtraction may round twice, through float32), so ||W - W_ref|| <= ||fl(W - W_ref)|| / (1 - 2 u)."""
    return math.nextafter(1 / (1 - torch.finfo(dtype).eps), math.inf)


class Certifier:
    """The state of ``bound="upper"`` for one weight: W_ref, B_ref >= sigma(W_ref) and the training
    forwards left before the next refresh.  Plain attributes, never in the state_dict; a copy or a
    pickle drops them (``__getstate__``), so its first forward refreshes."""

    def __init__(self, bound_every: int = 1) -> None:
        self.bound_every = bound_every
        self.invalidate()

    def invalidate(self) -> None:
        """Forget W_ref and B_ref: the next forward refreshes."""
        self.ref: Tensor | None = None  # W_ref: a detached copy (the weight's dtype and device)
        self.ref_bound: Tensor | None = None  # B_ref >= sigma(W_ref): 0-d float64, same device
        self.left = 0  # training forwards that carry before the next refresh
        self.estimate: Tensor | None = None  # the power iteration's sigma_hat (latest training forward)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(ref=None, ref_bound=None, left=0, estimate=None)
        return state

    def _valid_for(self, weight: Tensor) -> bool:
        ref = self.ref
        return (ref is not None and ref.shape == weight.shape and ref.dtype == weight.dtype
                and ref.device == weight.device)

    def divisor(self, weight: Tensor, dim: int, coeff: float, training: bool, keep: bool = True) -> Tensor:
        """B' = B * output_factor >= sigma(W) (1 + rounding), 0-d float64, differentiable; refreshes when
        due (``keep=False``: without storing anything)."""
        factor = output_factor(weight, dim, coeff)
        refresh = not self._valid_for(weight)
        if training and not refresh:
            refresh = torch.compiler.is_compiling() or self.left <= 0
        if refresh:
            bound = gram_upper_bound(as_matrix(weight, dim))
            if keep:
                self.ref, self.ref_bound = weight.detach().clone(), bound.detach()
                self.left = self.bound_every - 1
            with torch.no_grad():
                den = _up(bound.detach() * factor)
            return den if not bound.requires_grad else den * (bound / bound.detach())
        if training and keep:
            self.left -= 1
        sub = _subtraction_factor(weight.dtype)
        nrm = torch.linalg.vector_norm(weight - self.ref, dtype=torch.float64)
        with torch.no_grad():
            dist = _up(_inflate(nrm.detach(), weight.numel()) * sub)  # >= ||W - W_ref||_F
            den = _up(_up(self.ref_bound + dist) * factor)
        if not nrm.requires_grad:
            return den
        return den + (nrm - nrm.detach()) * (sub * factor)

    def normalize(self, weight: Tensor, u: Tensor | None, v: Tensor | None, *, n_power_iterations: int,
                  eps: float, dim: int, order: str, training: bool, coeff: float | None,
                  soft: bool) -> tuple[Tensor, Tensor]:
        """(W_sn, B'): the certified forward.  In training the power iteration runs as usual (u, v
        updated; its sigma_hat kept in ``estimate``); W_sn does not depend on it."""
        if training and u is not None:
            with torch.no_grad():
                self.estimate = spectral_normalize(weight.detach(), u, v, n_power_iterations=n_power_iterations,
                                                   eps=eps, dim=dim, order=order, training=True)[1]
        coeff = 1.0 if coeff is None else float(coeff)
        den = self.divisor(weight, dim, coeff, training)
        scale = coeff / den
        if soft:
            scale = scale.clamp(max=1.0)
        acc = accumulation_dtype(weight.dtype)
        return (weight.to(acc) * scale.to(acc)).to(weight.dtype), den.detach()
