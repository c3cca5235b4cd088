"""The backend contract: what every backend ("native", "triton", "torch") provides.

A backend is one ``Backend`` object.  Its two custom ops carry the whole computation
under ``torch.compile``; PyTorch allows an autograd formula only on functional ops, so
the in-place power iteration and the differentiable division are separate ops (they
are separate launches anyway: W / sigma needs sigma, a reduction over all of W):

    {name}_power_iteration(Tensor weight, Tensor(a!) u, Tensor(b!) v,
        int n_power_iterations, float eps, int dim, str order, bool training)
        -> (Tensor sigma, Tensor u_used, Tensor v_used)
    {name}_normalize(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim)
        -> Tensor weight_sn

``u_used``/``v_used`` are copies of the vectors sigma was computed with: the buffers may
be updated again (D(real) and D(fake) in one graph) before the backward runs, so the
backward must not read them.  sigma is a 0-d tensor in the accumulation dtype (float32
for float16/bfloat16 weights).  ``register_ops`` gives every backend's ops the same fake
implementations and the same analytic gradient (docs/design.md#backward),

    grad_W = (G - <G, W_sn> u v^T) / sigma,

so no backend is ever differentiated through its power iteration.  In eager mode the op
calls ``Backend.eager`` instead, which skips the custom-op wrappers' per-call checks
(tens of microseconds, as much as the kernels of a small weight).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

ORDERS = ("vu", "uv")  # "vu": torch.nn.utils.spectral_norm; "uv": parametrizations.spectral_norm

WhyNot = Callable[..., Optional[str]]  # why_not(device, auto=False) -> None when it can run, else the reason


@dataclass(frozen=True)
class Backend:
    """One implementation of spectral normalization.

    - ``name``: "native", "triton" or "torch"; ``device_types``: the device types its kernels
      exist for ("*": any); ``why_not(device, auto=False)``: None when it can run on
      ``device`` now, else the reason (``auto=True``: whether "auto" may pick it).
    - ``power_iteration``, ``normalize``: the two custom ops of the schemas above (what
      ``torch.compile`` traces), with the shared fakes and autograd formula.
    - ``backward(grad, weight, u, v, sigma, dim) -> grad_weight``: the analytic gradient
      (G - <G, W>/sigma u v^T) / sigma for the ``weight`` the forward divided.
    - ``eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain=None)
      -> (weight_sn, sigma)``: the whole eager forward, differentiable with respect to
      ``weight`` (and ``gain``, a one-element tensor gamma: weight_sn is then gamma W / sigma,
      ``apply_gain``'s value to rounding); ``dim`` is non-negative and the arguments were checked, unless
      ``eager_checks_args``, in which case the backend checks them itself before it
      touches u, v (and the caller re-checks in Python only to name a refused argument).
    - ``direct(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)``
      (optional): ``eager`` for arguments of exactly its types, unchecked by Python (the backend checks
      them before it touches u, v), or NotImplemented where the call needs another route (a tensor
      subclass, a torch.func transform, an empty, complex or sparse weight); the front end calls it
      first whenever the call resolves to this backend (with no per-call ``backend=``, through
      ``dispatch.direct_entry``), and ``eager`` for what it declines.
    - ``ops``: every custom op the backend registers, the two above included, for
      ``torch.library.opcheck`` (tests/test_contract.py).
    - ``group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training)
      -> (weight_sns, sigmas, us_used, vs_used)`` and ``group_backward(grads, weights, us, vs,
      sigmas, dims) -> grad_weights`` (optional, for ``sn_kernels.group``): the power iteration
      and W / sigma, and the gradients, of every weight of one (device, dtype) group in a fixed
      number of launches (multi-tensor kernels); u, v are updated in place when training, as by
      ``power_iteration``; lists in, lists out, each entry what the per-weight calls give.  Arguments
      are checked by the caller unless ``eager_checks_args``.  None: the group loops over the weights.
    - ``group_eager(weights, us, vs, dims, n_power_iterations, eps, order, training, shared)
      -> (weight_sns, sigmas)`` (optional, with ``group_forward``): the same forward with its
      autograd node recorded by the backend, one node for the group whose backward gives every
      weight gradient; u, v updated in place when training.  With ``shared`` (``sn_kernels.group``'s
      once-per-step refresh) the node stays usable for several backward calls; without it, it saves
      what its backward needs as saved tensors (so activation checkpointing recomputes them).
      None: ``sn_kernels.group`` records its own node around ``group_forward``.
    """

    name: str
    device_types: tuple[str, ...]
    why_not: WhyNot
    power_iteration: Callable
    normalize: Callable
    backward: Callable
    eager: Callable
    eager_checks_args: bool = False
    ops: tuple = field(default=())
    group_forward: Optional[Callable] = None
    group_backward: Optional[Callable] = None
    group_eager: Optional[Callable] = None
    direct: Optional[Callable] = None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_shape(weight: Tensor, dim: int) -> tuple[int, int]:
    """(m, n) of the matrix view of ``weight``: ``dim`` first, the rest flattened (``dim`` < 0 counts from
    the end)."""
    m = weight.shape[dim]  # an IndexError for a dim out of range
    if dim < 0:  # the slices below need it from the start (an empty weight's n comes from them)
        dim += weight.dim()
    return m, (weight.numel() // m if m else weight.shape[:dim].numel() * weight.shape[dim + 1:].numel())


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


def fake_sigma(weight: Tensor) -> Tensor:
    """A fake sigma for ``weight``: 0-d, in the accumulation dtype (torch.compile)."""
    return weight.new_empty((), dtype=accumulation_dtype(weight.dtype))


def fake_power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training):
    """Shapes and dtypes of ``power_iteration``'s outputs (torch.compile)."""
    return fake_sigma(weight), torch.empty_like(u), torch.empty_like(v)


