"""Shared helpers for the Triton kernels: interpreter detection, launch context, output allocation, the
dot-precision policy, tuning (when to measure, concurrent compiles of the candidates, autotuned launches
and their picks) and KernelConfig, the ahead-of-time compile description.

Nothing here imports fastvit: the dependency arrow is fastvit/ -> kernels/ -> triton.
"""
import contextlib
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

# Tests flip this on so every output buffer a launcher allocates starts as NaN: a kernel that forgets
# to write an element then fails its parity test instead of passing on whatever torch.empty returned.
POISON_OUTPUTS = False


# Triton decides at @triton.jit time whether a kernel is interpreted, and fastvit's kernels are decorated
# right after this module is imported: the setting that counts is the one seen now, not a later change.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreter() -> bool:
    """True when the kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 was set when fastvit's
    kernels were imported (setting it afterwards changes nothing; the backend then keeps to torch on CPU)."""
    return _INTERPRETED


def _fix_interpreter_bf16_dot():
    """Triton's CPU interpreter multiplies bf16 tl.dot operands as raw uint16 bit patterns (triton#11584,
    still so in triton 3.6 and 3.8), so every bf16 GEMM and attention would return garbage on the
    interpreted CPU path. Upcast bf16 operands to fp32 (exact) before its numpy matmul; every other dtype
    goes to the original. Installed once, at import, only under the interpreter; an interpreter without
    this internal hook is left as it is."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_fastvit_bf16_fix", False):
        return
    import numpy as np
    import triton.language as tl

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fastvit_bf16_fix = True
    builder.create_dot = create_dot


if is_interpreter():
    _fix_interpreter_bf16_dot()


def may_measure() -> bool:
    """Whether a CUDA launcher may time candidate tile configs now (autotuning): not while a CUDA graph is
    being captured (timing synchronises the device, which capture forbids) and not with FASTVIT_AUTOTUNE=0;
    the launchers then run the pick measured earlier for the same launch, else their pre-tuned default.
    Only for CUDA launches: the interpreter never measures."""
    return os.environ.get("FASTVIT_AUTOTUNE", "1") != "0" and not torch.cuda.is_current_stream_capturing()


# what makes a tuner skip a candidate tile, as triton.autotune does
COMPILE_FAILURES = (OutOfResources, PTXASError, CompileTimeAssertionFailure)


def compile_concurrently(warm_ups) -> None:
    """Call each compile-only function of `warm_ups` (a JITFunction's or an Autotuner's .warmup) with the
    compiles on a thread pool (triton.AsyncCompileMode: ptxas and much of Triton's compile run outside the
    GIL), so that tuning waits for the candidates' compiles side by side rather than one after another
    (~1-2 s each). A candidate that fails to compile fails again at its timed launch, where the tuner skips
    it. Inside a caller's own AsyncCompileMode (Triton does not nest them) nothing is warmed up: each
    candidate then compiles when it is timed."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool, contextlib.ExitStack() as stack:
        try:
            stack.enter_context(triton.AsyncCompileMode(pool, ignore_errors=True))
        except RuntimeError:  # "Another AsyncCompileMode is already active"
            return
        for warm_up in warm_ups:
            with contextlib.suppress(*COMPILE_FAILURES):
                warm_up()


def launch_autotuned(kernel, grid, args, kwargs, key, picks: dict, default) -> None:
    """Launch a triton.autotune-wrapped kernel on CUDA. Where timing is allowed (may_measure) triton.autotune
    picks, timing its candidates at a key's first call, and the pick is remembered in `picks` under `key`;
    where not (a CUDA-graph capture, FASTVIT_AUTOTUNE=0) the kernel under the autotuner runs with the pick
    remembered for `key`, else with `default` (a triton.Config): a graph captured after a warm-up runs the
    tiles the warm-up ran. A key starts with the kernel's name, for picks_record. A key's first call
    compiles every candidate concurrently before triton.autotune times them."""
    if may_measure():
        if key not in picks:
            compile_concurrently([lambda: kernel.warmup(*args, grid=grid, **kwargs)])
        kernel[grid](*args, **kwargs)
        picks[key] = kernel.best_config
    else:
        kernel.fn[grid](*args, **kwargs, **picks.get(key, default).all_kwargs())


