#!/usr/bin/env bash
# The GPU proof for issue 3, in one script, for a machine with an NVIDIA GPU (H100/H200):
#   1. build bn_ext in place (setup.py build_ext --inplace) with its CUDA kernels, against the
#      torch already installed, for the visible GPU's architecture; no network needed;
#   2. run the whole pytest suite, slow tests included, with -rA, and tee it to
#      bench/results/<gpu>-tests.txt, headed by the device name and the torch/CUDA versions;
#   3. run compute-sanitizer memcheck, racecheck and synccheck over a small program that calls
#      every kernel (every op, both layouts, every dtype, small shapes, vectorized and scalar,
#      one-block and two-stage reductions, the single-pass kernels), saving
#      bench/results/<gpu>-memcheck.txt, -racecheck.txt and -synccheck.txt.
# Exits non-zero if the build, a test or a sanitizer run fails. About 5-10 minutes on an H100.
# Where $OUT is set (the device tool), the result files are copied there as well.
#
# For a short device lease, BN_EXT_PROOF_QUICK=1 runs only tests/test_cuda.py without the slow
# test, and then the quick benchmark twice, multi-pass and single-pass (bench.py --quick, and
# --quick --cuda-persistent), writing bench/results/cuda-<gpu>-quick[-persistent].md/.json/.png.
#
# Usage: bash bench/gpu_proof.sh            (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=$ROOT/bench/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

log() { printf '\n=== gpu_proof: %s (%s) ===\n' "$*" "$(date -u +%H:%M:%S)"; }
status=0

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))") || {
  echo "gpu_proof: no CUDA device visible to $PY" >&2; exit 1; }
GPU=$(echo "$NAME" | tr 'A-Z' 'a-z' | grep -oE '[a-z]+[0-9]{2,4}[a-z]*' | head -n 1)
GPU=${GPU:-gpu}
echo "device: $NAME -> results prefix $GPU"

