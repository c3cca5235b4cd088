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
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import dispatch, transforms
from .backends import native, pytorch, traced
from .backends.contract import accumulation_dtype, apply_gain, composed_eager
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

    Under ``torch.func`` transforms (grad, vjp, jacrev, vmap) the call runs in plain ops
    the transforms support (sn_kernels/transforms.py), whatever ``backend`` says; sigma
    is then None under a vmap that batches the weight.
    """
    weight_sn, _, sigma = normalize_kept(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft,
                                         gain, backend, twice=False)
    return weight_sn, sigma


def normalize_kept(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain, backend, *,
                   twice: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``spectral_normalize`` (the same arguments, all given) returning ``(weight_sn, kept, sigma)``, for
    a front end that hands W / sigma to the module's forward and, with ``twice=True``, keeps it as a
    module attribute after the forward (the hook API's ``module.weight``).  ``kept`` is ``weight_sn``
    itself, except on the compiled CPU route with ``twice``, where the two are equal outputs of one op
    (``native_normalize_layout_twice``).  A kept attribute is an output of the compiled graph; were it
    the forward's tensor too, autograd would add its (zero) gradient to the forward's in a kernel that
    inductor generates per weight shape, where the op's backward adds it in its own call
    (benchmarks/NOTES.md, C5)."""
    declined = False
    if coeff is not None or soft or gain is not None:
        if gain is not None and not isinstance(gain, Tensor):  # the front ends' gain=True is a flag; here gamma
            raise TypeError(f"gain must be a one-element tensor (the learnable scalar gamma), got {gain!r}; the "
                            "front ends' gain=True makes one")
        check_variant(weight, coeff, soft, gain)
        if coeff is not None and type(coeff) is not float:
            # an int or NumPy coeff (checked real, positive and finite above) as every backend takes it: the
            # direct entry accepts exact Python types only, and would decline every call of a layer wrapped
            # with coeff=2 (a slower route: about 20 µs a call)
            coeff = float(coeff)
    if backend is None and isinstance(weight, Tensor) and not torch.compiler.is_compiling() \
            and _forward_ad._current_level < 0:
        # the fast path: the selected backend's direct entry, which declines (NotImplemented) what needs the
        # routes below; it checks its arguments before it touches u, v (benchmarks/NOTES.md, P4)
        direct = dispatch.direct_entry(weight)
        if direct is not None:
            out = _checked(direct, weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)
            if out is not NotImplemented:
                return out[0], out[0], out[1]
            declined = True  # the routes below must not ask the same entry again
    # (not while torch.jit.trace runs: there sizes are traced tensors, and the test would warn that the trace
    # may be wrong)
    if isinstance(weight, Tensor) and not torch.jit.is_tracing() and weight.numel() == 0:
        check_call(weight, u, v, n_power_iterations, eps, dim, order, empty_ok=True)
        weight_sn, sigma = _empty_weight(weight, u, v, n_power_iterations, training)
        return weight_sn, weight_sn, sigma
    if isinstance(weight, Tensor) and weight.is_complex():
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order, written=training)
        dispatch.check_complex(backend)
        weight_sn, sigma = pytorch.complex_spectral_normalize(weight, u, v, n_power_iterations, eps, dim, order,
                                                              training)
        return weight_sn, weight_sn, sigma
    if isinstance(weight, Tensor) and weight.layout != torch.strided:
        dispatch.check_sparse(weight, backend)
        backend = "torch"
    if torch.compiler.is_compiling():
        weight_sn, kept, sigma = _compiled(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft,
                                           backend, twice)
    elif transforms.active(weight):  # torch.func: plain ops only (transforms.py)
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order, written=training)
        weight_sn, sigma = transforms.spectral_normalize(weight, u, v, n_power_iterations, eps, dim, order,
                                                         training, coeff, soft)
        kept = weight_sn
    else:  # the backend's eager call applies the gain itself
        weight_sn, sigma = _eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain,
                                  backend, declined)
        return weight_sn, weight_sn, sigma
    if gain is not None:
        weight_sn, kept = ((apply_gain(weight_sn, gain), apply_gain(kept, gain)) if kept is not weight_sn else
                           (apply_gain(weight_sn, gain),) * 2)
    return weight_sn, kept, sigma


