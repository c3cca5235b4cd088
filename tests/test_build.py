"""The build's toolkit rule (sn_kernels/_build.py): only a toolkit of torch's CUDA release."""
import os
import stat
from pathlib import Path

import pytest
import torch

from sn_kernels import _build

needs_cuda_torch = pytest.mark.skipif(not torch.version.cuda, reason="torch is not a CUDA build")


def fake_toolkit(root, release: str) -> str:
    """A folder that looks like a CUDA toolkit whose nvcc reports ``release``."""
    home = root / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(home)


def other_release() -> str:
    major, minor = torch.version.cuda.split(".")
    return f"{major}.{int(minor) + 1}"


@pytest.fixture
def only(monkeypatch):
    """Make the given (folder, where) pairs the only toolkits in sight."""
    def set_candidates(*pairs):
        monkeypatch.setattr(_build, "_candidates", lambda major: list(pairs))
    return set_candidates


def test_version_read_from_nvcc(tmp_path):
    assert _build.toolkit_version(fake_toolkit(tmp_path, "12.4")) == "12.4"
    assert _build.toolkit_version(str(tmp_path / "nowhere")) is None


@needs_cuda_torch
def test_matching_toolkit_is_chosen_and_another_release_skipped(tmp_path, only):
    bad = fake_toolkit(tmp_path, other_release())
    good = fake_toolkit(tmp_path, torch.version.cuda)
    only((bad, "$CUDA_HOME"), (good, "nvcc on PATH"))
    home, why = _build.find_toolkit()
    assert home == good
    assert f"nvcc {other_release()}" in why and "matches torch's CUDA" in why


@needs_cuda_torch
def test_no_match_fails_in_cuda_mode_and_falls_back_in_auto(tmp_path, only):
    only((fake_toolkit(tmp_path, other_release()), "$CUDA_HOME"))
    with pytest.raises(RuntimeError, match="no CUDA toolkit matches torch's CUDA") as err:
        _build.want_cuda("cuda")
    assert "nvidia-cuda-nvcc==" in str(err.value)  # the fix is in the message
    cuda, why = _build.want_cuda("auto")
    assert not cuda and "no CUDA toolkit matches" in why


@needs_cuda_torch
def test_registry_compiler_packages_of_mixed_releases_are_skipped(tmp_path, only, monkeypatch):
    pip_tk = fake_toolkit(tmp_path, torch.version.cuda)
    only((pip_tk, "the registry's compiler packages (nvidia-cuda-nvcc) in site-packages"))
    from importlib import metadata

    versions = {"nvidia-cuda-nvcc": f"{torch.version.cuda}.88", "nvidia-cuda-crt": f"{torch.version.cuda}.88",
                "nvidia-nvvm": f"{other_release()}.37"}
    monkeypatch.setattr(metadata, "version", lambda pkg: versions[pkg])
    home, why = _build.find_toolkit()
    assert home is None and f"nvidia-nvvm {other_release()}.37" in why
    versions["nvidia-nvvm"] = f"{torch.version.cuda}.88"
    assert _build.find_toolkit()[0] == pip_tk


def test_cpu_modes_never_look_for_a_toolkit(monkeypatch):
    monkeypatch.setattr(_build, "find_toolkit", lambda: pytest.fail("looked for a toolkit"))
    assert _build.want_cuda("cpu") == (False, "SN_KERNELS_BUILD=cpu")
    assert _build.want_cuda("none") == (False, "SN_KERNELS_BUILD=none")


def test_cudart_link_dir_for_versioned_only_libraries(tmp_path):
    home = tmp_path / "tk"
    (home / "lib").mkdir(parents=True)
    (home / "lib" / "libcudart.so.13").write_text("")
    (link_dir,) = _build.cudart_link_dir(str(home), str(tmp_path / "build"))
    assert os.path.realpath(os.path.join(link_dir, "libcudart.so")) == str(home / "lib" / "libcudart.so.13")
    (home / "lib" / "libcudart.so").write_text("")
    assert _build.cudart_link_dir(str(home), str(tmp_path / "build")) == []


def test_this_build_is_recorded():
    from sn_kernels.backends import native

    info = native.build_info()
    package = os.path.dirname(os.path.dirname(os.path.abspath(native.__file__)))
    if not any(name.startswith("_C") for name in os.listdir(package)):
        pytest.skip("no setup.py build here (a just-in-time or pure-Python install)")
    assert info, "setup.py built sn_kernels._C but build_info() finds no build record"
    assert info["torch"] == torch.__version__, "the extension was built against another torch"
    assert isinstance(info["cuda_kernels"], bool) and info["why"]
    if info["cuda_kernels"]:
        assert native.has_kernel("cuda")


def test_first_native_calls_from_two_threads_build_and_register_once(monkeypatch):
    """Two threads whose first native call finds no prebuilt extension: one builds, the other waits for it;
    the ops' registration runs once (twice, the second thread failed: a fake registered twice)."""
    import threading
    import time

    from sn_kernels import _build
    from sn_kernels.backends import native

    finished = []
    monkeypatch.setattr(native, "_state", {"loaded": False, "error": None, "build_failed": None})
    monkeypatch.setattr(native, "_import_prebuilt", lambda: "no prebuilt extension (simulated)")
    monkeypatch.setattr(_build, "jit_build", lambda: time.sleep(0.3))

    def finish():
        finished.append(threading.get_ident())
        native._state["loaded"] = True
    monkeypatch.setattr(native, "_finish", finish)
    results = []
    threads = [threading.Thread(target=lambda: results.append(native._load(build=True))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [None, None] and len(finished) == 1


def test_package_metadata_states_the_tested_range():
    """pyproject.toml's torch floor is the default lock's torch (the tested floor), and its Python floor is the
    README's: metadata that promised an untested torch 2.4 or Python 3.10 let pip install into a range nothing
    had run on (the locked sets do not even install on 3.10)."""
    import re
    import sys
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lock = (root / "requirements" / "default.txt").read_text()
    locked = re.search(r"^torch==(\d+)\.(\d+)\.", lock, re.M).groups()
    assert f"torch>={locked[0]}.{locked[1]}" in project["dependencies"]
    py_floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"]).group(1)
    readme = (root / "README.md").read_text()
    assert f"| Python | 3.{py_floor}–" in readme, "README's supported Python range starts elsewhere"
    assert sys.version_info >= (3, int(py_floor))
