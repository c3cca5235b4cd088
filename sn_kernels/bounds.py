"""Certified bounds on the spectral norm: ``sigma_bounds`` and ``lipschitz_bound``.

Power iteration (what spectral normalization runs) only estimates sigma, the largest
singular value, from below.  ``sigma_bounds`` returns a pair ``lower <= sigma <= upper``
that holds as stated, floating-point rounding included: everything is computed in
float64 (complex128 for spectra), every rounding error is bounded by the standard model
of floating-point arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*,
ch. 3: |fl(a op b) - a op b| <= u |a op b|, inner products of length n off by at most
gamma_n = n u / (1 - n u) times the same sum of absolute values), and the bound is
widened by it at each step, with every scalar step rounded outward (``nextafter``).

The pieces:

* upper bound of a matrix: Gram iteration (Delattre, Barthelemy, Araujo, Allauzen,
  ICML 2023): G_0 = W, G_t = G_{t-1}^H G_{t-1} after rescaling by a power of two near
  its Frobenius norm (exact; the exponents are the log of the scale), and
  sigma(W) <= prod_t 2^(p_t / 2^(t-1)) * ||G_t||_F^(1/2^t).  Optionally finished by an
  eigen-decomposition certificate (``_eig_finish``): a residual bound that makes
  ``eigh``'s answer rigorous, so the bound is the exact sigma to ~1e-12.
* lower bound: the Rayleigh quotient |u^T A v| with v from power iteration on the true
  operator and u = A v / ||A v||, i.e. ||A v|| / ||v||, with its rounding error
  subtracted.
* convolutions: the layer's operator is written as (selection) o (circular convolution
  on a grid, in polyphase form for strides) o (embedding); the circular part is block
  diagonal in the Fourier basis (Sedghi, Gupta, Long, ICLR 2019), so its norm is the
  largest sigma over frequencies of small C_out x C_in*s^d matrices (bounded as above),
  and the other two have exactly known norms.  See ``sigma_bounds``.

On top of the per-step accounting, the final pair is widened by the relative margin
``_margin(sizes)`` = max(2^-40, 4 (sum of sizes) u), the worst-case error of one more
sum as long as all the sizes involved.  The accounting is rigorous under the standard
model; this margin is belt and braces for what the model does not see (a libm
``sin``/``cos`` a few ulps worse than assumed, a BLAS or LAPACK routine off the model by a
small factor, the float64 SVD a user compares with) and costs nothing in practice: 1e-12
relative for matrices, 2e-10 for a 128-channel conv on 32x32 inputs.
"""
from __future__ import annotations

import math
import operator
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.pytorch import as_matrix
from .conv_norm import conv_adjoint, conv_apply, conv_spec, output_shape
from .find import sites

__all__ = ["sigma_bounds", "lipschitz_bound", "METHODS"]

#: the methods of ``sigma_bounds``
METHODS = ("auto", "gram", "fft", "exact")

_U = 2.0 ** -53  # unit roundoff of float64
_ABS = 2.0 ** -1000  # absolute slack per step: covers underflow (all values are scaled to O(1))
_INF = math.inf
_SMALLEST_NORMAL = sys.float_info.min  # a variable, so that Python cannot fold ``check_gradual_underflow``'s test
_MAX_GRAM = 40  # Gram steps at most (k^(1/2^41) - 1 < 1e-11 for any k a float64 matrix can have)
_SWITCH = 12  # 'auto'/'fft': Gram steps before the eigen-certificate takes over
_POWER_STEPS = 32  # power iterations for the lower bound at most, after the warm start
_AUTO_EIGH_SIDE = 1024  # 'auto' on a matrix: the eigen-certificate alone up to this smaller side
_EXACT_MAX_SIDE = 4096  # 'exact': the largest smaller side of the (dense or Jacobian) matrix
_AUTO_JACOBIAN = 1 << 18  # 'auto' on a conv: the exact route up to this many Jacobian entries
_EXACT_MAX_JACOBIAN = 1 << 22  # 'exact' on a conv: the most entries of its dense Jacobian
_CHUNK = 1 << 22  # spectra are bounded this many complex entries at a time

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ----------------------------------------------------------------------------- rounding


def check_gradual_underflow(what: str) -> None:
    """Refuse to certify while this thread's CPU flushes subnormal numbers to zero
    (``torch.set_flush_denormal(True)``: FTZ and DAZ on x86).  Every bound here accounts for rounding under
    gradual underflow; with subnormal inputs read as 0 and subnormal results flushed to 0, a weight of tiny
    entries is bounded as if they were zero, and a carry's tiny differences vanish, so a bound could fall
    below sigma.  A float64 operation in Python itself tells (it uses the same SSE control register)."""
    if _SMALLEST_NORMAL * 0.5 == 0.0:
        raise RuntimeError(f"sn_kernels: {what} cannot be certified while subnormal numbers are flushed to zero "
                           "(torch.set_flush_denormal(True)): the bounds' rounding model assumes gradual "
                           "underflow; call torch.set_flush_denormal(False) first")


def _gamma(n: int) -> float:
    """gamma_m = m u / (1 - m u) with m = 2 n + 8: Higham's gamma_n with n doubled (complex
    callers double n again), generous enough to cover any summation order or FMA use."""
    m = 2 * n + 8
    if m * _U > 1e-3:
        raise ValueError(f"too large for the rounding model ({n} terms)")
    return m * _U / (1 - m * _U)


def _margin(*sizes: int) -> float:
    """The final relative margin (see the module docstring)."""
    return max(2.0 ** -40, 4 * sum(sizes) * _U)


def _up(x: Tensor) -> Tensor:
    """The next float64 up: a correctly rounded result moved up is >= the exact result."""
    return torch.nextafter(x, torch.full_like(x, _INF))


def _dn(x: Tensor) -> Tensor:
    return torch.nextafter(x, torch.full_like(x, -_INF))


def _pow2(p: Tensor, checked: bool = True) -> Tensor:
    """2.0 ** p (float64, exactly) for an integer tensor p in [-1022, 1023] (``checked``: raise
    otherwise, a host synchronisation; the certified normalization clamps p itself instead)."""
    p = p.to(torch.int64)
    if checked and p.numel() and (p.min() < -1022 or p.max() > 1023):
        raise OverflowError("scale exponent out of range")
    return ((p + 1023) << 52).view(torch.float64)


def _vnorm(x: Tensor, dims) -> Tensor:
    """The 2-norm over ``dims`` (of the real and imaginary parts for complex x: the same number,
    many times faster than PyTorch's complex norm)."""
    if x.is_complex():
        dims = tuple(d - 1 if d < 0 else d for d in dims) + (-1,)
        x = torch.view_as_real(x.resolve_conj())
    return torch.linalg.vector_norm(x, dim=dims)


def _norm_up(x: Tensor, dims) -> Tensor:
    """An upper bound on the 2-norm (Frobenius norm) of ``x`` over ``dims`` (a sum of n squares: gamma_n)."""
    n = math.prod([x.shape[d] for d in dims]) * (2 if x.is_complex() else 1)
    return _inflate(_vnorm(x, dims).to(torch.float64), n)


def _inflate(norm: Tensor, n: int) -> Tensor:
    """An upper bound on a 2-norm of n real terms from ``norm``, its value computed in float64."""
    return _up(_up(norm * (1 + _gamma(n))) + _ABS)


def _norm_dn(x: Tensor, dims) -> Tensor:
    n = math.prod([x.shape[d] for d in dims]) * (2 if x.is_complex() else 1)
    return torch.clamp(_dn(_dn(_vnorm(x, dims).to(torch.float64) * (1 - _gamma(n))) - _ABS), min=0.0)


def _fro_up(x: Tensor) -> Tensor:
    return _norm_up(x, (-2, -1))


