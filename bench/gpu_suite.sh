#!/usr/bin/env bash
# gpu_suite.sh: fusedopt's GPU checks and CUDA benchmarks in one command that ends within
# 360 s (6 minutes) on the lent H200 machine (compute capability 9.0, CUDA 13.0, 16 cores).
#
#   bash bench/gpu_suite.sh [OUT_DIR]            run it (OUT_DIR defaults to ./gpu-suite-out)
#   bash bench/gpu_suite.sh --dry-run [OUT_DIR]  print the plan, check that the budgets fit
#                                                the deadline (exit 1 if not); runs nothing
#
# NONE OF THIS HAS RUN ON A GPU YET. It was checked without one: bash -n, shellcheck, the dry
# run, and bench/gpu_suite_test.sh, which runs it against stand-ins for nvidia-smi, cmake, the
# test binaries and compute-sanitizer. The budgets below are estimates; the first real run's
# summary gives each step's time.
#
# From the device tool (it runs in the repo root; the machine has no network):
#   command: bash bench/gpu_suite.sh $OUT    carry: [".debs"]    timeout_s: 420
# .debs (git-ignored) holds the Debian packages of what that machine lacks: Google Test and
# Benchmark, OpenBLAS (Muon's Newton-Schulz iteration on the CPU), and the zlib and xxhash
# headers in case it lacks them too (not checked there); made here (Debian 12; that they
# work on the device's image is not checked) with
#   mkdir -p .debs && (cd .debs && apt-get download libgtest-dev libbenchmark-dev \
#     libbenchmark1debian libxxhash-dev zlib1g-dev zlib1g libopenblas-dev \
#     libopenblas-pthread-dev libopenblas0-pthread libgfortran5)
# They are unpacked (dpkg-deb, or ar and tar) into build/gpu-suite/deps, never into /, and
# found through CMAKE_PREFIX_PATH and CPATH. The 8 files that come back in OUT_DIR: setup.log (machine,
# configure, build), tests.log, sanitizer.log, bench.log (console of the benchmarks),
# bench_cuda.json, torch_compare.json, summary.txt and results.md (a markdown report to
# commit as bench/results/<date>-gpu-h200.md). Scratch goes to build/gpu-suite.
#
# The steps, most important first, with their budgets in seconds. A step must end by the sum
# of the budgets up to it (time a step leaves unused goes to the later ones) and never later
# than the deadline less the summary's budget; a step still running then is killed with its
# process group (timeout -k 5) and counts as failed. Budgets: 330 s, within the 340 s that
# the deadline of 360 s (GPU_SUITE_DEADLINE) allows after a 20 s margin. Every step writes
# its files before the next starts, so what ran survives a later timeout.
#    8  1 machine     nvidia-smi, nvcc --version; unpacks .debs
#  150  2 build       the `cuda` preset (CMAKE_CUDA_ARCHITECTURES=90, what CI compiles; Ninja
#                     if present, -j nproc): only fusedopt_tests, fusedopt_demo_test and
#                     fusedopt_bench; alongside it, the library shared and with CUDA for
#                     torch_compare.py (build/cuda-shared)
#   10  3 bitwise     the GPU==CPU bitwise tests, first: Cuda.GpuEqualsCpuBitwise,
#                     SparseGpu.GpuEqualsCpuBitwise, Cuda.Bf16AndF16ParamsWithMasterWeights,
#                     CheckpointDevices.*
#   30  4 gpu-tests   every other test of fusedopt_tests whose name says Cuda, cuda, Gpu, GPU
#                     or Device (the Cuda suite, Cuda/DenseReference, the sparse *_cuda
#                     cases, ScheduleDevice, NewtonSchulzGpu: Muon's cuBLAS iteration)
#   12  5 demo-tests  the GPU tests of fusedopt_demo_test (DemoCudaModel, the Gpu training
#                     run, CholeskyGpu, NewtonGpu)
#   40  6 bench       fusedopt_bench --benchmark_filter=/cuda/ --benchmark_min_time=0.02 (JSON)
#   40  7 torch       bench/torch_compare.py against torch.optim's fused and foreach steps in
#                     the same process: dense cases, then sparse; 2 warm-up, 10 timed steps
#   25  8 memcheck    compute-sanitizer memcheck on a few fast GPU tests (small sizes) and
#                     the demo's model test (its kernels, cuBLAS)
#   12  9 racecheck   compute-sanitizer racecheck on fewer, if time remains (running out of
#                     time for it is no failure)
#    3 10 summary     the table printed last; summary.txt and results.md
# CPU-only tests do not run here: CI runs them. Test steps run gtest shards in parallel
# (GTEST_TOTAL_SHARDS, one core each, OMP_NUM_THREADS=1) and fail if any selected test
# failed or SKIPPED, or none ran. FUSEDOPT_TEST_LARGE_N=100003 (odd, 13 blocks of 8192)
# shrinks the tests' large size from 1000003: their time is the double-precision CPU
# reference. The exit status is 0 only if no step failed.
#
# Knobs (environment): GPU_SUITE_DEADLINE (360), GPU_SUITE_BUDGET_<STEP> (e.g.
# GPU_SUITE_BUDGET_BUILD=200, GPU_SUITE_BUDGET_GPU_TESTS=40), GPU_SUITE_NPROC (nproc; 16 in a
# dry run), GPU_SUITE_SHARDS (nproc, at most 16), GPU_SUITE_LARGE_N (100003),
# GPU_SUITE_BENCH_MIN_TIME (0.02), GPU_SUITE_SAN_ARGS (more compute-sanitizer options),
# FUSEDOPT_DEB_DIR (./.debs). Needs bash >= 4.4, coreutils' timeout, python3.
set -uo pipefail

