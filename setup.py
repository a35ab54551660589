"""Build script for bn_ext.

CPU kernels are always built. CUDA kernels are added when the installed torch has CUDA and nvcc is
found, unless BN_EXT_FORCE_CPU=1. See README.md, "Build options", for every switch.
"""
import glob
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
# The oldest CPython whose stable ABI the extension uses. torch's BuildExtension defines
# Py_LIMITED_API itself for a py_limited_api extension, as its own oldest CPython (3.10 in torch
# 2.11 to 2.15); the same value here, so that the two definitions agree (clang warned of the
# redefinition, and the later one, torch's, won) and so that the wheel's abi3 tag says the same.
LIMITED_API = getattr(cpp_extension, "min_supported_cpython", "0x03090000")


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """nvcc's toolkit root: CUDA_HOME if set, else the conventional root, else the PATH's nvcc."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script on the PATH hides the real root; resolve symlinks at least.
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda():
    if _flag("BN_EXT_FORCE_CPU"):
        return False, "BN_EXT_FORCE_CPU is set"
    import torch

    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    home = _cuda_home()
    if home is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # torch read its guess at import time
    return True, f"CUDA toolkit at {home}"


def _cpu_isa_flags():
    """Vector ISA for the CPU kernels.

    ATen's Vectorized<T> picks its implementation from CPU_CAPABILITY_* macros, so the extension
    must be compiled for a concrete ISA (pip builds from source on the machine that runs it).
    Default: the best the build machine has of AVX-512 (the F/BW/VL/DQ set ATen's own AVX512
    kernels use) and AVX2+FMA. On the project's Zen 4 machine AVX-512 made the bfloat16 kernels
    1.3-1.5x faster than AVX2 (native bf16 conversions); float32 was the same.
    BN_EXT_CPU_ISA=default|avx2|avx512 overrides, e.g. to build for older machines.
    """
    isa = os.environ.get("BN_EXT_CPU_ISA", "").strip().lower()
    if not isa:
        isa = "default"
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                with open("/proc/cpuinfo") as f:
                    flags = set(f.read().split())
            except OSError:
                flags = set()
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
                isa = "avx512"
            elif {"avx2", "fma", "f16c"} <= flags:
                isa = "avx2"
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa != "default":
        raise SystemExit(f"BN_EXT_CPU_ISA must be default, avx2 or avx512, not {isa!r}")
    return []


def _openmp_flags():
    """-fopenmp for compiling and linking, where the C++ compiler takes it.

    at::parallel_for is a header template whose OpenMP backend is `#pragma omp parallel`: without
    -fopenmp it silently runs on one thread. The link records libgomp.so.1, which resolves to the
    copy torch has already loaded (same soname), so the extension shares torch's thread pool.
    Some compilers refuse it: Apple's clang ("unsupported option"), a clang with no OpenMP
    runtime installed ('omp.h' not found). There the CPU kernels are built without OpenMP, on one
    thread, with a warning, rather than not at all. The probe builds a small OpenMP program with
    the compiler torch's build uses ($CXX, else c++).
    """
    cxx = shlex.split(cpp_extension.get_cxx_compiler())
    program = ("#include <omp.h>\nint main() {\n  int n = 0;\n#pragma omp parallel\n"
               "  n = omp_get_num_threads();\n  return n > 0 ? 0 : 1;\n}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(program)
        try:
            proc = subprocess.run(cxx + ["-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                                  capture_output=True, text=True, timeout=120)
            ok, why = proc.returncode == 0, (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, why = False, str(e)
    if ok:
        return ["-fopenmp"], ["-fopenmp"]
    first = why.splitlines()[0] if why else "no message"
    print(f"bn_ext: WARNING: {' '.join(cxx)} cannot build an OpenMP program with -fopenmp "
          f"({first}); the CPU kernels are built without OpenMP and run on one thread")
    return [], []


def _default_arch_list():
    """With no GPU to detect, build for Ampere and Hopper, plus PTX so newer GPUs can JIT."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        return  # torch detects the visible GPUs itself
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def extensions():
    use_cuda, why = _want_cuda()
    print(f"bn_ext: building {'CPU + CUDA' if use_cuda else 'CPU-only'} kernels ({why})")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Only ops.cpp touches Python (an empty module init), so the limited API suffices; it is a
    # host-compiler flag (nvcc never sees Python.h).
    # No -std here or for nvcc: torch's BuildExtension adds the C++ standard its own headers need
    # (C++17 in torch 2.11, C++20 from 2.13 on; torch 2.15's headers do not compile as C++17).
    cxx = ["-O3", "-fvisibility=hidden", f"-DPy_LIMITED_API={LIMITED_API}"]
    cxx += _cpu_isa_flags()
    openmp_cxx, link = _openmp_flags()
    cxx += openmp_cxx
    if not use_cuda:
        return [cpp_extension.CppExtension(
            "bn_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
            py_limited_api=True)]
    _default_arch_list()
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # --warn-on-spills: ptxas names every kernel that spills registers to local memory (a
    # bandwidth-bound kernel should not); .ci/cuda_build.sh fails on any outside the two
    # cooperative single-pass kernels, which hold a tile in registers.
    # --fmad=false: no multiply-add that the source does not write (fmaf/fma), as in the host
    # emulator's build (-ffp-contract=off), so that the emulator's results are the GPU's bits. On
    # sm_90 it changes only float64 code (the float kernels' fused multiply-adds are all explicit).
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false",
            "-Xptxas=--warn-on-spills", "-DBN_EXT_WITH_CUDA"]
    # ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a minimal toolkit lacks and
    # pip's CUDA torch has in its nvidia wheels. Those hold a whole CUDA include tree of torch's
    # CUDA version, which may be newer than nvcc's (torch 2.15 is built with 13.2; CCCL refuses
    # to compile with another version's runtime headers): the toolkit's own include folder goes
    # first, so that its headers win and the wheels supply only what it lacks.
    extra_include = [os.path.join(os.environ["CUDA_HOME"], "include")]
    try:
        import nvidia  # noqa: F401

        for base in nvidia.__path__:
            extra_include += glob.glob(os.path.join(base, "cu*", "include"))
            extra_include += glob.glob(os.path.join(base, "*", "include"))
    except ImportError:
        pass
    return [cpp_extension.CUDAExtension(
        "bn_ext._C", sources, include_dirs=extra_include,
        extra_compile_args={"cxx": cxx + ["-DBN_EXT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link, py_limited_api=True)]


class BuildPyWithTorchVersion(build_py):
    """Also writes bn_ext/_build_info.py into the build: the torch the extension is compiled
    against, which bn_ext compares with the torch it imports. Without --no-build-isolation, pip
    builds against a torch it fetches for the build (the newest release), not the one installed;
    the extension then fails to load, or loads into a torch whose C++ ABI is not its own."""

    def run(self):
        super().run()
        import torch

        path = os.path.join(self.build_lib, "bn_ext", "_build_info.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write('"""Written by setup.py: the torch this bn_ext was compiled against."""\n'
                    f"TORCH_VERSION = {torch.__version__!r}\n")


setup(
    name="bn_ext",
    version="0.1.0",
    description="BatchNorm for PyTorch on hand-written C++ and CUDA kernels",
    packages=find_packages(include=["bn_ext", "bn_ext.*"]),
    package_data={"bn_ext": ["*.pyi", "py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True),
              "build_py": BuildPyWithTorchVersion},
    options={"bdist_wheel": {"py_limited_api": f"cp3{int(LIMITED_API, 16) >> 16 & 0xFF}"}},
    entry_points={"console_scripts": ["bn-ext-check = bn_ext.__main__:main"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)
