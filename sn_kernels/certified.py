"""Spectral normalization by a certified upper bound: ``bound="upper"`` and ``bound="operator"``.

Power iteration estimates sigma from below, so W / sigma_hat can have a spectral norm
above 1.  With ``bound="upper"`` the front ends divide by a number B that is certified
to be >= sigma(W) instead, so that the normalized weight

    W_sn = coeff * W / B          (soft=True: W / max(1, B / coeff))

has spectral norm <= coeff at every forward, training and eval, the first included.
sigma is that of the matrix view (``dim`` first, the rest flattened), not the operator
norm of a convolution (docs/lipschitz.md).

``bound="operator"`` bounds the layer's linear map itself, for every input size: for a
convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d; any stride, dilation, groups and padding
mode) B >= c min(sigma(R), sigma(S)) with R = W as (dim 0) x (the rest), S = W as
(dim 0, the taps) x (dim 1) and c = sqrt(taps * the padding's multiplicity) (``OperatorBound``,
``operator_bound``); for any other layer it is "upper".  Why it holds: output position o reads
input pi(o, a) through tap a, so y_o = R [x_pi(o, a)]_a and ||y||^2 <= sigma(R)^2 sum_o sum_a
||x_pi(o, a)||^2 <= sigma(R)^2 T mu ||x||^2, where no input element is read more than mu times
by one tap (mu = 1 for zero padding; the padding's multiplicity otherwise); the adjoint gives
the same with S (after Singla & Feizi, ICLR 2021, whose other two views are not used: their
Gram matrices are kh or kw times larger).  Grouped weights stack their groups' views, so
their sigma bounds every group's.  The carry becomes B_ref + c ||W - W_ref||_F (both views have
spectral norm <= the Frobenius norm), and ``output_factor`` covers the rounding of W_sn as an
operator: ||op(E)|| <= c ||E||_F.

B comes from two host-free computations, every ``bound_every`` training forwards the
first, in between the second:

* refresh (``refresh_bound``): on the CPU, one Gram product in float64 and a Cholesky
  certificate of lambda_max (``cholesky_bound.cholesky_upper_bound``: B / sigma within
  sqrt(1 + 2^-40) plus rounding terms, ~1e-12, unless its estimate missed); on other
  devices the Gram-iteration bound (Delattre et al., ICML 2023) of W in float64,
  ``GRAM_STEPS`` steps.  Both use the rounding accounting of ``sn_kernels.bounds`` (its
  ``_rescale``/``_unwind``/``_fro_up``, run with p clamped instead of checked, so that
  nothing is read back to the host) and its final margin ``_margin``; W is first scaled
  exactly by a power of two (from max |W|, a device reduction).  W_ref := W and B_ref :=
  that bound are kept.
* carry (Weyl's inequality): sigma(W) <= sigma(W_ref) + ||W - W_ref||_2
  <= B_ref + ||W - W_ref||_F, the Frobenius norm's square summed in float64 from the
  difference taken in the weight's dtype (one rounding per entry, relative 2u of that dtype,
  covered by the factor 1 / (1 - 2u)), its own rounding bounded by gamma_n as in
  ``bounds._inflate``; the sum B_ref + that is formed by three roundings of non-negative
  terms, covered by constant factors (``_with_rounding``).  On the CPU with the native backend,
  eager, the carry is one C++ op with a C++ autograd node (``_native_carry_step``,
  csrc/sn_kernels_carry_cpu.cpp: the same arithmetic, two passes over W each way); elsewhere tensor ops.

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

Gradient: W_sn = coeff W / B'(W), by autograd through ``coeff / B'`` and the product, with
two analytic pieces for B (the margins, ~1e-12 relative, held constant):

* refresh on the CPU (``cholesky_bound._CholeskyBound``): that of (B / sigma_1) sigma_1, B (W q) q^T /
  ||W q||^2 with q the top eigenvector of the Gram matrix (rank one: one product with W);
* refresh elsewhere (``_GramBound``): the Gram bound in exact arithmetic is the Schatten-2^(T+1)
  norm of W, whose gradient is B D / <D, W> with D = W G_1 ... G_T (the Gram iterates):
  T - 1 small products and one of W's size in the backward, about the forward's cost
  (autograd through the steps costs twice that; it is what a double backward runs);
* carry (``_Distance``): dB = (W - W_ref) / ||W - W_ref||_F times the constant rounding
  factors, W_ref and B_ref constants; at W = W_ref the subgradient 0 (``vector_norm``'s).

Under ``torch.compile`` the refresh schedule is not followed: a Python step counter would
make dynamo recompile at every step, so every compiled training forward refreshes (eval
forwards carry from the last refresh).  Eager training follows ``bound_every``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import dispatch, transforms
from .backends import native
from .backends.contract import accumulation_dtype, exporting, matrix_shape
from .backends.pytorch import as_matrix
from .bounds import (_ABS, _U, _fro_up, _gamma, _margin, _oriented, _pow2, _rescale, _unwind, _up,
                     check_gradual_underflow)
from .checks import check_call
from .cholesky_bound import cholesky_upper_bound
from .conv_norm import _CONV, _CONV_T, ConvSpec, conv_spec
from .functional import spectral_normalize

__all__ = ["GRAM_STEPS", "Certifier", "OperatorBound", "gram_upper_bound", "operator_bound", "output_factor",
           "refresh_bound"]

#: Gram steps of a refresh: the bound is within k^(1/2^11) of sigma (k the smaller side; 1.0034 for
#: k = 1024, 1.0024 for k = 128 in the worst case, a flat spectrum), much closer with a spectral gap
GRAM_STEPS = 10


class _GramBound(torch.autograd.Function):
    """B >= sigma(mat) by ``steps`` Gram steps (``gram_upper_bound``), with the analytic gradient of the
    Gram bound in exact arithmetic, the Schatten-p norm ||x||_p, p = 2^(steps+1), of x = mat (or mat^T,
    the smaller side k last): grad = x A^(p/2-1) / B^(p-1), A = x^T x; being 1-homogeneous, that is
    B D / <D, x> for any positive multiple D of x A^(2^steps - 1) = x G_1 G_2 ... G_steps (the Gram
    iterates G_t ~ A^(2^(t-1)) commute).  One product per step and one of x: about the forward's cost,
    half of what autograd through the steps costs."""

    @staticmethod
    def forward(ctx, mat: Tensor, steps: int) -> Tensor:
        x, p0 = _oriented(mat)
        cur, chain, grams = x.unsqueeze(0), [], []
        for _ in range(steps):
            h, p, e = _rescale(cur, checked=False)
            cur = h.mT @ h
            chain.append((p, e))
            grams.append(cur[0])
        upper = _unwind(_fro_up(cur), chain, upper=True, checked=False)[0]
        upper = _up(_up(upper * (1 + _margin(*mat.shape))) * _pow2(p0, checked=False))
        ctx.steps = steps
        ctx.save_for_backward(mat, upper, *grams)
        return upper

    @staticmethod
    def backward(ctx, grad: Tensor):
        mat, upper, *grams = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same gradient, by autograd through the steps
            (out,) = torch.autograd.grad(_smooth_bound(mat, upper.detach(), ctx.steps), mat, grad, create_graph=True)
            return out, None
        x, p0 = _oriented(mat)
        # the gradient is not part of the certificate: for a weight of at most float32 precision it is formed
        # in float32 (about half the time of float64 on a CPU; every Gram matrix has a Frobenius norm of at
        # most 4 after ``_rescale``, so their product cannot overflow)
        work = torch.float64 if mat.dtype == torch.float64 else torch.float32
        x = x.to(work)
        d = x
        if grams:
            m = grams[0].to(work)
            for g in grams[1:]:
                m = m @ g.to(work)
            d = x @ m
        inner = (d * x).sum()  # <D, x> = tr(A M) > 0 unless D = 0 (M is positive semi-definite)
        scale = torch.where(inner > 0, grad * upper / inner, torch.zeros_like(inner)) * _pow2(-p0, checked=False)
        d = d * scale
        if mat.shape[0] < mat.shape[1]:
            d = d.mT
        return d.to(mat.dtype), None


class _Distance(torch.autograd.Function):
    """||a - b||_F (a 0-d float64 tensor): the difference in a's dtype, its sum of squares in float64
    (``torch.dot``); gradient (a - b) / ||a - b||_F with b constant, 0 at a = b (the subgradient of
    ``vector_norm``), in a's dtype and without the float64 copy that ``vector_norm(..., dtype=)`` makes
    in its backward.  Twice differentiable."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        d = (a - b).reshape(-1).to(torch.float64)
        nrm = torch.sqrt(torch.dot(d, d))
        ctx.save_for_backward(a, b, nrm)
        return nrm

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, nrm = ctx.saved_tensors
        scale = torch.where(nrm > 0, grad / nrm, torch.zeros_like(nrm))
        return (a - b) * scale.to(a.dtype), None


