"""A guard for spectral norms wrapped on the meta device.

``module.to_empty(device=...)`` gives u, v uninitialised memory.  A module wrapped on
meta therefore carries this guard, a forward pre-hook that refuses the first forward
on a real device until u, v (and a ``gain``, also uninitialised) were set: by
``sn_kernels.reset_uv(model)`` or by ``load_state_dict``s that wrote each of them (a
checkpoint without v, or a load that failed on u, leaves them uninitialised).  Either
removes the guard, so modules never wrapped on meta pay nothing.
"""
from __future__ import annotations

import torch
from torch import nn


class MetaGuard:
    """Forward pre-hook: refuse a forward on a real device while u, v are uninitialised."""

    def __init__(self, module: nn.Module, u_key: str):
        self.u_key = u_key  # state_dict key of u, relative to the module
        # what to_empty() left uninitialised; the guard goes once a load has written each of them
        self.keys = [key for key in (u_key, u_key[:-1] + "v", _gain_key(u_key)) if _tensor(module, key) is not None]
        self.loaded: set[str] = set()
        self._before: dict[str, tuple[torch.Tensor, int]] = {}  # each key's tensor and version as a load starts
        module.register_forward_pre_hook(self, prepend=True)  # ahead of the spectral-norm hook
        # registered after the spectral-norm hook's own: PyTorch's solves a legacy checkpoint's v first
        module._register_load_state_dict_pre_hook(self._on_load, with_module=True)
        module.register_load_state_dict_post_hook(self._after_load)

    def _guarded(self, module: nn.Module) -> list[torch.Tensor]:
        """The guarded tensors still on ``module`` (none once its spectral norm is removed)."""
        return [t for t in (_tensor(module, key) for key in self.keys) if t is not None]

    def refuses(self, module: nn.Module) -> bool:
        """Whether a forward of ``module`` would be refused now (for ``sn_kernels.group``, which must not
        read the guarded u, v either); no state changes."""
        guarded = self._guarded(module)
        return bool(guarded) and not guarded[0].is_meta

    def __call__(self, module: nn.Module, inputs) -> None:
        guarded = self._guarded(module)
        if not guarded:  # the spectral norm was removed since: nothing of it left to guard
            self.remove(module)
            return
        if guarded[0].is_meta:
            return  # still on meta: shapes only, nothing uninitialised is read
        unset = ", ".join(key for key in self.keys if key not in self.loaded)
        raise RuntimeError(
            f"{type(module).__name__}: spectral norm was applied on the meta device and u, v ({self.u_key}) hold "
            "uninitialised memory after to_empty(); call sn_kernels.reset_uv(model) once the weights are "
            f"initialised, or load a state_dict that contains u and v (not loaded yet: {unset})"
        )

    def _on_load(self, module, *args) -> None:
        tensors = {key: _tensor(module, key) for key in self.keys}
        self._before = {key: (t, t._version) for key, t in tensors.items() if t is not None}

    def _after_load(self, module, incompatible_keys) -> None:
        # written: copied in place (its version moved) or replaced (assign=True).  A key the
        # checkpoint lacks, or whose copy failed (wrong shape), is left as it was
        for key, (before, version) in self._before.items():
            now = _tensor(module, key)
            if now is not before or now._version != version:
                self.loaded.add(key)
        self._before = {}
        if self.loaded.issuperset(self.keys):
            self.remove(module)

    def remove(self, module: nn.Module) -> None:
        """Unregister from ``module`` (looked up by identity, so deep copies remove their own copy)."""
        for hooks in (module._forward_pre_hooks, module._load_state_dict_pre_hooks,
                      module._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                hook = getattr(hook, "hook", hook)  # a load pre-hook is wrapped in a _WrappedHook
                if hook is self or getattr(hook, "__self__", None) is self:
                    del hooks[key]


def _gain_key(u_key: str) -> str:
    """The gain's key beside u's: ``<name>_gain`` by ``<name>_u`` (hook), ``gain`` by ``_u`` (parametrization)."""
    stem = u_key[:-1]
    return stem[:-1] + "gain" if stem.endswith("._") else stem + "gain"


def _tensor(module: nn.Module, key: str) -> torch.Tensor | None:
    """The buffer or parameter at ``key`` (relative to ``module``), None if there is none."""
    *path, name = key.split(".")
    try:
        owner = module.get_submodule(".".join(path)) if path else module
    except AttributeError:  # the spectral norm was removed since
        return None
    return owner._buffers.get(name, owner._parameters.get(name))


def guard_if_meta(module: nn.Module, u_key: str, weight: torch.Tensor) -> None:
    """Guard ``module`` when its spectral norm (u at ``u_key``) was wrapped on the meta device."""
    if weight.is_meta:
        MetaGuard(module, u_key)


def guards_of(module: nn.Module) -> list[MetaGuard]:
    """The meta guards of ``module``."""
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, MetaGuard)]


def remove_guards(module: nn.Module) -> bool:
    """Drop every meta guard of ``module`` (its u, v have been initialised); whether it had one."""
    guards = guards_of(module)
    for hook in guards:
        hook.remove(module)
    return bool(guards)
