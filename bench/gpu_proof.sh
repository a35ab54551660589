#!/usr/bin/env bash
# The GPU proof of bn_ext, in one script, for a machine with an NVIDIA GPU (H100/H200) and no
# network. Stages run in order of worth, each under a time limit, and each stage's results are
# copied to $OUT (the device tool's folder) as soon as they exist, so that a lease that ends early
# still brings back everything finished before it:
#   build       setup.py build_ext --inplace against the torch already installed, for the visible
#               GPU's architecture;
#   tests       pytest with -rA, teed to bench/results/<gpu>-tests.txt under a header naming the
#               device and the torch/CUDA/cuDNN versions;
#   bench       (quick mode only) bench.py --quick, the default path (the one-block single-pass
#               kernel where a channel fits, else multi-pass), beside the experiments' switches;
#               and a sample of ResNet-50's batch-256 rows (cuda-<device>-quick-b256.md);
#   counters    (quick mode only) Nsight Compute (ncu) over one call of the passes that trail a
#               peer, bn_ext's kernels and the peer's, saved as
#               bench/results/<gpu>-counters.txt: what bounds each (issue, memory, occupancy);
#   profile     (quick mode only) bench/cuda_profile.py, each kernel's time in the quick rows'
#               passes, multi-pass and single-pass, saved as bench/results/<gpu>-profile.txt;
#   sanitizers  compute-sanitizer memcheck, racecheck and synccheck over bench/cuda_exercise.py,
#               which calls every kernel, saved as bench/results/<gpu>-<tool>.txt;
#   fuzz        tests/fuzz_float64.py on the GPU, multi-pass and then with every switch on (the
#               single-pass kernels and the experiments), random shapes, dtypes and layouts
#               against float64, saved as bench/results/<gpu>-fuzz.txt.
#
# BN_EXT_PROOF_QUICK=1 is the plan for a 15-minute lease: tests/test_cuda.py without the slow
# test, the default path's quick benchmark, memcheck, the batch-256 rows, the counters (where ncu
# can read them; else that stage says so and passes), racecheck, synccheck, the CUDA cases of the
# other suites, the kernel profile and a short fuzz, while time remains (the last ones are
# skipped first). Without it:
# the whole suite (slow tests included), the three sanitizers and a 10-minute fuzz.
# BN_EXT_PROOF_BUDGET_S: seconds for the whole script (default 540 quick, 3000 otherwise); a stage
# that cannot have its minimum time is skipped and says so. A hung kernel is killed by its
# stage's time limit (and, where pytest-timeout is installed, a test's 90 s limit).
#
# Every stage's outcome is one line of bench/results/<gpu>-proof.txt. $OUT receives that file,
# the test log, the profile, the counters, the benchmark tables (.md) and proof.tgz, which holds
# every result file, the .json/.png, the logs and the build log: at most 8 files, as the device
# tool brings back.
# Exits non-zero if any stage failed, timed out or was skipped.
#
# A benchmark stopped by its limit leaves its partial table (bench.py writes after every group);
# `python bench/bench.py --device cuda --quick --resume` (same flags) times the rest.
#
# Usage: BN_EXT_PROOF_QUICK=1 bash bench/gpu_proof.sh     (PYTHON=... to choose the interpreter)
# On the device tool's copy of the tree, prefix BN_EXT_COMMIT=<hash> so that the logs and tables
# name the commit they measured: it wins over git, as the copy carried a .git of the session's
# first commit (seen 2026-12-04: HEAD there was ed03fa0 while the tree was 84eae82, so the
# prebuilt extension was refused and the build ran there).
# BN_EXT_PREBUILT=build/cuda-prebuilt/_C.abi3.so: use the extension that .ci/cuda_build.sh built
# (against the same torch, 2.11.0+cu130, as the GPU machines have) instead of building here,
# which saves the build's minutes of a lease; carry build/cuda-prebuilt. It is used only if its
# stamp names this commit (clean), this torch, and it imports with CUDA kernels; else the build
# runs as usual and the summary says why.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=$ROOT/bench/results
LOGS=$ROOT/build/gpu-proof
mkdir -p "$RESULTS" "$LOGS"
export PYTHONUNBUFFERED=1
QUICK=${BN_EXT_PROOF_QUICK:-0}
BUDGET=${BN_EXT_PROOF_BUDGET_S:-$([ "$QUICK" = "1" ] && echo 540 || echo 3000)}
T_START=$(date +%s)
DEADLINE=$((T_START + BUDGET))
MARK=$LOGS/.start  # files newer than this are this run's
touch "$MARK"
status=0

