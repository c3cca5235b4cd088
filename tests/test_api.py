"""Helpers and the dispatcher: apply_spectral_norm, convert, sigmas, SN layers, backends."""
import contextlib
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_kernels
from sn_kernels import dispatch
from sn_kernels.testing import svd_sigma
from helpers import check, hook_of


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 1))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_apply_spectral_norm_wraps_every_layer(api):
    model = nn.Sequential(small_model(), nn.Embedding(5, 3), nn.BatchNorm1d(3))
    sn_kernels.apply_spectral_norm(model, api=api, exclude="0.4")  # one name (not its characters) or several
    wrapped = {n for n, m in model.named_modules() if sn_kernels.is_spectral_normalized(m)}
    assert wrapped == {"0.0", "0.2", "1"}
    sn_kernels.apply_spectral_norm(model, api=api)  # idempotent for already wrapped layers
    assert {n for n, m in model.named_modules() if sn_kernels.is_spectral_normalized(m)} == {"0.0", "0.2", "0.4", "1"}
    with pytest.raises(ValueError, match="api"):
        sn_kernels.apply_spectral_norm(model, api="hooks")


@pytest.mark.parametrize("torch_wrap", [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm])
def test_convert_keeps_outputs_and_tensors(torch_wrap):
    ref = small_model()
    for i in (0, 2, 4):
        torch_wrap(ref[i])
    ref(torch.randn(2, 3, 6, 6))  # one training step moves u, v
    ours = __import__("copy").deepcopy(ref) if torch_wrap is torch.nn.utils.parametrizations.spectral_norm else None
    if ours is None:
        # hook-API modules cannot be deep-copied by PyTorch after a forward: rebuild from the state_dict
        ours = small_model()
        for i in (0, 2, 4):
            torch_wrap(ours[i])
        ours.load_state_dict(ref.state_dict())
    tensors = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    sn_kernels.convert(ours)
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()} == tensors
    assert all(type(h).__module__.startswith("sn_kernels") for m in ours.modules() for h in m._forward_pre_hooks.values())
    x = torch.randn(2, 3, 6, 6)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        check("convert output vs PyTorch", ours(x), ref(x), scale=10)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_convert_replaces_hook_in_state_dict_hooks():
    m = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    sn_kernels.convert(m)
    ours = hook_of(m)
    assert isinstance(ours, sn_kernels.hooks.SpectralNorm)
    assert all(getattr(getattr(h, "hook", h), "fn", ours) is ours
               for table in (m._state_dict_hooks, m._load_state_dict_pre_hooks) for h in table.values())
    # the load pre-hook is ours too: after a load, sigmas() reports the loaded state's sigma, not the last forward's
    m(torch.randn(2, 3))
    other = sn_kernels.spectral_norm(nn.Linear(3, 4))
    with torch.no_grad():
        other.weight_orig.mul_(10)
    m.load_state_dict(other.state_dict())
    m.eval()
    expected = sn_kernels.spectral_normalize(m.weight_orig, m.weight_u, m.weight_v, training=False)[1]
    torch.testing.assert_close(sn_kernels.sigmas(m)["weight"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("torch_wrap", [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm])
def test_convert_refuses_as_a_whole(torch_wrap):
    """A PyTorch spectral norm that sn_kernels does not take (eps=0, which PyTorch accepts) is refused
    before anything is converted: the model stays PyTorch's, whole and working."""
    model = nn.Sequential(torch_wrap(nn.Linear(3, 4)), torch_wrap(nn.Linear(4, 2), eps=0.0))
    with pytest.raises(ValueError, match=r"Linear\.weight: .*eps.*nothing was converted"):
        sn_kernels.convert(model)
    assert not any(type(h).__module__.startswith("sn_kernels") for m in model.modules()
                   for h in m._forward_pre_hooks.values())
    assert not any(type(p).__module__.startswith("sn_kernels") for m in model.modules()
                   if parametrize.is_parametrized(m) for plist in m.parametrizations.values() for p in plist)
    model(torch.randn(2, 3))


def test_convert_after_a_pytorch_forward_copies_and_saves():
    """PyTorch's hook leaves a graph-attached module.weight after a training forward, which deepcopy and
    pickling refuse; converted, the module copies and saves at once, as after our own forward."""
    import copy
    import io

    m = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    m(torch.randn(2, 3))
    with pytest.raises(RuntimeError):
        copy.deepcopy(m)
    sn_kernels.convert(m)
    clone = copy.deepcopy(m)
    torch.save(m, io.BytesIO())
    x = torch.randn(2, 3)
    torch.testing.assert_close(clone(x), m(x))


def test_sigmas_for_logging():
    model = small_model()
    sn_kernels.apply_spectral_norm(model)
    keys_before = list(model.state_dict())
    fresh = sn_kernels.sigmas(model)
    assert set(fresh) == {"0.weight", "2.weight", "4.weight"}
    for _ in range(50):
        model(torch.randn(2, 3, 6, 6))
    after = sn_kernels.sigmas(model)
    for name, mod in (("0.weight", model[0]), ("2.weight", model[2]), ("4.weight", model[4])):
        hook = hook_of(mod)
        check("sigmas() vs SVD", after[name], svd_sigma(mod.weight_orig.detach(), hook.dim).float(), scale=100)
    assert list(model.state_dict()) == keys_before
    assert not any(s.requires_grad for s in after.values())


def test_sigmas_parametrization_and_torch_modules():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    sn_kernels.parametrizations.spectral_norm(model[0])
    torch.nn.utils.spectral_norm(model[1])
    s = sn_kernels.sigmas(model)
    assert set(s) == {"0.weight", "1.weight"}
    model(torch.randn(2, 4))
    s2 = sn_kernels.sigmas(model)
    torch.testing.assert_close(s2["0.weight"], model[0].parametrizations.weight[0].sigma)


@pytest.mark.parametrize("cls,args,x", [
    (sn_kernels.SNLinear, (5, 3), torch.randn(2, 5)),
    (sn_kernels.SNConv1d, (2, 3, 3), torch.randn(2, 2, 8)),
    (sn_kernels.SNConv2d, (2, 3, 3), torch.randn(2, 2, 8, 8)),
    (sn_kernels.SNConv3d, (2, 3, 3), torch.randn(1, 2, 5, 5, 5)),
    (sn_kernels.SNConvTranspose1d, (2, 3, 3), torch.randn(2, 2, 8)),
    (sn_kernels.SNConvTranspose2d, (2, 3, 3), torch.randn(2, 2, 8, 8)),
    (sn_kernels.SNConvTranspose3d, (2, 3, 3), torch.randn(1, 2, 4, 4, 4)),
    (sn_kernels.SNEmbedding, (10, 4), torch.randint(0, 10, (6,))),
])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_sn_layers(cls, args, x, api):
    layer = cls(*args, api=api)
    base = cls.__mro__[1]
    assert isinstance(layer, base) and sn_kernels.is_spectral_normalized(layer)
    for _ in range(40):
        layer(x)
    layer.eval()
    dim = 1 if "Transpose" in cls.__name__ else 0
    w = layer.weight.detach()
    check("SN layer |W_sn|_2 vs 1", svd_sigma(w, dim).float(), torch.ones(()), scale=10)


# ------------------------------------------------------------------ dispatcher


def test_backend_selection_and_reasons(monkeypatch):
    assert "torch" in sn_kernels.available_backends("cpu")
    assert sn_kernels.get_backend() == "auto"
    with sn_kernels.use_backend("torch"):
        assert sn_kernels.get_backend() == "torch"
    assert sn_kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown sn_kernels backend"):
        sn_kernels.set_backend("fastest")
    assert "torch" in sn_kernels.explain("cpu")
    if not torch.cuda.is_available():  # nothing offers to run on a CUDA device this machine lacks
        assert sn_kernels.available_backends("cuda") == []
        assert sn_kernels.explain("cuda").count("CUDA is not available") >= 2

    # an explicitly requested backend that cannot run raises with the reason; auto falls back
    import sn_kernels.backends.pytorch as ref

    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    monkeypatch.setattr(ref, "why_not", lambda device, auto=False: "disabled for this test")
    dispatch._reset_cache()
    try:
        with pytest.raises(RuntimeError, match="disabled for this test"):
            sn_kernels.spectral_normalize(w, u, v, backend="torch")
        assert "torch" not in sn_kernels.available_backends("cpu")
    finally:
        monkeypatch.undo()
        dispatch._reset_cache()
    sn_kernels.spectral_normalize(w, u, v, backend="torch")


def test_sparse_weights_run_on_the_torch_backend():
    """A sparse weight (any layout but strided) runs on the torch backend under "auto" (a COO one with its numbers
    and a gradient; a CSR one as far as PyTorch's own ops take it); "native" and "triton", named, refuse either
    with the reason (not a dispatcher error)."""
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[w.abs() < 0.5] = 0
    u, v = nn.functional.normalize(torch.randn(6), dim=0), nn.functional.normalize(torch.randn(5), dim=0)
    ref, sigma_ref = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), backend="torch")
    for layout in ("coo", "csr"):
        ws = (w.to_sparse() if layout == "coo" else w.to_sparse_csr()).requires_grad_()
        for name in ("native", "triton"):
            with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run a torch.sparse_{layout} weight"):
                sn_kernels.spectral_normalize(ws, u.clone(), v.clone(), backend=name)
        if layout == "csr":
            continue  # PyTorch's reshape refuses it ("unsupported tensor layout"): the torch backend's error
        out, sigma = sn_kernels.spectral_normalize(ws, u.clone(), v.clone(), backend="auto")
        assert torch.equal(out.to_dense(), ref) and torch.equal(sigma, sigma_ref)
        out.to_dense().sum().backward()
        assert ws.grad is not None
    assert "sparse weights: torch backend" in sn_kernels.explain("cpu")


