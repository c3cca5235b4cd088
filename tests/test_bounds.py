"""Certified spectral-norm bounds (sn_kernels.bounds): sigma_bounds and lipschitz_bound.

Every bound is checked against an exact float64 reference: the SVD of the matrix view
(``svd_sigma``), the SVD of a small conv's dense Jacobian (``dense_operator_norm``), or of
a model's Jacobian.  The bounds carry a relative margin of at least 2^-40 (~1e-12), far
above the references' own rounding (~1e-15), so ``lower <= exact <= upper`` is a strict
test; the tightness checks make a loose but "safe" answer fail too.
"""
from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import sn_kernels
from helpers import SHAPES, planted, record
from sn_kernels import bounds, cholesky_bound
from sn_kernels.bounds import lipschitz_bound, sigma_bounds
from sn_kernels.certified import GRAM_STEPS, gram_upper_bound
from sn_kernels.cholesky_bound import EIGH_MAX_SIDE, SLACKS, cholesky_upper_bound
from sn_kernels.conv_norm import dense_operator_norm, fft_operator_norm, spectral_norm_conv
from sn_kernels.testing import TOL, svd_sigma

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]

RTOL64 = TOL[torch.float64][0]  # 1e-10: what "exact" means for a float64 result here
AUTO_TOL = 2e-8  # 'auto' and adaptive 'gram' stop at upper <= (1 + rtol) lower, rtol = 1e-8 by default


