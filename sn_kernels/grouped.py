"""Grouped spectral norm: every SN weight of a model normalized together, up front.

``sn_kernels.group(model)`` computes the normalized weight of every sn_kernels
spectral norm inside ``model`` (both APIs, matrix mode) in one go, and each layer
then uses its pre-computed weight instead of computing its own.  Two refresh
policies:

``group(model)`` (per call)
    At every call of ``model``: one power iteration per layer, the same u, v, sigma,
    outputs and gradients as without grouping (bit-identical on the native and torch
    backends: the same kernels run in the same order; one exception: a Parameter tied between two
    grouped layers of one group, whose gradient differs in the last bits, about 1e-7 relative, as the
    group's node sums both layers' contributions before autograd adds the rest).  All the weights of one
    (device, dtype) share ONE autograd node, whose backward computes every weight
    gradient (weights with different order, n_power_iterations, eps or train/eval
    mode form separate groups).  On the native backend the forward of a group is one
    C++ call (``native_group_normalize_eager``: ``native_group_forward``, the buffers' update
    and the group's autograd node, all in C++) and its backward another
    (``native_group_backward``): on the CPU, float32 weights run as a few parallel phases over
    one table of (weight, chunk) work items (``csrc/sn_kernels_grouped_cpu.cpp``; its working memory is
    kept per calling thread between calls), so weights of
    very different sizes share the threads, and contiguous CUDA weights run the multi-tensor CUDA
    kernels (``csrc/sn_kernels_grouped_cuda.cu``: 2k + 1 launches forward, 2 backward, bit-identical
    to the per-weight kernels); the ops are functional (the iterated u, v come back
    and are copied into the buffers by one ``torch._foreach_copy_``), with fake implementations,
    so they trace under torch.compile.  On the triton backend a group is 2k + 1 launches forward
    (k power iterations; 2 in eval) and 2 backward, whatever the number of weights
    (``backends/triton/group_kernels.py``: the same numbers as per module to fp32 rounding, as the
    tiles differ).  A backend without multi-tensor kernels (``Backend.group_forward``: "torch")
    loops over the weights in Python.  The
    differences from per-module semantics: a layer that the model
    does not call in some forward still had its power iteration run (and, compiled, its weight
    gets a zero gradient where eager leaves ``.grad`` None: the grouped op's backward receives
    zeros for the unused W/sigma; an optimizer with weight decay then moves that weight); and so
    did a layer that the model's forward switches to eval before calling it (the group iterated in
    the mode of the call's start; the layer then refuses that W/sigma, made for another mode, and
    computes its eval W/sigma from the advanced u, v).  So, too, does a layer called with grad mode on
    in a model call that began under ``no_grad`` (the forward turned it on: the group's W/sigma has no graph,
    and the layer computes its own, with one, from the advanced u, v), and a layer whose weight is changed
    in place during the model call, after the group computed (a pre-hook of the layer or of the model
    clamping it): that layer computes its own W/sigma from the advanced u, v, and a backward through the
    group's node then fails with autograd's in-place error, since the node saved the weight as it was.
    Change weights before calling the model.  A write through ``.data`` during the call moves no version
    counter and is not seen: the layer takes the W/sigma of the weight as it was at the call's start.  A
    layer called twice in one model call computes normally the second time (a second power iteration, as
    PyTorch), and so does the second access of a parametrized weight.  Under
    ``torch.nn.utils.parametrize.cached()`` the parametrized weights are left to their layers, through
    PyTorch's cache: one power iteration per context, as per module and in PyTorch.

``group(model, optimizer=opt)`` (once per optimizer step)
    W/sigma is computed once after each ``opt.step()`` (at the first use of any
    grouped layer) and shared by every forward until the next step: D(real), D(fake)
    and a gradient penalty in one GAN step share one power iteration, one W/sigma
    and one autograd node, into which the gradients of all those forwards flow (the
    node keeps what it needs until the next refresh, so several ``backward()`` calls
    through it work).  Only the weights that can share the node are cached; layers computed
    alone (see below) compute at every call as usual.  How this differs from PyTorch, which iterates at every
    forward: k forwards per optimizer step run 1 power iteration instead of k, and
    every forward of a step sees the same u, v, sigma (PyTorch's second forward sees
    u, v advanced by the first).  sigma still tracks the top singular value: each step
    moves W a little and one iteration per step follows it (tested against the SVD:
    ``tests/test_grouped.py::test_refresh_sigma_tracks_svd``).  The cache is also
    refreshed when a grouped weight is changed in place other than through the
    optimizer (its version counter moved: ``load_state_dict``, ``copy_``; not writes
    through ``.data``), when a layer's train/eval mode changed, or when the grad mode or a
    weight's ``requires_grad`` changed (a W/sigma without a graph cannot serve a forward that
    needs one: that costs one more power iteration in the step), and after any other optimizer's
    step over a grouped weight (a ``fused=True`` step moves no version counter: PyTorch's global
    step post-hook, registered at the first ``attach``, catches it); a grouped layer called alone (not
    through the model) checks that for its own weight, u and v.  A layer called
    twice in one model call uses the shared W/sigma both times.  The optimizer step and
    ``model.load_state_dict`` drop the cache (its node keeps every grouped weight, which PyTorch's
    parameter swap, ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses to replace),
    and a hook-API layer's ``module.weight`` taken from it is detached then.  Not ``.to()``/``.double()``:
    with that flag, a model moved after a forward with grad and before the step is refused (call
    ``find_group(model).detach()`` first, or move it after the step).  Under ``torch.compile`` and
    ``torch.jit.trace`` no cached W/sigma is used: each layer computes its own, so a traced model
    reads its weights and u, v (a cached W/sigma would be recorded as a constant).

Not grouped (computed per layer as usual): ``mode="conv"`` layers, PyTorch's own
spectral norm (call ``sn_kernels.convert`` first), stacked parametrizations, a spectral norm
shared by several modules (one parametrization registered on two, as
``parametrize.transfer_parametrizations_and_params`` does: each access iterates its u, v, as in
PyTorch) and a hook-API layer whose ``weight_orig`` carries a parametrization of its own.
Computed one at a time inside the group (same numbers, no shared node): weights
with ``coeff``, ``soft``, ``gain`` or a certified ``bound``, complex weights and 1-D parametrized weights.

A layer whose spectral norm is removed, stacked on or re-added after grouping leaves the group (with its
layer hook) and computes its own, and so does a layer replaced or deleted in the model once it is freed.
A replaced or deleted layer still referenced elsewhere stays in the group (its u, v iterated by this
model's calls, its layer served the group's W/sigma) until some grouped layer is freed (the model is then
walked once) or the group is remade (``find_group(model).remove()``, ``group(model)``): the model is not
walked at every call to notice it.

A grouped model copies and saves like any model: the group is plain data stored in
the model's hook dicts (module references, names), so ``copy.deepcopy(model)`` gives
an independent grouped copy and ``torch.save(model)``/``torch.load`` a grouped model.
A copy is not attached to any optimizer, so it refreshes per call (exact per-module
semantics; safe for an EMA copy updated through ``.data``) until ``attach(opt)``.
``sn_kernels.grouped.find_group(copy)`` returns its handle.
"""
from __future__ import annotations

