"""Spectrally normalized layers and model-wide helpers."""
from __future__ import annotations

import types
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import conv_norm, hooks, parametrizations
from .certified import operator_bound, output_factor
from .checks import (check_api, check_bound, check_eps_in, check_iterations_eps, check_variant, check_weight_args,
                     default_dim, front_end_dim, front_end_iterations)
from .find import TorchSpectralNorm, _kind as _kind_of, input_of, sites, torch_sn, walk
from .functional import spectral_normalize
from .serialize import serializable

#: layer types that ``apply_spectral_norm`` wraps by default
SN_LAYER_TYPES = (
    nn.Linear, nn.Bilinear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding,
)


def _wrapper(api: str):
    return hooks.spectral_norm if check_api(api) == "hook" else parametrizations.spectral_norm


def check_model(model, who: str) -> None:
    """Refuse, naming the helper ``who``, a ``model`` that is not an ``nn.Module`` (None, say)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sn_kernels.{who} takes an nn.Module, got {type(model).__name__}")


def is_spectral_normalized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is spectrally normalized by either API (PyTorch's or ours, either mode)."""
    return bool(sites(module, name))


def apply_spectral_norm(model: nn.Module, *, api: str = "hook", n_power_iterations: int = 1, eps: float = 1e-12,
                        layer_types: type | Iterable[type] = SN_LAYER_TYPES,
                        exclude: str | Iterable[str] | None = (), **variant) -> nn.Module:
    """Wrap the ``weight`` of every Linear/Bilinear/Conv*/ConvTranspose*/Embedding in ``model`` (in place).

    ``api`` is "hook" (``torch.nn.utils.spectral_norm`` keys) or "parametrization";
    ``layer_types`` is one type or several (as ``isinstance`` takes them); modules named in ``exclude``
    (one name, several, or None) and weights already normalized are left alone, and so, with the
    hook API, is ``nn.MultiheadAttention.out_proj`` (with a warning: the attention reads its weight
    without calling it, so a hook would never run).
    ``variant`` keywords (``coeff``, ``soft``, ``gain``, ``bound``, ``bound_every``) go to ``spectral_norm``.
    Every layer is checked before the first is wrapped: a refusal leaves the model as it was.
    """
    check_model(model, "apply_spectral_norm")
    wrap = _wrapper(api)
    if not isinstance(layer_types, (type, types.UnionType)):
        layer_types = tuple(layer_types)
    # one name, not its characters
    exclude = {exclude} if isinstance(exclude, str) else set(() if exclude is None else exclude)
    n_power_iterations = front_end_iterations(n_power_iterations)
    check_iterations_eps(n_power_iterations, eps)  # the model's arguments, refused before any layer's
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: a hook (which runs when the
    # layer is called) would never run, and the attention would use the raw weight, untrained
    not_called = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = []
    for mod_name, module in model.named_modules():
        if mod_name in exclude or not isinstance(module, layer_types):
            continue
        if getattr(module, "weight", None) is None or is_spectral_normalized(module):
            continue
        if api == "hook" and id(module) in not_called:
            warnings.warn(f"sn_kernels.apply_spectral_norm: left {mod_name} alone: nn.MultiheadAttention uses its "
                          "weight without calling it, so the hook API's spectral norm would never run; "
                          "api='parametrization' normalizes it", stacklevel=2)
            continue
        # all of them before the first is wrapped
        _check_wrappable(mod_name, module, api, n_power_iterations, eps, variant)
        targets.append(module)
    for module in targets:
        wrap(module, n_power_iterations=n_power_iterations, eps=eps, **variant)
    return model


def _check_wrappable(mod_name: str, module: nn.Module, api: str, n_power_iterations: int, eps: float,
                     variant: dict) -> None:
    """Refuse, naming the layer, a weight the front end would refuse: a lazy one; for the hook API one that
    is not a plain parameter (computed by a parametrization or the old weight_norm), is complex or has
    no rows; one the op refuses (not floating-point, 0-d); one the ``variant`` keywords do not take
    (``_check_variant``)."""
    where = f"sn_kernels.apply_spectral_norm: {mod_name or 'the model'}"
    weight = module._parameters.get("weight")
    if weight is not None and nn.parameter.is_lazy(weight):
        raise ValueError(f"{where} has an uninitialized (lazy) weight; run the dummy forward first; nothing was "
                         "wrapped")
    if api == "hook" and weight is None:
        raise ValueError(f"{where}.weight is not a plain parameter (a parametrization or weight_norm computes it), "
                         "which the hook API needs; use api='parametrization' or exclude it; nothing was wrapped")
    weight = module.weight if weight is None else weight
    if api == "hook" and weight.is_complex():
        raise TypeError(f"{where}.weight is complex, which the hook API refuses; use api='parametrization' or "
                        "exclude it; nothing was wrapped")
    try:
        if variant.get("mode") == "conv":
            conv_norm.conv_spec(module)  # the layers mode="conv" takes; it has no dim, coeff or bound
            return
        dim = variant.get("dim")
        dim = check_weight_args(weight, n_power_iterations, eps, default_dim(module) if dim is None else dim)
        if api == "hook":  # PyTorch's matrix view, as the hook API draws u, v: a weight with no rows has none
            torch_sn.SpectralNorm(dim=dim).reshape_weight_to_matrix(weight.detach())
        _check_variant(module, weight, dim, variant)
    except (TypeError, ValueError, IndexError, RuntimeError) as err:
        raise type(err)(f"{where}.weight: {err}; nothing was wrapped") from None


def _check_variant(module: nn.Module, weight: torch.Tensor, dim: int, variant: dict) -> None:
    """Refuse the ``variant`` keywords ``weight`` does not take: a complex weight with coeff/soft/gain or a
    certified bound, bound="operator" on a layer whose operator is unknown, a ``coeff`` too small for the
    certified bound in the weight's dtype."""
    coeff, gain = variant.get("coeff"), variant.get("gain", False)
    check_variant(weight, coeff, variant.get("soft", False), gain)
    bound = variant.get("bound", "estimate")
    if check_bound(bound, variant.get("bound_every", 1), weight, gain=gain):
        operator = operator_bound(module, "weight", weight) if bound == "operator" else None
        output_factor(weight, dim, 1.0 if coeff is None else float(coeff), operator)


def _left_as_subclass(state, module: nn.Module, name: str, base: type) -> bool:
    """Whether ``state`` is a subclass of PyTorch's spectral norm ``base``, left in place with a warning:
    such a class (DUE's and SNGP's bounded spectral norms) normalizes in its own way, which ours would
    replace by plain W / sigma."""
    if type(state) is base:
        return False
    warnings.warn(f"sn_kernels.convert: left {type(state).__name__} on {type(module).__name__}.{name} in place: a "
                  "subclass of PyTorch's spectral norm normalizes in its own way, which sn_kernels' would replace",
                  stacklevel=3)
    return True


def convert(model: nn.Module) -> nn.Module:
    """Replace PyTorch's spectral norm (either API) inside ``model`` by sn_kernels', in place.

    Every parameter and buffer is kept (the same tensor objects), so outputs,
    state_dict keys and optimizer state are unchanged.  PyTorch's hook on a complex
    weight is left in place, with a warning (sn_kernels' hook API refuses complex weights).
    """
    check_model(model, "convert")
    hook_sites, param_sites = [], []
    for module in model.modules():  # everything checked before anything changes: no half-converted model
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, torch_sn.SpectralNorm) and not isinstance(hook, hooks.SpectralNorm):
                if _left_as_subclass(hook, module, hook.name, torch_sn.SpectralNorm):
                    continue
                if getattr(module, hook.name + "_orig").is_complex():
                    warnings.warn(f"sn_kernels.convert: left PyTorch's hook spectral norm on the complex weight "
                                  f"{type(module).__name__}.{hook.name} in place (the hook API refuses complex "
                                  "weights; the parametrization API supports them)", stacklevel=2)
                    continue
                _check_convertible(module, hook.name, hook, getattr(module, hook.name + "_orig"))
                hook_sites.append((module, key, hook))
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for i, p in enumerate(plist):
                    if isinstance(p, TorchSpectralNorm) and not _left_as_subclass(p, module, name, TorchSpectralNorm):
                        _check_convertible(module, name, p, input_of(plist, p))
                        param_sites.append((plist, i, p))
    for module, key, hook in hook_sites:
        ours = hooks.SpectralNorm(hook.name, hook.n_power_iterations, hook.dim, hook.eps)
        module._forward_pre_hooks[key] = ours
        ours.register_keep(module)
        for h in module._state_dict_hooks.values():  # PyTorch's reads the name/dim of the hook it holds
            if getattr(h, "fn", None) is hook:
                h.fn = ours
        for h in module._load_state_dict_pre_hooks.values():  # wrapped in a _WrappedHook (.hook)
            if getattr(getattr(h, "hook", None), "fn", None) is hook:
                h.hook = hooks._LoadHook(ours)  # PyTorch's, which also forgets ours' logged sigma
        # the W / sigma PyTorch's last forward left carries a graph, which deepcopy and pickling
        # refuse; ours copy and pickle its value, as after our own forward
        current = module.__dict__.get(hook.name)
        if isinstance(current, torch.Tensor):
            module.__dict__[hook.name] = serializable(current)
    for plist, i, p in param_sites:
        plist[i] = _adopt(p)
    return model