def _native_carry_step(weight: Tensor, ref: Tensor, base: Tensor, k1: float, coeff: float,
                       soft: bool) -> tuple[Tensor, Tensor]:
    """The carry's (W_sn, B') in one C++ op with a C++ autograd node (``native_carry_eager``, CPU): W_sn =
    W fl(s), s = coeff / B' (soft: min(s, 1)), B' = (||fl(W - W_ref)||_F k1 + base)(1 + 4u), and the gradient
    G s + (W - W_ref) <G, W> ds/dnrm / nrm, each in two passes over W (csrc/sn_kernels_carry_cpu.cpp): the
    values of the tensor-op route (``Certifier.divisor`` with ``_Distance``) but for the order of the
    float64 sums.  A double backward differentiates the same forward in ATen ops."""
    return torch.ops.sn_kernels.native_carry_eager(weight, ref, base, k1, coeff, soft)


def _carried(weight: Tensor, ref: Tensor, k1: float, base: Tensor) -> Tensor:
    """The carried divisor B' = (||fl(W - W_ref)||_F k1 + base) (1 + 4u), differentiable (``_Distance``);
    ``native_carry_forward`` computes the same in C++."""
    return (_Distance.apply(weight, ref) * k1 + base) * (1 + 4 * _U)


def _scaled(weight: Tensor, den: Tensor, coeff: float, soft: bool) -> Tensor:
    """W fl(s), s = coeff / den (soft: min(s, 1)), in ``weight``'s accumulation dtype and cast back."""
    scale = coeff / den
    if soft:
        scale = scale.clamp(max=1.0)
    acc = accumulation_dtype(weight.dtype)
    # a weight that is zero or nearly so has a bound so small that s overflows the accumulation dtype (and
    # 0 * inf is NaN): it normalizes to 0, with a zero gradient, as plain spectral norm does a zero weight
    # (sigma = 0); a smaller s only lowers ||W s||, so the bound holds.  A NaN s (a NaN or Inf weight
    # since the reference) gives 0 too: W_sn is then 0 where W is finite, as after a refresh
    scale = torch.where(scale <= torch.finfo(acc).max, scale, torch.zeros_like(scale))
    return (weight.to(acc) * scale.to(acc)).to(weight.dtype)