import collections
import copy
import threading
import weakref

import torch
import torch.optim.optimizer as optimizer_module
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import dispatch, hooks, parametrizations, transforms
from .backends import native, pytorch
from .backends.contract import dense
from .checks import call_iterations, check_call, check_group
from .find import walk
from .meta import guards_of
from .nn import check_model

REFRESH = ("call", "step")


def _gone() -> None:
    """The weak reference to an object already freed when its holder was copied."""
    return None


def _weak(obj):
    """A weak reference to ``obj`` (``_gone`` for None): the group's references back to its model."""
    return _gone if obj is None else weakref.ref(obj)


class _Member:
    """One grouped weight: plain data (module reference, parameter name, its SN state, its qualified name
    in the grouped model).  The module is held weakly: it holds the group (its hooks), and a strong
    reference back would be a cycle.  ``stamp``: what its latest W/sigma was computed from (``stamp_now``;
    not copied)."""

    __slots__ = ("kind", "_module", "name", "state", "path", "stamp", "__weakref__")

    def __init__(self, kind: str, module: nn.Module, name: str, state, path: str | None = None) -> None:
        self.kind, self._module, self.name, self.state = kind, weakref.ref(module), name, state
        self.path, self.stamp = path, None

    @property
    def module(self) -> nn.Module | None:
        """The grouped module (None once it is freed)."""
        return self._module()

    def __getstate__(self):  # the module itself: a copy refers to the module's copy
        return (self.kind, self.module, self.name, self.state, self.path)

    def __setstate__(self, s) -> None:
        self.kind, module, self.name, self.state, *path = s  # no path: pickled before it was kept
        self._module = _weak(module)
        self.path, self.stamp = (path or [None])[0], None

    @property
    def label(self) -> str:
        """How an error names this weight: its qualified name in the grouped model."""
        return self.path or f"{type(self.module).__name__}.{self.name}"

    def live(self) -> bool:
        """Whether the module still exists and its spectral norm is still on it (not removed since grouping)."""
        module = self.module
        if module is None:  # replaced or deleted in the model, then freed
            return False
        if self.kind == "hook":
            return any(h is self.state for h in module._forward_pre_hooks.values())
        plists = module._modules.get("parametrizations")
        plist = plists._modules.get(self.name) if plists is not None else None
        # through _modules: ModuleList's len() and [0] cost more than the test (it runs every call)
        return plist is not None and len(plist._modules) == 1 and plist._modules.get("0") is self.state

    def training(self) -> bool:
        return self.module.training if self.kind == "hook" else self.state.training

    def sources(self):
        """(weight, u, v, order) of this spectral norm (u, v None for a 1-D parametrized weight), or None
        when the layer reads them through a parametrization of its own (``register_parametrization`` on
        the hook API's ``weight_orig``): then the layer computes its W/sigma itself, as per module."""
        if self.kind == "hook":
            p, b = self.module._parameters, self.module._buffers
            w, u, v = p.get(self.name + "_orig"), b.get(self.name + "_u"), b.get(self.name + "_v")
            return None if w is None or u is None or v is None else (w, u, v, "vu")
        plist = self.module._modules["parametrizations"]._modules[self.name]
        w = plist._parameters.get("original")
        if w is None:  # a parametrized buffer
            w = plist.original
        b = self.state._buffers
        return w, b.get("_u"), b.get("_v"), "uv"

    def tensors(self):
        """(weight, u, v, order) when this weight can join the group's shared node, else None."""
        st = self.state
        if st.coeff is not None or st.soft or st.certifier is not None or (st.gain if self.kind == "hook" else
                                                                            st.gain is not None):
            return None
        if call_iterations(st.n_power_iterations, True)[1] is False:
            return None  # an iteration count set to 0 after wrapping: the layer's own eval computation
        t = self.sources()
        if t is None:
            return None
        w = t[0]
        if (w.ndim < 2 and self.kind == "param") or w.is_complex() or w.numel() == 0:
            return None  # a 1-D parametrized weight is normalized by its length (no u, v)
        return t

    def stamp_now(self, w: Tensor, u: Tensor | None, training: bool, w_sn: Tensor) -> None:
        """Record what ``w_sn``, a W/sigma just computed from ``w``, ``u``, is valid for: their versions (after
        the iteration), the mode, and whether it has a graph.  Held with the W/sigma, whose graph keeps ``w``
        anyway."""
        self.stamp = (w, w._version, u, None if u is None else u._version, training, w_sn.requires_grad)

    def pending_holds(self) -> bool:
        """Whether a pending W/sigma of this layer may still be used: its stamp holds, and no torch.func
        transform runs (which must see the layer's own ops).  The layer's spectral norm calls it."""
        return self.stamp_holds() and not transforms.active(self.stamp[0])

    def stamp_holds(self) -> bool:
        """Whether the weight, u and mode are still those of the latest W/sigma, and it has a graph if this
        call needs one: a pending one is stale otherwise (an interrupted model call left it, then they
        changed; or the model was called under no_grad and its forward turned grad mode on).  A few
        attribute reads: it runs at every layer call."""
        s = self.stamp
        return s is not None and s[0]._version == s[1] and (s[2] is None or s[2]._version == s[3]) \
            and self.training() == s[4] and (s[5] or not (s[0].requires_grad and torch.is_grad_enabled()))

    def check(self) -> None:
        """``check_call`` of this weight's arguments (raises what the layer alone would)."""
        t = self.sources()
        if t is None:
            return  # the layer computes its own, and checks it then
        w, u, v, order = t
        if self.kind == "hook" and w.is_complex():  # made complex after wrapping (``.to``): refused as per module
            raise hooks.complex_refusal(w)
        if u is not None and v is not None:
            st = self.state
            check_call(w, u, v, call_iterations(st.n_power_iterations, True)[0], st.eps, st.dim, order, empty_ok=True)

    def key(self) -> tuple:
        """What a cached W/sigma of this weight depends on besides the optimizer and the grad mode: its mode,
        and its weight, u and v themselves (which tensors, their memory, dtype and version:
        ``load_state_dict(assign=True)``, ``.to(dtype)`` or a new Parameter replace them with tensors whose
        versions may equal the old ones)."""
        return (self.training(),) + tuple((id(t), t.data_ptr(), t.dtype, t.device, t._version, t.requires_grad)
                                          for t in (self.tensors() or ())[:3])

    def refused_by_meta_guard(self) -> bool:
        """Whether a meta guard of the module (sn_kernels/meta.py) refuses its forward: u, v hold
        uninitialised memory, which the group must not read either."""
        return any(guard.refuses(self.module) for guard in guards_of(self.module))

    def has_meta_guard(self) -> bool:
        return bool(guards_of(self.module))

    def compute_alone(self) -> Tensor:
        """The layer's own computation (variants, complex, 1-D): same numbers as without grouping."""
        if self.kind == "hook":
            return self.state.compute_weight(self.module, do_power_iteration=self.module.training)
        return self.state.compute(self.module.parametrizations[self.name].original)

    def set_sigma(self, sigma: Tensor) -> None:
        if self.kind == "hook":
            self.state.sigma = sigma
        else:
            self.state.__dict__["sigma"] = sigma