def test_auto_fallback_from_native_is_visible(monkeypatch):
    import sn_kernels.backends.native as native

    monkeypatch.setattr(native, "why_not", lambda device, auto=False: "extension not built (test)")
    dispatch._reset_cache()
    try:
        with pytest.warns(UserWarning, match=r"native backend is unavailable on cpu \(extension not built \(test\)\); "
                                             r"using 'torch'") as record:
            sn_kernels.spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3))
        assert record[0].filename == __file__  # the user's call, not a line of sn_kernels
        dispatch._reset_cache()
        with pytest.warns(UserWarning, match="native backend is unavailable") as record:
            sn_kernels.SNLinear(3, 4)(torch.randn(2, 3))  # through a module's hooks and torch.nn's call machinery
        assert record[0].filename == __file__
    finally:
        monkeypatch.undo()
        dispatch._reset_cache()


def test_backend_named_by_a_str():
    with pytest.raises(TypeError, match="named by a str"):
        sn_kernels.set_backend(None)
    with pytest.raises(ValueError, match="unknown sn_kernels backend 'cuda'"):
        sn_kernels.set_backend("CUDA")


def test_auto_never_picks_unavailable(monkeypatch):
    name = dispatch.resolve(torch.device("cpu"), "auto").name
    assert dispatch.why_not(name, "cpu", auto=True) is None
    assert name in sn_kernels.available_backends("cpu")


