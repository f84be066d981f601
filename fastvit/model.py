"""fastvit.VisionTransformer: timm's VisionTransformer, same constructor kwargs and state_dict keys, with
every hot path on fastvit's fused ops, plus the timm-named model registry (create_model).

    images ─► [patch-embed GEMM + bias + pos-embed, cls/reg rows]          1 launch
           ─► [LN statistics of the tokens, for the first block's norm1]     1 launch
           ─► depth × block_forward (fastvit.layers)                        5 launches per block
           ─► [final LN on the pooled rows ▸ head GEMM]                       1 launch

forward_features() keeps timm's contract (every token normalised); forward() with 'token' pooling pools
first and normalises only the class rows inside the head GEMM, the same arithmetic since LayerNorm is
row-wise.
"""
import functools
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from fastvit import ops
from fastvit.layers import (Block, PatchEmbed, block_forward, fusable_stem, gelu_name, has_hooks, known_forwards,
                            plain, to_pair)  # fmt: skip
from fastvit.ops._common import check_int, check_positive, check_probability
from fastvit.ops.patch_embed import add_prefix_and_position

POOLS = ("", "token", "avg", "max", "avgmax")

# timm kwargs accepted only at their default value (the feature is not implemented): name -> default
_UNSUPPORTED_UNLESS_DEFAULT = {
    "qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "pos_embed": "learn",
    "patch_drop_rate": 0.0, "embed_norm_layer": None,
}  # fmt: skip
# timm's layer-class kwargs: accepted as None or as timm's own default class (named here: timm is optional)
_DEFAULT_LAYERS = {"embed_layer": "PatchEmbed", "block_fn": "Block", "mlp_layer": "Mlp", "attn_layer": "Attention"}


def _check_unsupported(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _DEFAULT_LAYERS:
            timm_default = getattr(value, "__name__", None) == _DEFAULT_LAYERS[name] and getattr(
                value, "__module__", "").startswith("timm.")
            if value is not None and not timm_default:
                raise NotImplementedError(f"{name}={value!r} is not supported by fastvit (only timm's default, "
                                          f"{_DEFAULT_LAYERS[name]})")  # fmt: skip
        elif name not in _UNSUPPORTED_UNLESS_DEFAULT:
            raise TypeError(f"VisionTransformer got an unexpected keyword argument {name!r}")
        elif value != _UNSUPPORTED_UNLESS_DEFAULT[name]:
            raise NotImplementedError(f"{name}={value!r} is not supported by fastvit (only the default)")


def _norm_factory(norm_layer):
    """dim -> LayerNorm module, from timm's norm_layer argument: None or a name of LayerNorm (timm's default,
    eps 1e-6), or a LayerNorm class / partial, checked by building one: its eps, affine and bias stay the
    user's (as timm builds them), and a class whose forward the fused ops do not reproduce is refused."""
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.replace("_", "").lower() == "layernorm"):
        return functools.partial(nn.LayerNorm, eps=1e-6)
    probe = norm_layer(8) if callable(norm_layer) and not isinstance(norm_layer, str) else None
    if not (isinstance(probe, nn.LayerNorm) and plain(probe, "norm") and len(probe.normalized_shape) == 1):
        raise NotImplementedError(f"norm_layer: fastvit fuses LayerNorm only, got {norm_layer!r}")
    return norm_layer


def _gelu_approximate(act_layer) -> str:
    """"none" or "tanh" from a timm act_layer argument (None, a name, a GELU class or partial)."""
    if act_layer is None or act_layer == "gelu":
        return "none"
    if act_layer == "gelu_tanh":
        return "tanh"
    if isinstance(act_layer, str):
        raise NotImplementedError(f"act_layer: fastvit fuses GELU only, got {act_layer!r}")
    module = act_layer()
    return "tanh" if gelu_name(module) == "gelu_tanh" else "none"


