"""fastvit.ops.linear and fastvit.ops.layer_norm_linear: every Linear of the ViT on one fused Triton GEMM
(kernels/linear.py).

    linear(x, W, b, act, residual, ls, p, s)     = residual + s * ls * dropout_p(act(x W^T + b))
    layer_norm_linear(x, lw, lb, W, b, eps, act, p) = dropout_p(act(LN(x; lw, lb, eps) W^T + b))

W keeps nn.Linear's (N, K) layout, so timm weights load unchanged. x may have any leading batch dims and
any row strides (a last dim with stride != 1 is copied once). Every optional piece (bias, activation,
residual, layer scale, dropout, LayerNorm) is a compile-time flag of one kernel, fused into its prologue
(LayerNorm) or epilogue (the rest) while the fp32 accumulator is in registers.

Where the model uses them: LN1 -> QKV + bias is layer_norm_linear; proj (+ bias + residual, optionally
layer scale and dropout) is linear; the MLP branch is fastvit.ops.layer_norm_mlp (ops/mlp.py: these two
ops' GEMMs, with a cheaper backward); the head is layer_norm_linear (or linear after pooling).

LayerNorm statistics hand-off: linear(..., return_stats=True) also returns its output's row statistics
(fp32 (mean, M2) per 64 columns, shape (2, ceil(N / 64), *leading dims), taken in the epilogue), and
layer_norm_linear(x, ..., x_stats=those) combines them instead of launching a statistics pass over x. The
model chains its blocks this way (5 launches per block). The statistics are a cache of a function of x:
they carry no gradient, and the LayerNorm backward is the full one whichever way they were obtained.

Dropout: applied whenever dropout_p > 0 (callers pass 0 in eval). The Triton path draws its keep-mask
from a counter-based generator (tl.rand) seeded by one int64 drawn from torch's generator per call, so
torch.manual_seed makes it reproducible and the backward regenerates the mask instead of storing it; the
torch path uses F.dropout (same distribution, different numbers).

Autocast policy (like F.linear, and like timm under autocast):
- x (for linear), weight, bias and layer_scale are cast to the autocast dtype, which is the compute dtype;
- for layer_norm_linear x is read in its own dtype (the fp32 residual stream stays fp32) and LayerNorm
  runs in fp32 with ln_weight / ln_bias in their own dtypes, as autocast runs F.layer_norm in fp32; the
  normalised tile enters the GEMM in the compute dtype;
- the residual keeps its dtype and the output dtype is torch.promote_types(compute dtype, residual
  dtype): with an fp32 residual stream the block output stays fp32, as timm's does.
Outside autocast every floating argument must share one dtype (fp32 / fp16 / bf16): nothing is cast
behind the user's back. fp32 GEMMs follow torch's matmul precision (IEEE unless TF32 is allowed).

Saved for backward (Triton path), against eager PyTorch for the same sequence of ops:
- x and weight by reference, as eager F.linear does; for layer_norm_linear x plus fp32 mean / rstd
  (8 bytes per row) instead of eager's LN output (M x K) plus stats: the backward recomputes LN(x) for the
  weight gradient, so the fused op saves M x K elements less than eager.
- the pre-activation z = x W^T + b (M x N, compute dtype) only when an activation follows or layer_scale
  needs a gradient: the same tensor eager saves as GELU's / LayerScale's input.
- dropout saves one int64 seed instead of eager's M x N mask; stochastic depth its (batch,) sample_scale.
- residual: nothing (its gradient is the upstream gradient itself).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.backend import use_triton

from ._common import (autocast_dtype, autocast_off, check_bool, check_probability, check_same_device,
                      check_same_dtype, check_shape, check_tensor, contiguous_vector, describe, or_empty, rows_view)  # fmt: skip
from .layer_norm import validate_layer_norm

ACTIVATIONS = (None, "gelu", "gelu_tanh")


@torch.library.custom_op("fastvit::linear_fwd", mutates_args=())
def _linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
    layer_scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], x_stats: Optional[torch.Tensor], sample_scale: Optional[torch.Tensor],
    activation: str, dropout_p: float, eps: float, has_ln: bool, save_preact: bool, emit_stats: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (M, N) and preact for x (..., K) flattened to M rows, stats (2, groups, M): the caller restores x's
    leading dims (a view made here would make y a view of a custom op's output, which autograd forbids
    modifying in place)."""
    from fastvit.kernels.linear import linear_forward

    y, preact, mean, rstd, stats = linear_forward(
        rows_view(x), weight, bias, None if residual is None else rows_view(residual), layer_scale,
        ln_weight, ln_bias, seed, activation=activation, dropout_p=dropout_p, eps=eps, has_ln=has_ln,
        save_preact=save_preact, out_dtype=out_dtype, emit_stats=emit_stats,
        x_stats=None if x_stats is None else x_stats.reshape(2, x_stats.shape[1], -1), sample_scale=sample_scale,
    )
    return y, or_empty(preact, x), or_empty(mean, x), or_empty(rstd, x), or_empty(stats, x)