log() { printf '\n=== gpu_proof: %s (%s, %d s left) ===\n' "$*" "$(date -u +%H:%M:%S)" "$(left)"; }
left() { echo $((DEADLINE - $(date +%s))); }

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))") || {
  echo "gpu_proof: no CUDA device visible to $PY" >&2; exit 1; }
GPU=$(echo "$NAME" | tr 'A-Z' 'a-z' | grep -oE '[a-z]+[0-9]{2,4}[a-z]*' | head -n 1)
GPU=${GPU:-gpu}
SUMMARY=$RESULTS/$GPU-proof.txt
TESTS=$RESULTS/$GPU-tests.txt
{
  echo "# bn_ext GPU proof, $(date -u +%Y-%m-%dT%H:%M:%SZ);" \
    "mode $([ "$QUICK" = "1" ] && echo quick || echo full), budget $BUDGET s"
  if [ -n "${BN_EXT_COMMIT:-}" ]; then
    echo "# commit: $BN_EXT_COMMIT (BN_EXT_COMMIT names it)"
  elif git rev-parse HEAD >/dev/null 2>&1; then
    echo "# commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (with local changes)')"
  else
    echo "# commit: unknown (not a git checkout, and no BN_EXT_COMMIT)"
  fi
  "$PY" - <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"# device: {torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB)")
print(f"# torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
try:
    import matplotlib
    print(f"# matplotlib {matplotlib.__version__}")
except ImportError:
    print("# matplotlib: not installed, so no .png (python bench/bench.py --replot X.json, later)")
EOF
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# driver: /'
} >"$SUMMARY"
cat "$SUMMARY"