def _check_sizes(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, reg_tokens,
                 rates: dict) -> None:
    """The constructor's numeric arguments, checked before any module is built."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        for v in value if isinstance(value, (tuple, list)) else (value,):
            check_int(name, v, 1)
    for name, value, minimum in (("in_chans", in_chans, 1), ("num_classes", num_classes, 0),
                                 ("embed_dim", embed_dim, 1), ("depth", depth, 0), ("num_heads", num_heads, 1),
                                 ("reg_tokens", reg_tokens, 0)):  # fmt: skip
        check_int(name, value, minimum)
    check_positive("mlp_ratio", mlp_ratio)
    for name, rate in rates.items():
        check_probability(name, rate)


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2020) on fused Triton kernels; a drop-in for timm's.

    Takes timm's constructor kwargs and produces timm's state_dict keys. A kwarg whose feature fastvit
    does not implement (qk_norm, attention pooling, patch dropout, custom layers) raises
    NotImplementedError naming it, rather than being silently ignored.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        fix_init: bool = False,
        norm_layer=None,
        act_layer=None,
        device=None,
        dtype=None,
        **unsupported,
    ):
        super().__init__()
        _check_unsupported(unsupported)
        known_forwards()  # before any torch.compile trace of this model (fastvit.layers.plain)
        _check_sizes(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, reg_tokens,
                     dict(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                          attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate))  # fmt: skip
        if global_pool not in POOLS:
            raise NotImplementedError(f"global_pool: expected one of {POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if weight_init not in ("", "skip", "reset"):
            raise NotImplementedError(f"weight_init={weight_init!r}: fastvit implements timm's '' and 'reset' inits")
        norm_layer = _norm_factory(norm_layer)
        approximate = _gelu_approximate(act_layer)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, not pre_norm, dynamic_img_pad)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # also under a meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, init_values, norm_layer, approximate,
                  attn_drop_rate, proj_drop_rate, rates[i])
            for i in range(depth)
        ])  # fmt: skip
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if weight_init != "skip":
            self.init_weights(weight_init)
        self.fix_init = fix_init
        if fix_init and weight_init != "skip":
            self.fix_init_weight()
        # what timm's data helpers (resolve_data_config) and feature wrappers read; timm's ViT defaults
        self.pretrained_cfg = dict(
            input_size=(in_chans, *self.patch_embed.img_size), num_classes=num_classes, crop_pct=0.9,
            interpolation="bicubic", fixed_input_size=not dynamic_img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            first_conv="patch_embed.proj", classifier="head",
        )  # fmt: skip
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_embed.patch_size[0])
                             for i in range(depth)]  # fmt: skip
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ---- timm's utility API -------------------------------------------------------------------------

    def init_weights(self, mode: str = ""):
        """timm's init: truncated-normal(0.02) pos_embed, normal(1e-6) class / register tokens; then with
        mode '' truncated-normal(0.02) Linear weights and zero biases, with mode 'reset' every module's own
        reset_parameters() (torch's defaults)."""
        if mode not in ("", "reset"):
            raise NotImplementedError(f"mode: fastvit implements timm's '' and 'reset' inits, got {mode!r}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if mode == "reset" and m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif mode == "" and isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def fix_init_weight(self):
        """timm's fix_init: attn.proj and mlp.fc2 weights of block i divided by sqrt(2 (i + 1))."""
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_((2.0 * (i + 1)) ** 0.5)
                block.mlp.fc2.weight.div_((2.0 * (i + 1)) ** 0.5)

    def set_input_size(self, img_size=None, patch_size=None):
        """timm's: a new input resolution, the position embedding resampled to the new patch grid as timm
        resamples it. A new patch size (timm also resamples the patch projection) is not implemented."""
        if patch_size is not None and to_pair(patch_size) != self.patch_embed.patch_size:
            raise NotImplementedError("patch_size: changing the patch size is not implemented by fastvit")
        if img_size is None:
            return
        from fastvit.pos_embed import resample_pos_embed

        pe, old_grid = self.patch_embed, self.patch_embed.grid_size
        pe.img_size = to_pair(img_size)
        pe.grid_size = tuple(s // p for s, p in zip(pe.img_size, pe.patch_size))
        pe.num_patches = pe.grid_size[0] * pe.grid_size[1]
        if pe.grid_size != old_grid:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                resampled = resample_pos_embed(self.pos_embed, pe.grid_size, num_prefix_tokens=prefix, old_grid=old_grid)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        self.pretrained_cfg = dict(self.pretrained_cfg, input_size=(self.in_chans, *pe.img_size))

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay in timm.optim): stem, then one per block."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])  # fmt: skip

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in POOLS:
                raise NotImplementedError(f"global_pool: expected one of {POOLS}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs class_token=True")
            self.global_pool = global_pool
        ref = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    # ---- forward ------------------------------------------------------------------------------------

    def _pos_embed_for(self, grid) -> torch.Tensor:
        """The position embedding for a patch grid: the parameter itself, or (dynamic_img_size) resampled."""
        if tuple(grid) == self.patch_embed.grid_size:
            return self.pos_embed
        from fastvit.pos_embed import resample_pos_embed

        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_pos_embed(self.pos_embed, tuple(grid), num_prefix_tokens=prefix,
                                  old_grid=self.patch_embed.grid_size)  # fmt: skip

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, prefix + N, D) tokens with position embeddings."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected images of shape (B, {self.in_chans}, H, W), got {got}")
        P = self.patch_embed.patch_size[0]
        H, W = x.shape[-2:]
        if not self.dynamic_img_size and (H, W) != self.patch_embed.img_size:  # checked before padding, as timm
            raise ValueError(f"x: image size {(H, W)} does not match the model's img_size "
                             f"{self.patch_embed.img_size} (build with dynamic_img_size=True to allow any size)")  # fmt: skip
        grid = patch_grid(self.patch_embed, (H, W))
        if self.patch_embed.dynamic_img_pad and (H % P or W % P):
            x = F.pad(x, (0, -W % P, 0, -H % P))  # timm pads right and bottom with zeros
            H, W = x.shape[-2:]
        if H < P or W < P:
            raise ValueError(f"x: image size {(H, W)} is smaller than one {P}x{P} patch")
        pos_embed = self._pos_embed_for(grid)
        if fusable_stem(self.patch_embed):
            proj = self.patch_embed.proj
            x = ops.patch_embed(x, proj.weight, proj.bias, pos_embed, self.cls_token, self.reg_token,
                                self.no_embed_class)  # fmt: skip
        else:  # a wrapped or hooked stem: called as a module
            tokens = self.patch_embed(x)
            tokens = tokens.flatten(1, 2) if tokens.dim() == 4 else tokens  # timm's NHWC output (dynamic_img_size)
            x = add_prefix_and_position(tokens, pos_embed, self.cls_token, self.reg_token, self.no_embed_class)
        return self._norm(self.pos_drop(x), self.norm_pre)

    def _blocks(self, x: torch.Tensor):
        """(x after every block, its LayerNorm statistics or None). Each block hands the statistics its
        last GEMM emitted to the next one's norm1; the blocks container is called as a module when it has
        hooks."""
        if has_hooks(self.blocks):
            return self.blocks(x), None
        x_stats = None
        for block in self.blocks:
            x, x_stats = self._block(block, x, x_stats)
        return x, x_stats

    def _block(self, block: nn.Module, x: torch.Tensor, x_stats):
        """(block(x), its statistics or None), checkpointed when enabled. A block with hooks, or one whose
        forward is not block_forward (a subclass, a wrapper such as checkpoint_wrapper or torch.compile, an
        nn.Identity dropping it) is called as a module (it then takes its own LayerNorm statistics)."""
        as_module = has_hooks(block) or not plain(block, "block")
        call, args = (block, (x,)) if as_module else (block_forward, (block, x, x_stats, True))
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False)
        else:
            out = call(*args)
        return (out, None) if as_module else out

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):  # fmt: skip
        """timm's forward_intermediates (without attn_mask / output_dict): the outputs of the blocks in
        `indices` (None: all, an int n: the last n, a sequence: those, negative from the end) as NCHW feature
        maps or NLC tokens, the prefix tokens split off (paired with them if return_prefix_tokens), each
        through the final norm if norm. Returns (final features, intermediates), or only the intermediates."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        images, x = x, self._embed(x)
        grid = patch_grid(self.patch_embed, images.shape[-2:])
        x_stats, intermediates = None, []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            x, x_stats = self._block(block, x, x_stats)
            if i in take:
                intermediates.append(self._norm(x, self.norm) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self._norm(x, self.norm), intermediates)

    def get_intermediate_layers(self, x: torch.Tensor, n=1, reshape: bool = False, return_prefix_tokens: bool = False,
                                norm: bool = False):  # fmt: skip
        """timm's (DINO's) interface: forward_intermediates' intermediates of the last n blocks (or those listed)."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)  # fmt: skip

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """timm's: drop the blocks after the last of `indices` (and the final norm / the head if asked);
        returns the kept indices."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    @staticmethod
    def _norm(x, norm: nn.Module):
        """norm(x): on fastvit's LayerNorm kernel when norm is a plain LayerNorm, else called as a module."""
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps) if plain(norm, "norm") else norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D), every token through the final norm (timm's contract)."""
        return self._norm(self._blocks(self._embed(x))[0], self.norm)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled, fc-normalised features -> logits (or the features with pre_logits=True)."""
        return self._head(self.pool(x), self.fc_norm, pre_logits)

    def _head(self, x: torch.Tensor, norm: nn.Module, pre_logits: bool = False, x_stats=None) -> torch.Tensor:
        """norm -> head_drop -> head on pooled (B, D) features; a LayerNorm is fused into the head GEMM's
        prologue whenever nothing (an active head dropout, pre_logits) stands between them, taking x's
        statistics from x_stats when given."""
        head_drop_idle = plain(self.head_drop, "dropout") and not (self.head_drop.training and self.head_drop.p > 0)
        if not pre_logits and plain(self.head, "linear") and plain(norm, "norm") and head_drop_idle:
            return ops.layer_norm_linear(x, norm.weight, norm.bias, self.head.weight, self.head.bias, eps=norm.eps,
                                         x_stats=x_stats)  # fmt: skip
        x = self.head_drop(self._norm(x, norm))
        if pre_logits:
            return x
        return ops.linear(x, self.head.weight, self.head.bias) if plain(self.head, "linear") else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(getattr(type(self), name) is not getattr(VisionTransformer, name) or name in self.__dict__
               for name in ("forward_features", "forward_head")):  # fmt: skip
            return self.forward_head(self.forward_features(x))  # a subclass's own stages, as timm's forward
        x, x_stats = self._blocks(self._embed(x))
        norms_plain = all(plain(n, "norm") or plain(n, "identity") for n in (self.norm, self.fc_norm))
        if self.global_pool == "token" and norms_plain:
            # LayerNorm is row-wise: normalising only the class row equals normalising every row and then
            # pooling, so the final norm runs on B rows, fused into the head GEMM, with those rows'
            # statistics from the last block. At most one of norm / fc_norm is a LayerNorm (timm places
            # the final norm before or after pooling, never both).
            final_norm = self.norm if plain(self.norm, "norm") else self.fc_norm
            return self._head(x[:, 0], final_norm, x_stats=None if x_stats is None else x_stats[..., 0])
        return self.forward_head(self._norm(x, self.norm))


def patch_grid(patch_embed: nn.Module, image_size) -> Tuple[int, int]:
    """The (rows, columns) of patches an image of `image_size` (H, W) makes: rounded up when the stem pads
    (dynamic_img_pad), else down."""
    P, (H, W) = patch_embed.patch_size[0], image_size
    return (-(-H // P), -(-W // P)) if patch_embed.dynamic_img_pad else (H // P, W // P)


def _take_indices(num_blocks: int, indices):
    """timm's feature_take_indices: (sorted block indices, the last one) for None (every block), an int n
    (the last n) or a sequence of indices (negative ones count from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, numbers.Integral):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices: expected 1..{num_blocks} (the last n blocks), got {indices}")
        take = list(range(num_blocks - int(indices), num_blocks))
    else:
        take = sorted(num_blocks + int(i) if i < 0 else int(i) for i in indices)
        if not take or not all(0 <= i < num_blocks for i in take):
            raise ValueError(f"indices: expected block indices in -{num_blocks}..{num_blocks - 1}, got {indices!r}")
    return take, take[-1]


# ---- registry: timm's names and configs ---------------------------------------------------------------

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
# The (size, patch, resolution) triples timm registers.
_VARIANTS = [
    ("tiny", 16, 224), ("tiny", 16, 384), ("small", 32, 224), ("small", 32, 384), ("small", 16, 224),
    ("small", 16, 384), ("base", 32, 224), ("base", 32, 384), ("base", 16, 224), ("base", 16, 384),
    ("large", 32, 224), ("large", 32, 384), ("large", 16, 224), ("large", 16, 384), ("large", 14, 224),
    ("huge", 14, 224),
]  # fmt: skip
MODEL_CONFIGS = {
    f"vit_{size}_patch{patch}_{res}": dict(_SIZES[size], patch_size=patch, img_size=res)
    for size, patch, res in _VARIANTS
}


def list_models():
    return sorted(MODEL_CONFIGS)


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs):
    """A registered ViT by timm's name, with timm's kwargs overriding its config.

    Weights come from `checkpoint_path` (timm .pth / .safetensors, Hugging Face, Google .npz; see
    fastvit.load_checkpoint). fastvit downloads nothing: pretrained=True without a checkpoint_path is an
    error that says how to pass one.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str such as 'vit_base_patch16_224', got {type(name).__name__}")
    if name not in MODEL_CONFIGS:
        raise ValueError(f"name: unknown model {name!r}; available: {', '.join(list_models())}")
    if pretrained and checkpoint_path is None:
        raise ValueError(
            f"pretrained=True for {name!r}: fastvit does not download weights. Pass checkpoint_path= a local "
            f"timm .pth/.safetensors, Hugging Face or Google .npz checkpoint, or build from a timm model with "
            f"fastvit.from_timm(timm.create_model({name!r}, pretrained=True))"
        )
    model = VisionTransformer(**dict(MODEL_CONFIGS[name], **kwargs))
    if checkpoint_path is not None:
        from fastvit.weights import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
