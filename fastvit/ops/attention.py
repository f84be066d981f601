"""fastvit.ops.attention / qkv_attention: multi-head self-attention on the flash kernel (kernels/attention.py).

    out = dropout(softmax(scale * q k^T)) v          per batch and head, non-causal, scale = d^-0.5 by default

Two entry points:
- attention(q, k, v): q (B, H, Nq, d), k and v (B, H, Nk, d), any strides with a unit last-dim stride
  (anything else is copied once). Returns (B, H, Nq, d).
- qkv_attention(qkv, num_heads): timm's packed (B, N, 3 * H * d) QKV projection. The kernel reads q, k
  and v through the strided view qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4) (no copy) and writes
  the output straight into the (B, N, H * d) layout the projection GEMM reads; the backward writes
  d(qkv) in the packed layout too.

Saved for backward: the inputs (by reference), the output and the fp32 log-sum-exp per query row
(4 bytes per row and head): P is recomputed, never stored. With dropout a 1-element int64 seed tensor is
saved as well and the backward regenerates the same keep-mask from it.

Dropout: `dropout_p` is applied whenever it is > 0, exactly like F.scaled_dot_product_attention; the
calling module passes 0 in eval mode. The seed comes from torch's generator for the device, so
torch.manual_seed makes runs reproducible (the Triton and torch backends draw different masks).

Autocast: like scaled_dot_product_attention, q, k, v (or qkv) are cast to the autocast dtype and the
output has it. Outside autocast q, k, v must share one dtype (fp32 / fp16 / bf16); fp32 dots are IEEE
unless torch's fp32 matmul precision allows TF32 (kernels/_helpers.dot_precision).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.backend import use_triton
from fastvit.kernels._helpers import new_output
from fastvit.kernels.attention import MAX_HEAD_DIM, attention_backward, attention_forward

from ._common import (autocast_dtype, autocast_off, check_int, check_probability, check_real, check_same_device,
                      check_same_dtype, check_tensor, describe)  # fmt: skip


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels need stride 1 on the last dim (any other strides are fine); copy only when it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_seed(device: torch.device) -> torch.Tensor:
    """A 1-element int64 seed for the kernel's counter-based dropout, drawn from torch's generator."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------------
# (B, H, N, d) layout
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvit::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor], scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, dropout_p, seed)


@_attention_fwd.register_fake
def _(q, k, v, seed, scale, dropout_p):
    B, H, N, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    seed: Optional[torch.Tensor], scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(_unit_last_stride(do), q, k, v, o, lse, scale, dropout_p, seed)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, seed, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, seed, scale, dropout_p = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, seed, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------------------------------
# packed (B, N, 3 * H * d) layout
# ---------------------------------------------------------------------------------------------------