def _check_convertible(module: nn.Module, name: str, torch_sn_state, weight: torch.Tensor) -> None:
    """Refuse, naming the layer, a PyTorch spectral norm whose settings sn_kernels does not take (an
    eps that is not positive: PyTorch accepts eps=0, whose normalize divides a zero vector by 0; an eps
    that ``weight``'s computation dtype cannot hold)."""
    try:
        check_iterations_eps(front_end_iterations(getattr(torch_sn_state, "n_power_iterations", 1)),
                             torch_sn_state.eps)
        check_eps_in(torch_sn_state.eps, weight.dtype)
    except (TypeError, ValueError) as err:
        raise type(err)(f"sn_kernels.convert: {type(module).__name__}.{name}: {err}; nothing was converted") \
            from None


def _adopt(torch_param: nn.Module) -> parametrizations.SpectralNormParametrization:
    """Our parametrization holding the very buffers of PyTorch's."""
    ours = parametrizations.SpectralNormParametrization.__new__(parametrizations.SpectralNormParametrization)
    nn.Module.__init__(ours)
    # PyTorch's keeps dim as given (0.0 runs there: it tests dim != 0); the op wants an int
    ours.dim, ours.eps, ours.sigma, ours.gain = front_end_dim(torch_param.dim), torch_param.eps, None, None
    if hasattr(torch_param, "n_power_iterations"):
        # PyTorch's keeps any integer it was given (a NumPy int, a tensor); the op wants an int
        ours.n_power_iterations = front_end_iterations(torch_param.n_power_iterations)
    for name, buf in torch_param._buffers.items():
        ours.register_buffer(name, buf)
    ours.train(torch_param.training)
    return ours


