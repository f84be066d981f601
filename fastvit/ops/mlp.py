"""fastvit.ops.layer_norm_mlp: a transformer block's MLP branch with its residual add, as two fused GEMMs
whose backward forms GELU's gradient once, in between (kernels/linear.py).

    layer_norm_mlp(x, ...) = residual + s * ls * dropout_p(dropout_q(act(LN(x) W1^T + b1)) W2^T + b2)

Forward: exactly layer_norm_linear (LN -> fc1 + bias -> GELU -> dropout, saving z = LN(x) W1^T + b1) then
linear (fc2 + bias, layer scale, dropout, stochastic depth, residual, LayerNorm statistics for the next
block): the same two launches and the same numbers as calling those two ops.

Why one op: the backward. Called apart, fc1's backward receives dh, the gradient of GELU's output, and must
form dz = dh * act'(z) in the prologue of both its gradient GEMMs. Every column-block program of the dx
GEMM and every row-block program of the dW GEMM recomputes erf and exp on the same elements (12 times per
element at ViT-B widths and 128-wide tiles): on sm_90 the dx GEMM's K-step is 809 SASS instructions for
2 HGMMA instead of 115 for 4, and the dW GEMM's LayerNorm-ed operand keeps its wgmma serialised. Here fc2's dx GEMM
multiplies its output by (dropout mask and) act'(z) in the epilogue, once per element, and stores dz where it would have
stored dh (same size and dtype); fc1's two GEMMs then read dz as it is: a plain dx GEMM, and a dW GEMM
that runs swapped with its wgmma in flight. It is the dgrad-with-activation-gradient epilogue of fused-MLP
training code (cuBLASLt's DGELU epilogue in flash-attn's FusedMLP, its Triton triton_dgrad_act).

Saved for backward: x, fp32 mean / rstd, z and h = dropout(act(z)) (fc2's input, for dW2), and fc2's
pre-activation when the layer scale needs a gradient: what the two ops save, so eager's memory minus
LayerNorm's output.

Dropout: after the activation (timm's mlp.drop1, in fc1's epilogue, its mask regenerated in fc2's dx
epilogue) and after fc2 (mlp.drop2), each from its own seed; never stored.
"""
from typing import Optional

import torch

from fastvit.backend import use_triton

from ._common import check_bool, check_probability, contiguous_vector, or_empty, rows_view
from .linear import (_cast, _check_sample_scale, _check_x_stats, _dropout_seed, _needs_grad, _out_dtype,
                     _validate, fake_grads, layer_norm_linear, linear, raise_not_saved, unflatten)  # fmt: skip


