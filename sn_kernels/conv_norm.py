"""Spectral normalization by the true operator norm of a convolution.

The usual spectral norm divides a conv weight by the largest singular value of
its reshaped (C_out, C_in*k...) matrix.  That matrix is only a proxy for the
linear map the layer computes, A: x -> conv(x) (bias left out); their ratio
depends on stride, padding and kernel size.  Here sigma is the norm of A itself,
estimated by power iteration on A and its exact adjoint A^T (Miyato et al.'s
scheme with Gouk et al. / Farnia et al.'s operator view):

    u = normalize(A v);  t = A^T u;  v = normalize(t);  sigma = |t|^2 / max(|t|, eps)   ("uv" order)

u has the shape of one output sample (1, C_out, *out), v of one input sample
(1, C_in, *in), so both are created at the first forward, from the input size
seen.  The gradient treats u and v as constants:

    grad_W = (G - <G, W>/sigma * dsigma/dW) / sigma,   dsigma/dW = d<u, A_W v>/dW,

where dsigma/dW is the conv weight-gradient for input v and grad-output u.

A and A^T are built from the ops autograd itself uses: A is the layer's
``F.pad`` (non-zero padding modes, asymmetric 'same') followed by the
convolution; A^T is ``aten.convolution_backward``'s input gradient (the exact
adjoint of the convolution, by definition) followed by the vjp of ``F.pad``.

Front ends: ``spectral_norm_conv(module, api="hook" | "parametrization")``.  Notes:
u, v are (re)created as new buffer tensors at the first forward, so wrap in DDP after
one forward (or pass ``input_size=``); ConvTranspose's ``output_size=`` argument is
refused (it changes the operator per call).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import transforms
from .backends.contract import accumulation_dtype, autocast_off, exporting
from .backends.pytorch import iterate_buffers, normalize_step, safe_sigma
from .checks import (EPS_MIN, INIT_ITERATIONS, check_api, check_eps_in, check_iterations_eps, check_no_second_hook,
                     check_not_lazy, front_end_iterations)
from .find import find
from .serialize import serializable

__all__ = [
    "ConvSpec", "conv_spec", "conv_apply", "conv_adjoint", "conv_weight_grad", "conv_power_iteration",
    "conv_spectral_normalize", "spectral_norm_conv", "remove_spectral_norm_conv", "reset_spectral_norm_conv",
    "dense_operator_norm", "fft_operator_norm", "output_shape",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ----------------------------------------------------------------------------- the operator

@dataclass(frozen=True)
class ConvSpec:
    """Everything that defines the linear map of a conv layer, except the weight."""

    ndim: int  # number of spatial dims
    transposed: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # 'same' / 'valid' allowed for Conv*
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...]
    padding_mode: str
    kernel_size: tuple[int, ...]

    def explicit_pad(self) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
        """(F.pad amounts or None, the conv's own symmetric padding).

        Non-zero padding modes and asymmetric 'same' padding go through F.pad (as nn.Conv
        does), so that the convolution itself has symmetric integer padding only, which
        ``convolution_backward`` understands."""
        zero = (0,) * self.ndim
        if self.transposed:
            return None, tuple(self.padding)
        if self.padding == "valid":
            return None, zero
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if self.padding_mode == "zeros" and all(t % 2 == 0 for t in totals):
                return None, tuple(t // 2 for t in totals)
            pad: list[int] = []
            for t in reversed(totals):  # F.pad: last dim first; the extra element goes right
                pad += [t // 2, t - t // 2]
            return tuple(pad), zero
        if self.padding_mode == "zeros":
            return None, tuple(self.padding)
        pad = []
        for p in reversed(self.padding):
            pad += [p, p]
        return tuple(pad), zero

    @property
    def pad_mode(self) -> str:
        return "constant" if self.padding_mode == "zeros" else self.padding_mode


def conv_spec(module: nn.Module) -> ConvSpec:
    """The ``ConvSpec`` of an nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d."""
    if not isinstance(module, _CONV + _CONV_T):
        raise TypeError(
            f"spectral norm by the convolution operator norm needs an nn.Conv1d/2d/3d or "
            f"nn.ConvTranspose1d/2d/3d, got {type(module).__name__}"
        )
    transposed = isinstance(module, _CONV_T)
    ndim = len(module.kernel_size)
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return ConvSpec(ndim=ndim, transposed=transposed, stride=tuple(module.stride), padding=padding,
                    dilation=tuple(module.dilation), groups=module.groups,
                    output_padding=tuple(module.output_padding) if transposed else (0,) * ndim,
                    padding_mode=module.padding_mode, kernel_size=tuple(module.kernel_size))


def conv_apply(spec: ConvSpec, weight: Tensor, x: Tensor) -> Tensor:
    """A(x): the layer's convolution (transposed convolution) without bias."""
    if spec.transposed:
        return _CONV_T_FN[spec.ndim](x, weight, None, spec.stride, spec.padding, spec.output_padding,
                                     spec.groups, spec.dilation)
    pad, conv_padding = spec.explicit_pad()
    if pad is not None:
        x = F.pad(x, pad, mode=spec.pad_mode)
    return _CONV_FN[spec.ndim](x, weight, None, spec.stride, conv_padding, spec.dilation, spec.groups)


def _padded_shape(spec: ConvSpec, input_shape, pad) -> list[int]:
    shape = list(input_shape)
    for i in range(spec.ndim):  # pad lists the last dim first
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    return shape


def _pad_adjoint(spec: ConvSpec, g: Tensor, pad, input_shape) -> Tensor:
    """The adjoint of F.pad: a crop for zero padding.  The other modes copy input elements, one spatial dim
    at a time, so their adjoint is, dim by dim, a product with that dim's 0/1 copy matrix: F.pad of an
    identity, whose column j is the input element that padded position j copies.  Plain ops, deterministic
    (no scatter), and traceable by torch.compile (the vjp of F.pad by ``torch.autograd.grad`` is not)."""
    if spec.pad_mode == "constant":
        index = [slice(None)] * (g.dim() - spec.ndim)
        for i in reversed(range(spec.ndim)):
            index.append(slice(pad[2 * i], g.shape[-1 - i] - pad[2 * i + 1]))
        return g[tuple(index)]
    for i in range(spec.ndim):  # pad lists the last dim first
        axis, n = g.dim() - 1 - i, input_shape[-1 - i]
        eye = torch.eye(n, dtype=g.dtype, device=g.device).unsqueeze(0)
        copies = F.pad(eye, (pad[2 * i], pad[2 * i + 1]), mode=spec.pad_mode)[0]  # (n, n + both pads)
        g = (g.movedim(axis, -1) @ copies.T).movedim(-1, axis)
    return g


def _conv_backward(spec: ConvSpec, grad_out: Tensor, inp: Tensor, weight: Tensor, mask) -> tuple:
    _, conv_padding = spec.explicit_pad()
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, list(spec.stride), list(conv_padding), list(spec.dilation),
        spec.transposed, list(spec.output_padding), spec.groups, mask,
    )