@torch.no_grad()
def sigmas(model: nn.Module) -> dict[str, torch.Tensor]:
    """The latest sigma of every spectrally normalized weight in ``model``, keyed by
    qualified name (``"block1.c1.weight"``), for logging.  Weights not run yet, loaded since
    their last forward (``load_state_dict``) or wrapped by PyTorch's own API get
    sigma = u . (W v) from their current state;
    mode="conv" weights appear once their first forward has drawn u, v.
    With ``bound="upper"`` or ``"operator"`` the sigma is the certified divisor B' >= sigma(W) (float64)
    of the weight as it is now, the one an eval forward would use (no state changes); the
    power iteration's estimate is ``state.certifier.estimate``.  A second spectral norm stacked
    on one weight (parametrization API) is keyed by its position in the list: ``"fc.weight[1]"``.
    Adds nothing to the state_dict."""
    check_model(model, "sigmas")
    out = {}
    for qual, site in walk(model):
        kind, module, pname, state = site.kind, site.module, site.name, site.state
        plist = module.parametrizations[pname] if site.api == "parametrization" else None
        if plist is not None:  # a spectral norm stacked after another on one weight: keyed by its position
            norms = [p for p in plist if _kind_of(p) is not None]
            if norms[0] is not state:
                qual = f"{qual}[{list(plist).index(state)}]"
        sigma = getattr(state, "sigma", None)
        if sigma is None and kind == "conv":
            u, v = (getattr(module, pname + "_u"), getattr(module, pname + "_v")) if site.api == "hook" \
                else (state._u, state._v)
            if v.numel() == 0:  # u, v not drawn yet: they depend on the input size
                continue
            weight = getattr(module, pname + "_orig") if site.api == "hook" else input_of(plist, state).detach()
            out[qual] = conv_norm.conv_spectral_normalize(state.spec, weight.detach(), u, v, eps=state.eps,
                                                          training=False)[1]
            continue
        certifier = getattr(state, "certifier", None)
        if certifier is not None:  # the divisor for the weight as it is now: one an optimizer step made stale
            # since the last forward would not bound its sigma
            weight = getattr(module, pname + "_orig") if kind == "hook" else input_of(plist, state).detach()
            out[qual] = certifier.divisor(weight, state.dim, 1.0 if state.coeff is None else float(state.coeff),
                                          training=False, keep=False)
            continue
        if sigma is None:
            if kind == "hook":
                weight, u, v = (getattr(module, pname + s) for s in ("_orig", "_u", "_v"))
            else:  # its input: original, or the output of the parametrizations before it (stacked)
                weight = input_of(plist, state).detach()
                if weight.ndim == 1:
                    out[qual] = torch.linalg.vector_norm(weight)
                    continue
                u, v = state._u, state._v
            _, sigma = spectral_normalize(weight, u, v, eps=state.eps, dim=state.dim, training=False)
        out[qual] = sigma
    return out