SUITE_START=$SECONDS
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
if [ $# -gt 1 ] || [[ ${1:-} == -* ]]; then
  echo "usage: bash bench/gpu_suite.sh [--dry-run] [OUT_DIR]" >&2
  exit 2
fi
OUT=${1:-./gpu-suite-out}
if [ "$DRY_RUN" = 0 ]; then
  if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then exit 2; fi
elif [[ $OUT != /* ]]; then
  OUT=$PWD/${OUT#./}
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2

# ----------------------------------------------------------------------------- the plan
STEPS=(machine build bitwise gpu-tests demo-tests bench torch memcheck racecheck summary)
declare -A BUDGET=([machine]=8 [build]=150 [bitwise]=10 [gpu-tests]=30 [demo-tests]=12
  [bench]=40 [torch]=40 [memcheck]=25 [racecheck]=12 [summary]=3)
declare -A TITLE=(
  [machine]="nvidia-smi, nvcc --version; unpack .debs"
  [build]="cuda preset, sm_90; shared lib beside"
  [bitwise]="GPU==CPU bitwise tests"
  [gpu-tests]="other GPU tests (fusedopt_tests)"
  [demo-tests]="demo GPU tests (fusedopt_demo_test)"
  [bench]="fusedopt_bench, CUDA benchmarks"
  [torch]="torch_compare.py vs torch.optim"
  [memcheck]="compute-sanitizer memcheck"
  [racecheck]="compute-sanitizer racecheck, if time"
  [summary]="summary.txt, results.md")
OPTIONAL_STEP=racecheck  # no time for it, or not enough, is no failure (errors are)
DEADLINE=${GPU_SUITE_DEADLINE:-360}
MARGIN=20                # the budgets must add up to at most DEADLINE - MARGIN
MIN_STEP=5               # a step left less than this does not start
declare -A END
total=0
for s in "${STEPS[@]}"; do
  var=GPU_SUITE_BUDGET_${s^^}
  var=${var//-/_}
  BUDGET[$s]=${!var:-${BUDGET[$s]}}
  [[ ${BUDGET[$s]} =~ ^[0-9]+$ ]] || { echo "$var must be a whole number of seconds" >&2; exit 2; }
  total=$((total + BUDGET[$s]))
  END[$s]=$total
done
BUDGET_TOTAL=$total
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "GPU_SUITE_DEADLINE must be a whole number" >&2; exit 2; }

if [ "$DRY_RUN" = 1 ]; then NPROC=${GPU_SUITE_NPROC:-16}; else NPROC=${GPU_SUITE_NPROC:-$(nproc)}; fi
SHARDS=${GPU_SUITE_SHARDS:-$((NPROC < 16 ? NPROC : 16))}
SAN_SHARDS=$((SHARDS < 8 ? SHARDS : 8))
FEW_SHARDS=$((SHARDS < 4 ? SHARDS : 4))  # for runs of a few tests
SHARED_JOBS=$((NPROC / 4 > 2 ? NPROC / 4 : 2))
LARGE_N=${GPU_SUITE_LARGE_N:-100003}
SAN_LARGE_N=8193  # one block of 8192 and a tail: every path, at sanitizer speed
BENCH_MIN_TIME=${GPU_SUITE_BENCH_MIN_TIME:-0.02}
read -r -a SAN_ARGS <<<"${GPU_SUITE_SAN_ARGS:-}"
DEB_DIR=${FUSEDOPT_DEB_DIR:-$ROOT/.debs}

BUILD=build/cuda  # the cuda preset's binaryDir
SHARED=build/cuda-shared
WORK=build/gpu-suite
DEPS=$ROOT/$WORK/deps
TEST_BIN=$BUILD/tests/fusedopt_tests
DEMO_BIN=$BUILD/tests/fusedopt_demo_test
BENCH_BIN=$BUILD/bench/fusedopt_bench
SHARED_LIB=$SHARED/host/libfusedopt.so
if [ "$DRY_RUN" = 1 ] || command -v ninja >/dev/null 2>&1; then
  GENERATOR=Ninja
  KEEP_GOING=(-k 0)
else
  GENERATOR="Unix Makefiles"
  KEEP_GOING=(-k)
fi

# Test selections. gtest runs tests in its own order whatever the filter says, so the bitwise
# tests go first as a run of their own.
BITWISE_FILTER='Cuda.GpuEqualsCpuBitwise:Cuda.FactoredParamsEqualCpuBitwise:SparseGpu.GpuEqualsCpuBitwise:Cuda.Bf16AndF16ParamsWithMasterWeights:CheckpointDevices.*'
GPU_FILTER="*Cuda*:*cuda*:*Gpu*:*GPU*:*Device*-$BITWISE_FILTER"
DEMO_FILTER='*Cuda*:*Gpu*:*GPU*:*Device*-DemoGpuPlan.*'  # DemoGpuPlan runs on the host
MEMCHECK_FILTER='Cuda.GpuEqualsCpuBitwise:Cuda.FactoredParamsEqualCpuBitwise:NewtonSchulzGpu.Bf16MatchesTheReferenceWithinBf16Rounding:Cuda.SkipNonFinite:Cuda.ClippingMatchesCpu:Cuda.GradNormWithEveryGradNullIsZeroAsOnTheCpu:Cuda.Bf16States:SparseGpu.GpuEqualsCpuBitwise:ScheduleDevice.Matches*:Cuda/DenseReference.*/adam_v1_cuda:Cuda/DenseReference.*/rmsprop_v3_cuda:Cuda/DenseReference.*/lamb_v3_cuda:Cuda/DenseReference.*/lars_v3_cuda:All/ScheduleFree.EvalGivesXAndTrainRestoresYBitwise/adamw_schedule_free_cuda:All/ScheduleFree.ResumeFromACheckpointEqualsNeverStopping/adamw_schedule_free_cuda'
# racecheck: the kernels with shared memory (every step's, the norm and non-finite reductions,
# the trust ratio's and the factored step's block trees and warp shuffles)
RACECHECK_FILTER='Cuda.ClippingMatchesCpu:Cuda.FactoredParamsEqualCpuBitwise:Cuda.SkipNonFinite:NewtonSchulzGpu.ZeroMatrixGivesZero:Cuda/DenseReference.*/adam_v1_cuda:Cuda/DenseReference.*/lamb_v3_cuda'
DEMO_SAN_FILTER='DemoCudaModel.LossAndGradientMatchCpuModel'
TEST_ENV=(env OMP_NUM_THREADS=1 "FUSEDOPT_TEST_LARGE_N=$LARGE_N")
SAN_ENV=(env OMP_NUM_THREADS=1 "FUSEDOPT_TEST_LARGE_N=$SAN_LARGE_N")

SETUP_LOG=$OUT/setup.log
TESTS_LOG=$OUT/tests.log
SAN_LOG=$OUT/sanitizer.log
BENCH_LOG=$OUT/bench.log
BENCH_JSON=$OUT/bench_cuda.json
TORCH_JSON=$OUT/torch_compare.json
SUMMARY=$OUT/summary.txt
RESULTS=$OUT/results.md
OUT_FILES=(setup.log tests.log sanitizer.log bench.log bench_cuda.json torch_compare.json
  summary.txt results.md)

TORCH_DENSE_CASES=flat24,gpt2,flat28
TORCH_SPARSE_CASES=sparse-1Mx128-uniform,sparse-1Mx128-zipf,sparse-10Mx64-uniform,sparse-10Mx64-zipf
DEP_ARGS=()
make_commands() {  # after the .debs are unpacked (DEP_ARGS)
  CONFIGURE=(cmake --preset cuda -G "$GENERATOR" -DCMAKE_CUDA_ARCHITECTURES=90 "${DEP_ARGS[@]}")
  BUILD_CMD=(cmake --build "$BUILD" -j "$NPROC" --target fusedopt_tests fusedopt_demo_test
    fusedopt_bench -- "${KEEP_GOING[@]}")
  SHARED_CONFIGURE=(cmake -S . -B "$SHARED" -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON -DFUSEDOPT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
    -DFUSEDOPT_BUILD_TESTS=OFF -DFUSEDOPT_BUILD_BENCH=OFF -DFUSEDOPT_BUILD_DEMO=OFF)
  SHARED_BUILD=(cmake --build "$SHARED" -j "$SHARED_JOBS" --target fusedopt)
  BENCH_CMD=("$BENCH_BIN" --benchmark_filter=/cuda/ "--benchmark_min_time=$BENCH_MIN_TIME"
    "--benchmark_out=$BENCH_JSON" --benchmark_out_format=json)
  local torch=(env PYTHONUNBUFFERED=1 python3 bench/torch_compare.py --lib "$SHARED_LIB"
    --warmup 2 --iters 10)
  TORCH_DENSE=("${torch[@]}" --cases "$TORCH_DENSE_CASES" --out "$WORK/torch_dense.json")
  TORCH_SPARSE=("${torch[@]}" --cases "$TORCH_SPARSE_CASES" --out "$WORK/torch_sparse.json")
}
make_commands

# A command line, quoted where the shell needs it.
q() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
      out+=("$a")
    elif [[ $a =~ ^(-[-A-Za-z0-9_]+=)(.*)$ ]]; then  # --gtest_filter='...'
      out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]}'")
    else
      out+=("'$a'")
    fi
  done
  echo "${out[*]}"
}
sharded() {  # shards prefix... : the command line of one shard
  local n=$1 shards=""
  shift
  [ "$n" -gt 1 ] && shards="GTEST_TOTAL_SHARDS=$n GTEST_SHARD_INDEX=0..$((n - 1)) "
  echo "${shards}timeout -k 5 <limit> $(q "$@")"
}