log "build"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
BUILDLOG=$ROOT/build/gpu-proof-build.log
mkdir -p "$ROOT/build"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$(date +%s)
"$PY" setup.py build_ext --inplace >"$BUILDLOG" 2>&1 || {
  tail -n 60 "$BUILDLOG"; echo "gpu_proof: build failed" >&2; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, from any directory
"$PY" -c "import bn_ext; assert bn_ext.has_cuda_kernels(), 'no CUDA kernels in the build'" || exit 1

log "test suite"
QUICK=${BN_EXT_PROOF_QUICK:-0}
if [ "$QUICK" = "1" ]; then
  TEST_ARGS=(tests/test_cuda.py -m "not slow" -rA -p no:cacheprovider)
else
  TEST_ARGS=(tests -rA -p no:cacheprovider)
fi
TESTS=$RESULTS/$GPU-tests.txt
{
  echo "# bn_ext GPU test run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  "$PY" - <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"# device: {torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB)")
print(f"# torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
EOF
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# driver: /'
  echo "# command: python -m pytest ${TEST_ARGS[*]}"
  echo
} >"$TESTS"
t0=$(date +%s)
"$PY" -m pytest "${TEST_ARGS[@]}" 2>&1 | tee -a "$TESTS" | tail -n 25
rc=${PIPESTATUS[0]}
echo "tests: exit $rc in $(( $(date +%s) - t0 )) s"
[ "$rc" -eq 0 ] || status=1

log "compute-sanitizer"
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-/usr/local/cuda}" /usr/local/cuda /opt/nvidia/compute-sanitizer; do
  [ -n "$SAN" ] && break
  for f in "$d/bin/compute-sanitizer" "$d/compute-sanitizer"; do
    if [ -x "$f" ]; then SAN=$f; break; fi
  done
done
if [ -z "$SAN" ]; then
  echo "gpu_proof: compute-sanitizer not found" >&2
  status=1
else
  WORK=$(mktemp -d)/exercise_kernels.py
  cat >"$WORK" <<'EOF'
# Calls every bn_ext CUDA kernel once or twice on small inputs: every op, both layouts, every
# dtype, aligned (vectorized) and misaligned (scalar) inputs, one-block and two-stage reductions;
# the training ops once more with BN_EXT_CUDA_PERSISTENT=1 (the single-pass kernels).
import os
import torch
import bn_ext

ops = torch.ops.bn_ext
dev = "cuda"
torch.manual_seed(0)
launches = 0


def shaped(shape, dtype, layout):
    x = torch.randn(shape, device=dev, dtype=torch.float32).mul_(2).add_(0.5).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "misaligned":
        flat = torch.empty(x.numel() + 1, device=dev, dtype=dtype)
        y = flat[1:].view(shape)
        y.copy_(x)
        x = y
    return x


CASES = [((4, 8, 5, 6), "contiguous"), ((4, 8, 5, 6), "channels_last"),
         ((2, 3, 64, 64), "contiguous"),      # two-stage grid reduction
         ((2, 3, 64, 64), "channels_last"),   # two-stage, channels not a vector multiple
         ((512, 16), "channels_last"), ((3, 5, 7), "misaligned"), ((2, 16, 4, 4), "misaligned")]
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    for shape, layout in CASES:
        C = shape[1]
        x, dy = shaped(shape, dtype, layout), shaped(shape, dtype, layout)
        w = torch.rand(C, device=dev, dtype=mt) + 0.5
        b = torch.randn(C, device=dev, dtype=mt)
        mean, var = ops.batch_stats(x)
        y, mean, var = ops.train_forward(x, w, b, 1e-5)
        ops.train_forward(x, None, None, 1e-5)
        ops.normalize(x, mean, var, w, b, 1e-5)
        ops.normalize(x, mean, var, None, None, 1e-5)
        sdy, sdx, gw, gb = ops.backward_reduce(dy, x, mean, var, w, 1e-5)
        n = torch.tensor(float(x.numel() // C), device=dev, dtype=mt)
        ops.backward_input(dy, x, mean, var, w, sdy, sdx, n, 1e-5)
        ops.backward_input(dy, x, mean, var, None, None, None, None, 1e-5)
        ops.train_backward(dy, x, mean, var, w, 1e-5)
        rm, rv, nbt = torch.zeros(C, device=dev, dtype=mt), torch.ones(C, device=dev, dtype=mt), \
            torch.zeros((), device=dev, dtype=torch.long)
        ops.running_stats_update(rm, rv, nbt, mean, var, n, 0.1)
        ops.running_stats_update(rm, rv, nbt, mean, var, n, None)
        ops.running_stats_update(rm, rv, None, mean, var, n, 0.5)
        ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
        ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, None)
        os.environ["BN_EXT_CUDA_PERSISTENT"] = "1"
        y, mean, var = ops.train_forward(x, w, b, 1e-5)
        ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, 0.1)
        ops.train_backward(dy, x, mean, var, w, 1e-5)
        ops.train_backward(dy, x, mean, var, None, 1e-5)
        os.environ["BN_EXT_CUDA_PERSISTENT"] = "0"
        launches += 1
# The modules end to end, training and eval, forward and backward.
for layout in ("contiguous", "channels_last"):
    m = bn_ext.BatchNorm2d(8, momentum=None, device=dev)
    x = shaped((4, 8, 6, 6), torch.float32, layout).requires_grad_()
    m(x).sum().backward()
    m.eval()
    m(x).sum().backward()
torch.cuda.synchronize()
print(f"exercised every op over {launches} dtype/shape/layout cases")
EOF
  for tool in memcheck racecheck synccheck; do
    OUTF=$RESULTS/$GPU-$tool.txt
    t0=$(date +%s)
    {
      echo "# compute-sanitizer --tool $tool over every bn_ext CUDA kernel (bench/gpu_proof.sh)"
      echo "# device: $NAME; $("$SAN" --version | tail -n 1)"
      echo
    } >"$OUTF"
    # Every kernel of the program is checked: bn_ext's, and torch's few (randn, copy, fill).
    "$SAN" --tool "$tool" --error-exitcode 3 "$PY" "$WORK" >>"$OUTF" 2>&1
    rc=$?
    echo "$tool: exit $rc in $(( $(date +%s) - t0 )) s; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUTF" | tail -n 1)"
    [ "$rc" -eq 0 ] || status=1
  done
fi

if [ "$QUICK" = "1" ]; then
  for mode in "" "--cuda-persistent"; do
    log "quick benchmark ${mode:-(multi-pass)}"
    t0=$(date +%s)
    "$PY" bench/bench.py --device cuda --quick $mode >"$ROOT/build/bench${mode}.log" 2>&1
    rc=$?
    tail -n 30 "$ROOT/build/bench${mode}.log"
    echo "bench ${mode:-(multi-pass)}: exit $rc in $(( $(date +%s) - t0 )) s"
    [ "$rc" -eq 0 ] || status=1
  done
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$RESULTS/$GPU"-*.txt "$OUT"/ 2>/dev/null || true
  cp "$RESULTS"/cuda-*-quick* "$OUT"/ 2>/dev/null || true
  cp "$BUILDLOG" "$OUT"/ 2>/dev/null || true
fi
log "done: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED)"
exit "$status"
