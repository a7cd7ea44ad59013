#!/usr/bin/env bash
# gpu_suite.sh: everything fusedopt checks on a machine with an NVIDIA GPU, in one command.
#
#   bash bench/gpu_suite.sh [OUT_DIR]          (OUT_DIR defaults to ./gpu-suite-out)
#
#   a. prints the machine: date, nvidia-smi, nvcc --version (and cmake, g++)
#   b. builds the `cuda-native` preset (static library, tests, benchmark) and, alongside it,
#      a shared library with CUDA for Python in build/gpu-shared
#   c. runs every test (ctest -j$(nproc)), then the GPU tests again straight from the test
#      binary, failing if any test with "cuda" in its name was SKIPPED or if none ran
#   d. runs the GPU tests under compute-sanitizer: memcheck, racecheck, initcheck
#   e. runs the CUDA benchmarks of fusedopt_bench (JSON)
#   f. compares with torch.optim through bench/torch_compare.py, if python3 has torch
#   g. prints a summary table from the JSON files: the last thing printed
#
# Every step runs even if an earlier test step failed (a build failure stops the run); the
# exit status is 0 only if nothing failed, and the table's last line names what failed.
#
# OUT_DIR gets at most 7 files: setup.log (machine, dependencies, configure and build),
# tests.log (ctest, then the direct GPU-test run), sanitizer.log, bench.log (benchmark and
# torch_compare console output), bench_cuda.json, torch_compare.json, summary.txt.
# Scratch files (shard logs, the dependency probe) go to build/gpu-suite/.
#
# Google Test and Google Benchmark (Debian's libgtest-dev and libbenchmark-dev): used where
# CMake finds them; else unpacked from the .deb files in $FUSEDOPT_DEB_DIR (default ./.debs,
# e.g. from `apt-get download libgtest-dev libbenchmark-dev libbenchmark1debian` on a machine
# with Debian's archive) into build/gpu-suite/deps; else installed with apt-get; else the
# run stops with a message saying what is missing.
#
# The GPU-test and sanitizer runs use gtest's sharding (GTEST_TOTAL_SHARDS/GTEST_SHARD_INDEX):
# the tests check against a double-precision CPU reference, which is most of their time, so
# shards in parallel keep the run within minutes. Knobs (environment):
#   GPU_SUITE_SHARDS           parallel shards (default: min(nproc, 8))
#   GPU_SUITE_SAN_FILTER       gtest filter under compute-sanitizer (default
#                              'Cuda*:*Cuda*:*cuda*:SparseGpu*-*Huge*')
#   GPU_SUITE_SAN_ARGS         more compute-sanitizer options, e.g. '--report-api-errors no'
#                              where a test makes a CUDA call fail on purpose
#   GPU_SUITE_BENCH_MIN_TIME   --benchmark_min_time in seconds (default 0.2)
#   GPU_SUITE_*_TIMEOUT        seconds per step at most: BUILD (600), CTEST (300), GTEST (180),
#                              SAN (180 per tool), BENCH (240), TORCH (300)
#   GPU_SUITE_DEADLINE         seconds from the start by which the run should end (default 540,
#                              for machines that stop a command at 10 minutes; 0: none). Each
#                              step's limit is cut so that the later steps keep their usual time
#                              (GPU_SUITE_RESERVE_*: GTEST 40, SAN 45 per tool, BENCH 100,
#                              TORCH 90) and the summary is still printed; a step left with
#                              under 15 s does not run, and counts as failed.
# A step that runs past its limit is killed (with its process group) and counts as failed.
set -euo pipefail

