"""Argument checks and constants shared by the op and every front end (defined once here)."""
from __future__ import annotations

import math
import numbers
import operator
import threading

import torch
from torch import Tensor, nn

from .backends.contract import ORDERS, accumulation_dtype, matrix_shape

#: the two front ends: "hook" (torch.nn.utils.spectral_norm), "parametrization"
#: (torch.nn.utils.parametrizations.spectral_norm)
APIS = ("hook", "parametrization")
MODES = ("matrix", "conv")
#: what a front end divides by: "estimate" (sigma_hat of power iteration, PyTorch's), "upper"
#: (a certified upper bound on sigma of the matrix view) or "operator" (a certified upper bound on
#: the layer's operator norm at every input size; a convolution's too): sn_kernels/certified.py
BOUNDS = ("estimate", "upper", "operator")
#: power iterations run when u, v are drawn, so that sigma is already close at the first
#: forward, even in eval mode (PyTorch's parametrization warms up the same way)
INIT_ITERATIONS = 15
#: float32's smallest normal number: the smallest eps any weight takes (``check_eps_in``)
EPS_MIN = torch.finfo(torch.float32).tiny

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def default_dim(module: nn.Module) -> int:
    """PyTorch's default: dim=1 for ConvTranspose*, 0 otherwise."""
    return 1 if isinstance(module, _CONV_TRANSPOSE) else 0


