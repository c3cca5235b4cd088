"""sn_kernels.group on the "triton" backend: the multi-tensor kernels (group_kernels.py).

Every weight of a (device, dtype) group in a fixed number of launches: training 2k + 1 for k
power iterations, eval 2, backward 2, whatever the number and sizes of the weights.  The
reduction order differs from the per-weight kernels' (one tile shape for every weight), so the
numbers match the per-module triton path to the dtype's tolerance (helpers.TOL), not bit for bit;
two runs of the grouped path are bit-identical.  Under TRITON_INTERPRET=1 (conftest.py) on a
machine without a GPU.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import sn_kernels

from helpers import (TwiceD, assert_close, channels_last_group, model_grads as _grads, model_state as _state,
                     sample_inputs, weight_models)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


class _Count:
    """Counts the launches of the kernels modules' ``*_kernel`` functions (looked up at call time)."""

    def __init__(self):
        from sn_kernels.backends.triton import group_kernels, kernels
        self.modules = (kernels, group_kernels)
        self.names, self.saved = [], []

    def __enter__(self):
        for mod in self.modules:
            for name in [n for n in vars(mod) if n.endswith("_kernel")]:
                fn = getattr(mod, name)
                self.saved.append((mod, name, fn))
                count = self

                class Proxy:
                    def __getitem__(self, grid, fn=fn, name=name):
                        count.names.append(name)
                        return fn[grid]

                setattr(mod, name, Proxy())
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


# one item each; a weight of one row and one of one column; several column splits of the row pass
# (16 x 2100: 3 splits of 1024); several row splits of the column pass (520 x 40: 3 of 256); a 4-D
# convolution weight; dim=1 with rows before it (the general addressing); float64 (a group of its own)
SHAPES = [((4, 3), 0), ((1, 128), 0), ((7, 1), 0), ((16, 2100), 0), ((520, 40), 0), ((6, 4, 3, 3), 0),
          ((5, 7, 3), 1), ((33, 65), 0, torch.float64)]


def _models(api, iterations, shapes=SHAPES):
    return weight_models(api, iterations, shapes, DEV)


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("api", ["hook", "parametrization"])  # orders "vu" and "uv"
def test_triton_group_matches_per_module_in_fixed_launches(api, iterations):
    """W/sigma, u, v, sigma and the weight gradients as the per-module triton path, step after step,
    in training and eval; launches per group: 2k + 1 forward (2 in eval), 2 backward."""
    grouped, per_module = _models(api, iterations)
    sn_kernels.group(grouped)
    grads = [torch.randn(e[0], dtype=(e[2:] or (torch.float32,))[0], device=DEV) for e in SHAPES]
    with sn_kernels.use_backend("triton"):
        for training in (True, True, False):
            grouped.train(training), per_module.train(training)
            with _Count() as fwd:
                outs = grouped()
            with _Count() as bwd:
                torch.autograd.backward(outs, grads)
            refs = per_module()
            torch.autograd.backward(refs, grads)
            for a, b in zip(outs, refs):
                assert_close(a, b)
            groups = 2  # float32 and float64
            per_group = ["group_row_kernel", "group_col_kernel"] * iterations if training else ["group_eval_kernel"]
            assert sorted(fwd.names) == sorted((per_group + ["group_divide_kernel"]) * groups)
            assert sorted(bwd.names) == sorted(["group_dot_kernel", "group_grad_kernel"] * groups)
            for a, b in zip(_state(grouped) + _grads(grouped), _state(per_module) + _grads(per_module)):
                assert_close(a, b)


