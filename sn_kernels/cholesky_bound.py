"""A certified upper bound on sigma(W) from one Gram product and a Cholesky certificate.

``certified.gram_upper_bound`` forms G = x^T x (k x k, k the smaller side of W) and then squares it
nine more times; on a CPU those k^3 squarings cost as much as the first product, and the analytic
gradient as much again.  ``cholesky_upper_bound`` stops after the first product:

1. G = fl(h^T h) for h = x / 2^p (``bounds._rescale``: e >= ||G - h^T h||_F), made exactly symmetric
   as K = (G + G^T) / 2 (its rounding added to e, as in ``bounds._eig_finish``).
2. An estimate lam of lambda_max(K): ``eigvalsh`` up to ``EIGH_MAX_SIDE``, else Lanczos with full
   reorthogonalization (``LANCZOS_STEPS`` steps or 6 k^(1/3), Rayleigh-Ritz on the vectors it made).  Nothing
   rests on it: an estimate too low makes step 3 fail, one too high loosens the bound.
3. The certificate: for each c = lam (1 + delta), delta in ``SLACKS``, the Cholesky factorization of
   A = fl(c I - K) (``torch.linalg.cholesky_ex``: no error raised, nothing read on the host).  If it
   runs to completion with finite entries, L L^T = A + dA with |dA| <= gamma_{k+1} |L| |L^T| for any
   order of the inner products (Higham, *Accuracy and Stability of Numerical Algorithms*, Thm 10.3),
   so ||dA||_2 <= gamma_{k+1} ||L||_F^2, and L L^T >= 0 gives lambda_min(A) >= -gamma_{k+1} ||L||_F^2.
   A differs from c I - K on its diagonal only, by the rounding of c - K_ii (at most 2u |a_ii| after
   the fact), so lambda_max(K) <= c + gamma_{k+1} ||L||_F^2 + 2u max_i |a_ii|.  The smallest such
   bound is taken, and ||K||_F >= lambda_max(K) where none succeeded (never seen in the tests: a
   certified but loose last resort).  A 1 x 1 K is its own eigenvalue.
4. sigma(x) <= 2^p sqrt(that + e) (``bounds._unwind`` with one step), then the final relative margin
   ``bounds._margin`` and the exact scaling 2^p0 of ``bounds._oriented``, as the Gram bound does.

Tightness: B / sigma <= sqrt(1 + delta) (1 + ~1e-11) for the smallest slack that held (1 + 5e-13 plus
the rounding terms with the first), against the Gram bound's k^(1/2^11) worst case (1.0036 for
k = 1536).  Cost: the k^2 n product, an ``eigvalsh`` or Lanczos, three k^3 / 3 factorizations and one
triangular solve; the backward is rank one.  Measured in benchmarks/NOTES.md, K4 (1536 x 13824 on a
2-core CPU: 0.8 s against 2.2 s for the Gram bound, forward and backward).

Gradient (not part of the certificate): that of c_B sigma_1(W), c_B = B / sigma_1 held constant:
B (W q) q^T / ||W q||^2, q the top eigenvector of K from one step of inverse iteration through the
factor that held; one product with W, in float32 for weights of at most float32 precision.  With
create_graph=True, autograd through ``torch.linalg.matrix_norm(·, 2)`` (the same first derivative,
and the second).

Steps 2 and 3 are one custom op, ``sn_kernels::cholesky_top`` (with a fake), so that ``torch.compile``
holds one call for them instead of the unrolled Lanczos steps and factorizations.

CPU only for now: ``certified`` uses it to refresh CPU weights, and the Gram bound (matrix products
only) on other devices, where ``cholesky_ex`` and ``eigvalsh`` have not been measured (nor checked
for host synchronisation).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .bounds import _ABS, _U, _fro_up, _gamma, _margin, _oriented, _pow2, _rescale, _unwind, _up

__all__ = ["EIGH_MAX_SIDE", "LANCZOS_STEPS", "SLACKS", "cholesky_upper_bound"]

#: relative slacks of the Cholesky candidates c = lam (1 + delta), smallest first: the first holds when lam is
#: within about 1e-12 of lambda_max (``eigvalsh``; Lanczos on most weights), the others cover estimates
#: off by up to 1.5e-8 and 2.4e-4 (clusters that Lanczos did not split)
SLACKS = (2.0 ** -40, 2.0 ** -26, 2.0 ** -12)
#: the estimate by ``eigvalsh`` up to this smaller side (fast enough, and no Python loop), Lanczos above it
EIGH_MAX_SIDE = 256
#: Lanczos steps (for k > EIGH_MAX_SIDE) at least; 6 k^(1/3) for larger k, as the gaps at the top of a
#: random spectrum shrink like k^(-2/3): the top Ritz value is then within 1e-13 of lambda_max on random
#: 1536 x 13824 and 4096 x 4096 weights (64 steps: 1e-10, which the first slack does not cover)
LANCZOS_STEPS = 96
_BREAKDOWN = 2.0 ** -40  # a Lanczos residual below this times trace(K): the Krylov space is invariant


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x).clamp_min(2.0 ** -1000)


def _starts(n: int, count: int, device) -> Tensor:
    """``count`` fixed pseudo-random vectors of length n (rows), entries in [-0.5, 0.5): the same on every
    call, made by tensor ops (no ``torch.Generator``, which dynamo cannot trace)."""
    i = torch.arange(count * n, dtype=torch.float64, device=device).view(count, n)
    return torch.frac(torch.sin(i * 12.9898 + 78.233).abs() * 43758.5453) - 0.5


def _lanczos(kmat: Tensor, steps: int) -> Tensor:
    """The top Ritz value of ``steps`` Lanczos steps on the symmetric ``kmat``, fully reorthogonalized
    (twice), from a fixed pseudo-random start.  Where the residual vanishes (an invariant Krylov space: a
    flat or low-rank spectrum) the next vector is the next fixed start vector made orthogonal to the
    basis, chosen by ``torch.where`` (no host read)."""
    starts = _starts(kmat.shape[-1], steps, kmat.device)
    floor = kmat.diagonal().sum() * _BREAKDOWN
    basis = _unit(starts[0]).unsqueeze(0)  # rows: the orthonormal vectors so far
    images = []
    for j in range(steps):
        w = kmat @ basis[j]
        images.append(w)
        if j == steps - 1:
            break
        r = w - (basis @ w) @ basis
        r = r - (basis @ r) @ basis
        fresh = starts[j + 1] - (basis @ starts[j + 1]) @ basis
        fresh = fresh - (basis @ fresh) @ basis
        beta = torch.linalg.vector_norm(r)
        nxt = torch.where(beta > floor, r / beta.clamp_min(2.0 ** -1000), _unit(fresh))
        basis = torch.cat([basis, nxt.unsqueeze(0)])
    proj = basis @ torch.stack(images, 1)  # basis^T K basis
    return torch.linalg.eigvalsh((proj + proj.mT) / 2)[-1]


def _estimate(kmat: Tensor) -> Tensor:
    """lam ~ lambda_max of the symmetric ``kmat`` (an estimate: step 2 of the module docstring)."""
    n = kmat.shape[-1]
    if n <= EIGH_MAX_SIDE:
        return torch.linalg.eigvalsh(kmat)[-1]
    return _lanczos(kmat, min(n, max(LANCZOS_STEPS, math.ceil(6 * n ** (1 / 3)))))


def _certified_top(kmat: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(B, q): B >= lambda_max(kmat) (exactly symmetric, float64), the smallest certified Cholesky
    candidate, else ||kmat||_F (step 3 of the module docstring); q ~ the top eigenvector (unit), for the
    gradient: one step of inverse iteration, A^-1 b by the factor of the smallest candidate that held
    (its shift c - lambda_max is tiny, so one step suffices), else K (K b)."""
    n = kmat.shape[-1]
    b = _starts(n, 1, kmat.device)[0]
    if n == 1:  # a 1 x 1 K is its own eigenvalue: nothing to certify
        return kmat[0, 0].clamp_min(0.0), torch.ones_like(b)
    g = _gamma(n + 1)
    best = _fro_up(kmat)
    q = _unit(kmat @ (kmat @ b))
    diag = kmat.diagonal()
    for delta in reversed(SLACKS):  # the smallest slack last: its vector wins where it held
        c = lam.clamp_min(0.0) * (1 + delta)
        a = -kmat
        a.diagonal().copy_(c - diag)
        low, info = torch.linalg.cholesky_ex(a)
        fro = _fro_up(low)
        diag_err = _up(_up(a.diagonal().abs().amax() * (2 * _U)) + _ABS)
        bound = _up(_up(c + _up(_up(fro * fro) * g)) + diag_err)
        ok = (info == 0) & torch.isfinite(fro)
        best = torch.where(ok, torch.minimum(best, bound), best)
        q = torch.where(ok, _unit(torch.cholesky_solve(b.unsqueeze(-1), low)[:, 0]), q)
        del a, low  # before the next slack's: one matrix and one factor alive at a time
    return best, q