def test_environment_variable():
    code = "import sn_kernels; print(sn_kernels.get_backend())"
    env = dict(os.environ, SN_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr
    env["SN_KERNELS_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown sn_kernels backend 'bogus'" in out.stderr


def test_public_native_utilities():
    """sn_kernels.native (README) exposes the extension's build record and CPU output cache."""
    from sn_kernels import native
    from sn_kernels.backends import native as backend_native

    assert native.build_info is backend_native.build_info and isinstance(native.build_info(), dict)
    if "native" in sn_kernels.available_backends("cpu"):
        assert set(native.cache_stats()) == {"idle_bytes", "idle_blocks", "in_use_bytes", "hits", "misses"}
        native.empty_cache()
        assert native.cache_stats()["idle_bytes"] == 0


def test_native_utilities_reachable_after_import_sn_kernels():
    """The README's ``sn_kernels.native.cache_stats()`` works after ``import sn_kernels`` alone."""
    code = "import sn_kernels; print(sorted(sn_kernels.native.cache_stats())); print(type(sn_kernels.native.build_info()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "idle_bytes" in out.stdout and "dict" in out.stdout


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_apply_spectral_norm_and_multihead_attention(api):
    """nn.MultiheadAttention uses out_proj.weight without calling out_proj: the hook API would leave it
    the raw weight, untrained (no gradient reaches weight_orig), so apply_spectral_norm leaves it alone
    and says so; the parametrization normalizes it, and it trains."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    if api == "hook":
        with pytest.warns(UserWarning, match="self_attn.out_proj"):
            sn_kernels.apply_spectral_norm(layer, api=api)
        assert not sn_kernels.is_spectral_normalized(layer.self_attn.out_proj)
    else:
        sn_kernels.apply_spectral_norm(layer, api=api)
        assert sn_kernels.is_spectral_normalized(layer.self_attn.out_proj)
    assert sn_kernels.is_spectral_normalized(layer.linear1)
    layer(torch.randn(2, 5, 8)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_sigmas_of_stacked_parametrizations():
    """Two spectral norms stacked on one weight (PyTorch's parametrization stacks them): each its own
    key, the second's sigma that of its input W / sigma_1 (about 1), before and after a forward."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(100)
    exact = torch.linalg.matrix_norm(lin.weight.detach().double(), 2).item()
    P = sn_kernels.parametrizations.spectral_norm
    P(P(lin))
    for _ in range(2):
        s = sn_kernels.sigmas(lin)
        assert set(s) == {"weight", "weight[1]"}
        assert abs(s["weight"].item() / exact - 1) < 1e-3 and abs(s["weight[1]"].item() - 1) < 1e-3
        lin(torch.randn(2, 8))


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("mode", ["matrix", "conv"])
def test_sigmas_after_load_state_dict(api, mode):
    """After load_state_dict, sigmas() reports the loaded state's sigma (u . W v), not the one logged
    by the last forward before the load."""
    torch.manual_seed(0)
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    a = wrap(nn.Conv2d(3, 8, 3), mode=mode)
    b = copy.deepcopy(a)
    with torch.no_grad():
        (b.weight_orig if api == "hook" else b.parametrizations.weight.original).mul_(3)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        a(x), b(x)
    before, = sn_kernels.sigmas(a).values()
    a.load_state_dict(b.state_dict())
    loaded, = sn_kernels.sigmas(a).values()
    a.eval()
    expected = a(x) is not None and sn_kernels.sigmas(a)["weight"]  # an eval forward logs u . W v
    assert abs(loaded.item() / before.item() - 3) < 0.05  # the loaded weight is 3x: not the stale sigma
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=0)


def test_use_backend_is_per_thread():
    """A use_backend block selects for its own thread: another thread's block neither shows through nor
    undoes it, and after both end the selection is what it was."""
    import threading

    before = sn_kernels.get_backend()
    inside, seen_outside = threading.Barrier(3), {}

    def block(name):
        with sn_kernels.use_backend(name):
            inside.wait()  # all three threads now inside or waiting
            seen_outside[name] = sn_kernels.get_backend()
            inside.wait()

    threads = [threading.Thread(target=block, args=(n,)) for n in ("torch", "native")]
    for t in threads:
        t.start()
    inside.wait()
    seen_outside["main"] = sn_kernels.get_backend()
    inside.wait()
    for t in threads:
        t.join()
    assert seen_outside == {"torch": "torch", "native": "native", "main": before}
    assert sn_kernels.get_backend() == before
    with sn_kernels.use_backend("torch"):
        assert dispatch.resolve(torch.device("cpu")).name == "torch"
        sn_kernels.set_backend(before)  # the process default; the block still overrides it here
        assert sn_kernels.get_backend() == "torch"
    assert sn_kernels.get_backend() == before


def test_the_front_ends_fast_path_follows_the_selection(monkeypatch):
    """functional's fast path (dispatch.direct_entry) calls the selected backend's direct entry without resolving
    the backend per call: the global selection's, or a use_backend block's own (resolved once in the block, not
    shared with other threads nor kept after it); it follows set_backend and steps aside for an explicit
    backend=; an argument the entry refuses is named by the Python check."""
    import threading

    if dispatch.resolve(torch.device("cpu")).direct is None:
        pytest.skip("the native backend's direct entry is not loaded")
    w = torch.randn(6, 4, requires_grad=True)
    u, v = torch.nn.functional.normalize(torch.randn(6), dim=0), torch.nn.functional.normalize(torch.randn(4), dim=0)
    sn_kernels.spectral_normalize(w, u, v)  # resolves once, which fills the fast path's entry
    resolved = []
    real = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: resolved.append(a) or real(*a, **k))

    def native(**kw):  # whether the native backend's C++ node made the output
        grad_fn = sn_kernels.spectral_normalize(w, u, v, **kw)[0].grad_fn
        return type(grad_fn).__name__ == "CppFunction" and "NormalizeFunction" in grad_fn.name()

    assert native() and resolved == []
    with sn_kernels.use_backend("torch"):
        assert not native() and len(resolved) == 1
    with sn_kernels.use_backend("native"):
        assert native() and native() and len(resolved) == 2  # the block's table: resolved at its first call only
        with sn_kernels.use_backend("torch"):  # a nested block has a table of its own
            assert not native() and len(resolved) == 3
        assert native() and len(resolved) == 3
    inside, done = threading.Event(), threading.Event()
    seen = []

    def other():
        with sn_kernels.use_backend("torch"):
            seen.append(native())  # the other thread's block: its own selection, not this thread's table
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    assert seen == [False] and len(resolved) == 4
    assert native() and len(resolved) == 4  # this thread, no block: the global table, while the other's is open
    done.set()
    thread.join()
    assert not native(backend="torch")
    before = sn_kernels.get_backend()
    sn_kernels.set_backend("torch")
    try:
        assert not native()
    finally:
        sn_kernels.set_backend(before)
    with pytest.raises(ValueError, match="u must have shape"):
        sn_kernels.spectral_normalize(w, u[:-1].clone(), v)


def _counted_direct(monkeypatch):
    """(weight, u0, v0, answers): a float64 call's arguments, with the native backend's direct entry replaced, for
    the fast path and ``dispatch.resolve`` alike, by one that records each of its answers in ``answers``; skips
    when the entry is not loaded."""
    import dataclasses

    chosen = dispatch.resolve(torch.device("cpu"))
    if chosen.direct is None:
        pytest.skip("the native backend's direct entry is not loaded")
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    u0, v0 = torch.nn.functional.normalize(torch.randn(6, dtype=torch.float64), dim=0), \
        torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    sn_kernels.spectral_normalize(w, u0.clone(), v0.clone())  # fills the fast path's entry
    answers = []

    def counted(*args):
        answers.append(chosen.direct(*args))
        return answers[-1]

    monkeypatch.setitem(dispatch._direct, "cpu", counted)
    real = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: dataclasses.replace(real(*a, **k), direct=counted))
    return w, u0, v0, answers