class _Shared:
    """What the group's backward needs for one group of weights.  In "step" mode (``shared``) it is kept
    on the node, not as saved tensors, so that every forward sharing the node can backward through it;
    per call the tensors go to ``save_for_backward`` like any node's (activation checkpointing then
    swaps in a recomputed forward's)."""

    __slots__ = ("weights", "versions", "us", "vs", "sigmas", "dims", "backend", "outputs", "fused", "shared")
    # ``outputs`` only until the node is built (_GroupNormalize.forward drops it)


class _GroupNormalize(torch.autograd.Function):
    """W_i / sigma_i for every weight of one group: ONE autograd node, whose backward computes all
    the weight gradients (grad_W = (G - <G, W_sn> u v^T) / sigma), for a backend without its own
    node (``Backend.group_eager``; the native backend's is in C++, csrc/sn_kernels_autograd.cpp).  The
    node keeps the weights, u, v and sigma it needs (``_Shared``), never its outputs (a cycle output ->
    node -> output would never be freed)."""

    @staticmethod
    def forward(ctx, shared: _Shared, *weights):
        ctx.set_materialize_grads(False)
        ctx.shared = shared
        # the node must not reference its outputs: output -> grad_fn -> ctx -> shared -> output is a
        # cycle that no collector frees (every W/sigma would leak, each call's outputs fresh memory)
        outputs, shared.outputs = shared.outputs, None
        if not shared.shared:  # per call: saved tensors (checkpointing recomputes them), checked by autograd
            ctx.save_for_backward(*shared.weights, *shared.us, *shared.vs, *shared.sigmas)
            shared.weights = shared.us = shared.vs = shared.sigmas = None
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        sh = ctx.shared
        if not sh.shared:
            k = len(grads)
            saved = ctx.saved_tensors
            sh = copy.copy(sh)  # this backward's view; the node's own stays empty
            sh.weights, sh.us, sh.vs, sh.sigmas = (list(saved[j * k:(j + 1) * k]) for j in range(4))
        grads = [dense(g) for g in grads]
        todo = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[i + 1]]
        for i in todo:
            w = sh.weights[i]
            if sh.shared and w._version != sh.versions[i]:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a grouped spectral-norm weight of shape {tuple(w.shape)} changed after its "
                    "W/sigma was computed (sn_kernels.group)")
        out = [None] * (len(grads) + 1)
        # gradients batched by vmap (is_grads_batched=True) take the per-weight route: the grouped op has no
        # batching rule
        batched = any(_batched(grads[i]) for i in todo)
        if sh.fused and not torch.is_grad_enabled() and not batched:
            pick = lambda seq: [seq[i] for i in todo]  # noqa: E731
            res = sh.backend.group_backward([grads[i] for i in todo], pick(sh.weights), pick(sh.us), pick(sh.vs),
                                            pick(sh.sigmas), pick(sh.dims))
            for i, g in zip(todo, res):
                out[i + 1] = g
            return tuple(out)
        # per weight; with create_graph=True the differentiable formula (kernels are not differentiable)
        backward = pytorch.backward if torch.is_grad_enabled() else sh.backend.backward
        for i in todo:
            out[i + 1] = backward(grads[i], sh.weights[i], sh.us[i], sh.vs[i], sh.sigmas[i], sh.dims[i])
        return tuple(out)


