"""Both drop-in front ends against PyTorch's own, step after step: outputs, u, v,
gradients, eval, removal, and state_dicts loaded across in both directions."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_kernels
from helpers import check, hook_of

LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), lambda: torch.randn(4, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(3, 6, 3, stride=2), lambda: torch.randn(2, 3, 4, 4)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (5,))),
    "linear_1xn": (lambda: nn.Linear(9, 1), lambda: torch.randn(3, 9)),
    "linear_mx1": (lambda: nn.Linear(1, 9), lambda: torch.randn(3, 1)),
}

API = {
    "hook": (torch.nn.utils.spectral_norm, sn_kernels.spectral_norm,
             lambda m: (m.weight_u, m.weight_v), lambda m: m.weight_orig),
    "param": (torch.nn.utils.parametrizations.spectral_norm, sn_kernels.parametrizations.spectral_norm,
              lambda m: (m.parametrizations.weight[0]._u, m.parametrizations.weight[0]._v),
              lambda m: m.parametrizations.weight.original),
}


def make_pair(layer, api, n_iter, seed=0):
    """The same layer wrapped by PyTorch and by sn_kernels, with identical u, v draws."""
    factory, _ = LAYERS[layer]
    torch_wrap, our_wrap, _, _ = API[api]
    torch.manual_seed(seed)
    ref = factory()
    ours = copy.deepcopy(ref)
    torch.manual_seed(seed + 1)
    torch_wrap(ref, n_power_iterations=n_iter)
    torch.manual_seed(seed + 1)
    our_wrap(ours, n_power_iterations=n_iter)
    return ref, ours


def compare_state(ref, ours, api, what):
    _, _, vecs, orig = API[api]
    for name, a, b in zip("uv", vecs(ours), vecs(ref)):
        check(f"{what} {name} vs PyTorch", a, b)
    if orig(ref).grad is not None:
        check(f"{what} grad vs PyTorch", orig(ours).grad, orig(ref).grad, scale=10)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("api", list(API))
@pytest.mark.parametrize("n_iter", [1, 3])
def test_step_by_step(layer, api, n_iter):
    ref, ours = make_pair(layer, api, n_iter)
    _, make_input = LAYERS[layer]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(4):
        x = make_input()
        y_ref, y_ours = ref(x), ours(x)
        check(f"{api} output vs PyTorch", y_ours, y_ref, scale=10)
        g = torch.randn_like(y_ref)
        opt_ref.zero_grad()
        opt_ours.zero_grad()
        y_ref.backward(g)
        y_ours.backward(g)
        compare_state(ref, ours, api, api)
        opt_ref.step()
        opt_ours.step()

    ref.eval()
    ours.eval()
    x = make_input()
    u_before = [t.clone() for t in API[api][2](ours)]
    check(f"{api} eval output vs PyTorch", ours(x), ref(x), scale=10)
    assert all(torch.equal(a, b) for a, b in zip(u_before, API[api][2](ours))), "eval must not update u, v"

    # state_dicts load across in both directions
    assert list(ours.state_dict()) == list(ref.state_dict())
    if api == "hook":
        assert ours.state_dict()._metadata[""]["spectral_norm"] == ref.state_dict()._metadata[""]["spectral_norm"]
    ref2, ours2 = make_pair(layer, api, n_iter, seed=7)
    ours2.load_state_dict(ref.state_dict())
    ref2.load_state_dict(ours.state_dict())
    ref2.eval()
    ours2.eval()
    check(f"{api} loaded across vs PyTorch", ours2(x), ref2(x), scale=10)

    # removal keeps W / sigma
    if api == "hook":
        sn_kernels.remove_spectral_norm(ours)
        torch.nn.utils.remove_spectral_norm(ref)
        assert isinstance(ours.weight, nn.Parameter) and not hasattr(ours, "weight_orig")
    else:
        parametrize.remove_parametrizations(ours, "weight")
        parametrize.remove_parametrizations(ref, "weight")
        assert not parametrize.is_parametrized(ours)
    check(f"{api} removed weight vs PyTorch", ours.weight, ref.weight, scale=10)


def test_default_dims():
    for cls, dim in [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 1), (nn.ConvTranspose3d, 1), (nn.Conv2d, 0)]:
        m = cls(4, 6, 3)
        sn_kernels.spectral_norm(m)
        assert hook_of(m).dim == dim
        assert m.weight_u.shape == (m.weight_orig.shape[dim],)
        p = cls(4, 6, 3)
        sn_kernels.parametrizations.spectral_norm(p)
        assert p.parametrizations.weight[0].dim == dim


def test_old_checkpoint_without_version_loads():
    """PyTorch's loader for pre-1.0 checkpoints (weight, weight_orig, weight_u; no v) works on ours."""
    ref, _ = make_pair("linear", "hook", 1)
    ref(torch.randn(2, 7))
    sd = ref.state_dict()
    old = {k: v for k, v in sd.items() if k != "weight_v"}
    old["weight"] = ref.weight.detach()
    old = type(sd)(old)
    old._metadata = {"": {"version": 1}}
    ref2, ours2 = make_pair("linear", "hook", 1, seed=3)
    ours2.load_state_dict(old)
    ref2.load_state_dict(old)
    check("old checkpoint v vs PyTorch", ours2.weight_v, ref2.weight_v)