def enclosed(lo: float, hi: float, exact: float, what: str = "") -> None:
    """The check every test uses: lower <= exact <= upper (and a pair of finite, ordered floats)."""
    assert isinstance(lo, float) and isinstance(hi, float)
    assert 0.0 <= lo <= hi, f"{what}: unordered ({lo}, {hi})"
    assert lo <= exact, f"{what}: lower {lo!r} > exact {exact!r} (rel {lo / exact - 1:.3e})"
    assert hi >= exact, f"{what}: upper {hi!r} < exact {exact!r} (rel {hi / exact - 1:.3e})"
    if exact > 0 and what:
        record(f"bounds upper/exact {what.split(':')[0].split()[0]}", torch.tensor(hi / exact, dtype=torch.float64),
               torch.tensor(1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------- matrices

def _spectrum_matrix(m, n, s, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(s, dtype=torch.float64)) @ V.T).to(dtype)


def dense_cases():
    """(name, weight, dim): random and adversarial, fp32/fp64, every shape of helpers.SHAPES."""
    cases = []
    g = torch.Generator().manual_seed(0)
    for i, (shape, dim) in enumerate(SHAPES + [((1, 1), 0), ((3, 50), 0), ((50, 3), 0), ((31, 31), 0),
                                               ((2, 3, 5, 7), 1), ((4, 6, 3, 3), 1), ((6, 4, 1, 1), 0)]):
        for dtype in (torch.float32, torch.float64):
            cases.append((f"randn{shape}/{dim}", torch.randn(shape, generator=g).to(dtype), dim))
    for m, n in ((1, 9), (9, 1), (7, 13), (24, 17), (40, 40)):
        k = min(m, n)
        cases += [
            (f"rank1 {m}x{n}", torch.outer(torch.randn(m, generator=g), torch.randn(n, generator=g)).double(), 0),
            (f"orthogonal-ish {m}x{n}", _spectrum_matrix(m, n, [1.0] * k, m + n), 0),  # flat: all sigma equal
            (f"near repeated {m}x{n}", _spectrum_matrix(m, n, ([1.0, 1 - 1e-12] + [0.5] * k)[:k], m * n), 0),
            (f"near repeated 1e-7 {m}x{n}", _spectrum_matrix(m, n, [2.0] + [2 - 1e-7] * (k - 1), m * n + 1), 0),
            (f"gap 0.5 {m}x{n}", planted(m, n, 0.5, seed=m * n), 0),
        ]
        for scale in (1e30, 1e-30):
            cases.append((f"scale {scale} fp32 {m}x{n}", (torch.randn(m, n, generator=g) * scale).float(), 0))
        for scale in (1e300, 1e-300, 1e-310):  # float64 near overflow, near underflow, subnormal
            cases.append((f"scale {scale} fp64 {m}x{n}", torch.randn(m, n, generator=g, dtype=torch.float64) * scale,
                          0))
    cases.append(("zero", torch.zeros(3, 4), 0))
    cases.append(("one entry", torch.zeros(5, 6).index_put_((torch.tensor([2]), torch.tensor([3])),
                                                           torch.tensor(3.0)), 0))
    cases.append(("bf16", torch.randn(12, 20, generator=g).bfloat16(), 0))
    cases.append(("fp16", torch.randn(20, 12, generator=g).half(), 0))
    return cases


CASES = dense_cases()


def exact_sigma(w: torch.Tensor, dim: int) -> float:
    if w.is_complex():
        return torch.linalg.svdvals(bounds.as_matrix(w.to(torch.complex128), dim))[0].item()
    return svd_sigma(w, dim).item()


@pytest.mark.parametrize("method", ["auto", "gram", "exact"])
def test_dense_enclosure(method):
    """lower <= exact <= upper on every case (dozens of shapes, spectra and scales), for each method."""
    assert len(CASES) > 80
    for name, w, dim in CASES:
        exact = exact_sigma(w, dim)
        lo, hi = sigma_bounds(w, method=method, dim=dim)
        enclosed(lo, hi, exact, f"{method}: {name}")
        if exact == 0:
            assert hi <= 1e-300  # a zero matrix: nothing but rounding slack
            continue
        # tight where promised: 'exact' to ~1e-12, 'auto' and adaptive Gram to rtol=1e-8 (+ margin)
        tol = RTOL64 if method == "exact" else AUTO_TOL
        assert hi / exact - 1 <= tol, f"{method}: {name}: upper {hi / exact - 1:.3e} above"
        assert 1 - lo / exact <= tol, f"{method}: {name}: lower {1 - lo / exact:.3e} below"


def _refresh_bound(kind):
    """(function, its tightness promise(mat)) of the two host-free bounds that bound='upper' refreshes with."""
    if kind == "gram":  # the Gram worst case k^(1/2^(T+1)) (a flat spectrum)
        return gram_upper_bound, lambda mat: min(mat.shape) ** (1 / 2 ** (GRAM_STEPS + 1)) if min(mat.shape) > 1 else 1.0
    return cholesky_upper_bound, lambda mat: math.sqrt(1 + SLACKS[0]) * (1 + 1e-10)  # the first candidate held


@pytest.mark.parametrize("kind", ["gram", "cholesky"])
def test_refresh_bound_tensor(kind):
    """certified.gram_upper_bound and cholesky_bound.cholesky_upper_bound (the host-free tensor bounds that
    bound='upper' refreshes with) enclose sigma on every real case, adversarial scales included, within
    their promised tightness."""
    fn, promise = _refresh_bound(kind)
    for name, w, dim in CASES:
        if w.is_complex():
            continue
        mat = bounds.as_matrix(w, dim)
        upper = fn(mat)
        assert upper.dtype == torch.float64 and upper.dim() == 0
        exact = exact_sigma(w, dim)
        hi = upper.item()
        assert hi >= exact, f"{kind}: {name}: {hi!r} < {exact!r}"
        if exact > 0:
            assert hi <= exact * promise(mat) * (1 + 1e-9) or hi <= 1e-290, name
            record(f"{kind} refresh bound upper/exact", torch.tensor(hi / exact, dtype=torch.float64),
                   torch.tensor(1.0, dtype=torch.float64))
        else:
            assert hi < 1  # a zero matrix: slack only (the absolute 2^-1000 per step, square-rooted)


def _lanczos_cases():
    """Matrices whose smaller side is above cholesky_bound.EIGH_MAX_SIDE: the estimate comes from Lanczos."""
    k = EIGH_MAX_SIDE + 44
    g = torch.Generator().manual_seed(7)
    return {
        "randn fp64": torch.randn(k, 2 * k, generator=g, dtype=torch.float64),
        "randn fp32 wide": torch.randn(k + 100, 3 * k, generator=g),
        "randn fp32 tall": torch.randn(3 * k, k + 1, generator=g) * 1e-20,
        "flat": _spectrum_matrix(k, k, [1.0] * k, 1),  # Lanczos breaks down at once
        "rank 1": torch.outer(torch.randn(k, generator=g, dtype=torch.float64), torch.randn(k + 9, generator=g,
                                                                                       dtype=torch.float64)),
        "rank 3": _spectrum_matrix(k, k + 20, [3.0, 2.0, 1.0], 2),
        "near repeated 1e-7": _spectrum_matrix(k, k + 50, [2.0] + [2 - 1e-7] * (k - 1), 3),
        "cluster 1e-4 steps": _spectrum_matrix(k, 2 * k, [1.0 - 1e-4 * i for i in range(k)], 5),
        "zero": torch.zeros(k, k),
    }


def test_cholesky_bound_with_lanczos_estimate():
    """Above EIGH_MAX_SIDE (the Lanczos estimate, breakdowns included): enclosed, and tight to the first
    slack candidate (2^-40: Lanczos converged; with 64 steps the clustered case needed the second)."""
    for name, mat in _lanczos_cases().items():
        hi = cholesky_upper_bound(mat).item()
        exact = svd_sigma(mat).item()
        assert hi >= exact, f"{name}: {hi!r} < {exact!r}"
        if exact > 0:
            assert hi / exact <= math.sqrt(1 + SLACKS[0]) * (1 + 1e-10), f"{name}: {hi / exact - 1:.3e}"
            record("cholesky refresh bound upper/exact (Lanczos)", torch.tensor(hi / exact, dtype=torch.float64),
                   torch.tensor(1.0, dtype=torch.float64))
        else:
            assert hi < 1


@pytest.mark.parametrize("off", [1 - 2.0 ** -20, 0.5, 2.0, float("nan")], ids=["low", "half", "double", "nan"])
def test_cholesky_certificate_does_not_trust_the_estimate(off, monkeypatch):
    """The bound rests on the Cholesky factorizations, not on the estimate: an estimate 2^-20 too low makes
    the first two candidates fail (the third, 2^-12, holds), half of it or NaN all three (the Frobenius norm
    of the Gram matrix is left), twice only loosens it.  Enclosed every time."""
    real = cholesky_bound._estimate
    monkeypatch.setattr(cholesky_bound, "_estimate", lambda kmat: real(kmat) * off)
    g = torch.Generator().manual_seed(11)
    for mat in (torch.randn(40, 90, generator=g, dtype=torch.float64), _spectrum_matrix(30, 30, [1.0] * 30, 4),
                _spectrum_matrix(50, 60, [2.0, 1.9] + [0.1] * 48, 5)):
        exact = svd_sigma(mat).item()
        ratio = cholesky_bound.cholesky_upper_bound(mat).item() / exact
        s = torch.linalg.svdvals(mat)
        frobenius = (s ** 4).sum().item() ** 0.25 / exact  # sqrt(||M^T M||_F) / sigma
        assert ratio >= 1
        if off > 1:  # the first candidate holds
            expected = math.sqrt(off * (1 + cholesky_bound.SLACKS[0]))
        elif off > 1 - 2.0 ** -12:  # the last one holds
            expected = math.sqrt(off * (1 + cholesky_bound.SLACKS[-1]))
        else:  # none
            expected = frobenius
        assert ratio == pytest.approx(min(expected, frobenius), rel=1e-9)


def test_cholesky_bound_gradient():
    """Its gradient is B / sigma times sigma_1's, u v^T (gradcheck and gradgradcheck, float64), formed in
    float32 for a float32 weight (float32's rounding of the float64 result)."""
    g = torch.Generator().manual_seed(2)
    for shape in ((4, 12), (12, 4), (1, 7), (30, 7)):
        w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(cholesky_upper_bound, (w,))
        assert torch.autograd.gradgradcheck(cholesky_upper_bound, (w,))
    for shape in ((128, 300), (300, 20)):  # Lanczos (k > 256) and eigh
        w64 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        b = cholesky_upper_bound(w64)
        b.backward()
        u, s, vh = torch.linalg.svd(w64.detach())
        expected = torch.outer(u[:, 0], vh[0]) * (b.detach() / s[0])
        torch.testing.assert_close(w64.grad, expected, rtol=1e-9, atol=1e-10)  # q: one inverse-iteration step
        w32 = w64.detach().float().requires_grad_()
        cholesky_upper_bound(w32).backward()
        assert w32.grad.dtype == torch.float32
        torch.testing.assert_close(w32.grad, expected.float(), rtol=1e-4, atol=1e-6)


def test_dense_complex():
    """Complex matrices (Tensors; conv weights are refused below) are bounded too."""
    g = torch.Generator().manual_seed(1)
    for shape in ((5, 9), (9, 5), (1, 4), (16, 16)):
        for dtype in (torch.complex64, torch.complex128):
            w = torch.randn(shape, generator=g, dtype=dtype)
            exact = exact_sigma(w, 0)
            for method in ("auto", "gram", "exact"):
                lo, hi = sigma_bounds(w, method=method)
                enclosed(lo, hi, exact, f"{method}: complex {shape}")
                assert hi / exact - 1 < 1e-6


def test_gram_fixed_iterations_converge():
    """Gram iteration with a fixed step count: certified at every step, never above the Frobenius
    norm, within k^(1/2^(t+1)) of sigma on a flat spectrum, and exact once a gap has acted."""
    flat = _spectrum_matrix(48, 32, [1.0] * 32, 3)  # sigma = 1, multiplicity 32
    fro = torch.linalg.matrix_norm(flat).item()
    prev = math.inf
    for t in range(0, 9):
        lo, hi = sigma_bounds(flat, method="gram", n_iter=t)
        enclosed(lo, hi, 1.0, f"gram-fixed n_iter={t}: flat")
        assert hi <= prev * (1 + 1e-12)
        assert hi <= 32 ** (1 / 2 ** (t + 1)) * (1 + 1e-9)  # the Gram bound's worst case
        if t == 0:
            assert hi == pytest.approx(fro, rel=1e-9)  # zero steps: the Frobenius norm
        prev = hi
    assert prev - 1 > 1e-4  # 8 steps are not enough on a flat spectrum: the bound is not faked
    gap = planted(40, 30, 0.5)  # sigma_2 / sigma_1 = 0.5
    lo, hi = sigma_bounds(gap, method="gram", n_iter=6)
    exact = svd_sigma(gap).item()
    enclosed(lo, hi, exact, "gram-fixed n_iter=6: gap 0.5")
    assert hi / exact - 1 < RTOL64


def test_scales_are_not_lost():
    """Scaling by powers of two keeps huge and tiny (subnormal) weights exact: naive float64 Gram
    steps would overflow to inf or flush to 0 here."""
    w = torch.randn(20, 10, dtype=torch.float64)
    for e in (1000, -1060):
        ws = w * 2.0 ** e  # at 2^-1060 the entries are subnormal (rounded): the reference scales them back
        exact = math.ldexp(svd_sigma(ws * 2.0 ** (-e // 2) * 2.0 ** (-e - (-e // 2))).item(), e)
        lo, hi = sigma_bounds(ws)
        assert 0 < lo <= exact <= hi < math.inf
        tol = RTOL64 + 4 * 2.0 ** -1074 / exact  # a subnormal result is itself only so precise
        assert hi / exact - 1 < tol and 1 - lo / exact < tol


def test_checker_catches_wrong_bounds():
    """The enclosure check fails for bounds that look right but are not certified: an fp32 Rayleigh
    quotient with the exact singular vectors (no margin) exceeds sigma in about half the cases,
    and a power-iteration estimate returned as the upper bound is below it."""
    caught = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(31, 17, generator=g)
        U, _, Vh = torch.linalg.svd(w.double())
        naive = torch.dot(U[:, 0].float(), w @ Vh[0].float()).abs().item()
        exact = svd_sigma(w).item()
        try:
            enclosed(naive, max(naive, exact), exact)
        except AssertionError:
            caught += 1
        lo, hi = sigma_bounds(w)  # the certified pair passes on the same cases
        enclosed(lo, hi, exact)
    assert caught >= 3
    w = _spectrum_matrix(30, 20, [1.0, 0.999] + [0.5] * 18, 7)
    v = torch.randn(20, dtype=torch.float64)
    for _ in range(3):
        v = w.T @ (w @ v)
    estimate = (torch.linalg.vector_norm(w @ v) / torch.linalg.vector_norm(v)).item()
    with pytest.raises(AssertionError, match="upper"):
        enclosed(estimate, estimate, svd_sigma(w).item())


def test_modules_linear_embedding():
    torch.manual_seed(0)
    for m in (nn.Linear(13, 7), nn.Linear(1, 5), nn.Embedding(11, 6), nn.Linear(8, 8, dtype=torch.float64)):
        exact = svd_sigma(m.weight).item()
        lo, hi = sigma_bounds(m)
        enclosed(lo, hi, exact, type(m).__name__)
        assert hi / exact - 1 < AUTO_TOL
        assert sigma_bounds(m, input_shape=(3, 4)) == (lo, hi)  # input_shape is ignored for matrices


# ----------------------------------------------------------------------------- convolutions

def _conv_config(i: int):
    """A seeded random valid conv layer and input spatial size: every padding mode, stride, dilation,
    groups, 1-D/2-D/3-D, 'same'/'valid'/tuples, ConvTranspose with output_padding."""
    rng = random.Random(i)
    while True:
        nd = rng.choice((1, 1, 2, 2, 2, 3))
        transposed = rng.random() < 0.3
        groups = rng.choice((1, 1, 2))
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
        k = tuple(rng.randint(1, 4) for _ in range(nd))
        stride = tuple(rng.choice((1, 1, 2, 3)) for _ in range(nd))
        dil = tuple(rng.choice((1, 1, 2)) for _ in range(nd))
        size = {1: (4, 13), 2: (3, 7), 3: (2, 4)}[nd]
        spatial = tuple(rng.randint(*size) for _ in range(nd))
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        kw = dict(stride=stride, dilation=dil, groups=groups, bias=False)
        try:
            if transposed:
                cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
                pad = tuple(rng.randint(0, (d * (kk - 1)) // 2) for d, kk in zip(dil, k))
                out_pad = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dil))
                m = cls(c_in, c_out, k, padding=pad, output_padding=out_pad, **kw)
            else:
                mode = rng.choice(("zeros", "circular", "reflect", "replicate"))
                choice = rng.random()
                if choice < 0.2 and all(s == 1 for s in stride):
                    pad = "same"
                elif choice < 0.3:
                    pad = "valid"
                else:
                    pad = tuple(rng.randint(0, min(n - 1, 2)) for n in spatial)
                m = cls(c_in, c_out, k, padding=pad, padding_mode=mode, **kw)
            torch.manual_seed(i)
            m = m.double()
            with torch.no_grad():
                y = m(torch.zeros(1, c_in, *spatial, dtype=torch.float64))
            if y.numel():
                return m, spatial
        except (RuntimeError, ValueError):
            pass


N_CONV = 60
CONV_IDS = [f"conv{i}" for i in range(N_CONV)]


@pytest.mark.parametrize("i", range(N_CONV), ids=CONV_IDS)
def test_conv_enclosure(i):
    """Each method encloses the SVD of the dense Jacobian of the true operator; 'exact' (and 'auto',
    which takes the exact route for layers this small) to rounding."""
    m, spatial = _conv_config(i)
    exact = dense_operator_norm(m, (m.in_channels, *spatial)).item()
    for method in ("auto", "fft", "gram", "exact"):
        lo, hi = sigma_bounds(m, method=method, input_shape=spatial)
        enclosed(lo, hi, exact, f"{method}: {m} @ {spatial}")
        if method in ("exact", "auto"):  # auto: the exact route at these sizes
            assert hi / exact - 1 < RTOL64 and 1 - lo / exact < RTOL64
        elif m.padding_mode in ("zeros", "circular"):
            assert hi / exact < 3.0, f"{method}: {m} @ {spatial}: {hi / exact}"  # no gross looseness


def test_conv_configs_cover_everything():
    seen = set()
    for i in range(N_CONV):
        m, _ = _conv_config(i)
        seen.add(type(m).__name__)
        seen.add(m.padding_mode)
        seen.add(("stride>1", max(m.stride) > 1))
        seen.add(("dilation", max(m.dilation) > 1))
        seen.add(("groups", m.groups > 1))
        if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            seen.add(("output_padding", max(m.output_padding) > 0))
        if isinstance(m.padding, str):
            seen.add(m.padding)
    for need in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "zeros",
                 "circular", "reflect", "replicate", "same", "valid", ("stride>1", True), ("dilation", True),
                 ("groups", True), ("output_padding", True)):
        assert need in seen, need


# the ones the spectrum gives exactly: circular layers whose output is the whole (strided) grid
CIRCULAR = [
    (lambda: nn.Conv1d(3, 5, 3, padding=1, padding_mode="circular"), (11,)),
    (lambda: nn.Conv1d(4, 6, 5, padding=4, dilation=2, groups=2, padding_mode="circular"), (9,)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (6, 7)),
    (lambda: nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular", groups=4), (5, 5)),
    (lambda: nn.Conv2d(2, 3, (3, 5), padding=(1, 2), padding_mode="circular"), (4, 6)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"), (6, 8)),  # polyphase
    (lambda: nn.Conv2d(2, 3, 4, stride=2, padding=1, padding_mode="circular"), (6, 4)),
    (lambda: nn.Conv2d(4, 4, 5, padding=2, padding_mode="circular"), (3, 3)),  # kernel wraps around
    (lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), (4, 3, 5)),
    (lambda: nn.Conv3d(2, 2, 3, stride=(1, 2, 1), padding=1, padding_mode="circular"), (3, 4, 3)),
]


@pytest.mark.parametrize("i", range(len(CIRCULAR)), ids=[f"circ{i}" for i in range(len(CIRCULAR))])
def test_fft_exact_for_circular(i):
    """fft (and auto, and adaptive gram) match the dense Jacobian's sigma to 1e-6 for circular convs."""
    ctor, spatial = CIRCULAR[i]
    torch.manual_seed(100 + i)
    m = ctor().double()
    exact = dense_operator_norm(m, (m.in_channels, *spatial)).item()
    for method in ("fft", "auto", "gram"):
        lo, hi = sigma_bounds(m, method=method, input_shape=spatial)
        enclosed(lo, hi, exact, f"{method}: circular {i}")
        assert hi / exact - 1 < 1e-6 and 1 - lo / exact < 1e-6, (method, lo / exact - 1, hi / exact - 1)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.stride == (1, 1) and max(m.kernel_size) <= min(spatial):
        assert fft_operator_norm(m.weight, spatial).item() == pytest.approx(exact, rel=1e-10)


def test_fft_large_circular_against_fft_operator_norm():
    """A layer too large for a dense Jacobian: the fft bound pins conv_norm.fft_operator_norm."""
    torch.manual_seed(5)
    m = nn.Conv2d(16, 24, 3, padding=1, padding_mode="circular").double()
    ref = fft_operator_norm(m.weight, (32, 32)).item()
    lo, hi = sigma_bounds(m, input_shape=(32, 32))
    enclosed(lo, hi, ref, "fft 16->24 @ 32x32")
    assert hi / ref - 1 < 1e-9 and 1 - lo / ref < 1e-6


def test_conv_tightness_zero_padding():
    """Zero padding: the circular bound approaches the true norm as the input grows (boundary effects
    shrink), and stays within a few percent at 16x16."""
    torch.manual_seed(3)
    m = nn.Conv2d(3, 4, 3, padding=1).double()
    ratios = []
    for n in (4, 8, 16):
        exact = dense_operator_norm(m, (3, n, n)).item()
        lo, hi = sigma_bounds(m, method="fft", input_shape=(n, n))
        enclosed(lo, hi, exact, f"zeros @ {n}")
        ratios.append(hi / exact)
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1.05, ratios


def test_conv_weight_dtype_and_input_shape_forms():
    torch.manual_seed(4)
    m = nn.Conv2d(3, 5, 3, stride=2, padding=1)  # float32 weights, bounded exactly as they are
    exact = dense_operator_norm(m, (3, 7, 6)).item()
    pairs = {sigma_bounds(m, input_shape=s) for s in ((7, 6), (3, 7, 6), (4, 3, 7, 6), [7, 6])}
    assert len(pairs) == 1
    enclosed(*pairs.pop(), exact, "fp32 conv")
    c1 = nn.Conv1d(2, 2, 3, padding=1)
    assert sigma_bounds(c1, input_shape=9) == sigma_bounds(c1, input_shape=(9,))


# ----------------------------------------------------------------------------- errors

def test_errors():
    w = torch.randn(4, 5)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="unknown method"):
        sigma_bounds(w, method="svd")
    with pytest.raises(ValueError, match="needs input_shape"):
        sigma_bounds(conv)
    with pytest.raises(ValueError, match="expected 2 .spatial., 3 .C, \\*spatial. or 4"):
        sigma_bounds(conv, input_shape=(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="has 2 channels, the layer takes 3"):
        sigma_bounds(conv, input_shape=(2, 8, 8))
    with pytest.raises(ValueError, match="invalid for this layer|empty output"):
        sigma_bounds(conv, input_shape=(2, 2))
    with pytest.raises(TypeError, match="ReLU has no weight"):
        sigma_bounds(nn.ReLU())
    with pytest.raises(TypeError, match="supports Tensors.*got LayerNorm"):
        sigma_bounds(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="Tensor or a layer"):
        sigma_bounds([[1.0, 2.0]])
    with pytest.raises(ValueError, match="empty weight"):
        sigma_bounds(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-finite"):
        sigma_bounds(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="floating-point"):
        sigma_bounds(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="0-d"):
        sigma_bounds(torch.tensor(2.0))
    with pytest.raises(ValueError, match="dim 2 out of range"):
        sigma_bounds(w, dim=2)
    with pytest.raises(ValueError, match="n_iter"):
        sigma_bounds(w, n_iter=-1)
    with pytest.raises(ValueError, match="rtol"):
        sigma_bounds(w, rtol=0)
    with pytest.raises(ValueError, match="'fft' bounds convolutions"):
        sigma_bounds(w, method="fft")
    with pytest.raises(TypeError, match="complex conv"):
        sigma_bounds(nn.Conv1d(2, 2, 3, dtype=torch.complex64), input_shape=(8,))
    with pytest.raises(ValueError, match="'exact' is for matrices with a side <= 4096"):
        sigma_bounds(torch.ones(1, 1).expand(4097, 4097), method="exact")
    with pytest.raises(ValueError, match="dense Jacobian .* too large"):
        sigma_bounds(conv, method="exact", input_shape=(64, 64))


def test_conv_input_shape_sizes_are_ints():
    """A float or string size is refused, not truncated (as lipschitz_bound does); any integer type is fine."""
    conv = nn.Conv2d(2, 3, 3, padding=1)
    for bad in ((8.9, 8.9), (8.0, 8), (2, 8.5, 8.5), "88", (8, None)):
        with pytest.raises(TypeError, match="input_shape must be an int or a sequence of ints"):
            sigma_bounds(conv, input_shape=bad)
    with pytest.raises(ValueError, match="negative size"):
        sigma_bounds(conv, input_shape=(-1, 2, 8, 8))  # the batch size is ignored, but not a negative one
    with pytest.raises(ValueError, match="empty dim"):
        sigma_bounds(conv, input_shape=(0, 8))
    ints = (torch.Size([8, 8]), torch.tensor([8, 8]), (np.int64(8), np.int32(8)), (0, 2, 8, 8))
    assert len({sigma_bounds(conv, input_shape=s) for s in ints + ((8, 8),)}) == 1


def test_meta_weight_is_refused():
    for x in (torch.randn(3, 4, device="meta"), nn.Linear(3, 4, device="meta")):
        with pytest.raises(ValueError, match="meta tensor has no values"):
            sigma_bounds(x)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\).*meta tensor has no values"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 4, device="meta")), (1, 3))


# ----------------------------------------------------------------------------- lipschitz_bound

def _jacobian_sigma(model, x):
    jac = torch.func.jacrev(model)(x)
    return torch.linalg.svdvals(jac.reshape(model(x).numel(), x.numel()))[0].item()


def test_lipschitz_linear_chain_is_the_product():
    """A chain of linear maps: the bound is the product of the layers' sigmas (to 1e-10), and at least
    the norm of the product matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Sequential(nn.Identity(), nn.Linear(9, 4)), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    product = math.prod(svd_sigma(m.weight).item() for m in linears)
    total = linears[2].weight @ linears[1].weight @ linears[0].weight
    bound = lipschitz_bound(model, (1, 6))
    assert bound == pytest.approx(product, rel=3 * AUTO_TOL) and bound >= product
    assert bound >= svd_sigma(total).item()


def test_lipschitz_relu_chain_above_jacobians():
    """A small conv/ReLU/pool chain: the bound is above the Jacobian norm at random points and above
    every difference quotient tried."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2),
    ).double().eval()
    shape = (1, 2, 8, 8)
    bound = lipschitz_bound(model, shape)
    seen = 0.0
    for seed in range(4):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        seen = max(seen, _jacobian_sigma(model, x))
        y = x + 1e-3 * torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            seen = max(seen, (torch.linalg.vector_norm(model(x) - model(y)) / torch.linalg.vector_norm(x - y)).item())
    assert 0 < seen <= bound
    layers = [sigma_bounds(model[0], input_shape=shape)[1], 0.5, sigma_bounds(model[3], input_shape=(1, 4, 4, 4))[1],
              1.0, sigma_bounds(model[7])[1], sigma_bounds(model[10])[1]]
    assert bound == pytest.approx(math.prod(layers), rel=1e-10)  # the layers' bounds, 1/2 for the average pool


def test_lipschitz_single_layers():
    torch.manual_seed(2)
    conv = nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1).double()
    assert lipschitz_bound(conv, (1, 3, 5, 5)) == sigma_bounds(conv, input_shape=(5, 5))[1]
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 3.0, 0.25]))
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    assert lipschitz_bound(bn, x.shape) == pytest.approx(_jacobian_sigma(bn, x), rel=1e-12)
    assert lipschitz_bound(bn, x.shape) >= 2 / math.sqrt(3 + bn.eps)
    for act, const in ((nn.Sigmoid(), 0.25), (nn.GELU(), 1.13), (nn.GELU("tanh"), 1.13), (nn.SiLU(), 1.1),
                       (nn.ELU(2.0), 2.0), (nn.ELU(0.5), 1.0), (nn.CELU(3.0), 1.0), (nn.LeakyReLU(3.0), 3.0)):
        assert lipschitz_bound(act, (4,)) == const
        t = torch.linspace(-8, 8, 100001, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(act(t).sum(), t)
        assert grad.abs().max().item() <= const  # the constant really bounds the slope


POOLS = [
    (nn.AvgPool2d(3, stride=2, padding=1), (1, 1, 7, 6)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (1, 1, 8, 6)),
    (nn.AvgPool2d(2, divisor_override=3), (1, 2, 6, 6)),
    (nn.AvgPool1d(3, stride=1, padding=1), (1, 2, 7)),
    (nn.AdaptiveAvgPool2d((3, 2)), (1, 2, 7, 5)),
    (nn.AvgPool3d(2, stride=1), (1, 1, 3, 4, 3)),
    (nn.MaxPool2d(3, stride=1, padding=1), (1, 1, 5, 5)),
    (nn.MaxPool1d(3, stride=2, dilation=2, ceil_mode=True), (1, 1, 10)),
    (nn.AdaptiveMaxPool2d(3), (1, 1, 7, 7)),
]


@pytest.mark.parametrize("i", range(len(POOLS)), ids=[type(p).__name__ + str(i) for i, (p, _) in enumerate(POOLS)])
def test_lipschitz_pooling(i):
    """Average pooling: its exact norm; max pooling: above every Jacobian (equal where an input is the
    max of the most windows, as on a constant input)."""
    layer, shape = POOLS[i]
    bound = lipschitz_bound(layer, shape)
    if "Max" in type(layer).__name__:
        x = torch.randn(shape, dtype=torch.float64)
        assert _jacobian_sigma(layer, x) <= bound
        assert bound ** 2 == pytest.approx(round(bound ** 2), rel=1e-12)  # sqrt of a window count
    else:
        exact = _jacobian_sigma(layer, torch.randn(shape, dtype=torch.float64))
        assert exact <= bound <= exact * (1 + 1e-9)


def test_lipschitz_refuses_non_chains():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.f(x)

    with pytest.raises(TypeError, match=r"layer '1' \(Residual\)"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4), Residual()), (1, 4))
    with pytest.raises(TypeError, match=r"layer '0.2' \(LayerNorm\)"):
        lipschitz_bound(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))), (1, 4))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lipschitz_bound(nn.Sequential(nn.MultiheadAttention(4, 2)), (1, 4))
    with pytest.raises(TypeError, match=r"'Residual' \(Residual\)"):
        lipschitz_bound(Residual(), (1, 4))
    with pytest.raises(TypeError, match="Embedding"):
        lipschitz_bound(nn.Sequential(nn.Embedding(5, 4)), (1, 4))
    with pytest.raises(ValueError, match="BatchNorm1d.*training mode"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (2, 4))
    with pytest.raises(ValueError, match="takes 4 features"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4)), (1, 5))
    with pytest.raises(ValueError, match="layer '0' \\(Conv2d\\)"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(3, 3, 3)), (1, 2, 8, 8))


