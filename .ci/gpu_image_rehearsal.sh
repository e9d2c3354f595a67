#!/usr/bin/env bash
# Rehearses the GPU machine's run on a CPU, with that machine's software as it is:
#
#   1. a second virtual environment pinned to the GPU image's versions
#      (.ci/constraints-gpu-image.txt: torch 2.11.0, triton 3.6.0, torchvision 0.26.0,
#      transformers 5.17.0, safetensors 0.8.0, timm, numpy, scipy, matplotlib, tqdm, pytest,
#      pytest-benchmark, pytest-timeout, hypothesis, ninja; not the encoder-weight and emoji
#      packages, which the image lacks), reused when its constraints and interpreter are unchanged;
#   2. a bare copy of this checkout (tracked and unignored files; the project is not installed:
#      PYTHONPATH), run with a PATH that has `python3` and no `python`;
#   3. `bash benchmarks/gpu_check.sh --dry-run` through its test (every stage ok, every file
#      written), the op, unroll and kernel-compile tests through TRITON_INTERPRET=1, and the
#      `slow` tests that guard claims: compile=step equals eager (exact, tesla, outer iterations)
#      and the B = 1024 row-parallel parity.
#
#   bash .ci/gpu_image_rehearsal.sh
#
# Where it differs from the GPU machine, and why: no GPU (the dry run's tiny shapes on the CPU,
# Triton through its interpreter); Python 3.12 where pyenv has it (the image's 3.12), else the
# machine's python3; numpy 2.3.5 instead of the image's 2.5.2, because Triton 3.6's interpreter
# fails under numpy >= 2.4 (repblend_fast.known_faults; on the GPU the interpreter is not used).
# REPBLEND_REHEARSAL_DIR (default $TMPDIR/repblend-gpu-image) holds the environment and the copy;
# REPBLEND_REHEARSAL_PYTHON picks the interpreter. Measured on the 2-core CI machine: see
# benchmarks/README.md ("GPU-image rehearsal").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${REPBLEND_REHEARSAL_DIR:-${TMPDIR:-/tmp}/repblend-gpu-image}
CONSTRAINTS=$ROOT/.ci/constraints-gpu-image.txt
T0=$(date +%s)
say() { echo "[rehearsal $(( $(date +%s) - T0 ))s] $*"; }

base_python() {  # the interpreter the environment is made from: 3.12 where there is one
  local c
  for c in "${REPBLEND_REHEARSAL_PYTHON:-}" "$(pyenv root 2> /dev/null)"/versions/3.12*/bin/python3.12 \
    python3.12 python3; do
    [ -n "$c" ] && "$c" -c 'import venv' > /dev/null 2>&1 && { echo "$c"; return 0; }
  done
  echo "no usable python3 found (set REPBLEND_REHEARSAL_PYTHON)" >&2
  return 1
}

# 1. the pinned environment
mkdir -p "$WORK"
BASE=$(base_python)
STAMP="$(sha256sum "$CONSTRAINTS" | cut -c1-16) $("$BASE" -c 'import sys; print(sys.version.split()[0])')"
VENV=$WORK/venv
usable() {  # the stamp matches and the environment imports (an interrupted build leaves neither)
  [ "$(cat "$VENV/.stamp" 2> /dev/null)" = "$STAMP" ] \
    && "$VENV/bin/python3" -c 'import numpy, torch, triton, transformers, timm, pytest' 2> /dev/null
}
if ! usable; then
  say "building $VENV from $BASE with .ci/constraints-gpu-image.txt"
  rm -f "$VENV/.stamp"
  rm -rf "$VENV"
  "$BASE" -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q -r "$CONSTRAINTS"
  echo "$STAMP" > "$VENV/.stamp"
  say "environment built"
else
  say "reusing $VENV ($STAMP)"
fi

# 2. a bare checkout, python3 only
CHECKOUT=$WORK/checkout
rm -rf "$CHECKOUT"
mkdir -p "$CHECKOUT"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2> /dev/null) | tar -xf - -C "$CHECKOUT"
BIN=$WORK/bin
rm -rf "$BIN"
mkdir -p "$BIN"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV/bin/python3" > "$BIN/python3"
chmod +x "$BIN/python3"
ln -s "$VENV/bin/ninja" "$BIN/ninja"
path=$BIN
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do  # every PATH entry that holds no `python`
  [ -n "$d" ] && [ ! -e "$d/python" ] && path=$path:$d
done
export PATH=$path
unset PYTHONPATH TRITON_INTERPRET VIRTUAL_ENV PYTHONHOME
cd "$CHECKOUT"
if command -v python > /dev/null; then
  echo "rehearsal: 'python' is still on PATH ($(command -v python))" >&2
  exit 1
fi
if (cd / && python3 -c 'import repblend_fast' 2> /dev/null); then
  echo "rehearsal: repblend_fast is importable without PYTHONPATH: it must not be installed" >&2
  exit 1
fi
python3 -c 'import platform, numpy, torch, triton, transformers
print("python", platform.python_version(), "torch", torch.__version__, "triton",
      triton.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'
export PYTHONPATH=$CHECKOUT OMP_NUM_THREADS=1 REPBLEND_CACHE_DIR=$WORK/cache
PYTEST=(python3 -m pytest -q -ra -p no:cacheprovider --durations=8)

# 3a. the GPU script's dry run (its test runs it and checks every stage and file)
say "gpu_check.sh --dry-run"
rm -rf "$WORK/dry_run"
"${PYTEST[@]}" --basetemp "$WORK/dry_run" tests/test_gpu_check.py -m slow
cat "$WORK"/dry_run/test_gpu_check_dry_run_end_to_0/out/summary.txt

# 3b. the op, unroll, kernel-compile and known-fault tests through the interpreter
say "op and unroll tests (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 "${PYTEST[@]}" tests/test_contrastive.py tests/test_contrastive_rows.py \
  tests/test_contrastive_second_order.py tests/test_blend.py tests/test_trajectory.py \
  tests/test_unroll.py tests/test_known_faults.py tests/test_triton_compile.py \
  tests/test_syncs.py tests/test_timed_parity.py

# 3c. the slow tests that guard claims
say "slow guards: compile=step equality, B = 1024 row-parallel parity"
TRITON_INTERPRET=1 "${PYTEST[@]}" -m slow tests/test_compile.py \
  "tests/test_contrastive_rows.py::test_b1024_parity_and_bit_identical"
say "done: the GPU image's rehearsal passed"
