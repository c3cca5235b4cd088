"""Build script: the Python package and the compiled extension ``sn_kernels._C``.

Install with torch already importable (the extension compiles against it)::

    pip install --no-build-isolation -e .                    # development
    pip install --no-build-isolation --no-deps --no-index -e .   # offline (the GPU machine)

What gets built (environment variable SN_KERNELS_BUILD):
    auto (default)  CUDA + CPU kernels when torch is a CUDA build and a CUDA toolkit of
                    torch's CUDA release is found; CPU kernels only otherwise, or when the
                    CUDA build fails, with a banner saying why
    cuda            CUDA + CPU kernels, or fail with the reason / the compiler's message
    cpu             CPU kernels only
    none            no extension: the pure-Python package (the native backend then
                    JIT-builds on first explicit use, ``set_backend("native")``)

Without torch at build time (pip's default build isolation) the auto mode builds no
extension and says so; cuda/cpu fail instead.

Which toolkit (``sn_kernels/_build.py: find_toolkit``): the first of $CUDA_HOME,
$CUDA_PATH, the registry's compiler packages in site-packages (``nvidia/cu13``, from
``pip install "nvidia-cuda-nvcc==<torch.version.cuda>.*" ...``, all of one release), ``nvcc`` on PATH and
/usr/local/cuda* whose nvcc release equals ``torch.version.cuda``.  Another release's
compiler is never mixed with torch's headers.  The build prints the toolkit and why.

TORCH_CUDA_ARCH_LIST overrides the default "8.0;9.0+PTX"; MAX_JOBS bounds ninja's
parallelism.
"""
import importlib.util
import os
import sys

from setuptools import setup

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_sn_build", os.path.join(_here, "sn_kernels", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


def _banner(msg: str) -> None:
    line = "!" * 88
    print(f"\n{line}\n{msg}\n{line}\n", file=sys.stderr, flush=True)


def _extensions():
    mode = _build.build_mode()
    if mode == "none":
        print("sn_kernels: SN_KERNELS_BUILD=none, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError as exc:
        msg = ("sn_kernels: building the extension needs torch importable at build time: install with "
               "`pip install --no-build-isolation -e .`")
        if mode != "auto":
            raise RuntimeError(f"{msg} (SN_KERNELS_BUILD={mode})") from exc
        # an isolated build environment: ship the pure-Python package; the native backend then builds
        # just in time on first explicit use
        print(f"{msg}; building no extension now", file=sys.stderr)
        return [], {}
    cuda, why = _build.want_cuda(mode)
    if cuda:
        home = _build.prepare_cuda_env()
        print(f"sn_kernels: building sn_kernels._C with CUDA and CPU kernels: {why}", file=sys.stderr)
    elif mode == "auto" and torch.version.cuda:
        _banner(f"sn_kernels: building the CPU kernels only, WITHOUT the CUDA kernels: {why}. "
                "The install goes on; SN_KERNELS_BUILD=cuda makes this an error.")
    else:
        print(f"sn_kernels: building sn_kernels._C with CPU kernels ({why})", file=sys.stderr)
    _build.write_build_info(cuda, why)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def make_ext(cuda: bool):
        srcs = [os.path.relpath(p, _here) for p in _build.sources(cuda)]
        kw = dict(name="sn_kernels._C", sources=srcs, include_dirs=_build.include_dirs(cuda),
                  extra_link_args=_build.ldflags())
        if not cuda:
            return CppExtension(extra_compile_args={"cxx": _build.cxx_flags(False)}, **kw)
        kw["library_dirs"] = _build.cudart_link_dir(home, os.path.join(_here, "build"))
        return CUDAExtension(extra_compile_args={"cxx": _build.cxx_flags(True), "nvcc": _build.nvcc_flags()}, **kw)

    class BuildExt(BuildExtension):
        """In auto mode a CUDA build that fails to compile or link falls back to the CPU kernels."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not (cuda and mode == "auto"):
                    raise
                reason = f"the CUDA build failed ({type(exc).__name__}: {exc}; the compiler's output is above)"
                _banner(f"sn_kernels: building the CPU kernels only, WITHOUT the CUDA kernels: {reason}. "
                        "The install goes on; SN_KERNELS_BUILD=cuda makes this an error.")
                _build.write_build_info(False, reason)
                copied = os.path.join(self.build_lib, "sn_kernels")
                if os.path.isdir(copied):  # build_py has already copied the record (a wheel build)
                    _build.write_build_info(False, reason, copied)
                # the same Extension object (setuptools keeps private state on it), CPU-only fields
                ext.__dict__.update({k: v for k, v in vars(make_ext(False)).items() if not k.startswith("_")})
                super().build_extension(ext)

    return [make_ext(cuda)], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
