"""A model's life around training: torch.export, freeze() to plain weights, meta-device
construction with reset_uv(), and weight averaging (EMA) with AveragedModel."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import sn_kernels
from sn_kernels.meta import MetaGuard
from helpers import assert_steps_match

APIS = ["hook", "parametrization"]


def disc(api="hook", torch_sn=False):
    """A small discriminator; ``torch_sn`` wraps it with PyTorch's own spectral norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 1))
    if torch_sn:
        wrap = torch.nn.utils.spectral_norm if api == "hook" else torch.nn.utils.parametrizations.spectral_norm
        for i in (0, 2, 4):
            wrap(model[i])
    else:
        sn_kernels.apply_spectral_norm(model, api=api)
    return model


def train_a_little(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()


def sn_ops(graph_module):
    return [n for n in graph_module.graph.nodes if "sn_kernels" in str(n.target)]


# ----------------------------------------------------------------------------- torch.export


def conv_mode_disc(api):
    """``disc``'s convolutions with mode="conv" (the operator norm), its Linear plain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 1))
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    wrap(model[0], mode="conv", input_size=(6, 6))
    wrap(model[2], mode="conv", input_size=(4, 4))
    wrap(model[4])
    return model


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("mode", ["matrix", "conv"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("training", [False, True])
def test_export_matches_eager(api, training, mode, backend):
    """The exported program gives eager's outputs and u, v, and in training mode eager's gradients too:
    export keeps a program's forward ops, not an autograd.Function's backward, so the routes that have
    one (the torch backend's W / sigma, mode="conv") take a plain-autograd form there."""
    if backend not in sn_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available")
    with sn_kernels.use_backend(backend):
        model = disc(api) if mode == "matrix" else conv_mode_disc(api)
        train_a_little(model)
        model.train(training)
        model.zero_grad(set_to_none=True)
        eager = copy.deepcopy(model)
        x = torch.randn(2, 3, 6, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "tensor attributes assigned during export" (W/sigma, sigma)
            exported = torch.export.export(model, (x,))
        program = exported.module()
        # training mode: u, v updates are part of the program
        assert_steps_match(program, eager, x, training, buffer_tol=(1e-5, 1e-6))
    # nothing of the export's fake tensors stays on the module: it copies and reports as before
    copy.deepcopy(model)
    assert all(type(s) is torch.Tensor for s in sn_kernels.sigmas(model).values())


@pytest.mark.parametrize("api", APIS)
def test_export_of_a_certified_layer(api):
    """Eval mode exports; training mode is refused by name (its program could not differentiate the bound)."""
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    layer = wrap(nn.Linear(4, 3), bound="upper")
    x = torch.randn(2, 4)
    layer(x)
    with pytest.raises(NotImplementedError, match="torch.export of a bound=\"upper\" layer in training mode"):
        torch.export.export(layer, (x,))
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        program = torch.export.export(layer, (x,)).module()
    torch.testing.assert_close(program(x), layer(x))


# ----------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("torch_sn", [False, True], ids=["ours", "pytorch"])
def test_freeze_matches_eval_mode(api, torch_sn):
    model = disc(api, torch_sn)
    train_a_little(model)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    model.train()  # freeze folds the eval-mode value whatever the mode: no power iteration
    assert sn_kernels.freeze(model) is model
    assert not sn_kernels.sigmas(model), "no spectral norm may remain"
    assert set(model.state_dict()) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert all(isinstance(model[i].weight, nn.Parameter) for i in (0, 2, 4))
    model.load_state_dict(model.state_dict())  # no spectral-norm load hook left to ask for weight_orig
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    exported = torch.export.export(model.eval(), (x,))
    assert not sn_ops(exported.graph_module)
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-6, atol=1e-6)


def test_freeze_variants_and_stacking():
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(sn_kernels.SNConv2d(3, 4, 3, gain=True), nn.ReLU(),
                          sn_kernels.SNConv2d(4, 2, 3, api="parametrization", coeff=2.0))
    conv_mode = sn_kernels.spectral_norm(nn.Conv2d(2, 2, 3, padding=1), mode="conv")
    stacked = sn_kernels.parametrizations.spectral_norm(
        sn_kernels.parametrizations.spectral_norm(nn.Conv2d(2, 2, 1)))
    model.extend([conv_mode, stacked])
    model(x)
    model.eval()
    expected = model(x)
    sn_kernels.freeze(model)
    assert not sn_kernels.sigmas(model) and not any(m._forward_pre_hooks for m in model)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- meta device


def meta_model():
    with torch.device("meta"):
        torch.manual_seed(0)
        return nn.Sequential(sn_kernels.SNConv2d(3, 4, 3), nn.Flatten(),
                             sn_kernels.SNLinear(4 * 4 * 4, 8, api="parametrization"), nn.ReLU(),
                             nn.Linear(8, 1))


def guards(model):
    return [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, MetaGuard)]


def test_meta_construction_then_reset_uv():
    model = meta_model()
    x = torch.randn(2, 3, 6, 6)
    assert model(x.to("meta")).shape == (2, 1)  # shapes work on meta
    model.to_empty(device="cpu")
    with torch.no_grad():
        # initialise the parameters themselves (weight_orig, parametrizations.weight.original):
        # reset_parameters() would write to the computed W / sigma, with PyTorch's spectral norm too
        for p in model.parameters():
            p.uniform_(-0.3, 0.3)
        for b in model.buffers():
            b.fill_(float("nan"))  # the worst uninitialised memory
    with pytest.raises(RuntimeError, match="meta device.*reset_uv"):
        model(x)
    sn_kernels.reset_uv(model)
    assert not guards(model)
    for name, sigma in sn_kernels.sigmas(model).items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        weight = module.weight_orig if hasattr(module, "weight_orig") else module.parametrizations.weight.original
        exact = torch.linalg.matrix_norm(weight.detach().flatten(1), 2)
        assert torch.isfinite(sigma) and 0.9 * exact <= sigma <= exact * (1 + 1e-5), (name, sigma, exact)
    assert torch.isfinite(model(x)).all()


def test_meta_guard_lifted_by_loading_a_checkpoint():
    ref = nn.Sequential(sn_kernels.SNConv2d(3, 4, 3), nn.Flatten(),
                        sn_kernels.SNLinear(4 * 4 * 4, 8, api="parametrization"), nn.ReLU(), nn.Linear(8, 1))
    train_a_little(ref)
    model = meta_model()
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert not guards(model)
    x = torch.randn(2, 3, 6, 6)
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_no_guard_off_meta_and_partial_load_keeps_it():
    assert not guards(disc("hook")) and not guards(disc("parametrization"))
    model = meta_model()
    model.to_empty(device="cpu")
    sd = {k: v for k, v in nn.Sequential(*[copy.deepcopy(m) for m in model]).state_dict().items()
          if not k.startswith("0.")}
    model.load_state_dict(sd, strict=False)  # u, v of layer 0 not in it: its guard stays
    assert len(guards(model)) == 1


@pytest.mark.parametrize("api", APIS)
def test_meta_construction_with_gain(api):
    """gain=True built on meta: after to_empty() the gain is uninitialised memory like u, v; reset_uv sets
    it as wrapping does (the exact sigma, u and v the exact singular vectors), so the layer computes what
    one wrapped on the CPU around the same weight does (output unchanged by wrapping)."""
    with torch.device("meta"):
        model = sn_kernels.SNLinear(6, 4, gain=True, api=api)
    model.to_empty(device="cpu")
    original = model.weight_orig if api == "hook" else model.parametrizations.weight.original
    gain = model.weight_gain if api == "hook" else model.parametrizations.weight[0].gain
    torch.manual_seed(0)
    with torch.no_grad():
        original.normal_()
        model.bias.zero_()
        gain.fill_(1e13)  # the worst uninitialised memory
    sn_kernels.reset_uv(model)
    exact = torch.linalg.matrix_norm(original.detach().double(), 2).item()
    assert gain.item() == pytest.approx(exact, rel=1e-6)
    x = torch.randn(3, 6)
    model.eval()
    torch.testing.assert_close(model(x), x @ original.detach().t(), rtol=1e-5, atol=1e-5)


def test_reset_uv_warm_start_keeps_direction():
    model = disc("parametrization")
    train_a_little(model)
    sn = model[0].parametrizations.weight[0]
    u_before = sn._u.clone()
    with torch.no_grad():
        sn._u.mul_(0.5)  # averaged vectors are shorter than unit
    sn_kernels.reset_uv(model, n_power_iterations=1, redraw=False)
    assert torch.linalg.vector_norm(sn._u).item() == pytest.approx(1, abs=1e-6)
    assert torch.dot(sn._u, u_before).item() > 0.99


def _meta_linear(api, gain=False, out_features=4):
    """SNLinear(6, out_features) wrapped on meta, then to_empty(): u, v (and a gain) uninitialised."""
    with torch.device("meta"):
        model = sn_kernels.SNLinear(6, out_features, api=api, gain=gain)
    return model.to_empty(device="cpu")


def _trained_linear(api, gain=False, out_features=4):
    torch.manual_seed(0)
    ref = sn_kernels.SNLinear(6, out_features, api=api, gain=gain)
    for _ in range(3):
        ref(torch.randn(2, 6))
    return ref.eval()


def _uv_gain_keys(api):
    return (("weight_u", "weight_v", "weight_gain") if api == "hook"
            else tuple(f"parametrizations.weight.0.{k}" for k in ("_u", "_v", "gain")))


def _subset(state_dict, keep):
    """The entries of ``state_dict`` that ``keep(key)`` accepts, with its metadata (the hook's version)."""
    out = copy.copy(state_dict)
    for key in [k for k in out if not keep(k)]:
        del out[key]
    return out


REFUSED = "meta device.*uninitialised memory.*reset_uv"


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("left_out, gain", [("u", False), ("v", False), ("v", True), ("gain", True)])
def test_meta_guard_stays_until_u_v_and_gain_are_loaded(api, left_out, gain):
    """A strict=False load of a checkpoint without v (or u, or the gain) leaves that tensor
    uninitialised: the guard stays (the forward is refused) until a later load brings it."""
    ref = _trained_linear(api, gain)
    sd = ref.state_dict()
    key = dict(zip("u v gain".split(), _uv_gain_keys(api)))[left_out]
    model = _meta_linear(api, gain)
    result = model.load_state_dict(_subset(sd, lambda k: k != key), strict=False)
    assert result.missing_keys == [key]
    x = torch.randn(3, 6)
    model.eval()
    with pytest.raises(RuntimeError, match=REFUSED):
        model(x)
    model.load_state_dict(_subset(sd, lambda k: k == key), strict=False)  # the one missing: now all were loaded
    assert not guards(model)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", ["u", "bias"])
def test_meta_guard_after_a_failed_load(api, bad):
    """A load that fails on u (wrong shape: nothing copied) keeps the guard; one that fails on
    another key still copied u and v, which lifts it, as a successful load does."""
    ref = _trained_linear(api, out_features=5 if bad == "u" else 4)
    sd = ref.state_dict()
    original = "weight_orig" if api == "hook" else "parametrizations.weight.original"
    sd[original], sd["bias"] = sd[original][:4], sd["bias"][:4 if bad == "u" else 3]
    model = _meta_linear(api)
    with pytest.raises(RuntimeError, match=f"size mismatch for {'.*_u' if bad == 'u' else 'bias'}:"):
        model.load_state_dict(sd)
    x = torch.randn(3, 6)
    model.eval()
    if bad == "bias":
        assert not guards(model)
        return
    with pytest.raises(RuntimeError, match=REFUSED):
        model(x)
    sn_kernels.reset_uv(model)
    assert not guards(model) and torch.isfinite(model(x)).all()


def test_meta_guard_lifted_by_a_legacy_hook_checkpoint():
    """A pre-1.0 hook checkpoint (weight, weight_orig, weight_u; no weight_v, no version) loads with v
    solved from them (PyTorch's SpectralNormLoadStateDictPreHook): v is set, so the guard goes, and
    the layer computes what PyTorch's loaded from the same checkpoint does."""
    ref = _trained_linear("hook")
    old = {k: t for k, t in ref.state_dict().items() if k != "weight_v"}
    old["weight"] = ref.weight.detach()
    model = _meta_linear("hook")
    model.load_state_dict(old)
    assert not guards(model)
    torch.manual_seed(1)
    theirs = torch.nn.utils.spectral_norm(nn.Linear(6, 4)).eval()
    theirs.load_state_dict(old)
    model.eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(model.weight_v, theirs.weight_v, rtol=0, atol=0)
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_sigma_stays_sane(api, use_buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    sn_kernels.apply_spectral_norm(model, api=api)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=use_buffers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        x = torch.randn(32, 8)
        opt.zero_grad()
        (model(x) - x.sum(1, keepdim=True)).square().mean().backward()
        opt.step()
        ema.update_parameters(model)
    ema.eval()
    x = torch.randn(3, 8)

    def check(tol):
        ema(x)  # eval: sigma = u.(W v) from the EMA's u, v, no iteration
        for name, sigma in sn_kernels.sigmas(ema.module).items():
            module = ema.module.get_submodule(name.rsplit(".", 1)[0])
            weight = module.weight_orig if api == "hook" else module.parametrizations.weight.original
            exact = torch.linalg.matrix_norm(weight.detach(), 2)
            # u.(W v) never exceeds sigma for unit u, v; it is below it by the vectors' mismatch
            assert torch.isfinite(sigma) and (1 - tol) * exact <= sigma <= exact * (1 + 1e-5), (name, sigma, exact)

    # use_buffers=False: the live model's u, v, copied at each update (close);
    # use_buffers=True: averaged vectors, shorter than unit, so sigma comes out low
    check(tol=1.0 if use_buffers else 2e-2)
    sn_kernels.reset_uv(ema, redraw=False)
    check(tol=1e-4)  # refitted to the averaged weights


# ----------------------------------------------------------------------------- deepcopy, then remove_parametrizations


def _pair_model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 4)
    if kind == "conv":
        return nn.Conv2d(3, 4, 3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def _sn_layers(model):
    return [m for m in model.modules() if torch.nn.utils.parametrize.is_parametrized(m, "weight")]


def _outcome(fn):
    """fn()'s tensor (detached), or its exception as "Type: message" (to compare across implementations)."""
    try:
        return fn().detach().clone()
    except Exception as e:  # noqa: BLE001 - any error PyTorch raises must be ours too
        return f"{type(e).__name__}: {e}"


def _remove_from_one_of_a_pair(wrap, kind, forward, leave, first):
    """Wrap, optionally run, deepcopy; remove the spectral norm from ``first`` ("copy"/"original") of the
    pair (training mode: one power iteration, which writes u and v); check the kept weights and that the
    other's tensors did not change; then return (kept weights, the other's forward and removal outcomes)."""
    model = _pair_model(kind)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            wrap(m)
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 6, 6)
    if forward:
        model(x)
    clone = copy.deepcopy(model)
    removed, other = (clone, model) if first == "copy" else (model, clone)
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    kept = []
    for layer in _sn_layers(removed):
        plist = layer.parametrizations.weight
        w, v = plist.original.detach().clone(), plist[0]._v.clone()
        mat = w.flatten(1)  # dim 0 for Linear and Conv2d
        u = F.normalize(mat @ v, dim=0, eps=1e-12)  # the training access's one iteration ("uv")
        v = F.normalize(mat.T @ u, dim=0, eps=1e-12)
        expected = w / torch.dot(u, mat @ v) if leave else w
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight", leave_parametrized=leave)
        assert type(layer) in (nn.Linear, nn.Conv2d) and isinstance(layer.weight, nn.Parameter)
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-6, atol=1e-7)
        kept.append(layer.weight.detach().clone())
    # the other's tensors are untouched (PyTorch's parametrize shares the injected class between a module
    # and its deepcopy, so the removal does break the other's property: compared below, not asserted)
    after = other.state_dict()
    assert after.keys() == other_before.keys()
    for k, t in other_before.items():
        assert torch.equal(after[k], t), k
    layer = _sn_layers(other)[0]
    other_outcomes = [_outcome(lambda: other(x)),
                      _outcome(lambda: torch.nn.utils.parametrize.remove_parametrizations(
                          layer, "weight", leave_parametrized=leave).weight)]
    return kept, other_outcomes