def check_api(api: str) -> str:
    """Refuse an ``api`` other than "hook" or "parametrization"."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    return api


def check_iterations_eps(n_power_iterations: int, eps: float) -> None:
    """n_power_iterations a positive int (bool refused), eps > 0 and finite: PyTorch's messages.  The
    front ends take any integer first (``front_end_iterations``); the op itself wants an int."""
    if type(n_power_iterations) is not int:
        raise TypeError(f"n_power_iterations must be an int, got {type(n_power_iterations).__name__} "
                        f"{n_power_iterations!r}")
    if n_power_iterations <= 0:
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
    try:
        positive_finite = 0 < eps < math.inf  # NaN fails too; an infinite eps would zero u and v for good
    except TypeError:  # a str, None, a complex number
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}") from None
    if not positive_finite:
        raise ValueError(f"Expected eps to be positive and finite, but got eps={eps}")


def check_eps_in(eps: float, dtype: torch.dtype) -> None:
    """Refuse an eps below the smallest normal number of the dtype a ``dtype`` weight is computed in
    (``accumulation_dtype`` of its real dtype): a smaller one is 0 there (1e-50 in float32), or flushed
    to 0 (a subnormal, under ``torch.set_flush_denormal(True)``), and a zero weight's sigma
    |s|^2 / max(|s|, eps) would be 0/0 = NaN.  C++'s ``check_eps_in`` (csrc/common.h) raises the same
    message.  Callers on a hot path test ``eps < EPS_MIN`` first: the usual eps stops there."""
    acc = accumulation_dtype(dtype.to_real())
    tiny = torch.finfo(acc).tiny
    if eps < tiny:
        raise ValueError(f"Expected eps to be at least {tiny:g}, the smallest normal {acc} ({dtype} weights are "
                         f"computed in {acc}; a smaller eps is zero there), but got eps={float(eps):g}")


def front_end_iterations(n_power_iterations) -> int:
    """``n_power_iterations`` as a front end (a wrap, a layer) takes it: any integer PyTorch's front ends
    take (a NumPy integer, a one-element integer tensor, a bool), as an int; other types refused."""
    if type(n_power_iterations) is int:
        return n_power_iterations
    if isinstance(n_power_iterations, float) or (
            isinstance(n_power_iterations, Tensor) and n_power_iterations.is_floating_point()):
        raise TypeError(f"n_power_iterations must be an integer, got {n_power_iterations!r}")
    try:
        return operator.index(n_power_iterations)
    except TypeError:
        raise TypeError(f"n_power_iterations must be an integer, got {type(n_power_iterations).__name__}") from None


def call_iterations(n_power_iterations, training: bool) -> tuple:
    """(n_power_iterations, training) for one call of a layer's spectral norm.  PyTorch's front ends refuse
    a count <= 0 when wrapping but iterate ``range(n_power_iterations)`` at each call, so a count set to 0
    or less afterwards (``layer.parametrizations.weight[0].n_power_iterations = 0``, a common way to
    freeze u, v) iterates nothing and divides by sigma = u . (W v) of the stored u, v: the eval
    computation, which is what such a call becomes here."""
    if type(n_power_iterations) is int and n_power_iterations <= 0:
        return 1, False
    return n_power_iterations, training


def front_end_dim(dim) -> int:
    """``dim`` as an int, its sign kept: any integer (a NumPy integer, a one-element integer tensor, a
    bool), or a real number equal to 0, which PyTorch's front ends take as dim 0 (they test ``dim != 0``
    before using it); anything else refused with a TypeError naming dim (PyTorch's fail in permute)."""
    try:
        return operator.index(dim)
    except TypeError:
        pass
    if isinstance(dim, Tensor) and dim.numel() == 1 and not dim.is_complex():
        dim = dim.item()
    if isinstance(dim, numbers.Real) and dim == 0:
        return 0
    raise TypeError(f"dim must be an integer, got {type(dim).__name__} {dim!r}")


def check_weight_args(weight: Tensor, n_power_iterations: int, eps: float, dim: int) -> int:
    """Refuse what the op and every front end refuse (a weight neither floating-point nor
    complex, a 0-d weight, n_power_iterations <= 0, eps <= 0 or below the weight's computation
    range (``check_eps_in``), dim not an integer or out of range); return ``dim`` as a
    non-negative int (``front_end_dim``)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"spectral norm needs a floating-point or complex weight, got {weight.dtype}")
    ndim = weight.dim()
    if ndim == 0:
        raise ValueError("spectral norm needs a weight with at least one dimension, got a 0-d tensor")
    check_iterations_eps(n_power_iterations, eps)
    if eps < EPS_MIN:
        check_eps_in(eps, weight.dtype)
    if type(dim) is not int:
        dim = front_end_dim(dim)
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}] but got {dim})")
    return dim % ndim


def check_call(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int,
               order: str, *, empty_ok: bool = False, written: bool = False) -> int:
    """Validate the arguments of ``spectral_normalize``; return ``dim`` made non-negative.
    An empty weight is refused unless ``empty_ok`` (the op's own route for it: functional.py);
    with ``written`` (a training call, which updates u, v in place) u, v sharing memory with each
    other or the weight are refused too (``check_written_vectors``).

    Runs on every call, so the common case is a handful of cheap tests; the error
    messages are built only when raising (``_vector_error``)."""
    if order != "uv" and order != "vu":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    dim = check_weight_args(weight, n_power_iterations, eps, dim)
    m, n = matrix_shape(weight, dim)
    if (m == 0 or n == 0) and not empty_ok:
        raise ValueError(f"spectral norm of an empty weight of shape {tuple(weight.shape)} is undefined")
    # fast path: both vectors fine (the same tests as _vector_error, which names the first failure)
    if not (isinstance(u, Tensor) and isinstance(v, Tensor) and u.shape == (m,) and v.shape == (n,)
            and u.dtype == weight.dtype == v.dtype and u.device == weight.device == v.device
            and u.is_contiguous() and v.is_contiguous()):
        _vector_error(weight, u, v, m, n, dim)
    if written:
        check_written_vectors(weight, u, v)
    return dim


def check_written_vectors(weight: Tensor, u: Tensor, v: Tensor) -> None:
    """A training step writes u and v in place between its reads of W, u and v: refuse vectors that share
    memory with each other or with the weight, whose writes would feed the later reads silently (the native
    op's check, csrc/common.h, in its words)."""
    for a, b, names in ((u, v, "u and v"), (u, weight, "u and the weight"), (v, weight, "v and the weight")):
        if _extents_overlap(a, b):
            raise ValueError(f"{names} share memory; u and v are updated in place by the power iteration, so "
                             "they must not overlap each other or the weight (pass separate tensors)")


def _unwrapped(t: Tensor) -> Tensor:
    """The tensor under torch.func's wrappers (grad, jacrev, vmap), whose memory it is."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _extents_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether a and b may share memory: overlapping byte extents on one device, addresses compared (views of
    one buffer through different storages, numpy's, included; a strided tensor's gaps count as its own)."""
    a, b = _unwrapped(a), _unwrapped(b)
    if a.layout != torch.strided or b.layout != torch.strided or a.device != b.device:
        return False
    try:
        a0, b0 = a.data_ptr(), b.data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper without storage (functorch, fake)
        return False
    if a0 == 0 or b0 == 0:  # no data (meta)
        return False

    def end(t: Tensor, first: int) -> int:
        return first + (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()

    return a0 < end(b, b0) and b0 < end(a, a0)


def check_group(weights, us, vs, n_power_iterations: int, eps: float, dims, order: str) -> None:
    """``check_call`` for every weight of a group (``sn_kernels.group`` on a backend that does not check
    its own arguments): the shared arguments once, each weight by the fast test alone, and
    ``check_call`` itself (its message) for a weight that fails it.  ``dims`` are non-negative."""
    if order != "uv" and order != "vu":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_iterations_eps(n_power_iterations, eps)
    if eps < EPS_MIN:
        for w in weights:
            check_eps_in(eps, w.dtype)
    for w, u, v, dim in zip(weights, us, vs, dims):
        m = w.shape[dim] if 0 <= dim < w.dim() else 0
        n = w.numel() // m if m else 0
        if not (n and u.shape == (m,) and v.shape == (n,) and u.dtype == w.dtype == v.dtype
                and u.device == w.device == v.device and u.is_contiguous() and v.is_contiguous()):
            check_call(w, u, v, n_power_iterations, eps, dim, order)


def _vector_error(weight: Tensor, u, v, m: int, n: int, dim: int) -> None:
    """Raise the error for the first bad vector argument of ``spectral_normalize``."""
    for name, vec, size in (("u", u, m), ("v", v, n)):
        if not isinstance(vec, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(vec).__name__}")
        if vec.shape != (size,):
            raise ValueError(
                f"{name} must have shape ({size},) for a weight of shape {tuple(weight.shape)} "
                f"with dim={dim}, got {tuple(vec.shape)}"
            )
        if vec.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {vec.dtype} but the weight has {weight.dtype}")
        if vec.device != weight.device:
            raise ValueError(f"{name} is on {vec.device} but the weight is on {weight.device}")
        if not vec.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    raise AssertionError("unreachable: _vector_error found no bad vector")


def check_variant(weight: Tensor, coeff, soft: bool, gain) -> None:
    """Refuse a bad Lipschitz ``coeff`` (``check_coeff``), ``soft`` without ``coeff``, a bad ``gain``,
    and any variant on a complex weight."""
    if coeff is not None:
        check_coeff(weight, coeff)
    if soft and coeff is None:
        raise ValueError("soft=True needs a Lipschitz coefficient: pass coeff=...")
    if isinstance(gain, bool):  # a front end's "add a gain" flag
        has_gain = gain
    else:  # the op's gamma
        has_gain = gain is not None
        if has_gain and (not isinstance(gain, Tensor) or gain.numel() != 1):
            raise TypeError("gain must be a one-element tensor (the learnable scalar gamma)")
        if has_gain and gain.device != weight.device:
            raise ValueError(f"gain is on {gain.device} but the weight is on {weight.device}")
    if isinstance(weight, Tensor) and weight.is_complex() and (coeff is not None or soft or has_gain):
        raise ValueError("coeff, soft and gain support real weights only, got a complex weight")


def check_coeff(weight: Tensor, coeff) -> None:
    """Refuse a ``coeff`` that is not a real number (a NumPy scalar is; a bool is not), not positive, or
    not finite in the dtype that scales by it (the weight's, float32 at least): an infinite coeff would
    make W / (sigma / coeff) silently zero."""
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real):
        raise TypeError(f"coeff must be a real number, got {type(coeff).__name__} {coeff!r}")
    if not coeff > 0:  # NaN fails too
        raise ValueError(f"coeff must be a positive number, got {coeff!r}")
    dtype = torch.promote_types(weight.dtype, torch.float32) if isinstance(weight, Tensor) else torch.float64
    # compared exactly, an int past float64's range too; a NumPy scalar as a Python number (NumPy would cast the
    # float64 bound to its own type, float32 or int64, with an overflow warning at every call)
    try:
        value = int(coeff) if isinstance(coeff, numbers.Integral) else float(coeff)
    except OverflowError:  # a Fraction past float64's range
        value = math.inf
    if not value <= torch.finfo(dtype).max:
        raise ValueError(f"coeff must be finite in {dtype}, the dtype that scales the weight by it, got {coeff!r}")


def check_mode(mode: str, dim, coeff, soft, gain, conv_options: dict) -> bool:
    """Whether ``mode`` is "conv"; refuse keyword combinations that it does not support, and
    ``conv_options`` in matrix mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'matrix' or 'conv', got {mode!r}")
    if mode == "conv":
        if dim is not None or coeff is not None or soft or gain:
            raise ValueError("mode='conv' normalizes by the convolution operator: dim, coeff, soft and gain "
                             "do not apply")
        return True
    if conv_options:
        raise TypeError(f"unexpected keyword arguments {sorted(conv_options)} (only for mode='conv')")
    return False


def check_bound(bound: str, bound_every, weight=None, *, gain: bool = False, mode: str = "matrix") -> bool:
    """Whether ``bound`` is certified ("upper" or "operator"); refuse an unknown ``bound``, a
    ``bound_every`` that is not an int >= 1, and a certified bound with ``gain`` (the trainable gain
    would be the layer's norm: nothing bounds it), with mode="conv" or with a complex weight."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if type(bound_every) is not int:
        raise TypeError(f"bound_every must be an int >= 1, got {bound_every!r}")
    if bound_every < 1:
        raise ValueError(f"bound_every must be an int >= 1, got {bound_every!r}")
    if bound == "estimate":
        return False
    if gain:
        raise ValueError(f"bound={bound!r} does not support gain=True: the trainable gain would set the layer's "
                         "norm, so no bound would hold (use coeff for a fixed Lipschitz constant)")
    if mode == "conv":
        raise ValueError(f"bound={bound!r} needs mode='matrix': mode='conv' divides by an uncertified estimate of "
                         "the convolution operator's norm; bound='operator' certifies that operator instead")
    if isinstance(weight, Tensor) and weight.is_complex():
        raise ValueError(f"bound={bound!r} supports real weights only, got {weight.dtype}")
    return True


def check_no_second_hook(existing, name: str) -> None:
    """Refuse a second hook-API spectral norm on one parameter (``existing``: the one found, or None),
    in PyTorch's words."""
    if existing is not None:
        raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")


def check_not_lazy(weight) -> None:
    """Refuse a lazy module's uninitialized parameter before anything changes, in PyTorch's words."""
    if nn.parameter.is_lazy(weight):
        raise ValueError(
            "The module passed to `SpectralNorm` can't have uninitialized parameters. "
            "Make sure to run the dummy forward before applying spectral normalization"
        )


def take_pending(state):
    """The W/sigma that ``sn_kernels.group`` computed ahead for this spectral norm, taken once (None: the
    layer computes its own).  Not one its validity check refuses (``pending_holds``, set with it): a
    model call interrupted by a BaseException leaves its W/sigma behind, stale once the weight, u or
    mode changed."""
    pending = state.pending
    if pending is None:
        return None
    thread = getattr(state, "pending_thread", None)
    if thread is not None and thread != threading.get_ident():
        return None  # computed by another thread's call of the same grouped model (for its grad mode): not ours
    state.__dict__["pending"] = None  # on a parametrization, nn.Module.__setattr__'s checks cost more
    holds = getattr(state, "pending_holds", None)
    if holds is not None:
        state.__dict__["pending_holds"] = None
        if not holds():
            return None
    return pending
