"""sn_kernels.group: identical results to per-module spectral norm, step after step."""
import copy

import pytest
import torch
from torch import nn

import sn_kernels


class TwiceD(nn.Module):
    """A discriminator whose middle layer is called twice per model call."""

    def __init__(self, api):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Linear(6 * 4 * 4, 1)
        sn_kernels.apply_spectral_norm(self, api=api)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(torch.relu(self.b(h))))
        return self.c(h.flatten(1))


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_grouped_identical_to_per_module(api):
    torch.manual_seed(0)
    per_module = TwiceD(api)
    grouped = copy.deepcopy(per_module)
    handle = sn_kernels.group(grouped)
    assert len(handle) == 3
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (per_module, grouped)]
    for step in range(4):
        x = torch.randn(2, 3, 6, 6)
        outs = []
        for model, opt in zip((per_module, grouped), opts):
            opt.zero_grad()
            y = model(x)
            y.square().sum().backward()
            opt.step()
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1])
        assert all(torch.equal(a, b) for a, b in zip(_state(per_module), _state(grouped)))
    per_module.eval(), grouped.eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(per_module(x), grouped(x))
    assert all(torch.equal(a, b) for a, b in zip(_state(per_module), _state(grouped)))
    handle.remove()
    grouped.train(), per_module.train()
    assert torch.equal(per_module(x), grouped(x))


def test_group_needs_sn_layers():
    with pytest.raises(ValueError, match="no sn_kernels spectral norm"):
        sn_kernels.group(nn.Linear(3, 3))


def test_unused_layer_still_iterates_documented_difference():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    sn_kernels.apply_spectral_norm(model)
    model.forward = lambda x: model["used"](x)
    sn_kernels.group(model)
    u0 = model["unused"].weight_u.clone()
    model(torch.randn(1, 3))
    assert not torch.equal(model["unused"].weight_u, u0)