def conv_adjoint(spec: ConvSpec, weight: Tensor, y: Tensor, input_shape) -> Tensor:
    """A^T(y) for inputs of shape ``input_shape``: exact, from the conv's input gradient."""
    pad, _ = spec.explicit_pad()
    shape = list(input_shape) if pad is None else _padded_shape(spec, input_shape, pad)
    # only the input's shape matters for the input gradient: a stride-0 zero tensor will do
    dummy = y.new_zeros(1).expand(shape)
    g = _conv_backward(spec, y, dummy, weight, [True, False, False])[0]
    return g if pad is None else _pad_adjoint(spec, g, pad, input_shape)


def conv_weight_grad(spec: ConvSpec, weight: Tensor, v: Tensor, u: Tensor) -> Tensor:
    """d<u, A_W v>/dW: the conv weight gradient for input v and grad-output u."""
    pad, _ = spec.explicit_pad()
    if pad is not None:
        v = F.pad(v, pad, mode=spec.pad_mode)
    return _conv_backward(spec, u, v, weight, [False, True, False])[1]


def output_shape(spec: ConvSpec, weight: Tensor, input_shape) -> tuple[int, ...]:
    """A's output shape for an input of ``input_shape`` (computed on the meta device)."""
    x = torch.empty(tuple(input_shape), device="meta", dtype=weight.dtype)
    return tuple(conv_apply(spec, weight.to("meta"), x).shape)