def _native_carry(weight: Tensor) -> bool:
    """Whether the carry of ``weight`` takes the C++ ops: an eager CPU weight whose selected backend is
    "native" (with an extension that has them).  The ops are CPU kernels only: compiled carries trace the
    tensor ops, and other backends and devices run them."""
    if weight.device.type != "cpu" or torch.compiler.is_compiling() or weight.is_complex():
        return False
    if dispatch.resolve(weight.device).name != "native":
        return False
    return native.has_op("native_carry_eager")


def _smooth_bound(mat: Tensor, upper: Tensor, steps: int) -> Tensor:
    """``upper`` in value, with the derivatives (first and second) of the Gram bound in exact arithmetic:
    upper exp((log ||G_T||_F - its value) / 2^T), the scalings 2^-p_t held constant."""
    cur = _oriented(mat)[0].unsqueeze(0)
    for _ in range(steps):
        h = _rescale(cur, checked=False)[0]
        cur = h.mT @ h
    log_fro = torch.log(torch.linalg.vector_norm(cur).clamp_min(2.0 ** -1022))
    return upper * torch.exp((log_fro - log_fro.detach()) / 2 ** steps)


def gram_upper_bound(mat: Tensor, steps: int = GRAM_STEPS) -> Tensor:
    """A certified upper bound on the largest singular value of the 2-D real ``mat`` (in real arithmetic,
    the rounding of every step accounted for): a 0-d float64 tensor on ``mat``'s device, computed
    without host synchronisation.  Differentiable (``_GramBound``), twice too.  ``steps`` Gram steps
    on the smaller side (0: the Frobenius norm, unscaled; a vector takes at most 1, exact); within
    k^(1/2^(steps+1)) of sigma, k the smaller side."""
    if mat.dim() != 2:
        raise ValueError(f"gram_upper_bound takes a matrix, got a {mat.dim()}-d tensor")
    if not mat.is_floating_point():
        raise TypeError(f"gram_upper_bound takes a real floating-point matrix, got {mat.dtype}")
    if min(mat.shape) == 1:
        steps = min(steps, 1)  # a vector: one step (its squared norm, scaled: no overflow) is exact
    return _GramBound.apply(mat, steps)


