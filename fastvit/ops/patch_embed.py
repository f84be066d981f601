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

from ._common import autocast_dtype, check_same_device, check_same_dtype, check_shape, check_tensor, describe


def _patch_embed_torch(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
    """timm's PatchEmbed + _pos_embed in plain PyTorch (the "torch" backend and the parity reference)."""
    P = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)  # (B, N, D)
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
    if not isinstance(no_embed_class, bool):
        raise TypeError(f"no_embed_class: expected a bool, got {type(no_embed_class).__name__}")
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
    num_prefix = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
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
    if not use_triton(images.device):
        return _patch_embed_torch(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    raise NotImplementedError("fastvit.ops.patch_embed: the Triton path is not ready yet; use set_backend('torch')")