@_linear_fwd.register_fake
def _(x, weight, bias, residual, layer_scale, ln_weight, ln_bias, seed, x_stats, sample_scale, activation, dropout_p,
      eps, has_ln, save_preact, emit_stats, out_dtype):
    from fastvit.kernels.linear import stats_groups

    rows, N = x.numel() // x.shape[-1], weight.shape[0]
    preact = x.new_empty((rows, N), dtype=weight.dtype) if save_preact else x.new_empty((0,))
    row_stats = x.new_empty((rows if has_ln else 0,), dtype=torch.float32 if has_ln else x.dtype)
    stats = x.new_empty((2, stats_groups(N), rows) if emit_stats else (0,), dtype=torch.float32 if emit_stats else x.dtype)
    return x.new_empty((rows, N), dtype=out_dtype), preact, row_stats, row_stats.clone(), stats


@torch.library.custom_op("fastvit::linear_bwd", mutates_args=())
def _linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    layer_scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, seed: Optional[torch.Tensor], sample_scale: Optional[torch.Tensor],
    activation: str, dropout_p: float, has_ln: bool, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """needs = which of (dx, dweight, dbias, dlayer_scale, dln_weight, dln_bias) to compute."""
    from fastvit.kernels.linear import linear_backward

    grads = linear_backward(
        rows_view(dy), rows_view(x), weight, preact if preact.numel() else None, layer_scale,
        ln_weight, ln_bias, mean if has_ln else None, rstd if has_ln else None, seed,
        activation=activation, dropout_p=dropout_p, needs=tuple(needs), sample_scale=sample_scale,
    )
    dx = grads[0]
    grads = (dx.view(x.shape) if dx is not None else None, *grads[1:])
    return tuple(or_empty(g, x) for g in grads)


@_linear_bwd.register_fake
def _(dy, x, weight, preact, layer_scale, ln_weight, ln_bias, mean, rstd, seed, sample_scale, activation, dropout_p,
      has_ln, needs):
    like = (x, weight, weight.new_empty((weight.shape[0],)), layer_scale, ln_weight, ln_bias)
    return fake_grads(like, needs, x)


def fake_grads(like, needs, x):
    """The fake of a backward op: each gradient asked for in `needs` contiguous in the shape and dtype of its
    input in `like` (as the kernels write them, whatever the input's strides), the rest empty."""
    return tuple(t.new_empty(t.shape) if need and t is not None else x.new_empty((0,)) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, layer_scale, ln_weight, ln_bias, seed, _, sample_scale, activation, dropout_p, _,
     has_ln) = inputs[:14]
    _, preact, mean, rstd, stats = output
    ctx.save_for_backward(x, weight, preact, layer_scale, ln_weight, ln_bias, mean, rstd, seed, sample_scale)
    ctx.activation, ctx.dropout_p, ctx.has_ln = activation, dropout_p, has_ln
    ctx.residual_dtype, ctx.residual_shape = (residual.dtype, residual.shape) if residual is not None else (None, None)
    ctx.present = [t is not None for t in (bias, residual, layer_scale, ln_weight, ln_bias)]
    ctx.mark_non_differentiable(preact, mean, rstd, stats)


def _backward(ctx, dy, _dpreact, _dmean, _drstd, _dstats):
    x, weight, preact, layer_scale, ln_weight, ln_bias, mean, rstd, seed, sample_scale = ctx.saved_tensors
    has_bias, has_residual, has_scale, has_ln_weight, has_ln_bias = ctx.present
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2] and has_bias, need[4] and has_scale, need[5] and has_ln_weight,
             need[6] and has_ln_bias]
    grads = [None] * 6
    needs_preact = (ctx.activation != "none" and any(needs[:4])) or needs[3]
    if needs_preact and preact.numel() == 0 and x.numel() > 0:
        raise_not_saved("linear")
    if any(needs):
        grads = _linear_bwd(dy, x, weight, preact, layer_scale, ln_weight, ln_bias, mean, rstd, seed, sample_scale,
                            ctx.activation, ctx.dropout_p, ctx.has_ln, needs)
        grads = [g if n else None for g, n in zip(grads, needs)]
    dx, dweight, dbias, dscale, dln_weight, dln_bias = grads
    dresidual = dy.reshape(ctx.residual_shape).to(ctx.residual_dtype) if need[3] and has_residual else None
    return dx, dweight, dbias, dresidual, dscale, dln_weight, dln_bias, *[None] * 10


