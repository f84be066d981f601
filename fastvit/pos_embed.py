"""Resampling absolute position embeddings to another patch grid (fine-tuning / evaluating at another image
size, as the ViT paper does by 2-D interpolation). Plain PyTorch: it runs once per checkpoint load or
per new input size, never per step.

Three conventions, each reproduced exactly (same ops, same dtype handling) so weights converted by any of
them give the same numbers here:

    style   mode / antialias      computed in     prefix tokens        source
    "timm"  bicubic, antialias    float32         kept, not resampled  timm.layers.resample_abs_pos_embed
    "hf"    bicubic, no antialias the input dtype the class token kept  transformers ViTEmbeddings
                                                                        .interpolate_pos_encoding
    "npz"   bilinear, no antialias float32        kept, not resampled  timm's Google .npz loader
                                                                        (_load_weights -> resample_abs_pos_embed)

`mode` / `antialias` override the style's defaults. All use align_corners=False.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_STYLES = {"timm": ("bicubic", True), "hf": ("bicubic", False), "npz": ("bilinear", False)}


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: Optional[Sequence[int]] = None,
    mode: Optional[str] = None,
    antialias: Optional[bool] = None,
    style: str = "timm",
) -> torch.Tensor:
    """pos_embed (1, num_prefix_tokens + GH * GW, D) -> (1, num_prefix_tokens + new_GH * new_GW, D).

    The first num_prefix_tokens rows (class / register tokens; 0 for no_embed_class models) are kept as
    they are; the rest, a row-major (GH, GW) grid (square when old_grid is None), is interpolated to
    new_grid. Returns pos_embed itself when the grid does not change, as timm does.
    """
    if style not in _STYLES:
        raise ValueError(f"style: expected one of {', '.join(map(repr, _STYLES))}, got {style!r}")
    default_mode, default_antialias = _STYLES[style]
    mode = default_mode if mode is None else mode
    antialias = default_antialias if antialias is None else antialias
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"pos_embed: expected a (1, L, D) tensor, got {shape}")
    if not pos_embed.is_floating_point():
        raise TypeError(f"pos_embed: expected a floating-point tensor, got dtype {pos_embed.dtype}")
    new_grid = _grid("new_grid", new_grid)
    if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens <= pos_embed.shape[1]:
        raise ValueError(f"num_prefix_tokens: expected an int in 0..{pos_embed.shape[1]}, got {num_prefix_tokens!r}")
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid_tokens)
        if side * side != num_grid_tokens:
            raise ValueError(
                f"pos_embed: {num_grid_tokens} grid tokens (after {num_prefix_tokens} prefix tokens) is not a "
                f"square grid; pass old_grid=(GH, GW)"
            )
        old_grid = (side, side)
    old_grid = _grid("old_grid", old_grid)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(f"old_grid: {old_grid} does not hold the {num_grid_tokens} grid tokens of pos_embed")
    if old_grid == new_grid:
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = pos_embed.shape[-1]
    # timm and the npz loader interpolate in fp32 ("interpolate needs float32"); HF in the tensor's dtype
    compute_dtype = pos_embed.dtype if style == "hf" else torch.float32
    grid = grid.to(compute_dtype).reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, GH, GW)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _grid(name, grid):
    grid = tuple(grid)
    if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"{name}: expected two positive ints (GH, GW), got {grid!r}")
    return grid
