"""How to build the native extension: shared by ``setup.py`` and the just-in-time build.

Imports nothing from ``sn_kernels`` (``setup.py`` loads this file by path), and
torch only inside functions.

Environment:
    SN_KERNELS_BUILD        auto (default) | cuda | cpu | none
    CUDA_HOME / CUDA_PATH   the CUDA toolkit folder (default: found from ``nvcc`` on PATH,
                            following wrapper scripts to the real toolkit)
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX"
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import site
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
MODES = ("auto", "cuda", "cpu", "none")


def build_mode() -> str:
    mode = (os.environ.get("SN_KERNELS_BUILD") or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"SN_KERNELS_BUILD={mode!r}: choose one of {MODES}")
    return mode


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_target(nvcc: str) -> str:
    """The real nvcc behind ``nvcc`` (which may be a small ``exec /path/nvcc "$@"`` wrapper script)."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return nvcc
    if head.startswith(b"#!"):
        m = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if m:
            return os.path.realpath(m.group(1).decode())
    return nvcc


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder (with bin/nvcc and include/cuda_runtime.h), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.path.realpath(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(_nvcc_target(nvcc)))
        if _is_toolkit(home):
            return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(home):
            return os.path.realpath(home)
    return None


def _site_dirs() -> list[str]:
    dirs = []
    for d in [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")] + list(
            getattr(site, "getsitepackages", lambda: [])()):
        if d and d not in dirs and os.path.isdir(d):
            dirs.append(d)
    return dirs


def nvidia_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA libraries (torch's CUDA headers need cusparse, cublas, ...)."""
    out = []
    for sp in _site_dirs():
        for pattern in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(sp, pattern))):
                if os.path.isdir(d) and d not in out:
                    out.append(d)
    return out


def torch_uses_openmp() -> bool:
    import torch

    return "OpenMP" in torch.__config__.parallel_info().split("parallel backend:")[-1]


def want_cuda(mode: str | None = None) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) for the given (or the environment's) build mode."""
    import torch

    mode = mode or build_mode()
    if mode == "cpu":
        return False, "SN_KERNELS_BUILD=cpu"
    if mode == "none":
        return False, "SN_KERNELS_BUILD=none"
    if not torch.version.cuda:
        if mode == "cuda":
            raise RuntimeError("SN_KERNELS_BUILD=cuda but torch is not a CUDA build")
        return False, f"torch {torch.__version__} is not a CUDA build"
    if find_cuda_home() is None:
        if mode == "cuda":
            raise RuntimeError("SN_KERNELS_BUILD=cuda but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA toolkit {find_cuda_home()}"


def prepare_cuda_env() -> str:
    """Point torch.utils.cpp_extension at the real toolkit and the default arch list; return CUDA_HOME.

    Must run before ``torch.utils.cpp_extension`` is imported (it reads CUDA_HOME at import)."""
    home = find_cuda_home()
    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return home


def sources(cuda: bool) -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    return files


def cxx_flags(cuda: bool) -> list[str]:
    flags = ["-O3"]
    if torch_uses_openmp():
        flags.append("-fopenmp")  # at::parallel_for is a header-inlined `omp parallel`
    if cuda:
        flags.append("-DSN_KERNELS_WITH_CUDA")
    return flags


def ldflags() -> list[str]:
    return ["-fopenmp"] if torch_uses_openmp() else []


def nvcc_flags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def include_dirs(cuda: bool) -> list[str]:
    return [CSRC] + (nvidia_include_dirs() if cuda else [])


def jit_build_dir(cuda: bool) -> str:
    import torch

    base = os.environ.get("SN_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sn_kernels")
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if cuda else 'cpu'}"
    path = os.path.join(base, re.sub(r"[^A-Za-z0-9_.+-]", "_", tag))
    os.makedirs(path, exist_ok=True)
    return path


def jit_build(verbose: bool = False) -> str:
    """Build and load the extension with ninja into the cache; return the library path.

    Build errors propagate in full."""
    mode = build_mode()
    if mode == "none":
        raise RuntimeError("SN_KERNELS_BUILD=none: the native extension is disabled")
    cuda, why = want_cuda(mode)
    if cuda:
        prepare_cuda_env()
    from torch.utils import cpp_extension

    build_dir = jit_build_dir(cuda)
    print(f"sn_kernels: building the native extension ({'CUDA' if cuda else 'CPU only'}: {why}) in {build_dir}; "
          "this takes a while once", file=sys.stderr, flush=True)
    kwargs = dict(name="sn_kernels_native", sources=sources(cuda), extra_cflags=cxx_flags(cuda),
                  extra_ldflags=ldflags(), extra_include_paths=include_dirs(cuda), build_directory=build_dir,
                  is_python_module=False, with_cuda=cuda, verbose=verbose)
    if cuda:
        kwargs["extra_cuda_cflags"] = nvcc_flags()
    cpp_extension.load(**kwargs)
    return os.path.join(build_dir, "sn_kernels_native.so")