def test_a_declined_direct_call_is_asked_once(monkeypatch):
    """A call the direct entry declines (here: under a torch function mode) goes on through torch.ops without
    asking the entry again, whether the fast path or an explicit backend="native" asked first; the result is
    the fused op's."""
    from torch.overrides import TorchFunctionMode

    w, u0, v0, answers = _counted_direct(monkeypatch)

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    expected = sn_kernels.spectral_normalize(w, u0.clone(), v0.clone())
    assert len(answers) == 1 and answers[0] is not NotImplemented
    for backend in (None, "native"):
        answers.clear()
        u, v = u0.clone(), v0.clone()
        with Passing():
            out = sn_kernels.spectral_normalize(w, u, v, backend=backend)
        assert answers == [NotImplemented], backend
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
        assert "NormalizeFunction" in out[0].grad_fn.name()


def test_an_int_or_numpy_coeff_takes_the_direct_entry(monkeypatch):
    """``coeff=2`` (an int, or a NumPy scalar) reaches the direct entry as a float, which it accepts at the first
    try (its exact-type rule declined such a call, which then took the slower route: about 20 µs more per call of
    a layer wrapped with coeff=2); the results are those of the float coeff."""
    import warnings

    import numpy as np

    w, u0, v0, answers = _counted_direct(monkeypatch)
    expected = sn_kernels.spectral_normalize(w, u0.clone(), v0.clone(), coeff=2.0)
    for coeff in (2, np.float32(2.0), np.int64(2)):
        answers.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NumPy's overflow warning of check_coeff's comparison, once
            out = sn_kernels.spectral_normalize(w, u0.clone(), v0.clone(), coeff=coeff)
        assert len(answers) == 1 and answers[0] is not NotImplemented, type(coeff)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    with pytest.raises(ValueError, match="coeff must be finite"):  # NumPy compared it with float64's max as float32
        sn_kernels.spectral_normalize(w, u0.clone(), v0.clone(), coeff=np.float32("inf"))
    layer = sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 6), coeff=2)
    answers.clear()
    layer.weight
    assert len(answers) == 1 and answers[0] is not NotImplemented


