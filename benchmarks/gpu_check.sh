#!/usr/bin/env bash
# One command for a CUDA machine: build the CUDA extension, run the GPU tests, the op benchmarks and
# the step benchmark + profile at paper shapes, and write JSON + a Markdown table under $OUT.
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine, from the source checkout
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: ci shapes, no GPU tests, a few minutes
#
# Assumes torch, triton, timm and pytest-benchmark are installed (nothing is installed or downloaded
# here) and runs the project from source (PYTHONPATH=.). Every phase has its own `timeout`, cut to
# what is left of the budget (REPBLEND_CHECK_BUDGET seconds, default 470: under 8 minutes); a
# phase that fails or times out is recorded in $OUT/summary.txt and the script goes on. Outputs:
#   $OUT/logs/<phase>.log          full output of each phase
#   $OUT/ops_<op>.json             pytest-benchmark JSON per op suite (+ .skips.json: what was
#                                  skipped and why)
#   $OUT/step.json, profile.json   step benchmark records and step profile
#   $OUT/trace/step_trace.json     torch.profiler chrome trace of the profiled steps
#   $OUT/results/<date>_<gpu>_<sha>.json and results.md   everything combined (benchmarks/report.py)
# At the end all but results/ and summary.txt are packed into $OUT/raw.tar.gz (4 files in all).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./out}
mkdir -p "$OUT/logs" "$OUT/trace" "$OUT/results"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
START=$(date +%s)
# Hard budget for the whole script (seconds); every phase's limit is cut to what is left of it,
# keeping RESERVE seconds for the report.
BUDGET=${REPBLEND_CHECK_BUDGET:-470}
RESERVE=20
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [ "$DRY" = 1 ]; then
  SHAPES=ci
  STEP_SHAPES=ci
  # The CPU has no CUDA: benchmark there even if a GPU happens to be visible.
  export REPBLEND_BENCH_DEVICE=cpu
  # One torch thread: on a shared 2-core machine two OpenMP threads stall behind other processes.
  export REPBLEND_BENCH_THREADS=1
  STEP_ARGS=(--device cpu --threads 1 --iterations 1 --warmup 0 --providers repblend-authors,repblend-fast)
  PROFILE_ARGS=(--device cpu --threads 1 --iterations 1 --warmup 0)
else
  SHAPES=paper
  STEP_SHAPES=paper
  STEP_ARGS=(--device cuda --iterations 2 --warmup 1)
  PROFILE_ARGS=(--device cuda --iterations 3 --warmup 1)
fi

# phase NAME LIMIT_SECONDS COMMAND...: run with a timeout (cut to the remaining budget), log,
# record the exit status.
phase() {
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$(( START + BUDGET - t0 ))
  [ "$name" != report ] && left=$(( left - RESERVE ))
  if [ "$left" -lt 10 ]; then
    printf '%-22s %-26s\n' "$name" "skipped (out of time)" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, elapsed $((t0 - START))s)"
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  local status=ok
  [ "$rc" -ne 0 ] && status="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT after ${limit}s"
  printf '%-22s %-26s %4ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
  tail -n 4 "$OUT/logs/$name.log" | sed 's/^/    /'
  return 0
}

phase env 20 "$PY" -c '
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
import timm, pytest_benchmark; print("timm", timm.__version__, "pytest-benchmark", pytest_benchmark.__version__)
'

# The CUDA extension (JIT with ninja + nvcc on first use; a no-op report without CUDA).
phase cuda_ext 120 "$PY" -c 'from repblend_fast import _ext; print(_ext.status())'

if [ "$DRY" = 0 ]; then
  phase gpu_tests 80 env REPBLEND_TEST_GPU=1 "$PY" -m pytest -m gpu tests -q -ra -p no:cacheprovider
else
  echo "gpu_tests              skipped (dry run)" | tee -a "$SUMMARY"
fi

# Op benchmarks: eager / fused providers first (each suite its own JSON, so one timeout loses one
# suite), torch.compile last with what is left.
OPS=(contrastive:55 blend:20 trajectory:25)
[ "$DRY" = 1 ] && OPS=(contrastive:90 blend:40 trajectory:40)
for spec in "${OPS[@]}"; do
  op=${spec%%:*}
  limit=${spec##*:}
  phase "ops_$op" "$limit" "$PY" -m pytest "benchmarks/bench_$op.py" --shapes "$SHAPES" -q -ra \
    -p no:cacheprovider -k "not compile" --benchmark-json "$OUT/ops_$op.json" \
    --skips-json "$OUT/ops_$op.skips.json"
done

phase step_bench 110 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" "${STEP_ARGS[@]}" \
  --json "$OUT/step.json"

phase step_profile 30 "$PY" -m repblend_fast profile --shapes "$STEP_SHAPES" --meta-grad tesla \
  "${PROFILE_ARGS[@]}" --json "$OUT/profile.json" --trace "$OUT/trace/step_trace.json"

if [ "$DRY" = 0 ]; then
  phase ops_compile 40 "$PY" -m pytest benchmarks/bench_contrastive.py benchmarks/bench_blend.py \
    benchmarks/bench_trajectory.py --shapes "$SHAPES" -q -ra -p no:cacheprovider -k compile \
    --benchmark-json "$OUT/ops_compile.json" --skips-json "$OUT/ops_compile.skips.json"
fi

# Combine whatever was produced (a missing file is just absent from the report).
shopt -s nullglob
files=("$OUT"/ops_*.json "$OUT"/step.json "$OUT"/profile.json)
phase report 20 "$PY" benchmarks/report.py --combine "${files[@]}" --out "$OUT/results/" \
  --markdown "$OUT/results/results.md"

echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
# Everything except the combined results and the summary also goes into one archive
# ($OUT/raw.tar.gz), so that a handful of files carries the whole run.
RAW=$(mktemp)
if tar czf "$RAW" -C "$OUT" --exclude=./results --exclude=./summary.txt --exclude=./raw.tar.gz .; then
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name results ! -name summary.txt -exec rm -rf {} +
  mv "$RAW" "$OUT/raw.tar.gz"
else
  echo "packing raw outputs failed; they are left as they are" | tee -a "$SUMMARY"
  rm -f "$RAW"
fi
echo "results: $OUT/results/ (raw outputs: $OUT/raw.tar.gz)"
ls "$OUT/results/"
