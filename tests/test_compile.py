"""torch.compile: the route a compiled call takes, and
compiled runs of both APIs matching eager ones (outputs, u, v, gradients; train and eval) without
graph breaks or recompiles."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_close, sample_inputs
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import sn_kernels
from sn_kernels import dispatch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles the same front-end code for a new model: start from an empty
    cache so the recompile limit counts this test only."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    sn_kernels.set_backend("auto")


# the Triton interpreter is not compilable; triton is checked on the GPU (benchmarks/gpu_check.py)
COMPILED_BACKENDS = ["auto"] + [b for b in sn_kernels.available_backends("cpu") if b != "triton"]


class _Graphs:
    """A dynamo backend that records the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def sn_ops(self) -> set[str]:
        return {str(n.target).removesuffix(".default") for g in self.graphs for n in g.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("sn_kernels.")}


NATIVE_ON_CPU = "native" in sn_kernels.available_backends("cpu")


@pytest.mark.parametrize("backend, expected", [
    ("auto", {"sn_kernels.native_power_iteration", "sn_kernels.native_normalize_layout"} if NATIVE_ON_CPU
     else set()),
    ("torch", set()),
    ("native", {"sn_kernels.native_power_iteration", "sn_kernels.native_normalize"})])
def test_compile_route(backend, expected):
    """On the CPU "auto" compiles to the native power-iteration op and the W / sigma op that
    writes the layout inductor wants (the torch formulation alone without the native extension);
    "torch" compiles to torch ops only; an explicit "native" keeps both its contract ops.  The
    first resolution of the backend can happen inside the trace."""
    if backend not in sn_kernels.available_backends("cpu") + ["auto"]:
        pytest.skip(f"{backend} unavailable")
    w, u, v = sample_inputs("cpu", torch.float32, (6, 4, 3, 3), 0)
    w.requires_grad_()
    graphs = _Graphs()
    dispatch._reset_cache()  # as in a fresh process: nothing resolved before the trace

    @torch.compile(fullgraph=True, backend=graphs)
    def f(w, u, v):
        return sn_kernels.spectral_normalize(w, u, v, order="uv", backend=backend)[0]

    f(w, u, v)
    assert len(graphs.graphs) == 1
    assert graphs.sn_ops() == expected


