"""Drop-in for ``torch.nn.utils.spectral_norm`` / ``remove_spectral_norm`` (the hook API).

The hook subclasses PyTorch's own ``SpectralNorm`` and registers PyTorch's own
state_dict hooks, so the parameter and buffer names (``weight_orig``,
``weight_u``, ``weight_v``), the ``spectral_norm`` state_dict metadata, the
loading of old checkpoints and even ``torch.nn.utils.remove_spectral_norm``
behave exactly as with PyTorch; only the computation goes through
``sn_kernels.spectral_normalize``'s work (``functional.normalize_kept``, order "vu").  Beside its
pre-hook the hook registers a forward hook (``SpectralNorm.keep``): under torch.compile on the CPU
``module.weight`` is set after the forward to a second copy of W / sigma, whose gradient the W / sigma
op's backward adds in its own call (benchmarks/NOTES.md, C5); in eager mode it does nothing.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.functional import normalize

from . import conv_norm
from .backends.contract import exporting
from .backends.pytorch import exact_top_singular
from .certified import Certifier, OperatorBound, operator_bound, output_factor
from .checks import (call_iterations, check_bound, check_iterations_eps, check_mode, check_no_second_hook,
                     check_not_lazy, check_variant, check_weight_args, default_dim, front_end_dim, front_end_iterations,
                     take_pending)
from .find import find, torch_sn
from .functional import normalize_kept
from .meta import guard_if_meta
from .serialize import serializable


def complex_refusal(weight: torch.Tensor) -> TypeError:
    """The hook API's error for a complex weight, at wrap time or at a forward (one made complex later)."""
    return TypeError(
        f"the hook API (sn_kernels.spectral_norm, as torch.nn.utils.spectral_norm) refuses complex weights "
        f"({weight.dtype}): PyTorch's hook iterates with plain transposes and gets sigma wrong for them; "
        "use sn_kernels.parametrizations.spectral_norm, which matches "
        "torch.nn.utils.parametrizations.spectral_norm (conjugate transposes)"
    )


