"""Library of the benchmarks (imported by conftest.py and every test_bench_*.py): GPU timing, the
roofline figures recorded with each result, and launch / byte counting without a GPU.

See conftest.py for how a benchmark is timed and what runs on a machine without a GPU.
"""
import contextlib
import dataclasses
import itertools
import math
import os
import platform
import time

import pytest
import torch

from fastvit.launches import LaunchCounter, distinct_tensor_bytes

HAS_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
NO_GPU_REASON = "no CUDA GPU (or TRITON_INTERPRET=1): GPU timings skipped; interpreter time is not performance"
COUNTS = []  # launch / byte count rows, written to the results JSON at the end of the session

# `pytest benchmarks/ --rehearse` (conftest.py calls rehearse() before the benchmark modules are imported):
# every GPU benchmark's code runs once on the CPU at toy sizes through the Triton interpreter, so a
# mistake in it shows before GPU time is spent. Its times are not performance and are never reported as such.
REHEARSAL = False
DEVICE = "cuda"  # where the GPU benchmarks put their tensors: "cpu" in a rehearsal


def rehearse():
    global REHEARSAL, DEVICE
    REHEARSAL, DEVICE = True, "cpu"


def at_scale(full, rehearsal):
    """A benchmark's size: `full` on a GPU, `rehearsal` (toy-sized) under --rehearse."""
    return rehearsal if REHEARSAL else full


def synchronized_timer():
    """pytest-benchmark's clock: wait for the GPU first, so each round times finished work."""
    if HAS_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


def environment():
    import triton

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": torch.cuda.get_device_name() if HAS_GPU else
                  f"{cpu} rehearsal through the Triton interpreter: code paths only, not performance" if REHEARSAL else cpu,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def tuning_record():
    """Every tile config the kernels' tuners measured and picked in this process (GEMMs: each
    candidate's time and the pre-tuned default's; attention, patch embed: the autotuned picks), so
    one GPU run also says which defaults to change. Empty without a GPU."""
    from fastvit.kernels import attention, linear, patch_embed

    return linear.tuning_record() + attention.tuning_record() + patch_embed.tuning_record()


