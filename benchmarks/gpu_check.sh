#!/usr/bin/env bash
# The one script for a CUDA machine, in stages, most important numbers first; each stage writes
# its own results file when it ends (the step and op stages after every record), so a run cut
# short still leaves data:
#
#   build_ext     the CUDA extension, JIT-built for sm_90 on all cores; stale build locks of the
#                 extension cache cleared first; a failed build is this stage FAILED -> build_ext.json
#   smoke         every fused kernel (Triton, CUDA extension) compiles, runs and matches the
#                 reference; an implementation that cannot run on the GPU fails it  -> smoke.json
#   parity        the step benchmark's configuration vs the fp32 reference path and float64,
#                 exact and tesla, paper-n99                                        -> parity.json
#   step_n99      paper shapes N = 99: repblend-fast exact + tesla, repblend-authors,
#                 lors-authors                                                      -> step_n99.json
#   gpu_tests     REPBLEND_TEST_GPU=1 pytest -m gpu                                 -> gpu_tests.xml
#   step_n499     the same rows at N = 499                                          -> step_n499.json
#   ops_*         op benchmarks, one per kernel stem of repblend_fast/ops/registry.py
#                 (contrastive, blend, trajectory): eager, torch.compile, triton,
#                 cuda                                                  -> ops_<op>.jsonl (+ .json)
#   step_compile  repblend-fast exact + tesla with compile=step, N = 99      -> step_compile.json
#   report        everything combined                    -> results/<date>_<gpu>_<sha>.json, .md
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine, from a bare checkout
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU: tiny shapes, same stages and files
#   bash benchmarks/gpu_check.sh --stages parity,report   # only these stages
#
# Needs only what the GPU machine's image holds: `python3` (or $PYTHON) with torch, triton,
# timm, transformers, numpy, pytest, pytest-benchmark; nvcc and ninja for build_ext. The project
# is not installed: it runs from this checkout (PYTHONPATH=<root>). Installs and downloads
# nothing. Every stage has its own `timeout`, cut to what is left of the total budget
# (REPBLEND_CHECK_BUDGET seconds; 470 on a GPU, under 8 minutes with start-up); a stage that fails
# or times out is recorded and the script goes on. At the end one table of every stage (status,
# wall and CPU seconds, limit, expected H100 seconds) is printed and kept in $OUT/summary.txt,
# and the script exits 1 when any stage did not end `ok`. Logs: $OUT/logs/<stage>.log (packed
# into $OUT/logs.tar.gz at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
STAGES=all
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) shift; STAGES=${1:-all} ;;
    --stages=*) STAGES=${1#--stages=} ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --dry-run, --stages LIST or nothing)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
if ! command -v "$PY" > /dev/null; then
  echo "gpu_check.sh: no '$PY' on PATH: set PYTHON to the interpreter that has torch" >&2
  exit 2
fi
OUT=${OUT:-./out}
mkdir -p "$OUT/logs" "$OUT/results"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The fused ops' kernel stems (contrastive blend trajectory), one ops_<stem> stage each: the list
# is repblend_fast/ops/registry.py.
# An interpreter that cannot say leaves the list empty: the ops stages are then one FAILED row.
OP_LIST='from repblend_fast.ops import registry; print(" ".join(registry.stems()))'
OP_STEMS=$("$PY" -c "$OP_LIST" 2> "$OUT/logs/ops_list.log") || OP_STEMS=""
# Online cores (not `nproc`, which shrinks to OMP_NUM_THREADS when that is set).
NPROC=$(getconf _NPROCESSORS_ONLN 2> /dev/null || echo 1)
START=$(date +%s)
RESERVE=15   # seconds kept for the report
SUMMARY="$OUT/summary.txt"
ROWS="$OUT/.stages.tsv"
: > "$ROWS"

# Stage plan: expected H100 seconds (a prediction: no GPU has run this script yet), the limit on
# a GPU, and the limit of the CPU dry run (from its measured CPU time, at tiny shapes, on the
# 2-core CI machine under load). Why each H100 number:
#   build_ext     60  nvcc for sm_90 only, the 4 sources in parallel on all cores: the wall time
#                     is the longest file (contrastive.cu's loss x dtype instantiations)
#   smoke         35  start-up (torch + CUDA context, ~5 s), then a cold Triton cache: ~20
#                     distinct kernels compiled one after another, ~1-1.5 s each
#   parity        60  NFNet-L0 at paper-n99 on the GPU (bf16 fast path, fp32 reference), and the
#                     float64 reference on the host CPU, which dominates
#   step_n99      50  lors-authors (~5 s per iteration: the paper's 11.5 s on an older GPU)
#                     dominates; the fused rows find their kernels compiled by smoke/parity;
#                     each row's accounted warm-up (Python counting modes) and the fp32/bf16
#                     matmul rates add ~1-2 s per row, inside the 75 s limit
#   gpu_tests     60  178 tests; the cold Triton cache for their other dtypes and block sizes
#   step_n499     35  as step_n99, the kernels cached
#   ops_*     25+15+15 start-up (pytest, torch, CUDA context ~10 s) + torch.compile rows
#   step_compile 120  inductor, cold: NFNet-L0's forward and VJP and the step graphs, Triton
#                     codegen with a compile worker per core (the CPU dry run's C++ build of the
#                     tiny step took 228 s on one core); runs last, on what the budget has left
#   report         5
# Planned before step_compile: 355 s, which leaves 115 s of the 470 s budget (nearly 2 minutes
# to spare) for step_compile, which writes its N = 99 exact row first.
declare -A EXPECT=(
  [build_ext]=60 [smoke]=35 [parity]=60 [step_n99]=50 [gpu_tests]=60 [step_n499]=35
  [ops_contrastive]=25 [ops_blend]=15 [ops_trajectory]=15 [step_compile]=120 [report]=5
)
declare -A LIMIT_GPU=(
  [build_ext]=150 [smoke]=90 [parity]=100 [step_n99]=75 [gpu_tests]=90 [step_n499]=60
  [ops_contrastive]=45 [ops_blend]=30 [ops_trajectory]=30 [step_compile]=300 [report]=15
)
declare -A LIMIT_DRY=(
  [build_ext]=60 [smoke]=120 [parity]=180 [step_n99]=180 [gpu_tests]=180 [step_n499]=60
  [ops_contrastive]=180 [ops_blend]=90 [ops_trajectory]=90 [step_compile]=600 [report]=60
)

if [ "$DRY" = 1 ]; then
  # A CPU rehearsal: tiny shapes, CPU device, one torch thread (a shared 2-core machine's OpenMP
  # barriers stall behind other processes), Triton through its interpreter.
  export REPBLEND_BENCH_DEVICE=cpu REPBLEND_BENCH_THREADS=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  BUDGET=${REPBLEND_CHECK_BUDGET:-1800}
  DEV=cpu
  STEP_SHAPES=tiny; N99=tiny; N499=tiny
  OP_SHAPES=tiny
  BUILD_ARGS=(--check-only)
  SMOKE_ARGS=(--require triton)
  STEP_ARGS=(--device cpu --threads 1 --isolate inprocess --iterations 1 --warmup 1)
  PAR_ARGS=(--shapes tiny --device cpu --threads 1 --impl triton)
  TESTS_ENV=()
  OP_K="not compile"   # inductor's C++ builds take minutes on a CPU (the step_compile stage
                       # still compiles the tiny step)
  declare -n LIMIT=LIMIT_DRY
else
  BUDGET=${REPBLEND_CHECK_BUDGET:-470}
  DEV=cuda
  STEP_SHAPES=paper; N99=paper-n99; N499=paper-n499
  OP_SHAPES=check
  BUILD_ARGS=(--arch 9.0 --jobs "$NPROC")
  SMOKE_ARGS=(--big --require triton,cuda)
  STEP_ARGS=(--device cuda --iterations 2 --warmup 1)
  PAR_ARGS=(--shapes paper --configs paper-n99 --device cuda)
  TESTS_ENV=(REPBLEND_TEST_GPU=1)
  OP_K=""
  # Any later JIT build (a test's, a benchmark's) targets sm_90 only, on all cores.
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC
  declare -n LIMIT=LIMIT_GPU
fi

for op in $OP_STEMS; do  # every op stage has a plan
  if [ -z "${EXPECT[ops_$op]:-}" ] || [ -z "${LIMIT[ops_$op]:-}" ]; then
    echo "gpu_check.sh: no stage plan (EXPECT, LIMIT_GPU, LIMIT_DRY) for op stage ops_$op" >&2
    exit 2
  fi
done

want() {  # want STAGE: is it in --stages?
  [ "$STAGES" = all ] && return 0
  case ",$STAGES," in *",$1,"*) return 0 ;; esac
  return 1
}

