"""GAN training patterns through SN layers, against PyTorch's spectral norm."""
import copy

import pytest
import torch
from torch import nn

import sn_kernels
from helpers import check

WRAPS = {
    "hook": (torch.nn.utils.spectral_norm, sn_kernels.spectral_norm),
    "param": (torch.nn.utils.parametrizations.spectral_norm, sn_kernels.parametrizations.spectral_norm),
}


def discriminator_pair(api):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 4, stride=2),
                         nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(8 * 3 * 3, 1))
    ours = copy.deepcopy(base)
    torch_wrap, our_wrap = WRAPS[api]
    for model, wrap in ((base, torch_wrap), (ours, our_wrap)):
        torch.manual_seed(1)
        for i in (0, 2, 5):
            wrap(model[i])
    return base, ours


def compare_grads(ref, ours, what):
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        check(f"{what} grad vs PyTorch", a.grad, b.grad, scale=10)
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        check(f"{what} u/v vs PyTorch", a, b)


@pytest.mark.parametrize("api", list(WRAPS))
def test_real_and_fake_in_one_graph(api):
    """Two forwards (two power iterations) before one backward: the backward must use
    the u, v of each forward, not the buffers' latest values."""
    ref, ours = discriminator_pair(api)
    for step in range(3):
        real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        losses = []
        for model in (ref, ours):
            model.zero_grad()
            loss = torch.relu(1 - model(real)).mean() + torch.relu(1 + model(fake)).mean()
            loss.backward()
            losses.append(loss)
        check("hinge loss vs PyTorch", losses[1], losses[0])
        compare_grads(ref, ours, "real+fake")


@pytest.mark.parametrize("api", list(WRAPS))
def test_wgan_gp_gradient_penalty(api):
    ref, ours = discriminator_pair(api)
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    alpha = torch.rand(4, 1, 1, 1)
    results = []
    for model in (ref, ours):
        model.zero_grad()
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
        out = model(x_hat)
        (grad_x,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        gp = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = model(fake).mean() - model(real).mean() + 10 * gp
        loss.backward()
        results.append((grad_x.detach(), gp.detach()))
    check("WGAN-GP grad_x vs PyTorch", results[1][0], results[0][0], scale=10)
    check("WGAN-GP penalty vs PyTorch", results[1][1], results[0][1], scale=10)
    compare_grads(ref, ours, "WGAN-GP")


def test_double_backward_through_weight_gradient():
    """create_graph through the weight gradient itself (rare, but must not be silently wrong)."""
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    fn = lambda w: sn_kernels.spectral_normalize(w, u, v, training=False)[0]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (w,))


@pytest.mark.parametrize("api", list(WRAPS))
def test_alternating_updates_second_backward_after_step(api):
    """The usual loop: a D step (backward, optimizer step), then a G step whose backward
    goes through D again after D's weights changed in place; then D again."""
    ref, ours = discriminator_pair(api)
    torch.manual_seed(5)
    gen_ref = nn.Sequential(nn.Linear(6, 3 * 8 * 8), nn.Unflatten(1, (3, 8, 8)))
    gen_ours = copy.deepcopy(gen_ref)
    pairs = []
    for D, G in ((ref, gen_ref), (ours, gen_ours)):
        pairs.append((D, G, torch.optim.Adam(D.parameters(), lr=1e-2), torch.optim.Adam(G.parameters(), lr=1e-2)))
    for step in range(3):
        z, real = torch.randn(4, 6), torch.randn(4, 3, 8, 8)
        for D, G, opt_d, opt_g in pairs:
            opt_d.zero_grad()
            fake = G(z)
            (torch.relu(1 - D(real)).mean() + torch.relu(1 + D(fake.detach())).mean()).backward()
            opt_d.step()
            opt_g.zero_grad()
            (-D(fake).mean()).backward()  # through D after its in-place update
            opt_g.step()
        compare_grads(ref, ours, "alternating D")
        for a, b in zip(gen_ours.parameters(), gen_ref.parameters()):
            check("alternating G params vs PyTorch", a, b, scale=100)


def test_reusing_a_graph_after_the_step_fails_like_pytorch():
    """backward through a graph built before an optimizer step changed W in place: PyTorch
    refuses (the saved W is stale) and so do we, rather than use the new weights silently."""
    lin = sn_kernels.spectral_norm(nn.Linear(4, 2))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    out = lin(torch.randn(3, 4))
    out.sum().backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