def _event_median_ms(fn, reps):
    """Median milliseconds of fn() over `reps` runs, timed with CUDA events after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_matmul_tflops():
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _event_median_ms(lambda: a @ b, 10) / 1e9


def measure_copy_gbps():
    src = torch.randn(2**30, device="cuda")  # 4 GiB of fp32
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _event_median_ms(lambda: dst.copy_(src), 10) / 1e6


# ------------------------------------------------------------------------------------ GPU timing


@dataclasses.dataclass
class Work:
    """What one call does, for the roofline numbers: floating-point operations and compulsory bytes."""

    flops: float
    bytes: float


def l2_bytes():
    if REHEARSAL:
        return 0  # one input set
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)


def rotation(make_inputs, bytes_per_set, max_sets=8):
    """Input sets to cycle through: enough that one pass moves > 3x the L2 (so calls are not timed
    from cache), at most max_sets."""
    count = max(1, min(max_sets, math.ceil(3 * l2_bytes() / max(bytes_per_set, 1))))
    return [make_inputs() for _ in range(count)]


def measure(benchmark, fn, input_sets, *, check, work: Work, peaks, group, provider, extra=None, round_ms=1.0, max_rounds=30):
    """Time fn(*inputs) over the rotating input_sets with pytest-benchmark and record the roofline numbers.

    check(output, inputs) raises when the output is wrong; it runs on the first input set before timing.
    Returns the median seconds per call.
    """
    check(fn(*input_sets[0]), input_sets[0])
    benchmark.group = group
    cycle = itertools.cycle(input_sets)
    if REHEARSAL:  # the timed path once, without the GPU's warm-up and round sizing
        benchmark.pedantic(lambda: fn(*next(cycle)), rounds=1, iterations=1)
    else:
        for inputs in input_sets:  # warm-up: compile, autotune, library heuristics
            fn(*inputs)
        estimate_ms = _event_median_ms(lambda: fn(*next(cycle)), 3)
        iterations = max(1, math.ceil(round_ms / max(estimate_ms, 1e-3)))
        rounds = max(3, min(max_rounds, math.ceil(300 / max(estimate_ms * iterations, 1e-3))))
        benchmark.pedantic(lambda: fn(*next(cycle)), rounds=rounds, iterations=iterations, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    tflops, gbps = work.flops / seconds / 1e12, work.bytes / seconds / 1e9
    benchmark.extra_info.update({
        "provider": provider, "median_ms": seconds * 1e3, "flops": work.flops, "bytes": work.bytes,
        "tflops": tflops, "gbps": gbps, "pct_peak_tflops": 100 * tflops / peaks["tflops"],
        "pct_peak_gbps": 100 * gbps / peaks["gbps"], "peak_tflops": peaks["tflops"], "peak_gbps": peaks["gbps"],
        "bound": "compute" if work.flops / max(work.bytes, 1) > peaks["tflops"] * 1e3 / peaks["gbps"] else "memory",
        **environment(), **(extra or {}),
    })  # fmt: skip
    return seconds


def assert_close_rel(actual, expected, rel, name="output"):
    """||actual - expected|| / ||expected|| <= rel, NaN failing (a cheap, whole-tensor check for benchmarks)."""
    actual, expected = actual.float(), expected.float()
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert error == error and error <= rel, f"{name}: relative error {error:.3g} > {rel:g}"


# --------------------------------------------------------------------------- launch / byte counting


@contextlib.contextmanager
def count_triton():
    """Count every Triton kernel launch in the block and the bytes of its tensor arguments (each tensor
    moved once: the compulsory-traffic model), as a dry run: fastvit.launches.count_launches(dry_run=True)
    skips the interpreted programs, so full-size shapes cost nothing. Interpreter only."""
    from fastvit.kernels._helpers import is_interpreter
    from fastvit.launches import count_launches

    if not is_interpreter():
        pytest.skip("counting launches without running them needs the Triton interpreter (CPU runs)")
    with count_launches(dry_run=True) as count:
        yield count


# aten ops that allocate or alias but launch no kernel
_NO_KERNEL_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                  "_local_scalar_dense", "alias", "_unsafe_view"}  # fmt: skip


@contextlib.contextmanager
def count_eager():
    """Count the aten ops eager PyTorch dispatches (one kernel each on a GPU, views and allocations
    excluded) and the bytes of their tensor inputs and outputs. Run the model on the meta device: no
    arithmetic happens, so any size is free. scaled_dot_product_attention is counted as one fused
    kernel (q, k, v in, o out), as it runs on a GPU, instead of its CPU decomposition."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    count = LaunchCounter()  # the same tallies fastvit.count_launches keeps for Triton launches

    def record(name, tensors):
        count.by_kernel[name] += 1
        count.bytes += distinct_tensor_bytes(tensors)

    class FusedSDPA(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k, v = args[:3]
                out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
                record("scaled_dot_product_attention", [q, k, v, out])
                return out
            return func(*args, **(kwargs or {}))

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_KERNEL_OPS:
                record(name, list(torch.utils._pytree.tree_leaves((args, kwargs, out))))
            return out

    with FusedSDPA(), Counting():
        yield count


def record_count(case, provider, count: LaunchCounter, **extra):
    COUNTS.append({"case": case, "provider": provider, "launches": count.launches, "bytes": count.bytes,
                   "by_kernel": dict(count.by_kernel), **extra})  # fmt: skip


def fastvit_op(module, name=None):
    """fastvit.ops.<module>.<name>, or a skip naming what is missing (another engineer may still be
    writing it)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"fastvit.ops.{module}"), name or module)
    except (ImportError, AttributeError) as error:
        pytest.skip(f"fastvit.ops.{module}.{name or module} not available yet: {error}")