def _split_qkv(qkv: torch.Tensor, num_heads: int):
    """q, k, v as strided (B, H, N, d) views of the packed (B, N, 3 * H * d) tensor (timm's reshape)."""
    B, N, C = qkv.shape
    return qkv.view(B, N, 3, num_heads, C // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("fastvit::qkv_attention_fwd", mutates_args=())
def _qkv_attention_fwd(
    qkv: torch.Tensor, seed: Optional[torch.Tensor], num_heads: int, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, C = qkv.shape
    D = C // 3
    q, k, v = _split_qkv(qkv, num_heads)
    out = new_output((B, N, D), qkv.dtype, qkv.device)
    _, lse = attention_forward(
        q, k, v, scale, dropout_p, seed, out=out.view(B, N, num_heads, D // num_heads).transpose(1, 2)
    )
    return out, lse


@_qkv_attention_fwd.register_fake
def _(qkv, seed, num_heads, scale, dropout_p):
    B, N, C = qkv.shape
    return qkv.new_empty((B, N, C // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("fastvit::qkv_attention_bwd", mutates_args=())
def _qkv_attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, seed: Optional[torch.Tensor],
    num_heads: int, scale: float, dropout_p: float,
) -> torch.Tensor:
    B, N, C = qkv.shape
    head_dim = C // (3 * num_heads)
    q, k, v = _split_qkv(qkv, num_heads)
    as_heads = lambda t: t.view(B, N, num_heads, head_dim).transpose(1, 2)  # noqa: E731  (B, N, D) -> (B, H, N, d)
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    dq, dk, dv = _split_qkv(dqkv, num_heads)
    attention_backward(
        as_heads(_unit_last_stride(dout).reshape(B, N, C // 3)), q, k, v, as_heads(out), lse, scale, dropout_p, seed,
        dq=dq, dk=dk, dv=dv,
    )
    return dqkv


@_qkv_attention_bwd.register_fake
def _(dout, qkv, out, lse, seed, num_heads, scale, dropout_p):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _qkv_setup_context(ctx, inputs, output):
    qkv, seed, num_heads, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.num_heads, ctx.scale, ctx.dropout_p = num_heads, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _qkv_backward(ctx, dout, _dlse):
    qkv, out, lse, seed = ctx.saved_tensors
    return _qkv_attention_bwd(dout, qkv, out, lse, seed, ctx.num_heads, ctx.scale, ctx.dropout_p), None, None, None, None


_qkv_attention_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------


def _check_head_dim(name, t, head_dim):
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim} ({describe(t)})")


def _check_scalars(scale, dropout_p, head_dim):
    """The softmax scale (default head_dim ** -0.5) and the dropout probability, validated."""
    if scale is None:
        scale = head_dim**-0.5
    scale = check_real("scale", scale, expected="a finite float or None", valid=math.isfinite)
    return scale, check_probability("dropout_p", dropout_p)


def validate_attention(q, k, v, scale, dropout_p):
    """Shape, dtype and device checks for attention(); returns (scale, dropout_p) with defaults filled in."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_device(q=q, k=k, v=v)
    (B, H, _, d), (Bk, Hk, Nk, dk) = q.shape, k.shape
    if (Bk, Hk, dk) != (B, H, d):
        raise ValueError(f"k: expected (B, H, d) = {(B, H, d)} like q, got q {describe(q)} and k {describe(k)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)} (same length Nk), got {describe(v)}")
    if Nk == 0 and q.numel() > 0:
        raise ValueError(f"k: softmax over zero keys is undefined; expected Nk >= 1, got {describe(k)}")
    _check_head_dim("q", q, d)
    return _check_scalars(scale, dropout_p, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, dropout_p: float = 0.0):
    """softmax(scale * q k^T) v per batch and head, with attention dropout when dropout_p > 0.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d); any strides (a non-unit last-dim stride costs one copy).
    Returns (B, H, Nq, d) contiguous, in q's dtype (the autocast dtype under autocast).
    """
    scale, dropout_p = validate_attention(q, k, v, scale, dropout_p)
    cast_to = autocast_dtype(q.device)
    if cast_to is None:
        check_same_dtype(q=q, k=k, v=v)
    else:
        q, k, v = (t.to(cast_to) for t in (q, k, v))
    if not use_triton(q.device, q, k, v):
        with autocast_off(q.device):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    seed = _new_seed(q.device) if dropout_p > 0 else None
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _attention_fwd(q, k, v, seed, scale, dropout_p)[0]


def validate_qkv_attention(qkv, num_heads, scale, dropout_p):
    """Checks for qkv_attention(); returns (num_heads, head_dim, scale, dropout_p) as Python numbers."""
    check_tensor("qkv", qkv, ndim=3)
    num_heads = check_int("num_heads", num_heads, 1)
    C = qkv.shape[-1]
    if C == 0 or C % (3 * num_heads):
        raise ValueError(
            f"qkv: last dim must be 3 * num_heads * head_dim with num_heads={num_heads}, got {describe(qkv)}"
        )
    head_dim = C // (3 * num_heads)
    _check_head_dim("qkv", qkv, head_dim)
    return (num_heads, head_dim, *_check_scalars(scale, dropout_p, head_dim))


def qkv_attention(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None, dropout_p: float = 0.0):
    """Multi-head self-attention on timm's packed QKV projection.

    qkv: (B, N, 3 * D) with D = num_heads * head_dim, laid out as timm's qkv Linear writes it (q, k, v
    blocks, each split into heads). Returns (B, N, D) contiguous: timm's
    `sdpa(q, k, v).transpose(1, 2).reshape(B, N, D)` without the transpose copy.
    """
    num_heads, head_dim, scale, dropout_p = validate_qkv_attention(qkv, num_heads, scale, dropout_p)
    cast_to = autocast_dtype(qkv.device)
    if cast_to is not None:
        qkv = qkv.to(cast_to)
    if not use_triton(qkv.device, qkv):
        B, N, C = qkv.shape
        with autocast_off(qkv.device):
            q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
            return out.transpose(1, 2).reshape(B, N, C // 3)
    seed = _new_seed(qkv.device) if dropout_p > 0 else None
    return _qkv_attention_fwd(_unit_last_stride(qkv), seed, num_heads, scale, dropout_p)[0]
