"""A guard for spectral norms wrapped on the meta device.

``module.to_empty(device=...)`` gives u, v uninitialised memory.  A module wrapped on
meta therefore carries this guard, a forward pre-hook that refuses the first forward
on a real device until u, v were set: by ``sn_kernels.reset_uv(model)`` or by a
``load_state_dict`` that contains them.  Either removes the guard, so modules never
wrapped on meta pay nothing.
"""
from __future__ import annotations

import torch
from torch import nn


class MetaGuard:
    """Forward pre-hook: refuse a forward on a real device while u, v are uninitialised."""

    def __init__(self, module: nn.Module, u_key: str):
        self.u_key = u_key  # state_dict key of u, relative to the module
        module.register_forward_pre_hook(self, prepend=True)  # ahead of the spectral-norm hook
        module._register_load_state_dict_pre_hook(self._on_load, with_module=True)

    def _u(self, module: nn.Module) -> torch.Tensor:
        *path, name = self.u_key.split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        return owner._buffers[name]

    def __call__(self, module: nn.Module, inputs) -> None:
        if self._u(module).is_meta:
            return  # still on meta: shapes only, nothing uninitialised is read
        raise RuntimeError(
            f"{type(module).__name__}: spectral norm was applied on the meta device and u, v ({self.u_key}) hold "
            "uninitialised memory after to_empty(); call sn_kernels.reset_uv(model) once the weights are "
            "initialised, or load a state_dict that contains u and v"
        )

    def _on_load(self, module, state_dict, prefix, *args) -> None:
        if prefix + self.u_key in state_dict:
            self.remove(module)

    def remove(self, module: nn.Module) -> None:
        """Unregister from ``module`` (looked up by identity, so deep copies remove their own copy)."""
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is self:
                del module._forward_pre_hooks[key]
        for key, hook in list(module._load_state_dict_pre_hooks.items()):
            if getattr(getattr(hook, "hook", hook), "__self__", None) is self:
                del module._load_state_dict_pre_hooks[key]


def guard_if_meta(module: nn.Module, u_key: str, weight: torch.Tensor) -> None:
    """Guard ``module`` when its spectral norm (u at ``u_key``) was wrapped on the meta device."""
    if weight.is_meta:
        MetaGuard(module, u_key)


def remove_guards(module: nn.Module) -> bool:
    """Drop every meta guard of ``module`` (its u, v have been initialised); whether it had one."""
    guards = [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, MetaGuard)]
    for hook in guards:
        hook.remove(module)
    return bool(guards)