SUITE_START=$SECONDS
out_arg=${1:-./gpu-suite-out}
mkdir -p "$out_arg"
OUT=$(cd "$out_arg" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PRESET=cuda-native
BUILD=build/$PRESET
SHARED=build/gpu-shared
WORK=build/gpu-suite
TEST_BIN=$BUILD/tests/fusedopt_tests
DEMO_TEST_BIN=$BUILD/tests/fusedopt_demo_test
BENCH_BIN=$BUILD/bench/fusedopt_bench
NPROC=$(nproc 2>/dev/null || echo 4)
SHARDS=${GPU_SUITE_SHARDS:-$((NPROC < 8 ? NPROC : 8))}
# Every test that needs a GPU has Cuda, cuda, Gpu or Device in its name (the sparse suite's
# "..._cuda" cases, SparseGpu, CheckpointDevices, ScheduleDevice; the demo's DemoCudaModel,
# *Gpu*, CholeskyGpu, NewtonGpu).
GPU_FILTER='Cuda*:*Cuda*:*cuda*:*Gpu*:*Device*:GpuSuite*'
DEMO_GPU_FILTER='*Cuda*:*Gpu*'
SAN_FILTER=${GPU_SUITE_SAN_FILTER:-'Cuda*:*Cuda*:*cuda*:SparseGpu*-*Huge*'}
read -r -a SAN_ARGS <<<"${GPU_SUITE_SAN_ARGS:-}"
BENCH_MIN_TIME=${GPU_SUITE_BENCH_MIN_TIME:-0.2}
BUILD_TIMEOUT=${GPU_SUITE_BUILD_TIMEOUT:-600}
CTEST_TIMEOUT=${GPU_SUITE_CTEST_TIMEOUT:-300}
GTEST_TIMEOUT=${GPU_SUITE_GTEST_TIMEOUT:-180}
SAN_TIMEOUT=${GPU_SUITE_SAN_TIMEOUT:-180}
BENCH_TIMEOUT=${GPU_SUITE_BENCH_TIMEOUT:-240}
TORCH_TIMEOUT=${GPU_SUITE_TORCH_TIMEOUT:-300}
DEADLINE=${GPU_SUITE_DEADLINE:-540}
R_GTEST=${GPU_SUITE_RESERVE_GTEST:-40}
R_SAN=${GPU_SUITE_RESERVE_SAN:-45}
R_BENCH=${GPU_SUITE_RESERVE_BENCH:-100}
R_TORCH=${GPU_SUITE_RESERVE_TORCH:-90}
DEB_DIR=${FUSEDOPT_DEB_DIR:-$ROOT/.debs}

SETUP_LOG=$OUT/setup.log
TESTS_LOG=$OUT/tests.log
SAN_LOG=$OUT/sanitizer.log
BENCH_LOG=$OUT/bench.log
BENCH_JSON=$OUT/bench_cuda.json
TORCH_JSON=$OUT/torch_compare.json
SUMMARY=$OUT/summary.txt
rm -f "$SETUP_LOG" "$TESTS_LOG" "$SAN_LOG" "$BENCH_LOG" "$BENCH_JSON" "$TORCH_JSON" "$SUMMARY"
mkdir -p "$WORK"

FAILURES=()
SHARED_PID=

log() { printf '[gpu-suite %4ds] %s\n' "$((SECONDS - SUITE_START))" "$*"; }
phase() {
  echo
  log "=== $* ==="
}
fail() {
  FAILURES+=("$1")
  log "FAIL: $1${2:+ ($2)}"
}
die() {
  log "ERROR: $*" >&2
  exit 1
}
# A step's exit status in words.
status_text() {
  case $1 in
    124 | 137) echo "timed out after $2 s" ;;
    *) echo "exit status $1" ;;
  esac
}
# The limit for a step that would take at most $1 s when the steps after it need $2 s.
step_limit() {
  local limit=$1 left
  if [ "$DEADLINE" -gt 0 ]; then
    left=$((DEADLINE - (SECONDS - SUITE_START) - $2))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  if [ "$limit" -lt 0 ]; then limit=0; fi
  echo "$limit"
}
# True (and the step counts as failed) if a step's limit leaves it too little time to run.
out_of_time() {
  if [ "$1" -lt 15 ]; then
    fail "$2" "not run: the suite's deadline of $DEADLINE s is near"
    return 0
  fi
  return 1
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [ -n "$SHARED_PID" ]; then kill "$SHARED_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------ a. the machine
phase "a. machine"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
for tool in nvidia-smi nvcc cmake ctest g++ python3 timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH (needed: CUDA toolkit, driver, cmake, g++, python3, coreutils)"
done
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU: this suite needs an NVIDIA GPU and its driver"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(uname -n) $(uname -r), $NPROC CPUs"
  nvidia-smi
  nvcc --version
  cmake --version | sed -n 1p
  g++ --version | sed -n 1p
} 2>&1 | tee -a "$SETUP_LOG"

