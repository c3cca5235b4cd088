"""How to build the native extension: shared by ``setup.py`` and the just-in-time build.

Imports nothing from ``sn_kernels`` (``setup.py`` loads this file by path), and
torch only inside functions.

Environment:
    SN_KERNELS_BUILD        auto (default) | cuda | cpu | none
    CUDA_HOME / CUDA_PATH   a CUDA toolkit folder to try first (see ``find_toolkit``: a
                            toolkit is used only when its nvcc release equals torch's CUDA)
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX"
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
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


def _site_dirs() -> list[str]:
    dirs = []
    for d in [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")] + list(
            getattr(site, "getsitepackages", lambda: [])()):
        if d and d not in dirs and os.path.isdir(d):
            dirs.append(d)
    return dirs


def pip_cuda_root(major: str) -> str | None:
    """``site-packages/nvidia/cu<major>``: where the registry's CUDA packages (torch's runtime
    libraries and headers, and the optional nvcc/crt/nvvm compiler packages) install."""
    for sp in _site_dirs():
        d = os.path.join(sp, "nvidia", f"cu{major}")
        if os.path.isdir(d):
            return d
    return None


def toolkit_version(home: str) -> str | None:
    """"major.minor" of the toolkit's nvcc (``nvcc --version``), or None if it does not run."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


COMPILER_PACKAGES = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm")


def _pip_compiler_mismatch(want: str) -> str | None:
    """Why the registry's compiler packages cannot be used for CUDA ``want``, or None.

    They are separate packages (nvcc, its crt headers, the nvvm/cicc front end); an
    unpinned install can mix releases (nvcc 13.0 with nvvm 13.5 emits PTX its ptxas refuses)."""
    from importlib import metadata

    bad = []
    for pkg in COMPILER_PACKAGES:
        try:
            got = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            got = "missing"
        if not got.startswith(want + "."):
            bad.append(f"{pkg} {got}")
    return f"compiler packages of another release ({', '.join(bad)})" if bad else None