# CPU seconds (user + system) used so far by this shell's waited-for children: `times` must run
# in this shell itself (in a $(...) subshell it would count the subshell's children), so
# cpu_mark writes it to a file and cpu_read reads that.
cpu_mark() { times > "$OUT/.times"; }
cpu_read() {
  sed -n 2p "$OUT/.times" | tr 'ms' '  ' | awk '{printf "%.1f", $1 * 60 + $2 + $3 * 60 + $4}'
}

# stage NAME COMMAND...: run with a timeout (the stage's limit, cut to the remaining budget), log,
# and record status, wall and CPU seconds.
stage() {
  local name=$1
  shift
  want "$name" || return 0
  local t0 c0 rc left limit=${LIMIT[$name]} status cpu wall
  t0=$(date +%s)
  cpu_mark
  c0=$(cpu_read)
  left=$(( START + BUDGET - t0 ))
  [ "$name" != report ] && left=$(( left - RESERVE ))
  if [ "$left" -lt 10 ]; then
    printf '%s\t%s\t0\t0\t0\t%s\n' "$name" "SKIPPED(out-of-time)" "${EXPECT[$name]}" >> "$ROWS"
    echo "== $name skipped: out of time"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, elapsed $((t0 - START))s)"
  timeout -k 5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="FAILED(rc=$rc)"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="TIMED-OUT"
  wall=$(( $(date +%s) - t0 ))
  cpu_mark
  cpu=$(awk -v a="$(cpu_read)" -v b="$c0" 'BEGIN {printf "%.0f", a - b}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$cpu" "$limit" \
    "${EXPECT[$name]}" >> "$ROWS"
  printf '   %s: %s, %ss wall, %ss CPU\n' "$name" "$status" "$wall" "$cpu"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /'
  return 0
}

