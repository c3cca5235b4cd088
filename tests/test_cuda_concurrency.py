"""The CUDA backends ("triton", "native") under concurrency: two streams at once, CUDA graphs
captured on one stream and replayed at once on two, and a weight on a device that is not the
current one.  GPU only: every test skips without CUDA.

The kernels find their last block with integer tickets; counters shared between launches that
run at the same time would make sigma, u, v silently wrong.  All results are compared bit for bit
with the same calls run one after another (the kernels are deterministic).
"""
from __future__ import annotations

import pytest
import torch

from sn_kernels import dispatch
from sn_kernels.functional import spectral_normalize

from helpers import sample_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = ["triton", "native"]
# several tiles and row chunks / splits per pass, so many blocks take tickets at once
SHAPES = [((1536, 4608), 0), ((96, 4096), 0), ((4096, 96), 0), ((256, 512, 4, 4), 1)]


def _need(backend):
    why = dispatch.why_not(backend, "cuda")
    if why is not None:
        pytest.skip(f"{backend}: {why}")


def _inputs(shape, dim, seed, device="cuda"):
    """(weight, u, v, grad) in float32: helpers.sample_inputs."""
    return sample_inputs(device, torch.float32, shape, dim, seed=seed, grad=True)


def _step(backend, w, u, v, grad, dim, n_iter=3):
    """One training forward + backward; u, v updated in place. Returns every output."""
    ww = w.detach().clone().requires_grad_(True)
    out, sigma = spectral_normalize(ww, u, v, n_power_iterations=n_iter, dim=dim, backend=backend)
    out.backward(grad)
    return out.detach(), sigma, ww.grad


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_streams_match_serial(backend):
    _need(backend)
    cases = [(_inputs(shape, dim, seed), dim) for seed, (shape, dim) in enumerate(SHAPES)]
    serial = []
    for (w, u, v, g), dim in cases:
        uu, vv = u.clone(), v.clone()
        serial.append([_step(backend, w, uu, vv, g, dim) for _ in range(4)] + [(uu, vv)])
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in cases]
    results = [[] for _ in cases]
    vectors = [(u.clone(), v.clone()) for (w, u, v, g), _ in cases]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for rep in range(4):  # the streams interleave their launches: kernels of all cases overlap
        for i, ((w, u, v, g), dim) in enumerate(cases):
            with torch.cuda.stream(streams[i]):
                results[i].append(_step(backend, w, *vectors[i], g, dim))
    torch.cuda.synchronize()
    for i in range(len(cases)):
        for rep in range(4):
            assert _equal(results[i][rep], serial[i][rep]), (backend, SHAPES[i], rep)
        assert _equal(vectors[i], serial[i][-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_graphs_captured_on_one_stream_replay_concurrently(backend):
    """torch.cuda.graph captures every graph on one default capture stream: counters keyed by
    stream alone would be shared by the two graphs, which then race when replayed at once."""
    _need(backend)
    cases = [(_inputs(shape, dim, 10 + seed), dim) for seed, (shape, dim) in enumerate(SHAPES[:2])]
    # eager reference: three steps each
    expected = []
    for (w, u, v, g), dim in cases:
        uu, vv = u.clone(), v.clone()
        expected.append([_step(backend, w, uu, vv, g, dim, n_iter=2) for _ in range(3)])
    graphs, outputs, vectors = [], [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels), then capture
        for (w, u, v, g), dim in cases:
            _step(backend, w, u.clone(), v.clone(), g, dim, n_iter=2)
    torch.cuda.current_stream().wait_stream(side)
    for (w, u, v, g), dim in cases:
        uu, vv = u.clone(), v.clone()
        ww = w.detach().clone().requires_grad_(True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, sigma = spectral_normalize(ww, uu, vv, n_power_iterations=2, dim=dim, backend=backend)
            out.backward(g)
        graphs.append(graph)
        outputs.append((out, sigma, ww))
        vectors.append((uu, vv, u, v))
    for uu, vv, u, v in vectors:  # capture ran nothing: start from the initial vectors
        uu.copy_(u)
        vv.copy_(v)
    streams = [torch.cuda.Stream() for _ in cases]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = [[] for _ in cases]
    for step in range(3):
        for i, graph in enumerate(graphs):
            with torch.cuda.stream(streams[i]):
                graph.replay()  # writes the captured grad tensor (do not reset ww.grad)
                out, sigma, ww = outputs[i]
                got[i].append((out.detach().clone(), sigma.clone(), ww.grad.clone()))
    torch.cuda.synchronize()
    for i in range(len(cases)):
        for step in range(3):
            assert _equal(got[i][step], expected[i][step]), (backend, SHAPES[i], step)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_on_a_device_that_is_not_current(backend):
    _need(backend)
    w, u, v, g = _inputs((300, 700), 0, 3, device="cuda:1")
    with torch.cuda.device(0):
        got = _step(backend, w, u.clone(), v.clone(), g, 0)
        assert all(t.device == torch.device("cuda:1") for t in got)
    with torch.cuda.device(1):
        ref = _step("torch", w, u.clone(), v.clone(), g, 0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
