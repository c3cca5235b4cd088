"""The "native" backend: the compiled extension ``sn_kernels._C`` (C++ CPU kernels, CUDA kernels).

The extension defines ``sn_kernels::native_power_iteration``, ``native_normalize`` and
``native_backward`` with ``TORCH_LIBRARY`` and registers CPU (and, in a CUDA build,
CUDA) kernels.  It is normally built by ``pip install --no-build-isolation -e .``; when
it is absent, an explicit request for the native backend (``set_backend("native")``,
``backend="native"``) builds it just in time with ninja into ``~/.cache/sn_kernels``
(override with ``SN_KERNELS_CACHE``).  ``auto`` never triggers that build.
"""
from __future__ import annotations

import json
import os
import sys
import threading

import torch

from .contract import Backend, fake_like_weight, fake_sigma, refuse_double_backward, register_ops

NOT_BUILT = "extension not built (pip install -e . builds it; or set_backend('native') to build it just in time)"

_state = {"loaded": False, "error": None, "build_failed": None}

# The schema version of the native_* ops this Python code calls (csrc/sn_kernels_cpu.cpp kOpsVersion); bumped
# with it whenever a schema changes.  OPS_SCHEMA_DIGEST: a digest of those schemas (``ops_schema_digest``),
# which tests/test_native.py compares, so that a changed schema cannot go without a bump.
OPS_VERSION = 4
OPS_SCHEMA_DIGEST = "4578d4bf600a430822abb15227e5d8ed2b2075299b8b0a76cd51c64990c3fc65"


