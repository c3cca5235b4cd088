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
