#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: the tree is built with
# -fsanitize=address,undefined in a folder of its own (the CPU kernels only) and the test suite
# runs against that build, in the active Python environment (CI runs it in the README's). The
# first report of either sanitizer ends the run with an error.
#
# Python itself is not instrumented, so the ASan runtime is preloaded. Leak checks are off (the
# interpreter and torch keep their allocations to the end), and so is the check that a block is
# freed by the kind of call that allocated it (torch frees with free() some blocks it allocated
# with new[]). The output cache poisons its idle blocks and the slack past each output
# (csrc/cpu/output_cache.cpp), so writes past an output are caught there too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
STAGE=${BN_EXT_SANITIZE_DIR:-$ROOT/build/sanitize}
LOG=$STAGE.log

log() { printf '\n--- sanitize: %s (%s) ---\n' "$*" "$(date -u +%H:%M:%S)"; }
die() { echo "sanitize: FAILED: $*" >&2; exit 1; }
start=$(date +%s)

log "copy of the tree in $STAGE"
mkdir -p "$STAGE"
find "$STAGE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
  | (cd "$ROOT" && tar --null -cf - -T -) | tar -xf - -C "$STAGE"

log "build with -fsanitize=address,undefined (BN_EXT_CPU_ISA=default)"
# The portable ISA, not the AVX-512 or AVX2 a build picks on x86: ASan checks plain loads and
# stores but not masked ones, and ATen's AVX2 and AVX-512 Vectorized<T> take their partial steps
# (a run's tail) with masked intrinsics, which do not fault past an allocation either. Its
# portable Vectorized<T> moves every step with memcpy, which ASan checks. The kernels' indexing
# is the same in every ISA (only the streaming stores are missing from this one).
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
if ! (cd "$STAGE" && BN_EXT_FORCE_CPU=1 BN_EXT_CPU_ISA=default CFLAGS="$SAN -g" LDFLAGS="$SAN" \
      "$PY" setup.py build_ext --inplace) >"$LOG" 2>&1; then
  tail -n 60 "$LOG" >&2
  die "the sanitized build did not compile or link (full log: $LOG)"
fi

CXX_BIN=${CXX:-c++}
ASAN_LIB=$("$CXX_BIN" -print-file-name=libasan.so)
UBSAN_LIB=$("$CXX_BIN" -print-file-name=libubsan.so)
[ -f "$ASAN_LIB" ] && [ -f "$UBSAN_LIB" ] || die "no sanitizer runtimes ($ASAN_LIB, $UBSAN_LIB)"
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
# Reports go to files, one per process: pytest's capture would swallow a report on stderr from
# a process that the report then aborts, and a child process's would stay in a test's output.
REPORTS=$STAGE-reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:log_path=$REPORTS/ubsan
reports() {
  if [ -n "$(ls -A "$REPORTS")" ]; then
    for f in "$REPORTS"/*; do echo "----- $f"; head -n 60 "$f"; done >&2
    die "$1: sanitizer reports (above; all in $REPORTS)"
  fi
}
export PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}

log "checks"
(cd "$STAGE" && "$PY" - <<EOF
import importlib, torch
import bn_ext
assert bn_ext.__file__.startswith("$STAGE"), bn_ext.__file__
so = importlib.import_module("bn_ext._C").__file__
names = open(so, "rb").read()
assert b"__asan_report" in names and b"__ubsan_handle" in names, f"{so} is not instrumented"
x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
torch.testing.assert_close(bn_ext.BatchNorm2d(3, dtype=torch.float64)(x),
                           torch.nn.BatchNorm2d(3, dtype=torch.float64)(x))
print("instrumented build:", so)
EOF
) || { reports "the checks"; die "the checks failed"; }

log "the test suite"
# Run from the staging folder, so that its bn_ext is the one imported.
rc=0
(cd "$STAGE" && "$PY" -m pytest tests -q -p no:cacheprovider "$@") || rc=$?
reports "the test suite (exit $rc)"
[ "$rc" -eq 0 ] || die "the test suite failed (exit $rc)"

log "passed in $(( $(date +%s) - start )) s"
