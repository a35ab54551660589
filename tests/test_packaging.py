"""What the build and its packages carry, and what setup.py decides.

The source distribution carries everything a build from it needs. setup.py names only the sources
it compiles on the machine that makes the sdist (no .cu file where torch has no CUDA) and no
headers at all; MANIFEST.in adds the rest. Without it an sdist made on a CPU machine failed to
build anywhere (csrc/bn_ext.h missing) and had no CUDA kernels to build. setup.py also probes the
compiler for OpenMP, and records the torch it compiles against, which bn_ext checks at import.
"""
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(*folders, exts):
    """Files under ROOT/folder with one of exts, as paths relative to ROOT."""
    found = set()
    for folder in folders:
        for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
            found.update(os.path.relpath(os.path.join(base, f), ROOT)
                         for f in files if f.endswith(exts))
    return found


def _setup_py(*args, cxx=None):
    """Runs `setup.py args` in the source tree as a CPU machine would (BN_EXT_FORCE_CPU=1), with
    the C++ compiler `cxx` (default: c++); what it printed."""
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not run from a source tree")
    env = dict(os.environ, BN_EXT_FORCE_CPU="1")
    env.pop("CXX", None)
    if cxx is not None:
        env["CXX"] = cxx
    proc = subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    # egg_info's folder in tmp too, so that the source tree is left as it was.
    _setup_py("-q", "egg_info", "--egg-base", str(out), "sdist", "--formats=gztar",
              "--dist-dir", str(out))
    (archive,) = [f for f in os.listdir(out) if f.endswith(".tar.gz")]
    with tarfile.open(os.path.join(out, archive)) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0] + "/"
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def test_sdist_holds_every_source_and_header(sdist_files):
    # The CUDA sources are among them although this sdist was made with BN_EXT_FORCE_CPU=1.
    sources = _tree("csrc", exts=(".h", ".cpp", ".cu", ".cuh"))
    assert any(s.endswith(".cu") for s in sources) and "csrc/bn_ext.h" in sources
    missing = sorted(sources - sdist_files)
    assert not missing, f"the sdist lacks {missing}"


def test_sdist_holds_the_package_build_and_test_files(sdist_files):
    wanted = _tree("bn_ext", exts=(".py",)) | _tree("tests", exts=(".py", ".h", ".cuh", ".cpp"))
    wanted |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    missing = sorted(wanted - sdist_files)
    assert not missing, f"the sdist lacks {missing}"
    assert not any("__pycache__" in n or n.endswith((".so", ".pyc")) for n in sdist_files)


def test_openmp_where_the_compiler_takes_it():
    # c++ (g++ here) builds OpenMP programs: no warning (test_ops checks the installed build);
    # `setup.py --name` builds nothing
    assert "without OpenMP" not in _setup_py("--name")


def test_openmp_left_out_where_the_compiler_refuses_it(tmp_path):
    # Apple's clang: "clang: error: unsupported option '-fopenmp'". The build goes on without
    # OpenMP (the CPU kernels on one thread), and says so, rather than failing.
    fake = tmp_path / "apple-clang++"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = -fopenmp ]; then\n"
                    "    echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1\n"
                    "  fi\ndone\nexec c++ \"$@\"\n")
    fake.chmod(0o755)
    said = _setup_py("--name", cxx=str(fake))
    assert ("cannot build an OpenMP program with -fopenmp (clang: error: unsupported option "
            "'-fopenmp'); the CPU kernels are built without OpenMP and run on one thread") in said


def test_build_records_the_torch_it_compiles_against(tmp_path):
    # build_py (no compiling) writes bn_ext/_build_info.py into the build
    _setup_py("-q", "build_py", "--build-lib", str(tmp_path))
    recorded = {}
    exec((tmp_path / "bn_ext" / "_build_info.py").read_text(), recorded)
    assert recorded["TORCH_VERSION"] == torch.__version__


# In a child process: bn_ext._build_info says another torch (and, for the second, bn_ext._C
# cannot be loaded, as when an extension built against a CUDA torch meets a CPU one).
_FAKE_BUILD = """
import sys, types, warnings
info = types.ModuleType("bn_ext._build_info")
info.TORCH_VERSION = {version!r}
sys.modules["bn_ext._build_info"] = info
if {no_extension}:
    sys.modules["bn_ext._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import bn_ext
    except ImportError as e:
        print("ImportError:", e)
for w in caught:
    if issubclass(w.category, RuntimeWarning):
        print("RuntimeWarning:", w.message)
"""


@pytest.mark.parametrize("version,warned", [("1.0.0", True), ("{release}.99+other", False)],
                         ids=["release", "patch"])
def test_import_warns_of_a_build_for_another_torch_release(version, warned):
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    proc = run_python(_FAKE_BUILD.format(version=version.format(release=release),
                                         no_extension=False))
    assert proc.returncode == 0, proc.stderr
    said = ("RuntimeWarning: bn_ext was compiled against torch 1.0.0, and torch "
            f"{torch.__version__} is installed: rebuild it against the installed torch with "
            "`pip install --no-build-isolation .`")
    assert (said in proc.stdout) == warned, proc.stdout
    assert "ImportError" not in proc.stdout and ("RuntimeWarning" in proc.stdout) == warned


def test_import_error_names_the_torch_the_build_was_for():
    proc = run_python(_FAKE_BUILD.format(version="9.9.0+cu999", no_extension=True))
    assert proc.returncode == 0, proc.stderr
    assert (f"ImportError: bn_ext was compiled against torch 9.9.0+cu999, and torch "
            f"{torch.__version__} is installed: rebuild it") in proc.stdout, proc.stdout
    assert "bn_ext._C could not be loaded" in proc.stdout