@pytest.mark.parametrize("layer", [lambda: nn.Linear(7, 5), lambda: nn.ConvTranspose2d(3, 4, 3)])
def test_reset_uv_on_pytorchs_hook(layer):
    """reset_uv takes PyTorch's hook spectral norm too (it has no gain): fresh u, v whose sigma is the SVD's."""
    torch.manual_seed(0)
    m = torch.nn.utils.spectral_norm(layer().double())
    for redraw in (True, False):
        sn_kernels.reset_uv(m, n_power_iterations=200, redraw=redraw)
        sigma = sn_kernels.sigmas(m)["weight"]
        dim = hook_of(m).dim  # 1 for ConvTranspose
        exact = svd_sigma(m.weight_orig.movedim(dim, 0))
        torch.testing.assert_close(sigma, exact.to(sigma.dtype), rtol=1e-8, atol=0)


@pytest.mark.parametrize("ours", [True, False])
def test_tools_on_spectral_norm_stacked_on_weight_norm(ours):
    """A spectral norm stacked on parametrizations.weight_norm (whose list holds original0, original1):
    sigmas (after a load too), reset_uv and singular_values read the weight_norm's output."""
    torch.manual_seed(0)
    m = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 6).double())
    (sn_kernels.parametrizations.spectral_norm if ours else torch.nn.utils.parametrizations.spectral_norm)(m)
    m(torch.randn(2, 4, dtype=torch.float64))
    plist = m.parametrizations.weight
    exact = svd_sigma(plist[0](plist.original0, plist.original1)).item()
    m.load_state_dict(m.state_dict())
    sn_kernels.reset_uv(m, n_power_iterations=200)
    assert sn_kernels.sigmas(m)["weight"].item() == pytest.approx(exact, rel=1e-8)
    assert sn_kernels.singular_values(m, k=1, iters=200).item() == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_freeze_refuses_as_a_whole(api):
    """A mode="conv" layer that has not run (sigma unknown) is refused before anything is frozen: the
    earlier layers stay spectrally normalized and every layer keeps its training mode."""
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    m = nn.Sequential(wrap(nn.Linear(3, 3)), wrap(nn.Conv1d(1, 1, 3), mode="conv"))
    with pytest.raises(RuntimeError, match=r"1\.weight.*has not run a forward.*nothing was frozen"):
        sn_kernels.freeze(m)
    assert sn_kernels.is_spectral_normalized(m[0]) and sn_kernels.is_spectral_normalized(m[1])
    assert all(sub.training for sub in m.modules())