def ops_schema_digest() -> str:
    """The sha256 of the loaded library's native_* ops: each op's name, its arguments' names (with a "="
    where one has a default) and its number of outputs, sorted; not the types' spelling, which differs
    between torch releases."""
    import hashlib

    lines = []
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sn_kernels::native_")):
        schema = torch._C._get_schema(name, "")
        args = ",".join(a.name + ("=" if a.has_default_value() else "") for a in schema.arguments)
        lines.append(f"{name}({args})->{len(schema.returns)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _stale_reason() -> str | None:
    """Why the loaded library cannot serve this Python code (built from other sources), or None."""
    found = torch.ops.sn_kernels.native_ops_version() if has_op("native_ops_version") else 1
    if found == OPS_VERSION:
        return None
    return (f"the built extension is from other sources (its ops are version {found}, this sn_kernels calls "
            f"version {OPS_VERSION}): rebuild it (pip install --no-build-isolation -e .)")


_ops_seen: set[str] = set()


def has_op(name: str) -> bool:
    """Whether the loaded extension has the op ``sn_kernels::name`` (an older build may lack the newer
    ops).  A yes is remembered (an extension is never unloaded); a no is asked again, as the extension
    may load later."""
    if name in _ops_seen:
        return True
    if hasattr(torch.ops.sn_kernels, name):
        _ops_seen.add(name)
        return True
    return False


def _import_prebuilt() -> str | None:
    """Import ``sn_kernels._C``; None on success, else why not."""
    try:
        from .. import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        import importlib.util

        package = __package__.rpartition(".")[0]
        if importlib.util.find_spec(f"{package}._C") is None:
            # not found at all: Python's own message, raised while the package imports, blames a circular import
            return f"{NOT_BUILT}: no compiled {package}._C in {os.path.dirname(os.path.dirname(__file__))}"
        return f"{NOT_BUILT}: {exc}"
    return None


_load_lock = threading.Lock()


def _load(build: bool) -> str | None:
    """Make the ops available; None on success, else the reason.  With ``build`` a missing
    extension is JIT-built (errors are raised in full, not swallowed).  One thread at a time: a second
    thread's first call during the build waits for it, then finds the ops (registering them twice fails)."""
    if _state["loaded"]:
        return None
    with _load_lock:
        return _load_locked(build)


def _load_locked(build: bool) -> str | None:
    if _state["loaded"]:
        return None
    if _state["error"] is not None and not build:
        return _state["error"]
    reason = _import_prebuilt()
    if reason is not None:
        if not build:
            _state["error"] = reason
            return reason
        if _state["build_failed"] is not None:  # one attempt per process: its error was shown in full
            return _state["build_failed"]
        from .. import _build

        try:
            _build.jit_build()  # raises with the compiler's output on failure
        except Exception as exc:
            _state["build_failed"] = f"building the native extension failed: {type(exc).__name__}: {exc}"
            raise
    reason = _stale_reason()
    if reason is not None:  # a just-in-time build is of these sources: only a prebuilt library can be stale
        _state["error"] = reason
        return reason
    _finish()
    return None


def _raw(name: str):
    """The C++ entry point of ``torch.ops.sn_kernels.<name>.default`` (skips a Python frame per call)."""
    overload = getattr(torch.ops.sn_kernels, name).default
    return getattr(overload, "_op", overload)


def _group_entry(raw):
    """``native_group_normalize_eager`` (a group's forward) entered through ``sn_kernels._C.group_normalize_eager``
    (csrc/python_entry.cpp: its four lists converted without torch.ops' binding; benchmarks/NOTES.md, G10), and
    through ``raw`` (torch.ops) where that entry declines or is missing."""
    entry = _c_entry("group_normalize_eager")
    if entry is None:
        return raw

    def group_eager(weights, us, vs, dims, n_power_iterations, eps, order, training, shared=False):
        out = entry(weights, us, vs, dims, n_power_iterations, eps, order, training, shared)
        if out is NotImplemented:
            return raw(weights, us, vs, dims, n_power_iterations, eps, order, training, shared)
        return out
    return group_eager


def _direct_entry():
    """``sn_kernels._C.spectral_normalize_eager`` (csrc/python_entry.cpp): the fused eager op through the
    dispatcher without torch.ops' generic argument handling, about 10 microseconds less per call; it answers
    NotImplemented where torch.ops must take the call (a tensor subclass, a torch function mode).  None when
    the library was loaded without that module (a just-in-time build, an older build)."""
    return _c_entry("spectral_normalize_eager")


def _c_entry(name: str):
    """``sn_kernels._C.<name>``, a direct entry of csrc/python_entry.cpp, with Parameters taken as plain tensors
    (``_set_plain_types``, shared by the entries); None when the library was loaded without that module."""
    module = sys.modules.get(f"{__package__.rpartition('.')[0]}._C")
    entry = getattr(module, name, None)
    if entry is not None:
        module._set_plain_types(torch.nn.Parameter)
    return entry


_calls: dict = {}


def backward(grad, weight, u, v, sigma, dim):
    """grad_W = (G - <G, W>/sigma u v^T) / sigma: the C++/CUDA kernel (two passes over W)."""
    return _calls["backward"](grad, weight, u, v, sigma, dim)


backend: Backend | None = None  # created when the extension loads (``_finish``)


def _finish() -> None:
    """Register the fakes and autograd formula of the loaded extension's ops; create ``backend``."""
    global backend
    _calls.update(backward=_raw("native_backward"))
    power_iteration, normalize = register_ops("sn_kernels::native_power_iteration", "sn_kernels::native_normalize",
                                              backward)
    torch.library.register_fake("sn_kernels::native_backward")(fake_like_weight)
    torch.library.register_fake("sn_kernels::native_normalize_eager")(fake_like_weight)
    torch.library.register_fake("sn_kernels::native_backward_gain")(
        lambda grad, weight, u, v, sigma, scaled, dim: (torch.empty_like(weight), fake_sigma(weight)))
    torch.library.register_fake("sn_kernels::native_spectral_normalize_eager")(
        lambda weight, u, v, n_power_iterations, eps, dim, order, training, coeff=None, soft=False, gain=None: (
            torch.empty_like(weight), fake_sigma(weight)))
    # eager: one C++ call (power iteration, the Lipschitz scaling when coeff is given, W / sigma times the
    # gain when given, with a C++ autograd formula) through torch.ops; the front end enters the same op
    # directly where it can (``direct``: _direct_entry) and comes here for what that entry declines.  The
    # entry takes exact types only: a call it declined for an int eps or coeff, a numpy bool and the like
    # asks it again with the arguments converted (the front end's first try was with the caller's)
    fused = _raw("native_spectral_normalize_eager")
    direct = _direct_entry()

    def eager(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain=None):
        converted = type(eps) is not float or type(training) is not bool or type(soft) is not bool \
            or not (coeff is None or type(coeff) is float)
        eps, training, soft = float(eps), bool(training), bool(soft)
        coeff = None if coeff is None else float(coeff)
        if converted and direct is not None:
            out = direct(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)
            if out is not NotImplemented:
                return out
        if type(n_power_iterations) is int and not -2**63 <= n_power_iterations < 2**63:
            # torch.ops' own message for it reads "expected ... type 'int' ... found type 'int'"
            raise ValueError(f"n_power_iterations must fit in 64 bits, got {n_power_iterations}")
        return fused(weight, u, v, n_power_iterations, eps, dim, order, training, coeff, soft, gain)

    if has_op("native_carry_forward"):  # the certified carry (certified.py)
        torch.library.register_fake("sn_kernels::native_carry_forward")(
            lambda weight, ref, base, k1, coeff, soft: (torch.empty_like(weight),) + tuple(
                weight.new_empty((), dtype=torch.float64) for _ in range(2)))
        torch.library.register_fake("sn_kernels::native_carry_backward")(
            lambda grad, weight, ref, den, nrm, k1, coeff, soft: torch.empty_like(weight))
        torch.library.register_fake("sn_kernels::native_carry_eager")(
            lambda weight, ref, base, k1, coeff, soft: (torch.empty_like(weight),
                                                        weight.new_empty((), dtype=torch.float64)))
    layout_ops = ()
    if has_op("native_normalize_layout"):  # the compiled CPU route (functional.py)
        torch.library.register_fake("sn_kernels::native_normalize_layout")(_fake_laid_out)
        torch.library.register_fake("sn_kernels::native_normalize_layout_backward")(_fake_layout_backward)
        torch.library.register_autograd("sn_kernels::native_normalize_layout", _layout_backward,
                                        setup_context=_layout_setup_context)
        layout_ops = (torch.ops.sn_kernels.native_normalize_layout, torch.ops.sn_kernels.native_normalize_layout_backward)
    if has_op("native_normalize_layout_twice"):  # the hook API's compiled CPU route
        torch.library.register_fake("sn_kernels::native_normalize_layout_twice")(_fake_laid_out_twice)
        torch.library.register_autograd("sn_kernels::native_normalize_layout_twice", _layout_backward,
                                        setup_context=_layout_setup_context)
        layout_ops += (torch.ops.sn_kernels.native_normalize_layout_twice,)
    group_ops, group_calls = (), {}
    if has_op("native_group_forward"):  # sn_kernels.group's ops (grouped.py)
        torch.library.register_fake("sn_kernels::native_group_forward")(_fake_group_forward)
        torch.library.register_fake("sn_kernels::native_group_backward")(
            lambda grads, weights, us, vs, sigmas, dims: [torch.empty_like(w) for w in weights])
        torch.library.register_autograd("sn_kernels::native_group_forward", _group_backward,
                                        setup_context=_group_setup_context)
        group_ops = (torch.ops.sn_kernels.native_group_forward, torch.ops.sn_kernels.native_group_backward)
        _calls.update(group_forward=_raw("native_group_forward"))
        group_calls = dict(group_forward=_group_forward, group_backward=_raw("native_group_backward"))
    if has_op("native_group_normalize_eager"):  # the same with its node in C++ (csrc/sn_kernels_autograd.cpp)
        torch.library.register_fake("sn_kernels::native_group_normalize_eager")(
            lambda weights, us, vs, dims, n_power_iterations, eps, order, training, shared=False: (
                [torch.empty_like(w) for w in weights], [fake_sigma(w) for w in weights]))
        group_ops += (torch.ops.sn_kernels.native_group_normalize_eager,)
        group_calls.update(group_eager=_group_entry(_raw("native_group_normalize_eager")))
    backend = Backend(
        name="native", device_types=("cpu", "cuda"), why_not=why_not,
        power_iteration=power_iteration, normalize=normalize, backward=backward, eager=eager,
        eager_checks_args=True, direct=direct,
        ops=(power_iteration, normalize, torch.ops.sn_kernels.native_backward,
             torch.ops.sn_kernels.native_backward_gain, torch.ops.sn_kernels.native_normalize_eager,
             torch.ops.sn_kernels.native_spectral_normalize_eager)
        + layout_ops + group_ops, **group_calls,
    )
    _state["loaded"] = True
    _state["error"] = None


def _fake_laid_out(weight, u, v, sigma, dim, channels_last):
    """W / sigma as the layout ops write it: ``weight``'s shape, channels-last or contiguous."""
    return torch.empty_like(weight, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _own_channels_last(weight) -> bool:
    """Whether ``weight`` itself is stored channels-last (a 4-d tensor that is not also contiguous)."""
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _fake_laid_out_twice(weight, u, v, sigma, dim, channels_last):
    """The first as ``_fake_laid_out``, the second (the kept copy) laid out as ``weight`` is."""
    return (_fake_laid_out(weight, u, v, sigma, dim, channels_last),
            _fake_laid_out(weight, u, v, sigma, dim, _own_channels_last(weight)))


def _fake_layout_backward(grad, weight_sn, u, v, sigma, dim, channels_last, kept=None):
    return _fake_laid_out(weight_sn, u, v, sigma, dim, channels_last)


def _layout_setup_context(ctx, inputs, output):
    """For ``native_normalize_layout`` and ``_twice`` (whose two outputs hold the same values)."""
    weight, u, v, sigma, dim, _ = inputs
    ctx.dim = dim
    # grad_W in the weight's own layout (a channels-last parameter's gradient is channels-last)
    ctx.channels_last = _own_channels_last(weight)
    weight_sn = output[0] if isinstance(output, (tuple, list)) else output
    ctx.save_for_backward(weight_sn, u, v, sigma)  # W / sigma, not W: see contract.register_ops


def _layout_backward(ctx, grad, kept=None):
    """grad_W = (G - <G, W_sn> u v^T) / sigma in one C++ call, from the saved W / sigma; G is the sum
    of the two outputs' gradients for ``native_normalize_layout_twice`` (either may be None)."""
    if not ctx.needs_input_grad[0] or (grad is None and kept is None):
        return (None,) * 6
    refuse_double_backward()
    weight_sn, u, v, sigma = ctx.saved_tensors
    if grad is None:
        grad, kept = kept, None
    out = torch.ops.sn_kernels.native_normalize_layout_backward(grad, weight_sn, u, v, sigma, ctx.dim,
                                                                ctx.channels_last, kept)
    return (out,) + (None,) * 5


def _group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training):
    """``Backend.group_forward``: one C++ call (it checks every argument); the op is functional
    (so it traces), so the iterated u, v it returns are copied into the buffers by one call."""
    # below the op's autograd key: eager grouping records its own node (grouped._GroupNormalize), and the
    # Python autograd formula registered for compiled graphs would cost about 0.1 ms per call here, 10 % of
    # sngan_cifar_d's whole grouped forward on the CPU
    with torch._C._AutoDispatchBelowAutograd():
        out = _calls["group_forward"](weights, us, vs, dims, n_power_iterations, float(eps), order, bool(training))
    if training:
        torch._foreach_copy_(us + vs, out[2] + out[3])
    return out


def _fake_group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training):
    return ([torch.empty_like(w) for w in weights],
            [fake_sigma(w) for w in weights],
            [torch.empty_like(u) for u in us], [torch.empty_like(v) for v in vs])