def _quotient_dn(y: Tensor, slack: Tensor, x: Tensor, dims) -> Tensor:
    """A certified lower bound on ||A x|| / ||x|| given y = fl(A x) and slack >= ||y - A x||."""
    num = torch.clamp(_dn(_norm_dn(y, dims) - slack), min=0.0)
    den = _norm_up(x, dims)
    return torch.where(den > 0, _dn(num / den), torch.zeros_like(num))


def _rayleigh_dn(y: Tensor, z: Tensor, x: Tensor, n_terms: int, dims) -> Tensor:
    """``_quotient_dn`` with z = fl(|A| |x|): |fl(A x) - A x| <= gamma_n |A| |x| entrywise (n terms per
    entry) and |A| |x| <= z / (1 - gamma_n), so ||y - A x|| <= gamma_n ||z|| / (1 - gamma_n)."""
    g = _gamma(2 * n_terms)
    return _quotient_dn(y, _up(_up(_norm_up(z, dims) * g) / (1 - g)), x, dims)


# ----------------------------------------------------------------------------- largest sigma of a batch

def _unwind(bound: Tensor, chain, upper: bool, checked: bool = True) -> Tensor:
    """sigma(G_{t-1}) <= 2^p_t sqrt(sigma(G_t) + e_t) (>= ... sqrt(sigma(G_t) - e_t)), from t = T down to 1."""
    for p, e in reversed(chain):
        if upper:
            bound = _up(torch.sqrt(_up(bound + e))) * _pow2(p, checked)
        else:
            bound = _dn(torch.sqrt(torch.clamp(_dn(bound - e), min=0.0))) * _pow2(p, checked)
    return bound