def test_lipschitz_input_shape_errors():
    """The documented ValueError for a shape that does not fit, naming the layer; TypeError for a non-integer size."""
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    with pytest.raises(ValueError, match="at least one dim"):
        lipschitz_bound(mlp, ())
    with pytest.raises(ValueError, match="negative size"):
        lipschitz_bound(mlp, (-1, 3))
    with pytest.raises(ValueError, match="negative size"):
        lipschitz_bound(nn.ReLU(), (-1, 2))
    for bad in ((1, 3.0), "13", None):
        with pytest.raises(TypeError, match="input_shape must be an int or a sequence of ints"):
            lipschitz_bound(mlp, bad)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\).*\(C, \*spatial\) or \(N, C, \*spatial\)"):
        lipschitz_bound(cnn, (8, 8))  # the spatial size alone is sigma_bounds' form, not an input shape
    with pytest.raises(ValueError, match=r"layer '0' \(MaxPool2d\).*does not fit"):
        lipschitz_bound(nn.Sequential(nn.MaxPool2d(2)), (8,))
    with pytest.raises(ValueError, match=r"layer '1' \(Unflatten\).*does not fit"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (3, 3))), (1, 3))
    with pytest.raises(ValueError, match=r"layer '0' \(BatchNorm2d\).*does not fit"):
        lipschitz_bound(nn.Sequential(nn.BatchNorm2d(4).eval()), (1, 3, 8, 8))
    with pytest.raises(ValueError) as err:
        lipschitz_bound(mlp, (1, 5))
    assert str(err.value).count("layer '0' (Linear)") == 1, err.value  # named once, not twice
    assert len({lipschitz_bound(mlp, s) for s in (torch.Size([1, 3]), (np.int64(0), 3), (3,), 3)}) == 1
    assert lipschitz_bound(cnn[:2], (2, 8, 8)) == lipschitz_bound(cnn[:2], (1, 2, 8, 8))  # unbatched, as conv2d takes



