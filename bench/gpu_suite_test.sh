#!/usr/bin/env bash
# gpu_suite_test.sh: checks bench/gpu_suite.sh on a machine without a GPU, in about 30 s.
#
#   bash bench/gpu_suite_test.sh
#
# 1. bash -n and shellcheck (when installed) on both scripts.
# 2. --dry-run: exits 0, shows every step, the sm_90 build and the filters, creates nothing;
#    exits non-zero when the budgets do not fit the deadline.
# 3. Where a built test binary is found (build/default or build/cpu), the dry run's gtest
#    filters against its test list: no CPU case selected, the bitwise and the other GPU
#    selection disjoint, each selecting something.
# 4. Real runs of the suite in a scratch copy of the repo against stand-ins: nvidia-smi, nvcc,
#    cmake (writes fake gtest binaries that print what they ran), ninja, compute-sanitizer,
#    fusedopt_bench and torch_compare.py (a python3 wrapper). Checked: the passing run (exit
#    0, the 8 files, CPU tests never run, the bitwise tests first, every selected test once,
#    the .debs unpacked and passed to cmake), a skipped GPU test (fails), a sanitizer error
#    (fails), and a build that hangs (killed with its children at the step's end; the later
#    steps are reported, not run).
# Nothing here builds the project or needs a GPU.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SUITE=$HERE/gpu_suite.sh
tmp=$(mktemp -d)
trap '[ -n "${KEEP_TMP:-}" ] || rm -rf "$tmp"' EXIT
checks=0
fails=0
check() {  # description command...
  checks=$((checks + 1))
  if "${@:2}"; then
    echo "ok   $1"
  else
    echo "FAIL $1"
    fails=$((fails + 1))
  fi
}
has() { grep -qE -- "$2" "$1"; }
lacks() { ! grep -qE -- "$2" "$1"; }

# ---------------------------------------------------------------- 1. syntax and lint
check "bash -n gpu_suite.sh" bash -n "$SUITE"
check "bash -n gpu_suite_test.sh" bash -n "$HERE/gpu_suite_test.sh"
if command -v shellcheck >/dev/null 2>&1; then
  check "shellcheck gpu_suite.sh gpu_suite_test.sh" shellcheck "$SUITE" "$HERE/gpu_suite_test.sh"
else
  echo "skip shellcheck: not installed (apt-get install shellcheck)"
fi

# ------------------------------------------------------------------------ 2. dry run
dry=$tmp/dry.txt
rc=0
bash "$SUITE" --dry-run "$tmp/dry-out" >"$dry" 2>&1 || rc=$?
check "dry run exits 0" test "$rc" -eq 0
for s in machine build bitwise gpu-tests demo-tests bench torch memcheck racecheck summary; do
  check "dry run shows step $s" has "$dry" "^  [0-9]+ +$s "
done
check "dry run: sm_90 for the cuda preset" has "$dry" "cmake --preset cuda -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90"
check "dry run: CUDA benchmarks" has "$dry" "fusedopt_bench --benchmark_filter=/cuda/"
check "dry run: the budgets fit" has "$dry" "budgets fit the deadline"
check "dry run creates no OUT_DIR" test ! -e "$tmp/dry-out"
rc=0
GPU_SUITE_DEADLINE=300 bash "$SUITE" --dry-run >"$tmp/dry300.txt" 2>&1 || rc=$?
check "dry run with a 300 s deadline fails" test "$rc" -ne 0
rc=0
GPU_SUITE_BUDGET_BUILD=200 bash "$SUITE" --dry-run >/dev/null 2>&1 || rc=$?
check "dry run with a 200 s build budget fails" test "$rc" -ne 0

# ------------------------------------------- 3. the filters against a built test list
mapfile -t filters < <(grep -oE -- "--gtest_filter=('[^']*'|[^ ']+)" "$dry" | sed "s/^--gtest_filter=//; s/'//g")
check "dry run shows 6 gtest filters" test "${#filters[@]}" -eq 6
list_tests() {  # binary filter: Suite.Test per line
  "$1" --gtest_list_tests --gtest_filter="$2" 2>/dev/null |
    awk '/^[^ ]/ && !/^Running main/ {suite=$1} /^  / {print suite $1}'
}
bin=""
for b in "$REPO"/build/default/tests/fusedopt_tests "$REPO"/build/cpu/tests/fusedopt_tests; do
  if [ -x "$b" ]; then bin=$b && break; fi