def fake_like_weight(weight, *args):
    """An output shaped like ``weight`` (normalize, backward)."""
    return torch.empty_like(weight)


def _op(op):
    """``torch.ops.<ns>.<name>`` for a qualified name; the op itself otherwise."""
    if isinstance(op, str):
        ns, name = op.split("::")
        return getattr(getattr(torch.ops, ns), name)
    return op


def without_autocast(fn: Callable) -> Callable:
    """``fn(tensor, ...)`` with autocast off on ``tensor``'s device: the power iteration and the gradient
    formula accumulate in the weight's accumulation dtype, not in the lower precision autocast would
    give their matrix products (the weight and W / sigma keep their dtypes; the layer's own
    convolution or matmul is still autocast)."""

    @functools.wraps(fn)
    def wrapped(tensor, *args, **kwargs):
        with autocast_off(tensor.device.type):
            return fn(tensor, *args, **kwargs)

    return wrapped


def exporting() -> bool:
    """Whether torch.export is tracing.  The flag itself, not ``torch.compiler.is_exporting()``, which
    dynamo (torch 2.11) folds to True under a plain torch.compile too."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (nothing to do when it is off)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def dense(grad: Tensor | None) -> Tensor | None:
    """The gradient of W / sigma as the formulas take it: a sparse one (``nn.Embedding(sparse=True)``)
    made dense, as the weight's gradient is anyway (its u v^T term fills every entry)."""
    return grad.to_dense() if grad is not None and grad.layout != torch.strided else grad


def refuse_double_backward() -> None:
    """Raise when a custom op's backward is being differentiated (create_graph=True): the ops'
    formulas are not differentiable, and the differentiable one needs W itself."""
    if torch.is_grad_enabled():
        raise RuntimeError("sn_kernels: double backward through the custom ops (the torch.compile route) "
                           "is not supported; eager calls support it")