class SpectralNorm(torch_sn.SpectralNorm):
    """The forward pre-hook; PyTorch's class with the fused op inside."""

    sn_kind = "hook"

    sigma: torch.Tensor | None = None  # latest sigma (detached), for ``sn_kernels.sigmas``
    coeff: float | None = None  # class defaults keep hooks pickled before the variants loadable
    soft: bool = False
    gain: bool = False
    pending: torch.Tensor | None = None  # W/sigma computed ahead by sn_kernels.group, used by the next call
    certifier: Certifier | None = None  # bound="upper"/"operator" (sn_kernels/certified.py); None: sigma_hat
    # sn_kernels.group's once-per-step refresh, run first (a separate pre-hook put ahead of this one,
    # prepend=True, makes dynamo build guards on the wrong hook)
    before: Callable[[nn.Module, tuple], None] | None = None
    # whether ``keep`` is registered as the module's forward hook (hooks pickled before it was have none)
    keeps: bool = False
    kept: torch.Tensor | None = None  # W / sigma for ``keep`` to set after the forward

    def __init__(self, name: str = "weight", n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 *, coeff: float | None = None, soft: bool = False, gain: bool = False, bound: str = "estimate",
                 bound_every: int = 1, operator: OperatorBound | None = None):
        n_power_iterations = front_end_iterations(n_power_iterations)
        check_iterations_eps(n_power_iterations, eps)
        super().__init__(name, n_power_iterations, front_end_dim(dim), eps)  # dim=0.0 runs, as in PyTorch
        self.coeff, self.soft, self.gain = coeff, soft, gain
        if check_bound(bound, bound_every, gain=gain):
            if bound == "operator" and operator is None:
                raise ValueError("bound='operator' needs the layer's OperatorBound (sn_kernels.certified."
                                 "operator_bound); sn_kernels.spectral_norm(module, ...) passes it")
            self.certifier = Certifier.make(bound, bound_every, None, operator)

    @property
    def bound(self) -> str:
        """What the weight is divided by: "estimate" (sigma_hat), or a certified "upper" / "operator" bound."""
        return "estimate" if self.certifier is None else self.certifier.bound

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        return self._weights(module, do_power_iteration, twice=False)[0]

    def _weights(self, module: nn.Module, do_power_iteration: bool, twice: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(W / sigma for the forward, W / sigma to keep as ``module.<name>`` after it): one tensor,
        or with ``twice`` on the compiled CPU route two equal ones (``functional.normalize_kept``)."""
        weight = getattr(module, self.name + "_orig")
        if weight.is_complex():  # made complex after wrapping (``.to(torch.complex64)``): refused as at wrap time
            raise complex_refusal(weight)
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        iterations, do_power_iteration = call_iterations(self.n_power_iterations, do_power_iteration)
        if self.certifier is not None:
            weight_sn, sigma = self.certifier.normalize(
                weight, u, v, n_power_iterations=iterations, eps=self.eps, dim=self.dim, order="vu",
                training=do_power_iteration, coeff=self.coeff, soft=self.soft)
            self._log(sigma)
            return weight_sn, weight_sn
        weight_sn, kept, sigma = normalize_kept(
            weight, u, v, n_power_iterations=iterations, eps=self.eps, dim=self.dim, order="vu",
            training=do_power_iteration, coeff=self.coeff, soft=self.soft,
            gain=getattr(module, self.name + "_gain") if self.gain else None, backend=None, twice=twice)
        self._log(None if sigma is None else sigma.detach())  # None: batched by vmap (transforms.py)
        return weight_sn, kept

    def _log(self, sigma: torch.Tensor | None) -> None:
        """Keep ``sigma`` for ``sigmas()``, except while torch.export traces: its tensors are fake, and one
        kept past the export would break deepcopy, torch.save and ``sigmas()`` of the module."""
        if not exporting():
            self.sigma = sigma

    def __call__(self, module: nn.Module, inputs) -> None:
        # a grouped pre-computation (sn_kernels.group) is used once, then it is per call again
        if self.before is not None:
            self.before(module, inputs)
        weight = take_pending(self)
        self.kept = None  # one an earlier call left (it failed before its forward hook) is stale
        if weight is None:
            weight, kept = self._weights(module, module.training, twice=self.keeps)
            if kept is not weight:
                self.kept = kept  # module.<name> after the forward (``keep``)
        if not torch.compiler.is_compiling():
            weight = serializable(weight)
        setattr(module, self.name, weight)

    def keep(self, module: nn.Module, inputs, output) -> None:
        """The forward hook: ``module.<name>`` becomes the kept copy of W / sigma, if the pre-hook
        made one (compiled CPU route: ``functional.normalize_kept``), for what outlives the forward."""
        if self.kept is not None:
            setattr(module, self.name, self.kept)
            self.kept = None

    def register_keep(self, module: nn.Module) -> None:
        """Register ``keep`` as a forward hook of ``module`` (this object is its pre-hook)."""
        module.register_forward_hook(self.keep)
        self.keeps = True

    def remove(self, module: nn.Module) -> None:
        super().remove(module)  # keeps W / sigma (times the gain) as the new plain parameter
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__self__", None) is self:  # ``keep``; by identity, so a deep copy removes its own
                del module._forward_hooks[key]
        # our load_state_dict pre-hook too: PyTorch's remove_spectral_norm (which calls this) misses it, and it
        # holds this hook, whose certifier keeps a copy of the weight (bound="upper"/"operator")
        for key, hook in list(module._load_state_dict_pre_hooks.items()):
            if getattr(getattr(hook, "hook", hook), "fn", None) is self:
                del module._load_state_dict_pre_hooks[key]
        if self.certifier is not None:
            self.certifier.invalidate()
        self.kept = None
        if self.gain:
            delattr(module, self.name + "_gain")

    @staticmethod
    def apply(module: nn.Module, name: str, n_power_iterations: int, dim: int, eps: float,
              *, coeff: float | None = None, soft: bool = False, gain: bool = False, bound: str = "estimate",
              bound_every: int = 1) -> "SpectralNorm":
        check_no_second_hook(find(module, name, api="hook"), name)  # mode="conv" hooks too
        if not isinstance(name, str) or name not in module._parameters:
            raise KeyError(f"module {type(module).__name__} has no parameter named {name!r}")
        weight = module._parameters[name]
        if weight is None:
            raise ValueError(f"`SpectralNorm` cannot be applied as parameter `{name}` is None")
        check_not_lazy(weight)
        if isinstance(weight, torch.Tensor) and weight.is_complex():
            raise complex_refusal(weight)
        n_power_iterations = front_end_iterations(n_power_iterations)
        check_weight_args(weight, n_power_iterations, eps, dim)  # the hook keeps dim as given, like PyTorch's
        operator = operator_bound(module, name, weight) if bound == "operator" else None
        fn = SpectralNorm(name, n_power_iterations, dim, eps, coeff=coeff, soft=soft, gain=gain, bound=bound,
                          bound_every=bound_every, operator=operator)
        check_variant(weight, coeff, soft, None)
        if fn.certifier is not None:  # a coeff too small for the dtype: refused now, not at a forward
            output_factor(weight, fn.dim, 1.0 if coeff is None else float(coeff), operator)

        with torch.no_grad():
            h, w = fn.reshape_weight_to_matrix(weight).size()
            # same draws, in the same order, as PyTorch: seeded runs give identical u, v
            u = normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
            if gain:
                gamma, u, v = exact_top_singular(fn.reshape_weight_to_matrix(weight))

        delattr(module, fn.name)
        module.register_parameter(fn.name + "_orig", weight)
        setattr(module, fn.name, weight.data)
        module.register_buffer(fn.name + "_u", u)
        module.register_buffer(fn.name + "_v", v)
        if gain:
            module.register_parameter(fn.name + "_gain", nn.Parameter(gamma))

        module.register_forward_pre_hook(fn)
        fn.register_keep(module)
        module._register_state_dict_hook(torch_sn.SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(_LoadHook(fn))
        guard_if_meta(module, fn.name + "_u", weight)
        return fn


class _LoadHook(torch_sn.SpectralNormLoadStateDictPreHook):
    """PyTorch's load pre-hook, which also forgets the logged sigma (``sigmas()`` then computes it
    from the loaded state) and makes a certified hook's next forward refresh its bound (removed with
    the hook by ``remove_spectral_norm``, which finds PyTorch's class)."""

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        self.fn.sigma = None
        if self.fn.certifier is not None:
            self.fn.certifier.invalidate()
        super().__call__(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, coeff: float | None = None, soft: bool = False,
                  gain: bool = False, bound: str = "estimate", bound_every: int = 1, mode: str = "matrix",
                  **conv_options) -> nn.Module:
    """Apply spectral normalization to ``module.<name>`` with a forward pre-hook.

    Same signature, defaults, state_dict and numbers as ``torch.nn.utils.spectral_norm``.
    Variants (keyword-only, off by default): ``coeff`` K gives W K / sigma, with
    ``soft=True`` W / max(1, sigma / K); ``gain=True`` adds a trainable scalar
    ``<name>_gain`` initialised to the exact spectral norm (u, v start at the exact
    singular vectors), so wrapping leaves the layer's output unchanged.
    ``mode="conv"`` normalizes a Conv*/ConvTranspose* layer by the norm of its
    convolution operator (see ``sn_kernels.conv_norm.spectral_norm_conv`` for
    ``conv_options``: ``reinit_on_resize``, ``input_size``).

    ``bound="upper"`` divides by a certified upper bound on sigma instead of the power
    iteration's estimate: the normalized weight's matrix view then has spectral norm
    <= ``coeff`` (default 1) at every forward, rounding included; the bound is refreshed
    every ``bound_every`` training forwards and carried in between (sn_kernels/certified.py,
    docs/lipschitz.md).  ``bound="operator"`` certifies the layer's linear map instead, at every
    input size: for a Conv*/ConvTranspose* layer the convolution itself, not its matrix view.
    ``gain`` and mode="conv" are refused with either; state_dict keys do not change.
    """
    check_bound(bound, bound_every, gain=gain, mode=mode)
    if check_mode(mode, dim, coeff, soft, gain, conv_options):
        return conv_norm.spectral_norm_conv(module, name, n_power_iterations, eps, api="hook", **conv_options)
    if dim is None:
        dim = default_dim(module)
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps, coeff=coeff, soft=soft, gain=gain, bound=bound,
                       bound_every=bound_every)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove the spectral-norm hook of ``module.<name>`` (ours, PyTorch's, or mode="conv"), keeping W/sigma."""
    if find(module, name, kind="conv", api="hook") is not None:
        return conv_norm.remove_spectral_norm_conv(module, name)
    torch_sn.remove_spectral_norm(module, name)
    # PyTorch's removal misses its load_state_dict pre-hook (registered wrapped in a _WrappedHook, looked for
    # unwrapped), which would then demand <name>_orig and <name>_u of the plain layer's state_dict
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = getattr(hook, "hook", hook)
        if isinstance(inner, torch_sn.SpectralNormLoadStateDictPreHook) and inner.fn.name == name:
            del module._load_state_dict_pre_hooks[key]
    return module