@pytest.mark.skipif(not NATIVE_ON_CPU, reason="the native extension is not built")
def test_compiled_auto_iterates_as_eager_bit_for_bit():
    """On the CPU "auto" compiles to the native power-iteration op, the kernel eager runs too, so
    after training steps under inductor u and v are bit-identical to an eager run's (the torch
    formulation, ``backend="torch"``, sums in inductor's order and is not)."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.LeakyReLU(0.1), nn.Conv2d(16, 8, 3), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 1))
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                sn_kernels.parametrizations.spectral_norm(layer)
        return model

    sn_kernels.set_backend("auto")
    eager, compiled = make(), make()
    start = {k: t.clone() for k, t in eager.state_dict().items()}
    run = torch.compile(compiled, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        eager(x).sum().backward()
        run(x).sum().backward()
    a, b = eager.state_dict(), compiled.state_dict()
    vectors = [k for k in a if k.endswith(("_u", "_v"))]
    assert len(vectors) == 6
    for k in vectors:
        if not k.startswith("4."):  # (the 1-output linear layer's u, v are fixed points from the start)
            assert not torch.equal(a[k], start[k]), k  # the steps did iterate
        assert torch.equal(a[k], b[k]), k


def _inductor_kernels(model, x) -> list[str]:
    """The C++ kernels inductor generates for a compiled forward and backward of ``model``."""
    from torch._inductor.utils import run_and_get_code

    def step():
        torch.compile(model, fullgraph=True)(x).sum().backward()

    _, code = run_and_get_code(step)
    return [name for c in code for name in re.findall(r"^(\w+) = async_compile\.cpp", c, re.M)]


# words of the kernel names inductor gives code that does spectral-norm work: W / sigma and its
# gradient traced (div, mul, sub), the power iteration (linalg_vector_norm, where, amin), layout copies
# of our ops' outputs or inputs (named after the op: native_normalize, native_backward)
SN_WORDS = {"div", "mul", "sub", "norm", "where", "amin", "native"}


@pytest.mark.skipif(not NATIVE_ON_CPU, reason="the native extension is not built")
@pytest.mark.parametrize("api, conv", [("parametrization", nn.Conv2d), ("hook", nn.Conv2d),
                                       ("parametrization", nn.Conv3d)], ids=["param-2d", "hook-2d", "param-3d"])
def test_compiled_auto_leaves_inductor_no_spectral_norm_code(api, conv):
    """Under inductor on the CPU "auto" generates no kernel for spectral norm: W / sigma comes
    channels-last, as inductor lays out a convolution's weight, and its gradient op reads the
    convolution's channels-last gradient, so neither needs a layout copy (compile time goes by the
    kernel count, benchmarks/NOTES.md C4).  The hook API's ``module.weight``, an output of the
    graph, is a second output of the op whose gradient the op's backward adds, so no ``add`` kernel
    per weight shape either (C5).  No kernel is named for spectral-norm work, and there are as many
    as without spectral norm, or one more: inductor ends a kernel at every opaque call, and an op's
    call may split one of the model's own (torch 2.15 splits the bias gradient's sum from a
    convolution backward's kernel).  The traced route ("torch") and the contract ops ("native":
    contiguous W / sigma, copied) do generate such kernels.  Conv3d: inductor lays out only 2-d
    convolutions channels-last, and the op writes a 5-d W / sigma contiguous, as inductor wants it."""
    dims, side = (2, 8) if conv is nn.Conv2d else (3, 6)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(conv(3, 16, 3), nn.LeakyReLU(0.1), conv(16, 16, 3), nn.LeakyReLU(0.1),
                             conv(16, 8, 1), nn.Flatten(), nn.Linear(8 * (side - 4) ** dims, 1))

    def kernels(backend=None):
        m = model()
        if backend is not None:
            sn_kernels.set_backend(backend)
            sn_kernels.apply_spectral_norm(m, api=api)
        torch._dynamo.reset()
        return _inductor_kernels(m, torch.randn((2, 3) + (side,) * dims))

    def sn_work(names):
        return [k for k in names if SN_WORDS & set(k.split("_"))]

    plain, auto = kernels(), kernels("auto")
    assert sn_work(plain) == [] and sn_work(auto) == [], auto
    assert len(plain) <= len(auto) <= len(plain) + 1, (plain, auto)
    for other in ("torch", "native"):
        assert sn_work(kernels(other)), other


@pytest.mark.skipif(not NATIVE_ON_CPU, reason="the native extension is not built")
@pytest.mark.parametrize("shape,dim", [((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((13, 29), 0)], ids=str)
def test_compiled_auto_weight_sn_is_eager_bit_for_bit(shape, dim):
    """Under inductor on the CPU "auto"'s W / sigma (channels-last for a 4-d weight) holds the eager
    op's values bit for bit, and u, v too."""
    w, u, v = sample_inputs("cpu", torch.float32, shape, dim)
    f = torch.compile(lambda w, u, v: sn_kernels.spectral_normalize(w, u, v, dim=dim, order="uv")[0],
                      fullgraph=True)
    uc, vc, ue, ve = u.clone(), v.clone(), u.clone(), v.clone()
    compiled = f(w, uc, vc)
    eager = sn_kernels.spectral_normalize(w, ue, ve, dim=dim, order="uv")[0]
    assert compiled.is_contiguous(memory_format=torch.channels_last) == (w.dim() == 4)
    assert torch.equal(compiled, eager) and torch.equal(uc, ue) and torch.equal(vc, ve)