# ----------------------------------------------------------------------------- the op

def conv_power_iteration(spec: ConvSpec, weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``n_power_iterations`` "uv" steps on A; returns new (u, v, sigma), inputs untouched."""
    sigma = None
    for _ in range(n_power_iterations):
        u, _ = normalize_step(conv_apply(spec, weight, v), u, eps)
        # sigma = v . (A^T u) = |A^T u|^2 / max(|A^T u|, eps): no third pass needed
        v, sigma = normalize_step(conv_adjoint(spec, weight, u, v.shape), v, eps)
    return u, v, sigma


class _ConvNormalize(torch.autograd.Function):
    """W / sigma with u, v, sigma constants: grad_W = (G - <G, W>/sigma * dsigma/dW) / sigma; a zero
    sigma divides by inf (``safe_sigma``): a zero weight normalizes to 0 with a zero gradient, not 0/0.

    No no-op ``.to(dtype)`` in ``forward``: under dynamo (torch 2.11) an autograd.Function whose forward
    contains one gets a zero gradient (backends/traced.py has the same rule)."""

    @staticmethod
    def forward(ctx, weight, u, v, sigma, spec):
        ctx.spec = spec
        ctx.save_for_backward(weight, u, v, sigma)
        if weight.dtype == sigma.dtype:
            return weight / safe_sigma(sigma)
        return (weight.to(sigma.dtype) / safe_sigma(sigma)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, u, v, sigma = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        acc, sigma = sigma.dtype, safe_sigma(sigma)
        w, g = weight.to(acc), grad.to(acc)
        with autocast_off(weight.device.type):
            dsigma = conv_weight_grad(ctx.spec, w, v, u)
        c = (g * w).sum() / sigma
        return ((g - c * dsigma) / sigma).to(weight.dtype), None, None, None, None


def conv_spectral_normalize(spec: ConvSpec, weight: Tensor, u: Tensor, v: Tensor, *, n_power_iterations: int = 1,
                            eps: float = 1e-12, training: bool = True) -> tuple[Tensor, Tensor]:
    """Return ``(weight / sigma, sigma)`` with sigma the operator norm estimate of A.

    Training: ``n_power_iterations`` "uv" steps, u and v updated in place.  Eval:
    sigma = <u, A v>, u and v untouched.  Computes in float32 for half weights
    (float64 stays float64); sigma carries no gradient.  sigma = 0 (a zero weight)
    gives 0 with a zero gradient, as the matrix routes.
    """
    transforms.refuse('mode="conv"', weight)
    if eps < EPS_MIN:  # the usual eps stops here; a smaller one may be 0 in the computation dtype
        check_eps_in(eps, weight.dtype)
    acc = accumulation_dtype(weight.dtype)
    with torch.no_grad(), autocast_off(weight.device.type):  # the iteration in acc, not autocast's dtype
        w = weight.detach().to(acc)
        sigma, u_acc, v_acc = iterate_buffers(
            u, v, acc, training, lambda a, b: conv_power_iteration(spec, w, a, b, n_power_iterations, eps),
            lambda a, b: (a * conv_apply(spec, w, b)).sum())
        # the backward must see the vectors sigma came from, not buffers a later forward may update
        u_acc = u_acc.clone() if u_acc is u else u_acc
        v_acc = v_acc.clone() if v_acc is v else v_acc
    if exporting():
        # torch.export keeps the forward's ops, not an autograd.Function's backward: sigma re-attached to W
        # through d sigma / dW = <u, A(dW) v> (the value unchanged), so plain autograd gives the same gradient
        w = weight.to(acc)
        attached = safe_sigma(sigma) + (u_acc * conv_apply(spec, w - w.detach(), v_acc)).sum()
        return (w / attached).to(weight.dtype), sigma
    return _ConvNormalize.apply(weight, u_acc, v_acc, sigma, spec), sigma


# ----------------------------------------------------------------------------- state handling

def _spatial(spec: ConvSpec, x: Tensor) -> tuple[int, ...]:
    if x.dim() not in (spec.ndim + 1, spec.ndim + 2):
        raise ValueError(f"expected a {spec.ndim + 1}-d or {spec.ndim + 2}-d input, got {x.dim()}-d")
    return tuple(x.shape[-spec.ndim:])


def _check_output_size(spec: ConvSpec, inputs, kwargs) -> None:
    # ConvTranspose's output_size= changes output_padding per call, hence the operator
    if spec.transposed and ((len(inputs) > 1 and inputs[1] is not None) or (kwargs or {}).get("output_size")):
        raise NotImplementedError("spectral_norm_conv does not support output_size=; set output_padding instead")


def _sample_shape(spec: ConvSpec, weight: Tensor, spatial) -> tuple[int, ...]:
    """(1, C_in, *spatial): the shape of v, one input sample of the layer."""
    c_in = weight.shape[0] if spec.transposed else weight.shape[1] * spec.groups
    return (1, c_in, *spatial)


def _check_input(spec: ConvSpec, weight: Tensor, shape) -> None:
    """Raise the conv's own error if the layer refuses inputs of ``shape`` (wrong channel count, too small)."""
    try:
        output_shape(spec, weight, shape)  # cheap: on the meta device
        refused = shape[-spec.ndim - 1] != _sample_shape(spec, weight, ())[1]  # ConvTranspose's meta misses it
    except RuntimeError:
        refused = True
    if refused:
        # the meta kernels' messages are terse ("Invalid channel dimensions"): the real conv, on a zero input it
        # refuses in its shape checks before computing anything, raises PyTorch's own
        conv_apply(spec, weight, weight.new_zeros(()).expand(shape))


def _input_size(spec: ConvSpec, weight: Tensor, input_size) -> tuple[int, ...]:
    """``input_size=`` checked: spec.ndim positive ints for which the layer has a non-empty output."""
    try:
        size = tuple(operator.index(s) for s in input_size)
    except TypeError:
        size = ()
    if len(size) != spec.ndim or min(size) <= 0:
        raise ValueError(f"input_size must be {spec.ndim} positive ints, the spatial size of one input "
                         f"(no batch or channel dim), got {input_size!r}")
    try:
        out = output_shape(spec, weight, _sample_shape(spec, weight, size))
    except RuntimeError as e:  # too small for the kernel (or for a reflect padding)
        raise ValueError(f"input_size {size} does not fit the layer: {e}") from None
    if math.prod(out) == 0:
        raise ValueError(f"input_size {size} gives an empty output {out}")
    return size


def _draw(spec: ConvSpec, weight: Tensor, spatial, eps: float) -> tuple[Tensor, Tensor]:
    """Fresh u, v for inputs of spatial size ``spatial``: random normal (torch's RNG), normalized,
    then warmed up with INIT_ITERATIONS steps.  Normal tensors even when the first forward runs under
    torch.inference_mode: an inference tensor could not be updated in place by a later training forward."""
    in_shape = _sample_shape(spec, weight, spatial)
    out_shape = output_shape(spec, weight, in_shape)
    if math.prod(out_shape) == 0:
        raise ValueError(f"input size {tuple(spatial)} gives an empty output {out_shape}")
    acc = accumulation_dtype(weight.dtype)
    with torch.inference_mode(False), torch.no_grad(), autocast_off(weight.device.type):
        u = F.normalize(weight.new_empty(out_shape).normal_().flatten(), dim=0, eps=eps).view(out_shape)
        v = F.normalize(weight.new_empty(in_shape).normal_().flatten(), dim=0, eps=eps).view(in_shape)
        u_acc, v_acc, _ = conv_power_iteration(spec, weight.detach().to(acc), u.to(acc), v.to(acc),
                                               INIT_ITERATIONS, eps)
        return u_acc.to(weight.dtype), v_acc.to(weight.dtype)


class _State:
    """The settings both front ends share, and the initialise/check step of a forward."""

    def __init__(self, spec, name, n_power_iterations, eps, reinit_on_resize):
        n_power_iterations = front_end_iterations(n_power_iterations)
        check_iterations_eps(n_power_iterations, eps)
        self.spec, self.name = spec, name
        self.n_power_iterations, self.eps, self.reinit_on_resize = n_power_iterations, eps, reinit_on_resize

    def prepare(self, owner: nn.Module, u_name: str, v_name: str, weight: Tensor, x: Tensor, label: str) -> None:
        """Draw u, v (owner's buffers) for input ``x`` at the first forward or, if allowed, on a new input
        size; else refuse an input size other than the one u, v were made for."""
        spatial = _spatial(self.spec, x)
        v = owner._buffers[v_name]
        if v.numel() and tuple(v.shape[2:]) == tuple(spatial):
            return
        if v.numel() and not self.reinit_on_resize:
            raise ValueError(
                f"{label}: spectral_norm_conv was initialised for input size {tuple(v.shape[2:])} but got "
                f"{tuple(spatial)}; pass reinit_on_resize=True to spectral_norm_conv, or call "
                f"reset_spectral_norm_conv(module, {self.name!r}), to re-initialise u and v for the new size"
            )
        # an input the conv refuses fails here, before u, v are drawn for its size: else the corrected input
        # would then be refused as a resize
        weight = weight.detach()
        _check_input(self.spec, weight, x.shape)
        u, v = _draw(self.spec, weight, spatial, self.eps)
        owner._buffers[u_name], owner._buffers[v_name] = u, v


def _is_conv_uv(spec: ConvSpec, weight: Tensor, u: Tensor, v: Tensor) -> bool:
    """Whether (u, v) are this layer's conv-mode u, v for some input size, or its u, v not drawn yet."""
    if u.shape == v.shape == (0,):
        return True
    if v.dim() != spec.ndim + 2 or tuple(v.shape) != _sample_shape(spec, weight, v.shape[2:]):
        return False
    try:
        return tuple(u.shape) == output_shape(spec, weight, v.shape)
    except RuntimeError:  # an input size the layer refuses
        return False


def _resize_on_load(spec: ConvSpec, weight: Tensor, owner: nn.Module, state_dict, prefix: str, names) -> None:
    """Give owner's u, v buffers the shapes of the incoming ones if those are this layer's u, v for another
    input size, so that a checkpoint loads into a freshly wrapped module (whose u, v are still empty) or one
    run at another size.  Anything else (a matrix-mode u, another layer's channels, u or v alone) is left to
    PyTorch's load, which reports a size mismatch before replacing them.  Normal tensors even under
    torch.inference_mode, which a later training forward can update in place."""
    incoming = [state_dict.get(prefix + name) for name in names]
    if not all(isinstance(t, Tensor) for t in incoming) or not _is_conv_uv(spec, weight, *incoming):
        return
    for name, t in zip(names, incoming):
        buf = owner._buffers.get(name)
        if buf is not None and t.shape != buf.shape:
            with torch.inference_mode(False):
                owner._buffers[name] = buf.new_empty(t.shape)


def _empty(weight: Tensor) -> Tensor:
    return weight.new_empty(0)


# ----------------------------------------------------------------------------- hook front end

class ConvSpectralNormHook(_State):
    """Forward pre-hook: sets ``module.<name>`` = ``<name>_orig`` / sigma before each forward.

    State: parameter ``<name>_orig``, buffers ``<name>_u`` (1, C_out, *out) and
    ``<name>_v`` (1, C_in, *in), empty until the first forward."""

    sn_kind = "conv"
    sigma: Tensor | None = None  # latest sigma (detached), for logging

    def __call__(self, module: nn.Module, inputs, kwargs=None) -> None:
        _check_output_size(self.spec, inputs, kwargs)
        weight = getattr(module, self.name + "_orig")
        self.prepare(module, self.name + "_u", self.name + "_v", weight, inputs[0],
                     f"{type(module).__name__}.{self.name}")
        setattr(module, self.name, self.compute_weight(module, module.training))

    def compute_weight(self, module: nn.Module, training: bool) -> Tensor:
        weight_sn, sigma = conv_spectral_normalize(
            self.spec, getattr(module, self.name + "_orig"), getattr(module, self.name + "_u"),
            getattr(module, self.name + "_v"), n_power_iterations=self.n_power_iterations, eps=self.eps,
            training=training,
        )
        if not exporting():  # fake tensors while exporting: none kept past it
            self.sigma = sigma.detach()
        return weight_sn if torch.compiler.is_compiling() else serializable(weight_sn)

    def load_pre_hook(self, module, state_dict, prefix, *args) -> None:
        _resize_on_load(self.spec, getattr(module, self.name + "_orig"), module, state_dict, prefix,
                        (self.name + "_u", self.name + "_v"))
        self.sigma = None  # stale: sigmas() computes it from the loaded state


# ----------------------------------------------------------------------------- parametrization front end

class ConvSpectralNorm(_State, nn.Module):
    """The parametrization: ``forward(W) = W / sigma``, with buffers ``_u``, ``_v``.

    A parametrization never sees the module's input, so ``spectral_norm_conv`` also
    registers a forward pre-hook (``_InputSizeHook``) on the module that draws or
    checks u, v for the input size before the module reads its weight.  Reading
    ``module.<name>`` before the first forward (or ``input_size=``) is an error.
    """

    sn_kind = "conv"

    def __init__(self, spec: ConvSpec, weight: Tensor, name: str = "weight", n_power_iterations: int = 1,
                 eps: float = 1e-12, reinit_on_resize: bool = False) -> None:
        nn.Module.__init__(self)
        _State.__init__(self, spec, name, n_power_iterations, eps, reinit_on_resize)
        self.register_buffer("_u", _empty(weight))
        self.register_buffer("_v", _empty(weight))
        self.weight_shape = tuple(weight.shape)  # a load checks the incoming u, v's channels against it
        self.sigma: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self._v.numel() == 0:
            raise RuntimeError(
                "spectral_norm_conv: u and v are created at the first forward (the operator norm depends on "
                "the input size); run a forward first or pass input_size= to spectral_norm_conv"
            )
        weight_sn, sigma = conv_spectral_normalize(self.spec, weight, self._u, self._v,
                                                   n_power_iterations=self.n_power_iterations, eps=self.eps,
                                                   training=self.training)
        if not exporting():  # fake tensors while exporting: none kept past it
            self.sigma = sigma.detach()
        return weight_sn

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = torch.empty(self.weight_shape, device="meta")  # only its shape matters
        _resize_on_load(self.spec, weight, self, state_dict, prefix, ("_u", "_v"))
        self.sigma = None  # stale: sigmas() computes it from the loaded state
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.spec}, eps={self.eps}, n_power_iterations={self.n_power_iterations}"