print_plan() {
  local s i=0 tool=compute-sanitizer
  echo "gpu_suite plan: $ROOT -> $OUT"
  echo "  files: ${OUT_FILES[*]}"
  echo "  nproc $NPROC, $SHARDS test shards, $SAN_SHARDS sanitizer shards, generator $GENERATOR"
  printf '  %-3s %-11s %6s %7s  %s\n' "#" step budget "ends by" what
  for s in "${STEPS[@]}"; do
    i=$((i + 1))
    printf '  %-3s %-11s %5ss %6ss  %s\n' "$i" "$s" "${BUDGET[$s]}" "${END[$s]}" "${TITLE[$s]}"
    case $s in
      machine)
        echo "        nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total; nvcc --version"
        local debs=("$DEB_DIR"/*.deb)
        [ -e "${debs[0]}" ] || debs=()
        echo "        dpkg-deb -x $DEB_DIR/*.deb $DEPS (${#debs[@]} .debs there now), then"
        echo "        -DCMAKE_PREFIX_PATH=$DEPS/usr and CPATH=$DEPS/usr/include" ;;
      build)
        echo "        $(q "${CONFIGURE[@]}")"
        echo "        $(q "${BUILD_CMD[@]}")"
        echo "        alongside: $(q "${SHARED_CONFIGURE[@]}")"
        echo "                   $(q "${SHARED_BUILD[@]}")" ;;
      bitwise) echo "        $(sharded "$FEW_SHARDS" "${TEST_ENV[@]}" "$TEST_BIN" --gtest_filter="$BITWISE_FILTER")" ;;
      gpu-tests) echo "        $(sharded "$SHARDS" "${TEST_ENV[@]}" "$TEST_BIN" --gtest_filter="$GPU_FILTER")" ;;
      demo-tests) echo "        $(sharded "$FEW_SHARDS" "${TEST_ENV[@]}" "$DEMO_BIN" --gtest_filter="$DEMO_FILTER")" ;;
      bench) echo "        timeout -k 5 <limit> $(q "${BENCH_CMD[@]}")" ;;
      torch)
        echo "        $(q "${TORCH_DENSE[@]}")"
        echo "        $(q "${TORCH_SPARSE[@]}")"
        echo "        (each merged into $TORCH_JSON as it ends)" ;;
      memcheck | racecheck)
        local f=$MEMCHECK_FILTER
        [ "$s" = racecheck ] && f=$RACECHECK_FILTER
        echo "        $(sharded "$SAN_SHARDS" "${SAN_ENV[@]}" "$tool" --tool "$s" --error-exitcode 86 "${SAN_ARGS[@]}" "$TEST_BIN" --gtest_filter="$f")"
        [ "$s" = memcheck ] &&
          echo "        $(sharded 1 "${SAN_ENV[@]}" "$tool" --tool "$s" --error-exitcode 86 "${SAN_ARGS[@]}" "$DEMO_BIN" --gtest_filter="$DEMO_SAN_FILTER")"
        ;;
      summary) echo "        python3 (inline): $SUMMARY and $RESULTS from the step table and the JSON files" ;;
    esac
  done
  echo "  budgets $BUDGET_TOTAL s; deadline $DEADLINE s (GPU_SUITE_DEADLINE) less a $MARGIN s margin allows $((DEADLINE - MARGIN)) s"
}
budgets_fit() { [ "$BUDGET_TOTAL" -le $((DEADLINE - MARGIN)) ]; }

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_suite.sh --dry-run: nothing is built or run"
  print_plan
  if budgets_fit; then
    echo "dry run: the budgets fit the deadline"
    exit 0
  fi
  echo "dry run: the budgets ($BUDGET_TOTAL s) do not fit the deadline ($DEADLINE s - $MARGIN s)" >&2
  exit 1
fi

# ------------------------------------------------------------------------ step machinery
mkdir -p "$WORK"
for f in "${OUT_FILES[@]}"; do rm -f "${OUT:?}/$f"; done
rm -f "$WORK"/*.log "$WORK"/*.json "$WORK"/*.tsv
declare -A STATUS USED NOTE
for s in "${STEPS[@]}"; do
  STATUS[$s]="-"
  USED[$s]=0
  NOTE[$s]="not run"
done
CUR=""
STEP_T0=0
STEP_END=0
ABORT=""  # set when nothing further can run (no GPU, no build)

elapsed() { echo $((SECONDS - SUITE_START)); }
log() { printf '[gpu-suite %3ds] %s\n' "$(elapsed)" "$*"; }
left() { echo $((STEP_END - $(elapsed))); }
# Seconds to an absolute time (date +%s), at least 1: `timeout 0` would mean no limit.
secs_to() {
  local n=$(($1 - $(date +%s)))
  echo $((n < 1 ? 1 : n))
}

# The steps' table as text: written to summary.txt after every step (the final summary
# replaces it), so a run cut short still leaves it.
step_table() {
  local s i=0
  printf '%-3s %-11s %6s %5s  %-7s %s\n' "#" step budget used status note
  for s in "${STEPS[@]}"; do
    i=$((i + 1))
    printf '%-3s %-11s %6s %5s  %-7s %s\n' "$i" "$s" "${BUDGET[$s]}" "${USED[$s]}" \
      "${STATUS[$s]}" "${NOTE[$s]}"
  done
}

begin_step() {  # step: 1 if it does not run (recorded)
  CUR=$1
  STEP_T0=$(elapsed)
  STEP_END=${END[$CUR]}
  local cap=$((DEADLINE - BUDGET[summary]))
  [ "$CUR" = summary ] && cap=$DEADLINE
  [ "$STEP_END" -gt "$cap" ] && STEP_END=$cap
  echo
  log "=== $CUR: ${TITLE[$CUR]} (budget ${BUDGET[$CUR]} s, may run $(left) s) ==="
  [ "$CUR" = summary ] && return 0  # runs whatever happened before
  if [ -n "$ABORT" ]; then
    finish_step FAIL "not run: $ABORT"
    return 1
  fi
  if [ "$(left)" -lt "$MIN_STEP" ]; then
    if [ "$CUR" = "$OPTIONAL_STEP" ]; then finish_step SKIP "no time left"; else finish_step FAIL "not run: no time left"; fi
    return 1
  fi
  return 0
}

finish_step() {  # status note
  STATUS[$CUR]=$1
  NOTE[$CUR]=$2
  USED[$CUR]=$(($(elapsed) - STEP_T0))
  log "$CUR: $1${2:+ - $2} (${USED[$CUR]} s)"
  local s
  for s in "${STEPS[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "${TITLE[$s]}" "${BUDGET[$s]}" "${USED[$s]}" \
      "${STATUS[$s]}" "${NOTE[$s]}"
  done >"$WORK/steps.tsv"
  { echo "gpu_suite (partial: $(elapsed) s so far)"; step_table; } >"$SUMMARY"
}

# Runs "$@" under the time the step has left, output appended to $1's file. Its exit status:
# 124 or 137 when it ran out of time.
run_limited() {
  local logfile=$1 limit
  shift
  limit=$(left)
  [ "$limit" -ge 1 ] || return 124
  printf '\n##### %s (limit %d s)\n' "$(q "$@")" "$limit" >>"$logfile"
  timeout -k 5 "$limit" "$@" >>"$logfile" 2>&1
}
rc_text() {
  case $1 in
    0) echo "ok" ;;
    124 | 137) echo "timed out" ;;
    86) echo "sanitizer errors" ;;
    *) echo "exit status $1" ;;
  esac
}

# gtest shards in the background: JOBS gets "pid|log|label" for each.
JOBS=()
start_gtest() {  # tag shards filter binary prefix...
  local tag=$1 shards=$2 filter=$3 bin=$4 i log limit
  shift 4
  limit=$(left)
  [ "$limit" -ge 1 ] || limit=1
  for ((i = 0; i < shards; i++)); do
    log=$WORK/$tag.$i.log
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i timeout -k 5 "$limit" \
      "$@" "$bin" --gtest_filter="$filter" >"$log" 2>&1 &
    JOBS+=("$!|$log|$tag shard $i of $shards: $(q "$@" "$bin") --gtest_filter='$filter'")
  done
}
# Waits for JOBS; appends their logs to $1; JOB_RCS and JOB_LOGS get exit statuses and logs.
JOB_RCS=()
JOB_LOGS=()
wait_jobs() {
  local dest=$1 job pid log label rc
  JOB_RCS=()
  JOB_LOGS=()
  for job in "${JOBS[@]}"; do
    IFS='|' read -r pid log label <<<"$job"
    rc=0
    wait "$pid" || rc=$?
    JOB_RCS+=("$rc")
    JOB_LOGS+=("$log")
    { printf '\n##### %s: %s\n' "$label" "$(rc_text "$rc")"; cat "$log"; } >>"$dest"
  done
  JOBS=()
}

# The verdict on the gtest runs just waited for: none failed, crashed, timed out or was
# SKIPPED, and at least one ran.
gtest_verdict() {
  local all=$WORK/$CUR.all.log ran passed failed skipped slow bad=0 timed=0 rc status note
  cat "${JOB_LOGS[@]}" >"$all"
  for rc in "${JOB_RCS[@]}"; do
    case $rc in 0) ;; 124 | 137) timed=$((timed + 1)) ;; *) bad=$((bad + 1)) ;; esac
  done
  ran=$(grep -c '^\[ RUN      \]' "$all")
  passed=$(grep -cE '^\[       OK \] .* \([0-9]+ ms\)$' "$all")
  failed=$(grep -E '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$all" | sed 's/^\[  FAILED  \] //; s/ ([0-9]* ms)$//')
  skipped=$(grep -E '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$all" | sed 's/^\[  SKIPPED \] //; s/ ([0-9]* ms)$//')
  slow=$(grep -E '^\[       OK \] .* \([0-9]+ ms\)$' "$all" |
    sed -E 's/^\[       OK \] (.*) \(([0-9]+) ms\)$/\2 \1/' | sort -rn | head -n 1)
  note="$ran run, $passed passed"
  [ -n "$failed" ] && note+=", $(grep -c . <<<"$failed") FAILED"
  [ -n "$skipped" ] && note+=", $(grep -c . <<<"$skipped") SKIPPED"
  [ "$timed" -gt 0 ] && note+=", $timed shards timed out"
  [ "$bad" -gt 0 ] && [ -z "$failed" ] && note+=", $bad shards exited non-zero (crash?)"
  [ -n "$slow" ] && note+="; slowest ${slow#* } $((${slow%% *} / 1000)).$((${slow%% *} % 1000 / 100)) s"
  if [ -n "$failed" ]; then echo "failed:" && head -n 10 <<<"$failed" | sed 's/^/  /'; fi
  if [ -n "$skipped" ]; then
    echo "SKIPPED (a GPU test must not skip here):"
    head -n 10 <<<"$skipped" | sed 's/^/  /'
    grep -B1 -E '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$all" | grep -vE '^\[|^--' | sort -u | head -n 3 | sed 's/^/  reason: /'
  fi
  status=PASS
  if [ "$timed" -gt 0 ]; then
    status=TIMEOUT
  elif [ "$bad" -gt 0 ] || [ -n "$failed" ] || [ -n "$skipped" ] || [ "$ran" -eq 0 ]; then
    status=FAIL
  fi
  [ "$ran" -eq 0 ] && note="no test ran; $note"
  finish_step "$status" "$note"
}

# --------------------------------------------------------------------------- the steps
unpack_debs() {
  local debs=("$DEB_DIR"/*.deb) deb link target dir
  if [ ! -e "${debs[0]}" ]; then
    DEBS_NOTE="no .debs"
    return 0
  fi
  rm -rf "$DEPS"
  mkdir -p "$DEPS/.ar"
  for deb in "${debs[@]}"; do
    echo "unpacking $deb"
    if command -v dpkg-deb >/dev/null 2>&1; then
      dpkg-deb -x "$deb" "$DEPS"
    else  # a .deb is an ar archive holding data.tar.*
      (cd "$DEPS/.ar" && rm -f data.tar.* && ar x "$deb" && tar -xf data.tar.* -C "$DEPS")
    fi || { DEBS_NOTE="unpacking $deb failed"; return 1; }
  done
  # Absolute links (libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13) go to the unpacked target.
  while IFS= read -r link; do
    target=$(readlink "$link")
    if [[ $target == /* ]] && [ -e "$DEPS$target" ]; then ln -sfn "$DEPS$target" "$link"; fi
  done < <(find "$DEPS" -type l)
  DEP_ARGS=("-DCMAKE_PREFIX_PATH=$DEPS/usr")
  for dir in "$DEPS"/usr/lib/*/cmake/GTest "$DEPS"/usr/lib/*/cmake/benchmark; do
    if [ -f "$dir/GTestConfig.cmake" ]; then DEP_ARGS+=("-DGTest_DIR=$dir"); fi
    if [ -f "$dir/benchmarkConfig.cmake" ]; then DEP_ARGS+=("-Dbenchmark_DIR=$dir"); fi
  done
  # Headers that the sources include without a find_package (xxhash.h).
  if [ -d "$DEPS/usr/include" ]; then export CPATH="$DEPS/usr/include${CPATH:+:$CPATH}"; fi
  # Shared libraries a test binary loads at run time beyond its RUNPATH: OpenBLAS's own
  # dependency libgfortran.so.5, in case the image lacks it.
  for dir in "$DEPS"/usr/lib/*-linux-gnu "$DEPS"/usr/lib/*-linux-gnu/openblas-pthread; do
    if [ -d "$dir" ]; then export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  done
  DEBS_NOTE="${#debs[@]} .debs unpacked"
}

step_machine() {
  begin_step machine || return
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  local t missing=() info
  for t in nvidia-smi nvcc cmake python3 timeout g++; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    ABORT="${missing[*]} not on PATH (needed: the CUDA toolkit, cmake, g++, python3)"
    finish_step FAIL "$ABORT"
    return
  fi
  {
    echo "##### the plan"
    print_plan
    echo "##### machine"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -srm), nproc $NPROC"
    timeout 10 nvidia-smi
    nvcc --version
    cmake --version | head -n 1
    g++ --version | head -n 1
    command -v ninja >/dev/null 2>&1 && echo "ninja $(ninja --version)"
    python3 --version
  } >>"$SETUP_LOG" 2>&1
  info=$(timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>>"$SETUP_LOG" | head -n 1)
  if [ -z "$info" ]; then
    ABORT="nvidia-smi finds no GPU"
    finish_step FAIL "$ABORT (see setup.log)"
    return
  fi
  local gpu driver mem cuda commit
  IFS=',' read -r gpu driver mem <<<"$info"
  cuda=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$commit" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null | head -n 1)" ]; then
    commit+=" with uncommitted changes"
  fi
  printf 'date\t%s\ngpu\t%s\ndriver\t%s\nmemory\t%s\ncuda\t%s\nhost\t%s\ncommit\t%s\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "${gpu# }" "${driver# }" "${mem# }" "${cuda:-?}" \
    "$(uname -sr), $NPROC CPUs" "$commit" >"$WORK/machine.tsv"
  log "${gpu# }, driver ${driver# }, ${mem# }, CUDA ${cuda:-?}, $NPROC CPUs"
  MACHINE_OK=1
  DEBS_NOTE=""
  if ! unpack_debs >>"$SETUP_LOG" 2>&1; then  # the build may still find them installed
    finish_step FAIL "$DEBS_NOTE (see setup.log)"
    return
  fi
  make_commands
  finish_step PASS "${gpu# }, driver ${driver# }, CUDA ${cuda:-?}; $DEBS_NOTE"
}

HAVE_TESTS=0 HAVE_DEMO=0 HAVE_BENCH=0 HAVE_SHARED=0
BUILD_RC=1
usable() {  # target binary: built by this run (or up to date)
  [ -x "$2" ] || return 1
  [ "$BUILD_RC" -eq 0 ] && return 0
  if [ "$GENERATOR" = Ninja ]; then
    ninja -C "$BUILD" -n "$1" 2>/dev/null | grep -q 'no work to do'
  else
    [ "$2" -nt "$WORK/build-start" ]
  fi
}
step_build() {
  begin_step build || return
  local dir end shared_pid shared_rc=0 rc=0 note missing=()
  for dir in "$BUILD" "$SHARED"; do  # a cache from another generator stops cmake
    if [ -f "$dir/CMakeCache.txt" ] &&
      ! grep -qx "CMAKE_GENERATOR:INTERNAL=$GENERATOR" "$dir/CMakeCache.txt"; then
      rm -rf "$dir"
    fi
  done
  touch "$WORK/build-start"
  end=$(($(date +%s) + $(left)))
  {
    echo "##### $(q "${SHARED_CONFIGURE[@]}")"
    timeout -k 5 "$(secs_to "$end")" "${SHARED_CONFIGURE[@]}" &&
      echo "##### $(q "${SHARED_BUILD[@]}")" &&
      timeout -k 5 "$(secs_to "$end")" "${SHARED_BUILD[@]}"
  } >"$WORK/shared-build.log" 2>&1 &
  shared_pid=$!
  log "$(q "${CONFIGURE[@]}")"
  run_limited "$SETUP_LOG" "${CONFIGURE[@]}" || rc=$?
  if [ "$rc" -eq 0 ]; then
    log "$(q "${BUILD_CMD[@]}")"
    run_limited "$SETUP_LOG" "${BUILD_CMD[@]}" || rc=$?
  fi
  BUILD_RC=$rc
  wait "$shared_pid" || shared_rc=$?
  { echo; echo "##### shared build ($SHARED)"; cat "$WORK/shared-build.log"; } >>"$SETUP_LOG"
  usable fusedopt_tests "$TEST_BIN" && HAVE_TESTS=1
  usable fusedopt_demo_test "$DEMO_BIN" && HAVE_DEMO=1
  usable fusedopt_bench "$BENCH_BIN" && HAVE_BENCH=1
  [ "$shared_rc" -eq 0 ] && [ -e "$SHARED_LIB" ] && HAVE_SHARED=1
  [ "$HAVE_TESTS" = 1 ] || missing+=(fusedopt_tests)
  [ "$HAVE_DEMO" = 1 ] || missing+=(fusedopt_demo_test)
  [ "$HAVE_BENCH" = 1 ] || missing+=(fusedopt_bench)
  [ "$HAVE_SHARED" = 1 ] || missing+=("shared lib: $(rc_text "$shared_rc")")
  if [ "$rc" -eq 0 ] && [ "${#missing[@]}" -eq 0 ]; then
    finish_step PASS "$GENERATOR -j $NPROC"
    return
  fi
  grep -hE 'error:|FAILED:|Could NOT find|CMake Error' "$SETUP_LOG" | head -n 20
  note="$(rc_text "$rc")"
  [ "${#missing[@]}" -gt 0 ] && note+="; not built: ${missing[*]}"
  if grep -qE 'Could NOT find|provided by "(GTest|benchmark)"|xxhash.h: No such file' "$SETUP_LOG"; then
    note+="; dependencies missing: carry .debs (see this script's header)"
  fi
  [ "$HAVE_TESTS$HAVE_DEMO$HAVE_BENCH$HAVE_SHARED" = 0000 ] && ABORT="the build failed"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then finish_step TIMEOUT "$note"; else finish_step FAIL "$note; see setup.log"; fi
}

step_gtest() {  # step have binary filter shards
  local step=$1 have=$2 bin=$3 filter=$4 shards=$5
  begin_step "$step" || return
  if [ "$have" != 1 ]; then
    finish_step FAIL "not run: $bin was not built"
    return
  fi
  log "$(sharded "$shards" "${TEST_ENV[@]}" "$bin" --gtest_filter="$filter")"
  start_gtest "$step" "$shards" "$filter" "$bin" "${TEST_ENV[@]}"
  wait_jobs "$TESTS_LOG"
  gtest_verdict
}

step_bench() {
  begin_step bench || return
  if [ "$HAVE_BENCH" != 1 ]; then
    finish_step FAIL "not run: $BENCH_BIN was not built"
    return
  fi
  local rc=0 runs errors
  log "$(q "${BENCH_CMD[@]}")"
  run_limited "$BENCH_LOG" "${BENCH_CMD[@]}" || rc=$?
  runs=$(grep -c '"run_type": "iteration"' "$BENCH_JSON" 2>/dev/null)
  errors=$(grep -c '"error_occurred": true' "$BENCH_JSON" 2>/dev/null)
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    tail -n 3 "$BENCH_LOG"
    finish_step TIMEOUT "after ${runs:-0} runs"
  elif [ "$rc" -ne 0 ]; then
    tail -n 5 "$BENCH_LOG"
    finish_step FAIL "$(rc_text "$rc") after ${runs:-0} runs; see bench.log"
  elif [ "${runs:-0}" -eq 0 ]; then
    finish_step FAIL "no CUDA benchmark ran (does fusedopt_bench see the GPU?)"
  elif [ "${errors:-0}" -gt 0 ]; then
    grep 'ERROR OCCURRED' "$BENCH_LOG" | head -n 5
    finish_step FAIL "$runs runs, $errors with errors"
  else
    finish_step PASS "$runs runs, min time $BENCH_MIN_TIME s"
  fi
}

merge_torch() {  # the parts written so far, into torch_compare.json
  timeout 20 python3 - "$TORCH_JSON" "$WORK/torch_dense.json" "$WORK/torch_sparse.json" \
    >>"$BENCH_LOG" 2>&1 <<'PY'
import json, os, sys
merged = None
for path in sys.argv[2:]:
    if not os.path.exists(path):
        continue
    try:
        with open(path) as f:
            part = json.load(f)
    except ValueError as exc:
        print(f"merge: {path} unreadable: {exc}")
        continue
    if merged is None:
        merged = part
        continue
    merged["results"] = merged.get("results", []) + part.get("results", [])
    merged["sparse_results"] = merged.get("sparse_results", []) + part.get("sparse_results", [])
    merged["copy_bandwidth"] = part.get("copy_bandwidth") or merged.get("copy_bandwidth")
    merged["seconds"] = merged.get("seconds", 0) + part.get("seconds", 0)
if merged is not None:
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=1, allow_nan=True)
PY
}
step_torch() {
  begin_step torch || return
  if [ "$HAVE_SHARED" != 1 ]; then
    finish_step FAIL "not run: no $SHARED_LIB (the shared build failed; see setup.log)"
    return
  fi
  local rc=0 rc2=0 note
  log "$(q "${TORCH_DENSE[@]}")"
  run_limited "$BENCH_LOG" "${TORCH_DENSE[@]}" || rc=$?
  merge_torch
  log "$(q "${TORCH_SPARSE[@]}")"
  run_limited "$BENCH_LOG" "${TORCH_SPARSE[@]}" || rc2=$?
  merge_torch
  note="dense: $(rc_text "$rc"), sparse: $(rc_text "$rc2")"
  if [ "$rc" -eq 0 ] && [ "$rc2" -eq 0 ]; then
    finish_step PASS "$note"
  else
    grep -E 'torch_compare:|errors:|Error' "$BENCH_LOG" | tail -n 5
    case "$rc $rc2" in *124* | *137*) finish_step TIMEOUT "$note" ;; *) finish_step FAIL "$note; see bench.log" ;; esac
  fi
}

SANITIZER=""
step_sanitizer() {  # tool filter
  local tool=$1 filter=$2 cand rc i errors=0 timed=0 bad=0 ran note status
  begin_step "$tool" || return
  for cand in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then SANITIZER=$cand && break; fi
  done
  if [ -z "$SANITIZER" ]; then
    finish_step FAIL "compute-sanitizer not found"
    return
  fi
  if [ "$HAVE_TESTS" != 1 ]; then
    finish_step FAIL "not run: $TEST_BIN was not built"
    return
  fi
  local san=("${SAN_ENV[@]}" "$SANITIZER" --tool "$tool" --error-exitcode 86 "${SAN_ARGS[@]}")
  log "$(sharded "$SAN_SHARDS" "${san[@]}" "$TEST_BIN" --gtest_filter="$filter")"
  start_gtest "$tool" "$SAN_SHARDS" "$filter" "$TEST_BIN" "${san[@]}"
  if [ "$HAVE_DEMO" = 1 ] && [ "$tool" = memcheck ]; then  # the demo's kernels (cuBLAS too)
    start_gtest "$tool-demo" 1 "$DEMO_SAN_FILTER" "$DEMO_BIN" "${san[@]}"
  fi
  wait_jobs "$SAN_LOG"
  for i in "${!JOB_RCS[@]}"; do
    case ${JOB_RCS[$i]} in
      0) ;;
      86) errors=$((errors + 1)) ;;
      124 | 137) timed=$((timed + 1)) ;;
      *) bad=$((bad + 1)) ;;
    esac
  done
  ran=$(cat "${JOB_LOGS[@]}" | grep -c '^\[ RUN      \]')
  note="$ran tests"
  [ "$errors" -gt 0 ] && note+=", errors in $errors runs"
  [ "$timed" -gt 0 ] && note+=", $timed runs timed out"
  [ "$bad" -gt 0 ] && note+=", $bad runs failed (a test, or the sanitizer)"
  if [ "$errors" -gt 0 ]; then
    cat "${JOB_LOGS[@]}" | grep -E '^========= +(Invalid|Uninitialized|Race|Error|.*[Hh]azard|Program hit)' |
      sed 's/ at 0x[0-9a-f]*.*//' | sort | uniq -c | sort -rn | head -n 8
  fi
  status=PASS
  if [ "$errors" -gt 0 ] || [ "$bad" -gt 0 ] || [ "$ran" -eq 0 ]; then
    status=FAIL
  elif [ "$timed" -gt 0 ]; then
    status=TIMEOUT
  fi
  [ "$status" = PASS ] && note+=", no errors"
  finish_step "$status" "$note"
}

