"""The four GEMMs of a ViT-B block at M = 50432 rows (batch 256 x 197 tokens), bf16, each with its fused
prologue / epilogue: fastvit.ops vs the same math in eager PyTorch and under torch.compile (Inductor +
cuBLAS). All four are compute-bound (benchmarks/roofline.py), so TFLOP/s and % of peak are the figures.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import roofline
from benchlib import Work, assert_close_rel, count_eager, count_triton, fastvit_op, measure, record_count, rotation

M, D = 50432, 768
# case -> (K, N, layer norm prologue, activation, residual epilogue)
CASES = {
    "ln_qkv": (D, 3 * D, True, None, False),
    "proj_residual": (D, D, False, None, True),
    "ln_fc1_gelu": (D, 4 * D, True, "gelu", False),
    "fc2_residual": (4 * D, D, False, None, True),
}
PROVIDERS = ("fastvit", "eager", "torch.compile")


def eager_block_linear(x, weight, bias, ln_weight, ln_bias, residual, activation):
    """The unfused reference: [LayerNorm ->] Linear [-> GELU] [+ residual]."""
    if ln_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, 1e-6)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def fastvit_block_linear(x, weight, bias, ln_weight, ln_bias, residual, activation):
    if ln_weight is not None:
        return fastvit_op("linear", "layer_norm_linear")(x, ln_weight, ln_bias, weight, bias, 1e-6, activation)
    return fastvit_op("linear")(x, weight, bias, activation=activation, residual=residual)


@functools.cache
def compiled_block_linear():
    return torch.compile(eager_block_linear, dynamic=False)


def _provider(name):
    return {"fastvit": fastvit_block_linear, "eager": eager_block_linear}.get(name) or compiled_block_linear()


def make_inputs(case, device, make=torch.randn):
    K, N, has_ln, activation, has_residual = CASES[case]
    new = functools.partial(make, device=device, dtype=torch.bfloat16)
    return (new(M, K), new(N, K) * K**-0.5, new(N), new(K) if has_ln else None, new(K) if has_ln else None,
            new(M, N) if has_residual else None, activation)  # fmt: skip


def work(case):
    K, N, has_ln, _, has_residual = CASES[case]
    return Work(*roofline.linear(M, K, N, layer_norm=has_ln, residual=has_residual))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_linear(benchmark, gpu, peaks, case, provider):
    def check(out, inputs):
        ref = eager_block_linear(*(t.float() if isinstance(t, torch.Tensor) else t for t in inputs))
        assert_close_rel(out, ref, 1e-2, case)

    sets = rotation(lambda: make_inputs(case, "cuda"), work(case).bytes)
    measure(benchmark, _provider(provider), sets, check=check, work=work(case), peaks=peaks,
            group=f"linear {case} M={M} bf16", provider=provider, extra={"case": case, "M": M, "dtype": "bf16"})  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_linear_launches_and_bytes(cpu_only, case):
    """Launches and modelled bytes of each fused GEMM at the benchmark shape (dry run), vs eager."""
    from fastvit.backend import use_backend

    inputs = make_inputs(case, "cpu", make=torch.empty)
    with use_backend("triton"), count_triton() as ours:
        fastvit_block_linear(*inputs)
    meta_inputs = make_inputs(case, "meta", make=torch.empty)
    with count_eager() as eager:
        eager_block_linear(*meta_inputs)
    record_count(f"linear {case} M={M} bf16", "fastvit", ours)
    record_count(f"linear {case} M={M} bf16", "torch eager", eager)
    K, _, has_ln, _, _ = CASES[case]
    # the GEMM, plus for a LayerNorm prologue a per-row statistics pass that reads x once more
    assert ours.launches <= 1 + has_ln, ours.by_kernel
    allowed = work(case).bytes + has_ln * (M * K * 2 + 8 * M)
    assert ours.bytes <= 1.02 * allowed, f"{ours.bytes} B moved vs {allowed} B modelled"
