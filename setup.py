"""Build script: the Python package and the compiled extension ``sn_kernels._C``.

Install with torch already importable (the extension compiles against it)::

    pip install --no-build-isolation -e .                    # development
    pip install --no-build-isolation --no-deps --no-index -e .   # offline (the GPU machine)

What gets built (environment variable SN_KERNELS_BUILD):
    auto (default)  CUDA + CPU kernels when torch is a CUDA build and a CUDA toolkit is
                    found (CUDA_HOME, or the real folder behind ``nvcc`` on PATH),
                    CPU kernels only otherwise
    cuda            CUDA + CPU kernels, or fail
    cpu             CPU kernels only
    none            no extension: the pure-Python package (the native backend then
                    JIT-builds on first explicit use, ``set_backend("native")``)

Without torch at build time (pip's default build isolation) the auto mode builds no
extension and says so; cuda/cpu fail instead.

TORCH_CUDA_ARCH_LIST overrides the default "8.0;9.0+PTX"; MAX_JOBS bounds ninja's
parallelism.  The CUDA build adds ``site-packages/nvidia/cu13/include`` (and cu12)
to the include path, where pip-installed CUDA torch keeps cusparse/cublas headers.
"""
import importlib.util
import os
import sys

from setuptools import setup

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_sn_build", os.path.join(_here, "sn_kernels", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


def _extensions():
    mode = _build.build_mode()
    if mode == "none":
        print("sn_kernels: SN_KERNELS_BUILD=none, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
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
        _build.prepare_cuda_env()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    print(f"sn_kernels: building sn_kernels._C with {'CUDA' if cuda else 'CPU'} kernels ({why})", file=sys.stderr)
    srcs = [os.path.relpath(p, _here) for p in _build.sources(cuda)]
    kw = dict(name="sn_kernels._C", sources=srcs, include_dirs=_build.include_dirs(cuda),
              extra_link_args=_build.ldflags())
    if cuda:
        ext = CUDAExtension(extra_compile_args={"cxx": _build.cxx_flags(True), "nvcc": _build.nvcc_flags()}, **kw)
    else:
        ext = CppExtension(extra_compile_args={"cxx": _build.cxx_flags(False)}, **kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