def test_apply_spectral_norm_refuses_as_a_whole():
    """With the hook API a layer whose weight is computed (weight_norm) is refused before anything is
    wrapped, naming it; the parametrization API stacks on it."""
    model = nn.Sequential(nn.Linear(3, 3), torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
                          nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"1\.weight is not a plain parameter.*nothing was wrapped"):
        sn_kernels.apply_spectral_norm(model)
    assert not any(sn_kernels.is_spectral_normalized(m) for m in model)
    sn_kernels.apply_spectral_norm(model, api="parametrization")
    assert all(sn_kernels.is_spectral_normalized(m) for m in model)
    lazy = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"1 has an uninitialized \(lazy\) weight.*nothing was wrapped"):
        sn_kernels.apply_spectral_norm(lazy)
    assert not sn_kernels.is_spectral_normalized(lazy[0])


@pytest.mark.parametrize("case", ["operator_bilinear", "hook_complex", "coeff_complex"])
def test_apply_spectral_norm_refuses_layer_dependent_settings_as_a_whole(case):
    """Settings one layer of the model cannot take (bound="operator" on a Bilinear, the hook API or coeff on
    a complex weight) are refused before the first layer is wrapped, naming that layer."""
    second = nn.Bilinear(3, 3, 3) if case == "operator_bilinear" else nn.Linear(3, 3).to(torch.complex64)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": second})
    options = {"operator_bilinear": dict(bound="operator"), "hook_complex": dict(),
               "coeff_complex": dict(api="parametrization", coeff=0.5)}[case]
    with pytest.raises((TypeError, ValueError), match=r"b\.weight.*nothing was wrapped"):
        sn_kernels.apply_spectral_norm(model, **options)
    assert not any(sn_kernels.is_spectral_normalized(m) for m in model.values())


# ----------------------------------------------------------------------------- argument types
WRAPS = {"hook": (sn_kernels.spectral_norm, torch.nn.utils.spectral_norm),
         "parametrization": (sn_kernels.parametrizations.spectral_norm, torch.nn.utils.parametrizations.spectral_norm)}


def _stored_dim(module, api):
    return hook_of(module).dim if api == "hook" else module.parametrizations.weight[0].dim


@pytest.mark.parametrize("api", ["hook", "parametrization"])
@pytest.mark.parametrize("dim", [0.0, np.float64(0.0)], ids=["float", "numpy"])
def test_dim_equal_to_zero_runs_as_pytorchs(api, dim):
    """PyTorch's front ends test ``dim != 0``, so they take a dim of 0.0 as dim=0: so do ours (stored as
    the int 0), with PyTorch's numbers."""
    ours, theirs = WRAPS[api]
    torch.manual_seed(0)
    ref = theirs(nn.Linear(3, 4), dim=dim)
    torch.manual_seed(0)
    m = ours(nn.Linear(3, 4), dim=dim)
    assert type(_stored_dim(m, api)) is int and _stored_dim(m, api) == 0
    x = torch.randn(2, 3)
    check("dim=0.0 vs PyTorch", m(x), ref(x))