done
if [ -n "$bin" ] && [ "${#filters[@]}" -eq 6 ]; then
  list_tests "$bin" "${filters[0]}" >"$tmp/bitwise.list"
  list_tests "$bin" "${filters[1]}" >"$tmp/gpu.list"
  list_tests "$bin" "${filters[3]}" >"$tmp/memcheck.list"
  check "filters ($bin): bitwise selects tests" test -s "$tmp/bitwise.list"
  check "filters: the GPU filter selects Cuda/DenseReference" has "$tmp/gpu.list" '^Cuda/DenseReference\.'
  check "filters: the GPU filter selects the sparse *_cuda cases" has "$tmp/gpu.list" '^All/Sparse\..*_cuda$'
  check "filters: no CPU case among the GPU tests" lacks "$tmp/gpu.list" '^Cpu/|_(scalar|avx2|avx512|cpu)$|Determinism'
  check "filters: bitwise and GPU selections disjoint" test -z "$(sort "$tmp/bitwise.list" "$tmp/gpu.list" | uniq -d)"
  check "filters: memcheck selects tests" test -s "$tmp/memcheck.list"
  demo=${bin%/fusedopt_tests}/fusedopt_demo_test
  if [ -x "$demo" ]; then
    list_tests "$demo" "${filters[2]}" >"$tmp/demo.list"
    check "filters: demo selects CholeskyGpu" has "$tmp/demo.list" '^CholeskyGpu\.'
    check "filters: demo leaves out the host-only DemoGpuPlan" lacks "$tmp/demo.list" '^DemoGpuPlan\.'
  fi
else
  echo "skip the filter checks: no built fusedopt_tests in build/default or build/cpu"
fi

# ---------------------------------------------------------------- 4. stand-in runs
stubs=$tmp/bin
mkdir -p "$stubs"
real_python=$(command -v python3)
cat >"$stubs/nvidia-smi" <<'EOF'
#!/usr/bin/env bash
case "$*" in
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-stub)" ;;
  *--query-gpu*) echo "NVIDIA H200, 580.159.04, 143771 MiB" ;;
  *) echo "stub nvidia-smi: NVIDIA H200, driver 580.159.04" ;;
esac
EOF
cat >"$stubs/nvcc" <<'EOF'
#!/usr/bin/env bash
echo "Cuda compilation tools, release 13.0, V13.0.48"
EOF
cat >"$stubs/ninja" <<'EOF'
#!/usr/bin/env bash
if [ "${1:-}" = --version ]; then echo 1.11.1; else echo "ninja: no work to do."; fi
EOF
# cmake: configure writes a cache; --build writes the fake binaries of its targets.
cat >"$stubs/cmake" <<'EOF'
#!/usr/bin/env bash
printf '%s\n' "$*" "CPATH=${CPATH:-}" >>"$STUB_LOG/cmake.args"
dir="" gen="" mode=configure targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --version) echo "cmake version 3.28.3"; exit 0 ;;
    --preset) dir=build/$2; shift ;;
    -B) dir=$2; shift ;;
    -G) gen=$2; shift ;;
    --build) mode=build; dir=$2; shift ;;
    --target) shift; while [ $# -gt 0 ] && [[ $1 != -* ]]; do targets+=("$1"); shift; done; continue ;;
    --) break ;;
  esac
  shift
done
mkdir -p "$dir"
if [ "$mode" = configure ]; then
  echo "CMAKE_GENERATOR:INTERNAL=$gen" >"$dir/CMakeCache.txt"
  exit 0
fi
if [ -n "${STUB_BUILD_HANG:-}" ]; then
  sleep 300 &
  echo $! >>"$STUB_LOG/hang.pid"
  wait