def test_deepcopy_and_save_after_forward():
    m = sn_kernels.SNLinear(6, 4)
    y = m(torch.randn(3, 6))
    assert m.weight.grad_fn is not None  # still attached to the graph, as in PyTorch
    c = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 6)
    m.eval(), c.eval(), loaded.eval()
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    y.sum().backward()  # the original graph is intact
    assert m.weight_orig.grad is not None


def test_torch_remove_works_on_ours_and_ours_on_torch():
    a = sn_kernels.spectral_norm(nn.Linear(3, 4))
    torch.nn.utils.remove_spectral_norm(a)
    b = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    sn_kernels.remove_spectral_norm(b)
    assert isinstance(a.weight, nn.Parameter) and isinstance(b.weight, nn.Parameter)
    assert not a._forward_hooks and not a._forward_pre_hooks  # ours leaves no forward hook (``keep``) behind


@pytest.mark.parametrize("bound", ["estimate", "upper"])
def test_torch_remove_leaves_nothing_of_ours_behind(bound):
    """PyTorch's remove_spectral_norm on our hook leaves no load_state_dict pre-hook of ours (PyTorch's
    leaves its own behind): with a certified bound, that hook kept a copy of the weight per wrap and removal."""
    layer = nn.Linear(16, 16)
    for _ in range(3):
        sn_kernels.spectral_norm(layer, bound=bound)
        layer(torch.randn(2, 16)).sum().backward()
        torch.nn.utils.remove_spectral_norm(layer)
    assert not layer._load_state_dict_pre_hooks
    layer.load_state_dict(nn.Linear(16, 16).state_dict())  # a plain layer's state_dict loads


def test_hook_keep_belongs_to_its_copy():
    """The hook API's forward hook (``SpectralNorm.keep``, for the compiled route) is bound to its own
    pre-hook in a deep copy, and each copy's removal takes its own away; a converted PyTorch hook
    gets one too."""
    m = sn_kernels.spectral_norm(nn.Linear(3, 4))
    c = copy.deepcopy(m)
    for mod in (m, c):
        (keep,) = mod._forward_hooks.values()
        (pre,) = mod._forward_pre_hooks.values()
        assert keep.__self__ is pre and pre.keeps
    sn_kernels.remove_spectral_norm(c)
    assert not c._forward_hooks and len(m._forward_hooks) == 1
    t = sn_kernels.convert(torch.nn.utils.spectral_norm(nn.Linear(3, 4)))
    (keep,) = t._forward_hooks.values()
    assert keep.__self__ is next(iter(t._forward_pre_hooks.values()))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("wrap", [sn_kernels.spectral_norm, sn_kernels.parametrizations.spectral_norm])
