"""Test harness: Triton interpreter on machines without a GPU, a faster interpreter launch, poisoned
kernel outputs, a per-dtype tolerance table and a verbose comparison.

The interpreter must be switched on before triton is first imported, so this runs at conftest import,
before any test module imports fastvit.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    # The pre-tuned tiles: autotuning would compile and time several tiles per test shape (minutes), count
    # its trial launches in the launch-count tests, and tune eager runs differently from CUDA-graph
    # captures that the bitwise graph tests compare with. The GEMM tuner's own test fakes its timings.
    os.environ.setdefault("FASTVIT_AUTOTUNE", "0")
    # The references are IEEE fp32, as the kernels are (kernels/_helpers.dot_precision): cuDNN's default
    # TF32 convolutions (timm's patch embedding, the torch backend's) would miss fp32 tolerances by 5-10x.
    torch.backends.cudnn.allow_tf32 = False

from fastvit.kernels import _helpers  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = _helpers.is_interpreter()
_helpers.POISON_OUTPUTS = True


def _patch_language_once_per_launch():
    """Triton's interpreter re-patches triton.language (a walk over every builtin) at each call of a
    nested @triton.jit helper: ~40 % of an interpreted model step. Patching once per launch for each
    module the helpers live in reaches the same state (results are bitwise the same; checked on the
    training test). Leaves an interpreter without these internals as it is."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "GridExecutor") or not hasattr(interpreter.InterpretedFunction, "rewrite"):
        return
    function, grid = interpreter.InterpretedFunction, interpreter.GridExecutor
    original_call, original_launch = function.__call__, grid.__call__
    patched = set()  # ids of the module globals whose language this launch has patched

    def launch(self, *args, **kwargs):
        patched.clear()
        patched.add(id(self.fn.__globals__))
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            patched.clear()

    def call(self, *args, **kwargs):  # a nested helper: InterpretedFunction.__call__ minus the re-patching
        if id(self.fn.__globals__) not in patched:
            patched.add(id(self.fn.__globals__))
            return original_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    function.__call__, grid.__call__ = call, launch


if INTERPRETED:  # (the interpreter's bf16 tl.dot is fixed by fastvit.kernels._helpers itself, at import)
    import threadpoolctl

    _patch_language_once_per_launch()
    # The interpreter's tl.dot is a numpy matmul of one small tile: single-threaded BLAS runs it in ~10 us,
    # multi-threaded OpenBLAS on a busy 2-core machine in ~1 ms (its spinning threads slow the rest too).
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")

# Per output dtype: (atol, rtol) for a kernel result against an fp32/fp64 reference. Gradients that
# reduce over many rows use `grad_tolerance`, which scales atol with the reduction length.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol


def assert_close(actual, expected, *, dtype=None, atol=None, rtol=None, name="tensor"):
    """Elementwise comparison that reports max / mean error and the first offending index.

    `expected` is usually an fp32/fp64 reference; tolerances come from TOLERANCES[dtype] unless given.
    NaN anywhere in `actual` fails (the poisoned-output check relies on it).
    """
    dtype = dtype or actual.dtype
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so NaN counts as bad
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{a.numel()} elements off; max err {err.nan_to_num(float('inf')).max():.3g}, "
            f"mean err {err.nan_to_num(float('inf')).mean():.3g} (atol {atol:g}, rtol {rtol:g}); "
            f"first at {first}: got {a[first].item():.6g}, expected {e[first].item():.6g}"
        )


def assert_error_within(actual, eager, reference, *, factor=2.0, atol=0.0, name="tensor"):
    """The flash-attention rule: |ours - ref| <= factor * |eager - ref| + atol, in the max norm.

    `eager` is plain PyTorch in the same low precision as `actual`; `reference` is fp32/fp64.
    """
    ref = reference.detach().double().cpu()
    ours = (actual.detach().double().cpu() - ref).abs().max().item()
    theirs = (eager.detach().double().cpu() - ref).abs().max().item()
    assert ours == ours, f"{name}: NaN in result"
    assert ours <= factor * theirs + atol, (
        f"{name}: max error {ours:.3g} vs reference exceeds {factor} x eager's {theirs:.3g} + {atol:g}"
    )


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
