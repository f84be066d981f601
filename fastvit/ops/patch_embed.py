"""fastvit.ops.patch_embed: the ViT's first layer in one launch (kernels/patch_embed.py).

    tokens = cat([cls_token, reg_tokens, conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)], 1)
    tokens = tokens + pos_embed                      no_embed_class=False (original ViT / DeiT order)
    tokens = cat([cls, reg, patches + pos_embed], 1)  no_embed_class=True  (DeiT-3 / big_vision order)

exactly as timm's VisionTransformer (PatchEmbed followed by _pos_embed): the register tokens follow the
class token, and with no_embed_class=False pos_embed has a row for every prefix token (class and
register), so its length is num_prefix_tokens + N; with no_embed_class=True it has N rows.

Saved for backward: images and weight (by reference). The backward computes dweight with a deterministic
GEMM over the batch, dimages (only when images require grad) with a second GEMM scattered straight back
to pixels, and dbias / dpos_embed / dcls_token / dreg_tokens from one batch-sum of the token gradient.

Autocast follows timm under torch.autocast exactly: conv2d casts images, weight and bias to the autocast
dtype (the kernel converts the images while loading them, so no cast copy of the images is made), and
the concatenation with the fp32 class / register tokens and the fp32 pos_embed add promote, so the tokens
come out in torch.promote_types(autocast dtype, pos_embed / cls / reg dtypes), i.e. fp32 for an fp32 model.
The kernel keeps the patch values in fp32 up to that add (timm rounds them to the autocast dtype first),
so it is, if anything, closer to the fp32 result. Outside autocast every tensor must share one dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.backend import use_triton
from fastvit.kernels.patch_embed import images_grad_is_channels_last, patch_embed_backward, patch_embed_forward

from ._common import (autocast_dtype, check_bool, check_same_device, check_same_dtype, check_shape, check_tensor,
                      describe, or_empty)  # fmt: skip


@torch.library.custom_op("fastvit::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
    cls_token: Optional[torch.Tensor], reg_tokens: Optional[torch.Tensor], no_embed_class: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    return patch_embed_forward(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class, out_dtype)


@_patch_embed_fwd.register_fake
def _(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class, out_dtype):
    P = weight.shape[-1]
    num_tokens = _num_prefix(cls_token, reg_tokens) + (images.shape[2] // P) * (images.shape[3] // P)
    return images.new_empty((images.shape[0], num_tokens, weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fastvit::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(
    dtokens: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, num_prefix: int, compute_dimages: bool,
    compute_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dimages, dweight, dtokens_sum = patch_embed_backward(
        dtokens, images, weight, num_prefix, compute_dimages, compute_dweight
    )
    return or_empty(dimages, images), or_empty(dweight, images), dtokens_sum


@_patch_embed_bwd.register_fake
def _(dtokens, images, weight, num_prefix, compute_dimages, compute_dweight):
    dimages = images.new_empty((0,))
    if compute_dimages:
        B, C, H, W = images.shape
        if images_grad_is_channels_last(images):
            dimages = images.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
        else:
            dimages = images.new_empty(images.shape)
    dweight = weight.new_empty(weight.shape if compute_dweight else (0,))
    return dimages, dweight, dtokens.new_empty(dtokens.shape[1:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class, _ = inputs
    ctx.save_for_backward(images, weight)
    ctx.num_prefix = _num_prefix(cls_token, reg_tokens)
    ctx.no_embed_class = no_embed_class
    ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (bias, pos_embed, cls_token, reg_tokens))


def _backward(ctx, dtokens):
    images, weight = ctx.saved_tensors
    prefix, (bias_dtype, pos_dtype, cls_dtype, reg_dtype) = ctx.num_prefix, ctx.param_dtypes
    need_images, need_weight, need_bias, need_pos, need_cls, need_reg = ctx.needs_input_grad[:6]
    dimages, dweight, dsum = _patch_embed_bwd(dtokens, images, weight, prefix, need_images, need_weight)
    has_cls = cls_dtype is not None
    # pos_embed's gradient may be dsum itself; the class and register tokens' are copies of its rows: views
    # would become .grad tensors sharing memory, so accumulating, clipping or unscaling one changes the others
    grads = (
        dimages if need_images else None,
        dweight if need_weight else None,
        dsum[prefix:].sum(0).to(bias_dtype) if need_bias else None,
        (dsum[prefix:] if ctx.no_embed_class else dsum)[None].to(pos_dtype) if need_pos else None,
        dsum[None, :1].to(cls_dtype, copy=True) if need_cls else None,
        dsum[None, int(has_cls):prefix].to(reg_dtype, copy=True) if need_reg else None,
    )
    return grads + (None, None)


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def _num_prefix(cls_token, reg_tokens):
    return (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)


def _patch_embed_torch(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
    """timm's PatchEmbed + _pos_embed in plain PyTorch (the "torch" backend and the parity reference)."""
    P = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)  # (B, N, D)
    return add_prefix_and_position(x, pos_embed, cls_token, reg_tokens, no_embed_class)