def test_lipschitz_counts_a_shared_module_each_time():
    """Sequential(lin, lin) applies lin twice: the bound is sigma^2, not sigma (named_children() lists a
    shared module once); the same for a shared activation and a shared inner Sequential."""
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(2 * torch.eye(3))
    act = nn.LeakyReLU(3.0)
    inner = nn.Sequential(lin)
    for model, exact in ((nn.Sequential(lin, lin), 4.0), (nn.Sequential(act, act), 9.0),
                         (nn.Sequential(inner, nn.ReLU(), inner), 4.0)):
        assert exact <= lipschitz_bound(model, (1, 3)) <= exact * (1 + 1e-8)


def test_lipschitz_refuses_what_its_class_does_not_describe():
    """A subclass that overrides forward (a residual Sequential, a scaled Linear) or a forward hook of
    unknown effect would be bounded by the wrong map: refused.  The spectral norms' and weight_norm's
    own hooks are not."""
    class ResidualSequential(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 10 * super().forward(x)

    with pytest.raises(TypeError, match="ResidualSequential overrides the forward of Sequential"):
        lipschitz_bound(ResidualSequential(nn.Linear(3, 3)), (1, 3))
    with pytest.raises(TypeError, match="Scaled overrides the forward of Linear"):
        lipschitz_bound(nn.Sequential(Scaled(3, 3)), (1, 3))
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, i, o: 10 * o)
    with pytest.raises(TypeError, match="forward hook"):
        lipschitz_bound(nn.Sequential(hooked), (1, 3))
    pre = nn.Sequential(nn.Linear(3, 3))
    pre.register_forward_pre_hook(lambda m, i: (10 * i[0],))
    with pytest.raises(TypeError, match="forward pre-hook"):
        lipschitz_bound(pre, (1, 3))
    instance = nn.Linear(3, 3)
    plain_forward = instance.forward
    instance.forward = lambda x: 10 * plain_forward(x)
    with pytest.raises(TypeError, match="forward is replaced on the instance"):
        lipschitz_bound(nn.Sequential(instance, nn.ReLU()), (1, 3))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(TypeError, match="global module forward hook"):
            lipschitz_bound(nn.Sequential(nn.Linear(3, 3)), (1, 3))
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="no Lipschitz constant"):
        lipschitz_bound(nn.CELU(alpha=-1.0), (1, 4))
    with pytest.raises(TypeError):
        lipschitz_bound(nn.Linear(3, 3), (1, 3.5))
    # spectral norms (both APIs, ours and PyTorch's), grouped, and the hook-based weight_norm are bounded
    ours = nn.Sequential(sn_kernels.spectral_norm(nn.Linear(3, 3)), nn.ReLU(),
                         sn_kernels.parametrizations.spectral_norm(nn.Linear(3, 3)),
                         torch.nn.utils.spectral_norm(nn.Linear(3, 3)))
    sn_kernels.group(ours)
    assert math.isfinite(lipschitz_bound(ours, (1, 3)))


