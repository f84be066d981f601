"""Run fastvit's CUDA-only Python paths on a machine without a GPU: the launchers' tile picks and
autotuning, split-K, the CUDA-graph-capture fallbacks, and Triton's real JIT (argument binding,
specialisation, compiling for sm_90 with ptxas), with each kernel launch recorded instead of run.

    python tests/fake_cuda.py     (TRITON_INTERPRET unset: the kernels must be JIT-compiled, not interpreted)

What is faked, and nothing else: Triton's CUDA driver (device 0 an sm_90 GPU with an H200's shared
memory, device 1 an sm_80 one with an A100's; loading a cubin checks its shared memory and marks it
loaded; a launch checks the grid against CUDA's limits and is recorded), the benchmarker (runs the
candidate twice, returns a made-up time), torch.cuda's device queries (132 SMs, the current device's
capability, a capture flag the scenarios switch), and fastvit's device checks (kernels/_helpers.on_gpu,
fastvit.backend.can_run_on: the tensors stay on the CPU; no kernel ever runs). Results are
garbage; what is checked is that every launch goes through. The interpreter tests never reach this code:
a launcher passing its split-K count to the kernel as a keyword would have failed every GEMM on a GPU,
and only this showed it without one. tests/test_cuda_launch_path.py runs it (checked with triton 3.6 and
3.8, whose internals it patches).

Not checked here: the tensor maps a real launcher encodes from TMA descriptors (cuTensorMapEncodeTiled),
since the recorded launch replaces the launcher; kernels/linear._tma_layout keeps to what they accept.

Prints one JSON object: per scenario, "ok" or the error, the launches it made, the benchmark calls and
the JIT's compiles (each marked when a warm-up asked for it).
"""
import json
import os
import sys
import time
import traceback
import types

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("fake_cuda.py drives the compiled JIT path: run it with TRITON_INTERPRET unset")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.compiler import compiler  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DEVICES = {90: 0, 80: 1}  # arch -> fake device id (Triton caches compiled kernels per device)
SHARED_MEMORY = {90: 232448, 80: 166912}  # bytes a block may opt into: H200, A100
LAUNCHES = []  # (kernel name, grid, num_warps, num_stages, shared memory bytes)
BENCH_CALLS = []
COMPILES = []  # (kernel name, whether a warm-up asked for it): every kernel the JIT did not have in memory
CAPTURING = [False]
ARCH = [90]


def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
    """Runs the candidate twice (its compile and launch are what is checked) and makes each candidate
    faster than the one before: the last one timed wins, so a pick differs from the default (the first)."""
    fn()
    fn()
    BENCH_CALLS.append(len(LAUNCHES))
    ms = 1000.0 - len(BENCH_CALLS)
    return [ms] * len(quantiles) if quantiles else ms


class FakeCudaDriver(CudaDriver):
    """The current device is an ARCH GPU; nothing touches a CUDA library."""

    def __init__(self):
        pass

    def get_current_device(self):
        return DEVICES[ARCH[0]]

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH[0], 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return fake_do_bench


def _load(self):
    """CompiledKernel._init_handles without a GPU: the shared-memory check a real load makes."""
    if self.module is None:
        if self.metadata.shared > SHARED_MEMORY[self.metadata.target.arch]:
            raise OutOfResources(self.metadata.shared, SHARED_MEMORY[self.metadata.target.arch], "shared memory")
        self.module = self.function = "not loaded: fake_cuda"
        self.n_regs, self.n_spills, self.n_max_threads = 0, 0, 1024


def _launcher(self):
    """CompiledKernel.run: record the launch after CUDA's grid limits."""
    self._init_handles()

    def launch(grid_x, grid_y, grid_z, *_):
        if not (1 <= grid_x < 2**31 and 1 <= grid_y <= 65535 and 1 <= grid_z <= 65535):
            raise ValueError(f"{self.name}: grid {(grid_x, grid_y, grid_z)} outside CUDA's limits")
        LAUNCHES.append((self.name, (grid_x, grid_y, grid_z), self.metadata.num_warps, self.metadata.num_stages,
                         self.metadata.shared))  # fmt: skip

    return launch


def _recording_compile(do_compile):
    def compile_and_record(self, key, signature, device, constexprs, options, attrs, warmup):
        COMPILES.append((self.fn.__name__, warmup))
        return do_compile(self, key, signature, device, constexprs, options, attrs, warmup)

    return compile_and_record