def test_refusals_leave_module_unchanged(wrap):
    m = nn.Linear(3, 4)
    before = dict(m.state_dict())
    with pytest.raises(ValueError, match="n_power_iterations"):
        wrap(m, n_power_iterations=0)
    with pytest.raises(ValueError, match="eps"):
        wrap(m, eps=0.0)
    with pytest.raises((KeyError, ValueError), match="nonexistent"):
        wrap(m, name="nonexistent")
    with pytest.raises(IndexError, match="Dimension out of range"):
        wrap(m, dim=5)
    assert list(m.state_dict()) == list(before) and not sn_kernels.is_spectral_normalized(m)
    wrap(m)
    if wrap is sn_kernels.spectral_norm:  # PyTorch's hook refuses a second one; its parametrization stacks
        with pytest.raises(RuntimeError, match="two spectral_norm"):
            wrap(m)


@pytest.mark.parametrize("api", ["hook", "param"])
def test_front_ends_take_any_integer_iteration_count_as_pytorch(api):
    """PyTorch's front ends take a NumPy integer, a one-element integer tensor or a bool for
    n_power_iterations (and so must convert(), which rebuilds them with the stored value)."""
    np = pytest.importorskip("numpy")
    torch_wrap, our_wrap = {"hook": (torch.nn.utils.spectral_norm, sn_kernels.spectral_norm),
                            "param": (torch.nn.utils.parametrizations.spectral_norm,
                                      sn_kernels.parametrizations.spectral_norm)}[api]
    for n in (np.int64(2), torch.tensor(2), True):
        torch.manual_seed(0)
        ref = torch_wrap(nn.Linear(5, 3), n_power_iterations=n)
        torch.manual_seed(0)
        ours = our_wrap(nn.Linear(5, 3), n_power_iterations=n)
        x = torch.randn(2, 5)
        torch.testing.assert_close(ours(x), ref(x))
        model = nn.Sequential(torch_wrap(nn.Linear(5, 3), n_power_iterations=n))
        sn_kernels.convert(model)
        assert sn_kernels.is_spectral_normalized(model[0])
    for bad in (2.0, "2", torch.tensor(2.0)):
        with pytest.raises(TypeError, match="n_power_iterations must be an integer"):
            our_wrap(nn.Linear(5, 3), n_power_iterations=bad)


def _iteration_owner(m, api):
    """The object whose n_power_iterations a layer's spectral norm reads at each call."""
    return hook_of(m) if api == "hook" else m.parametrizations.weight[0]


@pytest.mark.parametrize("grouped", [False, True], ids=["per_module", "grouped"])
@pytest.mark.parametrize("layer", ["linear", "conv2d", "convT2d"])
@pytest.mark.parametrize("api", list(API))
def test_iteration_count_set_to_zero_after_wrapping_as_pytorch(api, layer, grouped):
    """Both PyTorch front ends refuse n_power_iterations <= 0 when wrapping but iterate range(n) at each call:
    a count set to 0 (or below) afterwards freezes u, v and divides by sigma = u . (W v), in training too.
    Ours does the same, per module and inside a group (the layer is then computed alone)."""
    ref, ours = make_pair(layer, api, 1)
    x = LAYERS[layer][1]()
    model = nn.Sequential(ours)
    if grouped:
        sn_kernels.group(model)
    for step, n in enumerate([1, 0, -1, 0, 2]):
        _iteration_owner(ref, api).n_power_iterations = n
        _iteration_owner(ours, api).n_power_iterations = n
        before = [t.clone() for t in API[api][2](ours)]
        y_ref, y = ref(x), model(x)
        check(f"step {step} output", y, y_ref)
        compare_state(ref, ours, api, f"step {step}")
        if n <= 0:  # nothing moved
            assert all(torch.equal(a, b) for a, b in zip(API[api][2](ours), before))
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
        compare_state(ref, ours, api, f"step {step} backward")