@torch.library.custom_op("sn_kernels::cholesky_top", mutates_args=())
def cholesky_top(kmat: Tensor) -> tuple[Tensor, Tensor]:
    """(B, q) of ``_certified_top`` for the symmetric float64 ``kmat``, its estimate included: one opaque op,
    so that a compiled graph holds one call instead of the unrolled Lanczos steps and factorizations (a
    300 x 400 layer compiled in 110 s through them, against 24 s with the Gram bound's products).  A
    ``kmat`` with a non-finite entry (a NaN or Inf weight) has the bound +inf (the layer's W_sn is then 0
    where W is finite), chosen by ``torch.where``: eigvalsh would raise on it."""
    finite = torch.isfinite(kmat).all()
    safe = torch.where(finite, kmat, 0.0)
    top, q = _certified_top(safe, _estimate(safe))
    return torch.where(finite, top, torch.full_like(top, math.inf)), q


@cholesky_top.register_fake
def _(kmat):
    return kmat.new_empty(()), kmat.new_empty(kmat.shape[-1])


def _smooth(mat: Tensor, upper: Tensor) -> Tensor:
    """``upper`` in value, with the derivatives (first and second) of upper / sigma_1 held constant times
    sigma_1(mat): for create_graph=True."""
    log_s = torch.log(torch.linalg.matrix_norm(mat.to(torch.float64), 2).clamp_min(2.0 ** -1022))
    return upper * torch.exp(log_s - log_s.detach())


