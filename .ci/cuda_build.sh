#!/usr/bin/env bash
# Compile and link bn_ext's CUDA kernels on a machine with no GPU, so that a CUDA compile or link
# error fails CI (../shared/ENGINEERING.md section 5 has the recipe).
#
#   1. a virtual environment with the CUDA build of torch (created once, reused: $BN_EXT_CUDA_VENV,
#      default .venv-cuda, which .gitignore covers). The torch is 2.11.0+cu130, the one on the
#      project's GPU machines, or $BN_EXT_CUDA_TORCH_VERSION (then in .venv-cuda-<version> and
#      build/cuda-ci-<version>): CI builds against the GPU machines' torch and the newest
#      release, and the README's command tests torch 2.13, so that an API or header change in
#      any of them fails here, not on a short GPU lease or at a user's desk;
#   2. a copy of the tracked and untracked-not-ignored files in build/cuda-ci (ignored), so that
#      the CPU build's bn_ext/_C*.so in the source tree is never touched. The copy keeps its
#      build/ folder and the files' times, so ninja recompiles only what changed;
#   3. pip install --no-build-isolation of that copy, with CUDA_HOME and
#      TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" (sm_80 and sm_90 machine code, compute_90 PTX);
#   4. checks: the import works with no GPU, bn_ext.has_cuda_kernels() is True, the CPU kernels
#      of this CUDA-enabled build run, and (when cuobjdump is found) the fat binary holds
#      sm_90, and with the default list sm_80 and PTX too.
# BN_EXT_CUDA_PYTHON names the interpreter that creates a new environment (default python3); CI
# builds against the newest torch under Python 3.13.
# Set BN_EXT_CUDA_TESTS=1 to also run the whole test suite in that environment (CUDA tests skip;
# BN_EXT_CI_WORKERS pytest-xdist workers, default one a core); .ci/run does.
# Any failure exits non-zero with the end of the build log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
GPU_TORCH=2.11.0  # the GPU machines' torch; '===' pins the registry's CUDA 13.0 build
TORCH_VERSION=${BN_EXT_CUDA_TORCH_VERSION:-$GPU_TORCH}
if [ "$TORCH_VERSION" = "$GPU_TORCH" ]; then
  VENV=${BN_EXT_CUDA_VENV:-$ROOT/.venv-cuda}
  STAGE=$ROOT/build/cuda-ci
else  # another torch (CI also builds against the newest): its own environment and build folder
  VENV=${BN_EXT_CUDA_VENV:-$ROOT/.venv-cuda-$TORCH_VERSION}
  STAGE=$ROOT/build/cuda-ci-$TORCH_VERSION
fi
LOG=$STAGE.log
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
DEFAULT_ARCH_LIST="8.0;9.0+PTX"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$DEFAULT_ARCH_LIST}

log() { printf '\n--- cuda_build: %s (%s) ---\n' "$*" "$(date -u +%H:%M:%S)"; }
die() { echo "cuda_build: FAILED: $*" >&2; exit 1; }
start=$(date +%s)

