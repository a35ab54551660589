#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: the tree is built with
# -fsanitize=address,undefined in a folder of its own (the CPU kernels only, portable ISA: see
# below) and the test suite runs against that build, with the Python of the active environment
# (CI runs it in the README's; BN_EXT_SANITIZE_PYTHON overrides). A report ends the process that
# hit it, and any report, from the suite's process or a child's, fails the stage.
#
# Python itself is not instrumented, so the ASan runtime is preloaded into the two Python
# commands. Leak checks are off (the interpreter and torch keep their allocations to the end),
# and so is the check that a block is freed by the kind of call that allocated it (torch frees
# with free() some blocks it allocated with new[]). The output cache poisons its idle blocks and,
# for outputs of 256 KiB and more, the rest of an output's block past its bytes
# (csrc/cpu/output_cache.cpp); smaller outputs come from torch's allocator, whose blocks carry
# ASan's own guard zones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${BN_EXT_SANITIZE_PYTHON:-python}
STAGE=$(realpath -m "${BN_EXT_SANITIZE_DIR:-$ROOT/build/sanitize}")
LOG=$STAGE.log
REPORTS=$STAGE-reports

log() { printf '\n--- sanitize: %s (%s) ---\n' "$*" "$(date -u +%H:%M:%S)"; }
die() { echo "sanitize: FAILED: $*" >&2; exit 1; }
start=$(date +%s)

log "copy of the tree in $STAGE"
bash "$ROOT/.ci/stage_tree.sh" "$ROOT" "$STAGE"

log "build with -fsanitize=address,undefined (BN_EXT_CPU_ISA=default)"
# The portable ISA, not the AVX-512 or AVX2 a build picks on x86: ASan checks plain loads and
# stores but not masked ones, and ATen's AVX2 and AVX-512 Vectorized<T> take their partial steps
# (a run's tail) with masked intrinsics, which do not fault past an allocation either; the
# portable Vectorized<T> moves every step with memcpy, which ASan checks. The kernels are the
# same templates in every ISA, but the portable one has AVX2's vector width, so a shape may take
# other paths here than in an AVX-512 build, and the streaming stores are left out.
# -fno-wrapv: setuptools versions that add CFLAGS to Python's own flags would bring -fwrapv,
# under which UBSan does not check signed overflow.
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
if ! (cd "$STAGE" && BN_EXT_FORCE_CPU=1 BN_EXT_CPU_ISA=default CFLAGS="$SAN -fno-wrapv -g" \
      LDFLAGS="$SAN" "$PY" setup.py build_ext --inplace) >"$LOG" 2>&1; then
  tail -n 60 "$LOG" >&2
  die "the sanitized build did not compile or link"
fi

# The runtimes the extension was linked with (whichever compiler the build used).
SO=$(ls "$STAGE"/bn_ext/_C*.so)
ASAN_LIB=$(ldd "$SO" | awk '$1 ~ /^libasan\.so/ {print $3}')
UBSAN_LIB=$(ldd "$SO" | awk '$1 ~ /^libubsan\.so/ {print $3}')
[ -f "$ASAN_LIB" ] && [ -f "$UBSAN_LIB" ] || \
  die "$SO does not link the sanitizer runtimes (asan: '$ASAN_LIB', ubsan: '$UBSAN_LIB')"

# Reports go to files, one per process: pytest's capture would swallow a report on stderr from
# a process that the report then aborts, and a child process's would stay in a test's output.
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
sanitized() {
  env LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" \
    ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:log_path=$REPORTS/asan" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$REPORTS/ubsan" "$@"
}
reports() {
  if [ -n "$(ls -A "$REPORTS")" ]; then
    for f in "$REPORTS"/*; do echo "----- $f"; cat "$f"; done >&2
    die "$1: sanitizer reports (above)"
  fi
}

log "checks"
(cd "$STAGE" && STAGE="$STAGE" sanitized "$PY" - <<'EOF'
import importlib
import os

import torch

import bn_ext

stage = os.path.realpath(os.environ["STAGE"])
assert os.path.realpath(bn_ext.__file__).startswith(stage), bn_ext.__file__
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
(cd "$STAGE" && sanitized "$PY" -m pytest tests -q -p no:cacheprovider "$@") || rc=$?
reports "the test suite (exit $rc)"
[ "$rc" -eq 0 ] || die "the test suite failed (exit $rc)"

log "passed in $(( $(date +%s) - start )) s"