_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def raise_not_saved(op: str):
    """The forward decided from torch.is_grad_enabled() and requires_grad to save no pre-activation; a graph
    traced or exported that way (under no_grad, or with nothing requiring a gradient) cannot be trained."""
    raise RuntimeError(f"fastvit.ops.{op}: this forward saved nothing for a backward (it ran, or was traced / "
                       f"exported, under torch.no_grad() or with no input requiring a gradient); trace or export "
                       f"it with gradients enabled to train through it")  # fmt: skip


def _validate(x, weight, bias, activation, residual, layer_scale, dropout_p, *, ln=None, names=("x", "weight", "bias")):
    """Checks shared by linear, layer_norm_linear (ln = (ln_weight, ln_bias, eps)) and layer_norm_mlp (which
    names its second GEMM's x, weight and bias differently); returns the autocast dtype or None."""
    x_name, weight_name, bias_name = names
    check_tensor(x_name, x, min_ndim=1)
    check_tensor(weight_name, weight, ndim=2)
    check_tensor(bias_name, bias, ndim=1, optional=True)
    check_tensor("residual", residual, min_ndim=1, optional=True)
    check_tensor("layer_scale", layer_scale, ndim=1, optional=True)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{x_name}: expected last dim K = {K} to match {weight_name} (N, K) = "
                         f"{tuple(weight.shape)}, got {describe(x)}")  # fmt: skip
    if N < 1 or K < 1:
        raise ValueError(f"{weight_name}: expected (N, K) with N, K >= 1, got {describe(weight)}")
    check_shape(bias_name, bias, (N,))
    check_shape("layer_scale", layer_scale, (N,))
    check_shape("residual", residual, (*x.shape[:-1], N))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    check_probability("dropout_p", dropout_p)
    ln_weight, ln_bias = (ln[0], ln[1]) if ln is not None else (None, None)
    if ln is not None:
        validate_layer_norm(x, ln_weight, ln_bias, ln[2])
    tensors = {x_name: x, weight_name: weight, bias_name: bias, "residual": residual, "layer_scale": layer_scale,
               "ln_weight": ln_weight, "ln_bias": ln_bias}
    check_same_device(**tensors)
    cast_to = autocast_dtype(x.device)
    if cast_to is None:
        check_same_dtype(**tensors)
    return cast_to


def _check_sample_scale(sample_scale, x):
    """sample_scale: None, or a per-sample factor (x.shape[0],) on x's device that needs no gradient (it is
    stochastic depth's mask). Returns it as the kernels take it: contiguous fp32."""
    if sample_scale is None:
        return None
    check_tensor("sample_scale", sample_scale, ndim=1)
    if x.dim() < 2:
        raise ValueError(f"sample_scale: needs a batch dim, x (..., K) with at least 2 dims, got {describe(x)}")
    check_shape("sample_scale", sample_scale, (x.shape[0],))
    check_same_device(x=x, sample_scale=sample_scale)
    if sample_scale.requires_grad:
        raise ValueError("sample_scale: a stochastic-depth mask carries no gradient; pass it detached")
    return sample_scale.float().contiguous()


def _torch_path(x, weight, bias, activation, residual, layer_scale, dropout_p, ln, ln_in_fp32, sample_scale=None):
    """The same computation in plain PyTorch with the same dtype policy (autocast already resolved)."""
    if ln is not None:
        ln_weight, ln_bias, eps = ln
        x = F.layer_norm(x.float() if ln_in_fp32 else x, (x.shape[-1],), ln_weight, ln_bias, eps).to(weight.dtype)
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    if dropout_p > 0:
        y = F.dropout(y, dropout_p, training=True)
    if layer_scale is not None:
        y = y * layer_scale
    if sample_scale is not None:
        y = y * sample_scale.to(y.dtype).view(-1, *[1] * (y.dim() - 1))
    if residual is not None:
        y = residual + y
    return y


def _check_x_stats(x_stats, x):
    """x_stats must be what linear(..., return_stats=True) returned alongside x: (2, groups, *x's leading dims)
    fp32 on x's device."""
    from fastvit.kernels.linear import stats_groups

    check_tensor("x_stats", x_stats, dtypes=(torch.float32,))
    check_shape("x_stats", x_stats, (2, stats_groups(x.shape[-1]), *x.shape[:-1]))
    check_same_device(x=x, x_stats=x_stats)


def _cast(dtype, *tensors):
    """The tensors in `dtype` (None stays None): the GEMM parameters go to the compute dtype, and under
    autocast LayerNorm's affine to fp32, as autocast runs F.layer_norm."""
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dropout_seed(dropout_p, device):
    """One int64 from torch's generator per call (torch.manual_seed reproduces it), or None without dropout."""
    return torch.randint(0, 2**62, (1,), device=device) if dropout_p > 0 else None