def refresh_bound(mat: Tensor) -> Tensor:
    """The certified bound a refresh computes for the matrix ``mat``: the Cholesky certificate on the CPU
    (``cholesky_bound.cholesky_upper_bound``: one Gram product, 2x faster than the Gram iteration on large
    weights and tight to about 1e-11), the Gram iteration elsewhere (matrix products only: ``cholesky_ex`` and
    ``eigvalsh`` have not been measured, nor checked for host synchronisation, on a GPU)."""
    if mat.device.type == "cpu":
        return cholesky_upper_bound(mat)
    return gram_upper_bound(mat)


@dataclass(frozen=True)
class OperatorBound:
    """What ``bound="operator"`` knows of a layer (module docstring).  ``conv``: its operator norm, at
    every input size, is at most ``factor`` times the smaller sigma of the two ``views`` of the weight;
    else it is sigma of the matrix view (Linear, Embedding, a vector), as with ``bound="upper"``."""

    factor: float = 1.0
    conv: bool = False

    def views(self, weight: Tensor) -> tuple[Tensor, ...]:
        """R = W as (dim 0) x (the rest) and S = W as (dim 0, taps) x (dim 1), any row order; R alone for
        a single tap (S is then R)."""
        r = weight.reshape(weight.shape[0], -1)
        if weight[0, 0].numel() == 1:
            return (r,)
        return r, weight.movedim(1, -1).reshape(-1, weight.shape[1])

    def smaller_sides(self, weight: Tensor) -> tuple[int, int]:
        """min(rows, columns) of R and of S, from the shape alone."""
        n, a, b = weight.numel(), weight.shape[0], weight.shape[1]
        return min(a, n // a), min(n // b, b)


def _source(mode: str, q: int, n: int, left: int) -> int:
    """The input element that padded position ``q`` holds (``F.pad`` with ``mode``, ``left`` elements before)."""
    i = q - left
    if mode == "circular":
        return i % n
    if mode == "reflect":
        period = 2 * (n - 1)
        i = abs(i) % period if period else 0
        return period - i if i >= n else i
    return min(max(i, 0), n - 1)  # replicate


def _most_reads(mode: str, left: int, right: int, reach: int) -> int:
    """The most times one tap (stride 1: any stride reads a subset) reads one input element along one
    padded dim, over every input size n that ``F.pad`` and the convolution accept: counted, for n up to
    2 (left + right + reach) + 4; beyond that the two padded ends no longer reach the same elements and
    the count is periodic in nothing but n's size, so it does not grow."""
    most = 1
    for n in range(1, 2 * (left + right + reach) + 5):
        if (mode == "circular" and max(left, right) > n) or (mode == "reflect" and max(left, right) >= n):
            continue  # refused by F.pad
        out = n + left + right - reach
        for a in range(0, reach + 1):  # every tap offset, dilated or not
            reads: dict[int, int] = {}
            for o in range(out):
                src = _source(mode, o + a, n, left)
                reads[src] = reads.get(src, 0) + 1
            most = max(most, max(reads.values(), default=1))
    return most


def _padding_multiplicity(spec: ConvSpec) -> int:
    """The most times one tap reads an input element, over every input size and stride: 1 for zero padding
    (the padded zeros hold no input), else the product over dims of ``_most_reads`` (the padding is
    separable): up to 3 for circular padding beyond the kernel's reach (a 1-element input padded by 1 on
    each side is read 3 times), 3 for reflect, 1 + both pads for replicate (a 1-element input repeated to
    either side)."""
    pad, _ = spec.explicit_pad()
    if pad is None or spec.pad_mode == "constant":
        return 1
    mult = 1
    for i in range(spec.ndim):
        j = spec.ndim - 1 - i  # F.pad lists the last dim first
        mult *= _most_reads(spec.padding_mode, pad[2 * j], pad[2 * j + 1],
                            spec.dilation[i] * (spec.kernel_size[i] - 1))
    return mult


def operator_bound(module: nn.Module | None, name: str, weight: Tensor) -> OperatorBound:
    """The ``OperatorBound`` of ``module.<name>``: a convolution's weight gets sqrt(taps * multiplicity)
    (rounded up) and its two views; a weight of at most 2 dims is its own matrix; anything else is
    refused (its operator is unknown)."""
    if isinstance(module, _CONV + _CONV_T) and name == "weight" and weight.dim() >= 3:
        spec = conv_spec(module)
        taps = math.prod(spec.kernel_size) * _padding_multiplicity(spec)
        return OperatorBound(factor=math.nextafter(math.sqrt(taps), math.inf), conv=True)
    if weight.dim() <= 2:
        return OperatorBound()
    what = type(module).__name__ if module is not None else "a bare weight"
    raise ValueError(f"bound='operator' knows the operator of nn.Conv*/ConvTranspose* weights and of weights of "
                     f"at most 2 dims, not a {weight.dim()}-d weight of {what}; bound='upper' certifies its matrix "
                     "view")


def output_factor(weight: Tensor, dim: int, coeff: float, operator: OperatorBound | None = None) -> float:
    """The factor f >= (1 + delta sqrt(k)) / (1 - c sqrt(numel) eta / coeff) by which the bound is raised
    so that the rounded W_sn = fl(W fl(coeff / (f B))) still has spectral norm <= coeff (module
    docstring); k is the smaller side of the matrix view (c = 1), or of the larger of a convolution's
    two views with c its ``OperatorBound.factor`` (||W||_F <= sqrt(k) sigma for each view); from the
    weight's dtype and shape only (no tensor data)."""
    fd, fa = torch.finfo(weight.dtype), torch.finfo(accumulation_dtype(weight.dtype))
    if operator is not None and operator.conv:
        k, c = max(operator.smaller_sides(weight)), operator.factor
    else:
        k, c = min(matrix_shape(weight, dim)), 1.0
    # (1 + u64)(1 + u_acc)^2 (1 + u_dtype) - 1, doubled for the higher-order terms
    delta = 2 * (_U + fa.eps + fd.eps / 2)
    eta = fd.smallest_normal * fd.eps + fa.smallest_normal * fa.eps  # two subnormal spacings
    if not coeff <= fd.max:
        # W_sn's entries are at most sigma(W_sn) <= coeff: within the dtype's range only if coeff is
        raise ValueError(f"coeff={coeff} is above the largest finite {weight.dtype} ({fd.max:g}): a certified "
                         f"{weight.dtype} W_sn could overflow to inf")
    room = 1 - c * math.sqrt(weight.numel()) * eta / coeff
    if room < 0.5:
        raise ValueError(f"coeff={coeff} is too small for a certified {weight.dtype} weight of shape "
                         f"{tuple(weight.shape)}: its rounding to subnormals alone could exceed it")
    return math.nextafter((1 + delta * math.sqrt(k)) / room * (1 + 8 * _U), math.inf)


def _subtraction_factor(dtype: torch.dtype) -> float:
    """1 / (1 - 2 u) rounded up: fl(a - b) = (a - b)(1 + d), |d| <= 2 u (u of ``dtype``; 2 u: a half
    subtraction may round twice, through float32), so ||W - W_ref|| <= ||fl(W - W_ref)|| / (1 - 2 u)."""
    return math.nextafter(1 / (1 - torch.finfo(dtype).eps), math.inf)


def _with_rounding(c: float, ops: int = 1) -> float:
    """c (1 + 4 u)^ops rounded up: fl(x c') >= x c for x >= 0 and c' = _with_rounding(c), and each of
    ``ops`` further roundings of a sum or product of non-negative terms is covered by one more factor."""
    for _ in range(ops):
        c = math.nextafter(c * (1 + 4 * _U), math.inf)
    return c


def _carry_slack(weight: Tensor) -> float:
    """sub * (absolute error of the carry's float64 norm), rounded up: each square of a difference that
    falls below the normal range is off by at most 2^-1075 (gradual underflow), so the sum of n squares
    by n 2^-1075 and the norm by sqrt(n) 2^-537.5 (float64 weights only: a float32 difference squares to
    at least 2^-298), plus bounds' own absolute slack."""
    return _with_rounding(_subtraction_factor(weight.dtype) * (_ABS + math.sqrt(weight.numel()) * 2.0 ** -537))


def _kept(t: Tensor, copy: bool = False) -> Tensor:
    """``t`` detached, to keep across calls (``copy``: in storage of its own), never an inference tensor: one
    made under ``torch.inference_mode`` is copied outside it, since a later forward with autograd could not
    save it for backward.  Compiled code is traced outside inference mode (and dynamo cannot ask)."""
    t = t.detach()
    if torch.compiler.is_compiling() or not (torch.is_inference_mode_enabled() or t.is_inference()):
        return t.clone() if copy else t
    with torch.inference_mode(False):
        return t.clone()


def _iterate(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int,
             order: str) -> Tensor:
    """The power iteration alone, as the front ends run it (u, v updated in place): sigma_hat.  Eager: the
    selected backend's power-iteration op (no W / sigma); compiled: ``spectral_normalize``, whose unused
    W / sigma the compiler drops."""
    weight = weight.detach()
    if torch.compiler.is_compiling():
        return spectral_normalize(weight, u, v, n_power_iterations=n_power_iterations, eps=eps, dim=dim,
                                  order=order, training=True)[1]
    chosen = dispatch.resolve(weight.device)
    if not chosen.eager_checks_args:
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)
    return chosen.power_iteration(weight, u, v, n_power_iterations, float(eps), dim, order, True)[0]


