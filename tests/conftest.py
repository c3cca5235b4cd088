"""Test configuration: run Triton kernels under the interpreter when no GPU is visible.

TRITON_INTERPRET must be set before the first ``import triton``.
"""
import os
import shutil
import subprocess


def _gpu_visible() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The devices the ``backend`` fixture covers; a module sets BACKEND_DEVICES to widen it
# (tests/test_contract.py: the CPU and, when there is one, the GPU).
CPU_ONLY = ("cpu",)


def _parametrized(metafunc, name):
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """``backend``: every backend that runs on the module's BACKEND_DEVICES (default: the CPU), as
    (device type, name); a test that parametrizes ``backend`` itself keeps its own values."""
    if "backend" not in metafunc.fixturenames or _parametrized(metafunc, "backend"):
        return
    import sn_kernels

    devices = getattr(metafunc.module, "BACKEND_DEVICES", CPU_ONLY)
    params = [(dev, name) for dev in devices for name in sn_kernels.available_backends(dev)]
    ids = [name if dev == "cpu" else f"{dev}-{name}" for dev, name in params]
    metafunc.parametrize("backend", params, ids=ids, indirect=True)


@pytest.fixture
def backend(request):
    """The one backend fixture: the ``Backend`` object (sn_kernels/backends/contract.py) of one
    backend that runs here, selected globally (``use_backend``) while the test runs."""
    import sn_kernels
    from sn_kernels import dispatch

    device, name = request.param
    with sn_kernels.use_backend(name):
        yield dispatch.resolve(torch.device(device), name)


@pytest.fixture
def backend_device(request, backend):
    """The device of the ``backend`` fixture's parameter."""
    return torch.device(request.node.callspec.params["backend"][0])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops: on a shared 2-core machine a second
    thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_report_header(config):
    import sn_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return [f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
            f"sn_kernels backends on {dev}: {sn_kernels.available_backends(dev)}"]


def pytest_terminal_summary(terminalreporter):
    from helpers import DEVIATIONS

    if DEVIATIONS:
        terminalreporter.write_sep("-", "largest relative deviations seen")
        for (what, dtype), dev in sorted(DEVIATIONS.items()):
            terminalreporter.write_line(f"{what:28s} {dtype:9s} {dev:.3e}")