step_summary() {
  begin_step summary || return
  local failed=() s status rc=0
  for s in "${STEPS[@]}"; do
    case ${STATUS[$s]} in
      PASS | SKIP | -) ;;
      TIMEOUT) [ "$s" = "$OPTIONAL_STEP" ] || failed+=("$s") ;;
      *) failed+=("$s") ;;
    esac
  done
  status=PASS
  [ "${#failed[@]}" -gt 0 ] && status="FAIL (${failed[*]})"
  finish_step PASS "" >/dev/null  # the summary's own row
  timeout -k 2 "$(left)" python3 - "$WORK" "$BENCH_JSON" "$TORCH_JSON" "$RESULTS" "$status" "$(elapsed)" "$DEADLINE" \
    >"$WORK/summary.txt" 2>&1 <<'PY' || rc=$?
import json, math, os, re, sys

work, bench_path, torch_path, results_path, status, seconds, deadline = sys.argv[1:8]


def rows_of(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


steps = rows_of(os.path.join(work, "steps.tsv"))
machine = {}
if os.path.exists(os.path.join(work, "machine.tsv")):
    machine = {r[0]: r[1] for r in rows_of(os.path.join(work, "machine.tsv")) if len(r) > 1}


def num(x, spec):
    ok = isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))
    return format(x, spec) if ok else "-"