fi
for t in "${targets[@]}"; do
  case $t in
    fusedopt_tests | fusedopt_demo_test)
      mkdir -p "$dir/tests"
      printf '#!/usr/bin/env bash\nexec fake_gtest %s "$@"\n' "$t" >"$dir/tests/$t"
      chmod +x "$dir/tests/$t" ;;
    fusedopt_bench)
      mkdir -p "$dir/bench"
      printf '#!/usr/bin/env bash\nexec fake_bench "$@"\n' >"$dir/bench/$t"
      chmod +x "$dir/bench/$t" ;;
    fusedopt) mkdir -p "$dir/host" && touch "$dir/host/libfusedopt.so" ;;
  esac
done
EOF
# A gtest binary: a fixed test list, --gtest_filter, sharding; appends what it ran to ran.txt.
cat >"$stubs/fake_gtest" <<'EOF'
#!/usr/bin/env bash
bin=$1
shift
if [ "$bin" = fusedopt_tests ]; then
  tests=(Cuda.GpuEqualsCpuBitwise Cuda.Bf16AndF16ParamsWithMasterWeights Cuda.Bf16States
    Cuda.SkipNonFinite Cuda.ClippingMatchesCpu Cuda.HugeTensorOver2To31Elements
    SparseGpu.GpuEqualsCpuBitwise CheckpointDevices.CpuCheckpointLoadsOnTheGpuAndBack
    ScheduleDevice.PointersAreCheckedFirst ScheduleDevice.MatchesTheHostForEveryKindAndReplaysFromAGraph
    Validation.UnknownAlgorithmAndMissingDevice Validation.BadParamsAreRejected
    Cpu/DenseReference.TwentyFiveStepsMatchDoubleReference/adam_v1_avx2
    Cuda/DenseReference.TwentyFiveStepsMatchDoubleReference/adam_v1_cuda
    Cuda/DenseReference.TwentyFiveStepsMatchDoubleReference/rmsprop_v3_cuda
    All/Sparse.MatchesTheReferenceAndLeavesOtherRowsAlone/adagrad_cuda
    All/Sparse.MatchesTheReferenceAndLeavesOtherRowsAlone/adagrad_cpu
    All/Determinism.ThreadsIsasAndAlignmentGiveIdenticalBits/adam)
else
  tests=(DemoCudaModel.LossAndGradientMatchCpuModel DemoCudaModel.RejectsBadBatches
    DemoGpuPlan.ColumnMajorGemmsOnTheHostMatchCpuModel
    DemoTrain.AdamOnSoftmaxRegressionOnGpuReachesStatedAccuracy
    DemoTrain.AdamOnSoftmaxRegressionReachesStatedAccuracy
    CholeskyGpu.MatchesTheCpuSolveAndRejectsWhatItRejects NewtonGpu.TheCuSolverSolveReachesTheSameMinima
    Newton.ReachesRosenbrocksMinimumInFewSteps)