def _rescale(x: Tensor, checked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(x / 2^p, p, e) with 2^p near ||x||_F (exact scaling) and e >= ||fl(H^H H) - H^H H||_F for H = x / 2^p.
    Not ``checked``: p clamped to [-1022, 1022] instead of refused (no host synchronisation; the scaling
    stays an exact power of two, only no longer to O(1) for a weight beyond the float64 range)."""
    p = torch.frexp(_vnorm(x, (-2, -1))).exponent.to(torch.int64)
    if not checked:
        p = p.clamp(-1022, 1022)
    h = x * _pow2(-p, checked)[:, None, None]
    n = h.shape[-2] * (2 if h.is_complex() else 1)
    fh = _fro_up(h)
    return h, p, _up(_up(_up(fh * fh) * _gamma(n)) + _ABS)


def _oriented(mat: Tensor) -> tuple[Tensor, Tensor]:
    """(x, p0): ``mat`` in float64 with its smaller side last (G = x^T x is k x k, k the smaller side),
    scaled exactly by 2^-p0 to entries below 1 (no overflow in the first norms; what underflows is
    covered by the absolute slack, as in ``_scaled``), without reading anything back."""
    x = mat.to(torch.float64)
    x = x.mT if x.shape[0] < x.shape[1] else x
    p0 = torch.frexp(x.abs().amax()).exponent.to(torch.int64).clamp(-1022, 1022)
    return x * _pow2(-p0, checked=False), p0


def _eig_finish(x: Tensor) -> tuple[Tensor, Tensor]:
    """Certified upper bounds on sigma(x[b]) and the top eigenvectors of x^H x, by ``eigh`` plus a residual bound.

    With G = fl(H^H H) symmetrized to K (exactly Hermitian; ||K - H^H H||_F <= e), K Q = Q L + R and
    ||Q^H Q - I||_2 <= eta < 1: for x = Q y, x^H K x = y^H (Q^H Q) L y + y^H Q^H R y and ||x||^2 >= (1 - eta)||y||^2,
    so lambda_max(K) <= (l_max + eta max|l| + sqrt(1 + eta) ||R||) / (1 - eta) (no assumption on ``eigh``)."""
    h, p, e = _rescale(x)
    n = h.shape[-1] * (2 if h.is_complex() else 1)
    g = h.mH @ h
    k = (g + g.mH) / 2  # exactly Hermitian; the rounding of the average is <= u ||K||_F
    e = _up(e + _up(_fro_up(k) * _gamma(1)))
    lam, q = torch.linalg.eigh(k)
    fq = _fro_up(q)
    qq = q.mH @ q
    qq.diagonal(dim1=-2, dim2=-1).sub_(1)
    eta = _up(_up(_fro_up(qq) + _up(_up(fq * fq) * _gamma(n))) + _ABS)
    lam_abs = _up(lam.abs().amax(-1).to(torch.float64))
    r = k @ q - q * lam.unsqueeze(-2)
    rho = _up(_fro_up(r) + _up(_up(_up(_fro_up(k) * fq) * _gamma(n)) + _up(_up(fq * lam_abs) * _gamma(1))))
    num = _up(_up(_up(lam[..., -1].to(torch.float64) + _up(eta * lam_abs)) + _up(_up(torch.sqrt(_up(1 + eta))) * rho)))
    lam_max = _up(torch.clamp(num, min=0.0) / _dn(1 - eta))
    ub = _up(torch.sqrt(_up(lam_max + e))) * _pow2(p)
    ub = torch.where(eta < 0.5, ub, torch.full_like(ub, _INF))  # eigh failed: no certificate
    return ub, q[..., -1]


def _ray_batch(x: Tensor, c: Tensor, x_fro: Tensor) -> Tensor:
    """Certified lower bounds on sigma(x[b]) >= ||x[b] c[b]|| / ||c[b]|| (``x_fro`` >= ||x[b]||_F):
    ||fl(x c) - x c|| <= gamma_n || |x| |c| || <= gamma_n ||x||_F ||c||."""
    y = (x @ c.unsqueeze(-1)).squeeze(-1)
    slack = _up(_up(x_fro * _norm_up(c, (-1,))) * _gamma(2 * x.shape[-1]))
    return _quotient_dn(y, slack, c, (-1,))


@dataclass
class _Top:
    """Bounds on max_b sigma(M[b]): ``upper`` >= all, ``lower`` <= sigma(M[index]); ``vector``
    approximates the top right singular vector of M[index]."""

    upper: float
    lower: float
    index: int
    vector: Tensor
    left: Tensor | None = None  # M[index] @ vector (set for spectra)


def _top_sigma(m: Tensor, *, steps: int, adaptive: bool, finish: bool, rtol: float, floor: float = 0.0) -> _Top:
    """Certified bounds on max_b sigma_1(m[b]) for a batch m (B, p, q) scaled to O(1) entries.

    Gram iteration on the smaller side, at most ``steps`` steps; ``adaptive``: stop once
    upper <= (1 + rtol) lower; ``finish``: if not converged then, bound the remaining
    matrices with ``_eig_finish``.  Matrices whose upper bound falls below the best lower
    bound (or ``floor``, a certified lower bound on sigma of a matrix counted elsewhere)
    cannot hold the maximum and are dropped."""
    right = m.shape[-1] <= m.shape[-2]
    x = m if right else m.mH  # G = x^H x is k x k, k = min(p, q)
    b_all = x.shape[0]
    ub_all = torch.full((b_all,), _INF, dtype=torch.float64, device=m.device)
    idx = torch.arange(b_all, device=m.device)
    best = _Top(_INF, -1.0, 0, torch.zeros(0, device="cpu"))
    chain: list[tuple[Tensor, Tensor]] = []
    cur, xk, xk_fro = x, x, _fro_up(x)
    t, converged = 0, False
    while idx.numel():
        ub = _unwind(_fro_up(cur) if t else xk_fro, chain, upper=True)
        j = _vnorm(cur, (-2,)).argmax(-1)
        if t == 0:  # the unit vector of the largest column of x
            cand = torch.zeros(xk.shape[0], xk.shape[-1], dtype=x.dtype, device=x.device)
            cand[torch.arange(cand.shape[0]), j] = 1
        else:  # a column of G_t ~ (x^H x)^(2^(t-1)): about 2^(t-1) power iterations
            cand = cur[torch.arange(cur.shape[0]), :, j]
        lb = _ray_batch(xk, cand, xk_fro)
        ub_all[idx] = torch.minimum(ub_all[idx], ub)
        i = int(lb.argmax())
        if lb[i] > best.lower:
            best = _Top(_INF, float(lb[i]), int(idx[i]), cand[i])
        floor_now = max(floor, best.lower)
        top = float(ub_all[idx].max())
        converged = top <= (1 + rtol) * floor_now
        if (adaptive and converged) or t >= steps:
            break
        keep = ub_all[idx] >= floor_now
        idx, cur, xk, xk_fro = idx[keep], cur[keep], xk[keep], xk_fro[keep]
        chain = [(p[keep], e[keep]) for p, e in chain]
        h, p, e = _rescale(cur)
        cur = h.mH @ h
        chain.append((p, e))
        t += 1
    if finish and not converged and idx.numel():
        keep = ub_all[idx] >= max(floor, best.lower)
        idx, xk, xk_fro = idx[keep], xk[keep], xk_fro[keep]
        if idx.numel():
            ub, vec = _eig_finish(xk)
            ub_all[idx] = torch.minimum(ub_all[idx], ub)
            lb = _ray_batch(xk, vec, xk_fro)
            i = int(lb.argmax())
            if lb[i] > best.lower:
                best = _Top(_INF, float(lb[i]), int(idx[i]), vec[i])
    vec = best.vector if right else (x[best.index] @ best.vector)
    return _Top(float(ub_all.max()), max(best.lower, 0.0), best.index, vec)


# ----------------------------------------------------------------------------- weights and scaling

def _scaled(w: Tensor) -> tuple[Tensor, int]:
    """(w * 2^-E in float64/complex128, E) with max |w * 2^-E| in [0.5, 1): exact (two steps, so
    that 2^-E itself never overflows), but for entries that underflow, covered by _ABS."""
    w = w.detach().to(torch.complex128 if w.is_complex() else torch.float64)
    top = float(w.abs().max())
    e = math.frexp(top)[1]
    a = -e // 2
    return w * 2.0 ** a * 2.0 ** (-e - a), e


def _unscale(lower: float, upper: float, e: int, margin: float) -> tuple[float, float]:
    """(lower, upper) * 2^e, widened by ``margin`` and rounded outward."""
    lo = math.nextafter(lower * (1 - margin), -_INF)
    hi = math.nextafter(upper * (1 + margin), _INF)
    lo, hi = max(lo, 0.0), hi
    try:
        hi = math.ldexp(hi, e)
    except OverflowError:
        hi = _INF
    try:
        lo = math.ldexp(lo, e)
    except OverflowError:  # sigma beyond the float64 range: the largest float is still below it
        lo = sys.float_info.max
    # ldexp rounds (to nearest) only into the subnormal range: step outward once more
    if 0 < hi < 2.0 ** -1022:
        hi = math.nextafter(hi, _INF)
    if 0 < lo < 2.0 ** -1022:
        lo = math.nextafter(lo, 0.0)
    return lo, hi


def _check_weight(w: Tensor, what: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{what}: expected a Tensor, got {type(w).__name__}")
    if not (w.is_floating_point() or w.is_complex()):
        raise TypeError(f"{what}: expected a floating-point weight, got {w.dtype}")
    if w.dim() == 0:
        raise ValueError(f"{what}: a 0-d tensor has no matrix view")
    if w.numel() == 0:
        raise ValueError(f"{what}: empty weight of shape {tuple(w.shape)}")
    if w.is_meta:
        raise ValueError(f"{what}: a meta tensor has no values to bound; load or materialize the weight first")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: the weight has non-finite entries")


_MISSING = object()
_WeightNorm = sys.modules["torch.nn.utils.weight_norm"].WeightNorm  # the attribute is the function of that name


@torch.no_grad()
def _eval_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """``module.<name>`` as the layer computes it in eval mode: W / sigma from the current u, v
    for a spectrally normalized layer (either API, ours or PyTorch's), g v / ||v|| from the current
    g, v for torch.nn.utils.weight_norm, without changing any state (training flags, buffers and the
    logged sigma are restored)."""
    found = sites(module, name)
    if not found:
        for hook in module._forward_pre_hooks.values():
            # the hook-based weight_norm: module.<name> is whatever its last forward left; the next uses g, v now
            if isinstance(hook, _WeightNorm) and hook.name == name:
                return hook.compute_weight(module).detach()
        w = getattr(module, name, None)
        if not isinstance(w, Tensor):
            raise ValueError(f"{type(module).__name__} has no weight to bound")
        return w.detach()
    training = {m: m.training for m in module.modules()}
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    logged = [(s.state, s.state.__dict__.get("sigma", _MISSING)) for s in found]
    # a certified layer's refresh state (W_ref, B_ref, forwards left): an eval computation before its first
    # forward would set it, and so move its refresh schedule
    certifiers = [(c, c.__dict__.copy()) for c in (getattr(s.state, "certifier", None) for s in found)
                  if c is not None]
    try:
        module.eval()
        hook = next((s for s in found if s.api == "hook"), None)
        try:
            w = hook.state.compute_weight(module, False) if hook is not None else getattr(module, name)
        except RuntimeError as err:
            raise ValueError(f"{type(module).__name__}: cannot compute its spectrally normalized weight ({err}); "
                             f"run one forward first") from err
        return w.detach().clone()
    finally:
        for m, flag in training.items():
            m.training = flag
        for k, b in module.named_buffers():
            if k in buffers and buffers[k].shape == b.shape:
                b.copy_(buffers[k])
        for state, value in logged:
            if value is _MISSING:
                state.__dict__.pop("sigma", None)
            else:
                state.__dict__["sigma"] = value
        for certifier, saved in certifiers:
            certifier.__dict__.clear()
            certifier.__dict__.update(saved)


# ----------------------------------------------------------------------------- matrices

def _config(method: str, n_iter: int | None) -> dict:
    """Gram steps / adaptivity / eigen-certificate for a method."""
    if method == "exact":
        return dict(steps=0, adaptive=True, finish=True)
    if method == "gram":
        return dict(steps=_MAX_GRAM if n_iter is None else n_iter, adaptive=n_iter is None, finish=False)
    return dict(steps=_SWITCH if n_iter is None else n_iter, adaptive=True, finish=True)


def _power_lower(apply, adjoint, apply_abs, x: Tensor, n_terms: int) -> float:
    """Power iteration on A^T A from ``x`` (until ||A x|| / ||x|| grows by less than 1e-7 relative, at
    most ``_POWER_STEPS`` steps), then the certified ||A x|| / ||x||."""
    last = 0.0
    for _ in range(_POWER_STEPS):
        nx = _vnorm(x, tuple(range(x.dim())))
        if not nx > 0:
            break
        y = apply(x / nx)
        est = float(_vnorm(y, tuple(range(y.dim()))))
        if est <= last * (1 + 1e-7):
            break
        last = est
        x = adjoint(y)
    dims = tuple(range(x.dim()))
    return float(_rayleigh_dn(apply(x), apply_abs(x.abs()), x, n_terms, dims))


def _matrix_bounds(w: Tensor, method: str, n_iter: int | None, rtol: float) -> tuple[float, float]:
    mat = as_matrix(w, 0)
    if method == "fft":
        raise ValueError("method='fft' bounds convolutions; for a matrix use 'auto', 'gram' or 'exact'")
    if method == "exact" and min(mat.shape) > _EXACT_MAX_SIDE:
        raise ValueError(f"method='exact' is for matrices with a side <= {_EXACT_MAX_SIDE}; got {tuple(mat.shape)} "
                         f"(use 'gram' or 'auto')")
    if method == "auto" and n_iter is None and min(mat.shape) <= _AUTO_EIGH_SIDE:
        method = "exact"  # cheaper than the Gram steps at this size (benchmarks/results/cpu_bounds.csv), and tighter
    top = _top_sigma(mat.unsqueeze(0), rtol=rtol, **_config(method, n_iter))
    lower = _power_lower(lambda v: mat @ v, lambda y: mat.mH @ y, lambda v: mat.abs() @ v, top.vector,
                         mat.shape[1] * (2 if mat.is_complex() else 1))
    return max(lower, top.lower), top.upper


# ----------------------------------------------------------------------------- convolutions

@dataclass
class _Axis:
    """One spatial dim of the circular embedding of a forward convolution (see ``sigma_bounds``)."""

    grid: int  # N' = N / s_p: the polyphase grid
    phases: int  # s_p
    q: list[int]  # tap i sits at offset q[i] on the polyphase grid ...
    r: list[int]  # ... of phase r[i]
    pos: list[int]  # grid index of each input position (for the warm start)
    t_out: list[int]  # polyphase output index of each output position used
    factor2: int  # (max times an output reads the same circular output) * (max copies of an input)

    @property
    def constant(self) -> bool:
        """At most one tap per phase: the spectrum is K' D(omega), D unitary diagonal, the same
        singular values at every frequency, so omega = 0 alone is needed."""
        return max(Counter(self.r).values()) <= 1


def _copies(mode: str, n: int, pl: int, pr: int) -> int:
    """The most times F.pad(mode) copies one input element (``||P||^2`` of the pad map, a 0/1 copy matrix)."""
    counts = Counter()
    for j in range(-pl, n + pr):
        if mode == "reflect":
            src = -j if j < 0 else (2 * (n - 1) - j if j >= n else j)
        else:  # replicate
            src = min(max(j, 0), n - 1)
        counts[src] += 1
    return max(counts.values())


def _axis(mode: str, n: int, k: int, dil: int, s: int, pl: int, pr: int, used: int) -> _Axis:
    """The embedding of one dim: input size n, kernel k, dilation, stride s, padding (pl, pr) of
    ``mode``, ``used`` outputs (of the forward conv's natural (n + pl + pr - ke) // s + 1)."""
    ke = dil * (k - 1) + 1
    if mode == "circular":  # the padded input is n-periodic: the grid is n; output j reads (j s - pl) mod n
        grid, off, start, copies = n, -pl, 0, 1
    else:
        if mode == "zeros":  # smallest grid on which each output reads zeros where the padded input has them
            grid, copies = max(n + max(pl, pr), n + pl + pr - ke + 1), 1
        else:  # reflect / replicate: the padded input, as it is, on a grid without wrap-around
            grid, copies = n + pl + pr, _copies(mode, n, pl, pr)
        grid = -(-grid // s) * s  # a multiple of the stride: polyphase form
        off, start = 0, pl
    sp = math.gcd(s, grid)
    b = off % sp
    taps = [b + dil * i for i in range(k)]
    t_out = [((j * s + off - b) // sp) % (grid // sp) for j in range(used)]
    return _Axis(grid // sp, sp, [o // sp for o in taps], [o % sp for o in taps],
                 [start + m for m in range(n)], t_out, max(Counter(t_out).values()) * copies)


@dataclass
class _Embedding:
    weight: Tensor  # (g, c_out, c_in, *k): the forward conv whose norm bounds the layer's
    axes: list[_Axis]
    transposed: bool  # the layer is the adjoint of this conv (restricted to the outputs used)
    in_shape: tuple[int, ...]  # the layer's input shape (1, C, *spatial)


def _embedding(spec, w: Tensor, in_shape, out_shape) -> _Embedding:
    """The circular embedding of the layer's operator A (see ``sigma_bounds``)."""
    nd = spec.ndim
    k = spec.kernel_size
    if spec.transposed:  # A = (crop o C)^T with C the conv of the same weight on A's output size
        n, used = out_shape[2:], in_shape[2:]
        pads = [(p, p) for p in spec.padding]
        mode = "zeros"
    else:
        n, used = in_shape[2:], out_shape[2:]
        pad, conv_pad = spec.explicit_pad()
        pads = [((pad[2 * (nd - 1 - d)] if pad else 0) + conv_pad[d], (pad[2 * (nd - 1 - d) + 1] if pad else 0)
                 + conv_pad[d]) for d in range(nd)]
        mode = spec.padding_mode
    axes = [_axis(mode, n[d], k[d], spec.dilation[d], spec.stride[d], *pads[d], used[d]) for d in range(nd)]
    g = spec.groups
    wg = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    return _Embedding(wg, axes, spec.transposed, tuple(in_shape))


def _phase_matrices(axes: list[_Axis], device) -> list[Tensor]:
    """Per dim: Phi[omega, r, i] = exp(2 pi i omega q_i / N') where tap i has phase r (else 0).

    Frequencies: all of them, but one dim (the last with more than one) keeps only
    omega <= N'/2 (a real kernel's spectrum at -omega is the conjugate), and a dim with
    at most one tap per phase keeps omega = 0 alone (``_Axis.constant``)."""
    n_freq = [1 if a.constant else a.grid for a in axes]
    half = max((d for d in range(len(axes)) if n_freq[d] > 1), default=None)
    phis = []
    for d, a in enumerate(axes):
        count = n_freq[d] // 2 + 1 if d == half else n_freq[d]
        omega = torch.arange(count, device=device)[:, None]
        q = torch.tensor(a.q, device=device)[None, :]
        angle = (omega * q % a.grid).to(torch.float64) * (2 * math.pi / a.grid)  # exact integers, then one rounding
        phase = torch.polar(torch.ones_like(angle), angle)  # (count, k)
        onehot = F.one_hot(torch.tensor(a.r, device=device), a.phases).T.to(torch.complex128)  # (s_p, k)
        phis.append(phase[:, None, :] * onehot[None, :, :])
    return phis


def _spectrum(wg: Tensor, phis: list[Tensor]) -> Tensor:
    """The matrices K'(omega) of the polyphase circular conv: (g * prod(freqs), c_out, c_in * prod(phases))."""
    x = wg.to(torch.complex128)
    for phi in phis:  # contract the next kernel dim (always dim 3); its (omega, phase) go to the end
        x = torch.tensordot(x, phi, dims=([3], [2]))
    nd = len(phis)
    perm = [0] + [3 + 2 * d for d in range(nd)] + [1, 2] + [4 + 2 * d for d in range(nd)]
    x = x.permute(perm)
    g, co, ci = wg.shape[:3]
    return x.reshape(-1, co, ci * math.prod(p.shape[1] for p in phis))


def _dft_error(wg: Tensor, axes: list[_Axis]) -> float:
    """A bound on ||K'_computed(omega) - K'(omega)||_2 for every omega: entrywise the DFT sums are off by at
    most delta sum_i |K_i| (delta: 64 u per twiddle factor, cos/sin and the angle's rounding, and gamma
    of each dim's sum, doubled for the products), so by at most delta ||sum_i |K_i| ||_F."""
    delta = 2 * sum(64 * _U + _gamma(2 * len(a.q)) for a in axes)
    s = wg.abs().flatten(3).sum(-1).flatten()  # sum_i |K_i| per (group, c_out, c_in)
    s_up = _up(_norm_up(s, (0,)) * (1 + _gamma(wg[0, 0, 0].numel())))
    return float(_up(s_up * delta))


def _circular_top(emb: _Embedding, method: str, n_iter: int | None, rtol: float) -> tuple[float, _Top, tuple]:
    """max over frequencies of sigma(K'(omega)), bounded by chunks of frequencies; returns
    (upper bound incl. the DFT error, the best _Top, (group, omega) of the best)."""
    wg, axes = emb.weight, emb.axes
    phis = _phase_matrices(axes, wg.device)
    g, co, ci = wg.shape[:3]
    per_freq = co * ci * math.prod(a.phases for a in axes)
    rest = math.prod(p.shape[0] for p in phis[1:])
    step = max(1, _CHUNK // max(1, g * rest * per_freq))
    cfg = _config(method, n_iter)
    upper, best, where = -_INF, None, None
    for a in range(0, phis[0].shape[0], step):
        chunk = [phis[0][a:a + step]] + phis[1:]
        spec = _spectrum(wg, chunk)
        top = _top_sigma(spec, rtol=rtol, floor=best.lower if best else 0.0, **cfg)
        upper = max(upper, top.upper)
        if best is None or top.lower > best.lower:
            loc = torch.unravel_index(torch.tensor(top.index, device="cpu"), (g,) + tuple(p.shape[0] for p in chunk))
            best, where = top, (int(loc[0]), (int(loc[1]) + a,) + tuple(int(v) for v in loc[2:]))
            best.left = spec[top.index] @ top.vector
    return float(_up(torch.tensor(upper + _dft_error(wg, axes), dtype=torch.float64, device="cpu"))), best, where


def _plane_wave(emb: _Embedding, best: _Top, where) -> Tensor:
    """A real start vector for the power iteration: the plane wave of the best frequency carrying its
    top singular vector (right one for a conv, left one for a transposed conv), on the layer's input."""
    wg, axes = emb.weight, emb.axes
    group, omega = where
    g, co, ci = wg.shape[:3]
    x = torch.zeros(emb.in_shape, dtype=torch.complex128, device=wg.device)
    waves = []
    for a, w in zip(axes, omega):
        t = torch.tensor(a.t_out if emb.transposed else [p // a.phases for p in a.pos], device=wg.device)
        waves.append(torch.exp(2j * math.pi * w * t.to(torch.float64) / a.grid))
    signal = best.left.reshape(co, *([1] * len(axes))) if emb.transposed else None
    if not emb.transposed:
        v = best.vector.reshape(ci, *[a.phases for a in axes])
        phase_idx = torch.meshgrid(*[torch.tensor([p % a.phases for p in a.pos], device=wg.device) for a in axes],
                                   indexing="ij")
        signal = v[(slice(None),) + tuple(phase_idx)]
    for d, wave in enumerate(waves):
        shape = [1] * (len(axes) + 1)
        shape[d + 1] = -1
        signal = signal * wave.reshape(shape)
    width = co if emb.transposed else ci
    x[0, group * width:(group + 1) * width] = signal
    theta = torch.angle((x * x).sum()) / 2  # the phase that makes Re(x) largest
    return (x * torch.exp(-1j * theta)).real


def _sizes(input_shape, what: str) -> tuple[int, ...]:
    """``input_shape`` (an int, or a sequence of ints of any integer type) as a tuple of sizes >= 0.  A float or
    str size is refused, not truncated: 8.9 would bound the operator at 8, not the one asked for."""
    try:
        shape = tuple(operator.index(s) for s in ((input_shape,) if isinstance(input_shape, int) else input_shape))
    except TypeError:
        raise TypeError(f"{what}: input_shape must be an int or a sequence of ints, got {input_shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{what}: input_shape {shape} has a negative size")
    return shape


def _conv_input_shape(module: nn.Module, spec, w: Tensor, input_shape) -> tuple[int, ...]:
    """(1, C, *spatial) from ``input_shape``: the spatial size, (C, *spatial) or (N, C, *spatial)."""
    name = type(module).__name__
    nd = spec.ndim
    spatial = "(L,)" if nd == 1 else "(H, W)" if nd == 2 else "(D, H, W)"
    c_in = w.shape[0] if spec.transposed else w.shape[1] * spec.groups
    if input_shape is None:
        raise ValueError(f"sigma_bounds of a {name} needs input_shape=: the spatial size {spatial}, or (C, *spatial), "
                         f"or (N, C, *spatial); the operator norm of a convolution depends on the input size")
    given = shape = _sizes(input_shape, name)
    if len(shape) == nd:
        shape = (c_in,) + shape
    elif len(shape) == nd + 2:
        shape = shape[1:]
    elif len(shape) != nd + 1:
        raise ValueError(f"{name}: input_shape {given} has {len(shape)} entries; expected {nd} (spatial), "
                         f"{nd + 1} (C, *spatial) or {nd + 2} (N, C, *spatial)")
    if shape[0] != c_in:
        raise ValueError(f"{name}: input_shape {given} has {shape[0]} channels, the layer takes {c_in}")
    if min(shape) == 0:
        raise ValueError(f"{name}: input_shape {given} has an empty dim")
    return (1,) + shape


def _conv_bounds(module: nn.Module, w: Tensor, input_shape, method: str, n_iter: int | None,
                 rtol: float) -> tuple[float, float]:
    if w.is_complex():
        raise TypeError(f"{type(module).__name__}: complex conv weights are not supported")
    spec = conv_spec(module)
    in_shape = _conv_input_shape(module, spec, w, input_shape)
    try:
        out_shape = output_shape(spec, w, in_shape)
    except RuntimeError as err:
        raise ValueError(f"{type(module).__name__}: input shape {in_shape} is invalid for this layer "
                         f"({err})") from err
    if math.prod(out_shape) == 0:
        raise ValueError(f"{type(module).__name__}: input shape {in_shape} gives an empty output")
    ws, e = _scaled(w)
    n_terms = ws.numel()
    apply = lambda x: conv_apply(spec, ws, x)  # noqa: E731
    if method == "auto" and n_iter is None and math.prod(in_shape) * math.prod(out_shape) <= _AUTO_JACOBIAN:
        method = "exact"  # a small layer: its dense Jacobian is cheap, and exact where the circulant is loose
    if method == "exact":
        upper, start = _jacobian_bounds(spec, ws, in_shape, out_shape, rtol, n_terms)
    else:
        emb = _embedding(spec, ws, in_shape, out_shape)
        upper, best, where = _circular_top(emb, method, n_iter, rtol)
        factor = math.prod(a.factor2 for a in emb.axes)  # ||S||^2 ||E||^2, an exact integer
        if factor > 1:
            upper = math.nextafter(upper * math.nextafter(math.sqrt(factor), _INF), _INF)
        start = _plane_wave(emb, best, where)
    if not bool(start.abs().sum() > 0):
        start = torch.randn(in_shape, dtype=torch.float64, device=ws.device,
                            generator=torch.Generator(ws.device).manual_seed(0))
    lower = _power_lower(apply, lambda y: conv_adjoint(spec, ws, y, in_shape),
                         lambda x: conv_apply(spec, ws.abs(), x), start, n_terms)
    sizes = (math.prod(in_shape), math.prod(out_shape), ws.numel())
    return _unscale(lower, upper, e, _margin(*sizes))


def _jacobian_bounds(spec, ws: Tensor, in_shape, out_shape, rtol: float, n_terms: int) -> tuple[float, Tensor]:
    """'exact' on a conv: the certified sigma of its dense Jacobian (the layer applied to each basis
    vector), plus the bound gamma ||J_|W| ||_F on the rounding of the entries that sum several taps."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in * n_out > _EXACT_MAX_JACOBIAN or min(n_in, n_out) > _EXACT_MAX_SIDE:
        raise ValueError(f"method='exact' builds the dense Jacobian ({n_out} x {n_in}): too large here (at most "
                         f"{_EXACT_MAX_JACOBIAN} entries); use 'auto' or 'fft'")
    basis = torch.eye(n_in, dtype=torch.float64, device=ws.device).reshape(n_in, *in_shape[1:])
    jt = conv_apply(spec, ws, basis).reshape(n_in, n_out)  # row i: A e_i
    jt_abs = conv_apply(spec, ws.abs(), basis).reshape(1, n_in, n_out)
    entry_error = _up(_fro_up(jt_abs) * _gamma(n_terms))
    top = _top_sigma(jt.mT.unsqueeze(0), rtol=rtol, **_config("exact", None))
    upper = float(_up(torch.tensor(top.upper, dtype=torch.float64, device="cpu") + entry_error))
    return upper, top.vector.reshape(in_shape)


# ----------------------------------------------------------------------------- public API

def sigma_bounds(module_or_weight, *, method: str = "auto", input_shape=None, n_iter: int | None = None,
                 dim: int = 0, rtol: float = 1e-8) -> tuple[float, float]:
    """Certified ``(lower, upper)`` with lower <= sigma <= upper, sigma the spectral norm.

    What is bounded: a Tensor's matrix view (``dim`` first, the rest flattened, as
    ``sn_kernels.backends.pytorch.as_matrix``); the weight matrix of an ``nn.Linear`` or
    ``nn.Embedding``; for ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` the true
    linear map x -> conv(x) (bias left out) on inputs of ``input_shape`` (required: the
    spatial size, or (C, *spatial), or (N, C, *spatial); N does not matter), for any
    stride, padding (ints, tuples, 'same', 'valid'), padding_mode, dilation, groups and
    output_padding.  A spectrally normalized layer (either API, sn_kernels' or PyTorch's)
    is bounded for the weight it uses in eval mode, W / sigma_hat, without changing its
    state.  Complex weights: Tensors, Linear and Embedding only.

    Guarantee: lower <= sigma <= upper up to nothing: rounding is bounded and added (see
    the module docstring).  lower is always the Rayleigh quotient ||A v|| / ||v|| of the
    true operator, v from power iteration (at most 32 steps, until the estimate grows by
    less than 1e-7) started at the upper bound's best vector.

    ``method``:

    * ``"gram"``: Gram iteration on the matrix (convs: on each frequency's matrix, below),
      ``n_iter`` steps (None: until upper <= (1 + rtol) lower, at most 40).  Each step
      costs a k x k x k product (k the smaller side); the bound is within a factor
      k^(1/2^(t+1)) of sigma after t steps, much closer with a spectral gap.
    * ``"fft"`` (convs only): the spectrum of the circular embedding below; each
      frequency's sigma by Gram iteration (``n_iter`` or up to 12 steps), then where that
      has not converged an ``eigh`` with a residual certificate: exact (to rtol) for
      circular padding whenever the layer is a circular convolution (stride 1 and n
      outputs, or a stride s that divides n and n / s outputs).
    * ``"exact"``: the certified sigma of the dense matrix by ``eigh`` + residual bound
      (matrices with a side <= 4096), or of a conv's dense Jacobian (at most 4M entries;
      ValueError beyond).
    * ``"auto"``: for convs ``"exact"`` when the dense Jacobian has at most 2^18 entries
      (cheap, and exact where the circulant is loose on tiny inputs), else ``"fft"``; for
      matrices ``"exact"`` when the smaller side is <= 1024 (then cheaper than Gram steps),
      else Gram iteration finished by the certificate after 12 steps.

    Convolutions (why the bound holds): per spatial dim, with input size n, padding
    (pl, pr), dilated kernel size ke, stride s, A = S o C o E where
    C is a circular convolution on a grid of N points with the (dilated, wrapped) kernel,
    E puts the input on the grid and S picks the outputs:

    * zero padding: E embeds x at pl in zeros, N = max(n + max(pl, pr), n + pl + pr - ke + 1)
      (the smallest grid on which every output reads zeros where the padded input has them
      and no two outputs coincide), ||E|| = 1, S a crop, ||S|| = 1;
    * circular: N = n, E = identity, S reads output (j s - pl) mod n: ||S|| = sqrt(the most
      times one is read), 1 for 'same'-size outputs;
    * reflect / replicate: E is the pad map P (a 0/1 copy matrix: ||P|| = sqrt(the most
      copies of one input element), e.g. sqrt(2) per dim for reflect, sqrt(1 + p) for
      replicate), N = n + pl + pr;
    * stride: N is made a multiple of s (circular: s_p = gcd(s, n) is used) and C taken in
      polyphase form (a stride-1 circular conv on N/s points from s^d C_in phase channels),
      whose norm is <= that of the stride-1 one and exact for circular layers;
    * dilation: the kernel taps sit d apart; groups: a batch of block matrices, the max;
    * ConvTranspose: the adjoint of the conv with the same weight on its output size,
      restricted to the outputs it uses (same norm, or less with output_padding).

    Then ||A|| <= ||S|| ||E|| max_omega sigma(K'(omega)) (Sedghi et al. 2019; the K'(omega)
    computed by a direct DFT whose error is bounded and added).  Loose where: reflect /
    replicate padding (the product ||conv|| ||P|| is reached only if their worst
    directions align: up to sqrt(2)^d too high for reflect), zero padding on small inputs
    (boundary effects: the circulant is slightly larger than the layer; for SNGAN's
    128-channel 3x3 convs upper / lower is 1.0014 at 32x32, 1.017 at 8x8).  Exact (to rtol) for circular layers whose output
    is the whole grid.

    Cost: the spectrum is O(g prod(N/s) C_out C_in s^d) memory in chunks of 4M entries;
    Gram steps O(C^3) per frequency kept (frequencies whose upper bound falls below the best
    lower bound are dropped); the lower bound costs at most 2 * 33 float64 convolutions.

    ``n_iter``: Gram steps (above); ``rtol``: where the adaptive loops stop (upper <=
    (1 + rtol) lower, per frequency); ``dim``: the matrix view of a Tensor.

    Errors: ValueError for an unknown method, a missing / malformed ``input_shape`` for a
    conv, an empty, non-finite or meta weight, ``fft`` on a matrix, ``exact`` too large;
    TypeError for a module that is not supported or has no weight, integer weights,
    complex conv weights, an ``input_shape`` size that is not an int (8.9 is refused, not truncated).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if n_iter is not None and (type(n_iter) is not int or n_iter < 0):
        raise ValueError(f"n_iter must be None or an int >= 0, got {n_iter!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    check_gradual_underflow("sigma_bounds")
    if isinstance(module_or_weight, Tensor):
        w = module_or_weight
        _check_weight(w, "sigma_bounds")
        if not -w.dim() <= dim < w.dim():
            raise ValueError(f"dim {dim} out of range for a {w.dim()}-d weight")
        return _dense(w.movedim(dim, 0) if dim % w.dim() else w, method, n_iter, rtol)
    if not isinstance(module_or_weight, nn.Module):
        raise TypeError(f"sigma_bounds takes a Tensor or a layer, got {type(module_or_weight).__name__}")
    return _layer_bounds(module_or_weight, input_shape, method, n_iter, rtol)


def _dense(w: Tensor, method: str, n_iter: int | None, rtol: float) -> tuple[float, float]:
    ws, e = _scaled(w)
    lower, upper = _matrix_bounds(ws, method, n_iter, rtol)
    return _unscale(lower, upper, e, _margin(*as_matrix(ws, 0).shape))


def _layer_bounds(module: nn.Module, input_shape, method: str, n_iter: int | None, rtol: float):
    name = type(module).__name__
    if not isinstance(module, (nn.Linear, nn.Embedding) + _CONV + _CONV_T):
        if not isinstance(getattr(module, "weight", None), Tensor) and not sites(module):
            raise TypeError(f"{name} has no weight to bound")
        raise TypeError(f"sigma_bounds supports Tensors, nn.Linear, nn.Embedding, nn.Conv1d/2d/3d and "
                        f"nn.ConvTranspose1d/2d/3d; got {name}")
    w = _eval_weight(module)
    _check_weight(w, name)
    if isinstance(module, _CONV + _CONV_T):
        return _conv_bounds(module, w, input_shape, method, n_iter, rtol)
    return _dense(w, method, n_iter, rtol)


# ----------------------------------------------------------------------------- Lipschitz bound of a chain

#: elementwise activations and their Lipschitz constants (sup |phi'|, rounded up)
_ACTIVATIONS = {
    nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Hardtanh: 1.0, nn.Tanh: 1.0, nn.Softsign: 1.0, nn.Softplus: 1.0,
    nn.Sigmoid: 0.25,  # sigma' = sigma (1 - sigma) <= 1/4
    nn.CELU: 1.0,  # CELU' = exp(x / alpha) <= 1 for x < 0
    nn.GELU: 1.13,  # sup GELU' = 1.12890 (exact), 1.12899 (tanh approximation): GELU is not 1-Lipschitz
    nn.SiLU: 1.1,  # sup SiLU' = 1.09984
    nn.Mish: 1.09,  # sup Mish' = 1.08850
}
#: isometries (reshapes) and the identity of eval mode (dropout in training mode: below)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ALPHA_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_IDENTITIES = (nn.Identity, nn.Flatten, nn.Unflatten) + _DROPOUT + _ALPHA_DROPOUT
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d)


def _hook_owner(hook) -> str:
    """The module (Python module) that defines a forward hook: of its class, or of its function."""
    target = getattr(hook, "__self__", None)
    if target is None and not hasattr(hook, "__code__"):
        target = hook  # a callable object
    if target is not None:
        return type(target).__module__
    return getattr(hook, "__module__", "") or ""


def _check_plain(label: str, module: nn.Module) -> None:
    """Refuse a module whose map is not the one its class bounds: a ``forward`` overridden by a subclass
    (a residual Sequential, a scaled Linear), or a forward (pre-)hook of unknown effect.  Known hooks: the
    spectral norms (sn_kernels', PyTorch's) and torch.nn.utils.weight_norm, whose weight ``_eval_weight``
    computes, and sn_kernels' own bookkeeping hooks (group, meta guard, input size)."""
    if "forward" in module.__dict__:
        raise TypeError(f"lipschitz_bound: cannot bound {label}: its forward is replaced on the instance, so its map "
                        f"is not the one {type(module).__name__} is bounded by")
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules.")), None)
    if base is not None and type(module).forward is not base.forward:
        raise TypeError(f"lipschitz_bound: cannot bound {label}: {type(module).__name__} overrides the forward "
                        f"of {base.__name__}, so its map is not the one {base.__name__} is bounded by")
    found = _unknown_hook(module._forward_pre_hooks, module._forward_hooks, _KNOWN_HOOK_MODULES)
    if found is not None:
        raise TypeError(f"lipschitz_bound: cannot bound {label}: it has a {found[0]} ({found[1]!r}) that may change "
                        f"its weight or output; remove it to bound the layer")


def _unknown_hook(pre_hooks: dict, hooks: dict, known: tuple = ()) -> tuple[str, object] | None:
    """(kind, hook) of the first forward pre-hook or forward hook among ``pre_hooks``, ``hooks`` that is
    neither sn_kernels' own nor from a module named in ``known``; None when there is none."""
    for kind, table in (("forward pre-hook", pre_hooks), ("forward hook", hooks)):
        for hook in table.values():
            owner = _hook_owner(hook)
            if not (owner.startswith("sn_kernels.") or owner in known):
                return kind, hook
    return None


def _check_no_global_hooks() -> None:
    """Refuse while a global module forward (pre-)hook of unknown effect is registered
    (``torch.nn.modules.module.register_module_forward_hook``): it runs on every layer and may change any
    output."""
    from torch.nn.modules import module as module_file

    found = _unknown_hook(module_file._global_forward_pre_hooks, module_file._global_forward_hooks)
    if found is not None:
        raise TypeError(f"lipschitz_bound: a global module {found[0]} is registered ({found[1]!r}); it runs on every "
                        "layer and may change its output; remove it to bound the model")


#: PyTorch's hook-based reparametrizations, whose weight ``_eval_weight`` computes
_KNOWN_HOOK_MODULES = ("torch.nn.utils.spectral_norm", "torch.nn.utils.weight_norm")


def _chain(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaves of a (nested) nn.Sequential, in order and as often as its forward applies them (a module
    registered twice is applied twice), with their qualified names."""
    label = f"layer {prefix or type(model).__name__!r} ({type(model).__name__})"
    _check_plain(label, model)
    if not isinstance(model, nn.Sequential):
        return [(prefix or type(model).__name__, model)]
    out = []
    for name, child in model._modules.items():  # not named_children(), which lists a shared module once
        out += _chain(child, f"{prefix}.{name}" if prefix else name)
    return out


def _tuple(v, nd: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _windows(layer: nn.Module, n: int, out: int, d: int, nd: int) -> list[list[int]]:
    """The input positions each output of a pooling layer reads, along one spatial dim."""
    if isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return [list(range(j * n // out, -(-(j + 1) * n // out))) for j in range(out)]
    k, s = _tuple(layer.kernel_size, nd)[d], _tuple(layer.stride or layer.kernel_size, nd)[d]
    p = _tuple(layer.padding, nd)[d]
    dil = _tuple(getattr(layer, "dilation", 1), nd)[d]
    return [[i for i in range(j * s - p, j * s - p + dil * (k - 1) + 1, dil) if 0 <= i < n] for j in range(out)]


def _pool_bound(layer: nn.Module, in_shape, out_shape) -> float:
    """Max pooling: |max_W x - max_W y| <= max_W |x - y|, so ||f(x) - f(y)||^2 <= (the most windows one
    input is in) ||x - y||^2.  Average pooling is linear and separable (a Kronecker product over dims
    of 1-D averaging matrices, PyTorch's divisors being products too): the product of their norms."""
    nd = 1 if "1d" in type(layer).__name__ else 2 if "2d" in type(layer).__name__ else 3
    if getattr(layer, "return_indices", False):
        raise TypeError(f"{type(layer).__name__} with return_indices=True does not return a tensor")
    total = 1.0
    for d in range(nd):
        n, out = in_shape[-nd + d], out_shape[-nd + d]
        windows = _windows(layer, n, out, d, nd)
        if isinstance(layer, _MAXPOOL):
            total *= max(Counter(i for w in windows for i in w).values())
            continue
        mat = torch.zeros(out, n, dtype=torch.float64, device="cpu")
        for j, w in enumerate(windows):
            if isinstance(layer, _AVGPOOL[3:]):
                div = len(w)
            else:  # PyTorch's divisor: the window clipped to the padded input, or to the input
                k, s = _tuple(layer.kernel_size, nd)[d], _tuple(layer.stride or layer.kernel_size, nd)[d]
                p = _tuple(layer.padding, nd)[d]
                start = j * s - p
                div = min(start + k, n + p) - start if layer.count_include_pad else len(w)
            mat[j, w] = 1.0 / div  # entries within u of 1/div: the norm within a factor 1 + u, covered below
        exact = "exact" if min(mat.shape) <= _EXACT_MAX_SIDE else "auto"
        total *= sigma_bounds(mat, method=exact)[1] ** 2 * (1 + 4 * _U)
    if isinstance(layer, _AVGPOOL[:3]) and getattr(layer, "divisor_override", None):
        k = math.prod(_tuple(layer.kernel_size, nd))
        total *= (k / layer.divisor_override) ** 2
    return math.nextafter(math.sqrt(math.nextafter(total, _INF)), _INF)


def _shape_through(label: str, layer: nn.Module, shape) -> tuple[int, ...]:
    """The output shape of ``layer`` (parameter-free or eval-mode BatchNorm) for inputs of ``shape``: run on
    the meta device with meta copies of its parameters and buffers, so nothing is computed or changed.
    ValueError naming the layer if it refuses the shape (meta kernels raise any of these)."""
    state = {k: torch.empty_like(t, device="meta") for k, t in (*layer.named_parameters(), *layer.named_buffers())}
    try:
        return tuple(torch.func.functional_call(layer, state, (torch.empty(shape, device="meta"),)).shape)
    except (RuntimeError, IndexError, ValueError) as err:
        raise ValueError(f"lipschitz_bound: {label}: input shape {tuple(shape)} does not fit ({err})") from err


def _layer_lipschitz(name: str, layer: nn.Module, shape) -> tuple[float, tuple[int, ...]]:
    """(a Lipschitz bound of one layer for inputs of ``shape``, its output shape)."""
    label = f"layer {name!r} ({type(layer).__name__})"
    try:
        if isinstance(layer, nn.Linear):
            if shape[-1] != layer.in_features:  # the label is added below
                raise ValueError(f"takes {layer.in_features} features, gets shape {tuple(shape)}")
            return _layer_bounds(layer, None, "auto", None, 1e-8)[1], tuple(shape[:-1]) + (layer.out_features,)
        if isinstance(layer, _CONV + _CONV_T):
            spec = conv_spec(layer)  # sigma_bounds also takes the spatial size alone; a conv's input does not
            if len(shape) not in (spec.ndim + 1, spec.ndim + 2):
                raise ValueError(f"takes inputs of shape (C, *spatial) or (N, C, *spatial), {spec.ndim + 1} or "
                                 f"{spec.ndim + 2} dims; gets shape {tuple(shape)}")
            bound = _layer_bounds(layer, shape, "auto", None, 1e-8)[1]  # checks the shape
            return bound, tuple(output_shape(spec, _eval_weight(layer), shape))
    except (TypeError, ValueError) as err:
        raise type(err)(f"lipschitz_bound: {label}: {err}") from err
    if isinstance(layer, nn.CELU) and not layer.alpha > 0:
        raise ValueError(f"lipschitz_bound: {label} with alpha={layer.alpha} grows like exp(-x / |alpha|) for "
                         f"x < 0: it has no Lipschitz constant")
    if type(layer) in _ACTIVATIONS:
        return _ACTIVATIONS[type(layer)], _shape_through(label, layer, shape)
    if isinstance(layer, _DROPOUT) and layer.training:  # a fixed mask scales by 0 or 1 / (1 - p)
        return (0.0 if layer.p >= 1 else math.nextafter(1.0 / (1.0 - layer.p), _INF)), tuple(shape)
    if isinstance(layer, _ALPHA_DROPOUT) and layer.training:
        raise ValueError(f"lipschitz_bound: {label} in training mode is a random affine map; call model.eval() "
                         f"to bound the eval-mode network")
    if isinstance(layer, (nn.LeakyReLU, nn.ELU)):  # slope / alpha exp(x) for x < 0
        slope = layer.negative_slope if isinstance(layer, nn.LeakyReLU) else layer.alpha
        return max(1.0, abs(float(slope))), tuple(shape)
    if isinstance(layer, _IDENTITIES):
        return 1.0, _shape_through(label, layer, shape)
    if isinstance(layer, _BATCHNORM):
        if layer.training or layer.running_var is None:
            raise ValueError(f"lipschitz_bound: {label} normalizes by batch statistics (training mode or no "
                             f"running stats); call model.eval() to bound the eval-mode network")
        with torch.no_grad():
            # the eps the forward adds is the layer's, rounded to its dtype: the smaller of the two bounds both
            eps = min(layer.eps, float(torch.tensor(layer.eps, dtype=layer.running_var.dtype)))
            scale = 1.0 / torch.sqrt(layer.running_var.double() + eps)
            if layer.weight is not None:
                scale = scale * layer.weight.detach().double().abs()
            # three roundings of at most u each: 4 u covers them
            return math.nextafter(float(scale.max()) * (1 + 4 * _U), _INF), _shape_through(label, layer, shape)
    if isinstance(layer, _AVGPOOL + _MAXPOOL):
        out = _shape_through(label, layer, shape)
        return _pool_bound(layer, shape, out), out
    raise TypeError(
        f"lipschitz_bound: cannot bound {label}: supported are chains (nn.Sequential, nested) of Linear, "
        f"Conv*/ConvTranspose* (spectrally normalized or not), eval-mode BatchNorm, average and max pooling, "
        f"Flatten/Unflatten/Identity/Dropout and elementwise activations (ReLU, LeakyReLU, ELU, CELU, Tanh, "
        f"Sigmoid, GELU, SiLU, Mish, Softplus, Softsign, Hardtanh, ReLU6); residual blocks, attention and "
        f"other non-chain modules are not")


@torch.no_grad()
def lipschitz_bound(model: nn.Module, input_shape) -> float:
    """A certified upper bound on the l2 Lipschitz constant of ``model`` for inputs of ``input_shape``.

    Applies to chains only: ``model`` an ``nn.Sequential`` (nested ones are flattened) or a
    single layer, each layer a map whose Lipschitz constant is bounded on its own; the
    bound is the product of the layers' bounds (exact for a single linear layer, the usual
    product bound otherwise).  Per layer: Linear and Conv*/ConvTranspose* by
    ``sigma_bounds(..., method="auto")`` (convolutions at the input size they receive; bias
    does not matter; a spectrally normalized layer, either API, with the weight it uses in
    eval mode, its u, v untouched); BatchNorm (eval mode only) max |gamma| / sqrt(var + eps);
    average pooling by its exact norm (a Kronecker product of 1-D averaging matrices), max
    pooling by sqrt(the most windows an input element is in); elementwise activations by
    sup |phi'|: 1 for ReLU, Tanh, Hardtanh, Softplus, ...; max(1, |slope|) for LeakyReLU,
    max(1, |alpha|) for ELU; 1/4 for Sigmoid; 1.13 for GELU, 1.1 for SiLU and 1.09 for
    Mish (not 1-Lipschitz); Flatten/Unflatten/Identity 1, Dropout 1 in eval mode and 1 / (1 - p)
    in training mode (any one mask).  Softplus is bounded as the smooth function: PyTorch's switch
    to the identity above ``threshold`` adds a jump of about exp(-threshold) / beta (2e-9 / beta by
    default), which no Lipschitz constant covers.  A module applied twice (registered twice in a
    Sequential) counts twice.

    ``input_shape``: the shape of the input the model takes, e.g. (1, 3, 32, 32) (the
    batch size does not matter); shapes are propagated without running the model (on the
    meta device for parameter-free layers), so no state changes.  The norm is l2 over one
    sample.  Raises TypeError naming the first layer it cannot bound (residual blocks,
    attention, normalizations other than eval BatchNorm, a subclass that overrides
    ``forward``, a forward hook other than a spectral or weight norm's, ...), ValueError for
    BatchNorm or AlphaDropout in training mode, CELU with alpha <= 0, or a shape that does not fit
    (naming the layer), TypeError for a size that is not an int.  Cost: the sum of the layers' ``sigma_bounds``.
    """
    check_gradual_underflow("lipschitz_bound")
    _check_no_global_hooks()
    shape = _sizes(input_shape, "lipschitz_bound")
    if not shape:
        raise ValueError("lipschitz_bound: input_shape () has no dims; a layer's input needs at least one dim")
    total = 1.0
    for name, layer in _chain(model):
        bound, shape = _layer_lipschitz(name, layer, shape)
        if 1.0 in (total, bound):  # exact
            total *= bound
        else:
            total = math.nextafter(total * bound, _INF)
    return total