def load(path):
    if not os.path.exists(path):
        return None, f"no {os.path.basename(path)}"
    try:
        with open(path) as f:
            return json.load(f), None
    except Exception as exc:  # a file cut off by a timeout
        return None, f"{os.path.basename(path)} unreadable ({exc})"


tables = []  # (title, head, rows)
tables.append(("Steps (seconds)", ["#", "step", "what", "budget", "used", "status", "note"],
               [[str(i + 1), r[0], r[1], r[2], r[3], r[4], r[5] if len(r) > 5 else ""]
                for i, r in enumerate(steps)]))

bench, err = load(bench_path)
notes = []
if bench is None:
    notes.append(f"fusedopt_bench: {err}")
else:
    runs = [b for b in bench.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]
    pivot, others = {}, []
    for b in runs:
        p = b.get("name", "").split("/")
        if len(p) >= 5 and p[0] == "step" and p[2] == "cuda" and p[4].isdigit():
            pivot.setdefault(f"{p[1]} {p[3]}", {})[int(p[4])] = b
        else:
            others.append(b)

    def gbs(b):
        if b.get("error_occurred"):
            return "ERR"
        bps = b.get("bytes_per_second")
        return num(bps / 1e9 if isinstance(bps, (int, float)) else None, ".0f")

    sizes = sorted({n for d in pivot.values() for n in d})
    if pivot:
        big = sizes[-1]
        head = ["step"] + [f"2^{n.bit_length() - 1}" for n in sizes] + [
            f"%copy 2^{big.bit_length() - 1}", f"%limit 2^{big.bit_length() - 1}"]
        rows = []
        for key, d in pivot.items():
            last = d.get(big, {})
            rows.append([key] + [gbs(d[n]) if n in d else "-" for n in sizes] +
                        [num(last.get("pct_of_copy"), ".0f"), num(last.get("pct_of_limit"), ".0f")])
        tables.append(("fusedopt_bench, CUDA steps: GB/s (decimal, minimal traffic) by numel; "
                       "%copy, %limit: a device copy, the traffic probe of the same bytes, over the step",
                       head, rows))
    if others:
        rows = []
        for b in others:
            name = b.get("name", "?").replace("/manual_time", "").replace("/real_time", "")
            if b.get("error_occurred"):
                rows.append([name, "ERROR: " + str(b.get("error_message", "")), "", "", "", ""])
                continue
            rps = b.get("rows_per_second")
            rows.append([name, f"{num(b.get('real_time'), '.1f')} {b.get('time_unit', '')}", gbs(b),
                         num(b.get("pct_of_copy"), ".0f"), num(b.get("pct_of_limit"), ".0f"),
                         num(rps / 1e6 if isinstance(rps, (int, float)) else None, ".1f")])
        tables.append(("fusedopt_bench, CUDA: GPT-2 small and sparse steps",
                       ["benchmark", "time", "GB/s", "%copy", "%limit", "Mrows/s"], rows))

