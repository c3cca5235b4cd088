"""The GAN discriminator step under torch.compile with inductor: D(real) and D(fake) as two
compiled forwards, then one backward of both.  Each forward updates u, v in place, so a
compiled graph that saves the buffers themselves for backward (rather than the copies
the forward used) fails with "modified by an inplace operation", as PyTorch's own
spectral norm does there in torch 2.11."""
import copy

import pytest
import torch
from torch import nn

import sn_kernels


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_two_compiled_forwards_then_one_backward(api):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(8 * 4 * 4, 1))
    sn_kernels.apply_spectral_norm(eager, api=api)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="inductor")
    for _ in range(2):
        real, fake = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
        for m, run in ((eager, eager), (model, compiled)):
            m.zero_grad()
            (torch.relu(1 - run(real)).mean() + torch.relu(1 + run(fake)).mean()).backward()
        for a, b in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for a, b in zip(model.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