fi
filter='*'
for a in "$@"; do [[ $a == --gtest_filter=* ]] && filter=${a#--gtest_filter=}; done
pos=${filter%%-*} neg=""
[[ $filter == *-* ]] && neg=${filter#*-}
matches() {  # name patterns
  local p
  IFS=: read -r -a pats <<<"$2"
  for p in "${pats[@]}"; do
    # shellcheck disable=SC2053 # a glob, as gtest's
    [[ $1 == $p ]] && return 0
  done
  return 1
}
total=${GTEST_TOTAL_SHARDS:-1} index=${GTEST_SHARD_INDEX:-0} k=0 rc=0
echo "Running main() from stub"
for t in "${tests[@]}"; do
  matches "$t" "$pos" || continue
  [ -n "$neg" ] && matches "$t" "$neg" && continue
  k=$((k + 1))
  [ $(((k - 1) % total)) -eq "$index" ] || continue
  echo "$bin|${STUB_SAN:-}|$t|${FUSEDOPT_TEST_LARGE_N:-}|${OMP_NUM_THREADS:-}" >>"$STUB_LOG/ran.txt"
  echo "[ RUN      ] $t"
  if [ -n "${STUB_SKIP:-}" ] && matches "$t" "$STUB_SKIP"; then
    printf 'stub_test.cpp:1: Skipped\nno CUDA device on this machine\n[  SKIPPED ] %s (0 ms)\n' "$t"
  elif [ -n "${STUB_FAIL:-}" ] && matches "$t" "$STUB_FAIL"; then
    echo "[  FAILED  ] $t (3 ms)"
    rc=1
  else
    echo "[       OK ] $t ($((k * 7)) ms)"
  fi
done
echo "[==========] $k tests ran."
exit $rc
EOF
cat >"$stubs/fake_bench" <<'EOF'
#!/usr/bin/env bash
out=""
for a in "$@"; do [[ $a == --benchmark_out=* ]] && out=${a#--benchmark_out=}; done
echo "step/adam/cuda/f32/1048576/manual_time 10.0 us"
cat >"$out" <<'JSON'
{"context": {"cuda_devices": "yes"}, "benchmarks": [
 {"name": "step/adam/cuda/f32/1048576/manual_time", "run_type": "iteration", "real_time": 10.0, "time_unit": "us", "bytes_per_second": 2.9e12, "pct_of_copy": 70.0, "pct_of_limit": 90.0},
 {"name": "step/adam/cuda/f32/268435456/manual_time", "run_type": "iteration", "real_time": 1800.0, "time_unit": "us", "bytes_per_second": 4.1e12, "pct_of_copy": 97.0, "pct_of_limit": 99.0},
 {"name": "step/adam/cuda/bf16/268435456/manual_time", "run_type": "iteration", "real_time": 1500.0, "time_unit": "us", "bytes_per_second": 4.0e12, "pct_of_copy": 96.0},
 {"name": "step/adam/cuda/f32/gpt2_small/manual_time", "run_type": "iteration", "real_time": 900.0, "time_unit": "us", "bytes_per_second": 3.9e12, "pct_of_copy": 95.0, "pct_of_limit": 98.0},
 {"name": "sparse/lazyadam/cuda/1048576x128/65536/uniform/real_time", "run_type": "iteration", "real_time": 60.0, "time_unit": "us", "bytes_per_second": 2.0e12, "rows_per_second": 1.0e9}
]}
JSON
EOF
cat >"$stubs/compute-sanitizer" <<'EOF'
#!/usr/bin/env bash
[ "${1:-}" = --version ] && { echo "stub compute-sanitizer"; exit 0; }
tool="" code=1
while [[ ${1:-} == --* ]]; do
  case $1 in --tool) tool=$2; shift 2 ;; --error-exitcode) code=$2; shift 2 ;; *) shift ;; esac
done
STUB_SAN=$tool "$@"
rc=$?
if [ "${STUB_SAN_ERROR:-}" = "$tool" ]; then
  printf '========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 1 error\n'
  exit "$code"
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
EOF
cat >"$stubs/python3" <<EOF
#!/usr/bin/env bash
if [ "\${1:-}" = bench/torch_compare.py ]; then
  exec "$real_python" "$stubs/fake_torch_compare.py" "\$@"
fi
exec "$real_python" "\$@"
EOF
cat >"$stubs/fake_torch_compare.py" <<'EOF'
import json, sys
args = sys.argv[2:]
out, cases = args[args.index("--out") + 1], args[args.index("--cases") + 1]
doc = {"device": "NVIDIA H200", "torch_version": "2.11.0+cu130", "torch_cuda": "13.0",
       "timed_steps": 10, "results": [], "sparse_results": [], "copy_bandwidth": None, "seconds": 1}
if "sparse" in cases:
    doc["copy_bandwidth"] = {"GBps": 4300.0}
    doc["sparse_results"] = [{"case": "sparse-1Mx128-uniform", "distinct_rows": 63000, "variants": {
        "fusedopt": {"ms": 0.05, "GBps": 2100.0, "pct_of_copy": 49.0},
        "torch_sparseadam": {"ms": 2.0, "speedup_of_fusedopt": 40.0}}, "check": {"rel": 1e-7}}]
