"""The op: ``spectral_normalize`` and the glue every backend shares.

Every backend provides two custom ops with these schemas (PyTorch allows an
autograd formula only on functional ops, so the in-place power iteration and
the differentiable division are separate ops; they are separate launches anyway,
because W / sigma needs sigma, a reduction over all of W):

    {backend}_power_iteration(Tensor weight, Tensor(a!) u, Tensor(b!) v,
        int n_power_iterations, float eps, int dim, str order, bool training)
        -> (Tensor sigma, Tensor u_used, Tensor v_used)
    {backend}_normalize(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim)
        -> Tensor weight_sn

plus a backward callable ``backward(grad, weight, u, v, sigma, dim)`` for
``normalize``.  ``u_used``/``v_used`` are copies of the vectors sigma was computed
with: the buffers may be updated again (D(real) and D(fake) in one graph) before
the backward runs, so the backward must not read them.  sigma is a 0-d tensor in
the accumulation dtype (float32 for float16/bfloat16 weights).  This module gives
every backend the same fake implementations and the same analytic gradient,

    grad_W = (G - <G, W_sn> u v^T) / sigma,

so no backend is ever differentiated through its power iteration.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import Tensor

from . import dispatch

ORDERS = ("vu", "uv")  # "vu": torch.nn.utils.spectral_norm; "uv": parametrizations.spectral_norm


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_shape(weight: Tensor, dim: int) -> tuple[int, int]:
    """(m, n) of the matrix view of ``weight``: ``dim`` first, the rest flattened."""
    m = weight.shape[dim]
    return m, (weight.numel() // m if m else 0)


def _fake_power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    return (weight.new_empty((), dtype=accumulation_dtype(weight.dtype)), torch.empty_like(u), torch.empty_like(v))


def _fake_normalize(weight, u, v, sigma, dim):
    return torch.empty_like(weight)


def _weight_grad(backward: Callable, grad, weight, u, v, sigma, dim):
    """The weight gradient of ``normalize``; with create_graph=True the plain-torch
    formula, which is itself differentiable (kernels are not)."""
    if torch.is_grad_enabled():
        from .reference import backward as differentiable_backward

        return differentiable_backward(grad, weight, u, v, sigma, dim)
    return backward(grad, weight, u, v, sigma, dim)


class _EagerNormalize(torch.autograd.Function):
    """Eager-mode path of ``normalize``: calls the backend's functions directly,
    skipping the custom-op wrapper's per-call checks (tens of microseconds that
    dominate for small weights).  ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(ctx, weight, u, v, sigma, dim, backend):
        ctx.dim, ctx.backend = dim, backend
        ctx.save_for_backward(weight, u, v, sigma)
        return backend.normalize_impl(weight, u, v, sigma, dim)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        weight, u, v, sigma = ctx.saved_tensors
        return _weight_grad(ctx.backend.backward, grad, weight, u, v, sigma, ctx.dim), None, None, None, None, None