tc, err = load(torch_path)
if tc is None:
    notes.append(f"torch comparison: {err}")
else:
    machine.setdefault("torch", f"{tc.get('torch_version', '?')} (CUDA {tc.get('torch_cuda', '?')})")
    rows = []
    for r in tc.get("results", []):
        v = r.get("variants", {})

        def ms(name):
            e = v.get(name, {})
            if "ms" not in e:
                return "skip" if "skipped" in e else ("err" if "error" in e else "-")
            return num(e["ms"], ".3f")

        chk = r.get("check") or {}
        rows.append([r.get("case", "?"), r.get("optimizer", "?"), ms("fusedopt"),
                     num(v.get("fusedopt", {}).get("GBps"), ".0f"),
                     ms("torch_fused"), num(v.get("torch_fused", {}).get("speedup_of_fusedopt"), ".2f"),
                     ms("torch_foreach"), num(v.get("torch_foreach", {}).get("speedup_of_fusedopt"), ".2f"),
                     num(chk.get("rel"), ".1e")])
    if rows:
        tables.append((f"fusedopt vs torch.optim {tc.get('torch_version', '')}: median ms of "
                       f"{tc.get('timed_steps', '?')} steps; x = torch ms / fusedopt ms; rel diff "
                       "after the warm-up",
                       ["case", "optimizer", "fusedopt ms", "GB/s", "fused ms", "x", "foreach ms",
                        "x", "rel diff"], rows))
    rows = []
    for r in tc.get("sparse_results", []):
        f, t = (r.get("variants", {}).get(k, {}) for k in ("fusedopt", "torch_sparseadam"))
        rows.append([r.get("case", "?"), str(r.get("distinct_rows", "-")), num(f.get("ms"), ".3f"),
                     num(f.get("GBps"), ".0f"), num(f.get("pct_of_copy"), ".0f"),
                     num(t.get("ms"), ".3f"), num(t.get("speedup_of_fusedopt"), ".1f"),
                     num((r.get("check") or {}).get("rel"), ".1e")])
    if rows:
        cb = (tc.get("copy_bandwidth") or {}).get("GBps")
        tables.append((f"lazyadam vs torch.optim.SparseAdam (device copy {num(cb, '.0f')} GB/s)",
                       ["case", "distinct", "lazyadam ms", "GB/s", "%copy", "SparseAdam ms", "x",
                        "rel diff"], rows))