# ------------------------------------------------------------- Google Test and Benchmark
phase "dependencies (Google Test, Google Benchmark)"
DEPS_PREFIX=$ROOT/$WORK/deps
DEP_ARGS=()

# Prints the Debian packages whose CMake package is not found (nothing if both are).
missing_deps() {
  local src=$WORK/probe bld=$WORK/probe-build
  mkdir -p "$src"
  rm -rf "$bld"
  cat >"$src/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(fusedopt_dependency_probe LANGUAGES CXX)
find_package(GTest QUIET)
find_package(benchmark QUIET)
set(missing "")
if(NOT (GTest_FOUND OR GTEST_FOUND))
  string(APPEND missing " libgtest-dev")
endif()
if(NOT benchmark_FOUND)
  string(APPEND missing " libbenchmark-dev")
endif()
file(WRITE "${CMAKE_BINARY_DIR}/missing.txt" "${missing}")
EOF
  if cmake -S "$src" -B "$bld" ${DEP_ARGS[@]+"${DEP_ARGS[@]}"} >>"$SETUP_LOG" 2>&1 &&
    [ -f "$bld/missing.txt" ]; then
    cat "$bld/missing.txt"
  else
    echo " libgtest-dev libbenchmark-dev"
  fi
}

# Unpacks every .deb in DEB_DIR under DEPS_PREFIX and points CMake there.
use_local_debs() {
  local deb dir
  command -v dpkg-deb >/dev/null 2>&1 || {
    log "dpkg-deb not found: cannot unpack $DEB_DIR/*.deb"
    return 1
  }
  rm -rf "$DEPS_PREFIX"
  mkdir -p "$DEPS_PREFIX"
  for deb in "$DEB_DIR"/*.deb; do
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$DEPS_PREFIX" || return 1
  done
  DEP_ARGS=("-DCMAKE_PREFIX_PATH=$DEPS_PREFIX/usr;$DEPS_PREFIX/usr/local")
  for dir in "$DEPS_PREFIX"/usr/lib/*/cmake/GTest "$DEPS_PREFIX"/usr/lib/cmake/GTest; do
    if [ -f "$dir/GTestConfig.cmake" ]; then DEP_ARGS+=("-DGTest_DIR=$dir"); break; fi
  done
  for dir in "$DEPS_PREFIX"/usr/lib/*/cmake/benchmark "$DEPS_PREFIX"/usr/lib/cmake/benchmark; do
    if [ -f "$dir/benchmarkConfig.cmake" ]; then DEP_ARGS+=("-Dbenchmark_DIR=$dir"); break; fi
  done
}

# apt-get install "$@": as is, then after an update; bounded, no retries.
apt_install() {
  local as_root=(env DEBIAN_FRONTEND=noninteractive)
  local net=(-o Acquire::Retries=0 -o Acquire::http::Timeout=15 -o Acquire::https::Timeout=15)
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || return 1
    as_root=(sudo -n env DEBIAN_FRONTEND=noninteractive)
  fi
  log "apt-get install -y $*"
  if timeout 180 "${as_root[@]}" apt-get install -y -q --no-install-recommends "${net[@]}" "$@" \
    >>"$SETUP_LOG" 2>&1; then
    return 0
  fi
  log "apt-get update, then again"
  timeout 120 "${as_root[@]}" apt-get update -q "${net[@]}" >>"$SETUP_LOG" 2>&1 || return 1
  timeout 300 "${as_root[@]}" apt-get install -y -q --no-install-recommends "${net[@]}" "$@" \
    >>"$SETUP_LOG" 2>&1
}

missing=$(missing_deps)
if [ -n "$missing" ] && compgen -G "$DEB_DIR/*.deb" >/dev/null; then
  log "not found:$missing; using the .deb files in $DEB_DIR"
  use_local_debs || log "unpacking $DEB_DIR/*.deb failed (see $SETUP_LOG)"
  missing=$(missing_deps)
fi
if [ -n "$missing" ]; then
  log "not found:$missing; trying apt-get"
  # shellcheck disable=SC2086 # $missing is a list of package names
  apt_install $missing || log "apt-get could not install them (see $SETUP_LOG)"
  missing=$(missing_deps)
fi
if [ -n "$missing" ]; then
  die "CMake cannot find:$missing. Install them (apt-get install$missing), or put the .deb
files of libgtest-dev, libbenchmark-dev and libbenchmark1debian in $DEB_DIR (or
\$FUSEDOPT_DEB_DIR), e.g. from 'apt-get download libgtest-dev libbenchmark-dev
libbenchmark1debian' on a Debian machine. Details: $SETUP_LOG"
fi
log "Google Test and Google Benchmark found${DEP_ARGS[0]:+ (${DEP_ARGS[0]})}"

# ------------------------------------------------------------------------------ b. build
phase "b. build ($PRESET, static; $SHARED, shared)"
# Nothing runs without the build: it may use all the time but the summary's.
build_limit=$(step_limit "$BUILD_TIMEOUT" 30)
out_of_time "$build_limit" "build" && die "no time left to build"
# The shared library for Python builds alongside (its CUDA compile is one long job).
log "building $SHARED in the background"
# shellcheck disable=SC2016 # $1 and $2 are the inner script's arguments
timeout "$build_limit" bash -c '
  set -e
  cmake -S . -B "$1" -DBUILD_SHARED_LIBS=ON -DFUSEDOPT_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=native -DFUSEDOPT_BUILD_TESTS=OFF -DFUSEDOPT_BUILD_BENCH=OFF
  cmake --build "$1" -j "$2"
' _ "$SHARED" "$NPROC" >"$WORK/shared-build.log" 2>&1 &
SHARED_PID=$!

log "cmake --preset $PRESET -DBUILD_SHARED_LIBS=OFF"
if ! timeout "$build_limit" cmake --preset "$PRESET" -DBUILD_SHARED_LIBS=OFF \
  ${DEP_ARGS[@]+"${DEP_ARGS[@]}"} >>"$SETUP_LOG" 2>&1; then
  tail -n 40 "$SETUP_LOG"
  die "configuring the $PRESET preset failed (see $SETUP_LOG)"
fi
limit=$(step_limit "$BUILD_TIMEOUT" 30)
log "cmake --build --preset $PRESET -j$NPROC"
if [ "$limit" -lt 1 ] ||
  ! timeout "$limit" cmake --build --preset "$PRESET" -j"$NPROC" >>"$SETUP_LOG" 2>&1; then
  grep -E 'error|Error' "$SETUP_LOG" | tail -n 30 || true
  die "building the $PRESET preset failed or ran out of time (see $SETUP_LOG)"
fi
[ -x "$TEST_BIN" ] || die "$TEST_BIN was not built"
[ -x "$BENCH_BIN" ] || die "$BENCH_BIN was not built"

shared_rc=0
wait "$SHARED_PID" || shared_rc=$?
SHARED_PID=
{
  echo
  echo "##### shared build ($SHARED)"
  cat "$WORK/shared-build.log"
} >>"$SETUP_LOG"
SHARED_LIB=$SHARED/host/libfusedopt.so
if [ "$shared_rc" -ne 0 ] || [ ! -e "$SHARED_LIB" ]; then
  tail -n 20 "$WORK/shared-build.log"
  fail "shared build" "$(status_text "$shared_rc" "$build_limit"); see setup.log"
fi
log "built"

# Runs "$@" as $SHARDS gtest shards at once, each under `timeout $limit`; appends their logs,
# in shard order, to $log; SHARD_RCS gets each shard's exit status.
SHARD_RCS=()
run_shards() {
  local name=$1 limit=$2 log=$3
  shift 3
  local dir=$WORK/$name i rc
  local pids=()
  rm -rf "$dir"
  mkdir -p "$dir"
  for ((i = 0; i < SHARDS; i++)); do
    GTEST_TOTAL_SHARDS=$SHARDS GTEST_SHARD_INDEX=$i timeout "$limit" "$@" >"$dir/shard$i.log" 2>&1 &
    pids+=("$!")
  done
  SHARD_RCS=()
  for ((i = 0; i < SHARDS; i++)); do
    rc=0
    wait "${pids[$i]}" || rc=$?
    SHARD_RCS+=("$rc")
  done
  for ((i = 0; i < SHARDS; i++)); do
    printf '\n##### %s: shard %d of %d, %s\n' "$name" "$i" "$SHARDS" \
      "$(status_text "${SHARD_RCS[$i]}" "$limit")"
    cat "$dir/shard$i.log"
  done >>"$log"
}

# ------------------------------------------------------------------------------ c. tests
phase "c. tests"
run_ctest() {
  local limit rc=0
  limit=$(step_limit "$CTEST_TIMEOUT" $((2 * R_GTEST + 3 * R_SAN + R_BENCH + R_TORCH)))
  out_of_time "$limit" "ctest" && return 0
  log "ctest --preset $PRESET --output-on-failure -j $NPROC (limit $limit s)"
  timeout "$limit" ctest --preset "$PRESET" --output-on-failure -j "$NPROC" \
    >"$TESTS_LOG" 2>&1 || rc=$?
  grep -E 'tests passed|tests failed|Total Test time' "$TESTS_LOG" || true
  grep -E '\((Failed|Timeout|Not Run|Skipped|SEGFAULT|Subprocess aborted|Exception)\)' \
    "$TESTS_LOG" | head -n 40 || true
  if [ "$rc" -ne 0 ]; then
    fail "ctest" "$(status_text "$rc" "$limit"); see tests.log"
  fi
}
run_ctest

# The GPU tests straight from the binaries: none may be skipped (a skip passes under ctest).
# $1: the test binary, $2: its gtest filter, $3: a name for logs, $4: seconds to keep for
# further test runs before the sanitizer.
run_gpu_tests() {
  local bin=$1 filter=$2 name=$3 reserve=${4:-0}
  local limit i log=$WORK/$name.log ran passed failed skipped skipped_cuda n reason
  limit=$(step_limit "$GTEST_TIMEOUT" $((reserve + 3 * R_SAN + R_BENCH + R_TORCH)))
  out_of_time "$limit" "GPU tests ($name)" && return 0
  log "$bin --gtest_filter='$filter' --gtest_brief=0 ($SHARDS shards, limit $limit s)"
  printf '\n\n##### %s --gtest_filter=%s --gtest_brief=0\n' "$bin" "$filter" \
    >>"$TESTS_LOG"
  rm -f "$log"
  run_shards "$name" "$limit" "$log" "$bin" --gtest_filter="$filter" --gtest_brief=0
  cat "$log" >>"$TESTS_LOG"
  for ((i = 0; i < SHARDS; i++)); do
    if [ "${SHARD_RCS[$i]}" -ne 0 ]; then
      fail "GPU tests ($name), shard $i" "$(status_text "${SHARD_RCS[$i]}" "$limit"); see tests.log"
    fi
  done
  ran=$(grep -c '^\[ RUN      \]' "$log" || true)
  passed=$(grep -c '^\[       OK \]' "$log" || true)
  failed=$(grep -E '^\[  FAILED  \] .*\(' "$log" | sed 's/ (.*//' | sort -u || true)
  skipped=$(grep -E '^\[  SKIPPED \] ' "$log" | grep -vE 'tests?, listed below' |
    sed 's/ (.*//' | sort -u || true)
  skipped_cuda=$(printf '%s\n' "$skipped" | grep -iE 'cuda|gpu|device' || true)
  n=$(printf '%s\n' "$skipped" | grep -c . || true)
  log "GPU tests ($name): $ran run, $passed passed, $n skipped"
  if [ -n "$failed" ]; then
    printf '%s\n' "$failed" | head -n 20
  fi
  if [ "${ran:-0}" -eq 0 ]; then
    fail "GPU tests ($name)" "no test matched '$filter'"
  fi
  if [ -n "$skipped_cuda" ]; then
    printf '%s\n' "$skipped_cuda" | head -n 20
    # gtest prints the skip's message on the line before "[  SKIPPED ]".
    reason=$(grep -B1 -iE '^\[  SKIPPED \] .*(cuda|gpu|device)' "$log" | grep -vE '^\[|^--' |
      head -n 1 || true)
    n=$(printf '%s\n' "$skipped_cuda" | grep -c . || true)
    fail "GPU tests skipped ($name)" "$n GPU tests SKIPPED${reason:+, e.g.: $reason}"
  elif [ -n "$skipped" ]; then
    log "skipped (no cuda, gpu or device in the name, so allowed):"
    printf '%s\n' "$skipped" | head -n 20
  fi
}
run_gpu_tests "$TEST_BIN" "$GPU_FILTER" gpu-tests "$R_GTEST"
if [ -x "$DEMO_TEST_BIN" ]; then
  run_gpu_tests "$DEMO_TEST_BIN" "$DEMO_GPU_FILTER" gpu-demo-tests