class _CholeskyBound(torch.autograd.Function):
    """B >= sigma(mat) (``cholesky_upper_bound``), with the gradient of (B / sigma_1) sigma_1."""

    @staticmethod
    def forward(ctx, mat: Tensor) -> Tensor:
        x, p0 = _oriented(mat)
        h, p, e = _rescale(x.unsqueeze(0), checked=False)
        gram = h.mT @ h
        del x, h  # float64 copies of W: not alive through the factorizations below
        kmat = ((gram + gram.mT) / 2)[0]  # exactly symmetric; averaging rounds by <= u ||K||_F
        del gram
        e = _up(e + _up(_fro_up(kmat) * _gamma(1)))
        top, q = cholesky_top(kmat)
        upper = _unwind(top, [(p, e)], upper=True, checked=False)[0]
        upper = _up(_up(upper * (1 + _margin(*mat.shape))) * _pow2(p0, checked=False))
        # a NaN or Inf entry: +inf (the scalings above are NaN then), so W_sn is 0 where W is finite
        upper = torch.where(torch.isfinite(mat).all(), upper, torch.full_like(upper, math.inf))
        ctx.save_for_backward(mat, upper, q)
        return upper

    @staticmethod
    def backward(ctx, grad: Tensor):
        mat, upper, q = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable all the way
            (out,) = torch.autograd.grad(_smooth(mat, upper.detach()), mat, grad, create_graph=True)
            return out
        # the gradient is not part of the certificate: formed in float32 for a weight of at most float32
        # precision, without the float64 copy of W that the forward made (B / sigma_1 is scale-free)
        work = torch.float64 if mat.dtype == torch.float64 else torch.float32
        xo = mat.mT if mat.shape[0] < mat.shape[1] else mat
        q = q.to(work)
        y = xo.to(work) @ q  # ~ sigma_1 u; <(W q) q^T, W> = ||W q||^2
        inner = y.to(torch.float64).square().sum()  # float64: ||W q||^2 of a float32 W can exceed its range
        scale = torch.where(inner > 0, grad * upper / inner, torch.zeros_like(inner)).to(work)
        d = torch.outer(y * scale, q)
        if mat.shape[0] < mat.shape[1]:
            d = d.mT
        return d.to(mat.dtype)


def cholesky_upper_bound(mat: Tensor) -> Tensor:
    """A certified upper bound on the largest singular value of the 2-D real ``mat`` (rounding accounted
    for): a 0-d float64 tensor on ``mat``'s device, nothing read on the host.  Differentiable, twice too.
    Usually within 1e-11 of sigma (sqrt(1 + 2^-40) and the rounding terms); looser, never below it, where
    the estimate missed (module docstring)."""
    if mat.dim() != 2:
        raise ValueError(f"cholesky_upper_bound takes a matrix, got a {mat.dim()}-d tensor")
    if not mat.is_floating_point():
        raise TypeError(f"cholesky_upper_bound takes a real floating-point matrix, got {mat.dtype}")
    return _CholeskyBound.apply(mat)