def numeric(rows, i):
    """A column of numbers (and -, ERR, skip, err): right-aligned."""
    cells = [str(r[i]) for r in rows if str(r[i]) not in ("-", "ERR", "skip", "err", "")]
    return bool(cells) and all(re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?( [a-z]+)?", c)
                               for c in cells)


def text(title, head, rows):
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    right = [numeric(rows, i) for i in range(len(head))]

    def fmt(r):
        return "  ".join(str(x).rjust(w[i]) if right[i] else str(x).ljust(w[i])
                         for i, x in enumerate(r)).rstrip()

    return [title, fmt(head)] + [fmt(r) for r in rows]


out = ["=" * 96]
who = ", ".join(x for x in (machine.get("gpu"), machine.get("driver") and "driver " + machine["driver"],
                            machine.get("cuda") and "CUDA " + machine["cuda"]) if x)
out.append(f"gpu_suite on {who or 'an unknown GPU'}, {machine.get('date', '')}")
for title, head, rows in tables:
    out += [""] + text(title, head, rows)
out += [""] + notes
out.append(f"gpu_suite: {status} ({seconds} s; deadline {deadline} s)")
print("\n".join(out))

md = [f"# GPU suite on {machine.get('gpu', 'an unknown GPU')}, {machine.get('date', '')}", "",
      f"`bash bench/gpu_suite.sh`: **{status}** in {seconds} s (deadline {deadline} s).", "",
      "| | |", "|---|---|"]