else
  fail "GPU tests (demo)" "$DEMO_TEST_BIN was not built"
fi

# ------------------------------------------------------------------- d. compute-sanitizer
phase "d. compute-sanitizer"
run_sanitizer() {
  local sanitizer="" cand tool k=0 limit errors summaries problem i rc
  for cand in "$(command -v compute-sanitizer 2>/dev/null || true)" \
    "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then
      sanitizer=$cand
      break
    fi
  done
  if [ -z "$sanitizer" ]; then
    fail "compute-sanitizer" "not found on PATH or in /usr/local/cuda"
    return 0
  fi
  log "$sanitizer ($("$sanitizer" --version 2>/dev/null | grep -i version | head -n 1 || true))"
  for tool in memcheck racecheck initcheck; do
    k=$((k + 1))
    limit=$(step_limit "$SAN_TIMEOUT" $(((3 - k) * R_SAN + R_BENCH + R_TORCH)))
    out_of_time "$limit" "compute-sanitizer $tool" && continue
    log "$tool on --gtest_filter='$SAN_FILTER' ($SHARDS shards, limit $limit s)"
    run_shards "san-$tool" "$limit" "$SAN_LOG" \
      "$sanitizer" --tool "$tool" --error-exitcode 86 ${SAN_ARGS[@]+"${SAN_ARGS[@]}"} \
      "$TEST_BIN" --gtest_filter="$SAN_FILTER" --gtest_brief=1
    errors=$(cat "$WORK/san-$tool"/shard*.log | grep -E 'ERROR SUMMARY: [1-9]' || true)
    summaries=$(cat "$WORK/san-$tool"/shard*.log | grep -c 'ERROR SUMMARY' || true)
    problem=
    for ((i = 0; i < SHARDS; i++)); do
      rc=${SHARD_RCS[$i]}
      case $rc in
        0) ;;
        86) problem="${problem:+$problem, }shard $i reported errors" ;;
        124 | 137) problem="${problem:+$problem, }shard $i timed out after $limit s" ;;
        *) problem="${problem:+$problem, }shard $i exit status $rc (a test failed, or the sanitizer could not run)" ;;
      esac
    done
    if [ -n "$errors" ]; then
      printf '%s\n' "$errors" | sort | uniq -c
      # The first line of each report names its kind (Invalid __global__ write, Race ...).
      grep -hE '^========= +(Invalid|Uninitialized|Race|Error|.*[Hh]azard|Program hit)' \
        "$WORK/san-$tool"/shard*.log | sed 's/ at 0x[0-9a-f]*.*//' | sort | uniq -c |
        sort -rn | head -n 10 || true
      problem=${problem:-errors reported}
    fi
    if [ -z "$problem" ] && [ "${summaries:-0}" -lt "$SHARDS" ]; then
      problem="only $summaries of $SHARDS shards printed an ERROR SUMMARY"
    fi
    if [ -n "$problem" ]; then
      fail "compute-sanitizer $tool" "$problem; see sanitizer.log"
    else
      log "$tool: no errors"
    fi
  done
}
run_sanitizer

