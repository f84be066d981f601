"""Multi-head attention (B, H, N, d) bf16: fastvit's flash kernel vs SDPA's flash backend and eager
softmax(q k^T) v, at ViT-B/16 224 (256,12,197,64), ViT-L/16 384-ish (64,16,577,64) and a head dim of 80
(256,16,257,80). At N=197, d=64 attention is memory-bound (98 FLOP/B), so GB/s matters as much as TFLOP/s.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import roofline
from benchlib import (DEVICE, Work, assert_close_rel, at_scale, count_eager, count_triton, fastvit_op, measure,
                      record_count, rotation)  # fmt: skip

SHAPES = at_scale([(256, 12, 197, 64), (64, 16, 577, 64), (256, 16, 257, 80)],
                  [(2, 2, 17, 64), (1, 2, 33, 64), (2, 2, 17, 80)])
PROVIDERS = ("fastvit", "sdpa-flash", "eager")


def eager_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N): what fusing avoids
    return scores.softmax(-1) @ v


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _provider(name):
    return {"fastvit": lambda: fastvit_op("attention"), "sdpa-flash": lambda: sdpa_flash, "eager": lambda: eager_attention}[name]()


def _cases():
    for shape in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            marks = [pytest.mark.full_only] if mode == "fwd+bwd" and shape != SHAPES[0] else []
            yield pytest.param(shape, mode, marks=marks, id=f"{'x'.join(map(str, shape))}-{mode}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape, mode", list(_cases()))
def test_attention(benchmark, gpu, peaks, shape, mode, provider):
    attention = _provider(provider)
    backward = mode == "fwd+bwd"

    def make_inputs():
        q, k, v, do = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
        return tuple(t.requires_grad_(backward) for t in (q, k, v)) + (do,)

    def run(q, k, v, do):
        o = attention(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do) if backward else o

    def check(out, inputs):
        q, k, v = (t.detach().float().requires_grad_() for t in inputs[:3])
        ref = eager_attention(q, k, v)
        if not backward:
            return assert_close_rel(out, ref, 1e-2, "o")
        for name, got, want in zip(("dq", "dk", "dv"), out, torch.autograd.grad(ref, (q, k, v), inputs[3].float())):
            assert_close_rel(got, want, 3e-2, name)

    B, H, N, d = shape
    sets = rotation(make_inputs, 4 * B * H * N * d * 2)
    measure(benchmark, run, sets, check=check, work=Work(*roofline.attention(*shape, backward=backward)), peaks=peaks,
            group=f"attention {mode} {shape} bf16", provider=provider,
            extra={"shape": list(shape), "dtype": "bf16", "mode": mode})  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_launches_and_bytes(cpu_only, shape):
    """One launch per forward and no (B, H, N, N) tensor in memory, at the benchmark shapes (dry run)."""
    from fastvit.backend import use_backend

    attention = fastvit_op("attention")
    q, k, v = (torch.empty(shape, dtype=torch.bfloat16) for _ in range(3))
    with use_backend("triton"), count_triton() as ours:
        attention(q, k, v)
    q, k, v = (t.to("meta") for t in (q, k, v))
    with count_eager() as eager:
        eager_attention(q, k, v)
    case = f"attention fwd {shape} bf16"
    record_count(case, "fastvit", ours)
    record_count(case, "torch eager", eager)
    assert ours.launches == 1, ours.by_kernel
    modelled = roofline.attention(*shape)[1]
    assert ours.bytes <= 1.02 * modelled, f"{ours.bytes} B moved vs {modelled} B modelled: a (B,H,N,N) tensor?"
