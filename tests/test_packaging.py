"""The source distribution carries everything a build from it needs.

setup.py names only the sources it compiles on the machine that makes the sdist (no .cu file where
torch has no CUDA) and no headers at all; MANIFEST.in adds the rest. Without it an sdist made on a
CPU machine failed to build anywhere (csrc/bn_ext.h missing) and had no CUDA kernels to build.
"""
import os
import subprocess
import sys
import tarfile

import pytest

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


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not run from a source tree")
    out = tmp_path_factory.mktemp("sdist")
    # egg_info's folder in tmp too, so that the source tree is left as it was.
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
           "sdist", "--formats=gztar", "--dist-dir", str(out)]
    env = dict(os.environ, BN_EXT_FORCE_CPU="1")  # the sdist a CPU machine makes
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
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


def _setup_py_says(tmp_path, cxx=None):
    """What setup.py prints as it chooses its flags (`setup.py --name` builds nothing)."""
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not run from a source tree")
    env = dict(os.environ, BN_EXT_FORCE_CPU="1")
    env.pop("CXX", None)
    if cxx is not None:
        env["CXX"] = cxx
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_openmp_where_the_compiler_takes_it(tmp_path):
    # c++ (g++ here) builds OpenMP programs: no warning (test_ops checks the installed build)
    assert "without OpenMP" not in _setup_py_says(tmp_path)


def test_openmp_left_out_where_the_compiler_refuses_it(tmp_path):
    # Apple's clang: "clang: error: unsupported option '-fopenmp'". The build goes on without
    # OpenMP (the CPU kernels on one thread), and says so, rather than failing.
    fake = tmp_path / "apple-clang++"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = -fopenmp ]; then\n"
                    "    echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1\n"
                    "  fi\ndone\nexec c++ \"$@\"\n")
    fake.chmod(0o755)
    said = _setup_py_says(tmp_path, cxx=str(fake))
    assert ("cannot build an OpenMP program with -fopenmp (clang: error: unsupported option "
            "'-fopenmp'); the CPU kernels are built without OpenMP and run on one thread") in said