def add_prefix_and_position(x, pos_embed, cls_token, reg_tokens, no_embed_class):
    """timm's _pos_embed on patch tokens x (B, N, D) in plain PyTorch: the class and register tokens
    prepended, the position embedding added (before prepending them when no_embed_class)."""
    prefix = [t.expand(x.shape[0], -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    if pos_embed is not None and no_embed_class:
        x = x + pos_embed
    if prefix:
        x = torch.cat(prefix + [x], dim=1)
    if pos_embed is not None and not no_embed_class:
        x = x + pos_embed
    return x


def validate_patch_embed(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
    """Every check made before a launch; returns (patch size P, grid (GH, GW), num_prefix_tokens)."""
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_tensor("bias", bias, ndim=1, optional=True)
    check_tensor("pos_embed", pos_embed, ndim=3, optional=True)
    check_tensor("cls_token", cls_token, ndim=3, optional=True)
    check_tensor("reg_tokens", reg_tokens, ndim=3, optional=True)
    check_bool("no_embed_class", no_embed_class)
    check_same_device(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
                      reg_tokens=reg_tokens)  # fmt: skip

    D, C, P, P_w = weight.shape
    if P != P_w:
        raise ValueError(f"weight: expected a square (D, C, P, P) patch kernel, got {describe(weight)}")
    if P < 1 or D < 1:
        raise ValueError(f"weight: expected D >= 1 and P >= 1, got {describe(weight)}")
    B, C_in, H, W = images.shape
    if C_in != C:
        raise ValueError(f"images: expected {C} channels (weight is {describe(weight)}), got {describe(images)}")
    if H < P or W < P or H % P or W % P:
        raise ValueError(
            f"images: height and width must be positive multiples of the patch size {P}, got {describe(images)}; "
            f"pad the images (timm's dynamic_img_pad=True) or resize them"
        )
    check_shape("bias", bias, (D,))
    check_shape("cls_token", cls_token, (1, 1, D))
    if reg_tokens is not None and (reg_tokens.shape[0] != 1 or reg_tokens.shape[1] < 1 or reg_tokens.shape[2] != D):
        raise ValueError(f"reg_tokens: expected shape (1, R, {D}) with R >= 1, got {describe(reg_tokens)}")

    grid = (H // P, W // P)
    num_prefix = _num_prefix(cls_token, reg_tokens)
    if pos_embed is not None:
        length = grid[0] * grid[1] + (0 if no_embed_class else num_prefix)
        if tuple(pos_embed.shape) != (1, length, D):
            rows = "N" if no_embed_class else f"num_prefix_tokens ({num_prefix}) + N"
            raise ValueError(
                f"pos_embed: expected shape (1, {length}, {D}) = (1, {rows}, D) for a {grid[0]}x{grid[1]} patch "
                f"grid (N = {grid[0] * grid[1]}, no_embed_class={no_embed_class}), got {describe(pos_embed)}; "
                f"resample it with fastvit.resample_pos_embed for another image size"
            )
    return P, grid, num_prefix


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    cls_token: Optional[torch.Tensor] = None,
    reg_tokens: Optional[torch.Tensor] = None,
    no_embed_class: bool = False,
) -> torch.Tensor:
    """Patch embedding + class / register tokens + position embedding, as timm's ViT computes them.

    images (B, C, H, W) in any layout (NCHW or channels-last); weight (D, C, P, P) as timm's Conv2d stores
    it; bias (D,) or None; pos_embed (1, L, D) or None with L = N + (0 if no_embed_class else
    num_prefix_tokens), N = (H / P) * (W / P); cls_token (1, 1, D) or None; reg_tokens (1, R, D) or None.
    Returns the tokens (B, num_prefix_tokens + N, D): class token, register tokens, then the patches in
    row-major grid order. H and W must be multiples of P (padding is the model's job, dynamic_img_pad).
    """
    validate_patch_embed(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    cast_to = autocast_dtype(images.device)
    if cast_to is None:
        check_same_dtype(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
                         reg_tokens=reg_tokens)  # fmt: skip
    if not use_triton(images.device, images, weight, bias, pos_embed, cls_token, reg_tokens):
        return _patch_embed_torch(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    out_dtype = images.dtype
    if cast_to is not None:  # conv2d's autocast cast (images: inside the kernel), then timm's promotion
        weight = weight.to(cast_to)
        bias = bias.to(cast_to) if bias is not None else None
        out_dtype = cast_to
        for t in (pos_embed, cls_token, reg_tokens):
            out_dtype = out_dtype if t is None else torch.promote_types(out_dtype, t.dtype)
    return _patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class, out_dtype)