def test_triton_group_launches_do_not_grow_with_weights():
    """200 weights, and weights whose sizes differ by 10^4 x: still 3 launches forward, 2 backward
    (compared with the per-module torch backend: 1000 per-weight launches are slow in the interpreter)."""
    shapes = [((2 + k % 7, 3 + k % 5), 0) for k in range(200)] + [((3, 4), 0), ((200, 600), 0)]
    grouped, per_module = _models("parametrization", 1, shapes)
    sn_kernels.group(grouped)
    with sn_kernels.use_backend("triton"):
        with _Count() as fwd:
            outs = grouped()
        with _Count() as bwd:
            sum((o * o).sum() for o in outs).backward()
    with sn_kernels.use_backend("torch"):
        refs = per_module()
        sum((o * o).sum() for o in refs).backward()
    assert len(fwd.names) == 3 and len(bwd.names) == 2
    for a, b in zip(outs + _state(grouped) + _grads(grouped), refs + _state(per_module) + _grads(per_module)):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_group_half_types_accumulate_in_fp32(dtype):
    """float16/bfloat16 weights: sigma in float32, everything within the dtype's tolerance of the
    per-module path (which accumulates in float32 too) and of a float64 reference."""
    shapes = [((16, 2100), 0, dtype), ((6, 4, 3, 3), 0, dtype), ((9, 5), 0, dtype)]
    grouped, per_module = _models("parametrization", 1, shapes)
    reference = copy.deepcopy(per_module).double()
    sn_kernels.group(grouped)
    with sn_kernels.use_backend("triton"):
        outs = grouped()
        refs = per_module()
    with sn_kernels.use_backend("torch"):
        exact = reference()
    for a, b, c, m in zip(outs, refs, exact, grouped):
        assert a.dtype == dtype and m.parametrizations.weight[0].sigma.dtype == torch.float32
        assert_close(a, b)
        assert_close(a, c.to(dtype), scale=2.0)


def test_triton_group_is_deterministic_and_updates_buffers_in_place():
    results = []
    for _ in range(2):
        grouped, _ = _models("hook", 2)
        buffers = [b.data_ptr() for b in grouped.buffers()]
        sn_kernels.group(grouped)
        with sn_kernels.use_backend("triton"):
            outs = grouped()
            sum((o * o).sum() for o in outs).backward()
        assert [b.data_ptr() for b in grouped.buffers()] == buffers
        results.append(outs + _state(grouped) + _grads(grouped))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_triton_group_channels_last_and_refresh_per_step():
    """A channels_last convolution weight (copied to contiguous for the kernels) and the once-per-step
    refresh: two forwards share one iteration (3 launches), then the optimizer step refreshes."""
    model, ref, opt, x = channels_last_group(DEV)
    with sn_kernels.use_backend("triton"):
        with _Count() as c:
            y1 = model(x)
            y2 = model(x)
        assert len(c.names) == 3
        (y1.sum() + y2.sum()).backward()
        opt.step()
        with _Count() as c:
            model(x)
        assert len(c.names) == 3
        assert_close(y1, ref(x))