def _group_setup_context(ctx, inputs, output):
    weights, us, vs, dims, n_power_iterations, eps, order, training = inputs
    _, sigmas, us_used, vs_used = output
    ctx.k, ctx.dims, ctx.rest = len(weights), list(dims), len(inputs) - 3
    ctx.mark_non_differentiable(*sigmas, *us_used, *vs_used)
    ctx.save_for_backward(*weights, *us_used, *vs_used, *sigmas)


def _group_backward(ctx, grads, grad_sigmas, grad_us, grad_vs):
    """The autograd formula of ``native_group_forward`` (what a compiled grouped model records; eager
    grouping has its own node, grouped.py): every weight gradient in one ``native_group_backward``."""
    if torch.is_grad_enabled():
        raise RuntimeError("sn_kernels: double backward through the grouped op (a compiled grouped model) "
                           "is not supported; eager calls support it")
    k, saved = ctx.k, ctx.saved_tensors
    weights, us, vs, sigmas = (list(saved[i * k:(i + 1) * k]) for i in range(4))
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
    out = torch.ops.sn_kernels.native_group_backward(grads, weights, us, vs, sigmas, ctx.dims)
    return (out, [None] * k, [None] * k) + (None,) * ctx.rest  # the structure of the inputs


def cache_stats() -> dict[str, int]:
    """The CPU output block cache (W / sigma and grad_W of weights of 64 KiB or more come from
    it, so a training step's outputs reuse the previous step's memory instead of page-faulting
    fresh memory): idle bytes and blocks held, bytes handed out, hits and misses."""
    keys = ("idle_bytes", "idle_blocks", "in_use_bytes", "hits", "misses")
    return dict(zip(keys, torch.ops.sn_kernels.native_cpu_cache_stats()))