def test_lipschitz_batchnorm_eps_as_the_forward_adds_it():
    """A float32 BatchNorm adds its eps rounded to float32: the bound takes the smaller of the two, so it is
    above the layer's actual slope even where that rounding matters (a subnormal eps, a zero variance)."""
    bn = nn.BatchNorm1d(1, eps=2e-45).eval()
    with torch.no_grad():
        bn.running_var.zero_()
        bn.weight.fill_(1e-22)
    x = torch.zeros(2, 1)
    x[1, 0] = 1e-20
    slope = ((bn(x)[1] - bn(x)[0]) / 1e-20).abs().item()
    assert slope > 2.6  # 1e-22 / sqrt(fl32(2e-45) = 1.4e-45)
    assert lipschitz_bound(bn, (2, 1)) >= slope


def test_certified_bounds_refuse_flushed_subnormals():
    """With subnormals flushed to zero (torch.set_flush_denormal(True)) the rounding model of every bound fails
    (a weight of tiny entries bounds as zero): sigma_bounds, lipschitz_bound and a certified spectral norm's
    forward refuse, naming the setting; plain spectral norm still runs."""
    layer = sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 3), bound="upper")
    plain = sn_kernels.parametrizations.spectral_norm(nn.Linear(4, 3))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        for call in (lambda: sigma_bounds(torch.randn(3, 4)), lambda: lipschitz_bound(nn.Linear(4, 3), (1, 4)),
                     lambda: layer(torch.randn(2, 4))):
            with pytest.raises(RuntimeError, match=r"flushed to zero \(torch.set_flush_denormal\(True\)\)"):
                call()
        plain(torch.randn(2, 4))
    finally:
        torch.set_flush_denormal(False)
    layer(torch.randn(2, 4))