# 1. the CUDA extension, in its own stage. Failed: later stages must not wait on another build.
stage build_ext "$PY" benchmarks/build_ext.py "${BUILD_ARGS[@]}" --json "$OUT/build_ext.json"
if [ "$DRY" = 0 ] && grep -q "^build_ext	[FT]" "$ROWS"; then
  export REPBLEND_CUDA_JIT=0
fi

# 2. smoke: the environment, then each fused kernel once against the reference.
stage smoke bash -c "
  \"$PY\" -c 'import platform, numpy, torch, triton, repblend_fast; print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"triton\", triton.__version__, \"numpy\", numpy.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\", \"repblend_fast from\", repblend_fast.__file__)' &&
  \"$PY\" benchmarks/smoke.py --device $DEV ${SMOKE_ARGS[*]} --json '$OUT/smoke.json'"

# 3. parity of exactly what the step stages time.
stage parity "$PY" benchmarks/parity_check.py "${PAR_ARGS[@]}" --json "$OUT/parity.json"

# 4. the step benchmark at paper shapes N = 99: the fast rows first (a timeout then cuts a
#    baseline).
STEP_PROVIDERS=repblend-fast,repblend-authors,lors-authors
stage step_n99 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --configs "$N99" \
  --providers "$STEP_PROVIDERS" "${STEP_ARGS[@]}" --json "$OUT/step_n99.json"

