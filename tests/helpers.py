"""Shared test helpers: shapes and comparison functions (the tolerance table is sn_kernels.testing.TOL)."""
from __future__ import annotations

import torch

from sn_kernels.testing import TOL, pytorch_formula  # TOL: the one tolerance table, (rtol, atol) by dtype

# (shape, dim) of odd and ordinary weights: 1xn, mx1, non-powers of two, conv, dim=1
SHAPES = [
    ((1, 7), 0),
    ((7, 1), 0),
    ((5,), 0),
    ((13, 29), 0),
    ((33, 17), 1),
    ((6, 4, 3, 3), 0),
    ((4, 6, 3, 3), 1),
    ((3, 5, 2, 2, 2), 1),
]


def sample_inputs(device="cpu", dtype=torch.float32, shape=(13, 29), dim=0, *, seed=0, warmup=0, warmup_order="vu",
                  grad=False):
    """The one input factory: ``(weight, u, v)`` (and ``grad``, a tensor like ``weight``, when asked)
    on ``device`` in ``dtype``, drawn in float64 from a generator seeded with ``seed``; u, v are unit
    vectors of the matrix view with ``dim`` first.  ``warmup`` power-iteration steps in ``warmup_order``
    (float64, PyTorch's formula) bring u, v near the singular vectors: a well-conditioned eval sigma
    (random u, v can make u.Wv tiny and the half-precision gradient overflow)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    m = w.shape[dim]
    n = w.numel() // m
    u = torch.nn.functional.normalize(torch.randn(m, generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(n, generator=g, dtype=torch.float64), dim=0)
    if warmup:
        _, _, u, v = pytorch_formula(w, u, v, warmup, 1e-12, dim, warmup_order)
    out = [w, u, v]
    if grad:
        out.append(torch.randn(shape, generator=g, dtype=torch.float64))
    return tuple(t.to(device, dtype) for t in out)


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """Compare with the table's tolerance for ``dtype`` (default: the actual dtype), widened by ``scale``."""
    dtype = dtype or actual.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def max_rel_dev(actual, expected) -> float:
    """max |a - e| / max(|e|), for reporting the deviations the tests saw."""
    e = expected.double()
    return ((actual.double() - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def planted(m: int, n: int, gap: float = 0.5, dtype=torch.float64, seed: int = 0, top: float = 3.0):
    """An (m, n) matrix with singular values top, top*gap, ... (a clear spectral gap)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = top * gap ** torch.arange(k, dtype=torch.float64)
    return ((U * s) @ V.t()).to(dtype)


# The largest deviations the tests saw, by (what, dtype); printed at the end of the run.
DEVIATIONS: dict[tuple[str, str], float] = {}


def record(what: str, actual, expected) -> float:
    """Remember the largest relative deviation seen for ``what`` at ``actual``'s dtype."""
    dev = max_rel_dev(actual, expected)
    key = (what, str(actual.dtype).replace("torch.", ""))
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), dev)
    return dev


def per_thread_count(fn, counts=(1, 2, 3)) -> list:
    """[fn() with torch using each of ``counts`` threads], the caller's thread count restored after."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


def check(what: str, actual, expected, dtype=None, scale=1.0):
    """``record`` then ``assert_close``: every comparison both reports and can fail."""
    record(what, actual, expected)
    assert_close(actual, expected, dtype=dtype, scale=scale, msg=what)


def hook_of(module, name="weight"):
    """The hook-API spectral norm (PyTorch's or ours) of ``module.<name>``, or None."""
    from sn_kernels.find import find

    site = find(module, name, kind="hook")
    return None if site is None else site.state


# ----------------------------------------------------------------------------- grouped models

class WeightHolder(torch.nn.Module):
    """One bare weight (randn / sqrt(its last size)); calling it returns the (normalized) weight."""

    def __init__(self, shape, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=device) / shape[-1] ** 0.5)

    def forward(self):
        return self.weight


class WeightList(torch.nn.ModuleList):
    """Holders whose call returns every weight."""

    def forward(self):
        return [m() for m in self]


def weight_models(api, iterations, shapes, device="cpu"):
    """Two identical ``WeightList`` models (seeded) of ``shapes`` entries (shape, dim[, dtype]), every
    weight under spectral norm of ``api`` ("hook" or "parametrization")."""
    import copy

    import sn_kernels

    torch.manual_seed(0)
    model = WeightList([WeightHolder(e[0], *e[2:], device=device) for e in shapes])
    for m, e in zip(model, shapes):
        if api == "hook":
            sn_kernels.spectral_norm(m, n_power_iterations=iterations, dim=e[1])
        else:
            sn_kernels.parametrizations.spectral_norm(m, n_power_iterations=iterations, dim=e[1])
    return model, copy.deepcopy(model)


def model_state(model):
    """Copies of every parameter and buffer of ``model``, in order."""
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def model_grads(model):
    return [p.grad for p in model.parameters()]


class TwiceD(torch.nn.Module):
    """A small discriminator whose middle layer is called twice per model call, under spectral norm of
    ``api``: the grouped path's first call of a layer takes the grouped W / sigma, the second its own."""

    def __init__(self, api):
        import sn_kernels

        super().__init__()
        self.a = torch.nn.Conv2d(3, 6, 3)
        self.b = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.c = torch.nn.Linear(6 * 4 * 4, 1)
        sn_kernels.apply_spectral_norm(self, api=api)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(torch.relu(self.b(h))))
        return self.c(h.flatten(1))


def channels_last_group(device):
    """(model, ref, opt, x): two SN convolutions, the second channels_last (parametrization API), grouped
    with the once-per-step refresh of ``opt`` (SGD); ``ref`` an ungrouped copy, ``x`` an input batch."""
    import copy

    import sn_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).to(device)
    model[2].to(memory_format=torch.channels_last)
    sn_kernels.apply_spectral_norm(model, api="parametrization")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sn_kernels.group(model, optimizer=opt)
    return model, ref, opt, torch.randn(2, 3, 9, 9, device=device)


def assert_steps_match(actual, expected, x, training, *, buffer_tol=(1e-4, 1e-5)):
    """Two calls of ``actual`` (an exported or loaded program) and ``expected`` (eager): the same outputs,
    and in training mode the same u, v updates (``buffer_tol``: rtol, atol) and parameter gradients."""
    for _ in range(2):
        y, r = actual(x), expected(x)
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
        if training:
            g = torch.randn_like(r)
            (y * g).sum().backward()
            (r * g).sum().backward()
    if training:
        buffers, params = dict(expected.named_buffers()), dict(expected.named_parameters())
        assert dict(actual.named_buffers()).keys() == buffers.keys()
        assert dict(actual.named_parameters()).keys() == params.keys()
        for name, b in actual.named_buffers():
            torch.testing.assert_close(b, buffers[name], rtol=buffer_tol[0], atol=buffer_tol[1], msg=name)
        for name, p in actual.named_parameters():
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