# -------------------------------------------------------------------------- e. benchmark
phase "e. benchmark"
run_bench() {
  local limit rc=0
  limit=$(step_limit "$BENCH_TIMEOUT" "$R_TORCH")
  out_of_time "$limit" "benchmark" && return 0
  log "fusedopt_bench --benchmark_filter='/cuda/' --benchmark_min_time=$BENCH_MIN_TIME (limit $limit s)"
  timeout "$limit" "$BENCH_BIN" --benchmark_filter='/cuda/' \
    --benchmark_min_time="$BENCH_MIN_TIME" \
    --benchmark_out="$BENCH_JSON" --benchmark_out_format=json >"$BENCH_LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 20 "$BENCH_LOG"
    fail "benchmark" "$(status_text "$rc" "$limit"); see bench.log"
  elif ! grep -q '"name"' "$BENCH_JSON" 2>/dev/null; then
    tail -n 5 "$BENCH_LOG"
    fail "benchmark" "no CUDA benchmark ran (does fusedopt_bench see the GPU?); see bench.log"
  elif grep -q 'ERROR OCCURRED' "$BENCH_LOG"; then
    grep 'ERROR OCCURRED' "$BENCH_LOG" | head -n 10
    fail "benchmark" "a benchmark reported an error; see bench.log"
  else
    log "done: $BENCH_JSON"
  fi
}
run_bench