def install():
    driver.set_active(FakeCudaDriver())
    JITFunction._do_compile = _recording_compile(JITFunction._do_compile)
    compiler.CompiledKernel._init_handles = _load
    compiler.CompiledKernel.run = property(_launcher)
    triton.testing.do_bench = fake_do_bench
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        multi_processor_count=132, major=ARCH[0] // 10, minor=0, L2_cache_size=60 << 20, name=f"fake sm_{ARCH[0]}")
    torch.cuda.get_device_capability = lambda device=None: (ARCH[0] // 10, 0)
    torch.cuda.current_device = lambda: DEVICES[ARCH[0]]
    torch.cuda.is_current_stream_capturing = lambda: CAPTURING[0]
    import fastvit.backend  # (importing fastvit imports every fastvit.kernels module)

    fastvit.backend.can_run_on = lambda device: True  # CPU tensors take the "CUDA" path
    for module in list(sys.modules.values()):  # and pick GPU tiles and grids
        if module.__name__.startswith("fastvit.kernels.") and hasattr(module, "on_gpu"):
            module.on_gpu = lambda device: True


def scenarios():
    """(name, callable, arch, capturing, FASTVIT_AUTOTUNE), run in order."""
    import fastvit
    from fastvit.kernels import attention, linear, patch_embed

    bf16 = torch.bfloat16

    def gemms_autotuned():
        # a LayerNorm GEMM's tile candidates; a weight gradient whose small grid makes every candidate
        # also try split-K (768 x 768 output over 50432 rows, as ViT-B's proj at batch 256)
        x, w = torch.randn(394, 768, dtype=bf16), torch.randn(768, 768, dtype=bf16)
        ln = torch.randn(768, dtype=bf16)
        linear.linear_forward(x, w, ln, None, None, ln, ln, None, has_ln=True)
        rows = torch.randn(50432, 768, dtype=bf16)
        linear.linear_backward(rows, rows, w, None, None, None, None, None, None, None,
                               needs=(False, True, True, False, False, False))  # fmt: skip
        return linear.tuning_record()

    def attention_autotuned():
        q, k, v = (torch.randn(2, 3, 197, 64, dtype=bf16) for _ in range(3))
        out, lse = attention.attention_forward(q, k, v, 0.125)
        attention.attention_backward(torch.randn_like(q), q, k, v, out, lse, 0.125)
        return attention.tuning_record()

    def attention_and_stem_autotuned():
        attention_autotuned()
        images, weight = torch.randn(2, 3, 64, 64, dtype=bf16), torch.randn(96, 3, 16, 16, dtype=bf16)
        patch_embed.patch_embed_forward(images, weight, None, torch.randn(1, 17, 96, dtype=bf16),
                                        torch.randn(1, 1, 96, dtype=bf16), None, False, bf16)  # fmt: skip
        return attention.tuning_record() + patch_embed.tuning_record()

    def model_train_step(dtype, **kwargs):
        def run():
            model = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2,
                                              num_classes=10, **kwargs).to(dtype)  # fmt: skip
            model(torch.randn(2, 3, 32, 32, dtype=dtype)).float().sum().backward()
            with torch.no_grad():
                model.eval()(torch.randn(3, 3, 32, 32, dtype=dtype))

        return run

    def captured_new_shapes():
        # no tuned pick for these shapes: the launchers must use their defaults, never time anything
        q = torch.randn(1, 2, 50, 64, dtype=bf16)
        attention.attention_forward(q, q, q, 0.125)
        linear.linear_forward(torch.randn(50, 128, dtype=bf16), torch.randn(256, 128, dtype=bf16), None, None,
                              None, None, None, None)  # fmt: skip
        patch_embed.patch_embed_forward(torch.randn(1, 3, 32, 32, dtype=bf16), torch.randn(96, 3, 16, 16, dtype=bf16),
                                        None, torch.randn(1, 4, 96, dtype=bf16), None, None, False, bf16)  # fmt: skip

    def captured_after_warm_up():
        # each warm-up call measures (autotuning) and launches its pick last; the capture must relaunch it
        q = torch.randn(1, 2, 77, 64, dtype=bf16)
        x, w = torch.randn(77, 128, dtype=bf16), torch.randn(256, 128, dtype=bf16)
        images, weight = torch.randn(1, 3, 48, 48, dtype=bf16), torch.randn(96, 3, 16, 16, dtype=bf16)
        calls = (lambda: attention.attention_forward(q, q, q, 0.125),
                 lambda: linear.linear_forward(x, w, None, None, None, None, None, None),
                 lambda: patch_embed.patch_embed_forward(images, weight, None, torch.randn(1, 9, 96, dtype=bf16), None,
                                                         None, False, bf16))  # fmt: skip
        picked, captured = [], []
        for call in calls:
            call()
            picked.append(LAUNCHES[-1][:4])  # kernel, grid, warps, stages
        CAPTURING[0] = True
        try:
            for call in calls:
                call()
                captured.append(LAUNCHES[-1][:4])
        finally:
            CAPTURING[0] = False
        return {"picked": picked, "captured": captured}

    regularised = dict(init_values=0.1, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)
    return [
        ("GEMMs autotuned (LayerNorm prologue; split-K weight gradient)", gemms_autotuned, 90, False, "1"),
        ("attention and patch embed autotuned", attention_and_stem_autotuned, 90, False, "1"),
        ("model train step + eval, bf16, FASTVIT_AUTOTUNE=0", model_train_step(bf16), 90, False, "0"),
        ("model train step + eval, fp32, dropout / drop path / layer scale, FASTVIT_AUTOTUNE=0",
         model_train_step(torch.float32, **regularised), 90, False, "0"),
        ("CUDA-graph capture, untuned shapes", captured_new_shapes, 90, True, "1"),
        ("CUDA-graph capture after a warm-up", captured_after_warm_up, 90, False, "1"),
        ("sm_80: attention autotuned", attention_autotuned, 80, False, "1"),
        ("sm_80: model train step + eval, bf16, FASTVIT_AUTOTUNE=0", model_train_step(bf16), 80, False, "0"),
    ]  # fmt: skip


def main():
    install()
    report = []
    for name, fn, arch, capturing, autotune in scenarios():
        ARCH[0], CAPTURING[0] = arch, capturing
        os.environ["FASTVIT_AUTOTUNE"] = autotune
        launches, bench_calls, compiles, start = len(LAUNCHES), len(BENCH_CALLS), len(COMPILES), time.perf_counter()
        row = {"scenario": name}
        try:
            row["returned"] = fn()
            row["ok"] = True
        except Exception as error:  # reported, not raised: the other scenarios still run
            row["ok"] = False
            row["error"] = "".join(traceback.format_exception(error, limit=-6))
        row.update(arch=arch, launches=LAUNCHES[launches:], bench_calls=len(BENCH_CALLS) - bench_calls,
                   compiles=COMPILES[compiles:], seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        report.append(row)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