class Certifier:
    """The state of ``bound="upper"`` / ``"operator"`` for one weight: W_ref, B_ref >= sigma(W_ref) (or
    the operator norm) and the training forwards left before the next refresh.  Plain attributes, never
    in the state_dict; a copy or a pickle drops them (``__getstate__``), so its first forward refreshes.
    Eager, none is an inference tensor, even when made under ``torch.inference_mode`` (``_kept``)."""

    operator: OperatorBound | None = None  # bound="operator"; None: the matrix view ("upper")

    def __init__(self, bound_every: int = 1, operator: OperatorBound | None = None) -> None:
        self.bound_every = bound_every
        self.operator = operator
        self.invalidate()

    @classmethod
    def make(cls, bound: str, bound_every: int, weight: Tensor, operator: OperatorBound | None = None) -> "Certifier":
        """The certifier of a front end for ``bound`` ("upper" or "operator"); "operator" without the
        layer's ``OperatorBound`` takes the weight's own (a matrix; refused for more dims)."""
        if bound == "upper":
            return cls(bound_every)
        return cls(bound_every, operator if operator is not None else operator_bound(None, "", weight))

    @property
    def bound(self) -> str:
        """What is certified: "upper" (the matrix view) or "operator"."""
        return "upper" if self.operator is None else "operator"

    def invalidate(self) -> None:
        """Forget W_ref and B_ref: the next forward refreshes."""
        self.ref: Tensor | None = None  # W_ref: a detached copy (the weight's dtype and device)
        self.ref_bound: Tensor | None = None  # B_ref >= sigma(W_ref): 0-d float64, same device
        self.ref_base: Tensor | None = None  # >= f (B_ref + the absolute slack of the carry's norm)
        self.left = 0  # training forwards that carry before the next refresh
        self.estimate: Tensor | None = None  # the power iteration's sigma_hat (latest training forward)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(ref=None, ref_bound=None, ref_base=None, left=0, estimate=None)
        state.pop("_k1", None)
        return state

    def _valid_for(self, weight: Tensor) -> bool:
        ref = self.ref
        return (ref is not None and ref.shape == weight.shape and ref.dtype == weight.dtype
                and ref.device == weight.device)

    def _refresh_due(self, weight: Tensor, training: bool) -> bool:
        """Whether this forward recomputes the Gram bound (no valid W_ref, a training forward at the end of
        the schedule, or any compiled training forward) rather than carrying B_ref."""
        if training and torch.compiler.is_compiling():
            return True  # first: a compiled training graph then does not depend on (guard) whether W_ref is set
        if not self._valid_for(weight):
            return True
        return training and self.left <= 0

    def _carry_constants(self, weight: Tensor, factor: float) -> float:
        """k1: B' = (||fl(W - W_ref)||_F k1 + ref_base) (1 + 4u) (``divisor``'s carry)."""
        c = 1.0 if self.operator is None else self.operator.factor
        return _with_rounding(factor * c * _subtraction_factor(weight.dtype) * (1 + _gamma(weight.numel())), 3)

    def _carry_k1(self, weight: Tensor, dim: int, coeff: float) -> float:
        """``_carry_constants`` of ``output_factor``: a function of the weight's dtype and shape, dim and coeff
        only, kept for the last of them (the native carry's every step asked again: 25 us of Python)."""
        key = (weight.dtype, weight.shape, dim, coeff)
        cached = self.__dict__.get("_k1")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_k1"] = (key, self._carry_constants(weight, output_factor(weight, dim, coeff,
                                                                                                   self.operator)))
        return cached[1]

    def divisor(self, weight: Tensor, dim: int, coeff: float, training: bool, keep: bool = True) -> Tensor:
        """B' >= output_factor * sigma(W): a 0-d float64 tensor, differentiable with respect to ``weight``;
        a refresh when due (``keep=False``: computed without storing anything), else the carry."""
        op = self.operator
        factor = output_factor(weight, dim, coeff, op)
        c = 1.0 if op is None else op.factor  # ||op(W - W_ref)|| <= c ||W - W_ref||_F
        if self._refresh_due(weight, training):
            if op is not None and op.conv:
                bounds = [refresh_bound(view) for view in op.views(weight)]
                bound = (bounds[0] if len(bounds) == 1 else torch.minimum(*bounds)) * _with_rounding(c)
            else:
                bound = refresh_bound(as_matrix(weight, dim))
            if keep:
                with torch.no_grad():
                    self.ref_base = _kept(_up(_up(bound + _with_rounding(_carry_slack(weight) * c)) * factor))
                self.ref, self.ref_bound = _kept(weight, copy=True), _kept(bound)
                self.left = self.bound_every - 1
            return bound * _with_rounding(factor)  # >= bound * factor after its rounding
        if training and keep:
            self.left -= 1
        # ||W - W_ref||_F <= sub ||fl(W - W_ref)||_F <= sub ((1 + gamma_n) nrm + abs) (``_carry_slack``), so
        # B' = f (B_ref + c that) is reached by (nrm k1 + base) (1 + 4u) with three roundings of >= 0 terms
        return _carried(weight, self.ref, self._carry_constants(weight, factor), self.ref_base)

    def normalize(self, weight: Tensor, u: Tensor | None, v: Tensor | None, *, n_power_iterations: int,
                  eps: float, dim: int, order: str, training: bool, coeff: float | None,
                  soft: bool) -> tuple[Tensor, Tensor]:
        """(W_sn, B'): the certified forward.  In training the power iteration runs as usual (u, v
        updated; its sigma_hat kept in ``estimate``); W_sn does not depend on it."""
        transforms.refuse(f'bound="{self.bound}"', weight)
        check_gradual_underflow(f'a bound="{self.bound}" spectral norm')
        if training and exporting():
            # export keeps the forward's ops but not the bound's autograd.Functions: the program's backward
            # would differentiate the rounding steps (nextafter has no derivative)
            raise NotImplementedError(
                f'sn_kernels: torch.export of a bound="{self.bound}" layer in training mode is not supported (the '
                "exported program could not differentiate the bound); export it in eval mode, or after "
                "sn_kernels.freeze(model)")
        if training and u is not None:
            with torch.no_grad():
                self.estimate = _kept(_iterate(weight, u, v, n_power_iterations, eps, dim, order))
        coeff = 1.0 if coeff is None else float(coeff)
        if _native_carry(weight) and not self._refresh_due(weight, training):
            # the carry in two C++ passes forward and two backward (the same W_sn; csrc/sn_kernels_carry_cpu.cpp)
            if training:
                self.left -= 1
            k1 = self._carry_k1(weight, dim, coeff)
            weight_sn, den = _native_carry_step(weight, self.ref, self.ref_base, k1, coeff, soft)
            return weight_sn, den.detach()
        den = self.divisor(weight, dim, coeff, training)
        return _scaled(weight, den, coeff, soft), den.detach()
