"""patch_torch / unpatch_torch against the ways real code reaches PyTorch's spectral norm,
the class API ``SpectralNorm.apply``, and convert() for what the patch cannot reach."""
import importlib
import sys
import textwrap

import pytest
import torch
from torch import nn

import sn_kernels
from sn_kernels import hooks, parametrizations
from helpers import hook_of

TORCH_SN_MODULE = sys.modules["torch.nn.utils.spectral_norm"]
TORCH_PARAM_MODULE = sys.modules["torch.nn.utils.parametrizations"]

# a "model library" per import style: each builds a Linear + Conv2d discriminator
STYLES = {
    "utils_attr": "from torch.nn.utils import spectral_norm as sn",
    "module_func": "from torch.nn.utils.spectral_norm import spectral_norm as sn",
    "dotted_call": "import torch.nn as _nn\nsn = lambda m: _nn.utils.spectral_norm(m)",
    "class_apply": ("from torch.nn.utils.spectral_norm import SpectralNorm\n"
                    "def sn(m):\n    SpectralNorm.apply(m, 'weight', 1, 0, 1e-12)\n    return m"),
    "param_func": "from torch.nn.utils.parametrizations import spectral_norm as sn",
}
LIBRARY = """
import torch
from torch import nn
{style}

def build():
    return nn.Sequential(sn(nn.Conv2d(3, 4, 3)), nn.Flatten(), sn(nn.Linear(4 * 4 * 4, 1)))
"""


@pytest.fixture(autouse=True)
def _unpatched():
    sn_kernels.unpatch_torch()
    yield
    sn_kernels.unpatch_torch()


@pytest.fixture
def library(tmp_path, monkeypatch):
    """import_library(style) imports a freshly written module of that import style."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def import_library(style):
        name = f"sn_lib_{style}_{len(names)}"
        (tmp_path / f"{name}.py").write_text(LIBRARY.format(style=textwrap.dedent(STYLES[style])))
        names.append(name)
        importlib.invalidate_caches()
        return importlib.import_module(name)

    yield import_library
    for name in names:
        sys.modules.pop(name, None)


def kinds(model):
    """'ours'/'torch' per spectral norm of ``model``."""
    out = []
    for _, kind, _, _, state in ((q, site.kind, site.module, site.name, site.state) for q, site in sn_kernels.find.walk(model)):
        ours = isinstance(state, (hooks.SpectralNorm, parametrizations.SpectralNormParametrization))
        out.append("ours" if ours else "torch")
    return out


@pytest.mark.parametrize("style", list(STYLES))
def test_import_after_patch(library, style):
    sn_kernels.patch_torch()
    assert kinds(library(style).build()) == ["ours", "ours"]


@pytest.mark.parametrize("style", list(STYLES))
def test_reference_taken_before_patch_still_builds_ours(library, style):
    """PyTorch's functions look the class up when called, and the patch replaces the class too."""
    lib = library(style)
    assert kinds(lib.build()) == ["torch", "torch"]
    with sn_kernels.patch_torch():
        assert kinds(lib.build()) == ["ours", "ours"]
    assert kinds(lib.build()) == ["torch", "torch"], "the context manager must undo the patch"