@pytest.mark.parametrize("api", list(WRAPS))
@pytest.mark.parametrize("dim", [0.5, 1.0, float("nan"), "0"])
def test_non_integer_dim_refused_naming_dim(api, dim):
    """A dim that is not an integer (nor equal to 0, as above) is refused by its name before the layer
    changes; PyTorch fails too (in permute)."""
    m = nn.Conv1d(2, 3, 2)
    keys = list(m.state_dict())
    with pytest.raises(TypeError, match="dim must be an integer"):
        WRAPS[api][0](m, dim=dim)
    assert list(m.state_dict()) == keys and not sn_kernels.is_spectral_normalized(m)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_functional_non_integer_dim_refused_naming_dim(backend):
    """The op names a refused dim too (native: after its own check fails)."""
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    for dim in (0.5, "0"):
        with pytest.raises(TypeError, match="dim must be an integer"):
            sn_kernels.spectral_normalize(w, u, v, dim=dim, backend=backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_functional_dim_equal_to_zero_runs(backend):
    """The op takes a dim of 0.0 as 0, as the front ends do (native: its C++ op takes an int only)."""
    torch.manual_seed(0)
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    want = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), dim=0, backend=backend)
    got = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), dim=0.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("api", list(WRAPS))
def test_convert_of_pytorchs_with_dim_zero_float_runs(api):
    """PyTorch's spectral norm keeps a dim of 0.0 as given (it runs there); converted, ours stores the int 0
    and gives PyTorch's numbers."""
    torch.manual_seed(0)
    ref = WRAPS[api][1](nn.Linear(3, 4), dim=0.0)
    m = sn_kernels.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3)
    check("converted dim=0.0 vs PyTorch", m(x), ref(x))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_coeff_must_be_finite_in_the_computation_dtype(backend):
    """coeff=inf, or a coeff float32 cannot hold on a float32 weight, would silently zero W / sigma: refused;
    a float64 weight takes any finite coeff."""
    torch.manual_seed(0)
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    for coeff, soft in ((float("inf"), False), (float("inf"), True), (1e308, False), (3.5e38, False),
                        (2 ** 1100, False)):
        with pytest.raises(ValueError, match="coeff"):
            sn_kernels.spectral_normalize(w, u.clone(), v.clone(), coeff=coeff, soft=soft, backend=backend)
    for api in WRAPS:
        m = nn.Linear(3, 4)
        with pytest.raises(ValueError, match="coeff"):
            WRAPS[api][0](m, coeff=float("inf"))
        assert not sn_kernels.is_spectral_normalized(m)
    w64, u64, v64 = w.double(), u.double(), v.double()
    ws, sigma = sn_kernels.spectral_normalize(w64, u64, v64, coeff=1e300, backend=backend)
    check("coeff=1e300 on float64", ws, w64 * (1e300 / sigma))


@pytest.mark.parametrize("api", list(WRAPS))
def test_coeff_takes_numpy_reals(api):
    """coeff takes any real number (a NumPy scalar too), as n_power_iterations takes any integer; a
    non-number is refused by its name."""
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    y = WRAPS[api][0](nn.Linear(3, 4), coeff=2.0)(x)
    for coeff in (np.float32(2), np.int64(2)):
        torch.manual_seed(0)
        m = WRAPS[api][0](nn.Linear(3, 4), coeff=coeff)
        check("NumPy coeff", m(x), y)
    with pytest.raises(TypeError, match="coeff must be a real number"):
        WRAPS[api][0](nn.Linear(3, 4), coeff="2")
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    ws, _ = sn_kernels.spectral_normalize(w, u.clone(), v.clone(), coeff=np.float32(2))
    check("NumPy coeff, functional", ws, sn_kernels.spectral_normalize(w, u.clone(), v.clone(), coeff=2.0)[0])