def _op_args(order="uv", large=True):
    """Weights for the ops (``large``: one with column splits, too many elements for gradcheck here)."""
    import sn_kernels.backends.triton  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    shapes, dims = [(5, 4, 3, 3), (3, 7), (6, 2, 2)] + [(16, 1100)] * large, [0, 1, 0] + [0] * large
    ws, us, vs = [], [], []
    for s, d in zip(shapes, dims):
        w = torch.randn(s, dtype=torch.float64, device=DEV)
        m = s[d]
        ws.append(w)
        us.append(nn.functional.normalize(torch.randn(m, dtype=torch.float64, device=DEV), dim=0))
        vs.append(nn.functional.normalize(torch.randn(w.numel() // m, dtype=torch.float64, device=DEV), dim=0))
    return ws, us, vs, dims


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_group_ops_functional_opcheck(training):
    """The ops a compiled grouped model takes: functional (stored u, v untouched; new u, v equal to what
    the in-place eager kernels leave in the buffers), flat outputs that alias nothing; opcheck's schema,
    fake and AOT-dispatch tests pass for both."""
    ws, us, vs, dims = _op_args()
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    flat, sigmas, uvs = torch.ops.sn_kernels.triton_group_forward(ws, us, vs, dims, 2, 1e-12, "uv", training)
    assert all(torch.equal(a, b) for a, b in zip(us + vs, u0 + v0))
    from sn_kernels.backends.triton import group_host
    outs, sig_list, us_used, _ = group_host.group_forward(ws, us, vs, dims, 2, 1e-12, "uv", training)
    assert torch.equal(flat, torch.cat([o.reshape(-1) for o in outs])) and torch.equal(sigmas, torch.stack(sig_list))
    assert torch.equal(uvs, torch.cat([t for pair in zip(us, vs) for t in pair]))  # the buffers, iterated in place
    torch.library.opcheck(torch.ops.sn_kernels.triton_group_forward, (ws, u0, v0, dims, 2, 1e-12, "uv", training))
    grad = torch.randn_like(flat)
    torch.library.opcheck(torch.ops.sn_kernels.triton_group_backward, (grad, ws, uvs, sigmas, dims))


@pytest.mark.parametrize("order", ["uv", "vu"])
def test_triton_group_autograd_formula_gradcheck(order):
    """The formula registered on triton_group_forward (one triton_group_backward for every weight) is the
    derivative of W / sigma(W) with u, v held constant: exact in eval (sigma = u . W v); float64 gradcheck."""
    ws, us, vs, dims = _op_args(order, large=False)
    ws = [w.requires_grad_(True) for w in ws]

    def f(*weights):
        return torch.ops.sn_kernels.triton_group_forward(list(weights), us, vs, dims, 1, 1e-12, order, False)[0]

    # fast mode (random projections): each full Jacobian column costs two launches in the interpreter
    assert torch.autograd.gradcheck(f, tuple(ws), fast_mode=True)
    flat, sigmas, uvs = torch.ops.sn_kernels.triton_group_forward(ws, us, vs, dims, 1, 1e-12, order, True)
    assert flat.requires_grad and not sigmas.requires_grad and not uvs.requires_grad


@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_compiled_triton_group_takes_one_grouped_op(api):
    """Compiled (fullgraph, aot_eager), a grouped model on the triton backend normalizes every weight in
    ONE triton_group_forward per graph; outputs, u, v and gradients as the per-module eager model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwiceD(api).to(DEV)
    reference = copy.deepcopy(model)
    sn_kernels.group(model)
    ops = []

    def recorder(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                   and str(n.target).startswith("sn_kernels."))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    with sn_kernels.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True, backend=recorder)
        for _ in range(2):
            x = torch.randn(2, 3, 6, 6, device=DEV)
            y, r = compiled(x), reference(x)
            assert_close(y, r)
            y.sum().backward()
            r.sum().backward()
        for a, b in zip(_state(model) + _grads(model), _state(reference) + _grads(reference)):
            assert_close(a, b)
    assert ops.count("sn_kernels.triton_group_forward") == 1, ops


def test_triton_group_refuses_a_bad_vector_with_the_per_call_message():
    """The group checks its weights' vectors before any launch (a wrong length would read out of
    bounds), with the message of a per-module call."""
    grouped, _ = _models("parametrization", 1, [((4, 3), 0), ((5, 2), 0)])
    sn_kernels.group(grouped)
    grouped[1].parametrizations.weight[0]._buffers["_u"] = torch.randn(3, device=DEV)
    with sn_kernels.use_backend("triton"), pytest.raises(ValueError, match=r"u must have shape \(5,\)"):
        grouped()


def _plan_tables_alive(make, rounds=2):
    """How many of the device tables ``make(plan)`` returned for more geometries than ``group_plan``
    keeps (cycled ``rounds`` times: each plan is rebuilt after its eviction) are still alive."""
    import gc
    import weakref

    from sn_kernels.backends.triton import group_host as gh

    made = []
    for _ in range(rounds):
        for i in range(gh.group_plan.cache_info().maxsize + 40):
            tabs = make(gh.group_plan(((4, 1000 + i, 1000 + i),)))
            made.append(weakref.ref(tabs[0]))
    del tabs
    gc.collect()
    return sum(r() is not None for r in made)


def test_triton_group_plan_tables_live_with_their_plan():
    """A plan's device tables are kept on the plan: freed when ``group_plan``'s cache drops it, so a
    backward whose set of weights varies step by step (stochastic depth) does not grow them forever
    (they were kept in a process-wide dict by plan, never pruned).  Host-side only: no launch."""
    from sn_kernels.backends.triton import group_host as gh

    assert _plan_tables_alive(lambda plan: gh._tables(plan, DEV)) <= gh.group_plan.cache_info().maxsize


def test_triton_group_plan_tables_of_a_capture_are_kept(monkeypatch):
    """The tables a CUDA graph capture read stay alive after their plan is dropped: the graph's replays
    read them (simulated on the host: the capture flag forced)."""
    from sn_kernels.backends.triton import group_host as gh

    monkeypatch.setattr(gh, "_pinned_forever", {})

    def captured(plan):
        tabs = gh._tables(plan, DEV)  # eager first, as a capture needs (the tables exist)
        monkeypatch.setattr(gh, "_capturing", lambda device: True)
        try:
            assert gh._tables(plan, DEV) is tabs
        finally:
            monkeypatch.setattr(gh, "_capturing", lambda device: False)
        return tabs

    alive = _plan_tables_alive(captured, rounds=1)
    assert alive == gh.group_plan.cache_info().maxsize + 40
    monkeypatch.setattr(gh, "_capturing", lambda device: True)
    assert gh._tables(gh.group_plan(((4, 2, 2), (3, 5, 5))), DEV) is None  # none copied during a capture


def _group_inputs(specs, dtype, scale=1.0):
    """(weights, us, vs, grads, dims) on DEV for ``specs`` = ((shape, dim), ...), weights times ``scale``."""
    drawn = [sample_inputs(DEV, dtype, shape, dim, seed=k, grad=True) for k, (shape, dim) in enumerate(specs)]
    ws, us, vs, gs = (list(t) for t in zip(*drawn))
    return [w * scale for w in ws], us, vs, gs, [dim for _, dim in specs]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _check_group_against_per_weight(specs, dtype, scale, n, eps, order, training):
    """group_forward/group_backward (in place, lists) and the functional grouped ops (flat) against the
    torch backend's per-weight ops with the same arguments: W/sigma, sigma, u, v (used and stored), grad_W."""
    from sn_kernels import dispatch

    tri, ref = dispatch.resolve(DEV, "triton"), dispatch.resolve(DEV, "torch")
    ws, us, vs, gs, dims = _group_inputs(specs, dtype, scale)
    flat, sig_flat, uvs = torch.ops.sn_kernels.triton_group_forward(ws, us, vs, dims, n, eps, order, training)
    grad_flat = torch.ops.sn_kernels.triton_group_backward(_flat(gs), ws, uvs, sig_flat, dims)
    u_in, v_in = [u.clone() for u in us], [v.clone() for v in vs]
    outs, sigmas, us_used, vs_used = tri.group_forward(ws, us, vs, dims, n, eps, order, training)
    grads = tri.group_backward(gs, ws, us_used, vs_used, sigmas, dims)
    assert torch.equal(flat, _flat(outs)) and torch.equal(sig_flat, torch.stack(sigmas))
    assert torch.equal(uvs, _flat([t for pair in zip(us_used, vs_used) for t in pair]))
    assert_close(grad_flat, _flat(grads))
    for k, (w, g, dim) in enumerate(zip(ws, gs, dims)):
        u, v = u_in[k].clone(), v_in[k].clone()
        sigma, u_used, v_used = ref.power_iteration(w, u, v, n, eps, dim, order, training)
        expected = (ref.normalize(w, u_used, v_used, sigma, dim), sigma, u_used, v_used, u, v,
                    ref.backward(g, w, u_used, v_used, sigma, dim))
        for a, b, scale in zip((outs[k], sigmas[k], us_used[k], vs_used[k], us[k], vs[k], grads[k]), expected,
                               (1,) * 6 + (4,)):
            assert_close(a, b, scale=scale, msg=f"weight {k}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_group_takes_a_negative_dim(training):
    """The grouped kernels and ops take dim < 0 as dim + ndim, as the per-weight ops of the torch
    backend do (dims -1, -2, -ndim of 2-D and 4-D weights): a dim of -1 addressed the whole weight
    as one block (the matrix view's B was its numel)."""
    specs = [((4, 6, 3, 3), -1), ((4, 6, 3, 3), -2), ((4, 6, 3, 3), -4), ((5, 7), -1), ((5, 7), -2)]
    _check_group_against_per_weight(specs, torch.float32, 1.0, 2, 1e-12, "vu", training)


@pytest.mark.parametrize("order", ["vu", "uv"])
def test_triton_group_float64_eps_in_float64(order):
    """eps reaches the grouped kernels in float64 for float64 weights: with |W^T u|, |W v| below eps
    (eps decides every step) the group matches the torch backend to float64's tolerance (eps reached
    them as fp32: about 1e-7 off)."""
    specs = [((5, 7), 0), ((4, 6, 3, 3), 1)]
    _check_group_against_per_weight(specs, torch.float64, 1e-4, 2, 1e-2, order, True)


def test_triton_group_refuses_a_weight_whose_workspace_offsets_wrap_int32():
    """The mat-vec kernels form the workspace offset 2 M in int32 (group_kernels.py): a (2^30, 1) weight
    has numel within int32 but 2 M wraps (the column pass wrote 8 GiB before its workspace), so ``_fits``
    refuses it and the weight takes the per-weight kernels.  Meta tensors: no memory."""
    from sn_kernels.backends.triton import group_host as gh

    def fits(m, n):
        meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
        return gh._fits([meta(m, n)], [meta(m), meta(n)])

    assert fits(2**29, 2) and fits(2, 2**29)
    assert not fits(2**30, 1)
    assert not fits(1, 2**30)  # safe (N is not doubled), refused too: _fits bounds every vector alike


def test_triton_group_capture_reads_tables_warmed_up_on_another_stream(monkeypatch):
    """torch.cuda.graph captures on a stream of its own, after a warm-up on a side stream (PyTorch's
    recipe, make_graphed_callables): the capture finds the tables the warm-up built and runs the
    multi-tensor kernels (it missed them, keyed by the current stream, and ran the per-weight ones).
    Simulated on the host: the current stream and the capture flag forced; the capture's own launches
    are not run (a capture only records them)."""
    from sn_kernels.backends.triton import group_host as gh, host

    stream = {"id": 1}
    monkeypatch.setattr(host, "_stream_key", lambda device: (device.type, device.index, stream["id"]))
    monkeypatch.setattr(gh, "_pinned_forever", {})
    ws, us, vs, _, dims = _group_inputs([((8, 6), 0), ((5, 4), 0)], torch.float32)
    plan = gh.group_plan(gh._geometries(ws, dims))
    warm = gh._tables(plan, DEV), gh._addresses(ws, DEV)  # the warm-up, on side stream 1
    stream["id"] = 2  # the capture stream
    monkeypatch.setattr(gh, "_capturing", lambda device: True)
    assert gh._tables(plan, DEV) is warm[0] and gh._addresses(ws, DEV) is warm[1]
    pinned = list(gh._pinned_forever.values())
    assert any(t is warm[0] for t in pinned) and any(t is warm[1] for t in pinned)
    for _ in range(3):  # each captured call pins its tables once, not once per call
        gh._tables(plan, DEV), gh._addresses(ws, DEV)
    assert len(gh._pinned_forever) == 2
    other = torch.device("meta")  # a table of another device is never taken
    assert gh._tables(plan, other) is None
    monkeypatch.setattr(gh, "_capturing", lambda device: False)
    assert gh._tables(plan, DEV) is not warm[0]  # eager on stream 2: a copy of its own