def _weights_of(members):
    """The weights of ``members`` whose spectral norm reads them (for ``transforms.active_for``)."""
    return (t[0] for t in map(_Member.sources, members) if t is not None)


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by a vmap: the legacy one of ``is_grads_batched=True``, or torch.func's."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_batchedtensor(t)


def _normalize_group(items, order: str, n_power_iterations: int, eps: float, training: bool,
                     shared: bool) -> list[Tensor]:
    """Power iteration then W/sigma for one group of (member, weight, u, v, order) sharing a device,
    dtype, order, iteration count, eps and mode: one C++ call on the native backend.  ``shared``: the
    node serves every forward until the next optimizer step ("step" mode)."""
    weights = [it[1] for it in items]
    backend = dispatch.resolve(weights[0].device)
    if backend.group_eager is not None:  # one C++ call: forward, u, v updated, the group's node
        outputs, sigmas = backend.group_eager(weights, [it[2] for it in items], [it[3] for it in items],
                                              [it[0].state.dim for it in items], n_power_iterations, float(eps),
                                              order, training, shared)
        for it, sigma in zip(items, sigmas):
            it[0].set_sigma(sigma)
        return outputs
    sh = _Shared()
    sh.weights = weights
    sh.backend = backend
    sh.shared = shared
    sh.fused = sh.backend.group_forward is not None
    with torch.no_grad():
        if sh.fused:  # multi-tensor kernels: a fixed number of launches (one C++ call on the native backend)
            us = [it[2] for it in items]
            vs = [it[3] for it in items]
            # non-negative: the parametrization stores it so, and a negative one fails the hook API's
            # wrapping (in PyTorch's reshape, as with PyTorch's own hook)
            sh.dims = [it[0].state.dim for it in items]
            if not sh.backend.eager_checks_args:  # the native C++ op checks its own
                check_group(sh.weights, us, vs, n_power_iterations, eps, sh.dims, order)
            sh.outputs, sh.sigmas, sh.us, sh.vs = sh.backend.group_forward(
                sh.weights, us, vs, sh.dims, n_power_iterations, float(eps), order, training)
        else:
            sh.sigmas, sh.us, sh.vs, sh.outputs = [], [], [], []
            # every weight checked before any iterates: a refused call moves no u, v
            sh.dims = [check_call(w, u, v, n_power_iterations, eps, mem.state.dim, order) for mem, w, u, v, _ in items]
            for (mem, w, u, v, _), dim in zip(items, sh.dims):
                sigma, u_used, v_used = sh.backend.power_iteration(w, u, v, n_power_iterations, float(eps), dim,
                                                                   order, training)
                sh.sigmas.append(sigma)
                sh.us.append(u_used)
                sh.vs.append(v_used)
                sh.outputs.append(sh.backend.normalize(w, u_used, v_used, sigma, dim))
    for it, sigma in zip(items, sh.sigmas):
        it[0].set_sigma(sigma)
    sh.versions = [w._version for w in sh.weights]
    if torch.is_grad_enabled() and any(w.requires_grad for w in sh.weights):
        return list(_GroupNormalize.apply(sh, *sh.weights))
    return sh.outputs


def _groups(members: list[_Member]) -> tuple[dict, list[_Member]]:
    """({(device, dtype, order, iteration count, eps, mode, requires_grad): [(member, weight, u, v, order)]}
    of the members that can share a group's node, [the others, computed one at a time]): the one grouping
    rule, eager and compiled.  Frozen weights (requires_grad=False) form their own group: sharing a node
    with trained ones would give their W/sigma a grad_fn that per module they do not have.  A member whose
    tensors are read through a parametrization (``_Member.sources`` None) is in neither: its layer
    computes its own."""
    groups: dict = {}
    others = []
    for mem in members:
        t = mem.tensors()
        if t is None:
            if mem.sources() is not None:
                others.append(mem)
            continue
        st = mem.state
        key = (t[0].device, t[0].dtype, t[3], st.n_power_iterations, st.eps, mem.training(), t[0].requires_grad)
        groups.setdefault(key, []).append((mem,) + t)
    return groups, others


def _python_node_in_trace(device: torch.device) -> bool:
    """Whether a group on ``device`` would put its Python node (``_GroupNormalize``) into a torch.jit.trace,
    which keeps it as an opaque op holding this call's outputs (its replay fails): its layers then compute
    their own W/sigma.  The native backend's grouped op makes its node in C++ and traces as one op."""
    return torch.jit.is_tracing() and torch.is_grad_enabled() and dispatch.resolve(device).group_eager is None


@torch.compiler.assume_constant_result
def _group_op_backend(device_type: str) -> str:
    """"native" or "triton" when a compiled grouped model on ``device_type`` takes that backend's
    grouped op (the backend selected there has one), else "".  Decided once per trace, outside it."""
    backend = dispatch.resolve(torch.device(device_type))
    if backend.name == "native" and native.has_op("native_group_forward"):
        return "native"
    if backend.name == "triton" and backend.group_forward is not None:
        return "triton"
    return ""


