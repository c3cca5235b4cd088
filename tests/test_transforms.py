"""Spectral normalization under torch.func transforms (sn_kernels/transforms.py): jacrev, grad of
functional_call, vmap of grad, as PyTorch's own spectral norm runs them."""
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import sn_kernels
from helpers import model_state

WRAPS = {
    "hook": (torch.nn.utils.spectral_norm, sn_kernels.spectral_norm),
    "param": (torch.nn.utils.parametrizations.spectral_norm, sn_kernels.parametrizations.spectral_norm),
}
BACKENDS = [b for b in ("native", "torch") if b in sn_kernels.available_backends("cpu")]


def pair(api):
    """(PyTorch's, ours): a small MLP, both spectral norms drawn from the same seed."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    models = []
    for wrap in WRAPS[api]:
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        for layer in (model[0], model[2]):
            wrap(layer)
        models.append(model)
    return models


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["hook", "param"])
def test_jacrev_and_grad_match_pytorch(api, backend, training):
    """jacrev with respect to the input and grad of functional_call with respect to the parameters give
    PyTorch's values, step after step, and leave u, v as PyTorch's (iterated once per call in training)."""
    ref, ours = pair(api)
    ref.train(training), ours.train(training)
    x = torch.randn(4, 6, dtype=torch.float64)
    with sn_kernels.use_backend(backend):
        for _ in range(3):
            jr, jo = jacrev(ref)(x[0]), jacrev(ours)(x[0])
            torch.testing.assert_close(jo, jr, rtol=1e-10, atol=1e-12)
            gs = [grad(lambda p, m=m: functional_call(m, p, (x,)).square().sum())(dict(m.named_parameters()))
                  for m in (ref, ours)]
            for name in gs[0]:
                torch.testing.assert_close(gs[1][name], gs[0][name], rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(model_state(ours), model_state(ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["hook", "param"])
def test_per_sample_gradients(api, backend):
    """vmap(grad(...)) over a batch (per-sample gradients, as DP-SGD computes them) equals one autograd
    backward per sample (eval mode: every call sees the same u, v)."""
    _, ours = pair(api)
    ours.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    params = {k: p.detach() for k, p in ours.named_parameters()}

    def loss(p, xi):
        return functional_call(ours, p, (xi.unsqueeze(0),)).square().sum()

    with sn_kernels.use_backend(backend):
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        for i in range(len(x)):
            ours.zero_grad()
            ours(x[i:i + 1]).square().sum().backward()
            for name, p in ours.named_parameters():
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", [{"coeff": 0.7}, {"coeff": 0.7, "soft": True}, {"gain": True}], ids=str)
@pytest.mark.parametrize("api", ["hook", "param"])
def test_variants_under_grad_match_eager(api, variant):
    """coeff, soft and gain under grad give the eager backward's gradients (same u, v before the call)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()
    WRAPS[api][1](layer, **variant)
    with torch.no_grad():
        layer.weight_orig.mul_(3) if api == "hook" else layer.parametrizations.weight.original.mul_(3)
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    g = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(dict(layer.named_parameters()))
    twin(x).square().sum().backward()
    for name, p in twin.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(model_state(layer), model_state(twin)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_grouped_model_under_grad():
    """A grouped model leaves the layers to compute their own under a transform (the group's C++ node
    cannot run there): the values of the ungrouped model."""
    _, ours = pair("param")
    grouped = copy.deepcopy(ours)
    sn_kernels.group(grouped)
    x = torch.randn(4, 6, dtype=torch.float64)
    ga, gb = (grad(lambda p, m=m: functional_call(m, p, (x,)).sum())(dict(m.named_parameters()))
              for m in (ours, grouped))
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(model_state(grouped), model_state(ours)))


@pytest.mark.parametrize("what", ["upper", "conv"])
def test_unsupported_variants_refuse_under_transforms(what):
    if what == "upper":
        layer = sn_kernels.spectral_norm(nn.Linear(4, 3), bound="upper")
        shape = (4,)
    else:
        layer = sn_kernels.spectral_norm(nn.Conv2d(2, 3, 3), mode="conv")
        layer(torch.randn(1, 2, 6, 6))
        shape = (1, 2, 6, 6)
    with pytest.raises(NotImplementedError, match="not supported under torch.func transforms"):
        jacrev(layer)(torch.randn(shape))