else:
    doc["results"] = [{"case": "flat24", "optimizer": "adam", "variants": {
        "fusedopt": {"ms": 0.1, "GBps": 3800.0},
        "torch_fused": {"ms": 0.12, "GBps": 3100.0, "speedup_of_fusedopt": 1.2},
        "torch_foreach": {"skipped": "rejected"}}, "check": {"rel": 1e-6, "vs": "torch_fused"}}]
print(f"stub torch_compare: {cases}")
with open(out, "w") as f:
    json.dump(doc, f)
EOF
chmod +x "$stubs"/*

# A .deb with a header and an absolute library link, as zlib1g-dev's libz.so is.
debs=$tmp/debs
if command -v dpkg-deb >/dev/null 2>&1; then
  src=$tmp/debsrc
  mkdir -p "$src/DEBIAN" "$src/usr/include" "$src/usr/lib/x86_64-linux-gnu" "$debs"
  printf 'Package: fakedep\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n' \
    >"$src/DEBIAN/control"
  echo "/* fake */" >"$src/usr/include/fakedep.h"
  echo lib >"$src/usr/lib/x86_64-linux-gnu/libfake.so.1"
  ln -s /usr/lib/x86_64-linux-gnu/libfake.so.1 "$src/usr/lib/x86_64-linux-gnu/libfake.so"
  dpkg-deb --root-owner-group --build "$src" "$debs/fakedep.deb" >/dev/null
fi

# run_suite NAME [VAR=value...]: the suite in a fresh scratch repo; RC, OUTD, CONSOLE, LOGD.
run_suite() {
  local name=$1
  shift
  local repo=$tmp/$name/repo
  mkdir -p "$repo/bench" "$tmp/$name/log"
  cp "$SUITE" "$repo/bench/gpu_suite.sh"
  touch "$repo/bench/torch_compare.py"
  OUTD=$tmp/$name/out
  CONSOLE=$tmp/$name/console.txt
  LOGD=$tmp/$name/log
  RC=0
  env PATH="$stubs:$PATH" STUB_LOG="$LOGD" FUSEDOPT_DEB_DIR="$debs" GPU_SUITE_SHARDS=3 "$@" \
    bash "$repo/bench/gpu_suite.sh" "$OUTD" >"$CONSOLE" 2>&1 || RC=$?
}
ran() { cut -d'|' -f1-3 "$LOGD/ran.txt"; }

# The passing run.
run_suite pass
check "stand-ins: the suite passes (exit 0)" test "$RC" -eq 0
check "stand-ins: summary ends in PASS" has "$OUTD/summary.txt" '^gpu_suite: PASS'
check "stand-ins: exactly the 8 files" test "$(cd "$OUTD" && printf '%s ' *)" = \
  "bench.log bench_cuda.json results.md sanitizer.log setup.log summary.txt tests.log torch_compare.json "
check "stand-ins: results.md has the steps" has "$OUTD/results.md" '^\| 2 \| build \|'
check "stand-ins: results.md has GB/s by size" has "$OUTD/results.md" '^\| step \| 2\^20 \| .*2\^28 \|'
check "stand-ins: results.md has the torch table" has "$OUTD/results.md" '^\| flat24 \| adam \|'
check "stand-ins: torch_compare.json holds dense and sparse" "$real_python" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["results"] and d["sparse_results"], d' "$OUTD/torch_compare.json"
check "stand-ins: the summary is the last thing printed" has <(tail -n 1 "$CONSOLE") '^gpu_suite: PASS'
check "stand-ins: no CPU test ran" lacks <(ran) '_(avx2|cpu)$|Determinism|DemoGpuPlan|BadParamsAreRejected|Newton\.|RegressionReaches'
check "stand-ins: the bitwise tests ran first" test \
  "$(ran | grep '^fusedopt_tests||' | head -n 4 | cut -d'|' -f3 | sort | tr '\n' ' ')" = \
  "CheckpointDevices.CpuCheckpointLoadsOnTheGpuAndBack Cuda.Bf16AndF16ParamsWithMasterWeights Cuda.GpuEqualsCpuBitwise SparseGpu.GpuEqualsCpuBitwise "