def _compiled_group(members: list[_Member]) -> None:
    """The compiled "call" refresh: every groupable weight of one (device, dtype, order, iteration
    count, eps, mode) through ONE opaque grouped op (``native_group_forward``, or the triton backend's
    ``triton_group_forward``), whose autograd formula is one grouped backward op.  Inductor generates
    no code for them, and the call sits before the model's first layer, so it splits none of the fused
    kernels (inductor's CPU backend ends a kernel at every opaque call): compile time near that of the
    model without spectral norm (benchmarks/NOTES.md, C2).  Layers the op cannot take compute their own."""
    for (device, _, order, iters, eps, training, _), items in _groups(members)[0].items():
        kind = _group_op_backend(device.type)
        if not kind:
            continue
        weights = [it[1] for it in items]
        us = [it[2] for it in items]
        vs = [it[3] for it in items]
        dims = [it[0].state.dim for it in items]
        if kind == "native":
            outs, sigmas, us_new, vs_new = torch.ops.sn_kernels.native_group_forward(
                weights, us, vs, dims, iters, float(eps), order, training)
        else:  # flat outputs (a custom op's outputs may not alias): views per weight
            flat, sigmas, uvs = torch.ops.sn_kernels.triton_group_forward(weights, us, vs, dims, iters, float(eps),
                                                                          order, training)
            outs, us_new, vs_new = [], [], []
            o = k = 0
            for w, u, v in zip(weights, us, vs):
                outs.append(flat[o:o + w.numel()].view(w.shape))
                us_new.append(uvs[k:k + u.numel()])
                vs_new.append(uvs[k + u.numel():k + u.numel() + v.numel()])
                o, k = o + w.numel(), k + u.numel() + v.numel()
            sigmas = sigmas.unbind(0)
        if training:
            # no no_grad block: u, v come back non-differentiable and the buffers need no grad, and a
            # block of in-place copies alone becomes an empty grad-mode region under torch.export,
            # which torch.export.load refuses (its node has no output to describe)
            for buf, new in zip(us + vs, us_new + vs_new):
                buf.copy_(new)
        for it, w_sn, sigma in zip(items, outs, sigmas):
            it[0].set_sigma(sigma)
            it[0].state.pending = w_sn
            it[0].state.pending_holds = None  # traced: no stamp (an eager call's would be stale)
            it[0].state.pending_thread = None