for k in ("gpu", "memory", "driver", "cuda", "torch", "host", "commit"):
    if k in machine:
        md.append(f"| {k} | {machine[k]} |")
for title, head, rows in tables:
    md += ["", f"## {title}", "", "| " + " | ".join(head) + " |",
           "|" + "|".join("---:" if numeric(rows, i) else "---" for i in range(len(head))) + "|"]
    md += ["| " + " | ".join(str(x).replace("|", "/") for x in r) + " |" for r in rows]
if notes:
    md += [""] + [f"- {n}" for n in notes]
with open(results_path, "w") as f:
    f.write("\n".join(md) + "\n")
PY
  if [ "$rc" -eq 0 ]; then
    cp "$WORK/summary.txt" "$SUMMARY"
  else  # the table of steps at least
    { cat "$WORK/summary.txt"; step_table; echo "gpu_suite: $status ($(elapsed) s)"; } >"$SUMMARY"
  fi
  echo
  cat "$SUMMARY"
  [ "$status" = PASS ] && [ "$rc" -eq 0 ]
}

# ------------------------------------------------------------------------------ the run
if ! budgets_fit; then
  log "WARNING: the budgets ($BUDGET_TOTAL s) exceed the deadline less its margin ($((DEADLINE - MARGIN)) s): later steps will be cut"
fi
log "gpu_suite: $ROOT -> $OUT (deadline $DEADLINE s)"
MACHINE_OK=0
step_machine
[ "$MACHINE_OK" = 1 ] || ABORT=${ABORT:-"the machine step did not run"}
step_build
step_gtest bitwise "$HAVE_TESTS" "$TEST_BIN" "$BITWISE_FILTER" "$FEW_SHARDS"
step_gtest gpu-tests "$HAVE_TESTS" "$TEST_BIN" "$GPU_FILTER" "$SHARDS"
step_gtest demo-tests "$HAVE_DEMO" "$DEMO_BIN" "$DEMO_FILTER" "$FEW_SHARDS"
step_bench
step_torch
step_sanitizer memcheck "$MEMCHECK_FILTER"
step_sanitizer racecheck "$RACECHECK_FILTER"
step_summary
