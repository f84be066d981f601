"""timm-named modules for the fused ViT, and the fused block forward.

The modules only hold parameters under timm's names (so state_dicts load unchanged) and mirror timm's
attribute layout (block.norm1, block.attn.qkv, block.attn.attn_drop, block.ls1.gamma, block.mlp.fc1, ...).
`block_forward` reads exactly those attributes, so the same fused code path runs fastvit's Block and, via
fastvit.patch_timm, timm's own Block instances.

One block forward, as launches (training adds dropout inside the same launches):

    [LN1 > QKV GEMM + bias]  [attention on packed qkv]  [proj GEMM + bias (+ LayerScale) + residual]
    [LN2 > fc1 GEMM + bias > GELU]  [fc2 GEMM + bias (+ LayerScale) + residual]

The last two are one op, ops.layer_norm_mlp, whose backward forms GELU's gradient once in fc2's dx GEMM.

LayerNorm's row statistics need no launch of their own: each residual GEMM's epilogue stores its
output's per-column-group (mean, M2) partials, and the next LayerNorm > GEMM combines them in its
prologue. Only a block whose input comes from elsewhere (the stem, a block called with hooks) has its
norm1 take a statistics pass.
"""
import functools

import torch
import torch.nn as nn
from torch.nn.modules import module as torch_module

from fastvit import ops


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim: {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate="none", bias=True, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample in training, rescaling the survivors."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):  # block_forward fuses this into the residual GEMM instead (sample_scale)
        scale = _drop_path_scale(self, x)
        return x if scale is None else x * scale.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True, init_values=None,
                 eps=1e-6, approximate="none", attn_drop=0.0, proj_drop=0.0, drop_path=0.0):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate, proj_bias, proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        return block_forward(self, x)


def _active_p(dropout: nn.Module) -> float:
    """The dropout probability that applies now: nn.Dropout's p in training mode, else 0."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _drop_path_scale(drop_path: nn.Module, x: torch.Tensor):
    """Stochastic depth's per-sample factor for a branch added to x (B, ...), or None while drop_path is
    inactive (eval, or drop_path_rate 0). Drawn as timm's DropPath draws it, B Bernoulli(1 - p) samples from
    torch's generator, divided by 1 - p when scale_by_keep, so a seeded run drops the same samples."""
    p = float(getattr(drop_path, "drop_prob", 0.0))
    if not drop_path.training or p == 0.0:
        return None
    keep = x.new_empty((x.shape[0],)).bernoulli_(1.0 - p)
    return keep / (1.0 - p) if getattr(drop_path, "scale_by_keep", True) and p < 1.0 else keep


def _residual_branch(branch, layer_scale, drop_path, dropout, residual):
    """(residual + drop_path(layer_scale * dropout(branch)), its LayerNorm row statistics): one op call
    (ops.linear or ops.layer_norm_mlp, every other argument bound) with everything after the GEMM in its
    epilogue, stochastic depth included (a per-sample factor on the branch before the residual add), so
    the epilogue also emits the output's statistics for the next layer_norm_linear."""
    return branch(residual=residual, layer_scale=getattr(layer_scale, "gamma", None), dropout_p=_active_p(dropout),
                  sample_scale=_drop_path_scale(drop_path, residual), return_stats=True)  # fmt: skip


def block_forward(block: nn.Module, x: torch.Tensor, x_stats=None, return_stats: bool = False):
    """One pre-norm transformer block on the fused ops. x: (B, N, D) -> (B, N, D).

    Works on any module with timm's Block attributes (fastvit.layers.Block or timm's own Block).
    x_stats: the LayerNorm statistics of x that the previous block returned (None: norm1 takes its own).
    return_stats=True returns (x, x's statistics or None), for the next block's x_stats: chained this way
    a block is exactly the five launches above.
    """
    attn, mlp, norm1, norm2 = block.attn, block.mlp, block.norm1, block.norm2
    qkv = ops.layer_norm_linear(x, norm1.weight, norm1.bias, attn.qkv.weight, attn.qkv.bias, eps=norm1.eps,
                                x_stats=x_stats)  # (B, N, 3D)  # fmt: skip
    o = ops.qkv_attention(qkv, attn.num_heads, scale=attn.scale, dropout_p=_active_p(attn.attn_drop))  # (B, N, D)
    proj = functools.partial(ops.linear, o, attn.proj.weight, attn.proj.bias)
    x, x_stats = _residual_branch(proj, block.ls1, block.drop_path1, attn.proj_drop, x)

    # one op, whose backward forms GELU's gradient once (fastvit/ops/mlp.py)
    mlp_branch = functools.partial(ops.layer_norm_mlp, x, norm2.weight, norm2.bias, mlp.fc1.weight, mlp.fc1.bias,
                                   mlp.fc2.weight, mlp.fc2.bias, eps=norm2.eps, activation=gelu_name(mlp.act),
                                   x_stats=x_stats, hidden_dropout_p=_active_p(mlp.drop1))  # fmt: skip
    x, x_stats = _residual_branch(mlp_branch, block.ls2, block.drop_path2, mlp.drop2, x)
    return (x, x_stats) if return_stats else x


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones): then it must be called as a
    module, not through block_forward, so the hooks see what they expect."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def gelu_name(act: nn.Module) -> str:
    """The fused-op activation for a GELU module: "gelu" (exact erf) or "gelu_tanh" (tanh approximation).

    Accepts torch's nn.GELU and timm's GELU / GELUTanh; anything else cannot be fused.
    """
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    kind = {"GELU": "gelu", "GELUTanh": "gelu_tanh"}.get(type(act).__name__)
    if kind is None:
        raise NotImplementedError(f"act_layer: fastvit fuses GELU only, got {type(act).__name__}")
    return kind