def register_backend_ops(power_iteration, normalize, backward: Callable, *, power_iteration_impl=None,
                         normalize_impl=None, eager_normalize=None,
                         eager_spectral_normalize=None) -> SimpleNamespace:
    """Give a backend's two ops (custom ops, or qualified names of C++ ones) the
    shared fake implementations and the analytic backward computed by ``backward``.

    Returns the backend's namespace: the ops, plus the raw callables used in eager
    mode (``*_impl``, defaulting to the ops themselves) and ``backward``.
    ``eager_normalize`` (optional) is a differentiable ``normalize`` with its own
    autograd formula (a C++ autograd function); eager mode then calls it instead of
    ``_EagerNormalize``.  ``eager_spectral_normalize`` (optional) runs the power
    iteration and that differentiable ``normalize`` in one call: (weight, u, v,
    n_power_iterations, eps, dim, order, training) -> (weight_sn, sigma), for eager
    calls without ``coeff``.
    """
    torch.library.register_fake(power_iteration)(_fake_power_iteration)
    torch.library.register_fake(normalize)(_fake_normalize)

    def setup_context(ctx, inputs, output):
        # W / sigma is kept, not W: the convolution's backward keeps it anyway, while a kept W is
        # one more copy per step under torch.compile (in the layout inductor picks for it)
        weight, u, v, sigma, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(output, u, v, sigma)

    def backward_fn(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # the differentiable formula needs W itself
            raise RuntimeError("sn_kernels: double backward through the custom ops (the torch.compile route) "
                               "is not supported; eager calls support it")
        weight_sn, u, v, sigma = ctx.saved_tensors
        # (G - <G, W_sn> u v^T) / sigma is backward's (G - <G, W>/sigma u v^T) / sigma with
        # W_sn for W and sigma u for u
        u_sigma = (u.to(sigma.dtype) * sigma).to(u.dtype)
        return backward(grad, weight_sn, u_sigma, v, sigma, ctx.dim), None, None, None, None

    torch.library.register_autograd(normalize, backward_fn, setup_context=setup_context)
    if isinstance(power_iteration, str):
        ns, name = power_iteration.split("::")
        power_iteration = getattr(getattr(torch.ops, ns), name)
    if isinstance(normalize, str):
        ns, name = normalize.split("::")
        normalize = getattr(getattr(torch.ops, ns), name)
    return SimpleNamespace(power_iteration=power_iteration, normalize=normalize, backward=backward,
                           power_iteration_impl=power_iteration_impl or power_iteration,
                           normalize_impl=normalize_impl or normalize, eager_normalize=eager_normalize,
                           eager_spectral_normalize=eager_spectral_normalize)


def define_backend_ops(backend: str, power_iteration: Callable, normalize: Callable, backward: Callable,
                       device_types=None) -> SimpleNamespace:
    """Register Python implementations as ``sn_kernels::{backend}_power_iteration`` and
    ``sn_kernels::{backend}_normalize``; return the backend namespace (see ``register_backend_ops``)."""

    def power_iteration_op(
        weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int, order: str,
        training: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training)

    def normalize_op(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        return normalize(weight, u, v, sigma, dim)

    ns = f"sn_kernels::{backend}"
    pi = torch.library.custom_op(f"{ns}_power_iteration", power_iteration_op, mutates_args=("u", "v"),
                                 device_types=device_types)
    nz = torch.library.custom_op(f"{ns}_normalize", normalize_op, mutates_args=(), device_types=device_types)
    return register_backend_ops(pi, nz, backward, power_iteration_impl=power_iteration, normalize_impl=normalize)


def check_weight_args(weight: Tensor, n_power_iterations: int, eps: float, dim: int) -> int:
    """Refuse what the op and every front end refuse (a weight neither floating-point nor
    complex, a 0-d weight, n_power_iterations <= 0, eps <= 0, dim out of range); return
    ``dim`` made non-negative."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"spectral norm needs a floating-point or complex weight, got {weight.dtype}")
    ndim = weight.dim()
    if ndim == 0:
        raise ValueError("spectral norm needs a weight with at least one dimension, got a 0-d tensor")
    if type(n_power_iterations) is not int or n_power_iterations <= 0:  # bool is refused too
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
    if not eps > 0:
        raise ValueError(f"Expected eps to be positive, but got eps={eps}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}] but got {dim})")
    return dim % ndim


def _check(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int, order: str) -> int:
    """Validate the arguments of ``spectral_normalize``; return ``dim`` made non-negative.

    Runs on every call, so the common case is a handful of cheap tests; the error
    messages are built only when raising (``_vector_error``)."""
    if order != "uv" and order != "vu":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    dim = check_weight_args(weight, n_power_iterations, eps, dim)
    m, n = matrix_shape(weight, dim)
    if m == 0 or n == 0:
        raise ValueError(f"spectral norm of an empty weight of shape {tuple(weight.shape)} is undefined")
    # fast path: both vectors fine (the same tests as _vector_error, which names the first failure)
    if not (isinstance(u, Tensor) and isinstance(v, Tensor) and u.shape == (m,) and v.shape == (n,)
            and u.dtype == weight.dtype == v.dtype and u.device == weight.device == v.device
            and u.is_contiguous() and v.is_contiguous()):
        _vector_error(weight, u, v, m, n, dim)
    return dim


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


def _check_variant(weight: Tensor, coeff, soft: bool, gain) -> None:
    if coeff is not None and not (isinstance(coeff, (int, float)) and not isinstance(coeff, bool) and coeff > 0):
        raise ValueError(f"coeff must be a positive number, got {coeff!r}")
    if soft and coeff is None:
        raise ValueError("soft=True needs a Lipschitz coefficient: pass coeff=...")
    if gain is not None:
        if not isinstance(gain, Tensor) or gain.numel() != 1:
            raise TypeError("gain must be a one-element tensor (the learnable scalar gamma)")
        if gain.device != weight.device:
            raise ValueError(f"gain is on {gain.device} but the weight is on {weight.device}")


def lipschitz_scale(sigma: Tensor, u: Tensor, coeff: float, soft: bool) -> tuple[Tensor, Tensor]:
    """(sigma_eff, u_eff) so that ``normalize(W, u_eff, v, sigma_eff)`` is the Lipschitz variant.

    hard: W coeff / sigma = W / (sigma / coeff);  soft: W / max(1, sigma / coeff).
    The shared backward (G - <G, W>/sigma_eff u_eff v^T) / sigma_eff is exact with
    u_eff = u / coeff where sigma_eff depends on sigma, and u_eff = 0 where the soft
    form does not (sigma < coeff: W passes through unchanged, no gradient via sigma).
    """
    ratio = sigma / coeff
    if not soft:
        return ratio, u / coeff
    active = ratio > 1
    return ratio.clamp_min(1.0), u * (active.to(u.dtype) / coeff)


def _eager_fused(weight, u, v, n_power_iterations, eps, dim, order, training, backend=None):
    """Plain spectral norm (no coeff, soft or gain) in eager mode as one C++ call, power iteration
    plus differentiable W / sigma, when the selected backend has one; None when it does not apply
    (compiling, or a backend without that op).  For a small weight the Python around the op
    costs as much as the op itself, hence this short path ahead of the general one.

    The C++ op checks every argument before touching u, v, so the Python checks run only to
    name a refused argument precisely."""
    if type(n_power_iterations) is not int or not isinstance(weight, Tensor) or torch.compiler.is_compiling():
        return None
    fused = dispatch.resolve(weight.device, backend).ops.eager_spectral_normalize
    if fused is None:
        return None
    try:
        return fused(weight, u, v, n_power_iterations, float(eps), dim, order, bool(training))
    except (RuntimeError, TypeError):
        _check(weight, u, v, n_power_iterations, eps, dim, order)
        raise


def _complex(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain, backend):
    """A complex weight: the torch backend's differentiable complex path (conjugate transposes,
    sigma = u^H W v as PyTorch's parametrization); the real-only backends refuse with the reason."""
    dim = _check(weight, u, v, n_power_iterations, eps, dim, order)
    if coeff is not None or soft or gain is not None:
        raise ValueError("coeff, soft and gain support real weights only, got a complex weight")
    mod = dispatch.resolve_complex(weight.device, backend)
    return mod.complex_spectral_normalize(weight, u, v, n_power_iterations, eps, dim, order, training)


# device types where "auto" traces the torch formulation under torch.compile (measured: benchmarks/NOTES.md)
TRACED_DEVICE_TYPES = ("cpu",)


@torch.compiler.assume_constant_result
def _compiled_backend(choice: str, device_type: str) -> str:
    """The backend a compiled call runs: "traced" (the torch backend's formulation, inlined
    for inductor to fuse) for "torch", and for "auto" on ``TRACED_DEVICE_TYPES``; otherwise
    the name of the backend whose custom ops "auto" or ``choice`` resolves to.  Runs once
    per trace, outside it (dynamo cannot trace the imports and checks of a first resolution)."""
    if choice == "torch" or (choice == "auto" and device_type in TRACED_DEVICE_TYPES):
        return "traced"
    module = dispatch.resolve(torch.device(device_type), choice)
    return next(name for name, path in dispatch._MODULES.items() if path == module.__name__)


def _compiled_ops(device: torch.device, backend: str | None) -> SimpleNamespace:
    """The ops namespace a compiled call traces (see ``_compiled_backend``)."""
    name = _compiled_backend(dispatch.get_backend() if backend is None else backend.lower(), device.type)
    return _traced.ops if name == "traced" else dispatch._loaded[name].ops


def spectral_normalize(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    *,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int = 0,
    order: str = "vu",
    training: bool = True,
    coeff: float | None = None,
    soft: bool = False,
    gain: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Spectrally normalize ``weight``: return ``(weight / sigma, sigma)``.

    In training mode runs ``n_power_iterations`` steps of power iteration in the
    given ``order`` ("vu" as ``torch.nn.utils.spectral_norm``, "uv" as
    ``torch.nn.utils.parametrizations.spectral_norm``), updating ``u`` (size m) and
    ``v`` (size n) in place, and takes sigma from the last norm.  In eval mode
    sigma = u . (W v) and u, v are left alone.  W is viewed as an (m, n) matrix
    with ``dim`` first.  ``backend`` overrides the global selection for this call.
    sigma carries no gradient; it is float32 for float16/bfloat16 weights.
    Complex weights use conjugate transposes and divide by sigma = u^H W v, as
    ``torch.nn.utils.parametrizations.spectral_norm``; they run on the torch
    backend ("auto" picks it; "native" and "triton" refuse) and the returned sigma
    is its real part.

    Variants (defaults give PyTorch's spectral norm): ``coeff`` K returns
    W K / sigma, or with ``soft=True`` W / max(1, sigma / K) (invertible ResNets,
    SNGP, DUE); ``gain`` (a one-element tensor gamma, usually a Parameter) returns
    gamma W / sigma.
    """
    if isinstance(weight, Tensor) and weight.is_complex():
        return _complex(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain, backend)
    if coeff is None and not soft and gain is None:
        out = _eager_fused(weight, u, v, n_power_iterations, eps, dim, order, training, backend)
        if out is not None:
            return out
    compiling = torch.compiler.is_compiling()
    dim = _check(weight, u, v, n_power_iterations, eps, dim, order)
    if coeff is not None or soft or gain is not None:
        _check_variant(weight, coeff, soft, gain)
    ops = _compiled_ops(weight.device, backend) if compiling else dispatch.resolve(weight.device, backend).ops
    if not compiling and coeff is None and gain is not None and ops.eager_spectral_normalize is not None:
        # eager gain: the same C++ call, then gamma
        weight_sn, sigma = ops.eager_spectral_normalize(weight, u, v, n_power_iterations, float(eps), dim, order,
                                                        bool(training))
        return weight_sn * gain.reshape(()).to(weight_sn.dtype), sigma
    with torch.no_grad():
        if compiling:
            sigma, u_used, v_used = ops.power_iteration(
                weight.detach(), u, v, n_power_iterations, float(eps), dim, order, bool(training)
            )
        else:
            sigma, u_used, v_used = ops.power_iteration_impl(
                weight, u, v, n_power_iterations, eps, dim, order, training
            )
        sigma_eff = sigma
        if coeff is not None:
            sigma_eff, u_used = lipschitz_scale(sigma, u_used, float(coeff), soft)
    if compiling:
        weight_sn = ops.normalize(weight, u_used, v_used, sigma_eff, dim)
    elif ops.eager_normalize is not None:
        weight_sn = ops.eager_normalize(weight, u_used, v_used, sigma_eff, dim)
    else:
        weight_sn = _EagerNormalize.apply(weight, u_used, v_used, sigma_eff, dim, ops)
    if gain is not None:
        weight_sn = weight_sn * gain.reshape(()).to(weight_sn.dtype)
    return weight_sn, sigma


from . import traced as _traced  # noqa: E402  (imports this module's names)