# ------------------------------------------------------------------ f. torch comparison
phase "f. torch.optim comparison"
run_torch() {
  local limit rc=0
  if ! python3 -c 'import torch' >/dev/null 2>&1; then
    log "torch is missing (python3 -c 'import torch' failed): skipping the torch comparison"
    return 0
  fi
  if [ ! -e "$SHARED_LIB" ]; then
    log "no $SHARED_LIB (the shared build failed): skipping the torch comparison"
    return 0
  fi
  limit=$(step_limit "$TORCH_TIMEOUT" 5)
  out_of_time "$limit" "torch comparison" && return 0
  log "python3 bench/torch_compare.py --lib $SHARED_LIB --out $TORCH_JSON (limit $limit s)"
  printf '\n\n##### bench/torch_compare.py\n' >>"$BENCH_LOG"
  timeout "$limit" env PYTHONUNBUFFERED=1 python3 bench/torch_compare.py \
    --lib "$SHARED_LIB" --out "$TORCH_JSON" >>"$BENCH_LOG" 2>&1 || rc=$?
  sed -n '/##### bench\/torch_compare.py/,$p' "$BENCH_LOG" | grep -E 'skipped:|ERROR' |
    head -n 20 || true
  if [ "$rc" -ne 0 ]; then
    tail -n 20 "$BENCH_LOG"
    fail "torch comparison" "$(status_text "$rc" "$limit"); see bench.log"
  fi
}
run_torch

