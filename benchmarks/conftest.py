"""`pytest benchmarks/`: options, fixtures and hooks (the machinery itself is in benchlib.py).

GPU timing. pytest-benchmark's timer is replaced by one that synchronises the device before reading the
clock, so a round measures finished work, not launches. Each benchmark (benchlib.measure):
  1. builds enough input sets to rotate through more than 3x the L2 cache, so no call is timed from L2;
  2. runs once and checks the output against a reference (a fast wrong kernel fails);
  3. warms up on every input set (compiles, autotuning, library heuristics) outside the timing;
  4. times rounds of back-to-back calls (a round lasts >= ~1 ms, so its one synchronisation is
     amortised) and records in extra_info: median time, TFLOP/s, GB/s, % of the device's peak, the
     bound, the GPU's name, torch and triton versions.
The peaks are measured in the same run (a large bf16 matmul and a device-to-device copy) unless given
with --peak-tflops / --peak-gbps (or FASTVIT_PEAK_TFLOPS / FASTVIT_PEAK_GBPS): never another GPU's numbers.

Without a GPU the Triton interpreter is switched on (before triton is imported), GPU timings skip with
the reason, and what is meaningful on a CPU runs: the torch fallback against timm, and the kernel
launches and modelled HBM bytes per call, counted by hooking kernel launches (benchlib.count_triton;
the interpreted programs are not even run, so their time is never mistaken for performance) and, for
eager PyTorch, by counting the aten ops it dispatches on the meta device (benchlib.count_eager).

Rehearsal (--rehearse, no GPU): every GPU benchmark above runs once, at toy sizes, on the CPU through the
Triton interpreter (tiny ViTs of 16 tokens, GEMMs of 100 rows): its setup, its check against the
reference and the timed call, so that an error in a benchmark shows before GPU time is spent on it. The
CI runs it. Nothing it times is performance: no results file is written unless --benchmark-json asks,
and that one names the rehearsal as its device.

Results: the pytest-benchmark JSON goes to benchmarks/results/bench-<device>.json unless
--benchmark-json is given, with a "fastvit" section (environment, peaks, launch / byte counts, and the
tile configs the kernels' tuners measured and picked: benchlib.tuning_record);
`python benchmarks/report.py` renders a markdown table and a PNG plot from it.
"""
import json
import os
import platform
import re
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import benchlib  # noqa: E402  (after the interpreter switch: it may import triton)

RESULTS = Path(__file__).parent / "results"
_state = {"deadline": None, "peaks": {}}


def pytest_addoption(parser):
    group = parser.getgroup("fastvit benchmarks")
    group.addoption("--peak-tflops", type=float, default=_env_float("FASTVIT_PEAK_TFLOPS"),
                    help="dense bf16 peak of this GPU in TFLOP/s (default: measured in this run)")
    group.addoption("--peak-gbps", type=float, default=_env_float("FASTVIT_PEAK_GBPS"),
                    help="memory bandwidth of this GPU in GB/s (default: measured in this run)")
    group.addoption("--bench-full", action="store_true",
                    help="the whole matrix (torch.compile peers at every size, every model trains); default: a quick subset")
    group.addoption("--bench-budget", type=float, default=_env_float("FASTVIT_BENCH_BUDGET"),
                    help="seconds after which GPU benchmarks not yet started skip (results so far are still written)")  # fmt: skip
    group.addoption("--rehearse", action="store_true",
                    help="no GPU: run every GPU benchmark once at toy sizes through the Triton interpreter (not timings)")  # fmt: skip


def _env_float(name):
    value = os.environ.get(name)
    return float(value) if value else None


def _device_slug():
    name = torch.cuda.get_device_name() if benchlib.HAS_GPU else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "full_only: part of the full benchmark matrix (--bench-full) only")
    config.addinivalue_line("markers", "headline: an issue's target comparison: runs first")
    config.option.benchmark_timer = "benchlib.synchronized_timer"  # importable: pytest put benchmarks/ on sys.path
    if config.getoption("--rehearse"):
        if benchlib.HAS_GPU:
            raise pytest.UsageError("--rehearse runs the GPU benchmarks on the CPU through the Triton interpreter; "
                                    "on this GPU machine run them for real (without --rehearse)")  # fmt: skip
        benchlib.rehearse()  # before the benchmark modules are imported: their sizes depend on it
    elif not config.option.benchmark_json:
        RESULTS.mkdir(exist_ok=True)
        config.option.benchmark_json = str(RESULTS / f"bench-{_device_slug()}.json")
    budget = config.getoption("--bench-budget")
    _state["deadline"] = time.monotonic() + budget if budget else None