@pytest.mark.parametrize("style", list(STYLES))
def test_model_built_before_patch_needs_convert(library, style):
    model = library(style).build()
    sn_kernels.patch_torch()
    assert kinds(model) == ["torch", "torch"]
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    before = model(x)
    sn_kernels.convert(model)
    assert kinds(model) == ["ours", "ours"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_unpatch_restores_every_original():
    originals = [torch.nn.utils.spectral_norm, TORCH_SN_MODULE.spectral_norm,
                 TORCH_SN_MODULE.SpectralNorm.__dict__["apply"], TORCH_PARAM_MODULE.spectral_norm,
                 TORCH_PARAM_MODULE._SpectralNorm]
    handle = sn_kernels.patch_torch()
    assert sn_kernels.is_patched() and handle.applied
    assert torch.nn.utils.spectral_norm is sn_kernels.spectral_norm
    assert TORCH_SN_MODULE.spectral_norm is sn_kernels.spectral_norm
    assert TORCH_PARAM_MODULE.spectral_norm is sn_kernels.parametrizations.spectral_norm
    assert not sn_kernels.patch_torch().applied, "patching twice is a no-op"
    with sn_kernels.patch_torch():  # nested: must not undo the outer patch
        pass
    assert sn_kernels.is_patched()
    sn_kernels.unpatch_torch()
    assert not sn_kernels.is_patched()
    now = [torch.nn.utils.spectral_norm, TORCH_SN_MODULE.spectral_norm,
           TORCH_SN_MODULE.SpectralNorm.__dict__["apply"], TORCH_PARAM_MODULE.spectral_norm,
           TORCH_PARAM_MODULE._SpectralNorm]
    assert all(a is b for a, b in zip(now, originals))
    sn_kernels.unpatch_torch()  # no-op


def test_patched_layers_match_pytorch_numbers():
    """Seeded builds under the patch give PyTorch's u, v draws and outputs (hook and parametrization)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(6, 5)),
                             torch.nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3)))

    ref = build()
    with sn_kernels.patch_torch():
        ours = build()
    assert kinds(ours) == ["ours", "ours"]
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_pytorch_remove_and_our_extensions_work_while_patched():
    with sn_kernels.patch_torch():
        m = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
        m(torch.randn(2, 3))
        torch.nn.utils.remove_spectral_norm(m)
        assert isinstance(m.weight, nn.Parameter)
        g = torch.nn.utils.spectral_norm(nn.Linear(3, 4), coeff=2.0)  # our keywords pass through
        assert hook_of(g).coeff == 2.0


# ----------------------------------------------------------------------------- the class API


def test_class_apply_matches_pytorch_class():
    """``SpectralNorm.apply(module, name, n_power_iterations, dim, eps)``: ours against PyTorch's."""
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3)
    ours = nn.Conv2d(3, 4, 3)
    ours.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    fn_ref = TORCH_SN_MODULE.SpectralNorm.apply(ref, "weight", 2, 0, 1e-12)
    torch.manual_seed(1)
    fn_ours = sn_kernels.SpectralNorm.apply(ours, "weight", 2, 0, 1e-12)
    assert isinstance(fn_ours, sn_kernels.SpectralNorm) and fn_ours.n_power_iterations == 2
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight_u, ref.weight_u, rtol=1e-5, atol=1e-6)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_convert_catches_class_built_modules():
    m = nn.Linear(4, 3)
    TORCH_SN_MODULE.SpectralNorm.apply(m, "weight", 1, 0, 1e-12)
    assert kinds(m) == ["torch"]
    sn_kernels.convert(m)
    assert kinds(m) == ["ours"]
    m(torch.randn(2, 4))


def _bounded_sn(base):
    """A user subclass of ``base`` in the style of public code (SNGP's bounded spectral norm): its own
    attributes (``self.bound``), and a forward written on PyTorch's private helpers."""
    class BoundedSpectralNorm(base):
        def __init__(self, weight, n_power_iterations=1, bound=0.5):
            super().__init__(weight, n_power_iterations, dim=0, eps=1e-12)
            self.bound = bound

        def forward(self, weight):
            weight_mat = self._reshape_weight_to_matrix(weight)
            if self.training:
                self._power_method(weight_mat, self.n_power_iterations)
            u, v = self._u.clone(), self._v.clone()
            sigma = torch.vdot(u, torch.mv(weight_mat, v))
            return torch.where(sigma > self.bound, self.bound * weight / sigma, weight)
    return BoundedSpectralNorm


def _subclass_under_patch():
    with sn_kernels.patch_torch():
        return _bounded_sn(TORCH_PARAM_MODULE._SpectralNorm)


