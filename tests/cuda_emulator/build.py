"""Build bn_ext with its CUDA kernels compiled for the host, and run the test suite against them.

No GPU has to be present: csrc/cuda's kernels are compiled with g++ as C++, against the device
side in emu.h, the runtime in runtime.cpp and the shim headers in include/, and csrc/ops.cpp is
compiled with BN_EXT_CUDA_EMULATOR so that every op runs those kernels on CPU tensors. The tests
then compare the CUDA kernels' results with torch, as they do the CPU kernels'.

    python tests/cuda_emulator/build.py [--out DIR] [--ubsan] [-- PYTEST ARGS]

builds DIR/bn_ext (default build/cuda-emulator: the package's Python files and the emulated _C)
and, when pytest arguments follow `--`, runs pytest on them with that package first on the path.
--ubsan compiles it with UndefinedBehaviorSanitizer (g++ -fsanitize=undefined): a signed index
that overflows, a shift past the width, a misaligned or null access, and the like end the
process with a report (CI builds it so).
Switches read by the emulated kernels at run time: BN_EXT_EMU_SMS (streaming multiprocessors,
default 4), BN_EXT_EMU_BLOCKS_PER_SM (resident blocks per SM of a cooperative launch, default 2;
the kernels cache it at their first launch, so set it before the process starts),
BN_EXT_EMU_BLOCKS_PER_SM_OF=TEXT:N (N for the kernels whose mangled type contains TEXT),
BN_EXT_EMU_ORDER=reverse (a block's threads run last to first between barriers),
BN_EXT_EMU_DEADLOCK_S (default 120), BN_EXT_CUDA_PERSISTENT=1 (the single-pass kernels, as on a
GPU).

What this proves and what it does not is in emu.h: the kernels' indexing, reductions, launch
geometry and host logic, yes; the GPU's memory model and speed, no.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# `kernel<<<grid, block, bytes, stream>>>(args)` -> `kernel ->* ::emu::launch(grid, ...)(args)`
# (emu.h's operator->* runs it); a kernel's address taken for cudaLaunchCooperativeKernel keeps its
# parameter types through ::emu::erase. Neither rewrite adds a line, so errors keep their lines.
LAUNCH_OPEN = re.compile(r"<<<")
LAUNCH_CLOSE = re.compile(r">>>")
ERASE = re.compile(r"reinterpret_cast<const void\*>\((\w+)\)")
# `__shared__ T a[...], b;` (one line each in csrc/cuda) gains, on the same line,
# `::emu::poison_shared(&a, sizeof(a)); ...`: the first thread of a block to pass it fills the
# variable with all-ones bits (NaN), so that a read before any write shows, where a GPU would
# read whatever the SM held.
SHARED = re.compile(r"^(\s*)__shared__\s+(.*);\s*$", re.M)


def _top_level_split(text):
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[(<"
        depth -= ch in "])>"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _poison(match):
    names = []
    for part in _top_level_split(match.group(2)):
        declarator = part.split("[", 1)[0].strip()
        names.append(re.findall(r"\w+", declarator)[-1])
    poison = " ".join(f"::emu::poison_shared(&{n}, sizeof({n}));" for n in names)
    return f"{match.group(0)} {poison}"


def translate(src, dst):
    with open(src) as f:
        text = f.read()
    opens, closes = len(LAUNCH_OPEN.findall(text)), len(LAUNCH_CLOSE.findall(text))
    if opens != closes:
        raise SystemExit(f"{src}: {opens} '<<<' but {closes} '>>>'")
    text = LAUNCH_OPEN.sub(" ->* ::emu::launch(", text)
    text = LAUNCH_CLOSE.sub(")", text)
    text = ERASE.sub(r"::emu::erase(\1)", text)
    text, poisoned = SHARED.subn(_poison, text)
    if poisoned != text.count("__shared__"):
        raise SystemExit(f"{src}: a __shared__ declaration that is not one line of its own")
    rel = os.path.relpath(src, ROOT)
    text = f'#include "emu.h"\n#line 1 "{rel}"\n{text}'
    if os.path.exists(dst):
        with open(dst) as f:
            if f.read() == text:
                return  # unchanged: ninja keeps the object
    with open(dst, "w") as f:
        f.write(text)


def build(out, ubsan=False):
    from torch.utils import cpp_extension

    gen = os.path.join(out, "src")
    lib = os.path.join(out, "lib")
    os.makedirs(gen, exist_ok=True)
    os.makedirs(lib, exist_ok=True)
    sources = [os.path.join(ROOT, "csrc", "ops.cpp"),
               os.path.join(ROOT, "csrc", "cpu", "output_cache.cpp"),
               os.path.join(HERE, "runtime.cpp")]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        dst = os.path.join(gen, os.path.basename(cu)[:-3] + "_emu.cpp")
        translate(cu, dst)
        sources.append(dst)
    # No contraction of a * b + c into an FMA the source did not ask for (nvcc does
    # contract, g++ does on some hosts): the kernels' explicit fmaf/fma are what they are.
    cflags = ["-O2", "-ffp-contract=off", "-DBN_EXT_WITH_CUDA", "-DBN_EXT_CUDA_EMULATOR"]
    ldflags = []
    if ubsan:
        sanitize = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
        cflags += sanitize + ["-g"]
        ldflags += sanitize
    cpp_extension.load(
        name="_C", sources=sources, build_directory=lib, is_python_module=False,
        extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
    pkg = os.path.join(out, "bn_ext")
    os.makedirs(pkg, exist_ok=True)
    for py in glob.glob(os.path.join(ROOT, "bn_ext", "*.py")):
        shutil.copy(py, pkg)
    shutil.copy(os.path.join(lib, "_C.so"), os.path.join(pkg, "_C.so"))
    return pkg


def main():
    argv = sys.argv[1:]
    pytest_args = None
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "build", "cuda-emulator"))
    p.add_argument("--ubsan", action="store_true",
                   help="compile with -fsanitize=undefined (any report ends the process)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    pkg = build(out, ubsan=args.ubsan)
    print(f"emulated build: {pkg}")
    if pytest_args is None:
        return 0
    env = dict(os.environ, BN_EXT_CUDA_EMULATED="1",
               PYTHONPATH=out + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Run from `out`, so that neither the checkout's bn_ext nor an installed one is imported.
    check = ("import bn_ext, torch; "
             f"assert bn_ext.__file__.startswith({out!r}), bn_ext.__file__; "
             "assert bn_ext.has_cuda_kernels() and not torch.cuda.is_available()")
    subprocess.run([sys.executable, "-c", check], cwd=out, env=env, check=True)
    # Test paths are taken relative to the checkout, as pytest would from there.
    tests = [os.path.join(ROOT, a) if os.path.exists(os.path.join(ROOT, a.split("::")[0])) else a
             for a in pytest_args]
    return subprocess.call([sys.executable, "-m", "pytest", "--rootdir", ROOT, *tests],
                           cwd=out, env=env)


if __name__ == "__main__":
    sys.exit(main())
