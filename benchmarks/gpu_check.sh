#!/usr/bin/env bash
# One command for a GPU machine: the test suite on the GPU (real compiles, bf16 included), then the
# benchmarks, in about 9 minutes; everything under one results folder, a short table at the end.
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# Needs only what the target machine has: python3 with torch, triton, timm, pytest, pytest-benchmark,
# pytest-xdist and matplotlib. Nothing is installed and the network is not used: the repository is put
# on the import path through a temporary folder of symlinks in which fastvit/kernels points at the
# repository's kernels/ folder (what setup.py's package_dir does for an installed copy).
#
# Environment: FASTVIT_TEST_BUDGET / FASTVIT_BENCH_BUDGET (seconds, default 270 / 150; a test budget of 0
# skips the tests), FASTVIT_TMA (set: overrides the TMA gate below),
# FASTVIT_PEAK_TFLOPS / FASTVIT_PEAK_GBPS (default: measured in the run), OUT (the results folder when no
# RESULTS_DIR is given: every file lands there as it is written, so a run cut short still leaves what it
# had), PYTHON (default python3), BENCH_ARGS (extra pytest arguments, e.g. --bench-full).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ -n "${OUT:-}" ] && OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"  # absolute: the script changes directory
PYTHON="${PYTHON:-python3}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
RESULTS_DIR="${1:-${OUT:-$REPO/benchmarks/results/gpu-check-$STAMP}}"
RESULTS="$(mkdir -p "$RESULTS_DIR" && cd "$RESULTS_DIR" && pwd)"
# a reused folder: no earlier run's file may pass for this run's
rm -f "$RESULTS"/{summary.txt,environment.txt,tests.log,tests.xml,tma.txt,bench.log,bench.json,report.md,throughput.png}
TEST_BUDGET="${FASTVIT_TEST_BUDGET:-270}"
BENCH_BUDGET="${FASTVIT_BENCH_BUDGET:-150}"
START=$SECONDS

# fastvit importable without installing: SITE/fastvit/* -> repo/fastvit/*, SITE/fastvit/kernels -> repo/kernels
SITE="$(mktemp -d)/site"
mkdir -p "$SITE/fastvit"
for entry in "$REPO"/fastvit/*; do ln -s "$entry" "$SITE/fastvit/"; done
ln -s "$REPO/kernels" "$SITE/fastvit/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$SITE"  # python -m puts the working directory first on sys.path: make it the symlinked package

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import sys, torch, triton, timm, fastvit.kernels, fastvit.ops as ops
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| timm', timm.__version__)
print('cuda available:', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else '-')
print('fastvit.kernels from', fastvit.kernels.__path__[0], '| fastvit.ops exports', sorted(n for n in dir(ops) if not n.startswith('_')))" 2>&1
} | tee "$RESULTS/environment.txt"

if [ "$TEST_BUDGET" -gt 0 ]; then
    echo "== tests on the GPU (budget ${TEST_BUDGET}s)"
    # The tests run on the pre-tuned tiles (tests/conftest.py sets FASTVIT_AUTOTUNE=0 on a GPU); the benchmarks
    # below run the autotuned path, each checking its result against a reference. The first run compiles
    # every kernel variant cold (~1000 compiles): tests spread over 8 workers one by one (--dist load, not by
    # file), 3 fuzz examples per op, and without the ahead-of-time compile checks (test_compile, test_inspect:
    # no GPU needed; CI runs them, and they were run with this machine's triton 3.6 on a CPU).
    FASTVIT_FUZZ_EXAMPLES=3 timeout --signal=INT --kill-after=20 "$TEST_BUDGET" "$PYTHON" -m pytest "$REPO/tests" -q -n 8 \
        --dist load --ignore="$REPO/tests/test_compile.py" --ignore="$REPO/tests/test_inspect.py" -p no:cacheprovider \
        --junitxml="$RESULTS/tests.xml" >"$RESULTS/tests.log" 2>&1
    TESTS_RC=$?
    tail -n 25 "$RESULTS/tests.log"
else  # FASTVIT_TEST_BUDGET=0: the benchmarks only (e.g. a second call while the machine is still warm)
    echo "tests skipped: FASTVIT_TEST_BUDGET=0" | tee "$RESULTS/tests.log"
    TESTS_RC=0
fi

# The GEMM tuner also times TMA loads (sm_90). A kernel fault would end the benchmark process's CUDA
# context, so if the tests' TMA parity (test_linear.py's tests with "tma_operand_loads" in their names:
# every TMA candidate, dtype and layout, and under autocast) did not pass, the benchmarks leave TMA out,
# unless FASTVIT_TMA is set by the caller (a benchmarks-only rerun after a run whose TMA tests passed).
TMA_TESTS="$("$PYTHON" - "$RESULTS/tests.xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
cases = [c for c in ET.parse(sys.argv[1]).iter("testcase") if "tma_operand_loads" in c.get("name", "")]
failed = any(child.tag in ("failure", "error") for c in cases for child in c)
ran = [c for c in cases if not any(child.tag == "skipped" for child in c)]
print("not passed" if failed else "passed" if ran else "skipped (no sm_90)" if cases else "not run")
PY
)"
if [ "$TMA_TESTS" != "passed" ] && [ -z "${FASTVIT_TMA:-}" ]; then
    export FASTVIT_TMA=0
    echo "TMA parity tests: ${TMA_TESTS:-no result}: the benchmarks run without TMA candidates (FASTVIT_TMA=0)" | tee "$RESULTS/tma.txt"
fi

echo "== benchmarks (budget ${BENCH_BUDGET}s of started benchmarks)"
timeout --signal=INT --kill-after=20 $((BENCH_BUDGET + 90)) "$PYTHON" -m pytest "$REPO/benchmarks" -q -p no:cacheprovider \
    --bench-budget "$BENCH_BUDGET" --benchmark-json="$RESULTS/bench.json" --benchmark-columns=median,rounds,iterations \
    ${BENCH_ARGS:-} >"$RESULTS/bench.log" 2>&1
BENCH_RC=$?
tail -n 15 "$RESULTS/bench.log"

REPORT_INPUTS=()
for f in "$RESULTS/bench.json" "$REPO"/benchmarks/results/counts-*.json; do [ -f "$f" ] && REPORT_INPUTS+=("$f"); done
if [ -f "$RESULTS/bench.json" ]; then
    "$PYTHON" "$REPO/benchmarks/report.py" "${REPORT_INPUTS[@]}" --markdown "$RESULTS/report.md" --plot "$RESULTS/throughput.png"
fi

summary() {
    echo "results: $RESULTS ($((SECONDS - START)) s)"
    echo "tests:      exit $TESTS_RC  $(grep -E ' in [0-9.]+s|no tests ran' "$RESULTS/tests.log" | tail -n 1)"
    echo "benchmarks: exit $BENCH_RC  $(grep -E ' in [0-9.]+s|no tests ran' "$RESULTS/bench.log" | tail -n 1)"
    [ -f "$RESULTS/tma.txt" ] && cat "$RESULTS/tma.txt"
    [ -f "$RESULTS/bench.json" ] && "$PYTHON" "$REPO/benchmarks/report.py" "$RESULTS/bench.json" --short
}
summary | tee "$RESULTS/summary.txt"

if [ -n "${OUT:-}" ] && [ "$RESULTS" != "$(cd "$OUT" && pwd)" ]; then
    for f in summary.txt environment.txt tests.log tests.xml tma.txt bench.log bench.json report.md throughput.png; do
        [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
    done
fi
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
