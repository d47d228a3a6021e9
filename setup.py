"""Build of agm_fast and its optional compiled extension agm_fast._C (docs/design.md §4, §5).

`kernels/` is installed as the package `agm_fast.kernels` (one import name everywhere).

agm_fast._C (csrc/) holds the fused Euler–Maruyama op (csrc/em_step.cpp) and its test-only
CUDA-body emulation (csrc/em_step_emulation.cpp). It is built as a CppExtension (CPU kernels)
always, and as a CUDAExtension (plus csrc/em_step_cuda.cu) when torch has CUDA and nvcc is found.
The extension is optional: a failed build prints a warning and leaves a working pure-PyTorch
install (a failed CUDA build first retries CPU-only). Build with
    pip install --no-build-isolation -e .
so the build sees the installed torch instead of fetching another one.
Environment: AGM_FAST_NO_EXT=1 skips the extension; AGM_FAST_NO_CUDA=1 builds it CPU-only;
TORCH_CUDA_ARCH_LIST picks the CUDA architectures (torch's default: the visible GPU's).
"""

import os
import shutil
import sys

from setuptools import setup

PACKAGES = dict(
    packages=["agm_fast", "agm_fast.kernels"],
    package_dir={"agm_fast": "agm_fast", "agm_fast.kernels": "kernels"},
)


def _warn(msg: str) -> None:
    print(f"WARNING (agm_fast._C): {msg}", file=sys.stderr, flush=True)


def _extension_setup() -> dict:
    if os.environ.get("AGM_FAST_NO_EXT") == "1":
        _warn("AGM_FAST_NO_EXT=1: not building the extension; sample.em=auto uses PyTorch")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # no torch in the build environment (e.g. an isolated build)
        _warn(f"torch is not importable in the build ({err}); building without agm_fast._C. "
              "Use pip install --no-build-isolation -e .")
        return {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = "csrc"
    # -ffp-contract=off: one rounding per operation, as the PyTorch reference does them.
    # -fno-math-errno: sqrtf without an errno branch, so the AVX2 noise tile (csrc/philox.h)
    # vectorises; no result changes (errno is never read).
    # -fopenmp: at::parallel_for uses the OpenMP backend of the installed torch in its headers.
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    # rpath to torch's libraries: `import agm_fast._C` works even before `import torch`
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
    common = dict(include_dirs=[os.path.join(here, csrc)], extra_link_args=link)
    sources = [f"{csrc}/em_step.cpp", f"{csrc}/em_step_emulation.cpp"]
    cpu_ext = CppExtension("agm_fast._C", sources, extra_compile_args={"cxx": cxx}, **common)

    nvcc = None
    if CUDA_HOME:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = nvcc if os.path.exists(nvcc) else None
    nvcc = nvcc or shutil.which("nvcc")
    want_cuda = torch.version.cuda is not None and nvcc is not None and os.environ.get("AGM_FAST_NO_CUDA") != "1"
    if not want_cuda:
        why = ("AGM_FAST_NO_CUDA=1" if os.environ.get("AGM_FAST_NO_CUDA") == "1"
               else "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"agm_fast._C: building the CPU op only ({why})", flush=True)
        ext = cpu_ext
    else:
        print(f"agm_fast._C: building CPU + CUDA ops (torch CUDA {torch.version.cuda}, nvcc {nvcc})", flush=True)
        ext = CUDAExtension(
            "agm_fast._C", [*sources, f"{csrc}/em_step_cuda.cu"],
            define_macros=[("AGM_WITH_CUDA", None)],
            # no --use_fast_math: the Philox normals must match agm_fast.rng (precise logf/sincosf)
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **common)
        ext._agm_cpu_fallback = cpu_ext

    class OptionalBuildExt(BuildExtension):
        """Never fail the install because of the extension: warn and fall back."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler checks etc. fail before any extension is built
                _warn(f"build failed ({type(err).__name__}: {err}); agm_fast works without it "
                      "(sample.em=auto uses PyTorch; sample.em=ext will say why it cannot run)")

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
                return
            except Exception as err:
                fallback = getattr(extension, "_agm_cpu_fallback", None)
                if fallback is None:
                    _warn(f"build failed ({type(err).__name__}: {err}); agm_fast works without it "
                          "(sample.em=auto uses PyTorch; sample.em=ext will say why it cannot run)")
                    return
                _warn(f"CUDA build failed ({type(err).__name__}: {err}); retrying CPU-only")
            # the same per-extension flags BuildExtension.build_extensions() gave the CUDA variant
            for name in ("-DTORCH_API_INCLUDE_EXTENSION_H",):
                fallback.extra_compile_args["cxx"].append(name)
            for hook in ("_define_torch_extension_name", "_add_gnu_cpp_abi_flag"):
                if hasattr(self, hook):
                    getattr(self, hook)(fallback)
            try:
                super().build_extension(fallback)
            except Exception as err:
                _warn(f"CPU-only build failed too ({type(err).__name__}: {err}); agm_fast works without it")

    return dict(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)})


setup(**PACKAGES, **_extension_setup())