def _empty_weight(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, training: bool):
    """PyTorch's numbers for a weight with no entries (``nn.Linear(0, 4)``): W v and W^T u are zero
    vectors, so an iteration leaves u and v zero (normalize divides by eps), sigma = u . (W v) = 0 in
    either mode, and W / sigma (any variant) has no entries."""
    if training and n_power_iterations > 0:
        with torch.no_grad():
            u.zero_()
            v.zero_()
    real = weight.real.dtype if weight.is_complex() else weight.dtype
    sigma = torch.zeros((), dtype=accumulation_dtype(real), device=weight.device)
    return weight / sigma.to(weight.dtype), sigma


def _checked(entry, weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain):
    """``entry(...)`` for an entry that checks its arguments itself (in C++, before it touches u, v); when
    it refuses them, the Python checks run to name the refused argument, else its own error stands."""
    try:
        return entry(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)
    except (RuntimeError, TypeError, ValueError):
        check_call(weight, u, v, n_power_iterations, eps, dim, order)
        raise


def _eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain, backend,
           declined=False):
    """The eager route: the selected backend's ``direct`` entry when it has one (unless the fast path
    just ``declined`` it), else its ``eager`` entry.  A backend that checks its arguments itself
    (native: in C++, before it touches u, v) is called first, and the Python checks run only to
    name a refused argument; for a small weight they would cost as much as the kernels."""
    if not isinstance(weight, Tensor) or type(n_power_iterations) is not int or type(dim) is not int \
            or isinstance(eps, str):  # the native op would parse a string eps
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)  # raises, or makes dim an int
    chosen = dispatch.resolve(weight.device, backend)
    if not chosen.eager_checks_args:
        dim = check_call(weight, u, v, n_power_iterations, eps, dim, order, written=training)
        return chosen.eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)
    if chosen.direct is not None and not declined:
        out = _checked(chosen.direct, weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft,
                       gain)
        if out is not NotImplemented:
            return out
    return _checked(chosen.eager, weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)


def _compiled(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, backend, twice):
    """The compiled route: the power iteration and W / sigma ops of ``_compiled_ops``, traced;
    returns ``(weight_sn, kept, sigma)``, ``kept`` a second output of the W / sigma op when ``twice``
    and the route has one (``_normalize_laid_out_twice``), ``weight_sn`` itself otherwise."""
    dim = check_call(weight, u, v, n_power_iterations, eps, dim, order)
    power_iteration, normalize = _compiled_ops(weight.device, backend)
    if twice and normalize is _normalize_laid_out and native.has_op("native_normalize_layout_twice"):
        normalize = _normalize_laid_out_twice
    out, sigma = composed_eager(power_iteration, normalize)(weight, u, v, n_power_iterations, eps, dim, order,
                                                            training, coeff, soft)
    weight_sn, kept = out if isinstance(out, tuple) else (out, out)
    return weight_sn, kept, sigma


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
        return "native+layout" if name == "native" and native.has_op("native_normalize_layout") else "traced"
    return name


def _normalize_laid_out(weight, u, v, sigma, dim):
    """W / sigma as the compiled CPU route computes it: the native ``native_normalize_layout`` op
    (its fake and autograd formula: backends/native.py), written channels-last for a 4-d weight
    when inductor lays convolution weights out that way (its layout optimization, on by default
    with mkldnn), so that no layout copy of W / sigma or of its gradient is generated around the
    op (benchmarks/NOTES.md, C4).  Decided while tracing, from the weight's shape and inductor's
    configuration; the values are ``native_normalize``'s either way."""
    return torch.ops.sn_kernels.native_normalize_layout(weight, u, v, sigma, dim, _channels_last(weight))


def _normalize_laid_out_twice(weight, u, v, sigma, dim):
    """``_normalize_laid_out`` as two equal tensors (``normalize_kept``)."""
    return tuple(torch.ops.sn_kernels.native_normalize_layout_twice(weight, u, v, sigma, dim, _channels_last(weight)))


def _channels_last(weight) -> bool:
    """The layout ``_normalize_laid_out`` writes: channels-last for a 4-d CPU weight under inductor's
    layout optimization."""
    return weight.dim() == 4 and weight.device.type == "cpu" and _inductor_channels_last()


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
