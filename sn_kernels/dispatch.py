"""Backend choice: the only place that decides which implementation runs.

Backends, fastest first: "native" (the compiled extension ``sn_kernels._C``),
"triton" (Triton kernels, CUDA tensors), "torch" (plain PyTorch, any device).
"auto" picks the first that can run on the tensor's device and falls back;
an explicitly requested backend that cannot run raises with the reason.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import warnings
from typing import Iterator

import torch

from .backends import MODULES, NAMES
from .backends.contract import Backend

BACKENDS = NAMES
_CHOICES = ("auto",) + BACKENDS


def _check_choice(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"an sn_kernels backend is named by a str, one of {_CHOICES}; got {name!r}")
    name = name.lower()
    if name not in _CHOICES:
        raise ValueError(f"unknown sn_kernels backend {name!r}; choose one of {_CHOICES}")
    return name


_selected = _check_choice(os.environ.get("SN_KERNELS_BACKEND", "auto") or "auto")
_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}


def _load(name: str):
    """Import a backend's module once (its ``why_not`` and ``backend``); remember why it failed."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        mod = importlib.import_module(MODULES[name])
    except Exception as exc:  # an optional dependency may be missing or broken
        _load_errors[name] = f"cannot import {MODULES[name]}: {type(exc).__name__}: {exc}"
        return None
    _loaded[name] = mod
    return mod


def why_not(name: str, device: torch.device | str, *, auto: bool = False) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can).

    With ``auto=True`` the question is whether "auto" may pick it, which also
    excludes slow stand-ins such as the Triton interpreter.
    """
    name = _check_choice(name)
    if name == "auto":
        return None
    mod = _load(name)
    if mod is None:
        return _load_errors[name]
    return mod.why_not(torch.device(device), auto=auto)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here, fastest first.

    Asking never starts the just-in-time build of the native extension (that takes
    minutes); the first call that resolves "native" by name (after ``set_backend("native")``,
    or with ``backend="native"``) does.  The Triton interpreter counts for cpu
    when TRITON_INTERPRET=1 (tests), though "auto" never picks it.
    """
    return [b for b in BACKENDS if why_not(b, device, auto=(b == "native")) is None]


def set_backend(name: str) -> None:
    """Select "auto" (default), "native", "triton" or "torch" for every later call, in every thread
    (a ``use_backend`` block overrides it in its own thread)."""
    global _selected
    choice = _check_choice(name)
    with _select_lock:
        _selected = choice
        _direct.clear()


# The front end's fast path (functional.normalize_kept): the direct entry (``Backend.direct``) of the backend
# the selection resolves to for a CPU or CUDA weight, by device type.  resolve() fills it, set_backend() clears
# it.  It spares a call the thread-local selection, the device object and the resolution's lookup, several
# microseconds each right after a kernel (benchmarks/NOTES.md, P4).  A thread inside a use_backend block has a
# table of its own for the block's selection (``_local.direct``: (generation, table), made empty when the block
# opens); only while some block is open (``_open_blocks``, any thread) does a call look for it.  _reset_cache
# starts a new generation, which empties every block's table, an outer block's or another thread's included.
_direct: dict[str, object] = {}
_open_blocks = [0]
_blocks_lock = threading.Lock()
_generation = [0]
# set_backend, _reset_cache and resolve's writes to the shared caches: a resolution that raced a change of
# selection or a reset must not leave the old backend in them
_select_lock = threading.Lock()


def _block_table() -> dict[str, object] | None:
    """The fast-path table of the calling thread's innermost use_backend block (None outside blocks)."""
    mine = getattr(_local, "direct", None)
    if mine is None:
        return None
    if mine[0] != _generation[0]:  # made before a _reset_cache
        mine = _local.direct = (_generation[0], {})
    return mine[1]


def direct_entry(weight) -> object | None:
    """The direct entry for a call on ``weight`` (a Tensor) with no per-call backend, or None."""
    table = _direct
    if _open_blocks[0]:
        table = _block_table()
        if table is None:
            table = _direct
    return table.get("cpu") if weight.is_cpu else table.get("cuda") if weight.is_cuda else None


# use_backend's selection, per thread: a block in one thread must not change what another thread runs,
# nor be undone by another thread's block ending first
_local = threading.local()