@pytest.mark.skipif(not NATIVE_ON_CPU, reason="the native extension is not built")
def test_compiled_hook_weight_outlives_the_forward_as_in_eager():
    """The hook API under compile: ``module.weight`` after the forward holds eager's W / sigma bit
    for bit (it is the op's second output, ``native_normalize_layout_twice``), and a loss that uses
    it after the forward (a weight penalty) sends its gradient to ``weight_orig`` as in eager, added
    to the forward's inside the op's backward."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(6 * 4 * 4, 1))
    sn_kernels.apply_spectral_norm(eager, api="hook")
    twin = copy.deepcopy(eager)
    graphs = _Graphs()
    compiled = torch.compile(twin, fullgraph=True, backend=graphs)
    x = torch.randn(2, 3, 6, 6)
    rtol, atol = TOL[torch.float32]
    for step in range(2):
        losses = []
        for model, run in ((eager, eager), (twin, compiled)):
            model.zero_grad(set_to_none=True)
            out = run(x).sum()
            penalty = sum((m.weight * m.weight).sum() for m in (model[0], model[3]))
            (out + 3 * penalty).backward()
            losses.append(out)
        torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=atol)
        for i in (0, 3):
            assert torch.equal(twin[i].weight, eager[i].weight), (step, i)
            torch.testing.assert_close(twin[i].weight_orig.grad, eager[i].weight_orig.grad, rtol=rtol,
                                       atol=10 * atol, msg=lambda m: f"step {step} layer {i}: {m}")
    assert "sn_kernels.native_normalize_layout_twice" in graphs.sn_ops()


def test_pinned_copy_is_not_recomputable():
    """The copies of u, v the traced power iteration starts from (``traced._pinned_copy``) rely on
    ``amin`` staying off the partitioner's recompute allowlist; a torch release that adds it must
    fail here, not give wrong gradients (the "mlp" model below shows the effect)."""
    from torch._functorch.partitioners import get_default_op_list

    assert torch.ops.aten.amin not in get_default_op_list().recomputable_ops
    u = torch.tensor([1.0, float("nan"), -float("inf"), -0.0])
    from sn_kernels.backends.traced import _pinned_copy

    a, b = _pinned_copy(u, u[:2])
    torch.testing.assert_close(a, u, equal_nan=True)
    assert a.data_ptr() != u.data_ptr() and torch.signbit(a[3])


def _disc():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.ConvTranspose2d(8, 4, 2), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 1))


def _mlp():
    """Small matrices (n = 3 first, m = 2 last): here AOTAutograd's partitioner would rather
    recompute the first matrix-vector product of the power iteration in the backward than save
    it, which reads u (hook API) or v (parametrization) after the forward updated them."""
    return nn.Sequential(nn.Linear(3, 16), nn.LeakyReLU(0.1), nn.Linear(16, 2))


MODELS = {"disc": (_disc, (2, 3, 8, 8)), "mlp": (_mlp, (5, 3))}


def _d_loss(model):
    """A discriminator loss that calls the model twice: u, v are updated twice in one graph."""
    def loss(real, fake):
        return F.relu(1 - model(real)).mean() + F.relu(1 + model(fake)).mean()
    return loss


def _compare_compiled(api, compiler, backend="auto", steps=3, model="disc", **sn_kwargs):
    """Train steps then an eval forward, eager and compiled from the same start: outputs, u, v,
    and gradients agree; the compiled function is traced once per mode (no recompiles)."""
    torch.manual_seed(0)
    sn_kernels.set_backend(backend)
    build, shape = MODELS[model]
    eager = build()
    sn_kernels.apply_spectral_norm(eager, api=api, **sn_kwargs)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(_d_loss(compiled_model), fullgraph=True, backend=counter)
    eager_loss = _d_loss(eager)
    rtol, atol = TOL[torch.float32]
    for step in range(steps):
        real, fake = torch.randn(shape), torch.randn(shape)
        for m in (eager, compiled_model):
            m.zero_grad(set_to_none=True)
        l1, l2 = eager_loss(real, fake), compiled(real, fake)
        torch.testing.assert_close(l2, l1, rtol=rtol, atol=atol)
        l1.backward()
        l2.backward()
        for (name, a), b in zip(compiled_model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {name}: {m}")
        # the compiled backward takes <G, W / sigma> where the kernels take <G, W> / sigma, and
        # G - c u v^T cancels: a few float32 roundings more (atol 1e-5 on gradients of order 1)
        for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=10 * atol,
                                       msg=lambda m: f"step {step} {name}.grad: {m}")
    eager.eval(), compiled_model.eval()
    real, fake = torch.randn(shape), torch.randn(shape)
    torch.testing.assert_close(compiled(real, fake), eager_loss(real, fake), rtol=rtol, atol=atol)
    assert counter.frame_count == 2  # one graph for training, one for eval


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_compile_fullgraph_matches_eager(api, backend):
    _compare_compiled(api, "aot_eager", backend)


@pytest.mark.parametrize("model", ["disc", "mlp"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_compile_inductor_matches_eager(api, model):
    """The real compiler on the default route (it builds C++ on the CPU: two steps only)."""
    _compare_compiled(api, "inductor", steps=2, model=model)


@pytest.mark.parametrize("kwargs", [dict(coeff=2.0), dict(coeff=0.5, soft=True), dict(gain=True)])
def test_compile_variants_match_eager(kwargs):
    _compare_compiled("parametrization", "aot_eager", steps=2, **kwargs)


@pytest.mark.parametrize("dtype,padding_mode", [(torch.float32, "zeros"), (torch.float64, "zeros"),
                                                (torch.float32, "circular"), (torch.float64, "reflect")], ids=str)
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_compiled_conv_mode_gradients(api, dtype, padding_mode):
    """mode="conv" compiled: the weight gradient is eager's (an autograd.Function whose forward held a
    no-op ``.to`` got a zero gradient under dynamo), over two steps, with the same u, v; with every padding
    mode (the adjoint of a circular or reflect pad was a ``torch.autograd.grad`` call, which dynamo refused)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), nn.LeakyReLU(0.1),
                          nn.Conv2d(3, 2, 3)).to(dtype)
    wrap = sn_kernels.spectral_norm if api == "hook" else sn_kernels.parametrizations.spectral_norm
    for layer in (eager[0], eager[2]):
        wrap(layer, mode="conv", input_size=(5, 5))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 2, 5, 5, dtype=dtype)
        for m in (eager, compiled_model):
            m.zero_grad(set_to_none=True)
        eager(x).square().sum().backward()
        compiled(x).square().sum().backward()
        for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
            assert b.grad.abs().max() > 0
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), b in zip(compiled_model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("order, dim, training", [("vu", 0, True), ("uv", 1, True), ("uv", 0, False)])
def test_compiled_op_matches_eager(dtype, order, dim, training):
    """The op itself, compiled (default route) against eager (native kernels where built):
    W / sigma, sigma, u, v and the weight gradient."""
    # eval: warmed-up u, v (random ones can make u.Wv tiny: W / sigma then amplifies bfloat16 rounding 100x)
    w, u, v = sample_inputs("cpu", dtype, (5, 6, 2, 2), dim, warmup=0 if training else 5, warmup_order="uv")
    grad = torch.randn_like(w)

    def run(fn):
        weight, uu, vv = w.clone().requires_grad_(), u.clone(), v.clone()
        out, sigma = fn(weight, uu, vv)
        out.backward(grad)
        return out.detach(), sigma, uu, vv, weight.grad

    def op(weight, uu, vv):
        out = sn_kernels.spectral_normalize(weight, uu, vv, dim=dim, order=order, training=training)
        return out[0], out[1]

    for name, a, b in zip(("W/sigma", "sigma", "u", "v", "grad"), run(torch.compile(op, fullgraph=True,
                                                                                   backend="aot_eager")), run(op)):
        assert_close(a, b, dtype, msg=name)


@pytest.mark.parametrize("bound", ["estimate", "upper"])
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_no_recompiles_across_train_eval_switches(api, bound):
    """Train and eval each compile once; switching back and forth afterwards reuses them.  With a certified
    bound too: the hook API's first compiled training forward had no stored W_ref (the parametrization's
    wrapping forward stores one), so the second recompiled on that alone."""
    model = _disc()
    sn_kernels.apply_spectral_norm(model, api=api, bound=bound)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 8, 8)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        compiled(x)
    assert counter.frame_count == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            model.train()
            compiled(x).sum().backward()
            model.eval()
            with torch.no_grad():
                compiled(x)
    assert counter.frame_count == 2


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_no_recompile_for_a_new_group_or_grouped_model(api):
    """A per-call group compiles once for every group of the model and every grouped instance of it, as an
    ungrouped model does: its forward hook was registered always-called, and dynamo guards on that hook's
    id, so each group() compiled anew (after 8, the model silently ran eagerly)."""
    def build():
        torch.manual_seed(0)
        return _disc() if api == "parametrization" else nn.Sequential(
            sn_kernels.spectral_norm(nn.Linear(12, 12)), nn.ReLU(), sn_kernels.spectral_norm(nn.Linear(12, 1)))

    if api == "parametrization":
        x = torch.randn(2, 3, 8, 8)
        model = build()
        sn_kernels.apply_spectral_norm(model)
    else:
        x = torch.randn(2, 12)
        model = build()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    group = sn_kernels.group(model)
    compiled(x).sum().backward()
    assert counter.frame_count == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            group.remove()
            group = sn_kernels.group(model)
            compiled(x).sum().backward()
    assert counter.frame_count == 1
    # and still always-called once attached to an optimizer ("step" mode needs it after a failed forward)
    group.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert group._post_handle.id in model._forward_hooks_always_called