class SNGroup:
    """Handle returned by ``sn_kernels.group``: ``remove()`` restores per-layer computation,
    ``attach(optimizer)`` / ``detach()`` switch the once-per-step refresh on and off.

    Stored in ``model``'s hook dicts and made of plain data, so it is deep-copied and pickled
    with the model (``find_group`` gets the copy's handle).  The model owns the group (its hooks);
    the group, its layer hooks and the optimizer's step hook hold the model, its layers and the
    group only weakly: no reference cycle, so a dropped model is freed at once, and an optimizer
    that outlives the model does not keep it (or its cached W/sigma) alive."""

    _step_refresh = False  # the class defaults keep groups pickled before them loadable
    _guarded = True  # looked for once, then known
    # "step": inside a model call, whose pre-hook checked the cache (cleared by its forward hook; a call
    # interrupted by a BaseException leaves it set until the next model call)
    _in_call = False
    # ids of the cached W/sigma's weights, for the global step hook (``_any_optimizer_step``)
    _weight_ids: frozenset = frozenset()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        check_model(model, "group")
        if find_group(model) is not None:
            raise ValueError("sn_kernels.group: the model is already grouped (find_group(model).remove() first)")
        if optimizer is not None:
            _check_optimizer(optimizer)  # before any hook is registered: a refusal leaves the model as it was
        self._model = weakref.ref(model)
        self.members: list[_Member] = []
        for path, site in walk(model):
            kind, module, name, state = site.kind, site.module, site.name, site.state
            # a subclass with its own forward (e.g. one made from PyTorch's _SpectralNorm while patched)
            # computes its own W/sigma: a group's, and its iteration of u, v, would go unused
            if kind == "hook" and isinstance(state, hooks.SpectralNorm) \
                    and type(state).__call__ is hooks.SpectralNorm.__call__:
                self.members.append(_Member("hook", module, name, state, path))
            elif kind == "param" and isinstance(state, parametrizations.SpectralNormParametrization) \
                    and len(module.parametrizations[name]) == 1 \
                    and type(state).forward is parametrizations.SpectralNormParametrization.forward:
                self.members.append(_Member("param", module, name, state, path))
        if not self.members:
            raise ValueError("sn_kernels.group: the model has no sn_kernels spectral norm to group")
        self.members = _unshared(self.members)  # after the check: shared ones only make an empty group, no error
        for mem in self.members:
            if _layer_hook_of(mem) is not None:
                raise ValueError(
                    f"sn_kernels.group: {type(mem.module).__name__}.{mem.name} already belongs to a group (an "
                    "enclosing or inner model was grouped, or this is a copy of part of a grouped model); "
                    "remove that group first (sn_kernels.grouped.find_group(that_model).remove())")
        # a layer wrapped on meta keeps a guard until u, v are set: checked at each computation while any has one
        self._guarded = any(mem.has_meta_guard() for mem in self.members)
        self._stale = True
        self._cache: list[Tensor] | None = None
        self._key = None
        self._optimizer_handle = None
        self._step_refresh = False  # plain data: dynamo cannot trace a look at the handle
        self._handles = []
        # "step" refresh: each layer takes the shared W/sigma right before its own spectral norm runs
        for mem in self.members:
            if mem.kind == "hook":
                mem.state.before = _LayerHook(self, mem)  # the hook API's spectral norm runs it first
            else:
                self._handles.append(mem.module.register_forward_pre_hook(_LayerHook(self, mem), prepend=True))
        # the model's pre-hook first of all, even before a spectral norm on the model itself (a grouped
        # SNLinear): it computes the W/sigma that the layers' own hooks then take
        self._handles += [
            model.register_forward_pre_hook(self._model_pre, prepend=True),
            model.register_load_state_dict_pre_hook(self._drop_cache),  # before any weight is swapped
        ]
        self._post_handle = model.register_forward_hook(self._model_post)
        self._handles.append(self._post_handle)
        if optimizer is not None:
            self.attach(optimizer)

    @property
    def model(self) -> nn.Module | None:
        """The grouped model (None once it is freed)."""
        return self._model()

    # -- refresh policy ---------------------------------------------------------------------------
    @property
    def refresh(self) -> str:
        """"step" while attached to an optimizer, else "call"."""
        return "step" if self._step_refresh else "call"

    def attach(self, optimizer: torch.optim.Optimizer) -> "SNGroup":
        """Refresh W/sigma once per ``optimizer.step()`` (see the module docstring)."""
        _check_optimizer(optimizer)
        _prune_step_hooks(optimizer)
        handle = optimizer.register_step_post_hook(_StepHook(self))  # before the old one goes: no half state
        self.detach()
        self._optimizer_handle = handle
        self._step_refresh = True
        self._stale, self._cache = True, None
        _watch_all_steps(self)
        self._post_always_called()
        return self

    def _post_always_called(self) -> None:
        """The model's forward hook also after a forward that raised (``always_call``), once "step" mode is
        used: it ends the model call (``_in_call``), which then no longer covers a layer called alone.  Per
        call it is not needed (a pre-computed W/sigma left by a failed call carries its own validity check),
        and there it would make dynamo recompile for every new group or grouped model (it guards on the
        hook's id in the module's always-called set)."""
        model = self.model
        handle = getattr(self, "_post_handle", None)  # None: pickled before it was kept (registered always-called)
        if model is None or handle is None or handle.id in model._forward_hooks_always_called:
            return
        handle.remove()
        self._handles.remove(handle)
        self._post_handle = model.register_forward_hook(self._model_post, always_call=True)
        self._handles.append(self._post_handle)

    def detach(self) -> None:
        """Back to one refresh per model call (exact per-module semantics)."""
        if self._optimizer_handle is not None:
            self._optimizer_handle.remove()
            self._optimizer_handle = None
        self._step_refresh = False
        _STEP_GROUPS.discard(self)  # the global step hook stays: other groups may need it
        self._drop_cache()

    # -- computation ------------------------------------------------------------------------------
    def _live_members(self) -> list[_Member]:
        """The members still grouped; those that left (spectral norm removed or changed, layer freed) are
        dropped with their layer hook."""
        live = [m for m in self.members if m.live()]
        if len(live) != len(self.members):
            if any(m.module is None for m in self.members):
                # a layer replaced or deleted: the others replaced with it may live on elsewhere (then their
                # u, v must not move with this model).  Only then: walking the model every call costs too much
                live = _inside(self.model, live)
            for mem in self.members:
                if mem not in live:
                    _unhook(mem)
            self.members = live
        return live

    def _compute_all(self, members: list[_Member], alone: bool = True) -> dict:
        """{member: W/sigma}: the groupable weights in one node per (device, dtype, order, iteration
        count, eps, mode), one C++ call each on the native backend; the others
        by their layer's own computation (skipped when not ``alone``: the layer computes them itself).
        Under a jit trace, a group whose node is the Python one is left to its layers too, and so are
        the layers whose meta guard refuses (their u, v are uninitialised).  A refused computation
        (a bad u or v) moves no u, v and names the layer."""
        if self._guarded:
            members = self._unguarded(members)
        groups, others = _groups(members)
        if not alone:
            others = []
        try:
            if len(groups) + len(others) > 1:  # one group alone checks all its weights before iterating
                _check_all(groups, others)
            out: dict = {}
            for mem in others:
                out[mem] = mem.compute_alone()
                mem.stamp_now(*mem.sources()[:2], mem.training(), out[mem])
            for (device, _, order, iters, eps, training, _), items in groups.items():
                if _python_node_in_trace(device):
                    continue
                for item, w_sn in zip(items, _normalize_group(items, order, iters, eps, training,
                                                              shared=self.refresh == "step")):
                    out[item[0]] = w_sn
                    item[0].stamp_now(item[1], item[2], training, w_sn)
        except Exception:
            _raise_naming_the_layer(members)
            raise
        return out

    def _unguarded(self, members: list[_Member]) -> list[_Member]:
        """``members`` less those whose meta guard refuses; forgets the guards once none is left."""
        self._guarded = any(mem.has_meta_guard() for mem in members)
        return [mem for mem in members if not mem.refused_by_meta_guard()] if self._guarded else members

    def _key_now(self) -> tuple:
        """What the cached W/sigma depends on besides the optimizer: (grad mode, {member: its ``key()``})."""
        return torch.is_grad_enabled(), {m: m.key() for m in self.members}

    def _holds_for(self, mem: _Member) -> bool:
        """Whether the cached W/sigma of ``mem`` still holds: the grad mode and that member's ``key()`` as when
        the cache was computed.  One member's tensors, not all: it runs at a layer's call outside a model
        call (a W/sigma depends on its own weight, u and v only; the node checks the version of a weight
        only when its gradient is asked for)."""
        grad, keys = self._key
        return grad == torch.is_grad_enabled() and keys.get(mem) == mem.key()

    def _model_pre(self, model: nn.Module, inputs) -> None:
        if torch.compiler.is_compiling():
            if self.refresh == "call":
                # not ``_live_members``: dynamo cannot trace the removal of a leaving member's hook (the next
                # eager call drops it)
                _compiled_group([mem for mem in self.members if mem.live()])
            return  # otherwise each layer computes its own W/sigma (the compiled route)
        members = self._live_members()
        if transforms.active_for(_weights_of(members)):
            # torch.func runs plain ops only: each layer computes its own (sn_kernels/transforms.py), and
            # none takes what an interrupted call left (``_Member.pending_holds``)
            return
        if self.refresh == "step":
            # once per model call: a weight changed in place, a mode switched or the grad mode changed
            if self._cache is not None and self._key_now() != self._key:
                self._stale = True
            self._in_call = True  # the layers need not check the cache again (_layer_pre)
            return  # _LayerHook hands out the shared W/sigma
        if parametrize._cache_enabled:
            members = _uncached(members)
        thread = threading.get_ident()
        for mem, w_sn in self._compute_all(members).items():
            d = mem.state.__dict__  # what nn.Module.__setattr__ does for it, minus its checks
            d["pending"] = w_sn  # taken by the layer's spectral norm, module call or plain weight read
            d["pending_holds"] = mem.pending_holds
            d["pending_thread"] = thread  # another thread calling the same model takes none of it

    def _layer_pre(self, mem: _Member) -> None:
        if torch.compiler.is_compiling():
            return  # first: dynamo cannot see the handle
        if self.refresh == "call":
            return  # the model's pre-hook set every layer's pending W/sigma
        if torch.jit.is_tracing():
            # a jit trace would record the cached W/sigma as constants, blind to the weights and u, v it is
            # later given: each layer computes its own
            return
        if not mem.live():
            # its spectral norm was removed, stacked on or re-added since: the layer computes its own (this
            # leftover hook goes with the member; the cache, which does not hold it, stays)
            self._live_members()
            return
        if transforms.active_for(_weights_of([mem])):
            return  # torch.func: the layer computes its own in plain ops
        cache, key = self._cache, self._key
        if cache is not None and not self._stale and (key is None or (not key[0] and torch.is_grad_enabled()) or (
                not self._in_call and not self._holds_for(mem))):
            # called alone (not through the model, whose pre-hook checks the whole cache once per call)
            # after its weight, u, v, mode or the grad mode changed; inside a model call, a cache made without
            # grad where this call needs one: another thread's call (under no_grad) refreshed it since this
            # call's pre-hook (a cache with grad serves a no_grad block of the forward as it is)
            self._stale = True
        if self._stale or cache is None:
            cache = self._cache = self._compute_all(self._live_members(), alone=False)
            self._stale = False
            self._key = self._key_now()  # after the iteration (u, v versions moved)
            self._weight_ids = frozenset(id(t[0]) for t in map(_Member.sources, self.members) if t is not None)
        w_sn = cache.get(mem)
        if w_sn is not None:
            d = mem.state.__dict__
            d["pending"] = w_sn
            d["pending_holds"] = None  # the step cache checks its own key
            d["pending_thread"] = None  # taken right away by this call's spectral norm

    def _drop_cache(self, *load_args) -> None:
        """Forget the step cache, stale after an optimizer step (and a load_state_dict, whose pre-hook this
        is: ``load_args``).  Its node keeps every grouped weight until it is freed, and PyTorch's parameter
        swap (``torch.__future__.set_swap_module_params_on_conversion``: ``.to``, ``load_state_dict``)
        refuses a weight referenced elsewhere; so does the W/sigma that a hook-API layer keeps as
        ``module.<name>`` after its call: that one is detached (its graph is the stale node's)."""
        cache, self._cache, self._stale = self._cache, None, True
        for mem, w_sn in (cache or {}).items():
            module = mem.module
            if mem.kind == "hook" and module is not None and module.__dict__.get(mem.name) is w_sn:
                module.__dict__[mem.name] = w_sn.detach()

    def _model_post(self, model: nn.Module, inputs, output) -> None:
        # a pre-computed weight that no layer used (a skipped layer) is dropped, not kept past the call;
        # a call that raises skips this hook (any exception per call; a BaseException in step mode, where it
        # is always-called), so a pending weight also carries its validity check (``_Member.pending_holds``)
        # and stays alive until the model's next call
        if self._in_call:  # read first: a compiled call (which never sets it) then writes nothing
            self._in_call = False
        for mem in self.members:
            d = mem.state.__dict__
            if d.get("pending") is not None:
                d["pending"] = d["pending_holds"] = None

    # -- lifecycle --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Stop grouping; drop any pre-computed weight not yet used."""
        self.detach()
        for h in self._handles:
            h.remove()
        self._handles = []
        for mem in self.members:
            mem.state.pending = None
            if mem.kind == "hook":
                mem.state.before = None

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self):
        # a copy (deepcopy, pickle) is independent of the optimizer and of this model's graph:
        # no cached W/sigma, no optimizer hook; it refreshes per call until attach().  The model
        # itself (a weak reference neither copies nor pickles): a copy refers to the model's copy
        state = self.__dict__.copy()
        state.update(_cache=None, _key=None, _stale=True, _optimizer_handle=None, _step_refresh=False,
                     _in_call=False, _weight_ids=frozenset(), model=state.pop("_model")())
        return state

    def __setstate__(self, state) -> None:
        state = dict(state)
        state["_model"] = _weak(state.pop("model"))
        self.__dict__.update(state)