def on_gpu(device: torch.device) -> bool:
    """Whether launches on `device` run on a GPU, so tile and grid choices follow its architecture and SM
    count (torch.cuda's queries); else they are the interpreter's. tests/fake_cuda.py makes it True for
    the CPU tensors it drives down the CUDA path."""
    return device.type == "cuda"


def can_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: compiled on CUDA, interpreted on CPU."""
    if device.type == "cuda":
        return not is_interpreter()
    return device.type == "cpu" and is_interpreter()


def device_context(tensor: torch.Tensor):
    """Launch under the tensor's own CUDA device, so a tensor on cuda:1 never runs on cuda:0's stream."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def new_output(shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled when POISON_OUTPUTS is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands, following torch's own matmul policy.

    fp32 users get IEEE fp32 products unless they opted into TF32 the torch way
    (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision("high")), so fastvit
    matches F.linear in fp32 by default. fp16/bf16 operands ignore this.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def picks_record(picks: dict) -> list:
    """The picks launch_autotuned remembered, one row per launch key ({"kernel": the key's first part,
    "key": the rest as strings, "config": the launch options}), for the benchmarks' tuning record."""
    return [{"kernel": key[0], "key": [str(part) for part in key[1:]], "config": config.all_kwargs()}
            for key, config in picks.items()]  # fmt: skip


TORCH_TO_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One production configuration of a kernel, for ahead-of-time compilation without a GPU.

    Every kernels/<op>.py exposes `compile_configs() -> list[KernelConfig]` listing the configs its
    launchers actually pick for the model's shapes; `python -m fastvit.inspect` and tests/test_compile.py
    compile each one for sm_90 and sm_80 and read registers, spills and SASS.
    """

    kernel: object  # the @triton.jit function
    kind: str  # "rowwise", "gemm", "attention", ...
    label: str  # what the config is for, e.g. "D=768 bf16"
    # runtime argument name -> Triton type string ("*bf16", "*fp32", "i32", "fp32"); an integer known to
    # be a multiple of 16 in production shapes is written "i32:16"
    types: dict
    constexprs: dict  # constexpr argument name -> value (None-pointer arguments are constexpr None)
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (90, 80)  # the compute capabilities whose launchers pick this config
    # the sm_90 loop must keep wgmma groups in flight (fastvit.inspect flags a serialised one as a problem)
    async_wgmma: bool = False

    @property
    def ieee_fp32(self) -> bool:
        """Whether the config's dots are IEEE fp32 (torch's default fp32 matmul precision), which no
        tensor core runs: they go to the FMA units, so HGMMA / HMMA is not expected of them."""
        dot_dtype = self.constexprs.get("DOT_DTYPE", tl.float32)  # (attention has none: its fp32 is fp32 dots)
        return self.constexprs.get("DOT_PRECISION") == "ieee" and dot_dtype == tl.float32

    def signature(self) -> dict:
        """The full `triton.compile` signature: every kernel argument in order, constexprs marked."""
        signature = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                signature[name] = "constexpr"
            elif name in self.types:
                signature[name] = self.types[name].split(":")[0]
            else:
                raise KeyError(f"{self.kernel.__name__} [{self.label}]: no type or constexpr for argument {name!r}")
        return signature

    def attrs(self) -> dict:
        """The divisibility hints the JIT would attach at run time: pointers are 16-byte aligned (torch
        allocations are) and "i32:16" integers are multiples of 16. Without them an ahead-of-time
        compile vectorises nothing and reports spills the real launch never has."""
        attrs = {}
        for index, name in enumerate(self.kernel.arg_names):
            type_ = self.types.get(name, "") if name not in self.constexprs else ""
            if type_.startswith("*") or type_.endswith(":16"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        return attrs
