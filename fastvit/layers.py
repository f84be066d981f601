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

The fused path reads the submodules' parameters instead of calling them, which is only right while each
one is what it reads: fusable() checks, at every call, that each submodule runs the forward of a known
class (nn.Linear, nn.LayerNorm, timm's or fastvit's Attention / Mlp / LayerScale / DropPath, ...: a
LoRA wrapper or a subclass overriding forward is not) and has no hooks. A block that fails runs
call_modules() instead, timm's Block.forward: every submodule called (nn.Linear on cuBLAS, the attention
on fastvit's kernel), every hook fired.
"""
import functools
import numbers
from typing import Tuple

import torch
import torch.nn as nn
from torch.nn.modules import module as torch_module

from fastvit import ops


def to_pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, numbers.Integral) else tuple(int(i) for i in v)


class PatchEmbed(nn.Module):
    """Holds the stride-P convolution's parameters (timm's patch_embed.proj) and the grid geometry; the
    model runs the arithmetic in fastvit.ops.patch_embed, fused with the position embedding and prefix
    tokens, while the stem is plain (fusable_stem)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True, dynamic_img_pad=False):
        super().__init__()
        self.img_size = to_pair(img_size)
        self.patch_size = to_pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise NotImplementedError(f"patch_size: fastvit supports square patches, got {self.patch_size}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):  # the patch tokens (B, N, D) unfused: the model fuses this when plain
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention without qk_norm: qkv Linear -> multi-head attention (fastvit's kernel) -> proj."""

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

    def forward(self, x):  # the modules one by one: block_forward fuses them when fusable(block)
        if type(self.attn_drop).forward not in known_forwards()["dropout"]:
            raise NotImplementedError(f"attn.attn_drop: the attention kernel applies dropout only, got "
                                      f"{type(self.attn_drop).__name__}")  # fmt: skip
        o = ops.qkv_attention(self.qkv(x), self.num_heads, scale=self.scale, dropout_p=_active_p(self.attn_drop))
        return self.proj_drop(self.proj(o))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate="none", bias=True, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):  # the modules one by one: block_forward fuses them when fusable(block)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


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
                 norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), approximate="none", attn_drop=0.0,
                 proj_drop=0.0, drop_path=0.0):  # fmt: skip
        super().__init__()
        known_forwards()  # filled before any torch.compile trace of this block
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
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
    a block is exactly the five launches above. A block that is not fusable() runs call_modules().
    """
    if not fusable(block):
        x = call_modules(block, x)
        return (x, None) if return_stats else x
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


def call_modules(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward: each submodule called as a module (wrappers run, hooks fire)."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones): then it must be called as a
    module, not through block_forward, so the hooks see what they expect."""
    return _own_hooks(module) or _global_hooks()


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)  # fmt: skip


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)  # fmt: skip


def plain(module: nn.Module, kind: str) -> bool:
    """Whether the fused ops may read `module`'s parameters instead of calling it: it runs the forward of
    a class of `kind` (its own class's: not a subclass overriding forward or __call__, a wrapper or an
    instance-level forward) and has no hooks of its own."""
    cls = type(module)
    return (getattr(cls, "forward", None) in (_KNOWN_FORWARDS or known_forwards())[kind]
            and cls.__call__ is nn.Module.__call__ and "forward" not in module.__dict__
            and not _own_hooks(module))  # fmt: skip


# the submodules block_forward reads instead of calling, by the kind each must be
_BLOCK_PARTS = (("norm1", "norm"), ("norm2", "norm"), ("attn", "attention"), ("ls1", "layer_scale"),
                ("ls2", "layer_scale"), ("drop_path1", "drop_path"), ("drop_path2", "drop_path"), ("mlp", "mlp"))  # fmt: skip
_ATTENTION_PARTS = {"qkv": "linear", "proj": "linear", "attn_drop": "dropout", "proj_drop": "dropout"}
_MLP_PARTS = {"fc1": "linear", "act": "gelu", "drop1": "dropout", "fc2": "linear", "drop2": "dropout"}


def fusable_stem(patch_embed: nn.Module) -> bool:
    """Whether ops.patch_embed computes what calling `patch_embed` computes: fastvit's or timm's PatchEmbed
    with a plain Conv2d and identities for its other children (timm's norm)."""
    return plain(patch_embed, "patch_embed") and all(
        plain(child, "conv" if name == "proj" else "identity")
        for name, child in patch_embed._modules.items() if child is not None
    )


def fusable(block: nn.Module) -> bool:
    """Whether block_forward computes what calling the block's submodules computes: every part is
    plain() for its kind, and every other child of attn / mlp (timm's q_norm, k_norm, norm) an identity."""
    if _global_hooks():
        return False
    modules = block._modules  # (checked on every forward: _modules is the fast way to the children)
    for name, kind in _BLOCK_PARTS:
        if not plain(modules.get(name), kind):
            return False
    for parent, parts in ((modules["attn"], _ATTENTION_PARTS), (modules["mlp"], _MLP_PARTS)):
        for name, child in parent._modules.items():
            if child is not None and not plain(child, parts.get(name, "identity")):
                return False
    return True


_KNOWN_FORWARDS: dict = {}  # filled on first use


def known_forwards() -> dict:
    """kind -> the forward functions whose arithmetic the fused ops reproduce from the parameters:
    torch's, fastvit's and (when installed) timm's classes. Block, the model and patch_timm call it when
    built, so a compiled forward only reads the filled dict (a cache wrapper would be traced through)."""
    if not _KNOWN_FORWARDS:
        _KNOWN_FORWARDS.update(_collect_known_forwards())
    return _KNOWN_FORWARDS


def _collect_known_forwards() -> dict:
    kinds = {
        "norm": [nn.LayerNorm], "linear": [nn.Linear], "dropout": [nn.Dropout, nn.Identity],
        "identity": [nn.Identity], "gelu": [nn.GELU], "attention": [Attention], "mlp": [Mlp],
        "layer_scale": [LayerScale, nn.Identity], "drop_path": [DropPath, nn.Identity],
        "patch_embed": [PatchEmbed], "conv": [nn.Conv2d], "block": [Block],
    }  # fmt: skip
    try:
        from timm import layers as timm_layers
        from timm.models import vision_transformer as timm_vit
    except ImportError:
        timm_layers = timm_vit = None
    timm_classes = {
        "norm": ["LayerNorm"], "gelu": ["GELU", "GELUTanh"], "attention": ["Attention"], "mlp": ["Mlp"],
        "layer_scale": ["LayerScale"], "drop_path": ["DropPath"], "patch_embed": ["PatchEmbed"],
    }  # fmt: skip
    for kind, names in timm_classes.items():
        for module in (timm_layers, timm_vit):
            kinds[kind] += [getattr(module, n) for n in names if getattr(module, n, None) is not None]
    return {kind: frozenset(cls.forward for cls in classes) for kind, classes in kinds.items()}


def add_fused_block_class(cls) -> None:
    """Count `cls` (fastvit.patch_timm's subclass of timm's Block) as a block whose forward is block_forward."""
    known_forwards()["block"] |= {cls.forward}


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