# ---------------------------------------------------------------------------- g. summary
phase "g. summary ($((SECONDS - SUITE_START)) s in all)"
status="PASS"
if [ "${#FAILURES[@]}" -gt 0 ]; then
  status="FAIL: $(printf '%s; ' "${FAILURES[@]}")"
  status=${status%; }
fi
summary_rc=0
python3 - "$BENCH_JSON" "$TORCH_JSON" "$status" "$((SECONDS - SUITE_START))" <<'PY' |
import json
import math
import os
import sys

bench_path, torch_path, status, seconds = sys.argv[1:5]


def num(x, spec):
    ok = isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))
    return format(x, spec) if ok else "-"


def load(path):
    if not os.path.exists(path):
        return None, f"no {os.path.basename(path)}"
    try:
        with open(path) as f:
            return json.load(f), None
    except Exception as exc:  # a truncated file from a killed run
        return None, f"{os.path.basename(path)} unreadable: {exc}"


print("=" * 100)
bench, err = load(bench_path)
if bench is None:
    print(f"benchmark: {err}")
else:
    rows = [b for b in bench.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]
    print(f"fusedopt_bench, CUDA, {len(rows)} runs: GB/s decimal (minimal traffic of a step);"
          " %copy / %limit: a device copy / the traffic probe of the same bytes, over the step")
    print(f"{'benchmark':<34} {'time':>12} {'GB/s':>6} {'%copy':>6} {'%limit':>6}")
    for b in rows:
        name = b.get("name", "?").replace("/manual_time", "")
        if b.get("error_occurred"):
            print(f"{name:<34} ERROR: {b.get('error_message', '')}")
            continue
        t = f"{num(b.get('real_time'), '.2f')} {b.get('time_unit', '')}"
        bps = b.get("bytes_per_second")
        gb = bps / 1e9 if isinstance(bps, (int, float)) else None
        print(f"{name:<34} {t:>12} {num(gb, '.0f'):>6} {num(b.get('pct_of_copy'), '.1f'):>6}"
              f" {num(b.get('pct_of_limit'), '.1f'):>6}")