class _InputSizeHook:
    """Forward pre-hook of a parametrized module: (re)draws or checks u, v for the input size."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, inputs, kwargs=None) -> None:
        param = _conv_parametrization(module, self.name)
        if param is None:  # parametrization removed by torch's remove_parametrizations: nothing to do
            return
        _check_output_size(param.spec, inputs, kwargs)
        param.prepare(param, "_u", "_v", module.parametrizations[self.name].original, inputs[0],
                      f"{type(module).__name__}.{self.name}")


def _conv_parametrization(module: nn.Module, name: str) -> ConvSpectralNorm | None:
    site = find(module, name, kind="conv", api="parametrization")
    return None if site is None else site.state


# ----------------------------------------------------------------------------- public front ends

_KERNEL = "weight"  # the parameter nn.Conv*/ConvTranspose*'s forward convolves with


def _check_kernel(module: nn.Module, spec: ConvSpec, name: str, weight: Tensor) -> None:
    """Refuse a parameter other than the layer's kernel (a bias, say): no other has a convolution operator."""
    shape = tuple(weight.shape)
    if name != _KERNEL or len(shape) != spec.ndim + 2 or shape[2:] != spec.kernel_size or shape[0] % spec.groups:
        raise ValueError(
            f'mode="conv" normalizes the convolution operator of the layer\'s kernel, {type(module).__name__}.'
            f"{_KERNEL} (a {spec.ndim + 2}-d tensor of kernel size {spec.kernel_size}), got {name!r} of shape "
            f'{shape}; use mode="matrix" for other parameters'
        )