def test_refuses_non_floating_and_0d():
    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match="0-d"):
        sn_kernels.spectral_norm(m)
    with pytest.raises(ValueError, match="0-d"):
        sn_kernels.parametrizations.spectral_norm(m)
    m = nn.Module()
    m.register_buffer("weight", torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        sn_kernels.parametrizations.spectral_norm(m)
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="refuses complex weights.*parametrizations.spectral_norm"):
        sn_kernels.spectral_norm(m)
    assert "weight" in m._parameters and not sn_kernels.is_spectral_normalized(m)


@pytest.mark.parametrize("api", list(API))
def test_loaded_vector_of_wrong_shape_names_the_key(api):
    _, ours = make_pair("linear", api, 1)
    sd = ours.state_dict()
    key = "weight_u" if api == "hook" else "parametrizations.weight.0._u"
    sd[key] = torch.randn(sd[key].numel() + 1)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        ours.load_state_dict(sd)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("variant", ["plain", "coeff", "upper", "upper-carry", "grouped"])
@pytest.mark.parametrize("api", ["hook", "param"])
def test_sparse_embedding_gradients(api, variant, backend):
    """nn.Embedding(sparse=True) sends a sparse gradient into W / sigma: every backward takes it (the
    weight's gradient is dense, as PyTorch's), equal to the dense embedding's; plain, also to PyTorch's."""
    if backend not in sn_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available")
    kwargs = {"plain": {}, "coeff": {"coeff": 0.5}, "upper": {"bound": "upper"},
              "upper-carry": {"bound": "upper", "bound_every": 3}, "grouped": {}}[variant]
    wraps = {"hook": (torch.nn.utils.spectral_norm, sn_kernels.spectral_norm),
             "param": (torch.nn.utils.parametrizations.spectral_norm, sn_kernels.parametrizations.spectral_norm)}[api]
    idx = torch.tensor([1, 2, 2, 7])
    weights = torch.arange(16.0).reshape(4, 4)
    grads = []
    for sparse, wrap in ((False, wraps[1]), (True, wraps[1]), (True, wraps[0])):
        if wrap is wraps[0] and variant != "plain":
            continue
        torch.manual_seed(0)
        e = nn.Embedding(10, 4, sparse=sparse)
        wrap(e, **kwargs)
        if variant == "grouped":
            sn_kernels.group(e)
        with sn_kernels.use_backend(backend):
            for _ in range(2):
                e.zero_grad()
                (e(idx) * weights).sum().backward()
        original = e.weight_orig if api == "hook" else e.parametrizations.weight.original
        grads.append(original.grad.to_dense())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", [sn_kernels.spectral_norm, sn_kernels.parametrizations.spectral_norm])
def test_lazy_module_refused_in_pytorchs_words(wrap):
    """A lazy layer before its dummy forward: PyTorch's hook message (the parametrization API gave an
    internal one), the layer left as it was; after the dummy forward it wraps."""
    m = nn.LazyLinear(4)
    with pytest.raises(ValueError, match="can't have uninitialized parameters"):
        wrap(m)
    assert not sn_kernels.is_spectral_normalized(m)
    m(torch.randn(2, 3))
    wrap(m)
    assert m(torch.randn(2, 3)).shape == (2, 4)


def test_stale_kept_weight_dropped_at_the_next_call():
    """The compiled CPU route keeps a second W/sigma for ``module.weight`` until the forward hook sets it;
    a call that failed between the two (an error in the layer's forward) leaves it behind, and the next
    (eager) call must not set it as ``module.weight``."""
    from helpers import hook_of

    layer = sn_kernels.spectral_norm(nn.Linear(3, 4))
    hook = hook_of(layer)
    stale = hook.kept = torch.full((4, 3), 7.0)  # what an interrupted compiled call left
    layer(torch.randn(2, 3))
    assert layer.weight is not stale
    torch.testing.assert_close(layer.weight, layer.weight_orig / sn_kernels.sigmas(layer)["weight"])