@pytest.mark.parametrize("kind", ["linear", "conv", "sequential"])
@pytest.mark.parametrize("forward", [False, True], ids=["fresh", "after_forward"])
@pytest.mark.parametrize("leave", [True, False], ids=["leave", "original"])
@pytest.mark.parametrize("first", ["copy", "original"])
def test_remove_parametrizations_on_a_deepcopy_as_pytorch(kind, forward, leave, first):
    """remove_parametrizations on one of a model and its deepcopy keeps W/sigma (or the original W) and
    leaves the other's tensors alone; what then happens to the other (PyTorch: AttributeError on
    'weight', as its parametrize deletes the property from the class both share) is PyTorch's."""
    ours = _remove_from_one_of_a_pair(sn_kernels.parametrizations.spectral_norm, kind, forward, leave, first)
    theirs = _remove_from_one_of_a_pair(torch.nn.utils.parametrizations.spectral_norm, kind, forward, leave, first)
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1], strict=True):
        if isinstance(b, str):
            assert a == b
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_meta_guard_goes_with_the_spectral_norm(api):
    """Removing a still-guarded spectral norm (its original weight back) leaves a plain layer that runs:
    the guard has nothing left to protect and must not refuse it for good."""
    with torch.device("meta"):
        layer = nn.Linear(3, 4)
        wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
        wrap(layer)
    layer.to_empty(device="cpu")
    if api == "hook":
        sn_kernels.remove_spectral_norm(layer)
    else:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4, 3))
        layer.bias.zero_()
    x = torch.randn(2, 3)
    torch.testing.assert_close(layer(x), x @ torch.eye(4, 3).T)
    assert not guards(layer)


def test_meta_guard_of_a_vector_with_gain():
    """A 1-D weight (no u, v) with gain=True wrapped on meta: its gain is uninitialised after to_empty(),
    so the forward is refused until reset_uv sets it to the vector's length, as wrapping does."""
    with torch.device("meta"):
        norm = nn.BatchNorm1d(4)
        sn_kernels.parametrizations.spectral_norm(norm, gain=True)
    norm.to_empty(device="cpu")
    with torch.no_grad():
        norm.parametrizations.weight.original.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
        norm.parametrizations.weight[0].gain.fill_(1e13)  # the worst uninitialised memory
        norm.bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0)
    with pytest.raises(RuntimeError, match="meta device"):
        norm(torch.randn(3, 4))
    sn_kernels.reset_uv(norm)
    assert norm.parametrizations.weight[0].gain.item() == 2.0
    assert torch.isfinite(norm(torch.randn(3, 4))).all()