def _unshared(members: list[_Member]) -> list[_Member]:
    """``members`` less the spectral norms that several modules share (one parametrization registered on
    two modules, as ``parametrize.transfer_parametrizations_and_params`` does): each access of one iterates
    its u, v, as in PyTorch, and a W/sigma computed ahead would go to whichever module reads first (its
    weight, or the other's when they do not share ``original``).  Their layers compute their own."""
    count = collections.Counter(id(mem.state) for mem in members)
    return [mem for mem in members if count[id(mem.state)] == 1]


def _uncached(members: list[_Member]) -> list[_Member]:
    """Under ``parametrize.cached()``: ``members`` less the parametrized weights, which then compute their own
    through PyTorch's cache (one power iteration per context, as per module and in PyTorch): a W/sigma
    computed ahead for a weight already cached would iterate u, v for nothing.  Not by looking the weight up
    in the cache: its key is the module the parametrization was registered on, which a deep copy shares with
    its original (the copy's class, and so its property, is the original's)."""
    return [mem for mem in members if mem.kind == "hook"]


def _check_optimizer(optimizer) -> None:
    """Refuse what cannot take the group's step hook (a list of parameters instead of the optimizer)."""
    if not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise TypeError("sn_kernels.group: optimizer must be a torch.optim.Optimizer (it needs "
                        f"register_step_post_hook), got {type(optimizer).__name__}")


def _check_all(groups: dict, others: list[_Member]) -> None:
    """Check every weight's arguments before any of them iterates (a refused call then moves no u, v):
    each group's by ``check_group``'s fast test, the others' by ``check_call``."""
    for (_, _, order, iters, eps, _, _), items in groups.items():
        check_group([it[1] for it in items], [it[2] for it in items], [it[3] for it in items], iters, eps,
                    [it[0].state.dim for it in items], order)
    for mem in others:
        mem.check()