def test_lipschitz_of_hook_weight_norm_uses_the_next_forwards_weight():
    """torch.nn.utils.weight_norm (the hook API) leaves module.weight as its last forward computed it; after
    an optimizer step the next forward uses g, v as they are now, and so must the bound."""
    with pytest.warns(FutureWarning):
        wn = torch.nn.utils.weight_norm(nn.Linear(5, 5))
    wn(torch.randn(1, 5))
    with torch.no_grad():
        wn.weight_g.mul_(10)
    w_next = wn.weight_g * wn.weight_v / wn.weight_v.norm(dim=1, keepdim=True)
    exact = torch.linalg.matrix_norm(w_next.detach().double(), 2).item()
    lo, hi = sigma_bounds(wn)
    assert lo <= exact * (1 + 1e-6) and exact <= hi * (1 + 1e-6)
    assert exact <= lipschitz_bound(wn, (1, 5)) * (1 + 1e-6)


def test_lipschitz_dropout_in_training_mode():
    """A training-mode dropout scales what it keeps by 1 / (1 - p); eval mode is the identity."""
    drop = nn.Dropout(0.5)
    assert lipschitz_bound(drop, (1, 4)) >= 2.0
    assert lipschitz_bound(drop.eval(), (1, 4)) == 1.0
    with pytest.raises(ValueError, match=r"\(AlphaDropout\) in training mode"):
        lipschitz_bound(nn.AlphaDropout(0.5), (1, 4))


