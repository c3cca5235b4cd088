"""PyTorch's own spectral-norm checks, restated for sn_kernels on every CPU backend.

A reduced version, in our own words, of what test/test_nn.py (test_spectral_norm*),
test/nn/test_parametrization.py (test_new_spectral_norm*) and test/test_stateless.py
check for torch.nn.utils.spectral_norm and torch.nn.utils.parametrizations.spectral_norm:
module structure, training/eval behaviour, removal, state_dict loading, the dim of
ConvTranspose, the forward against a hand-written power iteration, gradcheck through
two forwards, pickling, stacking, complex weights and torch.func.functional_call.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrize

import sn_kernels
from helpers import assert_close

hook_sn = sn_kernels.spectral_norm
param_sn = sn_kernels.parametrizations.spectral_norm


def same(a, b):
    """Equal up to the dtype's rounding (sigma from the last norm or from u.(Wv) differ in the last bits)."""
    assert_close(a.detach(), b.detach(), dtype=a.dtype if a.is_floating_point() else torch.float64)


# ----------------------------------------------------------------------------- hook API (test_nn.py)


def test_hook_structure_and_removal(backend):
    m = hook_sn(nn.Linear(5, 7, dtype=torch.float64))
    assert m.weight_u.shape == (7,) and m.weight_v.shape == (5,)
    assert "weight_orig" in m._parameters and {"weight_u", "weight_v"} <= set(m._buffers)
    assert "weight" not in m._parameters and "weight" not in m._buffers
    # before the first forward the plain attribute is the original weight's storage
    assert m.weight.untyped_storage().data_ptr() == m.weight_orig.untyped_storage().data_ptr()
    assert m.weight.shape == m.weight_orig.shape and m.weight.stride() == m.weight_orig.stride()
    m = sn_kernels.remove_spectral_norm(m)
    assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_u") and "weight" in m._parameters
    hook_sn(m)
    with pytest.raises(RuntimeError, match="register two spectral_norm hooks"):
        hook_sn(m)


def _hook_state(m):
    return m.weight_u, m.weight_v, m.weight_orig


def _param_state(m):
    sn = m.parametrizations.weight[0]
    return sn._u, sn._v, m.parametrizations.weight.original


def _remove(api, m):
    if api == "hook":
        return sn_kernels.remove_spectral_norm(m)
    m.eval()  # removal evaluates the parametrization: eval mode runs no extra power iteration
    return parametrize.remove_parametrizations(m, "weight")