def spectral_norm_conv(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                       *, api: str = "hook", reinit_on_resize: bool = False,
                       input_size: tuple[int, ...] | None = None) -> nn.Module:
    """Spectrally normalize a Conv*/ConvTranspose* weight by the norm of the conv operator.

    ``api="hook"``: parameter ``<name>_orig``, buffers ``<name>_u``, ``<name>_v`` (as
    ``torch.nn.utils.spectral_norm``); ``api="parametrization"``: a
    ``torch.nn.utils.parametrize`` parametrization with buffers ``_u``, ``_v`` plus a
    forward pre-hook that tracks the input size.  u, v are drawn at the first forward
    (or now, for spatial size ``input_size``); a later input of another size is a
    ValueError unless ``reinit_on_resize=True``, which re-draws them.  Undo with
    ``remove_spectral_norm_conv``.
    """
    spec = conv_spec(module)
    check_api(api)
    # any hook-API spectral norm (matrix mode, PyTorch's, mode="conv") excludes a second one, as PyTorch's hook
    if api == "hook":
        check_no_second_hook(find(module, name, api="hook"), name)
    if find(module, name, kind="conv") is not None:
        raise RuntimeError(f"Cannot register two spectral_norm_conv on the same parameter {name}")
    weight = module._parameters.get(name)
    if weight is None and not parametrize.is_parametrized(module, name):
        raise KeyError(f"module {type(module).__name__} has no parameter named {name!r}")
    check_not_lazy(weight)
    if api == "hook" and weight is None:
        raise KeyError(f"module {type(module).__name__} has no plain parameter named {name!r}")
    weight = getattr(module, name)  # the parametrized value for a parametrization on a parametrized weight
    _check_kernel(module, spec, name, weight)
    if api == "hook":  # the state checks n_power_iterations and eps; nothing is changed yet
        state = ConvSpectralNormHook(spec, name, n_power_iterations, eps, reinit_on_resize)
    else:
        state = ConvSpectralNorm(spec, weight, name, n_power_iterations, eps, reinit_on_resize)
    check_eps_in(eps, weight.dtype)
    # u, v for input_size= drawn before the module is touched: a bad input_size leaves it as it was
    u, v = (_empty(weight), _empty(weight)) if input_size is None else \
        _draw(spec, weight.detach(), _input_size(spec, weight, input_size), state.eps)
    if api == "hook":
        del module._parameters[name]
        module.register_parameter(name + "_orig", weight)
        setattr(module, name, weight.data)
        module.register_buffer(name + "_u", u)
        module.register_buffer(name + "_v", v)
        module.register_forward_pre_hook(state, with_kwargs=True)
        module._register_load_state_dict_pre_hook(state.load_pre_hook, with_module=True)
        if input_size is not None:
            with torch.no_grad():
                setattr(module, name, state.compute_weight(module, training=False).detach())
    else:
        state._u, state._v = u, v
        # unsafe: torch's consistency check would call forward, impossible before u, v exist
        parametrize.register_parametrization(module, name, state, unsafe=True)
        module.register_forward_pre_hook(_InputSizeHook(name), with_kwargs=True)
    return module