check "stand-ins: each selected test ran once (14 + 5 demo)" test \
  "$(ran | grep -c '^fusedopt_tests||')/$(ran | grep '^fusedopt_tests||' | sort -u | wc -l)/$(ran | grep -c '^fusedopt_demo_test||')" = "14/14/5"
check "stand-ins: tests run with FUSEDOPT_TEST_LARGE_N=100003, one thread" \
  test "$(grep '^fusedopt_tests||' "$LOGD/ran.txt" | cut -d'|' -f4-5 | sort -u)" = "100003|1"
check "stand-ins: memcheck ran its subset, small" has "$LOGD/ran.txt" '^fusedopt_tests\|memcheck\|Cuda/DenseReference.*adam_v1_cuda\|8193\|'
check "stand-ins: memcheck ran the demo's model test" has "$LOGD/ran.txt" '^fusedopt_demo_test\|memcheck\|DemoCudaModel.LossAndGradientMatchCpuModel'
check "stand-ins: racecheck ran" has "$LOGD/ran.txt" '^fusedopt_tests\|racecheck\|Cuda.ClippingMatchesCpu'
check "stand-ins: cmake configured the cuda preset for sm_90 with Ninja" has "$LOGD/cmake.args" '^--preset cuda -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90'
if [ -e "$debs/fakedep.deb" ]; then
  deps=$tmp/pass/repo/build/gpu-suite/deps
  check "stand-ins: the .debs reach cmake" has "$LOGD/cmake.args" "-DCMAKE_PREFIX_PATH=$deps/usr"
  check "stand-ins: the .debs' headers reach CPATH" has "$LOGD/cmake.args" "^CPATH=$deps/usr/include"
  check "stand-ins: absolute links point into the unpacked .debs" test \
    "$(readlink "$deps/usr/lib/x86_64-linux-gnu/libfake.so")" = "$deps/usr/lib/x86_64-linux-gnu/libfake.so.1"
fi

# A GPU test that skips fails the suite.
run_suite skip STUB_SKIP='Cuda.HugeTensor*'
check "a skipped GPU test: exit 1" test "$RC" -eq 1
check "a skipped GPU test: named with its reason" has "$CONSOLE" 'reason: no CUDA device'
check "a skipped GPU test: the gpu-tests step fails" has "$OUTD/summary.txt" '^ *4 +gpu-tests .* FAIL .*1 SKIPPED'

# A sanitizer error fails the suite; a failing test is named.
run_suite san STUB_SAN_ERROR=memcheck STUB_FAIL='Cuda.Bf16States'
check "a sanitizer error: exit 1" test "$RC" -eq 1
check "a sanitizer error: memcheck fails" has "$OUTD/summary.txt" '^ *8 +memcheck .* FAIL .*errors in'
check "a failing test: named on the console" has "$CONSOLE" '^  Cuda.Bf16States$'

# A build that hangs is killed at the step's end, children too; the rest is reported.
start=$SECONDS
run_suite hang STUB_BUILD_HANG=1 GPU_SUITE_BUDGET_BUILD=6
took=$((SECONDS - start))
check "a hung build: exit 1" test "$RC" -eq 1
check "a hung build: ended within its budget ($took s)" test "$took" -le 22
check "a hung build: the build step timed out" has "$OUTD/summary.txt" '^ *2 +build .* TIMEOUT'
check "a hung build: later steps not run" has "$OUTD/summary.txt" '^ *6 +bench .* FAIL +not run: the build failed'
alive() {  # any of the pids in $1 still running
  local p
  [ -s "$1" ] || return 0
  while read -r p; do [ -e "/proc/$p" ] && return 0; done <"$1"
  return 1
}
check "a hung build: the children of both builds were killed" test "$(wc -l <"$LOGD/hang.pid")" -eq 2
check "a hung build: none left running" bash -c "! $(declare -f alive); alive '$LOGD/hang.pid'"

echo
echo "$((checks - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