@torch.library.custom_op("fastvit::mlp_fwd", mutates_args=())
def _mlp_fwd(
    x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor], layer_scale: Optional[torch.Tensor], hidden_seed: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], x_stats: Optional[torch.Tensor], sample_scale: Optional[torch.Tensor],
    activation: str, hidden_dropout_p: float, dropout_p: float, eps: float, save_for_backward: bool,
    save_fc2_preact: bool, emit_stats: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, z, mean, rstd, fc2_preact, stats) for x (..., D) flattened to M rows: y (M, N), h =
    dropout(act(z)) (M, hidden) and z (saved for the backward, else empty), x's fp32 row statistics, fc2's
    pre-activation (for dlayer_scale, else empty), y's statistics (2, groups, M). The caller restores x's
    leading dims (see ops/linear.py's _linear_fwd)."""
    from fastvit.kernels.linear import linear_forward

    rows = rows_view(x)
    h, z, mean, rstd, _ = linear_forward(
        rows, fc1_weight, fc1_bias, None, None, ln_weight, ln_bias, hidden_seed, activation=activation,
        dropout_p=hidden_dropout_p, eps=eps, has_ln=True, save_preact=save_for_backward and activation != "none",
        x_stats=None if x_stats is None else x_stats.reshape(2, x_stats.shape[1], -1),
    )  # fmt: skip
    y, fc2_preact, _, _, stats = linear_forward(
        h, fc2_weight, fc2_bias, None if residual is None else rows_view(residual), layer_scale, None, None, seed,
        dropout_p=dropout_p, save_preact=save_fc2_preact, out_dtype=out_dtype, emit_stats=emit_stats,
        sample_scale=sample_scale,
    )  # fmt: skip
    return y, h, or_empty(z, x), mean, rstd, or_empty(fc2_preact, x), or_empty(stats, x)


@_mlp_fwd.register_fake
def _(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, hidden_seed, seed,
      x_stats, sample_scale, activation, hidden_dropout_p, dropout_p, eps, save_for_backward, save_fc2_preact,
      emit_stats, out_dtype):
    from fastvit.kernels.linear import stats_groups

    rows, hidden, N = x.numel() // x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    h = x.new_empty((rows, hidden), dtype=fc1_weight.dtype)
    z = h.clone() if save_for_backward and activation != "none" else x.new_empty((0,))
    mean = x.new_empty((rows,), dtype=torch.float32)
    fc2_preact = x.new_empty((rows, N), dtype=fc2_weight.dtype) if save_fc2_preact else x.new_empty((0,))
    stats = x.new_empty((2, stats_groups(N), rows) if emit_stats else (0,), dtype=torch.float32 if emit_stats else x.dtype)
    return x.new_empty((rows, N), dtype=out_dtype), h, z, mean, mean.clone(), fc2_preact, stats


@torch.library.custom_op("fastvit::mlp_bwd", mutates_args=())
def _mlp_bwd(
    dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor, fc2_preact: torch.Tensor, layer_scale: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    hidden_seed: Optional[torch.Tensor], seed: Optional[torch.Tensor], sample_scale: Optional[torch.Tensor],
    activation: str, hidden_dropout_p: float, dropout_p: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """needs = which of (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias,
    dlayer_scale) to compute; the rest come back empty."""
    from fastvit.kernels.linear import linear_backward

    need_dx, need_dlw, need_dlb, need_dw1, need_db1, need_dw2, need_db2, need_dls = needs
    need_fc1 = need_dx or need_dlw or need_dlb or need_dw1 or need_db1
    # fc2: dW2, db2, dls from dy and h; its dx GEMM stores dz = (dy W2) * keep / (1 - p) * act'(z), the
    # gradient of fc1's pre-activation
    dz, dw2, db2, dls, _, _ = linear_backward(
        rows_view(dy), h, fc2_weight, fc2_preact if fc2_preact.numel() else None, layer_scale, None, None, None,
        None, seed, dropout_p=dropout_p, needs=(need_fc1, need_dw2, need_db2, need_dls, False, False),
        x_preact=z if activation != "none" else None, x_activation=activation, x_seed=hidden_seed,
        x_dropout_p=hidden_dropout_p, sample_scale=sample_scale,
    )  # fmt: skip
    dx = dlw = dlb = dw1 = db1 = None
    if need_fc1:  # fc1 with LayerNorm, whose gradient GEMMs read dz as it is (no prologue)
        dx, dw1, db1, _, dlw, dlb = linear_backward(
            dz, rows_view(x), fc1_weight, None, None, ln_weight, ln_bias, mean, rstd, None,
            needs=(need_dx, need_dw1, need_db1, False, need_dlw, need_dlb),
        )  # fmt: skip
    grads = (dx.view(x.shape) if dx is not None else None, dlw, dlb, dw1, db1, dw2, db2, dls)
    return tuple(or_empty(g, x) for g in grads)


@_mlp_bwd.register_fake
def _(dy, x, h, z, fc1_weight, fc2_weight, fc2_preact, layer_scale, ln_weight, ln_bias, mean, rstd, hidden_seed, seed,
      sample_scale, activation, hidden_dropout_p, dropout_p, needs):
    like = (x, ln_weight, ln_bias, fc1_weight, fc1_weight.new_empty((fc1_weight.shape[0],)), fc2_weight,
            fc2_weight.new_empty((fc2_weight.shape[0],)), layer_scale)
    return fake_grads(like, needs, x)


def _setup_context(ctx, inputs, output):
    (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, hidden_seed, seed, _,
     sample_scale, activation, hidden_dropout_p, dropout_p) = inputs[:16]
    _, h, z, mean, rstd, fc2_preact, stats = output
    ctx.save_for_backward(x, h, z, fc1_weight, fc2_weight, fc2_preact, layer_scale, ln_weight, ln_bias, mean, rstd,
                          hidden_seed, seed, sample_scale)  # fmt: skip
    ctx.activation, ctx.hidden_dropout_p, ctx.dropout_p = activation, hidden_dropout_p, dropout_p
    ctx.residual_dtype, ctx.residual_shape = (residual.dtype, residual.shape) if residual is not None else (None, None)
    ctx.present = [t is not None for t in (ln_weight, ln_bias, fc1_bias, fc2_bias, residual, layer_scale)]
    ctx.mark_non_differentiable(h, z, mean, rstd, fc2_preact, stats)


def _backward(ctx, dy, *_):
    saved = ctx.saved_tensors
    has_ln_weight, has_ln_bias, has_fc1_bias, has_fc2_bias, has_residual, has_scale = ctx.present
    need = ctx.needs_input_grad
    needs = [need[0], need[1] and has_ln_weight, need[2] and has_ln_bias, need[3], need[4] and has_fc1_bias, need[5],
             need[6] and has_fc2_bias, need[8] and has_scale]  # fmt: skip
    grads = [None] * 8
    x, z, fc2_preact = saved[0], saved[2], saved[5]
    needs_z, needs_fc2_preact = ctx.activation != "none" and any(needs[:5]), needs[7]
    if x.numel() and ((needs_z and z.numel() == 0) or (needs_fc2_preact and fc2_preact.numel() == 0)):
        raise_not_saved("layer_norm_mlp")
    if any(needs):
        grads = _mlp_bwd(dy, *saved, ctx.activation, ctx.hidden_dropout_p, ctx.dropout_p, needs)
        grads = [g if n else None for g, n in zip(grads, needs)]
    dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dscale = grads
    dresidual = dy.reshape(ctx.residual_shape).to(ctx.residual_dtype) if need[7] and has_residual else None
    return (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dresidual, dscale,
            *[None] * 12)  # fmt: skip


_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_mlp(
    x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6, activation: Optional[str] = "gelu", residual: Optional[torch.Tensor] = None,
    layer_scale: Optional[torch.Tensor] = None, dropout_p: float = 0.0, x_stats: Optional[torch.Tensor] = None,
    return_stats: bool = False, sample_scale: Optional[torch.Tensor] = None, hidden_dropout_p: float = 0.0,
):
    """residual + sample_scale * layer_scale * dropout(dropout(act(LayerNorm(x) W1^T + b1)) W2^T + b2),
    each of residual, sample_scale, layer_scale, both dropouts and the biases optional: timm's
    `x + drop_path2(ls2(mlp(norm2(x))))` in two launches.

    x (..., D); ln_weight, ln_bias (D,) or None; fc1_weight (hidden, D); fc1_bias (hidden,); fc2_weight
    (N, hidden); fc2_bias, layer_scale (N,); residual (..., N); activation "gelu" (exact erf), "gelu_tanh"
    or None; hidden_dropout_p in [0, 1) after the activation (timm's mlp.drop1), dropout_p after fc2
    (mlp.drop2), each drawing one seed from torch's generator in that order; x_stats as for layer_norm_linear;
    sample_scale (x.shape[0],) as for linear (stochastic depth's keep / (1 - p)). Returns y
    (..., N) with linear's dtype rules, or (y, y_stats) with return_stats=True as linear does. The same
    results as layer_norm_linear followed by linear; the backward is cheaper (module docstring).
    """
    cast_to = _validate(x, fc1_weight, fc1_bias, activation, None, None, 0.0, ln=(ln_weight, ln_bias, eps),
                        names=("x", "fc1_weight", "fc1_bias"))  # fmt: skip
    # fc2's checks on a stand-in for fc1's output: its shape, x's device and dtype, no memory
    hidden = x.new_empty(()).expand(*x.shape[:-1], fc1_weight.shape[0])
    _validate(hidden, fc2_weight, fc2_bias, None, residual, layer_scale, dropout_p,
              names=("fc1's output", "fc2_weight", "fc2_bias"))  # fmt: skip
    check_probability("hidden_dropout_p", hidden_dropout_p)
    check_bool("return_stats", return_stats)
    if x_stats is not None:
        _check_x_stats(x_stats, x)
    sample_scale = _check_sample_scale(sample_scale, x)
    dropout_p, hidden_dropout_p = float(dropout_p), float(hidden_dropout_p)
    if not use_triton(x.device, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                      layer_scale, sample_scale):
        h = layer_norm_linear(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps, activation, hidden_dropout_p)
        return linear(h, fc2_weight, fc2_bias, residual=residual, layer_scale=layer_scale, dropout_p=dropout_p,
                      return_stats=return_stats, sample_scale=sample_scale)  # fmt: skip

    compute = cast_to or fc1_weight.dtype
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale = _cast(compute, fc1_weight, fc1_bias, fc2_weight,
                                                                    fc2_bias, layer_scale)  # fmt: skip
    if cast_to is not None:
        ln_weight, ln_bias = _cast(torch.float32, ln_weight, ln_bias)
    ln_weight, ln_bias, fc1_bias, fc2_bias, layer_scale = (contiguous_vector(t) for t in (ln_weight, ln_bias, fc1_bias,
                                                                                          fc2_bias, layer_scale))  # fmt: skip
    save_for_backward = _needs_grad(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale)
    save_fc2_preact = save_for_backward and layer_scale is not None and layer_scale.requires_grad
    hidden_seed = _dropout_seed(hidden_dropout_p, x.device)  # drawn first, as the two ops would
    y, *_, stats = _mlp_fwd(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                            hidden_seed, _dropout_seed(dropout_p, x.device), x_stats, sample_scale,
                            activation or "none", hidden_dropout_p, dropout_p, float(eps), save_for_backward,
                            save_fc2_preact, return_stats, _out_dtype(compute, residual))  # fmt: skip
    return unflatten(y, stats, x, return_stats)