@pytest.mark.parametrize("api", ["hook", "param"])
def test_forward_mode_ad_matches_pytorch(api):
    """Forward-mode AD (torch.autograd.forward_ad) with respect to the weight, eval mode, and
    jacobian(strategy="forward-mode"): PyTorch's tangents (C++ autograd functions have no jvp, so the
    plain-op route runs while a dual level is open)."""
    import torch.autograd.forward_ad as fwAD

    ref, ours = pair(api)
    ref.eval(), ours.eval()
    name = "0.weight_orig" if api == "hook" else "0.parametrizations.weight.original"
    w = dict(ref.named_parameters())[name].detach().clone()
    tangent = torch.randn_like(w)
    x = torch.randn(3, 6, dtype=torch.float64)
    outs = []
    for model in (ref, ours):
        with fwAD.dual_level():
            y = functional_call(model, {name: fwAD.make_dual(w, tangent)}, (x,))
            outs.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    jac = [torch.autograd.functional.jacobian(lambda p, m=m: functional_call(m, {name: p}, (x,)), w,
                                              strategy="forward-mode", vectorize=True) for m in (ref, ours)]
    torch.testing.assert_close(jac[1], jac[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["forward_ad", "jvp"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_forward_mode_ad_in_training(api, how):
    """Forward-mode AD with respect to the weight in training mode (where PyTorch's own spectral norm
    fails: its power iteration writes u, v with out= ops, which forward AD refuses once the weight's
    tangent reaches them): u, v iterate as without AD, and the tangent is that of W / sigma with the
    iterated u, v constant, i.e. PyTorch's eval-mode tangent from the state the call left."""
    import torch.autograd.forward_ad as fwAD

    ref, ours = pair(api)
    name = "0.weight_orig" if api == "hook" else "0.parametrizations.weight.original"
    w = dict(ours.named_parameters())[name].detach().clone()
    tangent = torch.randn_like(w)
    x = torch.randn(3, 6, dtype=torch.float64)
    plain = copy.deepcopy(ours)
    y_plain = plain(x)
    if how == "jvp":
        y, t = torch.func.jvp(lambda p: functional_call(ours, {name: p}, (x,)), (w,), (tangent,))
    else:
        with fwAD.dual_level():
            out = functional_call(ours, {name: fwAD.make_dual(w, tangent)}, (x,))
            y, t = fwAD.unpack_dual(out)
    torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-14)  # the plain-op route: to rounding
    for a, b in zip(model_state(ours), model_state(plain)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    with fwAD.dual_level():
        t_ref = fwAD.unpack_dual(functional_call(ref, {name: fwAD.make_dual(w, tangent)}, (x,))).tangent
    torch.testing.assert_close(t, t_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_u_v_are_constants_under_grad_as_under_autograd(api, training):
    """u, v passed with requires_grad through functional_call get no gradient from the autograd route; the
    torch.func route must agree (it differentiated sigma = u . (W v) through them in eval)."""
    torch.manual_seed(0)
    layer = WRAPS[api][1](nn.Linear(4, 5)).train(training)
    x = torch.randn(3, 4)
    buffers = {n: b.detach().clone().requires_grad_() for n, b in layer.named_buffers()}
    functional_call(layer, buffers, (x,)).sum().backward()
    assert all(b.grad is None or not b.grad.any() for b in buffers.values())
    grads = grad(lambda bs: functional_call(layer, bs, (x,)).sum())({n: b.detach().clone()
                                                                     for n, b in layer.named_buffers()})
    assert all(not g.any() for g in grads.values())


@contextlib.contextmanager
def _dual_level_in_another_thread():
    """A block run while another thread holds a forward-AD level (``dual_level``: one for the process)."""
    import threading

    import torch.autograd.forward_ad as fwAD

    opened, done = threading.Event(), threading.Event()

    def hold_level():
        with fwAD.dual_level():
            opened.set()
            done.wait(10)
    thread = threading.Thread(target=hold_level)
    thread.start()
    try:
        assert opened.wait(10)
        yield
    finally:
        done.set()
        thread.join(10)


@pytest.mark.parametrize("bound", ["estimate", "upper"])
def test_another_threads_forward_ad_level_changes_nothing_here(bound):
    """A forward-mode AD level is one for the process: while another thread holds one, a layer here whose
    weight carries no tangent runs its usual route (the same bits; a certified bound is not refused)."""
    torch.manual_seed(0)
    layer = sn_kernels.spectral_norm(nn.Linear(6, 5), bound=bound)
    x = torch.randn(3, 6)
    twin = copy.deepcopy(layer)
    expected = twin(x)
    with _dual_level_in_another_thread():
        out = layer(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.equal(layer.weight_orig.grad, twin.weight_orig.grad)


def test_another_threads_forward_ad_level_keeps_a_step_group_grouped():
    """group(model, optimizer=opt): while another thread holds a forward-AD level, two forwards of one
    optimizer step still share one power iteration (each layer computed its own, iterating u twice)."""
    torch.manual_seed(0)
    model = nn.Sequential(sn_kernels.spectral_norm(nn.Linear(6, 6)), nn.ReLU(),
                          sn_kernels.spectral_norm(nn.Linear(6, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sn_kernels.group(model, optimizer=opt)
    x = torch.randn(3, 6)
    model(x).sum().backward()
    opt.step()
    with _dual_level_in_another_thread():
        before = model[0].weight_u._version
        (model(x).sum() + model(x).sum()).backward()
        moves = model[0].weight_u._version - before
    assert moves == 1