print()
tc, err = load(torch_path)
if tc is None:
    print(f"torch comparison: {err}")
else:
    print(f"fusedopt vs torch.optim {tc.get('torch_version', '')} on {tc.get('device', '')}: median ms"
          f" of {tc.get('timed_steps', '?')} steps; x = torch ms / fusedopt ms;"
          " rel diff = max|fusedopt - torch| / max|param change| after the warm-up")
    head = (f"{'case':<7} {'optimizer':<9} | {'fusedopt':>8} {'GB/s':>6} | "
            f"{'t.fused':>8} {'GB/s':>6} {'x':>5} | {'t.foreach':>9} {'GB/s':>6} {'x':>5} | "
            f"{'rel diff':>8} {'vs':<7}")
    print(head)
    print("-" * len(head))
    for r in tc.get("results", []):
        v = r.get("variants", {})

        def cell(name, width):
            e = v.get(name, {})
            if "ms" not in e:
                tag = "skip" if "skipped" in e else ("err" if "error" in e else "-")
                return f"{tag:>{width}} {'':>6}"
            return f"{num(e['ms'], '.3f'):>{width}} {num(e.get('GBps'), '.0f'):>6}"

        def sp(name):
            return f"{num(v.get(name, {}).get('speedup_of_fusedopt'), '.2f'):>5}"

        chk = r.get("check") or {}
        vs = {"torch_fused": "fused", "torch_foreach": "foreach"}.get(chk.get("vs"), "-")
        print(f"{r.get('case', '?'):<7} {r.get('optimizer', '?'):<9} | {cell('fusedopt', 8)} | "
              f"{cell('torch_fused', 8)} {sp('torch_fused')} | "
              f"{cell('torch_foreach', 9)} {sp('torch_foreach')} | "
              f"{num(chk.get('rel'), '.1e'):>8} {vs:<7}")
    for r in tc.get("sparse_results", []):  # lazyadam vs SparseAdam (torch_compare.py)
        f, t = (r.get("variants", {}).get(k, {}) for k in ("fusedopt", "torch_sparseadam"))
        print(f"{r.get('case', '?'):<21} lazyadam {num(f.get('ms'), '.3f')} ms"
              f" {num(f.get('GBps'), '.0f')} GB/s {num(f.get('pct_of_copy'), '.0f')}% copy |"
              f" SparseAdam {num(t.get('ms'), '.3f')} ms x{num(t.get('speedup_of_fusedopt'), '.1f')}"
              f" | rel diff {num((r.get('check') or {}).get('rel'), '.1e')}")
print("=" * 100)
print(f"gpu_suite: {status} ({seconds} s)")
PY
  tee "$SUMMARY" || summary_rc=$?
if [ "$summary_rc" -ne 0 ] || [ "${#FAILURES[@]}" -gt 0 ]; then
  exit 1
fi
exit 0