# 5. the gpu-marked tests (on a CPU they are collected and skipped).
stage gpu_tests env "${TESTS_ENV[@]}" "$PY" -m pytest -m gpu tests -q -ra -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml"

# 6. N = 499.
if [ "$N499" != "$N99" ]; then
  stage step_n499 "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --configs "$N499" \
    --providers "$STEP_PROVIDERS" "${STEP_ARGS[@]}" --json "$OUT/step_n499.json"
fi

# 7. op benchmarks, one pytest run per op (records appended as each benchmark finishes).
if [ -z "$OP_STEMS" ] && [ "$STAGES" = all -o -n "$(printf ',%s,' "$STAGES" | grep ',ops_')" ]; then
  echo "gpu_check.sh: $PY could not read the op list (logs/ops_list.log)" >&2
  printf '%s\t%s\t0\t0\t0\t0\n' ops "FAILED(no-op-list)" >> "$ROWS"
fi
for op in $OP_STEMS; do
  rm -f "$OUT/ops_$op.jsonl"
  stage "ops_$op" "$PY" -m pytest "benchmarks/bench_$op.py" --shapes "$OP_SHAPES" -q -ra \
    -p no:cacheprovider ${OP_K:+-k "$OP_K"} --records-jsonl "$OUT/ops_$op.jsonl" \
    --benchmark-json "$OUT/ops_$op.json" --skips-json "$OUT/ops_$op.skips.json"
done

# 8. compile=step last: inductor's cold compilation is the longest and least certain stage.
stage step_compile "$PY" -m repblend_fast bench --shapes "$STEP_SHAPES" --configs "$N99" \
  --providers repblend-fast --compile step "${STEP_ARGS[@]}" --json "$OUT/step_compile.json"

# 9. one results file and its Markdown from whatever the stages wrote (pytest-benchmark's JSON
#    where a suite finished, its incremental records where it was cut short).
files=()
for f in smoke.json parity.json step_n99.json step_n499.json step_compile.json; do
  [ -s "$OUT/$f" ] && files+=("$OUT/$f")
done
for op in $(printf '%s\n' $OP_STEMS | tac); do
  if [ -s "$OUT/ops_$op.json" ]; then files+=("$OUT/ops_$op.json")
  elif [ -s "$OUT/ops_$op.jsonl" ]; then files+=("$OUT/ops_$op.jsonl"); fi
  [ -s "$OUT/ops_$op.skips.json" ] && files+=("$OUT/ops_$op.skips.json")
done
stage report "$PY" benchmarks/report.py --combine "${files[@]}" --out "$OUT/results/" \
  --markdown "$OUT/results/results.md"

# The summary: one row per stage that ran, then the total; exit 1 when any stage was not ok.
total=$(( $(date +%s) - START ))
{
  printf '%-16s %-22s %7s %7s %7s %9s\n' stage status wall_s cpu_s limit_s h100_exp_s
  awk -F'\t' '{printf "%-16s %-22s %7s %7s %7s %9s\n", $1, $2, $3, $4, $5, $6}' "$ROWS"
  echo "total ${total}s (budget ${BUDGET}s, $NPROC cores, load $(cut -d' ' -f1-3 /proc/loadavg 2> /dev/null)," \
    "$([ "$DRY" = 1 ] && echo "dry run, 1 torch thread" || echo GPU))"
} > "$SUMMARY"
rm -f "$ROWS" "$OUT/.times"
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo
cat "$SUMMARY"
echo "results: $OUT/results/ (stage files in $OUT, logs in $OUT/logs.tar.gz)"
failed=$(awk 'NR > 1 && $1 != "total" && $2 != "ok" {print $1}' "$SUMMARY" | tr '\n' ' ')
if [ -n "$failed" ]; then
  echo "not ok: $failed" >&2
  exit 1
fi
exit 0