# Copies this run's results to $OUT: the summary, the test log and the benchmark tables as files,
# and everything (with the logs) in proof.tgz.
sync_out() {
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  local f files=()
  for f in "$SUMMARY" "$TESTS" "$RESULTS/$GPU-profile.txt" "$RESULTS/$GPU-counters.txt" \
    "$RESULTS"/cuda-*-quick*.md; do
    [ -f "$f" ] && [ "$f" -nt "$MARK" ] && cp "$f" "$OUT"/
  done
  for f in "$RESULTS"/* "$LOGS"/*; do
    [ -f "$f" ] && [ "$f" -nt "$MARK" ] && files+=("${f#"$ROOT"/}")
  done
  [ "${#files[@]}" -gt 0 ] && tar -czf "$OUT/proof.tgz" -C "$ROOT" "${files[@]}"
  return 0
}

# stage NAME MIN_S MAX_S function args...: runs the function, whose long commands run under
# `limited` (min(MAX_S, time left) seconds), unless less than MIN_S is left; appends the outcome
# to the summary and syncs $OUT.
LIMIT=0
limited() { timeout -k 15 "$LIMIT" "$@"; }
stage() {
  local name=$1 min_s=$2 max_s=$3
  shift 3
  local rem t0 rc=1 outcome
  rem=$(left)
  if [ "$rem" -lt "$min_s" ]; then
    outcome="skipped ($rem s left, needs $min_s)"
    status=1
  else
    LIMIT=$((rem < max_s ? rem : max_s))
    log "$name (limit $LIMIT s)"
    t0=$(date +%s)
    "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      outcome="TIMED OUT after $(( $(date +%s) - t0 )) s (limit $LIMIT s)"
    else
      outcome="exit $rc in $(( $(date +%s) - t0 )) s"
    fi
    [ "$rc" -eq 0 ] || status=1
  fi
  printf '%-28s %s\n' "$name:" "$outcome" | tee -a "$SUMMARY"
  sync_out
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# The prebuilt extension (BN_EXT_PREBUILT) in place of a build, if it is this commit's and this
# torch's; returns 1 otherwise, its last line saying why.
use_prebuilt() {
  local so=$BN_EXT_PREBUILT stamp want torch_v s_commit s_torch
  stamp=$so.stamp
  if [ ! -f "$so" ] || [ ! -f "$stamp" ]; then echo "no $so or no stamp beside it"; return 1; fi
  want=${BN_EXT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
  torch_v=$("$PY" -c "import torch; print(torch.__version__)")
  read -r _ s_commit _ s_torch _ <"$stamp"
  if [ -z "$want" ] || [[ "$s_commit" == *+dirty ]] || [[ "$s_commit" != "$want"* ]]; then
    echo "stamp '$(cat "$stamp")' is not commit '${want:-unknown}', clean"; return 1
  fi
  if [ "$s_torch" != "$torch_v" ]; then echo "stamp's torch $s_torch, here $torch_v"; return 1; fi
  cp "$so" bn_ext/_C.abi3.so
  if ! "$PY" -c "import bn_ext; assert bn_ext.has_cuda_kernels()"; then
    rm -f bn_ext/_C.abi3.so
    echo "the prebuilt extension does not import with CUDA kernels"; return 1
  fi
  echo "prebuilt extension used: $(cat "$stamp")"
}

build() {
  if [ -n "${BN_EXT_PREBUILT:-}" ]; then
    local why
    why=$(use_prebuilt 2>&1)
    local rc=$?
    echo "$why" | tail -n 1 | sed 's/^/# prebuilt: /' | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] && return 0
    echo "gpu_proof: the prebuilt extension is not used; building"
  fi
  if [ -z "${CUDA_HOME:-}" ]; then
    local d
    for d in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
      if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
    done
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  limited "$PY" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || {
    tail -n 60 "$LOGS/build.log"; echo "gpu_proof: build failed" >&2; return "$rc"; }
  "$PY" -c "import bn_ext; assert bn_ext.has_cuda_kernels(), 'no CUDA kernels in the build'"
}

TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 90 --timeout-method thread)
run_tests() {  # run_tests pytest-args...
  {
    echo
    echo "# command: python -m pytest $*"
  } >>"$TESTS"
  limited "$PY" -m pytest "$@" -rA -p no:cacheprovider "${TIMEOUT_ARGS[@]}" 2>&1 \
    | tee -a "$TESTS" | tail -n 25
  return "${PIPESTATUS[0]}"
}

bench() {  # bench log-name bench.py-args...
  local name=$1
  shift
  # --deadline-s: bench.py starts no group that would run past the stage's limit, and writes
  # its final table and plot in time (the rest: --resume, later).
  limited "$PY" bench/bench.py --device cuda --deadline-s $((LIMIT > 60 ? LIMIT - 30 : LIMIT / 2)) "$@" \
    >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.log"
  return "$rc"
}

SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-/usr/local/cuda}" /usr/local/cuda /opt/nvidia/compute-sanitizer; do
  [ -n "$SAN" ] && break
  for f in "$d/bin/compute-sanitizer" "$d/compute-sanitizer"; do
    if [ -x "$f" ]; then SAN=$f; break; fi
  done
done
sanitize() {  # sanitize tool
  local out=$RESULTS/$GPU-$1.txt
  [ -n "$SAN" ] || { echo "gpu_proof: compute-sanitizer not found" >&2; return 1; }
  {
    echo "# compute-sanitizer --tool $1 over every bn_ext CUDA kernel (bench/cuda_exercise.py)"
    echo "# device: $NAME; $("$SAN" --version | tail -n 1)"
    echo
  } >"$out"
  # Every kernel of the program is checked: bn_ext's, and torch's few (randn, copy, fill).
  limited "$SAN" --tool "$1" --error-exitcode 3 "$PY" bench/cuda_exercise.py >>"$out" 2>&1
  local rc=$?
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|exercised' "$out" | tail -n 2
  return "$rc"
}

profile() {  # each kernel's time in the quick rows' passes, multi-pass, then single-pass
  local out=$RESULTS/$GPU-profile.txt rc=0
  limited env BN_EXT_CUDA_PERSISTENT=0 "$PY" bench/cuda_profile.py >"$out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] && [ "${BN_EXT_EXERCISE_SINGLE_PASS:-1}" = "1" ]; then
    # the semi-persistent kernel first, on the channels-last 56x56 rows it is for
    limited env BN_EXT_CUDA_SEMI_PERSISTENT=1 "$PY" bench/cuda_profile.py --peers bn_ext \
      --pass fwd,bwd --rows 32x64x56x56:nhwc,32x256x56x56:nhwc >>"$out" 2>&1 || rc=$?
    limited env BN_EXT_CUDA_PERSISTENT=1 "$PY" bench/cuda_profile.py --peers bn_ext \
      --pass fwd,bwd >>"$out" 2>&1 || rc=$?
  fi
  grep -cE "^[0-9x]+ .* us in" "$out" | sed 's/$/ passes profiled/'
  return "$rc"
}

NCU=$(command -v ncu || true)
for f in "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" /usr/local/cuda/bin/ncu \
  /opt/nvidia/nsight-compute/*/ncu; do
  [ -n "$NCU" ] && break
  [ -x "$f" ] && NCU=$f
done
# The training rows that trail a peer most on the first H100 lease, all channels-last fp16
# backwards (fp32's are the same kernels on twice the bytes): 32x64x56x56 (0.83x cuDNN; fp32
# 0.87x) and 32x256x56x56 (0.90x), beside cuDNN's and torch.compile's kernels;
# one call each, under Nsight Compute's counters (--clock-control none: the clocks are left
# alone). Says whether a kernel is bound by issue slots, memory or latency. Then, while the
# stage has time, L2 as the bench meets it (--cache-control none, and cuda_profile --flush-l2:
# cold at the call's start, each kernel seeing what the ones before it left; application replay,
# so that a metric needing a second pass does not meet the first pass's leftovers): bn_ext's
# kernels' L2 hit rate and DRAM bytes on those rows and NCHW 32x256x56x56's fp32 backward (0.98x
# torch.compile), by default and under BN_EXT_CUDA_REVERSE_MAP=1, whose maps should hit more.
# Then the first step's channels-last rows under BN_EXT_CUDA_NARROW_ROWS=1 (the rows map's
# occupancy and bytes in flight), and last, NCHW 32x256x56x56's fp32 backward beside compile's
# kernels, with the sections above.
counters() {
  local out=$RESULTS/$GPU-counters.txt rc=0 t0 total=$LIMIT
  t0=$(date +%s)
  [ -n "$NCU" ] || { echo "gpu_proof: ncu (Nsight Compute) not found: no counters"; return 0; }
  {
    echo "# ncu over bench/cuda_profile.py --ncu: one call per pass, bn_ext and its peers"
    echo "# device: $NAME; $("$NCU" --version | tail -n 1)"
  } >"$out"
  local ncu=("$NCU" --profile-from-start off --clock-control none --section SpeedOfLight
    --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats
    --section MemoryWorkloadAnalysis)
  local l2=("$NCU" --profile-from-start off --clock-control none --cache-control none
    --replay-mode application --metrics
    gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum)
  limited "${ncu[@]}" "$PY" bench/cuda_profile.py --ncu --peers bn_ext,cudnn,compile \
    --rows 32x64x56x56:nhwc,32x256x56x56:nhwc --dtype fp16 --pass bwd >>"$out" 2>&1 || rc=$?
  # refused the counters (a container without permission; gVisor: LibraryNotLoaded)
  if grep -qE 'ERR_NVGPUCTRPERM|Failed to initialize the profiler' "$out"; then
    echo "gpu_proof: ncu cannot read this machine's counters (see $(basename "$out"))"
    return 0
  fi
  local step kind var envs
  for step in "l2 default" "l2 BN_EXT_CUDA_REVERSE_MAP=1" "rows BN_EXT_CUDA_NARROW_ROWS=1" \
    "sections default"; do
    read -r kind var <<<"$step"
    LIMIT=$((total - ($(date +%s) - t0)))  # the rest of the stage's limit
    [ "$rc" -eq 0 ] && [ "$LIMIT" -gt 20 ] || break
    envs=()
    [ "$var" = "default" ] || envs=("$var")
    echo "# $kind, $var" >>"$out"
    if [ "$kind" = "l2" ]; then
      limited env ${envs[@]+"${envs[@]}"} "${l2[@]}" "$PY" bench/cuda_profile.py --ncu \
        --flush-l2 --peers bn_ext --rows 32x64x56x56:nhwc,32x256x56x56:nchw --dtype fp32 \
        --pass bwd >>"$out" 2>&1 || rc=$?
    elif [ "$kind" = "rows" ]; then  # the first step's fp16 channels-last rows, bn_ext alone
      limited env ${envs[@]+"${envs[@]}"} "${ncu[@]}" "$PY" bench/cuda_profile.py --ncu \
        --peers bn_ext --rows 32x64x56x56:nhwc,32x256x56x56:nhwc --dtype fp16 --pass bwd \
        >>"$out" 2>&1 || rc=$?
    else
      limited "${ncu[@]}" "$PY" bench/cuda_profile.py --ncu --peers bn_ext,compile \
        --rows 32x256x56x56:nchw --dtype fp32 --pass bwd >>"$out" 2>&1 || rc=$?
    fi
  done
  LIMIT=$total
  grep -c '^==PROF== Profiling' "$out" | sed 's/$/ kernels profiled/'
  return "$rc"
}

fuzz() {  # fuzz seconds-per-path: multi-pass, then every switch unless single-pass was left out
  # Each path gets at most half the stage's limit, less 30 s of start-up, within LIMIT overall.
  local out=$RESULTS/$GPU-fuzz.txt rc=0 s=$1 half=$(( (LIMIT - 60) / 2 ))
  [ "$half" -lt "$s" ] && s=$half
  local total=$LIMIT
  echo "# tests/fuzz_float64.py --device cuda, $s s per path; device: $NAME" >"$out"
  LIMIT=$((s + 30))
  limited env BN_EXT_CUDA_PERSISTENT=0 "$PY" tests/fuzz_float64.py --device cuda --seconds "$s" \
    >>"$out" 2>&1 || rc=$?
  if [ "${BN_EXT_EXERCISE_SINGLE_PASS:-1}" = "1" ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then
    # The second path is every kernel a switch can reach: the single-pass ones (the one-block,
    # the cooperative and the semi-persistent kernels take what they fit), and the multi-pass
    # experiments the rest, so that the switches no GPU has run yet meet random shapes there
    # before one of them becomes a default.
    local every=(BN_EXT_CUDA_PERSISTENT=1 BN_EXT_CUDA_SEMI_PERSISTENT=1 BN_EXT_CUDA_MERGING_MAP=1
                 BN_EXT_CUDA_REVERSE_MAP=1 BN_EXT_CUDA_NARROW_ROWS=1 BN_EXT_CUDA_FIT_WAVE=1)
    echo "# ${every[*]}" >>"$out"
    limited env "${every[@]}" "$PY" tests/fuzz_float64.py --device cuda --seconds "$s" --seed 1 \
      >>"$out" 2>&1 || rc=$?
  fi
  LIMIT=$total
  grep -E "^(FAIL|[0-9]+ cases)" "$out" | tail -n 5
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
echo "# the tests' output: $(basename "$TESTS"); the benchmarks' tables: cuda-*-quick*.md" >>"$SUMMARY"
: >"$TESTS"
cat "$SUMMARY" >>"$TESTS"
stage build 120 420 build || {
  log "done: FAILED (no build)"
  exit 1
}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, from any directory

# After the CUDA tests: if a single-pass test failed or a test hung (pytest-timeout's banner),
# the single-pass benchmark is skipped and the sanitizers leave those kernels out, so that a
# deadlocked kernel costs one stage's limit, not every later stage's.
single_pass_ok() {
  if grep -qE "^(FAILED|ERROR) .*persistent|\+{5,} Timeout \+{5,}" "$TESTS"; then
    echo "single-pass kernels: failed or hung in the tests; left out from here on" \
      | tee -a "$SUMMARY"
    export BN_EXT_EXERCISE_SINGLE_PASS=0
    return 1
  fi
}

if [ "$QUICK" = "1" ]; then
  stage "tests (test_cuda.py)" 60 240 run_tests tests/test_cuda.py -m "not slow"
  # The coop variant runs the cooperative kernels: left out where the tests saw them fail or hang.
  COOP=()
  SEMI=()
  if single_pass_ok; then
    COOP=(--variant coop:BN_EXT_CUDA_PERSISTENT=1)
    SEMI=(--variant semi:BN_EXT_CUDA_SEMI_PERSISTENT=1)
  fi
  # With bn_ext beside it under: BN_EXT_CUDA_MERGING_MAP=1 (merge: NCHW training passes whose
  # reduction stages its sums, 56x56, map them with a kernel that merges them itself, no
  # finalize pass; on the other rows it runs what bn_ext runs, so those columns show how far two
  # timings of one kernel sequence differ), BN_EXT_CUDA_REVERSE_MAP=1 (rev: the training maps
  # sweep from the end, where the reduction left L2), BN_EXT_CUDA_NARROW_ROWS=1 (narrow: the
  # 16-bit channels-last backward's map in 8-byte vectors, 2.5x the bytes in flight an SM),
  # BN_EXT_CUDA_PERSISTENT=1 (coop: the cooperative single-pass kernels where a tile fits,
  # 1.06-1.15x the multi-pass path in the 56x56 float32 NCHW backwards on an H200, 0.3-0.9x in
  # most other rows), BN_EXT_CUDA_FIT_WAVE=1 (fit: NCHW reductions split a channel over one
  # wave of their own blocks, not 1.2-1.6 waves, as 32x256x56x56's by default), and
  # BN_EXT_CUDA_SEMI_PERSISTENT=1 (semi: channels-last training passes of up to 128 channels
  # in 32-bit types, 256 in 16-bit, in one cooperative kernel that holds each thread's last
  # rows on chip: 3 passes in the 16-bit 32x64x56x56 backward, where cuDNN's kernel of that
  # kind is 1.2x the multi-pass path). Like coop, left out where the single-pass tests failed.
  # The dependent launches' own columns (pdl) are in the H100 table of a6e9ccd. The variants
  # run on the bar's passes only, training forward and backward (in eval they run bn_ext's
  # default code; fwdbwd is the two): six variants on every pass would not fit the stage.
  # fp16 before bf16: a stage cut short keeps the dtype with more rows below the bar (3 of the
  # a6e9ccd table's 6, against bf16's 1; cuDNN runs fp16, not bf16).
  stage "bench quick, default path" 120 270 bench bench --quick --dtype fp32,fp16,bf16 \
    --variant-passes fwd,bwd \
    --variant merge:BN_EXT_CUDA_MERGING_MAP=1 --variant rev:BN_EXT_CUDA_REVERSE_MAP=1 \
    --variant narrow:BN_EXT_CUDA_NARROW_ROWS=1 --variant fit:BN_EXT_CUDA_FIT_WAVE=1 \
    ${COOP[@]+"${COOP[@]}"} ${SEMI[@]+"${SEMI[@]}"}
  stage "sanitizer memcheck" 45 120 sanitize memcheck
  # ResNet-50's batch-256 rows, which no lease has timed yet (the quick plan is batch 32): the
  # 56x56 layers (x6 and x4 in the net) and 7x7's widest (multi-pass by default: 12544 values a
  # channel), fp32 and fp16, both layouts, training forward and backward, beside cuDNN and
  # torch.compile (native was the best peer on no fp32 or fp16 ResNet-50 row of the H100 and
  # H200 quick tables; the full plan times it), with rev, merge, narrow and coop. Not
  # --quick (its shapes are batch 32): 50 samples a peer, and a group (shape, layout, dtype)
  # takes about 10-15 s, so the stage's deadline may leave the last ones for --resume.
  # The one-block experiments' rows (BN_EXT_CUDA_NARROW_VECTORS, _ONE_BLOCK_THREADS,
  # _TWO_SWEEPS), timed by the first H100 lease (cuda-nvidia-h100-80gb-hbm3-onepass-
  # experiments.md), left the quick plan for these.
  B256=$(echo "cuda-$NAME" | tr 'A-Z ' 'a-z-')-quick-b256  # cuda-nvidia-h100-...-quick-b256
  stage "bench batch-256 rows" 90 150 bench bench-b256 --name "$B256" \
    --shape 256x64x56x56,256x256x56x56,256x2048x7x7 --dtype fp32,fp16 --pass fwd,bwd \
    --peers cudnn,compile --variant rev:BN_EXT_CUDA_REVERSE_MAP=1 \
    --variant merge:BN_EXT_CUDA_MERGING_MAP=1 --variant narrow:BN_EXT_CUDA_NARROW_ROWS=1 \
    ${COOP[@]+"${COOP[@]}"}
  stage "kernel counters (ncu)" 60 150 counters
  stage "sanitizer racecheck" 45 150 sanitize racecheck
  stage "sanitizer synccheck" 45 120 sanitize synccheck
  stage "tests (other suites, cuda)" 60 300 run_tests tests --ignore tests/test_cuda.py -k cuda \
    -m "not slow"
  stage "kernel profile" 30 90 profile
  stage "fuzz against float64" 70 120 fuzz 30
  # The cooperative kernels' own quick bench, with the multi-pass path beside them as a peer,
  # is not in the plan (the coop variant above times them): `python bench/bench.py --device cuda
  # --quick --cuda-persistent --pass fwd,bwd,fwdbwd --peers cudnn,native`.
else
  stage "tests (whole suite)" 300 1800 run_tests tests
  single_pass_ok
  for tool in memcheck racecheck synccheck; do
    stage "sanitizer $tool" 60 600 sanitize "$tool"
  done
  stage "fuzz against float64" 120 1300 fuzz 300
fi

echo "# total $(( $(date +%s) - T_START )) s: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED)" \
  | tee -a "$SUMMARY"
sync_out
rm -f "$MARK"
log "done: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED)"
exit "$status"
