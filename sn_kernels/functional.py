"""The op: ``spectral_normalize``, which every front end calls.

Two routes (docs/design.md): in eager mode ``dispatch.resolve`` picks the backend once per
call and its ``eager`` entry runs the forward (the backend contract: backends/contract.py);
under ``torch.compile`` the backend's two custom ops are traced, or, for the torch backend,
the torch formulation itself (backends/traced.py), which inductor fuses with its
neighbours.  "auto" on ``TRACED_DEVICE_TYPES`` compiles to native ops that leave inductor
nothing to generate: the power-iteration op, and W / sigma written in the layout inductor
gives a convolution's weight (channels-last on the CPU), with a gradient op that reads the
convolution's channels-last gradient (``_normalize_laid_out``; benchmarks/NOTES.md, C4).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import dispatch
from .backends import pytorch, traced
from .backends.contract import composed_eager
from .checks import check_call, check_variant

# device types where "auto" compiles to the layout-aware native ops, or without them to the traced
# torch formulation (benchmarks/NOTES.md, C1, C3 and C4)
TRACED_DEVICE_TYPES = ("cpu",)


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
    if coeff is not None or soft or gain is not None:
        check_variant(weight, coeff, soft, gain)
    if isinstance(weight, Tensor) and weight.is_complex():
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)
        dispatch.check_complex(backend)
        return pytorch.complex_spectral_normalize(weight, u, v, n_power_iterations, eps, dim, order, training)
    route = _compiled if torch.compiler.is_compiling() else _eager
    weight_sn, sigma = route(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, backend)
    if gain is not None:
        weight_sn = weight_sn * gain.reshape(()).to(weight_sn.dtype)
    return weight_sn, sigma


def _eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, backend):
    """The eager route: the selected backend's ``eager`` entry.  A backend that checks its
    arguments itself (native: in C++, before it touches u, v) is called first, and the
    Python checks run only to name a refused argument; for a small weight they would cost
    as much as the kernels."""
    if not isinstance(weight, Tensor) or type(n_power_iterations) is not int:
        check_call(weight, u, v, n_power_iterations, eps, dim, order)  # raises
    chosen = dispatch.resolve(weight.device, backend)
    if not chosen.eager_checks_args:
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)
        return chosen.eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft)
    try:
        return chosen.eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft)
    except (RuntimeError, TypeError, ValueError):
        check_call(weight, u, v, n_power_iterations, eps, dim, order)
        raise


def _compiled(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, backend):
    """The compiled route: the power iteration and W / sigma ops of ``_compiled_ops``, traced."""
    dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)
    run = composed_eager(*_compiled_ops(weight.device, backend))
    return run(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft)


@torch.compiler.assume_constant_result
def _compiled_backend(choice: str, device_type: str) -> str:
    """The route a compiled call takes: "traced" (the torch backend's formulation, inlined for
    inductor to fuse) for "torch", and for "auto" on ``TRACED_DEVICE_TYPES`` when the native
    backend is unavailable there; "native+layout" (the native power-iteration op, then W / sigma
    written in the layout inductor wants, with its gradient, as native ops) for "auto" on
    ``TRACED_DEVICE_TYPES`` otherwise; elsewhere the name of the backend whose two custom ops
    "auto" or ``choice`` resolves to.  Runs once per trace, outside it (dynamo cannot trace the
    imports and checks of a first resolution)."""
    if choice == "torch":
        return "traced"
    name = dispatch.resolve(torch.device(device_type), choice).name
    if choice == "auto" and device_type in TRACED_DEVICE_TYPES:
        return "native+layout" if name == "native" and _has_layout_op() else "traced"
    return name


def _has_layout_op() -> bool:
    """Whether the loaded native extension has ``native_normalize_layout`` (an older build may not)."""
    return hasattr(torch.ops.sn_kernels, "native_normalize_layout")


def _normalize_laid_out(weight, u, v, sigma, dim):
    """W / sigma as the compiled CPU route computes it: the native ``native_normalize_layout`` op
    (its fake and autograd formula: backends/native.py), written channels-last for a 4-d weight
    when inductor lays convolution weights out that way (its layout optimization, on by default
    with mkldnn), so that no layout copy of W / sigma or of its gradient is generated around the
    op (benchmarks/NOTES.md, C4).  Decided while tracing, from the weight's shape and inductor's
    configuration; the values are ``native_normalize``'s either way."""
    channels_last = weight.dim() == 4 and weight.device.type == "cpu" and _inductor_channels_last()
    return torch.ops.sn_kernels.native_normalize_layout(weight, u, v, sigma, dim, channels_last)


@torch.compiler.assume_constant_result
def _inductor_channels_last() -> bool:
    """Whether inductor lays convolution weights out channels-last on the CPU
    (``GraphLowering.decide_layout_opt``: with its layout optimization and mkldnn, every one).
    Decided once per trace, outside it (dynamo cannot trace mkldnn's checks)."""
    from torch._inductor import config

    mkldnn = torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()
    return config.force_layout_optimization or (config.layout_optimization and mkldnn)


def _compiled_ops(device: torch.device, backend: str | None) -> tuple[Callable, Callable]:
    """(power_iteration, normalize) that a compiled call traces (see ``_compiled_backend``)."""
    name = _compiled_backend(dispatch.get_backend() if backend is None else backend.lower(), device.type)
    if name == "traced":
        return traced.power_iteration, traced.normalize
    if name == "native+layout":
        return dispatch.loaded_backend("native").power_iteration, _normalize_laid_out
    chosen = dispatch.loaded_backend(name)
    return chosen.power_iteration, chosen.normalize
