"""sn_kernels.group: identical results to per-module spectral norm, step after step."""
import copy
import io

import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels.backends import native
from helpers import TwiceD, hook_of, model_state as _state, weight_models


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


class _GradInside(nn.Module):
    """A model whose forward turns grad mode on itself (called under no_grad by its caller)."""

    def __init__(self, api):
        super().__init__()
        self.a = sn_kernels.SNLinear(4, 5, api=api)
        self.b = sn_kernels.SNLinear(5, 2, api=api)

    def forward(self, x):
        with torch.enable_grad():
            return self.b(torch.tanh(self.a(x)))


def _iterate_once(layer, api):
    """One training power iteration of ``layer``'s spectral norm, its W/sigma discarded."""
    with torch.no_grad():
        if api == "hook":
            hook_of(layer).compute_weight(layer, True)
        else:
            layer.weight


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_grad_turned_on_inside_a_no_grad_call(api, backend):
    """A grouped model called under no_grad whose forward enables grad: its weights get their gradients (the
    group's W/sigma, made without a graph, is refused and each layer computes its own, from u, v the group
    already advanced: the documented extra iteration, compared here with a per-module model iterated once
    more first)."""
    if backend == "native" and native.why_not(torch.device("cpu")) is not None:
        pytest.skip("no native extension")
    with sn_kernels.use_backend(backend):
        torch.manual_seed(0)
        ref = _GradInside(api)
        model = copy.deepcopy(ref)
        sn_kernels.group(model)
        x = torch.randn(3, 4)
        for layer in (ref.a, ref.b):
            _iterate_once(layer, api)
        with torch.no_grad():
            y_ref, y = ref(x), model(x)
        assert y.requires_grad
        y_ref.sum().backward()
        y.sum().backward()
        for name, p in ref.named_parameters():
            q = dict(model.named_parameters())[name]
            assert q.grad is not None, name
            assert torch.equal(q.grad, p.grad), name
        assert torch.equal(y, y_ref)
        assert all(torch.equal(a, b) for a, b in zip(_state(ref), _state(model)))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_weight_changed_during_the_call_documented_difference(api):
    """The documented behaviour of a grouped weight changed during the model call: in place, the layer
    computes its own W/sigma from the u, v the group advanced (a second iteration) and the backward through
    the group's node raises autograd's in-place error; through ``.data``, the layer takes the W/sigma of the
    weight as it was at the call's start."""
    def original(layer):
        return layer.weight_orig if api == "hook" else layer.parametrizations.weight.original

    for how in ("in place", "data"):
        torch.manual_seed(0)
        ref = nn.Sequential(sn_kernels.SNLinear(4, 4, api=api), nn.Tanh(), sn_kernels.SNLinear(4, 1, api=api))
        model = copy.deepcopy(ref)
        sn_kernels.group(model)
        x = torch.randn(2, 4)

        def change(layer, inputs):
            with torch.no_grad():
                if how == "in place":
                    original(layer).mul_(0.5)
                else:
                    original(layer).data[0].zero_()

        model[0].register_forward_pre_hook(change, prepend=True)  # before a hook-API spectral norm
        y = model(x)
        if how == "in place":
            _iterate_once(ref[0], api)  # the group's iteration, before the change
            ref[0].register_forward_pre_hook(change, prepend=True)
            assert torch.equal(y, ref(x))
            assert all(torch.equal(a, b) for a, b in zip(_state(ref), _state(model)))
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        else:
            assert torch.equal(y, ref(x))  # the weight before the write
            assert not torch.equal(original(model[0]), original(ref[0]))


def _fresh_pair(api):
    torch.manual_seed(0)
    model = TwiceD(api)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_deepcopy_of_grouped_model_is_independent(api):
    model, reference = _fresh_pair(api)
    sn_kernels.group(model)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()          # after a forward: the EMA pattern copies a used model
    reference(x).sum().backward()
    clone = copy.deepcopy(model)
    group = sn_kernels.grouped.find_group(clone)
    assert group is not None and group.model is clone and group is not sn_kernels.grouped.find_group(model)
    assert all(m.module is dict(clone.named_modules())[n] for m, n in zip(group.members, ("a", "b", "c")))
    before = _state(model)
    with torch.no_grad():              # change the copy's weights: the original must not see it
        for p in clone.parameters():
            p.mul_(0.5)
    y = clone(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model)))  # original's u, v, W untouched
    y.sum().backward()
    assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(),
                                                                           reference.parameters()))
    # the copy computes with its own weights: same as an ungrouped copy given the same change
    ref_clone = copy.deepcopy(reference)
    with torch.no_grad():
        for p in ref_clone.parameters():
            p.mul_(0.5)
    assert torch.equal(y, ref_clone(x))
    # the copy keeps grouping, per call, identically to the per-module path
    for _ in range(2):
        assert torch.equal(clone(x), ref_clone(x))


def test_save_whole_parametrized_model_refused_as_pytorch(tmp_path):
    """PyTorch refuses torch.save of any parametrized module (state_dict only); grouping changes nothing."""
    model, _ = _fresh_pair("parametrization")
    sn_kernels.group(model)
    model(torch.randn(2, 3, 6, 6))
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        torch.save(model, tmp_path / "m.pt")


def test_save_load_grouped_model(tmp_path):
    model, reference = _fresh_pair("hook")
    sn_kernels.group(model)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    reference(x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert sn_kernels.grouped.find_group(loaded) is not None
    assert all(torch.equal(a, b) for a, b in zip(_state(model), _state(loaded)))
    for _ in range(2):
        out = loaded(x)
        assert torch.equal(out, model(x))
        assert torch.equal(out, reference(x))
    loaded.eval(), model.eval()
    assert torch.equal(loaded(x), model(x))


def test_group_remove_and_regroup_copy():
    model, _ = _fresh_pair("hook")
    handle = sn_kernels.group(model)
    with pytest.raises(ValueError, match="already grouped"):
        sn_kernels.group(model)
    handle.remove()
    assert sn_kernels.grouped.find_group(model) is None
    assert not model._forward_hooks and all(not m._forward_pre_hooks or
                                            all(isinstance(h, sn_kernels.hooks.SpectralNorm)
                                                for h in m._forward_pre_hooks.values())
                                            for m in model.modules())
    sn_kernels.group(model)


def test_removed_layer_leaves_group():
    model, reference = _fresh_pair("hook")
    sn_kernels.group(model)
    sn_kernels.remove_spectral_norm(model.c)
    sn_kernels.remove_spectral_norm(reference.c)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), reference(x))
    assert len(sn_kernels.grouped.find_group(model)) == 2


class GanD(nn.Module):
    def __init__(self, api):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 1)
        sn_kernels.apply_spectral_norm(self, api=api)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_refresh_once_per_step_shares_one_iteration(api):
    torch.manual_seed(0)
    D = GanD(api)
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    handle = sn_kernels.group(D, optimizer=opt)
    assert handle.refresh == "step"
    real, fake = torch.randn(4, 8), torch.randn(4, 8)
    for step in range(3):
        opt.zero_grad()
        state0 = _state(D)
        # D(real) and D(fake), two backward calls through the shared node, then a third forward
        torch.relu(1 - D(real)).mean().backward()
        after_first = _state(D)
        torch.relu(1 + D(fake)).mean().backward()
        assert all(torch.equal(a, b) for a, b in zip(after_first, _state(D)))  # no second iteration
        assert any(not torch.equal(a, b) for a, b in zip(state0, after_first))  # one iteration this step
        opt.step()


def test_refresh_gradients_flow_from_all_forwards_into_one_node():
    torch.manual_seed(0)
    D = GanD("hook")
    ref = copy.deepcopy(D)
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    sn_kernels.group(D, optimizer=opt)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    (D(a).sum() + 2 * D(b).sum()).backward()
    # reference: one W/sigma per layer (one iteration), used by both forwards, autograd through it
    ws = {}
    for name in ("l1", "l2", "l3"):
        m = getattr(ref, name)
        ws[name], _ = sn_kernels.spectral_normalize(m.weight_orig, m.weight_u, m.weight_v, order="vu")

    def fwd(x):
        h = torch.relu(nn.functional.linear(x, ws["l1"], ref.l1.bias))
        h = torch.relu(nn.functional.linear(h, ws["l2"], ref.l2.bias))
        return nn.functional.linear(h, ws["l3"], ref.l3.bias)

    (fwd(a).sum() + 2 * fwd(b).sum()).backward()
    for p, q in zip(D.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(D.buffers(), ref.buffers()))
    # the grouped weights of one (device, dtype) share one autograd node
    assert D.l1.weight.grad_fn is D.l2.weight.grad_fn is D.l3.weight.grad_fn


