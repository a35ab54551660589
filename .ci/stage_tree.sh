#!/usr/bin/env bash
# Usage: stage_tree.sh ROOT STAGE. Makes STAGE a copy of the source tree at ROOT, for a build
# of its own (.ci/cuda_build.sh, .ci/sanitize.sh): the files git tracks or would track (not
# ignored ones: no virtual environments, builds or .so files), else, outside a git checkout, the
# tree less those. STAGE's own build/ folder is kept, so ninja rebuilds only what changed.
set -euo pipefail
ROOT=$1
STAGE=$2
mkdir -p "$STAGE"
find "$STAGE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null -cf - -T -) | tar -xf - -C "$STAGE"
else
  (cd "$ROOT" && tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build \
      --exclude='*.so' --exclude='*.egg-info' .) | tar -xf - -C "$STAGE"
fi