def register_ops(power_iteration, normalize, backward: Callable) -> tuple[Callable, Callable]:
    """Give a backend's two ops (custom ops, or qualified names of C++ ones) the shared fake
    implementations and the analytic autograd formula computed by ``backward``; return the ops."""
    torch.library.register_fake(power_iteration)(fake_power_iteration)
    torch.library.register_fake(normalize)(fake_like_weight)

    def setup_context(ctx, inputs, output):
        # W / sigma is kept, not W: the convolution's backward keeps it anyway, while a kept W is
        # one more copy per step under torch.compile (in the layout inductor picks for it)
        weight, u, v, sigma, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(output, u, v, sigma)

    def backward_fn(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        refuse_double_backward()
        grad = dense(grad)
        weight_sn, u, v, sigma = ctx.saved_tensors
        # (G - <G, W_sn> u v^T) / sigma is backward's (G - <G, W>/sigma u v^T) / sigma with
        # W_sn for W and sigma u for u
        if u.dtype == torch.float16:
            # sigma |u_i| can pass float16's 65504 where W and W_sn are finite: the formula in float32
            # (sigma's dtype), rounded once at the end as the kernels round theirs
            acc = sigma.dtype
            grad_w = backward(grad.to(acc), weight_sn.to(acc), u.to(acc) * sigma, v.to(acc), sigma, ctx.dim)
            return grad_w.to(u.dtype), None, None, None, None
        u_sigma = (u.to(sigma.dtype) * sigma).to(u.dtype)
        return backward(grad, weight_sn, u_sigma, v, sigma, ctx.dim), None, None, None, None

    torch.library.register_autograd(normalize, backward_fn, setup_context=setup_context)
    return _op(power_iteration), _op(normalize)


def define_ops(name: str, power_iteration: Callable, normalize: Callable, backward: Callable,
               device_types=None) -> tuple[Callable, Callable]:
    """Register Python functions as ``sn_kernels::{name}_power_iteration`` and
    ``sn_kernels::{name}_normalize`` (see ``register_ops``); return the two ops."""

    def power_iteration_op(
        weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int, order: str,
        training: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return power_iteration(weight, u, v, n_power_iterations, eps, dim, order, training)

    def normalize_op(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        return normalize(weight, u, v, sigma, dim)

    ns = f"sn_kernels::{name}"
    pi = torch.library.custom_op(f"{ns}_power_iteration", power_iteration_op, mutates_args=("u", "v"),
                                 device_types=device_types)
    nz = torch.library.custom_op(f"{ns}_normalize", normalize_op, mutates_args=(), device_types=device_types)
    return register_ops(pi, nz, backward)


def composed_eager(power_iteration: Callable, normalize: Callable, traced_by: tuple | None = None) -> Callable:
    """The default ``Backend.eager`` (and the compiled route's composition of the two ops):
    ``power_iteration`` under no_grad, the Lipschitz scaling when ``coeff`` is given, then
    ``normalize`` (differentiable with respect to ``weight``).  ``power_iteration`` runs under that
    no_grad and enters none of its own: under torch.export a nested one leaves an empty grad-mode
    region behind, and ``torch.export.load`` refuses a program that holds one (its node has no value).

    ``traced_by``: the backend's two custom ops, composed the same way instead under
    ``torch.jit.trace``, which records them as ops that ``torch.jit.save`` stores; it records an
    autograd.Function (``differentiable``) as a Python call that it cannot save, and a Triton
    kernel not at all."""
    through_ops = composed_eager(*traced_by) if traced_by is not None else None

    def eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain=None):
        if through_ops is not None and torch.jit.is_tracing():
            return through_ops(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)
        with torch.no_grad():
            sigma, u_used, v_used = power_iteration(weight.detach(), u, v, n_power_iterations, float(eps), dim,
                                                    order, bool(training))
            sigma_eff = sigma
            if coeff is not None:
                sigma_eff, u_used = lipschitz_scale(sigma, u_used, float(coeff), soft)
        weight_sn = normalize(weight, u_used, v_used, sigma_eff, dim)
        return (weight_sn if gain is None else apply_gain(weight_sn, gain)), sigma

    return eager


def apply_gain(weight_sn: Tensor, gain: Tensor) -> Tensor:
    """gamma W / sigma from W / sigma and the one-element ``gain``, composed: one more elementwise
    product (the native CPU op divides by sigma / gamma instead, in its one pass)."""
    return weight_sn * gain.reshape(()).to(weight_sn.dtype)


def differentiable(normalize_impl: Callable, backward: Callable, differentiable_backward: Callable) -> Callable:
    """``normalize_impl`` (W / sigma, not differentiable) as a differentiable function whose
    backward runs ``backward``, or ``differentiable_backward`` when the graph of the gradient
    is being built (create_graph=True: kernels are not differentiable)."""

    class Normalize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight, u, v, sigma, dim):
            ctx.dim = dim
            ctx.save_for_backward(weight, u, v, sigma)
            return normalize_impl(weight, u, v, sigma, dim)

        @staticmethod
        def backward(ctx, grad):
            if not ctx.needs_input_grad[0]:
                return None, None, None, None, None
            weight, u, v, sigma = ctx.saved_tensors
            fn = differentiable_backward if torch.is_grad_enabled() else backward
            return fn(dense(grad), weight, u, v, sigma, ctx.dim), None, None, None, None

    return Normalize.apply