def get_backend() -> str:
    """The selected backend name: the calling thread's ``use_backend`` block, else ``set_backend``'s
    ("auto" unless set)."""
    return getattr(_local, "choice", None) or _selected


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend for a block, in the calling thread only: ``with sn_kernels.use_backend("torch"): ...``."""
    choice = _check_choice(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    # the thread's open blocks, innermost last: each entry is (choice, fast-path table); _local.choice and
    # _local.direct hold the innermost one's for the per-call reads
    entry = (choice, (_generation[0], {}))
    stack.append(entry)
    with _blocks_lock:
        _open_blocks[0] += 1
    _local.choice, _local.direct = entry
    try:
        yield
    finally:
        # this block's entry goes wherever it is: a block that ends out of order (generators or tasks that
        # interleave their blocks in one thread) leaves the blocks still open in force, and the thread's
        # selection is the default again once every block has ended
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is entry:
                del stack[i]
                break
        _local.choice, _local.direct = stack[-1] if stack else (None, None)
        with _blocks_lock:
            _open_blocks[0] -= 1


def loaded_backend(name: str) -> Backend:
    """The ``Backend`` of an already resolved backend ``name`` (a dict lookup dynamo can trace)."""
    return _loaded[name].backend


_resolved: dict[tuple[str, str], Backend] = {}


def resolve(device: torch.device, backend: str | None = None) -> Backend:
    """The backend that will run a call on ``device`` (a ``backends.contract.Backend``).

    Cached per (selection, device type) so that the per-call cost is a dict lookup.
    """
    choice = get_backend() if backend is None else _check_choice(backend)
    key = (choice, device.type)
    chosen = _resolved.get(key)
    if chosen is None:
        generation = _generation[0]
        chosen = _resolve(choice, device)  # may build the extension: not under the lock
        with _select_lock:
            if _generation[0] == generation:
                _resolved[key] = chosen
    if chosen.direct is not None and backend is None and key[1] in ("cpu", "cuda"):
        if getattr(_local, "choice", None) is not None:  # the calling thread's block's own table
            table = _block_table()
            if key[1] not in table and _resolved.get(key) is chosen:  # not resolved before a reset
                table[key[1]] = chosen.direct
        elif key[1] not in _direct:
            with _select_lock:  # the global table, unless set_backend or _reset_cache came in between
                if choice == _selected and _resolved.get(key) is chosen:
                    _direct[key[1]] = chosen.direct
    return chosen


def _resolve(choice: str, device: torch.device) -> Backend:
    """``resolve`` without its cache."""
    if choice != "auto":
        reason = why_not(choice, device)
        if reason is not None:
            raise RuntimeError(f"sn_kernels backend {choice!r} cannot run on {device.type}: {reason}")
        return _load(choice).backend
    skipped = []
    for name in BACKENDS:
        reason = why_not(name, device, auto=True)
        if reason is None:
            chosen, picked = _load(name).backend, name
            break
        skipped.append((name, reason))
    # the fallback users care about: the compiled extension missing or broken
    native_reason = dict(skipped).get("native")
    if native_reason and device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        warnings.warn(f"sn_kernels: the native backend is unavailable on {device.type} ({native_reason}); "
                      f"using {picked!r}", stacklevel=_outside_stacklevel())
    if skipped and os.environ.get("SN_KERNELS_VERBOSE"):
        notes = "; ".join(f"{n}: {r}" for n, r in skipped)
        print(f"sn_kernels: auto backend on {device.type} skipped {notes}")
    return chosen


# backends whose kernels are real-only: complex weights go to the torch backend
_REAL_ONLY = {
    "native": "its C++/CUDA kernels handle real dtypes only (float16, bfloat16, float32, float64)",
    "triton": "its Triton kernels handle real dtypes only (float16, bfloat16, float32, float64)",
}


# backends whose kernels read strided (dense) weights only: sparse ones go to the torch backend
_STRIDED_ONLY = {
    "native": "its C++/CUDA kernels read strided (dense) weights only",
    "triton": "its Triton kernels read strided (dense) weights only",
}


def _torch_only(what: str, reasons: dict, backend: str | None) -> None:
    """Weights that only the torch backend runs: "auto" and "torch" pass; a backend in ``reasons``,
    requested by name, raises with its reason."""
    choice = get_backend() if backend is None else _check_choice(backend)
    if choice in reasons:
        raise RuntimeError(f"sn_kernels backend {choice!r} cannot run {what}: {reasons[choice]}; use 'auto' or 'torch'")


def check_complex(backend: str | None = None) -> None:
    """Complex weights run on the torch backend (``_torch_only``)."""
    _torch_only("complex weights", _REAL_ONLY, backend)


def check_sparse(weight: torch.Tensor, backend: str | None = None) -> None:
    """Sparse weights (any layout but strided) run on the torch backend (``_torch_only``)."""
    _torch_only(f"a {weight.layout} weight", _STRIDED_ONLY, backend)


def explain(device: torch.device | str = "cpu") -> str:
    """A human-readable account of which backend "auto" picks on ``device`` and why."""
    device = torch.device(device)
    lines = []
    for name in BACKENDS:
        reason = why_not(name, device, auto=True)
        lines.append(f"{name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    for what, reasons in (("complex", _REAL_ONLY), ("sparse", _STRIDED_ONLY)):
        lines.append(f"{what} weights: torch backend (" + "; ".join(f"{n}: {r}" for n, r in reasons.items()) + ")")
    return "\n".join(lines)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised in this package's caller of this function that points at the
    first frame outside sn_kernels and torch (the user's call, whichever front end it went through), so that
    a ``warnings`` filter by module or line applies."""
    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2  # 1: the function that warns
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def _reset_cache() -> None:
    """Forget resolved backends (after building the extension, in tests)."""
    with _select_lock:
        _resolved.clear()
        _direct.clear()
        _generation[0] += 1  # every use_backend block's table, in any thread
        _load_errors.clear()