@pytest.mark.parametrize("api", ["hook", "param"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_training_eval_removal_and_gradcheck(backend, api, requires_grad):
    wrap, state = (hook_sn, _hook_state) if api == "hook" else (param_sn, _param_state)

    def fresh():
        m = nn.Linear(3, 4, dtype=torch.float64)
        m.weight.requires_grad_(requires_grad)
        return wrap(m)

    x = torch.randn(2, 3, dtype=torch.float64)
    m = fresh()
    u, v, orig = state(m)
    u0, v0 = u.clone(), v.clone()
    if api == "param":  # move the weight away from where the 15 warm-up iterations converged
        m(x).sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    out = m(x)
    if requires_grad or api == "hook":
        assert not torch.equal(u0, u) and not torch.equal(v0, v), "training must update u and v"
    if requires_grad:
        torch.autograd.grad(out.sum(), orig)

    # two forwards in one graph, u, v reset before each evaluation
    saved = u.clone(), v.clone()

    def two_forwards(inp):
        u.data.copy_(saved[0])
        v.data.copy_(saved[1])
        return m(inp) + m(inp)

    two_forwards(x.clone().requires_grad_()).sum().backward()
    assert gradcheck(two_forwards, (x.clone().requires_grad_(),), check_batched_grad=False)

    # removal keeps the last output (one forward, then three)
    for n_forwards in (1, 3):
        m = fresh()
        for _ in range(n_forwards):
            before = m(x).detach()
        m = _remove(api, m)
        same(m(x), before)

    # eval: the output of the last training forward, and no more iteration
    m = fresh()
    u, v, orig = state(m)
    m(x)
    last_train = m(x)
    last_u, last_v = u.clone(), v.clone()
    m.eval()
    first_eval = m(x)
    same(first_eval, last_train)
    same(m(x), first_eval)
    assert torch.equal(u, last_u) and torch.equal(v, last_v)

    saved = u.clone(), v.clone()

    def mixed_modes(inp):
        u.data.copy_(saved[0])
        v.data.copy_(saved[1])
        outs = []
        for training in (True, False, True, False):
            m.train(training)
            outs.append(m(inp))
        return sum(outs)

    assert gradcheck(mixed_modes, (x.clone().requires_grad_(),))
    if requires_grad:
        m.eval()
        assert gradcheck(lambda w: m(x), (orig,))


def test_hook_load_state_dict(backend):
    x = torch.randn(2, 3)
    for forwards in (0, 3):
        m = hook_sn(nn.Linear(3, 5))
        for _ in range(forwards):
            m(x)
        ref = copy.deepcopy(m.state_dict())
        assert set(ref) == {"weight_orig", "bias", "weight_u", "weight_v"}

        # non-strict loads of ever smaller dicts
        partial = copy.deepcopy(ref)
        partial["nonsense"] = "nonsense"
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
            m.load_state_dict(partial, strict=True)
        for drop in ("weight_orig", "weight_u", "weight_v"):
            m.load_state_dict(partial, strict=False)
            del partial[drop]
        partial["weight"] = m.weight.detach().clone()
        m.load_state_dict(partial, strict=False)
        del partial._metadata[""]["spectral_norm"]
        m.load_state_dict(partial, strict=False)

        # a pre-1.0 dict: no v, W stored, no version metadata
        old = copy.deepcopy(ref)
        del old._metadata[""]["spectral_norm"], old["weight_v"]
        old["weight"] = m.weight.detach().clone()

        for with_metadata in (True, False):
            latest = copy.deepcopy(ref)
            if not with_metadata:
                del latest._metadata[""]["spectral_norm"]
            m = hook_sn(sn_kernels.remove_spectral_norm(m))
            m.load_state_dict(ref)
            expected = _modes_sequence(m, x)
            if forwards:  # an old dict is assumed to have seen a forward
                m = hook_sn(sn_kernels.remove_spectral_norm(m))
                m.load_state_dict(old)
                for a, b in zip(_modes_sequence(m, x), expected):
                    same(a, b)
            m = hook_sn(sn_kernels.remove_spectral_norm(m))
            m.load_state_dict(latest)
            for a, b in zip(_modes_sequence(m, x), expected):
                same(a, b)


def _modes_sequence(m, x):
    """eval, train, train, eval outputs without gradients."""
    outs = []
    with torch.no_grad():
        for training in (False, True, True, False):
            m.train(training)
            outs.append(m(x))
    return outs


@pytest.mark.parametrize("wrap", [hook_sn, param_sn], ids=["hook", "param"])
def test_conv_transpose_uses_dim_1(backend, wrap):
    m = wrap(nn.ConvTranspose2d(3, 4, (5, 6)))
    m(torch.randn(2, 3, 10, 12))
    u, _, orig = (_hook_state if wrap is hook_sn else _param_state)(m)
    assert u.shape == orig[0, :, 0, 0].shape


@pytest.mark.parametrize("api", ["hook", "param"])
def test_forward_matches_hand_written_iteration(backend, api):
    x = torch.randn(3, 5)
    m = (hook_sn if api == "hook" else param_sn)(nn.Linear(5, 7))
    u, v, orig = (_hook_state if api == "hook" else _param_state)(m)
    W = orig.detach().view(7, -1)
    if api == "hook":  # v from u, then u
        v1 = F.normalize(W.t() @ u, dim=0, eps=1e-12)
        u1 = F.normalize(W @ v1, dim=0, eps=1e-12)
    else:  # u from v, then v
        u1 = F.normalize(W @ v, dim=0, eps=1e-12)
        v1 = F.normalize(W.t() @ u1, dim=0, eps=1e-12)
    expected = F.linear(x, W / torch.dot(u1, W @ v1), m.bias)
    same(m(x), expected)


def test_hook_pickles(backend):
    m = pickle.loads(pickle.dumps(hook_sn(nn.Linear(5, 7))))
    assert isinstance(m, nn.Linear) and sn_kernels.is_spectral_normalized(m)


# ----------------------------------------------------------------------------- parametrization API


def test_param_structure_stacking_and_bias(backend):
    m = param_sn(nn.Linear(5, 7, dtype=torch.float64))
    sn = m.parametrizations.weight[0]
    assert sn._u.shape == (7,) and {"_u", "_v"} <= set(sn._buffers)
    assert "original" in m.parametrizations.weight._parameters
    assert "weight" not in m._parameters and "weight" not in m._buffers
    assert m.weight.shape == m.parametrizations.weight.original.shape
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters

    # twice on one parameter, and on a 1-D parameter: allowed, as in PyTorch
    param_sn(m, "weight")
    param_sn(m, "weight")
    param_sn(m, "bias")
    assert len(m.parametrizations.weight) == 2
    assert torch.isfinite(m(torch.randn(2, 5, dtype=torch.float64))).all()
    m = parametrize.remove_parametrizations(m, "bias")
    assert "bias" in m._parameters and "weight" not in m._parameters
    m = parametrize.remove_parametrizations(m, "weight")
    assert not parametrize.is_parametrized(m) and "weight" in m._parameters


def test_stacked_matches_pytorch(backend):
    """Two spectral norms on one weight: W / sigma1 / sigma2, step by step as PyTorch."""
    torch.manual_seed(3)
    ref = nn.Linear(6, 4)
    ours = copy.deepcopy(ref)
    for wrap, m in ((torch.nn.utils.parametrizations.spectral_norm, ref), (param_sn, ours)):
        torch.manual_seed(4)
        wrap(m)
        wrap(m)
    x = torch.randn(3, 6)
    for _ in range(3):
        y_ref, y_ours = ref(x), ours(x)
        same(y_ours, y_ref)
        y_ref.sum().backward()
        y_ours.sum().backward()
        same(ours.parametrizations.weight.original.grad, ref.parametrizations.weight.original.grad)
    # the second spectral norm sees an already normalized weight: sigma2 ~ 1 (sigma1 is an estimate)
    assert abs(ours.parametrizations.weight[1].sigma.item() - 1) < 2e-2


def test_param_load_state_dict(backend):
    x = torch.randn(2, 3)
    keys = {"parametrizations.weight.original", "bias", "parametrizations.weight.0._u",
            "parametrizations.weight.0._v"}
    for forwards in (0, 3):
        m = param_sn(nn.Linear(3, 5))
        for _ in range(forwards):
            m(x)
        ref = copy.deepcopy(m.state_dict())
        assert set(ref) == keys
        partial = copy.deepcopy(ref)
        partial["nonsense"] = "nonsense"
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
            m.load_state_dict(partial, strict=True)
        for drop in sorted(keys - {"bias"}):
            m.load_state_dict(partial, strict=False)
            del partial[drop]
        partial["weight"] = m.weight.detach().clone()
        m.load_state_dict(partial, strict=False)

        m = param_sn(parametrize.remove_parametrizations(m, "weight"))
        m.load_state_dict(ref)
        expected = _modes_sequence(m, x)
        m = param_sn(parametrize.remove_parametrizations(m, "weight"))
        m.load_state_dict(ref)
        for a, b in zip(_modes_sequence(m, x), expected):
            same(a, b)


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.complex128])
def test_value_on_a_diagonal_matrix(backend_name, dtype):
    """sigma is the largest |diagonal entry|, for real and complex weights (conjugate transposes)."""
    with sn_kernels.use_backend(backend_name):
        m = nn.Linear(2, 2, dtype=dtype)
        with torch.no_grad():
            d = torch.diagonal(m.weight)
            m.weight = nn.Parameter(torch.diag(d))
        param_sn(m)
        assert_close(m.weight.detach(), torch.diag(d / d.abs().max()), dtype=torch.float32)