@pytest.mark.parametrize("define", [_subclass_under_patch, lambda: _bounded_sn(parametrizations.SpectralNormParametrization)],
                         ids=["defined_under_patch", "defined_on_ours"])
def test_subclass_using_pytorch_helpers_matches_pytorch(define):
    """A subclass of _SpectralNorm defined while patched (so on ours), or of ours directly, that sets its own
    ``bound`` and calls _reshape_weight_to_matrix / _power_method gets PyTorch's numbers."""
    ours_cls, torch_cls = define(), _bounded_sn(TORCH_PARAM_MODULE._SpectralNorm)
    assert issubclass(ours_cls, parametrizations.SpectralNormParametrization)
    layers = []
    for cls in (ours_cls, torch_cls):
        torch.manual_seed(0)
        layer = nn.Conv2d(3, 4, 3)
        nn.utils.parametrize.register_parametrization(layer, "weight", cls(layer.weight, n_power_iterations=2))
        layers.append(layer)
    ours, ref = layers
    assert ours.parametrizations.weight[0].bound == 0.5
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in layers]
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        outs = []
        for m, opt in zip(layers, opts):
            opt.zero_grad()
            y = m(x)
            y.square().sum().backward()
            opt.step()
            outs.append(y.detach())
        torch.testing.assert_close(outs[0], outs[1])
        for buf in ("_u", "_v"):
            torch.testing.assert_close(getattr(ours.parametrizations.weight[0], buf),
                                       getattr(ref.parametrizations.weight[0], buf))


@pytest.mark.parametrize("make_layer, dim", [(lambda: nn.Conv2d(3, 4, 2), 0), (lambda: nn.ConvTranspose2d(4, 3, 2), 1),
                                             (lambda: nn.Linear(4, 5), 0)], ids=["conv", "conv_transpose", "linear"])
def test_power_method_and_reshape_match_pytorch(make_layer, dim):
    """Our parametrization modules have PyTorch's _reshape_weight_to_matrix and _power_method:
    same matrix, u and v updated in place ("uv" order, eps) to PyTorch's values."""
    mods = []
    for make in (nn.utils.parametrizations.spectral_norm, parametrizations.spectral_norm):
        torch.manual_seed(0)
        layer = make(make_layer(), dim=dim)
        mods.append(layer.parametrizations.weight[0])
    ref, ours = mods
    assert not isinstance(ref, parametrizations.SpectralNormParametrization)
    weight = torch.randn_like(layer.weight)
    mat = ours._reshape_weight_to_matrix(weight)
    torch.testing.assert_close(mat, ref._reshape_weight_to_matrix(weight), rtol=0, atol=0)
    u, v = ours._u, ours._v
    with torch.no_grad():  # the same start (the 15 initial iterations agree only to rounding)
        u.copy_(ref._u)
        v.copy_(ref._v)
    versions = (u._version, v._version)
    for m in mods:
        m._power_method(mat, 3)
    assert ours._u is u and ours._v is v and (u._version, v._version) > versions  # in place
    torch.testing.assert_close(ours._u, ref._u, rtol=0, atol=0)
    torch.testing.assert_close(ours._v, ref._v, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        ours._reshape_weight_to_matrix(torch.randn(3))


def test_bound_is_settable_without_changing_ours():
    """``bound`` reads our divisor ("estimate" / "upper"), and a subclass may store its own value in it."""
    layer = parametrizations.spectral_norm(nn.Linear(3, 4), bound="upper")
    state = layer.parametrizations.weight[0]
    assert state.bound == "upper"
    before = layer.weight.detach().clone()
    state.bound = 0.5
    assert state.bound == 0.5 and state.certifier is not None
    torch.testing.assert_close(layer.eval().weight, before)
    assert parametrizations.spectral_norm(nn.Linear(3, 4)).parametrizations.weight[0].bound == "estimate"