def _gp_step(D, real, fake):
    """A WGAN-GP discriminator loss (create_graph through the grouped weights' node), backward."""
    x_hat = (0.3 * real + 0.7 * fake).requires_grad_()
    (grad_x,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    gp = ((grad_x.norm(dim=1) - 1) ** 2).mean()
    (D(fake).mean() - D(real).mean() + 10 * gp).backward()
    # and a penalty on a weight gradient itself: the group node's backward differentiated
    weights = [p for name, p in D.named_parameters() if "weight" in name]
    grads = torch.autograd.grad(D(real).sum(), weights, create_graph=True)
    sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_gradient_penalty_through_the_group_node(api, backend):
    """A gradient penalty, and create_graph=True through the group's node itself (a penalty on the
    weight gradients: the node's differentiable formula, in C++ on the native backend): the same
    gradients as per module."""
    if backend == "native" and not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    torch.manual_seed(0)
    per_module = GanD(api).double()
    grouped = copy.deepcopy(per_module)
    sn_kernels.group(grouped)
    real, fake = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with sn_kernels.use_backend(backend):
        for model in (per_module, grouped):
            _gp_step(model, real, fake)
    for p, q in zip(grouped.parameters(), per_module.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(a, b) for a, b in zip(_state(grouped), _state(per_module)))


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("refresh", ["call", "step"])
def test_group_node_refuses_a_weight_changed_in_place(refresh, backend):
    """A backward through W/sigma after its weight changed in place raises, as autograd's saved
    tensors do, rather than use the new weight silently."""
    if backend == "native" and not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    D = GanD("parametrization")
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    sn_kernels.group(D, optimizer=opt if refresh == "step" else None)
    with sn_kernels.use_backend(backend):
        out = D(torch.randn(4, 8)).sum()
        with torch.no_grad():
            D.l2.parametrizations.weight.original.mul_(2)
        # per call the node's saved tensors (autograd's own check); per step its own check
        match = "modified by an inplace operation" + (".*sn_kernels.group" if refresh == "step" else "")
        with pytest.raises(RuntimeError, match=match):
            out.backward()


@pytest.mark.parametrize("change", ["assign", "double", "new_parameter"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_refresh_after_the_tensors_are_replaced(api, change):
    """The once-per-step cache is refreshed when a weight, u or v is replaced by another tensor (whose
    version counter may equal the old one's): load_state_dict(assign=True), .double(), a new Parameter."""
    torch.manual_seed(0)
    D = GanD(api).eval()
    other = GanD(api).eval()
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    sn_kernels.group(D, optimizer=opt)
    x = torch.randn(4, 8)
    with torch.no_grad():
        D(x)  # fills the cache
        if change == "assign":  # new tensors with the old ones' version counts: only identity tells them apart
            state, current = {}, D.state_dict(keep_vars=True)
            for k, v in other.state_dict().items():
                state[k] = v.clone()
                while state[k]._version < current[k]._version:
                    state[k].add_(0)
            D.load_state_dict(state, assign=True)
            expected = other(x)
        elif change == "double":
            D.double(), other.double()
            x = x.double()
            other.load_state_dict(D.state_dict())
            expected = other(x)
        else:
            layer = D.l2
            new = nn.Parameter(torch.randn_like(layer.weight_orig if api == "hook"
                                                else layer.parametrizations.weight.original))
            if api == "hook":
                layer.weight_orig = new
            else:
                layer.parametrizations.weight.original = new
            other.load_state_dict(D.state_dict())
            expected = other(x)
        torch.testing.assert_close(D(x), expected, rtol=0, atol=0)


def test_refresh_copy_is_detached_and_per_call():
    torch.manual_seed(0)
    D = GanD("parametrization")
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    sn_kernels.group(D, optimizer=opt)
    x = torch.randn(4, 8)
    D(x).sum().backward()
    clone = copy.deepcopy(D)
    group = sn_kernels.grouped.find_group(clone)
    assert group.refresh == "call" and sn_kernels.grouped.find_group(D).refresh == "step"
    ref = copy.deepcopy(clone)
    sn_kernels.grouped.find_group(ref).remove()
    for _ in range(2):
        assert torch.equal(clone(x), ref(x))
    opt.step()  # the original's optimizer does not touch the copy's group
    assert group._optimizer_handle is None


def _dropped(build, keep_optimizer=True):
    """(weak references to the model, its layers and its cached W/sigma, the optimizer) after ``build``'s
    model ran two training steps and was dropped; the optimizer is kept (else dropped too, and the
    references include the model's parameters)."""
    import weakref

    model, opt = build()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    model(torch.randn(2, 8))  # step mode: W/sigma cached until the next step
    group = sn_kernels.grouped.find_group(model)
    refs = [weakref.ref(m) for m in model.modules()]
    refs += [weakref.ref(t) for t in (group._cache or {}).values()] if group is not None else []
    if not keep_optimizer:
        refs += [weakref.ref(p) for p in model.parameters()]
        opt = None
    del model, group
    return refs, opt


def test_grouped_hook_model_is_freed_at_del_as_pytorch():
    """A grouped model is in no reference cycle (the group holds the model and its layers weakly): with
    the cyclic collector off, dropping it frees it, its weights included, as PyTorch's hook API (its own
    parametrization API is in cycles).  Also a model that is itself the spectral-normalized layer, and
    with an optimizer."""
    import gc

    def build(mk, grouped, with_opt):
        def run():
            model = mk()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            if grouped:
                sn_kernels.group(model, optimizer=opt if with_opt else None)
            return model, opt
        return run

    torch_hook = lambda: nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(8, 4)), nn.ReLU(),  # noqa: E731
                                       torch.nn.utils.spectral_norm(nn.Linear(4, 1)))
    ours = lambda: GanD("hook")  # noqa: E731
    single = lambda: sn_kernels.SNLinear(8, 3)  # noqa: E731
    gc.collect()
    gc.disable()
    try:
        alive = lambda refs: [r() for r in refs if r() is not None]  # noqa: E731
        assert not alive(_dropped(build(torch_hook, False, False), keep_optimizer=False)[0])  # PyTorch's
        for mk in (ours, single):
            for with_opt in (False, True):
                refs, _ = _dropped(build(mk, True, with_opt), keep_optimizer=False)
                assert refs and not alive(refs), (mk, with_opt, alive(refs))
    finally:
        gc.enable()


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_optimizer_does_not_keep_a_dropped_grouped_model(api):
    """group(model, optimizer=opt): the optimizer's step hook holds the group weakly, so a kept optimizer
    frees a dropped model and its cached W/sigma (the parametrization API after the cyclic collector, as
    PyTorch's own) and steps on; the dead hook goes at the optimizer's next attach."""
    import gc

    def build():
        model = GanD(api)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sn_kernels.group(model, optimizer=opt)
        return model, opt

    refs, opt = _dropped(build)
    gc.collect()
    assert len(refs) > 4 and not any(r() for r in refs)
    opt.step()
    model = GanD(api)
    handle = sn_kernels.group(model, optimizer=opt)
    assert len(opt._optimizer_step_post_hooks) == 1 and handle.refresh == "step"


def test_detached_group_leaves_no_optimizer_hook():
    """attach, attach again, detach: one hook at a time on the optimizer, none after detach."""
    model = GanD("hook")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = sn_kernels.group(model, optimizer=opt)
    handle.attach(opt)
    assert len(opt._optimizer_step_post_hooks) == 1
    handle.detach()
    assert not opt._optimizer_step_post_hooks and handle.refresh == "call"
    handle.attach(opt)
    handle.remove()
    assert not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("forwards", [1, 3])
def test_refresh_sigma_tracks_svd(forwards, one_thread):
    """sigma's error against the SVD sigma_1, per optimizer step (Adam, lr 2e-4, hinge loss): grouped
    once-per-step against PyTorch's parametrization, which iterates at every forward.  One forward per
    step: the same curve (both run one iteration per step).  Three forwards per step: PyTorch runs three
    iterations per step and ours one, so ours lags early (measured: 0.11 against 0.017 at step 40), and
    both track sigma_1 to about 1e-4 after 80 steps."""
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 1))
    for m in theirs:
        if isinstance(m, nn.Linear):
            torch.nn.utils.parametrizations.spectral_norm(m)
    ours = sn_kernels.convert(copy.deepcopy(theirs))
    opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.0, 0.9)) for m in (theirs, ours)]
    sn_kernels.group(ours, optimizer=opts[1])
    errors = {"theirs": [], "ours": []}
    for step in range(140):
        data = torch.randn(forwards, 32, 64)
        for tag, model, opt in (("theirs", theirs, opts[0]), ("ours", ours, opts[1])):
            opt.zero_grad()
            sum(torch.relu(1 + (-1) ** k * model(data[k])).mean() for k in range(forwards)).backward()
            opt.step()
            if step % 10 != 9:
                continue
            err = 0.0
            for m in model:
                if isinstance(m, nn.Linear):
                    pl = m.parametrizations.weight
                    w = pl.original.detach()
                    true = torch.linalg.matrix_norm(w, ord=2)
                    err = max(err, float((torch.dot(pl[0]._u, w @ pl[0]._v) - true).abs() / true))
            errors[tag].append(err)
    if forwards == 1:
        torch.testing.assert_close(errors["ours"], errors["theirs"], rtol=1e-3, atol=1e-5)
    else:
        assert max(errors["ours"][10:]) < 2e-3 and max(errors["theirs"][10:]) < 2e-3  # steps 110-140


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the sn_kernels ops a region dispatches (the CPU launch counter)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sn_kernels":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _native_group_ops():
    return "native" in sn_kernels.available_backends("cpu") and native.has_op("native_group_forward")