def pytest_collection_modifyitems(config, items):
    """The issues' target comparisons first (marked headline): the block GEMMs against eager and cuBLAS
    (seconds), then ViT-B/16 at batch 256 against timm and torch.compile(timm) (compiles: minutes); then
    the other whole-model results, then the kernels. A --bench-budget that runs out cuts the least needed.
    Quick mode keeps the expensive cases (marked full_only) out unless --bench-full."""

    def rank(item):
        model = item.path.name == "test_bench_model.py"
        return (0 if not model else 1) if item.get_closest_marker("headline") else (2 if model else 3)

    items.sort(key=rank)  # stable: file order within a rank
    if config.getoption("--bench-full"):
        return
    skip = pytest.mark.skip(reason="part of the full matrix only: run with --bench-full")
    for item in items:
        if item.get_closest_marker("full_only"):
            item.add_marker(skip)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastvit"] = {"environment": benchlib.environment(), "peaks": _state["peaks"] or None,
                              "counts": benchlib.COUNTS, "tuning": benchlib.tuning_record()}  # fmt: skip


def pytest_sessionfinish(session):
    """The counts also go to results/counts-<device>.json: pytest-benchmark writes no JSON when every
    timing was skipped (a machine without a GPU running one file)."""
    if benchlib.COUNTS:
        RESULTS.mkdir(exist_ok=True)
        payload = {"environment": benchlib.environment(), "counts": benchlib.COUNTS}
        (RESULTS / f"counts-{_device_slug()}.json").write_text(json.dumps(payload, indent=1))


def pytest_terminal_summary(terminalreporter):
    if benchlib.COUNTS:
        terminalreporter.write_sep("-", "kernel launches and modelled HBM bytes per call (counted on CPU)")
        for row in benchlib.COUNTS:
            kernels = ", ".join(f"{k} x{n}" for k, n in row["by_kernel"].items())
            line = f"{row['case']:<40} {row['provider']:<12} launches {row['launches']:>4}  {row['bytes'] / 1e9:9.3f} GB  {kernels}"
            terminalreporter.write_line(line[:200])


@pytest.fixture(scope="session")
def peaks(request):
    """{'tflops', 'gbps', 'source'} of this GPU: measured now unless given on the command line / env."""
    if benchlib.REHEARSAL:
        return {"tflops": 1.0, "gbps": 1.0, "source": "rehearsal: placeholders, not a device's peaks"}
    if not benchlib.HAS_GPU:
        pytest.skip(benchlib.NO_GPU_REASON)
    if not _state["peaks"]:
        given_tflops, given_gbps = request.config.getoption("--peak-tflops"), request.config.getoption("--peak-gbps")
        _state["peaks"].update(
            tflops=given_tflops or benchlib.measure_matmul_tflops(),
            gbps=given_gbps or benchlib.measure_copy_gbps(),
            source={"tflops": "given" if given_tflops else "measured: 8192^3 bf16 torch.matmul, median of 10",
                    "gbps": "given" if given_gbps else "measured: 4 GiB device-to-device copy, read + write bytes, median of 10"},
        )  # fmt: skip
    return _state["peaks"]


@pytest.fixture
def gpu():
    """Skip GPU timings on machines without one (unless rehearsing), and once the --bench-budget is spent."""
    if not (benchlib.HAS_GPU or benchlib.REHEARSAL):
        pytest.skip(benchlib.NO_GPU_REASON)
    if _state["deadline"] is not None and time.monotonic() > _state["deadline"]:
        pytest.skip("--bench-budget spent: benchmark not started")


@pytest.fixture
def cpu_only():
    """Counts through the CPU interpreter; on a GPU machine triton compiles instead of interpreting."""
    if benchlib.HAS_GPU:
        pytest.skip("launch / byte counts run through the CPU interpreter (see the CPU run of pytest benchmarks/)")
    if benchlib.REHEARSAL:
        pytest.skip("a rehearsal runs the GPU benchmarks only; the counts run in plain `pytest benchmarks/`")
