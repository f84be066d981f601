"""The four GEMMs of a ViT-B block at M = 50432 rows (batch 256 x 197 tokens), bf16, each with its fused
prologue / epilogue: fastvit.ops vs the same math in eager PyTorch and under torch.compile (Inductor +
cuBLAS). All four are compute-bound (benchmarks/roofline.py), so TFLOP/s and % of peak are the figures.

Provider "fastvit+stats" is how the model chains them: proj / fc2 also emit their output's LayerNorm
statistics (return_stats=True), and the LN GEMMs take such statistics (x_stats) instead of running their
own statistics pass; "fastvit" is each op called alone.
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
PROVIDERS = ("fastvit", "fastvit+stats", "eager", "torch.compile")


def eager_block_linear(x, weight, bias, ln_weight, ln_bias, residual, activation):
    """The unfused reference: [LayerNorm ->] Linear [-> GELU] [+ residual]."""
    if ln_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, 1e-6)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def fastvit_block_linear(x, weight, bias, ln_weight, ln_bias, residual, activation, x_stats=None, emit_stats=False):
    if ln_weight is not None:
        return fastvit_op("linear", "layer_norm_linear")(x, ln_weight, ln_bias, weight, bias, 1e-6, activation,
                                                         x_stats=x_stats)  # fmt: skip
    out = fastvit_op("linear")(x, weight, bias, activation=activation, residual=residual, return_stats=emit_stats)
    return out[0] if emit_stats else out


def fastvit_chained_linear(*inputs):
    """As the model calls it: an LN GEMM given x's statistics (the last input), a residual GEMM emitting its own."""
    *inputs, x_stats = inputs
    return fastvit_block_linear(*inputs, x_stats=x_stats, emit_stats=x_stats is None)


@functools.cache
def compiled_block_linear():
    return torch.compile(eager_block_linear, dynamic=False)


def _provider(name):
    providers = {"fastvit": fastvit_block_linear, "fastvit+stats": fastvit_chained_linear, "eager": eager_block_linear}
    return providers.get(name) or compiled_block_linear()


def make_inputs(case, device, make=torch.randn, with_stats=False):
    """The op's inputs; with_stats appends x's LayerNorm statistics for an LN case (None otherwise), taken
    the way the model gets them: from a GEMM's epilogue (here x = x I, exact)."""
    K, N, has_ln, activation, has_residual = CASES[case]
    new = functools.partial(make, device=device, dtype=torch.bfloat16)
    x = new(M, K)
    inputs = (x, new(N, K) * K**-0.5, new(N), new(K) if has_ln else None, new(K) if has_ln else None,
              new(M, N) if has_residual else None, activation)  # fmt: skip
    if not with_stats:
        return inputs
    eye = torch.eye(K, device=device, dtype=torch.bfloat16)
    x_stats = fastvit_op("linear")(x, eye, return_stats=True)[1] if has_ln else None
    return (*inputs, x_stats)


def work(case):
    K, N, has_ln, _, has_residual = CASES[case]
    return Work(*roofline.linear(M, K, N, layer_norm=has_ln, residual=has_residual))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_linear(benchmark, gpu, peaks, case, provider):
    def check(out, inputs):
        ref = eager_block_linear(*(t.float() if isinstance(t, torch.Tensor) else t for t in inputs[:7]))
        assert_close_rel(out, ref, 1e-2, case)

    sets = rotation(lambda: make_inputs(case, "cuda", with_stats=provider == "fastvit+stats"), work(case).bytes)
    measure(benchmark, _provider(provider), sets, check=check, work=work(case), peaks=peaks,
            group=f"linear {case} M={M} bf16", provider=provider, extra={"case": case, "M": M, "dtype": "bf16"})  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_linear_launches_and_bytes(cpu_only, case):
    """Launches and modelled bytes of each fused GEMM at the benchmark shape (dry run), vs eager."""
    from fastvit.backend import use_backend

    K, N, has_ln, _, _ = CASES[case]
    inputs = make_inputs(case, "cpu", make=torch.empty)
    groups = -(-(K if has_ln else N) // 64)
    x_stats = torch.empty(2, groups, M) if has_ln else None  # a dry run: only the shape matters
    with use_backend("triton"), count_triton() as ours:
        fastvit_block_linear(*inputs)
    with use_backend("triton"), count_triton() as chained:
        fastvit_chained_linear(*inputs, x_stats)
    meta_inputs = make_inputs(case, "meta", make=torch.empty)
    with count_eager() as eager:
        eager_block_linear(*meta_inputs)
    record_count(f"linear {case} M={M} bf16", "fastvit", ours)
    record_count(f"linear {case} M={M} bf16", "fastvit+stats", chained)
    record_count(f"linear {case} M={M} bf16", "torch eager", eager)
    # alone: the GEMM, plus for a LayerNorm prologue a per-row statistics pass that reads x once more
    assert ours.launches <= 1 + has_ln, ours.by_kernel
    allowed = work(case).bytes + has_ln * (M * K * 2 + 8 * M)
    assert ours.bytes <= 1.02 * allowed, f"{ours.bytes} B moved vs {allowed} B modelled"
    # chained: one launch; the statistics handed on are 8 bytes per row per 64 columns
    assert chained.launches == 1, chained.by_kernel
    assert chained.bytes <= 1.02 * (work(case).bytes + 8 * M * groups + 8 * M * has_ln), chained.bytes
