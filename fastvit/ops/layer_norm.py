"""fastvit.ops.layer_norm: LayerNorm over the last dimension on the Triton kernel (kernels/layer_norm.py).

Saved for backward: x (by reference, no copy), weight, and fp32 mean / rstd (8 bytes per row): the
same as eager PyTorch's native layer norm.

Autocast: like torch's layer_norm, which autocast runs in fp32, the output is fp32 under autocast; the
kernel reads x and the parameters in their own dtypes, so nothing is cast or copied first.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.backend import use_triton
from fastvit.kernels.layer_norm import MAX_D, layer_norm_backward, layer_norm_forward

from ._common import (autocast_dtype, autocast_off, check_positive, check_same_device, check_same_dtype, check_shape,
                      check_tensor, contiguous_vector, or_empty, rows_view)  # fmt: skip


@torch.library.custom_op("fastvit::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, D) for x (..., D) flattened to M rows, fp32 mean, rstd (M,)); the caller restores x's leading
    dims: a view made here would make y a view of a custom op's output, which autograd forbids modifying in
    place."""
    return layer_norm_forward(rows_view(x), weight, bias, eps, out_dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty((rows, x.shape[-1]), dtype=out_dtype), stats, stats.clone()


@torch.library.custom_op("fastvit::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    compute_dweight: bool, compute_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = layer_norm_backward(
        rows_view(dy), rows_view(x), weight, mean, rstd, compute_dweight, compute_dbias
    )
    return dx.view(x.shape), or_empty(dweight, x), or_empty(dbias, x)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, compute_dweight, compute_dbias):
    D = x.shape[-1]
    param_dtype = weight.dtype if weight is not None else torch.float32
    dweight = x.new_empty((D if compute_dweight else 0,), dtype=param_dtype if compute_dweight else x.dtype)
    dbias = x.new_empty((D if compute_dbias else 0,), dtype=param_dtype if compute_dbias else x.dtype)
    return x.new_empty(x.shape), dweight, dbias  # contiguous, as the kernel's dx is, whatever x's strides


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    compute_dweight = bool(need_dw and weight is not None)
    compute_dbias = bool(need_db and ctx.has_bias)
    dx, dweight, dbias = _layer_norm_bwd(dy, x, weight, mean, rstd, compute_dweight, compute_dbias)
    return (dx if need_dx else None), (dweight if compute_dweight else None), (dbias if compute_dbias else None), None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def validate_layer_norm(x, weight, bias, eps, *, name="x"):
    """Checks shared by layer_norm and the fused layer_norm_linear; returns D."""
    check_tensor(name, x, min_ndim=1)
    check_tensor("weight", weight, ndim=1, optional=True)
    check_tensor("bias", bias, ndim=1, optional=True)
    D = x.shape[-1]
    check_shape("weight", weight, (D,))
    check_shape("bias", bias, (D,))
    check_same_device(**{name: x, "weight": weight, "bias": bias})
    check_positive("eps", eps)
    if D < 1 or D > MAX_D:
        raise ValueError(f"{name}: the normalised (last) dim must be in 1..{MAX_D}, got shape {tuple(x.shape)}")
    return D


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-6):
    """LayerNorm over the last dim of x (..., D) with weight, bias (D,) or None. Returns (..., D).

    Outside autocast x, weight and bias must share a dtype (fp32 / fp16 / bf16) and the output has it;
    under autocast the output is fp32, as torch.nn.functional.layer_norm's is.
    """
    D = validate_layer_norm(x, weight, bias, eps)
    cast_to = autocast_dtype(x.device)
    if cast_to is None:
        check_same_dtype(x=x, weight=weight, bias=bias)
    if not use_triton(x.device, x, weight, bias):
        with autocast_off(x.device):
            if cast_to is not None:
                x, weight, bias = (t.float() if t is not None else None for t in (x, weight, bias))
            return F.layer_norm(x, (D,), weight, bias, eps)
    out_dtype = torch.float32 if cast_to is not None else x.dtype
    weight, bias = contiguous_vector(weight), contiguous_vector(bias)
    return _layer_norm_fwd(x, weight, bias, float(eps), out_dtype)[0].view(x.shape)