# ----------------------------------------------------------------------------- torch.func.functional_call


class _Mock(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(1, 1)
        self.register_buffer("buffer", torch.ones(1))

    def forward(self, x):
        return self.l1(x) + self.buffer


@pytest.mark.parametrize("call", [torch.func.functional_call, torch.nn.utils.stateless.functional_call])
def test_functional_call_replaces_original(backend, call):
    module = _Mock()
    param_sn(module.l1)
    before = module.l1.weight.detach().clone()
    x = torch.rand(1, 1)
    new = {"l1.parametrizations.weight.original": nn.Parameter(torch.tensor([[1.0]])),
           "l1.bias": torch.tensor([0.0]), "buffer": torch.tensor([0.0])}
    same(call(module, new, x), x)  # a 1x1 weight of 1 normalizes to 1: the identity
    assert "l1.parametrizations.weight.original" in dict(module.named_parameters())
    same(module.l1.weight, before)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        call(module, new, torch.rand(4, 5))
    assert "l1.parametrizations.weight.original" in dict(module.named_parameters())
    same(module.l1.weight, before)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
def test_empty_weight_as_pytorch(backend, api, shape):
    """A weight with no entries (nn.Linear(0, 4)) runs as in PyTorch: sigma = 0, W / sigma empty, the
    iteration leaves u, v zero; train, eval, backward, grouped.  PyTorch's hook API cannot wrap a
    (0, n) weight (its reshape fails), so neither need ours."""
    torch_wrap = torch.nn.utils.spectral_norm if api == "hook" else torch.nn.utils.parametrizations.spectral_norm
    ours_wrap = hook_sn if api == "hook" else param_sn
    if api == "hook" and shape[0] == 0:
        pytest.skip("PyTorch's hook API refuses it")
    x = torch.randn(2, shape[1])
    runs = []
    for wrap, grouped in ((torch_wrap, False), (ours_wrap, False), (ours_wrap, True)):
        torch.manual_seed(0)
        m = nn.Sequential(wrap(nn.Linear(shape[1], shape[0])), ours_wrap(nn.Linear(max(shape[0], 1), 3)))
        m[1].train(False)
        if grouped:
            sn_kernels.group(m)
        out = []
        for mode in ("train", "eval", "train"):
            m[0].train(mode == "train")
            y = m[0](x)
            y.sum().backward()
            out.append((y.detach().clone(), [b.clone() for b in m[0].buffers()], m[0].weight.shape))
        runs.append(out)
        if wrap is ours_wrap:
            assert sn_kernels.sigmas(m[0])["weight"].item() == 0.0
    for theirs, ours, grouped in zip(*runs):
        for o in (ours, grouped):
            assert torch.equal(o[0], theirs[0]) and o[2] == theirs[2]
            assert all(torch.equal(a, b) for a, b in zip(o[1], theirs[1]))
    assert all(not b.any() for b in runs[1][0][1])  # u, v zero after a training forward


def test_empty_weight_op():
    """The op on an empty weight: W / sigma of its shape and dtype (differentiable), sigma = 0 in the
    accumulation dtype; u, v zeroed in training mode only."""
    w = torch.empty(3, 0, dtype=torch.float16, requires_grad=True)
    u, v = torch.ones(3, dtype=torch.float16), torch.empty(0, dtype=torch.float16)
    w_sn, sigma = sn_kernels.spectral_normalize(w, u, v, training=False)
    assert w_sn.shape == (3, 0) and w_sn.dtype == torch.float16 and w_sn.requires_grad
    assert sigma.dtype == torch.float32 and sigma.item() == 0.0 and u.eq(1).all()
    sn_kernels.spectral_normalize(w, u, v)
    assert not u.any()
    w_sn.sum().backward()
    assert w.grad.shape == (3, 0)