[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"

log "environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "${BN_EXT_CUDA_PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
if ! "$PY" -c "import torch, ninja, setuptools, wheel, sys; sys.exit(0 if torch.version.cuda and \
torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" >/dev/null 2>&1; then
  # The CUDA torch and its nvidia packages take about 5 GB installed; pip's cache would hold
  # another 5 GB of wheels, so it is off. Say so plainly rather than die in pip with ENOSPC.
  need_gb=8
  free_gb=$(df -P -k "$VENV" | awk 'NR == 2 {print int($4 / 1048576)}')
  [ "$free_gb" -ge "$need_gb" ] || die "the CUDA torch needs about $need_gb GB of disk under \
$VENV; $free_gb GB is free (set BN_EXT_CUDA_VENV to a venv elsewhere, or free some space)"
  # A machine-wide pip constraints file may cap torch below the version pinned here.
  PIP_CONSTRAINT=/dev/null "$PY" -m pip install -q --no-cache-dir "torch===$TORCH_VERSION" \
    ninja numpy setuptools wheel
fi
# The README's test dependencies, and pytest-xdist (the suite runs on a worker a core, as in
# .ci/run).
if [ "${BN_EXT_CUDA_TESTS:-0}" = "1" ] && \
    ! "$PY" -c "import pytest, hypothesis, onnx, onnxscript, onnxruntime, xdist" 2>/dev/null; then
  "$PY" -m pip install -q pytest hypothesis onnx onnxscript onnxruntime pytest-xdist
fi
# The checks and tests import the installed bn_ext, from an empty folder (a folder of /tmp named
# like a module would shadow it: an empty /tmp/z3 once broke torch's import of z3).
AWAY=$(mktemp -d)
trap 'rm -rf "$AWAY"' EXIT
"$PY" -c "import sys, torch; assert torch.version.cuda, 'torch in $VENV has no CUDA'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'Python', sys.version.split()[0])"
"$CUDA_HOME/bin/nvcc" --version | tail -n 1

log "copy of the tree in $STAGE"
bash "$ROOT/.ci/stage_tree.sh" "$ROOT" "$STAGE"
ls "$STAGE"/csrc/cuda/*.cu >/dev/null 2>&1 || die "no csrc/cuda/*.cu in the tree"

log "build (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! (cd "$STAGE" && "$PY" -m pip install --no-build-isolation --no-deps -v . ) >"$LOG" 2>&1; then
  echo "----- compiler errors -----" >&2
  grep -nE "error|Error" "$LOG" | grep -v "Werror" | head -n 60 >&2 || true
  echo "----- end of $LOG -----" >&2
  tail -n 60 "$LOG" >&2
  die "the CUDA build did not compile or link (full log: $LOG)"
fi
grep -q "building CPU + CUDA kernels" "$LOG" || die "setup.py did not build the CUDA kernels: \
$(grep -m1 'bn_ext: building' "$LOG" || echo 'no build line')"

# Register spills, as ptxas reports them (--warn-on-spills, set in setup.py): none is allowed
# outside the two cooperative single-pass kernels, which hold a tile of the input in registers
# by design; the other single-pass kernels (one-block, two-sweep, semi-persistent) may not spill
# either. (A rebuild reports only the files it recompiled; CI's fresh clone compiles them all.)
spilled=$(grep -o "spilled to local memory in function '[^']*'" "$LOG" \
  | sed "s/.*function '//; s/'\$//" | sort -u || true)
if [ -n "$spilled" ]; then
  echo "kernels that spill registers (sm_80 or sm_90):"
  echo "$spilled" | c++filt | sed -E 's/\(anonymous namespace\):://g; s/(bn_ext|cuda|detail):://g;
    s/^void //; s/>\(.*/>/; s/^/  /' | cut -c1-150
  outside=$(echo "$spilled" | grep -vE "persistent_(contiguous|channels_last)_kernel" || true)
  [ -z "$outside" ] || die "kernels other than the two cooperative ones spill registers (above)"
fi

log "checks"
(cd "$AWAY" && "$PY" - <<'EOF'
import os
import torch
import bn_ext
print("bn_ext from", os.path.dirname(bn_ext.__file__))
assert bn_ext.has_cuda_kernels(), "bn_ext.has_cuda_kernels() is False"
# The CPU kernels of the CUDA-enabled build still work.
x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
m = bn_ext.BatchNorm2d(3, dtype=torch.float64)
ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
torch.testing.assert_close(m(x), ref(x))
print("has_cuda_kernels: True; CPU smoke test passed; GPU visible:", torch.cuda.is_available())
EOF
) || die "the built extension failed its checks"

SO=$(cd "$AWAY" && "$PY" -c "import bn_ext._C as c; print(c.__file__)")
OBJDUMP=""
for cand in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
    "$("$PY" -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then OBJDUMP=$cand; break; fi
done
if [ -n "$OBJDUMP" ]; then
  elves=$("$OBJDUMP" -lelf "$SO")
  ptx=$("$OBJDUMP" -lptx "$SO")
  echo "$elves" | grep -q "sm_90" || die "no sm_90 code in $SO"
  if [ "$TORCH_CUDA_ARCH_LIST" = "$DEFAULT_ARCH_LIST" ]; then  # (CI's newest torch: 9.0 alone)
    echo "$elves" | grep -q "sm_80" || die "no sm_80 code in $SO"
    echo "$ptx" | grep -q "sm_90" || die "no compute_90 PTX in $SO"
  fi
  echo "fat binary: $(echo "$elves" | wc -l) cubins and $(echo "$ptx" | wc -l) PTX" \
    "($TORCH_CUDA_ARCH_LIST)"
  # What the dependent launches load before their wait, and how (common.cuh,
  # wait_for_prior_grid).
  "$PY" "$ROOT/.ci/check_dependent_loads.py" "$OBJDUMP" "$SO" \
    || die "a dependent launch's loads are not the ones its wait allows (above)"
else
  echo "cuobjdump not found: architecture and dependent-load checks skipped"
fi

# The built extension, kept with a stamp (commit, torch, architectures) in build/cuda-prebuilt/,
# which bench/gpu_proof.sh can take (BN_EXT_PREBUILT) instead of building on a short GPU lease:
# only a build against the GPU machines' torch. Its debug sections are stripped (58 MB -> 39 MB
# at 57f7993): the device tool carries at most 64 MiB with the tree.
if [ "$TORCH_VERSION" = "$GPU_TORCH" ]; then
  PREBUILT=$ROOT/build/cuda-prebuilt
  mkdir -p "$PREBUILT"
  cp "$SO" "$PREBUILT/_C.abi3.so"
  strip --strip-debug "$PREBUILT/_C.abi3.so" 2>/dev/null || echo "strip failed: kept unstripped"
  commit=unknown
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git -C "$ROOT" rev-parse HEAD)
    [ -z "$(git -C "$ROOT" status --porcelain)" ] || commit="$commit+dirty"
  fi
  echo "commit $commit torch $("$PY" -c 'import torch; print(torch.__version__)') arch $TORCH_CUDA_ARCH_LIST" \
    >"$PREBUILT/_C.abi3.so.stamp"
  echo "kept as $PREBUILT/_C.abi3.so: $(cat "$PREBUILT/_C.abi3.so.stamp")"
fi

if [ "${BN_EXT_CUDA_TESTS:-0}" = "1" ]; then
  log "test suite in the CUDA environment"
  (cd "$AWAY" && "$PY" -m pytest "$STAGE/tests" -q -p no:cacheprovider \
    -n "${BN_EXT_CI_WORKERS:-auto}")
fi

log "passed in $(( $(date +%s) - start )) s"