WRAPS = {
    "torch_hook": torch.nn.utils.spectral_norm,
    "torch_param": torch.nn.utils.parametrizations.spectral_norm,
    "sn_hook": sn_kernels.spectral_norm,
    "sn_param": sn_kernels.parametrizations.spectral_norm,
    "conv_hook": spectral_norm_conv,
    "conv_param": lambda m: spectral_norm_conv(m, api="parametrization"),
}


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_spectrally_normalized_layers(wrap, layer):
    """SN-wrapped layers (both APIs, sn_kernels' and PyTorch's, matrix and conv mode) are bounded for
    the weight an eval forward uses, W / sigma_hat from the current u, v, and nothing changes: not
    u, v, not the training flag, not the logged sigma."""
    if wrap.startswith("conv") and layer == "linear":
        pytest.skip("conv mode wraps convolutions only")
    torch.manual_seed(3)
    m = nn.Linear(12, 9) if layer == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    m = WRAPS[wrap](m).double()
    shape = (2, 12) if layer == "linear" else (2, 3, 6, 6)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            m(x)  # training forwards: u, v move
        # a step: W moved since u, v were last updated, so W / sigma_hat is not 1-Lipschitz
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = copy.deepcopy(m.state_dict())
    sigma_attrs = [getattr(s.state, "sigma", None) for s in sn_kernels.find.sites(m)]
    model = nn.Sequential(m)
    lo, hi = sigma_bounds(m, input_shape=shape)
    bound = lipschitz_bound(model, shape)
    assert m.training and model.training
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [getattr(s.state, "sigma", None) for s in sn_kernels.find.sites(m)] == sigma_attrs
    ref = copy.deepcopy(m).eval()
    with torch.no_grad():
        ref(x)  # the hook API sets .weight in the forward
        w = ref.weight.detach()
    plain = (nn.Linear(12, 9) if layer == "linear" else nn.Conv2d(3, 4, 3, padding=1)).double()
    with torch.no_grad():
        plain.weight.copy_(w)
    exact = svd_sigma(w).item() if layer == "linear" else dense_operator_norm(plain, shape[1:]).item()
    enclosed(lo, hi, exact, f"{wrap} {layer}")
    assert bound == hi
    assert abs(exact - 1) > 1e-3  # the test would notice a bound of the freshly normalized weight