def remove_spectral_norm_conv(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo ``spectral_norm_conv`` (either API), keeping the weight W / sigma as a plain parameter."""
    site = find(module, name, kind="conv")
    if site is not None and site.api == "hook":
        key, hook = site.key, site.state
        if getattr(module, name + "_v").numel() == 0:
            raise RuntimeError("spectral_norm_conv: sigma is unknown before the first forward; nothing to keep")
        with torch.no_grad():
            weight = hook.compute_weight(module, training=False).detach()
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
        for k, h in list(module._load_state_dict_pre_hooks.items()):
            if getattr(getattr(h, "hook", h), "__self__", None) is hook:
                del module._load_state_dict_pre_hooks[k]
        delattr(module, name)
        for suffix in ("_orig", "_u", "_v"):
            delattr(module, name + suffix)
        module.register_parameter(name, nn.Parameter(weight))
        return module
    if site is not None:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for k, h in list(module._forward_pre_hooks.items()):
            if isinstance(h, _InputSizeHook) and h.name == name:
                del module._forward_pre_hooks[k]
                module._forward_pre_hooks_with_kwargs.pop(k, None)
        return module
    raise ValueError(f"spectral_norm_conv of '{name}' not found in {module}")


def reset_spectral_norm_conv(module: nn.Module, name: str = "weight") -> nn.Module:
    """Forget u, v (either API): the next forward draws them again for its input size."""
    site = find(module, name, kind="conv")
    if site is None:
        raise ValueError(f"spectral_norm_conv of '{name}' not found in {module}")
    owner, names = (module, (name + "_u", name + "_v")) if site.api == "hook" else (site.state, ("_u", "_v"))
    for n in names:
        owner._buffers[n] = owner._buffers[n].new_empty(0)
    return module


# ----------------------------------------------------------------------------- reference norms

@torch.no_grad()
def dense_operator_norm(module: nn.Module, input_shape, weight: Tensor | None = None) -> Tensor:
    """Largest singular value of the dense Jacobian of A (float64; small layers only).

    ``input_shape`` is (C_in, *spatial) or (1, C_in, *spatial); ``weight`` defaults to
    ``module.weight`` (for a wrapped module: W / sigma as of the last forward)."""
    spec = conv_spec(module)
    weight = (module.weight if weight is None else weight).detach().double()
    shape = tuple(input_shape)[-(spec.ndim + 1):]
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64, device=weight.device).reshape(n, *shape)
    jac_t = conv_apply(spec, weight, basis).reshape(n, -1)  # rows: A e_i
    return torch.linalg.svdvals(jac_t)[0]


@torch.no_grad()
def fft_operator_norm(weight: Tensor, input_spatial) -> Tensor:
    """Operator norm of a stride-1, circular-padding 2-D conv (groups=1, no dilation) on
    inputs of spatial size ``input_spatial`` (Sedghi, Gupta, Long 2019): the largest
    singular value over frequencies of the FFT of the kernel zero-padded to that size."""
    if weight.dim() != 4:
        raise ValueError(f"expected a 2-D conv weight (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    n1, n2 = input_spatial
    if weight.shape[2] > n1 or weight.shape[3] > n2:
        raise ValueError(f"kernel {tuple(weight.shape[2:])} larger than the input {tuple(input_spatial)}")
    spectrum = torch.fft.fft2(weight.double(), s=(n1, n2))  # (C_out, C_in, n1, n2)
    return torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1)).max()
