"""LayerNorm 50432x768 bf16 (ViT-B at batch 256), forward and forward+backward: fastvit vs F.layer_norm.

Memory-bound: the roofline is bytes / bandwidth (benchmarks/roofline.py), so GB/s and % of peak
bandwidth are the figures that matter.
"""
import pytest
import torch
import torch.nn.functional as F

import roofline
from benchlib import (DEVICE, Work, assert_close_rel, at_scale, count_eager, count_triton, fastvit_op, measure,
                      record_count, rotation)  # fmt: skip

M, D = at_scale((50432, 768), (100, 64))
PROVIDERS = ("fastvit", "torch")


def _inputs(device, requires_grad):
    x = torch.randn(M, D, device=device, dtype=torch.bfloat16).mul_(2).add_(3).requires_grad_(requires_grad)
    w = torch.randn(D, device=device, dtype=torch.bfloat16).requires_grad_(requires_grad)
    b = torch.randn(D, device=device, dtype=torch.bfloat16).requires_grad_(requires_grad)
    dy = torch.randn(M, D, device=device, dtype=torch.bfloat16)
    return x, w, b, dy


def _forward(provider):
    return fastvit_op("layer_norm") if provider == "fastvit" else (lambda x, w, b, eps: F.layer_norm(x, (D,), w, b, eps))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_layer_norm(benchmark, gpu, peaks, provider, mode):
    forward = _forward(provider)
    backward = mode == "fwd+bwd"

    def run(x, w, b, dy):
        y = forward(x, w, b, 1e-6)
        if backward:
            return torch.autograd.grad(y, (x, w, b), dy)
        return y

    def check(out, inputs):
        x, w, b = (t.detach().float().requires_grad_() for t in inputs[:3])
        dy = inputs[3].float()
        ref = F.layer_norm(x, (D,), w, b, 1e-6)
        if not backward:
            return assert_close_rel(out, ref, 1e-2, "y")
        for name, got, want in zip(("dx", "dw", "db"), out, torch.autograd.grad(ref, (x, w, b), dy)):
            assert_close_rel(got, want, 2e-2, name)

    sets = rotation(lambda: _inputs(DEVICE, backward), M * D * 2 * (3 if backward else 2))
    work = Work(*roofline.layer_norm(M, D, backward=backward))
    measure(benchmark, run, sets, check=check, work=work, peaks=peaks, group=f"layer_norm {mode} {M}x{D} bf16",
            provider=provider, extra={"shape": [M, D], "dtype": "bf16", "mode": mode})  # fmt: skip


def test_layer_norm_launches_and_bytes(cpu_only):
    """Launches and modelled bytes of one forward at the benchmark shape, counted without a GPU."""
    from fastvit.backend import use_backend

    layer_norm = fastvit_op("layer_norm")
    x = torch.empty(M, D, dtype=torch.bfloat16)
    w, b = torch.empty(D, dtype=torch.bfloat16), torch.empty(D, dtype=torch.bfloat16)
    with use_backend("triton"), count_triton() as ours:
        layer_norm(x, w, b, 1e-6)
    x, w, b = (t.to("meta") for t in (x, w, b))
    with count_eager() as eager:
        F.layer_norm(x, (D,), w, b, 1e-6)
    record_count(f"layer_norm fwd {M}x{D} bf16", "fastvit", ours)
    record_count(f"layer_norm fwd {M}x{D} bf16", "torch eager", eager)
    assert ours.launches == 1
    modelled = roofline.layer_norm(M, D)[1]
    assert abs(ours.bytes - modelled) <= 0.01 * modelled, (ours.bytes, modelled)