def _sn_layer(base: type, doc: str) -> type:
    """A subclass of ``base`` whose weight is spectrally normalized at construction."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, api: str = "hook",
                 coeff: float | None = None, soft: bool = False, gain: bool = False, bound: str = "estimate",
                 bound_every: int = 1, **kwargs):
        base.__init__(self, *args, **kwargs)
        _wrapper(api)(self, n_power_iterations=n_power_iterations, eps=eps, coeff=coeff, soft=soft, gain=gain,
                      bound=bound, bound_every=bound_every)

    return type("SN" + base.__name__, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


_DOC = ("``torch.nn.{0}`` with a spectrally normalized weight.  Extra keyword arguments: "
        "``n_power_iterations=1``, ``eps=1e-12``, ``api='hook'`` (state_dict keys of "
        "``torch.nn.utils.spectral_norm``) or ``'parametrization'``, and the variants "
        "``coeff``, ``soft``, ``gain``, ``bound``, ``bound_every`` of ``sn_kernels.spectral_norm``.")
SNLinear = _sn_layer(nn.Linear, _DOC.format("Linear"))
SNConv1d = _sn_layer(nn.Conv1d, _DOC.format("Conv1d"))
SNConv2d = _sn_layer(nn.Conv2d, _DOC.format("Conv2d"))
SNConv3d = _sn_layer(nn.Conv3d, _DOC.format("Conv3d"))
SNConvTranspose1d = _sn_layer(nn.ConvTranspose1d, _DOC.format("ConvTranspose1d"))
SNConvTranspose2d = _sn_layer(nn.ConvTranspose2d, _DOC.format("ConvTranspose2d"))
SNConvTranspose3d = _sn_layer(nn.ConvTranspose3d, _DOC.format("ConvTranspose3d"))
SNEmbedding = _sn_layer(nn.Embedding, _DOC.format("Embedding"))