class _Layers(nn.ModuleDict):
    def forward(self):
        return [_call(layer) for layer in self.values()]


def _stack(shapes, api="hook"):
    layers = _Layers({f"l{k}": nn.Linear(n, m, bias=False) for k, (m, n) in enumerate(shapes)})
    sn_kernels.apply_spectral_norm(layers, api=api)
    return layers


def _call(layer):
    """The layer's output on a fixed input (its spectral norm runs), weighted per element."""
    w = layer.weight_orig if hasattr(layer, "weight_orig") else layer.parametrizations.weight.original
    x = torch.linspace(-1, 1, layer.in_features, dtype=w.dtype).unsqueeze(0)
    return (layer(x) * torch.linspace(0.5, 1.5, layer.out_features, dtype=w.dtype)).sum()


@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 64), (300, 400), (4, 3)], [(2 + k % 7, 3 + k % 5) for k in range(200)]],
                         ids=["one", "sizes_differ_1e4x", "200_weights"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_group_forward_backward_counts_and_identity(shapes, backend, one_thread):
    if backend == "native" and not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    torch.manual_seed(0)
    grouped = _stack(shapes)
    per_module = copy.deepcopy(grouped)
    sn_kernels.group(grouped)
    with sn_kernels.use_backend(backend):
        for _ in range(2):
            with _Ops() as counter:
                loss = sum(grouped())
                loss.backward()
            ref = sum(per_module())
            ref.backward()
            assert torch.equal(loss, ref)
    for a, b in zip(_state(grouped) + [p.grad for p in grouped.parameters()],
                    _state(per_module) + [p.grad for p in per_module.parameters()]):
        assert torch.equal(a, b)
    if backend == "native":  # one C++ call forward, one backward, whatever the number of weights
        assert counter.ops == ["native_group_forward", "native_group_backward"]


def test_group_mixed_dtypes_eval_and_iterations(one_thread):
    torch.manual_seed(0)
    model = _Layers({"a": nn.Linear(5, 7), "b": nn.Linear(7, 3).double(), "c": nn.Linear(4, 6)})
    for name, layer in model.items():
        sn_kernels.spectral_norm(layer, n_power_iterations=3 if name == "c" else 1)
    ref = copy.deepcopy(model)
    sn_kernels.group(model)
    for training in (True, False):
        model.train(training), ref.train(training)
        outs = model()
        for k, out in zip("abc", outs):
            assert torch.equal(out, _call(ref[k]))
        assert all(torch.equal(a, b) for a, b in zip(_state(model), _state(ref)))
    # three groups (float32 x 1 iteration, float64, float32 x 3 iterations): three nodes
    model.train()
    outs = model()
    assert len({model[k].weight.grad_fn for k in "abc"}) == 3



@pytest.mark.parametrize("refresh", ["call", "step"])
def test_group_outputs_are_freed(refresh, monkeypatch):
    """The shared node holds no reference to its outputs (W/sigma): they are freed with the graph.
    A reference from the node to them is a cycle no collector frees: every call leaked its W/sigma,
    and on the native backend each call's outputs came from fresh memory instead of the block cache
    (that made the grouped provider of benchmarks/run.py slower than per-module native)."""
    import gc
    import weakref

    made = []
    original = sn_kernels.grouped._normalize_group

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        made.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(sn_kernels.grouped, "_normalize_group", spy)
    D = GanD("parametrization")
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    sn_kernels.group(D, optimizer=opt if refresh == "step" else None)
    for _ in range(3):
        opt.zero_grad()
        D(torch.randn(4, 8)).sum().backward()
        opt.step()
    D(torch.randn(4, 8))  # step mode: refreshes, dropping the previous step's W/sigma
    gc.collect()
    alive = [r for r in made if r() is not None]
    assert len(made) == 12 and len(alive) == (3 if refresh == "step" else 0)


# the work table's cases: weights run whole as one item (up to 32K elements, or up to 256K in a large
# enough group), and weights split over the phases: few rows and many columns (no row chunks: row
# dots, then W^T u by columns) and row-chunked (the fused "uv" pass, or W^T u chunks for "vu"); a 4-D
# convolution weight, a weight 1.8e5x the smallest (its W/sigma streamed: 8 MiB or more, rows not
# 16-byte aligned), and two that take the per-weight kernels inside the same call (dim=1 with rows
# before it; float64: its own group).  The split weights make two bands (BAND: 2 M elements), and the
# phases of the largest have enough items to run as contiguous runs per thread (RUN_ITEMS)
_TABLE = [((4, 3), 0), ((1, 128), 0), ((16, 8192), 0), ((16, 32768), 0), ((300, 400), 0), ((96, 48, 3, 3), 0),
          ((1200, 1777), 0), ((40, 24, 4), 1), ((33, 65), 0, torch.float64)]
# SNGAN-CIFAR's discriminator: seven equal weights that each fit a core's L2 (whole items) beside small
# ones.  On 2 and 3 threads one of the seven runs split over the threads instead (whole_weights: the
# count of such weights mod the threads), and its first phase deals the whole items to the least loaded
# thread before the split ones fill up (run_items)
_EVEN = [((128, 3, 3, 3), 0)] + [((128, 128, 3, 3), 0)] * 7 + [((128, 128, 1, 1), 0), ((1, 128), 0)]


def _sigma(module):
    if hasattr(module, "parametrizations"):
        return module.parametrizations.weight[0].sigma
    return next(h for h in module._forward_pre_hooks.values() if isinstance(h, sn_kernels.hooks.SpectralNorm)).sigma


@pytest.mark.parametrize("table, threads", [(_TABLE, 1), (_TABLE, 2), (_EVEN, 2), (_EVEN, 3)],
                         ids=["table-1", "table-2", "even-2", "even-3"])
@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("api", ["hook", "parametrization"])  # orders "vu" and "uv"
def test_work_table_bit_identical_to_per_module(api, iterations, table, threads):
    """The multi-tensor kernels (a table of (weight, chunk) items over every weight of a group, taken by
    the threads in any order) give exactly the per-module native results, in training and in eval,
    for any number of threads: W/sigma, u, v, sigma and the weight gradients."""
    if not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grouped, per_module = weight_models(api, iterations, table)
        sn_kernels.group(grouped)
        grads = [torch.randn(e[0], dtype=(e[2:] or (torch.float32,))[0]) for e in table]
        groups = len({(e[2:] or (torch.float32,))[0] for e in table})
        with sn_kernels.use_backend("native"):
            for training in (True, True, False):
                grouped.train(training), per_module.train(training)
                with _Ops() as counter:
                    outs = grouped()
                    torch.autograd.backward(outs, grads)
                refs = per_module()
                torch.autograd.backward(refs, grads)
                assert all(torch.equal(a, b) for a, b in zip(outs, refs))
                # one call forward and one backward per group (float32, and float64 in _TABLE)
                assert sorted(counter.ops) == ["native_group_backward"] * groups + ["native_group_forward"] * groups
        for a, b in zip(_state(grouped) + [p.grad for p in grouped.parameters()],
                        _state(per_module) + [p.grad for p in per_module.parameters()]):
            assert torch.equal(a, b)
        assert all(torch.equal(_sigma(a), _sigma(b)) for a, b in zip(grouped, per_module))
    finally:
        torch.set_num_threads(before)


def _functional_group_ops():
    """The grouped ops are there and the forward is the functional one (an extension built before it
    mutated u, v in place: rebuild it)."""
    if not _native_group_ops():
        return False
    schema = torch.ops.sn_kernels.native_group_forward.default._schema
    return not any(a.is_out or (a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments)


def _group_op_args(order, training):
    torch.manual_seed(0)
    shapes = [((6, 4, 3, 3), 0), ((7, 3, 2), 1), ((300, 400), 0), ((2, 5), 0)]
    ws, us, vs, dims = [], [], [], []
    for shape, dim in shapes:
        w = torch.randn(shape)
        m = shape[dim]
        ws.append(w)
        us.append(nn.functional.normalize(torch.randn(m), dim=0))
        vs.append(nn.functional.normalize(torch.randn(w.numel() // m), dim=0))
        dims.append(dim)
    return ws, us, vs, dims


@pytest.mark.parametrize("order", ["uv", "vu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_group_ops_functional_opcheck(order, training):
    """native_group_forward is functional (new u, v returned, inputs untouched): the full opcheck,
    AOT dispatch (functionalization) included, passes for both grouped ops."""
    if not _functional_group_ops():
        pytest.skip("native extension without the functional grouped ops (rebuild it)")
    ws, us, vs, dims = _group_op_args(order, training)
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    outs, sigmas, nus, nvs = torch.ops.sn_kernels.native_group_forward(ws, us, vs, dims, 2, 1e-12, order, training)
    assert all(torch.equal(a, b) for a, b in zip(us + vs, u0 + v0))  # inputs untouched
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(nus + nvs, us + vs))
    torch.library.opcheck(torch.ops.sn_kernels.native_group_forward, (ws, us, vs, dims, 2, 1e-12, order, training))
    grads = [torch.randn_like(w) for w in ws]
    torch.library.opcheck(torch.ops.sn_kernels.native_group_backward, (grads, ws, nus, nvs, sigmas, dims))


def test_group_forward_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the grouped forward (its fake) with the copy-back of u, v
    into the buffers, and gives the eager numbers."""
    if not _functional_group_ops():
        pytest.skip("native extension without the functional grouped ops (rebuild it)")
    torch._dynamo.reset()

    def step(ws, us, vs, dims):
        outs, sigmas, nus, nvs = torch.ops.sn_kernels.native_group_forward(ws, us, vs, dims, 1, 1e-12, "uv", True)
        torch._foreach_copy_(us + vs, nus + nvs)
        return outs, sigmas

    ws, us, vs, dims = _group_op_args("uv", True)
    us2, vs2 = [u.clone() for u in us], [v.clone() for v in vs]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        eager_outs, eager_sigmas = step(ws, us2, vs2, dims)
        outs, sigmas = compiled(ws, us, vs, dims)
        assert all(torch.equal(a, b) for a, b in zip(outs + sigmas + us + vs, eager_outs + eager_sigmas + us2 + vs2))


@pytest.mark.parametrize("api", ["parametrization", "hook"])
@pytest.mark.parametrize("refresh", ["call", "step"])
def test_compiled_grouped_model_fullgraph(api, refresh):
    """torch.compile(fullgraph=True) of a grouped model, either API, either refresh: no graph break,
    the per-module outputs and gradients to rounding (under compile each layer computes its own
    W/sigma through the traced formulation)."""
    torch._dynamo.reset()
    model, reference = _fresh_pair(api)
    sn_kernels.group(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0) if refresh == "step" else None)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        y, r = compiled(x), reference(x)
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
        y.sum().backward()
        r.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


class _Recorder:
    """A dynamo backend that records the sn_kernels ops of the graphs it is given, then runs them
    through ``inner`` (so AOTAutograd's handling of the grouped op's autograd formula is exercised)."""

    def __init__(self, inner):
        self.inner, self.ops = inner, []

    def __call__(self, gm, example_inputs):
        self.ops += [str(n.target) for n in gm.graph.nodes
                     if n.op == "call_function" and str(n.target).startswith("sn_kernels.")]
        return torch._dynamo.backends.registry.lookup_backend(self.inner)(gm, example_inputs)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_compiled_grouped_model_takes_one_grouped_op(api, compiler):
    """Compiled, a grouped model ("call" refresh, native backend) normalizes every groupable weight in
    ONE native_group_forward (its backward one native_group_backward) instead of per-layer traced
    code; outputs, u, v, sigmas and gradients match the per-module eager model over training steps and
    in eval.  The layer called twice takes the grouped W/sigma once, then computes its own."""
    if "native" not in sn_kernels.available_backends("cpu") or not native.has_op("native_group_forward"):
        pytest.skip("the native extension (with its grouped ops) is not built")
    torch._dynamo.reset()
    model, reference = _fresh_pair(api)
    sn_kernels.group(model)
    recorder = _Recorder(compiler)
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    for step in range(3 if compiler == "aot_eager" else 2):
        x = torch.randn(2, 3, 6, 6)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        y, r = compiled(x), reference(x)
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
        y.sum().backward()
        r.sum().backward()
        for (name, a), b in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
    sigmas, expected = sn_kernels.sigmas(model), sn_kernels.sigmas(reference)
    assert all(not s.requires_grad for s in sigmas.values())
    torch.testing.assert_close(sigmas, expected, rtol=1e-5, atol=1e-6)
    assert recorder.ops.count("sn_kernels.native_group_forward") == 1
    model.eval(), reference.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    assert recorder.ops.count("sn_kernels.native_group_forward") == 2  # one graph per mode


@pytest.mark.parametrize("order", ["uv", "vu"])
def test_group_forward_autograd_formula_gradcheck(order):
    """The autograd formula of native_group_forward (what a compiled grouped model records: one
    native_group_backward for every weight) is the derivative of W / sigma(W) with u, v held
    constant: exact in eval mode, where sigma = u . W v; float64 gradcheck over three weights."""
    if "native" not in sn_kernels.available_backends("cpu") or not native.has_op("native_group_forward"):
        pytest.skip("the native extension (with its grouped ops) is not built")
    torch.manual_seed(0)
    shapes, dims = [(5, 4, 3, 3), (3, 7), (6, 2, 2)], [0, 1, 0]
    ws = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    us, vs = [], []
    for w, d in zip(ws, dims):
        m = w.shape[d]
        us.append(torch.nn.functional.normalize(torch.randn(m, dtype=torch.float64), dim=0))
        vs.append(torch.nn.functional.normalize(torch.randn(w.numel() // m, dtype=torch.float64), dim=0))

    def f(*weights):
        outs, _, _, _ = torch.ops.sn_kernels.native_group_forward(list(weights), us, vs, dims, 1, 1e-12, order, False)
        return tuple(outs)

    assert torch.autograd.gradcheck(f, tuple(ws))
    outs, sigmas, new_us, new_vs = torch.ops.sn_kernels.native_group_forward(ws, us, vs, dims, 1, 1e-12, order, True)
    assert all(o.requires_grad for o in outs)
    assert not any(t.requires_grad for t in sigmas + new_us + new_vs)  # marked non-differentiable


@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_compiled_grouped_model_after_a_removal(api):
    """A layer whose spectral norm was removed after grouping leaves the group under torch.compile as
    it does eagerly (the compiled grouping takes the live members only)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwiceD(api)
    torch.manual_seed(0)
    # not a deepcopy: removing the parametrization from a model and from its deepcopy fails the second
    # time (PyTorch's parametrize shares the injected class; tests/test_lifecycle.py)
    reference = TwiceD(api)
    sn_kernels.group(model)
    for m in (model, reference):
        if api == "hook":
            sn_kernels.remove_spectral_norm(m.c)
        else:
            torch.nn.utils.parametrize.remove_parametrizations(m.c, "weight")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_group_of_a_single_sn_layer(api):
    """The model is itself the spectral-normalized layer (group(SNLinear(...))): the group computes
    before the layer's own spectral norm, so the layer iterates once, as ungrouped."""
    torch.manual_seed(0)
    alone = sn_kernels.SNLinear(4, 5, api=api)
    grouped = copy.deepcopy(alone)
    sn_kernels.group(grouped)
    for _ in range(3):
        x = torch.randn(2, 4)
        assert torch.equal(alone(x), grouped(x))
        assert all(torch.equal(a, b) for a, b in zip(_state(alone), _state(grouped)))
    assert sn_kernels.sigmas(alone) == sn_kernels.sigmas(grouped)


def test_overlapping_groups_are_refused():
    inner = nn.Sequential(sn_kernels.SNLinear(4, 4), nn.ReLU())
    outer = nn.Sequential(inner, sn_kernels.SNLinear(4, 2, api="parametrization"))
    handle = sn_kernels.group(inner)
    with pytest.raises(ValueError, match="already belongs to a group"):
        sn_kernels.group(outer)
    handle.remove()
    sn_kernels.group(outer)
    with pytest.raises(ValueError, match="already belongs to a group"):
        sn_kernels.group(inner)
    with pytest.raises(ValueError, match="already belongs to a group"):
        sn_kernels.group(outer[1])


def test_frozen_weights_keep_no_graph_when_grouped(monkeypatch):
    """A weight with requires_grad=False gets a W/sigma without a graph, as per module: it is not put
    in the node of the trained weights (it forms its own group)."""
    made = []
    original = sn_kernels.grouped._normalize_group
    monkeypatch.setattr(sn_kernels.grouped, "_normalize_group", lambda *a, **k: made.extend(original(*a, **k)) or made[-len(a[0]):])
    torch.manual_seed(0)
    model = _stack([(3, 4), (5, 4), (2, 6)], api="parametrization")
    model["l1"].parametrizations.weight.original.requires_grad_(False)
    ref = copy.deepcopy(model)
    sn_kernels.group(model)
    assert all(torch.equal(a, b) for a, b in zip(model(), ref()))
    assert sorted(w.requires_grad for w in made) == [False, True, True]
    assert [w.shape for w in made if not w.requires_grad] == [torch.Size([5, 4])]
    assert all(torch.equal(a, b) for a, b in zip(_state(model), _state(ref)))


def _perturbed_state(model, seed):
    """``model``'s state_dict with every parameter moved by noise: another state to load."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {k: v + 0.5 * torch.randn(v.shape, generator=g) if k in params else v.clone()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("refresh", ["call", "step"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_jit_trace_computes_w_sigma_from_the_module_state(api, refresh, backend, grad):
    """torch.jit.trace of a grouped model records W/sigma computed from the traced module's weights and
    u, v: never the "step" refresh's cached W/sigma (after a training step and a validation pass they
    would be baked in as constants), nor grouped.py's Python node (a replay would fail).  Given another
    state_dict, the traced module gives the eager per-module outputs, u, v and gradients."""
    if backend == "native" and not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    torch.manual_seed(0)
    model = TwiceD(api)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sn_kernels.group(model, optimizer=opt if refresh == "step" else None)
    x = torch.randn(2, 3, 6, 6)
    with sn_kernels.use_backend(backend):
        model(x).sum().backward()
        opt.step()
        for training in (True, False):
            model.train(training)
            with torch.set_grad_enabled(grad):
                model(x)  # a validation pass: the "step" refresh caches its W/sigma
                traced = torch.jit.trace(model, x, check_trace=False)
            reference = TwiceD(api).train(training)
            state = _perturbed_state(model, seed=int(training))
            traced.load_state_dict(state)
            reference.load_state_dict(state)
            for _ in range(2):
                with torch.set_grad_enabled(grad):
                    y, r = traced(x), reference(x)
                torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
                for (name, a), b in zip(traced.state_dict().items(), reference.state_dict().values()):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            if grad:
                traced.zero_grad(set_to_none=True)
                y.sum().backward()
                r.sum().backward()
                for p, q in zip(traced.parameters(), reference.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("twice", [False, True], ids=["sequential", "layer_called_twice"])
def test_exported_grouped_model_round_trips_save_load(twice, api, training):
    """torch.export of a grouped model (native backend: the grouped op, then in train mode u, v copied
    into the buffers) saves to and loads from a file: no empty grad-mode region in its graph (the copies
    alone made one when no later op reads u, v).  The loaded program gives the eager per-module
    outputs, u, v updates and gradients, call after call."""
    if not _native_group_ops():
        pytest.skip("native extension without the grouped ops")
    torch._dynamo.reset()
    if twice:
        model, reference = _fresh_pair(api)
        x = torch.randn(2, 3, 6, 6)
    else:
        torch.manual_seed(0)
        model = sn_kernels.apply_spectral_norm(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), api=api)
        reference = copy.deepcopy(model)
        x = torch.randn(2, 6)
    model.train(training), reference.train(training)
    sn_kernels.group(model)
    with sn_kernels.use_backend("native"):
        exported = torch.export.export(model, (x,))
    assert "sn_kernels.native_group_forward.default" in [str(n.target) for n in exported.graph.nodes]
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for step in range(2):
        y, r = loaded(x), reference(x)
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
        y.sum().backward()
        r.sum().backward()
        ours = {**dict(loaded.named_buffers()), **{n: p.grad for n, p in loaded.named_parameters()}}
        expected = {**dict(reference.named_buffers()), **{n: p.grad for n, p in reference.named_parameters()}}
        assert ours.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step} {name}: {m}")


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_checkpointed_grouped_model_gradients_as_per_module(api, backend):
    """checkpoint(grouped_model, x, use_reentrant=False) recomputes the forward (u, v iterate again, as
    PyTorch's do) in the backward: the group's node must then use the recomputed u, v and sigma, as every
    other node does, so the gradients are the per-module ones (they mixed the two forwards before)."""
    from torch.utils.checkpoint import checkpoint

    if backend not in sn_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for grouped in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(wrap(nn.Linear(4, 5)), nn.Tanh(), wrap(nn.Linear(5, 3)), nn.Tanh(),
                            wrap(nn.Linear(3, 1))).double()
        if grouped:
            sn_kernels.group(net)
        with sn_kernels.use_backend(backend):
            checkpoint(net, x, use_reentrant=False).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_grouped_batched_gradients(backend):
    """autograd.grad(is_grads_batched=True) (jacobian(vectorize=True), gradcheck's batched check) through
    a grouped model: the per-module Jacobian (the grouped op, taking lists, has no batching rule)."""
    if backend not in sn_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    x = torch.randn(3, 4, dtype=torch.float64)
    jacs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(sn_kernels.spectral_norm(nn.Linear(4, 5)), nn.Tanh(),
                            sn_kernels.spectral_norm(nn.Linear(5, 2))).double()
        if grouped:
            sn_kernels.group(net)
        with sn_kernels.use_backend(backend):
            out = net(x)
            eye = torch.eye(out.numel(), dtype=torch.float64).reshape(-1, *out.shape)
            jacs.append(torch.autograd.grad(out, [net[0].weight_orig, net[2].weight_orig], eye,
                                            is_grads_batched=True))
    for a, b in zip(*jacs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


# -- refusals and interrupted calls: nothing of the model moves, and what is left behind is never used ----------
def _mlp(api, coeff=False):
    torch.manual_seed(0)
    first = nn.Linear(4, 5)
    first = (sn_kernels.spectral_norm(first, coeff=2.0) if api == "hook" else
             sn_kernels.parametrizations.spectral_norm(first, coeff=2.0)) if coeff else sn_kernels.SNLinear(4, 5, api=api)
    return nn.Sequential(first, nn.ReLU(), sn_kernels.SNLinear(5, 6, api=api), nn.ReLU(),
                         sn_kernels.SNLinear(6, 3, api=api, n_power_iterations=2))


def _buffers(model):
    return {k: b.clone() for k, b in model.named_buffers()}


def _set_u(layer, api, u):
    owner = layer if api == "hook" else layer.parametrizations.weight[0]
    owner._buffers["weight_u" if api == "hook" else "_u"] = u


@pytest.mark.parametrize("first_set", [False, True], ids=["none_set", "first_set"])
@pytest.mark.parametrize("refresh", ["call", "step"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_grouped_call_refused_by_the_meta_guard_reads_no_uv(api, refresh, first_set):
    with torch.device("meta"):
        model = nn.Sequential(sn_kernels.SNLinear(3, 3, api=api), nn.ReLU(), sn_kernels.SNLinear(3, 2, api=api))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for b in model.buffers():
            b.fill_(0.5)  # what uninitialised memory could hold
    if first_set:
        sn_kernels.reset_uv(model[0])  # the first layer runs, the second refuses (as per module)
    sn_kernels.group(model, torch.optim.SGD(model.parameters(), lr=0.1) if refresh == "step" else None)
    before = _buffers(model)
    with pytest.raises(RuntimeError, match="meta device"):
        model(torch.randn(1, 3))
    assert all(torch.equal(before[k], b) for k, b in model[2].named_buffers(prefix="2"))
    for layer in (model[2],) if first_set else (model[0], model[2]):  # no sigma logged from u, v
        state = (next(h for h in layer._forward_pre_hooks.values() if isinstance(h, sn_kernels.SpectralNorm))
                 if api == "hook" else layer.parametrizations.weight[0])
        assert state.sigma is None or state.sigma.is_meta
    sn_kernels.reset_uv(model)  # the guard goes: the group computes again
    reference = copy.deepcopy(model)
    sn_kernels.grouped.find_group(reference).remove()
    x = torch.randn(2, 3)
    assert torch.equal(model(x), reference(x))


class _Interrupt(nn.Module):
    armed = False

    def forward(self, x):
        if self.armed:
            raise KeyboardInterrupt  # a BaseException: nn.Module skips the always_call forward hooks
        return x


def _interrupted_model(api):
    torch.manual_seed(0)
    return nn.Sequential(sn_kernels.SNLinear(4, 4, api=api), _Interrupt(), sn_kernels.SNLinear(4, 3, api=api))


def _interrupted(api):
    """A per-call grouped model whose last call was interrupted between its layers, then its last weight
    changed; and a never-grouped model of that state."""
    model = _interrupted_model(api)
    sn_kernels.group(model)
    x = torch.randn(2, 4)
    model(x)
    model[1].armed = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model[1].armed = False
    with torch.no_grad():
        w = model[2].weight_orig if api == "hook" else model[2].parametrizations.weight.original
        w.add_(torch.randn(w.shape))
    reference = _interrupted_model(api)
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_interrupted_grouped_call_leaves_no_stale_weight_to_a_layer_alone(api, training):
    model, reference = _interrupted(api)
    model.train(training), reference.train(training)
    x = torch.randn(2, 4)
    assert torch.equal(model[2](x), reference[2](x))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_interrupted_grouped_call_leaves_no_stale_weight_to_torch_func(api):
    from torch.func import functional_call, grad
    model, reference = _interrupted(api)
    model.eval(), reference.eval()
    x = torch.randn(2, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda p, m: functional_call(m, p, (x,)).square().sum()  # noqa: E731
    got, expected = grad(loss)(params, model), grad(loss)(params, reference)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_group_refuses_a_non_optimizer_before_changing_anything():
    model = _mlp("hook")
    hooks_before = len(model._forward_pre_hooks), len(model._forward_hooks)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sn_kernels.group(model, list(model.parameters()))  # the parameters instead of the optimizer
    assert sn_kernels.grouped.find_group(model) is None
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert model[0]._forward_pre_hooks and all(
        h.before is None for h in model[0]._forward_pre_hooks.values() if isinstance(h, sn_kernels.SpectralNorm))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = sn_kernels.group(model, opt)  # a retry with the optimizer works
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        handle.attach(list(model.parameters()))
    assert handle.refresh == "step" and len(opt._optimizer_step_post_hooks) == 1
    handle.attach(opt)  # re-attaching to the same optimizer keeps one hook
    assert handle.refresh == "step" and len(opt._optimizer_step_post_hooks) == 1


@pytest.mark.parametrize("bad", ["shape", "dtype", "noncontiguous"])
@pytest.mark.parametrize("coeff", [False, True], ids=["plain", "coeff"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_refused_grouped_call_moves_no_uv_and_names_the_layer(backend, api, coeff, bad):
    x = torch.randn(2, 4)
    with sn_kernels.use_backend(backend):
        model = _mlp(api, coeff)
        per_module = copy.deepcopy(model)  # the error a grouped call must give too
        sn_kernels.group(model)
        model(x)
        reference = copy.deepcopy(model)  # the state before the refused call
        good = model[2].weight_u if api == "hook" else model[2].parametrizations.weight[0]._u
        u = {"shape": torch.randn(7), "dtype": good.double(), "noncontiguous": torch.randn(12)[::2]}[bad]
        for m in (model, per_module):
            _set_u(m[2], api, u)
        with pytest.raises(Exception) as expected:
            per_module(x)
        before = _buffers(model)
        with pytest.raises(type(expected.value)) as got:
            model(x)
        assert all(torch.equal(before[k], b) for k, b in model.named_buffers())  # atomic: nothing iterated
        assert "2.weight" in str(got.value) and str(expected.value) in str(got.value)
        _set_u(model[2], api, good)
        assert torch.equal(model(x), reference(x))  # the next call as if the refused one never happened


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_interrupted_grouped_call_leaves_no_stale_weight_to_freeze(api):
    model, reference = _interrupted(api)
    reference.eval()
    with torch.no_grad():
        expected = reference[2](torch.eye(4)).T - reference[2].bias[:, None]  # the eval W/sigma
    sn_kernels.freeze(model)
    torch.testing.assert_close(model[2].weight, expected)


def test_group_serves_weights_read_without_calling_the_layer():
    """A model that reads its parametrized weights without calling the layers (weight tying, F.linear on
    layer.weight, attention reading out_proj.weight) gets the group's W/sigma per call: per-module numbers,
    one power iteration per model call."""

    class Weights(nn.ModuleList):
        def forward(self):
            return [m.weight for m in self]

    runs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        model = Weights([sn_kernels.parametrizations.spectral_norm(nn.Linear(5, 4)) for _ in range(3)])
        if grouped:
            sn_kernels.group(model)
        outs = []
        for training in (True, True, False):
            model.train(training)
            ws = model()
            torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
            outs += [w.detach().clone() for w in ws]
        runs.append(outs + [m.parametrizations.weight.original.grad for m in model] + list(model.buffers()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_group_leaves_a_subclass_with_its_own_forward_alone():
    """A parametrization subclass that overrides forward (a user's variant) is not grouped: the group's
    W/sigma and its iteration of u, v would go unused, and u, v would drift from the layer's own."""

    class Halved(sn_kernels.parametrizations.SpectralNormParametrization):
        def forward(self, weight):  # PyTorch's _SpectralNorm.forward, halved, through its helpers
            mat = self._reshape_weight_to_matrix(weight)
            if self.training:
                self._power_method(mat, self.n_power_iterations)
            u, v = self._u.clone(), self._v.clone()
            return weight / torch.vdot(u, torch.mv(mat, v)) / 2

    runs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 4)), nn.Linear(4, 4))
        plist = model[0].parametrizations.weight
        own = Halved.__new__(Halved)
        own.__dict__.update(plist[0].__dict__)
        plist[0] = own
        sn_kernels.parametrizations.spectral_norm(model[1])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if grouped:
            sn_kernels.group(model, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
        runs.append([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# -- parametrizations shared, cached or stacked under the hook API: per-module (PyTorch's) numbers -------------
def _random_uv(u, v):
    """Slow-converging u, v: every power iteration too many or too few shows in the numbers."""
    with torch.no_grad():
        u.copy_(nn.functional.normalize(torch.randn(u.shape), dim=0))
        v.copy_(nn.functional.normalize(torch.randn(v.shape), dim=0))


class _Backwards(nn.Sequential):
    """Calls its layers last to first."""

    def forward(self, x):
        for layer in reversed(self):
            x = layer(x)
        return x


def _shared_sn_model(lib, coeff=None, share="transfer", own=True):
    """Two layers sharing ONE spectral-norm parametrization (u, v) and its ``original``
    (``parametrize.transfer_parametrizations_and_params``), or, with ``share="register"``, not ``original``
    (the second keeps its own weight, and is called first); and a layer of its own (a plain one unless
    ``own``)."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
    for layer in (a, c) if own else (a,):
        lib.spectral_norm(layer, **({} if coeff is None else {"coeff": coeff}))
        sn = layer.parametrizations.weight[0]
        _random_uv(sn._u, sn._v)
    if share == "transfer":
        torch.nn.utils.parametrize.transfer_parametrizations_and_params(a, b)
        return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), c)
    torch.nn.utils.parametrize.register_parametrization(b, "weight", a.parametrizations.weight[0])
    return _Backwards(c, nn.Tanh(), a, nn.Tanh(), b)


def _train(model, opt, backend, refresh):
    """Outputs, then the state after two optimizer steps of two model calls each (one with the "step"
    refresh, which shares a W/sigma across a step's calls by design: the module docstring)."""
    x = torch.randn(3, model[0].in_features)
    calls = 2 if refresh == "call" else 1
    outs = []
    with sn_kernels.use_backend(backend):
        for _ in range(2):
            opt.zero_grad()
            ys = [model(x) for _ in range(calls)]
            sum(y.sum() for y in ys).backward()
            opt.step()
            outs += [y.detach() for y in ys]
    return outs + _state(model)


@pytest.mark.parametrize("share", ["transfer", "register"])
@pytest.mark.parametrize("refresh", ["call", "step"])
@pytest.mark.parametrize("coeff", [None, 2.0], ids=["plain", "coeff"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_group_of_a_parametrization_shared_by_two_layers(backend, coeff, refresh, share):
    """Each access of a shared parametrization iterates its u, v once, as in PyTorch: its layers compute
    their own W/sigma, the other layer is grouped."""
    runs = []
    for grouped in (False, True):
        model = _shared_sn_model(sn_kernels.parametrizations, coeff, share)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        group = sn_kernels.group(model, opt if refresh == "step" else None) if grouped else None
        runs.append(_train(model, opt, backend, refresh))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert [m.path for m in group.members] == ["4.weight" if share == "transfer" else "0.weight"]  # not the shared
    if coeff is None:  # PyTorch's own
        model = _shared_sn_model(torch.nn.utils.parametrizations, share=share)
        reference = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), "auto", refresh)
        for a, b in zip(reference, runs[1]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _cached_model(lib, api):
    """A parametrized layer of ``lib``, and one of ``api`` (the hook API ignores ``parametrize.cached``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    lib.spectral_norm(model[0])
    (sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm)(model[2])
    sn = model[0].parametrizations.weight[0]
    _random_uv(sn._u, sn._v)
    if api == "hook":
        _random_uv(model[2].weight_u, model[2].weight_v)
    else:
        sn = model[2].parametrizations.weight[0]
        _random_uv(sn._u, sn._v)
    return model


def _cached_run(model, opt, sigmas=True):
    """Outputs (and sigmas) of two ``parametrize.cached()`` contexts of three model calls and one optimizer
    step each, then the model's state."""
    x = torch.randn(2, 6)
    outs = []
    for _ in range(2):
        with torch.nn.utils.parametrize.cached():
            ys = [model(x) for _ in range(3)]
            sum(y.sum() for y in ys).backward()
        outs += [y.detach() for y in ys] + (list(sn_kernels.sigmas(model).values()) if sigmas else [])
        opt.step()
    return outs + _state(model)


# the "step" refresh of a hook-API layer shares W/sigma across a step's calls by design (module docstring)
@pytest.mark.parametrize("copied", [False, True], ids=["model", "deepcopy"])
@pytest.mark.parametrize("api, refresh", [("hook", "call"), ("parametrization", "call"),
                                          ("parametrization", "step")])
def test_grouped_model_under_parametrize_cached(api, refresh, copied):
    """Under ``parametrize.cached()`` a parametrized weight is computed once per context (one power iteration,
    the cached W/sigma reused by every model call), as per module and in PyTorch; ``sigmas()`` reports the
    sigma used.  Nothing the group computed stays pending after the context.  Also for a deep copy, whose
    cache key is its original's (PyTorch keys by the module the parametrization was registered on)."""
    runs = []
    originals = []  # alive: a freed original's id could be reused
    for grouped in (False, True):
        model = _cached_model(sn_kernels.parametrizations, api)
        if copied:
            originals.append(model)
            model = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        group = sn_kernels.group(model, opt if refresh == "step" else None) if grouped else None
        runs.append(_cached_run(model, opt))
        if grouped:
            assert all(m.state.pending is None for m in group.members)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    model = _cached_model(torch.nn.utils.parametrizations, api)  # PyTorch's own
    if copied:
        originals.append(model)
        model = copy.deepcopy(model)
    reference = _cached_run(model, torch.optim.SGD(model.parameters(), lr=0.1), sigmas=False)
    ours = [t for t in runs[1] if t.ndim]  # less the sigmas
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x

    def right_inverse(self, x):
        return x / 2


def _hook_on_parametrized_orig(lib, late=False):
    """Two hook-API spectral norms; the first one's ``weight_orig`` carries a parametrization (after
    grouping when ``late``: the caller registers it)."""
    torch.manual_seed(0)
    model = nn.Sequential(lib.spectral_norm(nn.Linear(3, 3)), nn.Tanh(), lib.spectral_norm(nn.Linear(3, 2)))
    if not late:
        torch.nn.utils.parametrize.register_parametrization(model[0], "weight_orig", _Scale())
    return model


@pytest.mark.parametrize("late", [False, True], ids=["before_group", "after_group"])
@pytest.mark.parametrize("refresh", ["call", "step"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_group_of_a_hook_whose_weight_orig_is_parametrized(backend, refresh, late):
    """The hook reads ``weight_orig`` through its parametrization: the layer computes its own W/sigma (the
    others are grouped), as per module and PyTorch's hook."""
    runs = []
    for lib, grouped in ((torch.nn.utils, False), (sn_kernels, False), (sn_kernels, True)):
        model = _hook_on_parametrized_orig(lib, late and grouped)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if grouped:
            sn_kernels.group(model, opt if refresh == "step" else None)
            if late:
                torch.nn.utils.parametrize.register_parametrization(model[0], "weight_orig", _Scale())
                opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the new original
                if refresh == "step":
                    sn_kernels.grouped.find_group(model).attach(opt)
        runs.append(_train(model, opt, backend if lib is sn_kernels else "auto", refresh))
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("refresh", ["call", "step"])
def test_group_of_shared_parametrizations_only(refresh):
    """A model whose only spectral norm is shared by two layers groups nothing, and keeps PyTorch's numbers."""
    runs = []
    for grouped in (False, True):
        model = _shared_sn_model(sn_kernels.parametrizations, own=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if grouped:
            assert len(sn_kernels.group(model, opt if refresh == "step" else None)) == 0
        runs.append(_train(model, opt, "torch", refresh))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# -- the step cache and a model that changed: a layer called alone, a parameter swap ------------------------------
def _two_sn_layers(api, seed=0):
    torch.manual_seed(seed)
    sn = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    return nn.Sequential(sn(nn.Linear(6, 5)), nn.Tanh(), sn(nn.Linear(5, 3)))


def _weight_orig(layer, api):
    return layer.weight_orig if api == "hook" else layer.parametrizations.weight.original


@pytest.mark.parametrize("change", ["load_state_dict", "copy_", "double", "grad_mode"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_step_cache_checked_for_a_layer_called_alone(api, change):
    """A grouped layer called directly (not through the model: a block of it, feature extraction) after the
    model changed: its output and gradients as per module, not the W/sigma cached before the change (the
    model's pre-hook, which checks the cache at each model call, does not run then)."""
    model = _two_sn_layers(api)
    reference = copy.deepcopy(model)
    sn_kernels.group(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 6)
    checkpoint = _two_sn_layers(api, seed=7).state_dict()
    new_weight = torch.randn(5, 6)
    for m in (model, reference):
        with torch.set_grad_enabled(change != "grad_mode"):
            m(x)  # fills the grouped model's cache (a W/sigma without a graph under no_grad)
        if change == "load_state_dict":
            m.load_state_dict(checkpoint)
        elif change == "copy_":
            with torch.no_grad():
                _weight_orig(m[0], api).copy_(new_weight)
        elif change == "double":
            m.double()
    x = x.double() if change == "double" else x
    outs = [m[0](x) for m in (model, reference)]
    assert torch.equal(outs[0], outs[1])
    for y in outs:
        y.square().sum().backward()
    for p, q in zip(model[0].parameters(), reference[0].parameters()):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.fixture
def swap_on_conversion():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("move, when", [("double", "after_step"), ("load_state_dict", "after_step"),
                                        ("load_state_dict", "before_step")])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_step_cache_lets_the_parameters_be_swapped(api, move, when, swap_on_conversion):
    """With PyTorch's swap-on-conversion flag, ``.double()`` and ``load_state_dict`` swap the parameters'
    tensors, which PyTorch refuses while anything else references them: the step cache's node, stale since
    the optimizer step (or made so by the load), must not keep the weights; the moved model as per module."""
    x = torch.randn(4, 6)
    outs = []
    for grouped in (True, False):
        model = _two_sn_layers(api)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if grouped:
            sn_kernels.group(model, optimizer=opt)
        model(x).sum().backward()
        if when == "after_step":
            opt.step()
        if move == "double":
            model.double()
        else:
            model.load_state_dict(state)
        outs.append(model(x.to(_weight_orig(model[0], api).dtype)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.filterwarnings("ignore:Complex modules")  # PyTorch's note on .to(complex64)
def test_grouped_call_refuses_a_hook_layer_made_complex_before_moving_uv():
    """A hook-API layer made complex after wrapping (``.to``) is refused, as per module: in a group, before
    the complex parametrized layer computed ahead of it moves its u, v, and the error names the layer."""
    torch.manual_seed(0)
    model = nn.Sequential(sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 4, dtype=torch.complex64)),
                          sn_kernels.spectral_norm(nn.Linear(4, 3)))
    model[1].to(torch.complex64)
    sn_kernels.group(model)
    before = _buffers(model)
    with pytest.raises(TypeError, match="refuses complex weights") as got:
        model(torch.randn(2, 4, dtype=torch.complex64))
    assert "1.weight" in str(got.value)
    assert all(torch.equal(before[k], b) for k, b in model.named_buffers())


@pytest.mark.parametrize("model", [None, [nn.Linear(2, 2)]], ids=["none", "list"])
def test_group_refuses_a_non_module(model):
    with pytest.raises(TypeError, match="sn_kernels.group takes an nn.Module"):
        sn_kernels.group(model)


def _sn_stack(api, n=3, seed=0):
    torch.manual_seed(seed)
    sn = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    return nn.Sequential(*(sn(nn.Linear(4, 4)) for _ in range(n)))


def _u(layer, api):
    return layer.weight_u if api == "hook" else layer.parametrizations.weight[0]._u


def _train_step(model, opt, x):
    opt.zero_grad()
    y = model(x)
    y.square().sum().backward()
    opt.step()
    return y.detach()


@pytest.mark.parametrize("refresh", ["call", "step"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_replaced_or_deleted_layer_leaves_group(api, refresh):
    """A grouped layer replaced (``model[1] = new``) or deleted, then freed: the model trains on as per
    module (the freed layer's member used to crash the next call).  A replaced layer still referenced
    elsewhere leaves the group when another member's layer is freed: its u, v no longer move with the model."""
    import gc
    models = [_sn_stack(api, n=4) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    handle = sn_kernels.group(models[1], optimizer=opts[1] if refresh == "step" else None)
    x = torch.randn(2, 4)
    for m, opt in zip(models, opts):
        _train_step(m, opt, x)
    kept = []
    for m in models:
        kept.append(m[3])  # replaced, still referenced
        torch.manual_seed(5)
        m[1] = _sn_stack(api, n=1)[0]
        m[3] = _sn_stack(api, n=1)[0]
        del m[2]
    gc.collect()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    if refresh == "step":
        handle.attach(opts[1])
    u_kept = _u(kept[1], api).clone()
    for _ in range(2):
        outs = [_train_step(m, opt, x) for m, opt in zip(models, opts)]
        assert torch.equal(outs[0], outs[1])
        assert all(torch.equal(a, b) for a, b in zip(_state(models[0]), _state(models[1])))
    assert torch.equal(_u(kept[1], api), u_kept)
    assert len(handle) == 1


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_second_fused_optimizer_refreshes_the_step_cache(backend):
    """A second optimizer over other grouped weights, ``fused=True`` (its step moves no version counter):
    the next forward uses the weights it stepped, as per module."""
    models = [_two_sn_layers("hook") for _ in range(2)]
    opts = [(torch.optim.SGD(m[0].parameters(), lr=0.1), torch.optim.Adam(m[2].parameters(), lr=0.1, fused=True))
            for m in models]
    x = torch.randn(3, 6)
    with sn_kernels.use_backend(backend):
        sn_kernels.group(models[1], optimizer=opts[1][0])
        for _ in range(3):
            outs = []
            for m, (_, second) in zip(models, opts):
                second.zero_grad()
                y = m(x)
                y.square().sum().backward()
                second.step()  # only the second optimizer steps
                outs.append(y.detach())
            assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("how", ["remove", "stack", "readd"])
def test_layer_alone_after_its_parametrization_changed(how):
    """``remove_parametrizations`` on a grouped layer, a second spectral norm stacked on it, or removed and
    re-added, after a model forward in the step: that layer called alone works and moves no other layer's u, v
    (the group's leftover hook raised KeyError, or iterated the whole group), as per module."""
    from torch.nn.utils import parametrize
    models = [_sn_stack("parametrization") for _ in range(2)]
    opt = torch.optim.SGD(models[1].parameters(), lr=0.1)
    sn_kernels.group(models[1], optimizer=opt)
    x, x1 = torch.randn(2, 4), torch.randn(2, 4)
    outs = []
    for m in models:
        m(x).sum().backward()
        if how != "stack":
            parametrize.remove_parametrizations(m[1], "weight")
        if how != "remove":
            torch.manual_seed(3)
            sn_kernels.parametrizations.spectral_norm(m[1])
        outs.append(m[1](x1))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(_state(models[0]), _state(models[1])))
    sn_kernels.grouped.find_group(models[1]).remove()
    sn_kernels.group(models[1])  # no group hook left on the changed layer


# -- one grouped model called from two threads: neither takes the other's W/sigma ------------------------------


def _run_in_thread_until(layer, action):
    """Start a thread running ``action``; it stops before ``layer``'s forward (a prepended pre-hook that acts in
    that thread only) until the returned ``release`` is called.  Returns (wait_until_stopped, release)."""
    import threading
    stopped, go = threading.Event(), threading.Event()
    box = {}

    def hook(module, inputs):
        if threading.get_ident() == box.get("ident"):
            stopped.set()
            assert go.wait(10)

    handle = layer.register_forward_pre_hook(hook, prepend=True)

    def body():
        box["ident"] = threading.get_ident()
        try:
            action()
        finally:
            stopped.set()

    thread = threading.Thread(target=body)
    thread.start()

    def release():
        go.set()
        thread.join(10)
        handle.remove()
    return (lambda: stopped.wait(10)), release


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_grouped_call_from_another_thread_hands_no_weight_across(api):
    """Per call: while another thread's no_grad call of the model is between its pre-hook (which computed
    every layer's W/sigma, without grad) and its layers, a layer called here with grad computes its own and
    its weight gets its gradient (it took the other thread's W/sigma: no gradient at all)."""
    torch.manual_seed(0)
    model = nn.Sequential(sn_kernels.SNLinear(4, 4, api=api), sn_kernels.SNLinear(4, 3, api=api))
    sn_kernels.group(model)
    x = torch.randn(2, 4)

    def other():
        with torch.no_grad():
            model(x)
    wait, release = _run_in_thread_until(model[0], other)
    try:
        assert wait()
        reference = copy.deepcopy(model)  # u, v as the other call's pre-hook left them
        sn_kernels.grouped.find_group(reference).remove()
        out = model[0](x)
        expected = reference[0](x)
    finally:
        release()
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weight = model[0].weight_orig if api == "hook" else model[0].parametrizations.weight.original
    assert weight.grad is not None


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_grouped_step_cache_refreshed_without_grad_by_another_thread_is_not_used(api):
    """"step" mode: another thread's no_grad call, run between this call's pre-hook and its second layer,
    refreshes the shared cache without grad; the second layer then recomputes it with grad (it took the
    no-grad W/sigma: its weight got no gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(sn_kernels.SNLinear(4, 4, api=api), sn_kernels.SNLinear(4, 3, api=api))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sn_kernels.group(model, optimizer=opt)
    x = torch.randn(2, 4)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    import threading
    state = {}
    main = threading.get_ident()

    def other():
        with torch.no_grad():
            model(x)

    def start_other(module, inputs):
        if threading.get_ident() == main and "release" not in state:
            wait, state["release"] = _run_in_thread_until(model[1], other)
            assert wait()
    handle = model[0].register_forward_pre_hook(start_other, prepend=True)
    try:
        model(x).sum().backward()
    finally:
        handle.remove()
        state["release"]()
    for layer in model:
        weight = layer.weight_orig if api == "hook" else layer.parametrizations.weight.original
        assert weight.grad is not None