def empty_cache() -> None:
    """Free the idle blocks of the CPU output cache (its size limit: SN_KERNELS_CPU_CACHE_MB,
    default 1024; 0 turns the cache off)."""
    torch.ops.sn_kernels.native_cpu_cache_clear()


def build_info() -> dict:
    """What setup.py built: ``{"cuda_kernels": bool, "why": str, "torch": str}`` ({} when unknown)."""
    try:
        # written by setup.py next to sn_kernels/_C, in the package folder
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("sn_kernels::native_normalize", key)


def why_not(device: torch.device, auto: bool = False) -> str | None:
    """None when the extension is loaded and has kernels for ``device``'s type; else why not.

    ``auto=False`` (an explicit request) builds a missing extension just in time."""
    device = torch.device(device)
    try:
        reason = _load(build=not auto)
    except Exception as exc:
        # an explicit request: show the build error in full
        reason = f"building the native extension failed: {type(exc).__name__}: {exc}"
        _state["error"] = reason
        print(f"sn_kernels: {reason}", file=sys.stderr)
    if reason is not None:
        return reason
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if not has_kernel(device.type):
        if device.type == "cuda":
            why = build_info().get("why", "CPU-only torch, no matching CUDA toolkit, or SN_KERNELS_BUILD=cpu")
            return f"the native extension was built without CUDA kernels: {why}"
        return f"the native extension has no kernels for device type {device.type!r}"
    return None


# load a prebuilt extension at import (cheap); never build here
_load(build=False)