def _out_dtype(compute, residual):
    return compute if residual is None else torch.promote_types(compute, residual.dtype)


def _fused(x, weight, bias, activation, residual, layer_scale, dropout_p, ln, x_stats=None, return_stats=False,
           sample_scale=None):
    cast_to = _validate(x, weight, bias, activation, residual, layer_scale, dropout_p, ln=ln)
    if x_stats is not None:
        _check_x_stats(x_stats, x)
    sample_scale = _check_sample_scale(sample_scale, x)
    check_bool("return_stats", return_stats)
    compute = cast_to or weight.dtype
    weight, bias, layer_scale = _cast(compute, weight, bias, layer_scale)
    if ln is None:
        x = x.to(compute)
    elif cast_to is not None:
        ln = (*_cast(torch.float32, *ln[:2]), ln[2])
    dropout_p = float(dropout_p)
    if not use_triton(x.device, x, weight, bias, residual, layer_scale, sample_scale, *(ln or ())[:2]):
        with autocast_off(x.device):
            y = _torch_path(x, weight, bias, activation, residual, layer_scale, dropout_p, ln, cast_to is not None,
                            sample_scale)  # fmt: skip
        return (y, None) if return_stats else y

    ln_weight, ln_bias, eps = ln if ln is not None else (None, None, 0.0)
    bias, layer_scale, ln_weight, ln_bias = (contiguous_vector(t) for t in (bias, layer_scale, ln_weight, ln_bias))
    save_preact = activation is not None or (layer_scale is not None and layer_scale.requires_grad)
    save_preact = save_preact and _needs_grad(x, weight, bias, layer_scale, ln_weight, ln_bias)
    y, _, _, _, stats = _linear_fwd(x, weight, bias, residual, layer_scale, ln_weight, ln_bias,
                                    _dropout_seed(dropout_p, x.device), x_stats, sample_scale, activation or "none",
                                    dropout_p, float(eps), ln is not None, save_preact, return_stats,
                                    _out_dtype(compute, residual))  # fmt: skip
    return unflatten(y, stats, x, return_stats)


def unflatten(y, stats, x, return_stats):
    """The custom op's y (M, N) and stats (2, groups, M) with x's leading dims restored (views made here,
    outside the op, so y may be modified in place like any tensor)."""
    y = y.view(*x.shape[:-1], y.shape[-1])
    return (y, stats.view(*stats.shape[:2], *x.shape[:-1])) if return_stats else y


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None, layer_scale: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
    return_stats: bool = False, sample_scale: Optional[torch.Tensor] = None,
):
    """residual + sample_scale * layer_scale * dropout(act(x W^T + b)), each piece optional.

    x (..., K); weight (N, K); bias, layer_scale (N,); residual (..., N); activation None, "gelu" (exact
    erf) or "gelu_tanh"; dropout_p in [0, 1), applied when > 0; sample_scale (x.shape[0],), any float
    dtype (read as fp32), no gradient: a factor per sample (leading dim) on the branch before the residual
    add, i.e. stochastic depth's keep / (1 - p), fused so the residual add and the statistics stay in the
    epilogue. Returns y (..., N): in x's dtype, or under autocast promote_types(autocast dtype, residual
    dtype) (see the module docstring).

    return_stats=True returns (y, y_stats): LayerNorm row statistics of y taken in the epilogue, for a
    following layer_norm_linear(y, ..., x_stats=y_stats) to skip its statistics pass (None when the torch
    backend ran). Treat y_stats as opaque and pair it only with this y.
    """
    return _fused(x, weight, bias, activation, residual, layer_scale, dropout_p, None, return_stats=return_stats,
                  sample_scale=sample_scale)  # fmt: skip


def layer_norm_linear(
    x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None, eps: float = 1e-6, activation: Optional[str] = None,
    dropout_p: float = 0.0, x_stats: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dropout(act(LayerNorm(x) W^T + b)) with LayerNorm over the last dim, fused into the GEMM's prologue.

    x (..., K); ln_weight, ln_bias (K,) or None; weight (N, K); bias (N,); activation as for linear;
    dropout_p (timm's MLP drop after GELU) in [0, 1); x_stats: None, or the statistics that
    linear(..., return_stats=True) returned with this very x (they must describe it: only their shape
    can be checked), which saves the per-row statistics pass. Returns (..., N) in the compute dtype (x's
    dtype, or the autocast dtype).
    """
    return _fused(x, weight, bias, activation, None, None, dropout_p, (ln_weight, ln_bias, eps), x_stats=x_stats)
