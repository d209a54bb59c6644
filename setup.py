"""Build sae_fast and, when torch is importable at build time, its extension sae_fast._C.

The op schemas (csrc/ops.cpp) and the CPU kernels (csrc/cpu/*.cpp, OpenMP) are
always built with the extension. The CUDA kernels (host entries csrc/cuda/*.cu +
device code kernels/*.cu) are added when torch has CUDA and nvcc is found.
Environment switches:

  SAE_FAST_SKIP_EXTENSION=1   build no extension at all (pure Python install)
  SAE_FAST_SKIP_CUDA_BUILD=1  build the CPU kernels only, even where CUDA is available
  SAE_FAST_FORCE_CUDA=1       build the CUDA kernels or fail (no silent CPU-only fallback)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0a": A100 and H100)
  MAX_JOBS                    parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _extensions():
    if _flag("SAE_FAST_SKIP_EXTENSION"):
        print("sae_fast: SAE_FAST_SKIP_EXTENSION set, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "sae_fast: torch is not importable at build time (isolated build?); installing without "
            "the compiled extension. Use `pip install --no-build-isolation .` to build it.", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is BuildExtension's choice (torch 2.13 headers want C++20)
    want_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("SAE_FAST_SKIP_CUDA_BUILD")
    if _flag("SAE_FAST_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(
                "SAE_FAST_FORCE_CUDA=1 but torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})")
        want_cuda = True
    kw = dict(include_dirs=[os.path.join(HERE, "kernels"), os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("kernels/*.cu"))
        ext = CUDAExtension("sae_fast._C", cpp + cu, define_macros=[("SAE_FAST_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                                     "-lineinfo"]}, **kw)
    else:
        ext = CppExtension("sae_fast._C", cpp, extra_compile_args={"cxx": cxx}, **kw)
    print(f"sae_fast: building sae_fast._C ({'CPU + CUDA' if want_cuda else 'CPU'} kernels)", file=sys.stderr)

    class Build(BuildExtension):
        """If the CUDA half fails to compile, build the CPU kernels and say so loudly,
        rather than failing the whole install (SAE_FAST_FORCE_CUDA=1 makes it an error)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler errors surface as several exception types
                if not want_cuda or _flag("SAE_FAST_FORCE_CUDA"):
                    raise
                print(
                    f"sae_fast: WARNING: the CUDA kernels failed to compile ({type(e).__name__}: {e}); "
                    "building the CPU kernels only. Set SAE_FAST_FORCE_CUDA=1 to make this an error.", file=sys.stderr)
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.define_macros = [m for m in ext.define_macros if m[0] != "SAE_FAST_WITH_CUDA"]
                ext.extra_compile_args = {"cxx": cxx}
                super().build_extension(ext)

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Metadata, version and dependencies: pyproject.toml. This file only adds the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)
