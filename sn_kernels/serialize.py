"""Letting ``copy.deepcopy`` and pickling take a normalized weight that carries a graph."""
from __future__ import annotations

import weakref

import torch


def serializable(weight: torch.Tensor) -> torch.Tensor:
    """Let ``copy.deepcopy``/``torch.save`` take a graph-attached normalized weight.

    PyTorch leaves ``module.weight`` as a non-leaf tensor after a training forward,
    and both deepcopy and pickling refuse non-leaf tensors.  Copies of it can only
    be values anyway (a copy has no graph), so the tensor learns to copy and pickle
    its detached value.  A weak reference avoids a tensor -> closure -> tensor cycle.
    """
    if weight.grad_fn is None:
        return weight
    ref = weakref.ref(weight)
    weight.__deepcopy__ = lambda memo: ref().detach().clone()
    weight.__reduce_ex__ = lambda protocol: ref().detach().__reduce_ex__(protocol)
    return weight