@pytest.mark.parametrize("api", list(WRAPS))
@pytest.mark.parametrize("eps", ["1e-12", None, 1e-12 + 0j])
def test_eps_not_a_real_number_refused_naming_eps(api, eps):
    """An eps that cannot be compared with 0 is refused by its name (PyTorch's fail in clamp_min)."""
    m = nn.Linear(3, 4)
    with pytest.raises(TypeError, match="eps must be a real number"):
        WRAPS[api][0](m, eps=eps)
    assert not sn_kernels.is_spectral_normalized(m)
    with pytest.raises(TypeError, match="eps must be a real number"):
        sn_kernels.spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3), eps=eps, backend="torch")
    if isinstance(eps, str):  # the native op would parse it
        with pytest.raises(TypeError, match="eps must be a real number"):
            sn_kernels.spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3), eps=eps,
                                          backend="native")


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_convert_leaves_subclasses_of_pytorchs_spectral_norm(api):
    """A subclass of PyTorch's spectral norm (DUE's and SNGP's bounded ones) normalizes in its own way: convert
    leaves it in place with a warning (it made it plain W / sigma: a 0.95 bound became 1.0)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm as TorchHook

    class Bounded(_SpectralNorm):
        def forward(self, weight):
            return 0.95 * super().forward(weight)

    class BoundedHook(TorchHook):
        def compute_weight(self, module, do_power_iteration):
            return 0.95 * super().compute_weight(module, do_power_iteration)

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    if api == "hook":  # PyTorch's hook, its object swapped for the subclass (as DUE's apply builds it)
        torch.nn.utils.spectral_norm(layer)
        key = next(iter(layer._forward_pre_hooks))
        layer._forward_pre_hooks[key] = BoundedHook("weight", 1, 0, 1e-12)
    else:
        parametrize.register_parametrization(layer, "weight", Bounded(layer.weight))
    x = torch.randn(4, 8)
    layer.eval()
    expected = layer(x)
    with pytest.warns(UserWarning, match="subclass of PyTorch's spectral norm"):
        sn_kernels.convert(layer)
    assert torch.equal(layer(x), expected)


def test_reset_cache_empties_every_blocks_fast_path_table():
    """dispatch._reset_cache (after a build) forgets the direct entries of every use_backend block's table, an
    outer block's included, not only the global table's."""
    if dispatch.resolve(torch.device("cpu")).direct is None:
        pytest.skip("the native backend's direct entry is not loaded")
    w = torch.randn(6, 4)
    u, v = torch.nn.functional.normalize(torch.randn(6), dim=0), torch.nn.functional.normalize(torch.randn(4), dim=0)
    with sn_kernels.use_backend("native"):
        sn_kernels.spectral_normalize(w, u, v)  # fills the block's table
        assert dispatch.direct_entry(w) is not None
        with sn_kernels.use_backend("torch"):
            dispatch._reset_cache()
        assert dispatch.direct_entry(w) is None
        sn_kernels.spectral_normalize(w, u, v)  # resolved again: the table refilled
        assert dispatch.direct_entry(w) is not None


@pytest.mark.parametrize("in_block", [False, True])
def test_a_resolution_overtaken_by_a_reset_is_not_cached(monkeypatch, in_block):
    """A resolution that another thread's dispatch._reset_cache overtakes (the reset comes while the
    backend is being resolved, e.g. during the extension's build) leaves no entry behind: neither in the
    resolution cache nor in a fast-path table, so the next call resolves afresh."""
    real = dispatch._resolve

    def overtaken(choice, device):
        chosen = real(choice, device)
        dispatch._reset_cache()  # as another thread would, between the resolution and its caching
        return chosen

    w = torch.randn(6, 4)
    block = sn_kernels.use_backend("auto") if in_block else contextlib.nullcontext()
    dispatch._reset_cache()
    with block:
        monkeypatch.setattr(dispatch, "_resolve", overtaken)
        chosen = dispatch.resolve(torch.device("cpu"))
        monkeypatch.setattr(dispatch, "_resolve", real)
        assert dispatch._resolved == {}
        assert dispatch.direct_entry(w) is None
        assert dispatch.resolve(torch.device("cpu")) is chosen  # resolved again, and cached this time
        assert ("auto", "cpu") in dispatch._resolved
        assert (dispatch.direct_entry(w) is not None) == (chosen.direct is not None)


def test_use_backend_blocks_ended_out_of_order_leave_no_selection_behind():
    """Two use_backend blocks of one thread that end out of order (as interleaved generators or tasks end
    them): the block still open stays in force, and once both have ended the thread's selection is the
    default again, not the first block's."""
    before = sn_kernels.get_backend()
    outer, inner = sn_kernels.use_backend("torch"), sn_kernels.use_backend("native")
    outer.__enter__()
    inner.__enter__()
    try:
        assert sn_kernels.get_backend() == "native"
        outer.__exit__(None, None, None)
        assert sn_kernels.get_backend() == "native"
    finally:
        inner.__exit__(None, None, None)
        if dispatch._local.stack:  # a failure above left the outer block open: end it for the later tests
            outer.__exit__(None, None, None)
    assert sn_kernels.get_backend() == before
    with sn_kernels.use_backend("torch"):
        with sn_kernels.use_backend("native"):
            assert sn_kernels.get_backend() == "native"
        assert sn_kernels.get_backend() == "torch"
    assert sn_kernels.get_backend() == before