def _candidates(major: str) -> list[tuple[str, str]]:
    """(folder, where it came from) of every CUDA toolkit in sight, in order of preference."""
    out = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append((os.environ[var], f"${var}"))
    pip_root = pip_cuda_root(major)
    if pip_root:
        out.append((pip_root, "the registry's compiler packages (nvidia-cuda-nvcc) in site-packages"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        out.append((os.path.dirname(os.path.dirname(_nvcc_target(nvcc))), "nvcc on PATH"))
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        out.append((home, "the default install folder"))
    seen, unique = set(), []
    for home, where in out:
        real = os.path.realpath(home)
        if real not in seen:
            seen.add(real)
            unique.append((real, where))
    return unique


def find_toolkit() -> tuple[str | None, str]:
    """(CUDA toolkit folder whose nvcc matches ``torch.version.cuda``, or None; the reason).

    The rule: the first toolkit among $CUDA_HOME, $CUDA_PATH, the registry's compiler
    packages in site-packages (``nvidia/cu<major>``, all of one release), ``nvcc`` on PATH
    and /usr/local/cuda*
    whose nvcc release (major.minor) equals torch's CUDA version.  A toolkit of another
    release is never used: its compiler would meet torch's headers and libraries of
    another CUDA (nvcc 13.0 refuses CCCL 13.2 headers, for one)."""
    import torch

    want = torch.version.cuda
    if not want:
        return None, f"torch {torch.__version__} is not a CUDA build"
    skipped = []
    for home, where in _candidates(want.split(".")[0]):
        if not _is_toolkit(home):
            if where.startswith("$") or where.startswith("the registry"):
                skipped.append(f"{home} ({where}): no bin/nvcc or include/cuda_runtime.h")
            continue
        got = toolkit_version(home)
        if got == want and where.startswith("the registry"):
            mixed = _pip_compiler_mismatch(want)
            if mixed:
                skipped.append(f"{home} ({where}): {mixed}")
                continue
        if got == want:
            note = f"; skipped {'; '.join(skipped)}" if skipped else ""
            return home, f"CUDA {got} toolkit {home}, from {where}, matches torch's CUDA {want}{note}"
        skipped.append(f"{home} ({where}): nvcc {got or 'does not run'}")
    return None, (f"no CUDA toolkit matches torch's CUDA {want} ({'; '.join(skipped) or 'none found'}); "
                  f"install the registry's compiler packages for it: {compiler_packages_hint()}")


def compiler_packages_hint() -> str:
    """The pip command that installs the CUDA compiler matching the installed torch.

    Each package is pinned to torch's release: the ``cuda-toolkit[nvcc]`` extra of some
    releases pins only nvcc and lets crt and nvvm float to the newest."""
    import torch

    v = torch.version.cuda
    return "pip install " + " ".join(f'"{p}=={v}.*"' for p in COMPILER_PACKAGES + ("nvidia-cuda-cccl",))


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder that matches torch's CUDA version, or None."""
    return find_toolkit()[0]


def nvidia_include_dirs(home: str) -> list[str]:
    """Headers of torch's pip-installed CUDA libraries (ATen's CUDA headers include cublas and
    cusparse, which a system toolkit may lack), only when they are of the toolkit's release."""
    import torch

    root = pip_cuda_root(torch.version.cuda.split(".")[0])
    if root is None or os.path.realpath(root) == os.path.realpath(home):
        return []  # the registry's toolkit already has them in its own include/
    hdr = os.path.join(root, "include", "cuda_runtime_api.h")
    try:
        with open(hdr) as f:
            m = re.search(r"#define CUDART_VERSION\s+(\d+)", f.read())
    except OSError:
        m = None
    if m is None:
        return []
    ver = int(m.group(1))
    if f"{ver // 1000}.{ver % 1000 // 10}" != toolkit_version(home):
        return []  # another release's headers: never mixed with this compiler
    return [os.path.join(root, "include")]


def cudart_link_dir(home: str, build_dir: str) -> list[str]:
    """A linker folder holding ``libcudart.so`` when the toolkit has only ``libcudart.so.<N>``
    (the registry's packages ship just the versioned name), as a symlink in ``build_dir``."""
    for sub in ("lib64", "lib"):
        if os.path.exists(os.path.join(home, sub, "libcudart.so")):
            return []
    for sub in ("lib64", "lib"):
        found = sorted(glob.glob(os.path.join(home, sub, "libcudart.so.*")))
        if found:
            link_dir = os.path.join(build_dir, "cudart-link")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(found[0], link)
            return [link_dir]
    return []


def torch_uses_openmp() -> bool:
    import torch

    return "OpenMP" in torch.__config__.parallel_info().split("parallel backend:")[-1]


def want_cuda(mode: str | None = None) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) for the given (or the environment's) build mode.

    ``cuda`` mode raises when no matching toolkit is found; ``auto`` falls back to the CPU
    kernels and the caller says so loudly."""
    import torch

    mode = mode or build_mode()
    if mode in ("cpu", "none"):
        return False, f"SN_KERNELS_BUILD={mode}"
    home, why = find_toolkit()
    if home is None:
        if mode == "cuda":
            raise RuntimeError(f"SN_KERNELS_BUILD=cuda but {why}")
        return False, why
    return True, why


def prepare_cuda_env() -> str:
    """Point torch.utils.cpp_extension at the matching toolkit and the default arch list;
    return CUDA_HOME.  Must run before ``torch.utils.cpp_extension`` is imported (it reads
    CUDA_HOME at import).  Its nvcc goes first on PATH so nothing finds another one."""
    home = find_cuda_home()
    os.environ["CUDA_HOME"] = home
    os.environ["PATH"] = os.path.join(home, "bin") + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return home


BUILD_INFO = os.path.join(ROOT, "sn_kernels", "_build_info.json")


def write_build_info(cuda: bool, why: str, folder: str | None = None) -> None:
    """Record what setup.py built and why (read by ``sn_kernels.native.build_info()``)."""
    import json

    import torch

    path = os.path.join(folder, os.path.basename(BUILD_INFO)) if folder else BUILD_INFO
    with open(path, "w") as f:
        json.dump({"cuda_kernels": cuda, "why": why, "torch": torch.__version__}, f, indent=1)


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
    return [CSRC] + (nvidia_include_dirs(os.environ["CUDA_HOME"]) if cuda else [])


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
        kwargs["extra_ldflags"] += [f"-L{d}" for d in cudart_link_dir(os.environ["CUDA_HOME"], build_dir)]
    cpp_extension.load(**kwargs)
    return os.path.join(build_dir, "sn_kernels_native.so")