def _raise_naming_the_layer(members: list[_Member]) -> None:
    """After a refused computation: raise ``check_call``'s error for the first member whose arguments fail
    it, naming that layer; return when none does (the caller re-raises the original error)."""
    for mem in members:
        try:
            mem.check()
        except Exception as err:
            raise type(err)(f"sn_kernels.group: {mem.label}: {err}") from None


class _StepHook:
    """The optimizer's step post-hook of a group: marks its W/sigma stale.  Holds the group weakly, so
    that the optimizer does not keep the group and its model alive; once the group is freed it does
    nothing, until the next ``attach`` to that optimizer removes it (``_prune_step_hooks``)."""

    def __init__(self, group: SNGroup) -> None:
        self.group = weakref.ref(group)

    def __call__(self, *args) -> None:
        group = self.group()
        if group is not None:
            group._drop_cache()


# the groups in "step" refresh, for ``_any_optimizer_step`` (weakly: a dropped model's group goes)
_STEP_GROUPS: weakref.WeakSet = weakref.WeakSet()
_global_step_hook = None


def _watch_all_steps(group: SNGroup) -> None:
    """Have every optimizer's step refresh ``group`` when it steps a grouped weight: PyTorch's global step
    post-hook, registered once, at the first attach, and kept (other groups may need it)."""
    global _global_step_hook
    if _global_step_hook is None:
        _global_step_hook = optimizer_module.register_optimizer_step_post_hook(_any_optimizer_step)
    _STEP_GROUPS.add(group)


def _any_optimizer_step(optimizer, args, kwargs) -> None:
    """After any optimizer's step: drop the step cache of each group with a cached weight among its
    parameters.  An optimizer other than the attached one is otherwise seen through the weights' version
    counters, which a ``fused=True`` step does not move (the next forward would use the old W/sigma)."""
    # the set of weak references copied in one C call (atomic under the GIL), then dereferenced: iterating the
    # WeakSet itself raises when another thread groups or detaches a model meanwhile
    groups = [g for g in (r() for r in list(_STEP_GROUPS.data)) if g is not None and g._cache is not None]
    if not groups:
        return
    ids = {id(p) for pg in optimizer.param_groups for p in pg["params"]}
    for group in groups:
        if not ids.isdisjoint(group._weight_ids):
            group._drop_cache()


def _prune_step_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Remove ``optimizer``'s step hooks of freed groups.  Here, not when a group is freed: the cyclic
    collector may free one (a parametrized model is in cycles) while ``optimizer.step()`` iterates over
    these hooks, and the dict must not change then."""
    hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
    for key in [k for k, h in hooks.items() if isinstance(h, _StepHook) and h.group() is None]:
        del hooks[key]


class _LayerHook:
    """Runs before a grouped layer's spectral norm (a forward pre-hook of the layer, or the hook
    API's ``SpectralNorm.before``): plain data, picklable.  Holds the group weakly (the model holds
    it: a strong reference from its layer would be a cycle), and its member too (the group holds it;
    the member holds the hook API's ``SpectralNorm``, which holds this hook: a cycle that kept a
    dropped model's weights until the cyclic collector ran).  No ``__slots__``: dynamo guards the
    objects it traces through their ``__dict__``."""

    def __init__(self, group: SNGroup, member: _Member) -> None:
        self._group, self._member = weakref.ref(group), weakref.ref(member)

    @property
    def member(self) -> _Member | None:
        """The grouped weight this hook runs for (None once its group is freed)."""
        return self._member()

    def __call__(self, module: nn.Module, inputs) -> None:
        group = self._group()
        if group is not None:  # None: a copy of part of a grouped model (the rest, with the group, freed)
            group._layer_pre(self.member)

    def __getstate__(self):  # the group and member themselves, as SNGroup's own state (a weak reference does not copy)
        return {"group": self._group(), "member": self.member}

    def __setstate__(self, state) -> None:
        self._group, self._member = _weak(state["group"]), _weak(state["member"])


def _layer_hook_of(mem: _Member) -> _LayerHook | None:
    """The group hook already on ``mem``'s spectral norm (the hook API's ``before``, or a pre-hook of the
    parametrized module), if any."""
    if mem.kind == "hook":
        return mem.state.before if isinstance(mem.state.before, _LayerHook) else None
    return next((h for h in mem.module._forward_pre_hooks.values()
                 if isinstance(h, _LayerHook) and h.member is not None and h.member.name == mem.name), None)


def _inside(model: nn.Module | None, members: list[_Member]) -> list[_Member]:
    """``members`` whose module is still inside ``model`` (a replaced layer may live on elsewhere)."""
    if model is None:
        return members
    modules = {id(m) for m in model.modules()}
    return [mem for mem in members if id(mem.module) in modules]


def _unhook(mem: _Member) -> None:
    """Take the group's layer hook off a member that left the group (a leftover one would run the group
    for a layer it no longer holds, and refuse a new group of that layer)."""
    if mem.kind == "hook":
        if isinstance(mem.state.before, _LayerHook) and mem.state.before.member is mem:
            mem.state.before = None
        return
    module = mem.module
    if module is None:
        return
    for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, _LayerHook) and h.member is mem]:
        del module._forward_pre_hooks[key]


def find_group(model: nn.Module) -> SNGroup | None:
    """The ``SNGroup`` that groups ``model`` (also in a deep copy or a loaded model), or None."""
    for hook in model._forward_pre_hooks.values():
        group = getattr(hook, "__self__", None)
        if isinstance(group, SNGroup) and group.model is model:
            return group
    return None


def group(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> SNGroup:
    """Normalize every sn_kernels SN weight of ``model`` together: at each model call, or, with
    ``optimizer``, once per ``optimizer.step()`` shared by every forward until the next step."""
    return SNGroup(model, optimizer)
