#!/usr/bin/env bash
# The one script for a CUDA machine, in stages; each stage writes its own results file as soon as
# it finishes (or, for the longer ones, after every record), so a run cut short still leaves data:
#
#   smoke         every fused kernel (Triton, CUDA extension: JIT-built here) compiles, runs and
#                 matches the reference                                     -> smoke.json
#   gpu_tests     REPBLEND_TEST_GPU=1 pytest -m gpu                         -> gpu_tests.xml
#   parity        the step benchmark's configuration (impl auto, bf16 encoder) vs the fp32
#                 reference path and float64, exact and tesla, paper-n99     -> parity.json
#   step_n99      paper shapes N = 99: repblend-fast exact + tesla, repblend-authors,
#   step_n499     lors-authors; then N = 499                               -> step_n99.json, ...
#   step_compile  repblend-fast exact + tesla with compile=step, N = 99 then 499
#                                                                           -> step_compile.json
#   ops_*         op benchmarks (trajectory, blend, contrastive): fp32 eager, torch.compile,
#                 triton, cuda                                              -> ops_<op>.jsonl (+ .json)
#   report        everything combined                    -> results/<date>_<gpu>_<sha>.json, .md
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine, from the source checkout
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU: tiny shapes, same stages and files
#   bash benchmarks/gpu_check.sh --stages parity,report   # only these stages
#
# Installs and downloads nothing; runs the project from source (PYTHONPATH=.). Every stage has
# its own `timeout`, cut to what is left of the total budget (REPBLEND_CHECK_BUDGET seconds,
# default 470: under 8 minutes with start-up); a stage that fails or times out is recorded in
# $OUT/summary.txt and the script goes on. Logs: $OUT/logs/<stage>.log (packed into
# $OUT/logs.tar.gz at the end).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STAGES=all
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) shift; STAGES=${1:-all} ;;
    --stages=*) STAGES=${1#--stages=} ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --dry-run, --stages LIST or nothing)" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-./out}
mkdir -p "$OUT/logs" "$OUT/results"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
START=$(date +%s)
BUDGET=${REPBLEND_CHECK_BUDGET:-470}
RESERVE=15   # seconds kept for the report
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [ "$DRY" = 1 ]; then
  # A CPU rehearsal: tiny shapes, CPU device, one torch thread (a shared 2-core machine's OpenMP
  # barriers stall behind other processes), Triton through its interpreter.
  export REPBLEND_BENCH_DEVICE=cpu REPBLEND_BENCH_THREADS=1 TRITON_INTERPRET=1
  DEV=cpu
  STEP_SHAPES=tiny; N99=tiny; N499=tiny
  OP_SHAPES=tiny
  SMOKE_ARGS=()
  STEP_ARGS=(--device cpu --threads 1 --isolate inprocess --iterations 1 --warmup 0)
  PAR_ARGS=(--shapes tiny --device cpu --threads 1)
  TESTS_ENV=()
  OP_K="not compile"   # inductor's C++ builds take minutes on a CPU (the step_compile stage
                       # still compiles the tiny step)
else
  DEV=cuda
  STEP_SHAPES=paper; N99=paper-n99; N499=paper-n499
  OP_SHAPES=check
  SMOKE_ARGS=(--big)
  STEP_ARGS=(--device cuda --iterations 2 --warmup 1)
  PAR_ARGS=(--shapes paper --configs paper-n99 --device cuda)
  TESTS_ENV=(REPBLEND_TEST_GPU=1)
  OP_K=""
fi

want() {  # want STAGE: is it in --stages?
  [ "$STAGES" = all ] && return 0
  case ",$STAGES," in *",$1,"*) return 0 ;; esac
  return 1
}

# stage NAME LIMIT_SECONDS COMMAND...: run with a timeout cut to the remaining budget, log, and
# record the exit status in the summary.
stage() {
  local name=$1 limit=$2
  shift 2
  want "$name" || return 0
  local t0 rc left status
  t0=$(date +%s)
  left=$(( START + BUDGET - t0 ))
  [ "$name" != report ] && left=$(( left - RESERVE ))
  if [ "$left" -lt 10 ]; then
    printf '%-14s %-28s\n' "$name" "skipped (out of time)" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, elapsed $((t0 - START))s)"
  timeout -k 5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="FAILED rc=$rc"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="TIMED OUT after ${limit}s"
  printf '%-14s %-28s %4ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /'
  return 0
}

# 1. smoke: the environment, then each fused kernel once (the CUDA extension is JIT-built on its
#    first use here, so later stages find it in the cache).
stage smoke 100 bash -c "
  $PY -c 'import platform, torch; print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")' &&
  $PY benchmarks/smoke.py --device $DEV ${SMOKE_ARGS[*]} --json '$OUT/smoke.json'"

# 2. the gpu-marked tests (on a CPU they are collected and skipped).
stage gpu_tests 55 env "${TESTS_ENV[@]}" "$PY" -m pytest -m gpu tests -q -ra -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml"

# 3. parity of exactly what the step stages time.
stage parity 75 "$PY" benchmarks/parity_check.py "${PAR_ARGS[@]}" --json "$OUT/parity.json"

# 4. the step benchmark at paper shapes: the fast rows first (a timeout then cuts a baseline).
STEP_PROVIDERS=repblend-fast,repblend-authors,lors-authors
stage step_n99 55 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --configs "$N99" \
  --providers "$STEP_PROVIDERS" "${STEP_ARGS[@]}" --json "$OUT/step_n99.json"
if [ "$N499" != "$N99" ]; then
  stage step_n499 45 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --configs "$N499" \
    --providers "$STEP_PROVIDERS" "${STEP_ARGS[@]}" --json "$OUT/step_n499.json"
fi
stage step_compile 60 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --providers repblend-fast \
  --compile step "${STEP_ARGS[@]}" --json "$OUT/step_compile.json"

# 5. op benchmarks, one pytest run per op (records appended as each benchmark finishes).
for spec in trajectory:20 blend:10 contrastive:30; do
  op=${spec%%:*}
  limit=${spec##*:}
  rm -f "$OUT/ops_$op.jsonl"
  stage "ops_$op" "$limit" "$PY" -m pytest "benchmarks/bench_$op.py" --shapes "$OP_SHAPES" -q -ra \
    -p no:cacheprovider ${OP_K:+-k "$OP_K"} --records-jsonl "$OUT/ops_$op.jsonl" \
    --benchmark-json "$OUT/ops_$op.json" --skips-json "$OUT/ops_$op.skips.json"
done

# 6. one results file and its Markdown from whatever the stages wrote (pytest-benchmark's JSON
#    where a suite finished, its incremental records where it was cut short).
files=()
for f in smoke.json parity.json step_n99.json step_n499.json step_compile.json; do
  [ -s "$OUT/$f" ] && files+=("$OUT/$f")
done
for op in trajectory blend contrastive; do
  if [ -s "$OUT/ops_$op.json" ]; then files+=("$OUT/ops_$op.json")
  elif [ -s "$OUT/ops_$op.jsonl" ]; then files+=("$OUT/ops_$op.jsonl"); fi
  [ -s "$OUT/ops_$op.skips.json" ] && files+=("$OUT/ops_$op.skips.json")
done
stage report 15 "$PY" benchmarks/report.py --combine "${files[@]}" --out "$OUT/results/" \
  --markdown "$OUT/results/results.md"

echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "results: $OUT/results/ (stage files in $OUT, logs in $OUT/logs.tar.gz)"
ls "$OUT/results/"
