"""fastvit.weights: checkpoints in every common ViT layout, and timm models brought onto the fused ops.

fastvit speaks timm's state_dict layout (cls_token, reg_token, pos_embed, patch_embed.proj.*,
blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm, fc_norm,
head), so everything here converts other layouts into it:

    convert_hf_state_dict(sd)       Hugging Face transformers ViT, v4 and v5 key names -> timm keys
    convert_npz(path)               Google's .npz (vision_transformer and big_vision)    -> timm keys
    save_npz(model, path)           timm keys -> Google's vision_transformer .npz layout
    load_checkpoint(model, path)    any of those files (or a save_pretrained folder) into any module with
                                    timm's keys, resampling the position embedding to the model's grid
    from_timm(timm_model)           a fastvit.VisionTransformer with the same config and weights
    patch_timm(timm_model)          the same timm model, its blocks and patch embedding on fastvit.ops

Everything works on plain state_dicts and module attributes, never on a particular model class: a timm
VisionTransformer and a fastvit one load the same files.

Caution:
- The Google layout has no place for register tokens, LayerScale or a post-pool norm (fc_norm): save_npz
  writes them under the extension names `reg`, `{block}/ls{1,2}/gamma` and `fc_norm/{scale,bias}`, which
  convert_npz reads back and timm's own .npz loader ignores.
- Tensors in a checkpoint that the converters do not understand are kept under their own names, so a
  strict load reports them (e.g. the `pre_logits/*` layer of old ImageNet-21k .npz files, which timm drops
  silently); pass strict=False to skip them.
"""
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers ViT
# ---------------------------------------------------------------------------------------------------------

# Key (without the `vit.` prefix) -> timm key. v4 names first, v5 names (transformers >= 5) second.
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
# q, k and v are separate Linears in transformers and one fused qkv Linear (rows q, then k, then v) in timm.
_HF_QKV = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\."
                     r"(weight|bias)")  # fmt: skip
# The pooler (dense + tanh on the class token) is unused by ViTForImageClassification, which timm matches;
# the mask token belongs to masked-image pretraining.
_HF_DROPPED = re.compile(r"pooler\..*|embeddings\.mask_token")


def is_hf_state_dict(state_dict: Mapping) -> bool:
    """Whether a state_dict holds a transformers ViTModel / ViTForImageClassification."""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state_dict)


def convert_hf_state_dict(state_dict: Mapping) -> dict:
    """A transformers ViT state_dict (v4 or v5 key names, with or without `vit.`) -> timm's keys.

    q / k / v are fused into qkv, classifier becomes head, the pooler and mask token are dropped. Keys it
    does not recognise are kept unchanged, so a strict load names them. The model it loads into must use
    transformers' numerics: HF ViT's LayerNorm eps is config.layer_norm_eps (1e-12 by default) and its
    GELU is exact.
    """
    out, qkv_parts = {}, {}
    for key, value in state_dict.items():
        name = key[len("vit."):] if key.startswith("vit.") else key
        if _HF_DROPPED.fullmatch(name):
            continue
        qkv = _HF_QKV.fullmatch(name)
        if qkv:
            block, long_name, short_name, param = qkv.groups()
            qkv_parts.setdefault((block, param), {})[(long_name or short_name)[0]] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            if re.fullmatch(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        out[name] = value
    for (block, param), parts in sorted(qkv_parts.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"state_dict: layer {block} has attention {param}s for {sorted(parts)} but not for "
                             f"{missing}; cannot fuse q, k, v into blocks.{block}.attn.qkv.{param}")  # fmt: skip
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---------------------------------------------------------------------------------------------------------
# Google .npz (github.com/google-research/vision_transformer and big_vision), as timm's _load_weights reads it
# ---------------------------------------------------------------------------------------------------------

_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")
_SCANNED = "Transformer/encoderblock/"  # big_vision's scanned layout: one array per name, stacked over blocks


def _npz_names(big_vision: bool) -> dict:
    """Sub-module names that differ between the two Google codebases."""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    return {
        "pos_embed": "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding",
        "attn": f"MultiHeadDotProductAttention_{mha}/",
        "norm2": f"LayerNorm_{ln2}/",
        "mlp": f"MlpBlock_{mlp}/",
    }


# (timm key, npz key, layout) outside the blocks; layouts are defined by _to_timm / _to_npz.
_NPZ_TOP = [
    ("patch_embed.proj.weight", "embedding/kernel", "conv"),
    ("patch_embed.proj.bias", "embedding/bias", "copy"),
    ("cls_token", "cls", "copy"),
    ("reg_token", "reg", "copy"),  # fastvit extension
    ("pos_embed", None, "copy"),  # name from _npz_names
    ("norm.weight", "Transformer/encoder_norm/scale", "copy"),
    ("norm.bias", "Transformer/encoder_norm/bias", "copy"),
    ("fc_norm.weight", "fc_norm/scale", "copy"),  # fastvit extension
    ("fc_norm.bias", "fc_norm/bias", "copy"),  # fastvit extension
    ("head.weight", "head/kernel", "dense"),
    ("head.bias", "head/bias", "copy"),
]


def _npz_block(names: dict) -> list:
    """(timm key within blocks.{i}., npz key within the block, layout), q/k/v excepted."""
    attn, mlp, ln2 = names["attn"], names["mlp"], names["norm2"]
    return [
        ("norm1.weight", "LayerNorm_0/scale", "copy"),
        ("norm1.bias", "LayerNorm_0/bias", "copy"),
        ("attn.proj.weight", f"{attn}out/kernel", "heads_in"),
        ("attn.proj.bias", f"{attn}out/bias", "copy"),
        ("norm2.weight", f"{ln2}scale", "copy"),
        ("norm2.bias", f"{ln2}bias", "copy"),
        ("mlp.fc1.weight", f"{mlp}Dense_0/kernel", "dense"),
        ("mlp.fc1.bias", f"{mlp}Dense_0/bias", "copy"),
        ("mlp.fc2.weight", f"{mlp}Dense_1/kernel", "dense"),
        ("mlp.fc2.bias", f"{mlp}Dense_1/bias", "copy"),
        ("ls1.gamma", "ls1/gamma", "copy"),  # fastvit extension
        ("ls2.gamma", "ls2/gamma", "copy"),  # fastvit extension
    ]


def _to_timm(array: np.ndarray, layout: str) -> torch.Tensor:
    """One Flax array -> the timm tensor (timm's _n2p, including its (1, 1, 1, X) squeeze)."""
    if array.ndim == 4 and array.shape[:3] == (1, 1, 1):
        array = array.reshape(-1)
    if layout == "conv":  # (P, P, C, D) -> (D, C, P, P)
        array = array.transpose(3, 2, 0, 1)
    elif layout == "dense":  # (in, out) -> (out, in)
        array = array.T
    elif layout == "heads_in":  # attention out kernel (H, d, D) -> (D, H * d)
        array = array.transpose(2, 0, 1).reshape(array.shape[2], -1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_npz(tensor: torch.Tensor, layout: str, num_heads: int) -> np.ndarray:
    """The inverse of _to_timm: one timm tensor -> the Flax array, stored as float32."""
    array = tensor.detach().to("cpu", torch.float32).numpy()
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    if layout == "dense":
        return array.T
    if layout == "heads_in":
        dim = array.shape[0]
        return array.reshape(dim, num_heads, -1).transpose(1, 2, 0)
    return array


def _open_npz(npz_or_path):
    if isinstance(npz_or_path, (str, os.PathLike)):
        with np.load(npz_or_path) as npz:
            return {k: npz[k] for k in npz.files}
    return npz_or_path


def convert_npz(npz_or_path, prefix: str = None) -> dict:
    """A Google ViT .npz (a path, or a mapping of its arrays) -> timm keys, following timm's _load_weights.

    Reads the vision_transformer layout (Transformer/encoderblock_{i}/..., MultiHeadDotProductAttention_1,
    MlpBlock_3) and big_vision's (params/ prefix, pos_embedding, MultiHeadDotProductAttention_0, and the
    scanned Transformer/encoderblock/ arrays stacked over blocks). `prefix` defaults to the first of
    "", "opt/target/", "params/", "params/img/" under which embedding/kernel exists.
    """
    w = _open_npz(npz_or_path)
    if prefix is None:
        prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in w), None)
        if prefix is None:
            raise ValueError(f"npz: no embedding/kernel under any of the prefixes {_NPZ_PREFIXES}; "
                             f"is this a Google ViT checkpoint? First keys: {sorted(w)[:8]}")  # fmt: skip
    scanned = f"{prefix}{_SCANNED}LayerNorm_0/scale" in w
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in w or scanned
    names = _npz_names(big_vision)
    used, out = set(), {}

    def take(timm_key, npz_key, layout, block=None):
        key = prefix + npz_key
        if key in w:
            used.add(key)
            out[timm_key] = _to_timm(w[key] if block is None else w[key][block], layout)

    for timm_key, npz_key, layout in _NPZ_TOP:
        take(timm_key, npz_key or names[timm_key], layout)
    if scanned:
        depth = w[f"{prefix}{_SCANNED}LayerNorm_0/scale"].shape[0]
        blocks = [(i, _SCANNED, i) for i in range(depth)]
    else:
        found = (re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k) for k in w)
        depth = 1 + max((int(m.group(1)) for m in found if m), default=-1)
        blocks = [(i, f"Transformer/encoderblock_{i}/", None) for i in range(depth)]
    for i, block_prefix, index in blocks:
        for timm_key, npz_key, layout in _npz_block(names):
            take(f"blocks.{i}.{timm_key}", block_prefix + npz_key, layout, index)
        for param, layout in (("kernel", "weight"), ("bias", "bias")):
            keys = [f"{prefix}{block_prefix}{names['attn']}{n}/{param}" for n in ("query", "key", "value")]
            if all(k in w for k in keys):
                used.update(keys)
                # query/key/value kernels (D, H, d) -> rows of qkv (3 * H * d, D); biases (H, d) -> (3 * H * d,)
                parts = [w[k] if index is None else w[k][index] for k in keys]
                parts = [p.reshape(p.shape[0], -1).T if param == "kernel" else p.reshape(-1) for p in parts]
                out[f"blocks.{i}.attn.qkv.{layout}"] = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))
    # anything under the prefix that was not understood: kept, so a strict load names it
    out.update({k[len(prefix):]: torch.from_numpy(np.asarray(w[k])) for k in w
                if k.startswith(prefix) and k not in used})  # fmt: skip
    return out


def save_npz(model_or_state_dict, path, num_heads: int = None) -> None:
    """Write a timm-keyed model or state_dict in Google's vision_transformer .npz layout (float32).

    timm's VisionTransformer.load_pretrained(path) and convert_npz read it back. The attention kernels are
    stored per head, (D, H, d): num_heads is read from the model's blocks[0].attn.num_heads, or must be
    given with a bare state_dict. Keys the layout cannot hold raise ValueError.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
        if num_heads is None:
            num_heads = model_or_state_dict.blocks[0].attn.num_heads
    else:
        state_dict = dict(model_or_state_dict)
    if num_heads is None:
        raise ValueError("num_heads: required when saving a bare state_dict (the .npz stores q/k/v per head)")
    names = _npz_names(big_vision=False)
    table = [(t, n or names[t], layout) for t, n, layout in _NPZ_TOP]
    depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, state_dict) if m), default=-1)
    for i in range(depth):
        table += [(f"blocks.{i}.{t}", f"Transformer/encoderblock_{i}/{n}", lay) for t, n, lay in _npz_block(names)]
    arrays = {n: _to_npz(state_dict[t], layout, num_heads) for t, n, layout in table if t in state_dict}
    written = {t for t, _, _ in table if t in state_dict}
    for i in range(depth):
        for param in ("weight", "bias"):
            qkv = state_dict.get(f"blocks.{i}.attn.qkv.{param}")
            if qkv is None:
                continue
            written.add(f"blocks.{i}.attn.qkv.{param}")
            for name, part in zip(("query", "key", "value"), qkv.detach().to("cpu", torch.float32).chunk(3)):
                # (H * d, D) rows -> kernel (D, H, d); bias (H * d,) -> (H, d)
                array = part.T.reshape(part.shape[1], num_heads, -1) if param == "weight" else part.reshape(num_heads, -1)
                npz_param = "kernel" if param == "weight" else "bias"
                arrays[f"Transformer/encoderblock_{i}/{names['attn']}{name}/{npz_param}"] = array.numpy()
    left = sorted(set(state_dict) - written)
    if left:
        raise ValueError(f"save_npz: the Google .npz layout has no place for {left}")
    np.savez(path, **arrays)


# ---------------------------------------------------------------------------------------------------------
# Loading files into a model
# ---------------------------------------------------------------------------------------------------------

# A folder written by transformers' save_pretrained: the first of these that exists is read.
_PRETRAINED_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")  # fmt: skip
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def read_checkpoint(path, use_ema: bool = True) -> tuple[dict, str]:
    """The tensors of a checkpoint file or save_pretrained folder, in timm's keys, and its layout.

    Layout is "timm", "hf" (converted from transformers) or "npz" (converted from Google's); it selects
    how the position embedding is resampled. Training checkpoints are unwrapped: 'state_dict_ema' /
    'model_ema' (when use_ema), then 'state_dict' / 'model'; 'module.' and '_orig_mod.' prefixes dropped.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = next((f for f in _PRETRAINED_FILES if os.path.isfile(os.path.join(path, f))), None)
        if found is None:
            raise FileNotFoundError(f"{path}: a folder, but none of {_PRETRAINED_FILES} is in it")
        path = os.path.join(path, found)
    if path.endswith(".npz"):
        return convert_npz(path), "npz"
    if path.endswith(".index.json"):  # a sharded save_pretrained checkpoint
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(_read_tensors(os.path.join(os.path.dirname(path), shard)))
    else:
        state_dict = _read_tensors(path)
    state_dict = _unwrap(state_dict, use_ema, path)
    if is_hf_state_dict(state_dict):
        return convert_hf_state_dict(state_dict), "hf"
    return state_dict, "timm"


def _read_tensors(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(checkpoint, use_ema, path):
    containers = (("state_dict_ema", "model_ema") if use_ema else ()) + ("state_dict", "model")
    inner = next((checkpoint[k] for k in containers if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    state_dict = {}
    for key, value in inner.items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key[len(wrapper):] if key.startswith(wrapper) else key
        state_dict[key] = value
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: not a state_dict: {not_tensors[:8]} are not tensors (looked inside "
                         f"{', '.join(map(repr, containers))} first)")  # fmt: skip
    return state_dict


def load_checkpoint(model: nn.Module, path, strict: bool = True, use_ema: bool = True) -> nn.Module:
    """Load a timm .pth/.bin/.safetensors, a transformers ViT checkpoint (file or save_pretrained folder,
    v4 or v5 key names) or a Google .npz into `model`, any module with timm's ViT keys. Returns the model.

    A position embedding for another grid is resampled to the model's (timm's bicubic + antialias for timm
    checkpoints, transformers' bicubic for HF ones, timm's npz loader's bilinear for .npz). Keys missing
    from either side or of the wrong shape raise ValueError listing them; strict=False loads the tensors
    that fit and warns about the rest.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module with timm's ViT keys, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike checkpoint file or folder, got {type(path).__name__}")
    state_dict, layout = read_checkpoint(path, use_ema=use_ema)
    _fit_pos_embed(state_dict, model, layout, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        report = _mismatch_report(model, path, layout, state_dict, expected, missing, unexpected, wrong_shape)
        if strict:
            raise ValueError(report + "\nPass strict=False to load only the tensors that fit.")
        warnings.warn(report + "\nLoaded the tensors that fit (strict=False).", stacklevel=2)
        for key in unexpected + wrong_shape:
            del state_dict[key]
    model.load_state_dict(state_dict, strict=False)
    return model


def _mismatch_report(model, path, layout, state_dict, expected, missing, unexpected, wrong_shape):
    read_as = {"timm": "", "hf": " (a Hugging Face ViT checkpoint, keys converted to timm's)",
               "npz": " (a Google .npz, keys converted to timm's)"}[layout]  # fmt: skip
    lines = [f"load_checkpoint: {os.fspath(path)}{read_as} does not fit {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected)}")
    for key in wrong_shape:
        lines.append(f"  shape mismatch: {key}: checkpoint {tuple(state_dict[key].shape)}, "
                     f"model {tuple(expected[key].shape)}")  # fmt: skip
    return "\n".join(lines)


def _fit_pos_embed(state_dict, model, layout, path):
    """Resample the checkpoint's pos_embed in place when its grid differs from the model's."""
    theirs, ours = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if theirs is None or not isinstance(ours, torch.Tensor) or theirs.shape == ours.shape:
        return
    if theirs.dim() != 3 or theirs.shape[0] != 1 or theirs.shape[2] != ours.shape[2]:
        return  # not a grid question: the shape check reports it
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    new_grid = _model_grid(model, ours.shape[1] - prefix)
    side = math.isqrt(theirs.shape[1] - prefix)
    if side * side != theirs.shape[1] - prefix:
        raise ValueError(f"{os.fspath(path)}: pos_embed {tuple(theirs.shape)} is not {prefix} prefix token(s) "
                         f"plus a square grid, so it cannot be resampled to the model's grid {new_grid}")  # fmt: skip
    from fastvit.pos_embed import resample_pos_embed

    # the layout names the resampling convention of the checkpoint's own library
    state_dict["pos_embed"] = resample_pos_embed(theirs, new_grid, num_prefix_tokens=prefix, old_grid=(side, side),
                                                 style=layout)  # fmt: skip


def _model_grid(model, num_patches):
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return tuple(int(g) for g in grid)
    side = math.isqrt(num_patches)
    return side, side


# ---------------------------------------------------------------------------------------------------------
# timm models: from_timm (a fastvit copy) and patch_timm (in place)
# ---------------------------------------------------------------------------------------------------------


def from_timm(timm_model: nn.Module) -> nn.Module:
    """A fastvit.VisionTransformer with `timm_model`'s config and a copy of its weights (strict load).

    The copy sits on the timm model's device and dtype, in its train/eval mode. A feature fastvit does
    not implement (qk_norm, attention pooling, RmsNorm, a non-GELU activation, ...) raises
    NotImplementedError naming it.
    """
    from fastvit.model import VisionTransformer

    _raise_unsupported(timm_model, whole_model=True)
    ref = timm_model.pos_embed
    model = VisionTransformer(**_timm_config(timm_model), weight_init="skip", device=ref.device, dtype=ref.dtype)
    model.load_state_dict(timm_model.state_dict(), strict=True)
    model.pretrained_cfg = dict(getattr(timm_model, "pretrained_cfg", None) or model.pretrained_cfg)
    model.grad_checkpointing = getattr(timm_model, "grad_checkpointing", False)
    frozen = {name for name, p in timm_model.named_parameters() if not p.requires_grad}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model.train(timm_model.training)


def _timm_config(m: nn.Module) -> dict:
    """fastvit.VisionTransformer kwargs that rebuild timm VisionTransformer `m` (checked by
    _raise_unsupported first)."""
    block = m.blocks[0]
    hidden = block.mlp.fc1.out_features
    drop_path = m.blocks[-1].drop_path1  # timm's rates rise linearly to drop_path_rate at the last block
    ls = block.ls1
    return dict(
        img_size=tuple(m.patch_embed.img_size), patch_size=m.patch_embed.patch_size[0], in_chans=m.in_chans,
        num_classes=m.num_classes, global_pool=m.global_pool, embed_dim=m.embed_dim, depth=len(m.blocks),
        # timm builds fc1 with int(embed_dim * mlp_ratio) outputs: a ratio half an output above rounds back exactly
        num_heads=block.attn.num_heads, mlp_ratio=(hidden + 0.5) / m.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, proj_bias=block.attn.proj.bias is not None,
        # any non-zero value builds LayerScale; its gamma is then loaded
        init_values=1.0 if hasattr(ls, "gamma") else None,
        class_token=m.cls_token is not None, no_embed_class=m.no_embed_class, reg_tokens=m.num_reg_tokens,
        pre_norm=not isinstance(m.norm_pre, nn.Identity),
        final_norm=not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),
        fc_norm=not isinstance(m.fc_norm, nn.Identity), pool_include_prefix=m.pool_include_prefix,
        dynamic_img_size=m.dynamic_img_size, dynamic_img_pad=m.patch_embed.dynamic_img_pad,
        drop_rate=m.head_drop.p, pos_drop_rate=m.pos_drop.p, proj_drop_rate=block.attn.proj_drop.p,
        attn_drop_rate=block.attn.attn_drop.p, drop_path_rate=float(getattr(drop_path, "drop_prob", 0.0)),
        norm_layer=functools.partial(nn.LayerNorm, eps=block.norm1.eps),
        act_layer=_fused_layers().gelu_name(block.mlp.act),
    )  # fmt: skip


def patch_timm(timm_model: nn.Module) -> nn.Module:
    """Run timm VisionTransformer `timm_model` on fastvit's fused ops, in place; returns it.

    The blocks and the model swap their class for a fastvit subclass of timm's (isinstance still holds,
    state_dict, parameters and hooks are untouched: the weights stay shared, nothing is copied): each
    block runs fastvit.layers.block_forward, and forward_features runs fastvit's fused patch embedding,
    blocks and final norm. The pooling and head stay timm's. Calls with attn_mask / is_causal, and
    forward_intermediates, take timm's own path. Calling it twice is harmless. A feature the fused path
    lacks (qk_norm, RmsNorm, a non-GELU activation, ...) raises NotImplementedError naming it.
    """
    fused_block, fused_model = _fused_timm_classes()  # (which also fills layers.known_forwards before any trace)
    if type(timm_model) is fused_model:
        return timm_model
    _raise_unsupported(timm_model, whole_model=False)
    for block in timm_model.blocks:
        block.__class__ = fused_block
    timm_model.__class__ = fused_model
    return timm_model


def _fused_layers():
    from fastvit import layers

    return layers


@functools.cache
def _fused_timm_classes():
    """Subclasses of timm's Block and VisionTransformer whose forwards run the fused ops.

    Built on first use (timm is an optional dependency) and published as module attributes, so patched
    models pickle and deepcopy.
    """
    from timm.models.vision_transformer import Block, VisionTransformer

    from fastvit.model import VisionTransformer as Fused

    block_forward = _fused_layers().block_forward

    class FusedTimmBlock(Block):
        """timm's Block on fastvit.layers.block_forward (masked attention falls back to timm's code)."""

        def forward(self, x, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            return block_forward(self, x)

    class FusedTimmVisionTransformer(VisionTransformer):
        """timm's VisionTransformer whose forward_features is fastvit's (fused patch embedding)."""

        _embed = Fused._embed
        _pos_embed_for = Fused._pos_embed_for
        _blocks = Fused._blocks
        _block = Fused._block
        _norm = staticmethod(Fused._norm)

        def forward_features(self, x, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
            return Fused.forward_features(self, x)

    _fused_layers().add_fused_block_class(FusedTimmBlock)
    for cls in (FusedTimmBlock, FusedTimmVisionTransformer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return FusedTimmBlock, FusedTimmVisionTransformer


def __getattr__(name):
    """Resolves the patched classes by name (pickle looks them up here)."""
    if name in ("FusedTimmBlock", "FusedTimmVisionTransformer"):
        return dict(zip(("FusedTimmBlock", "FusedTimmVisionTransformer"), _fused_timm_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _raise_unsupported(model: nn.Module, whole_model: bool) -> None:
    """NotImplementedError listing every feature of timm model `model` the fused path cannot run.

    whole_model: also check what only from_timm rebuilds (attention pooling, one LayerNorm eps, the
    DropPath flavour); patch_timm leaves those modules to timm.
    """
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer:
        raise NotImplementedError(f"model: expected timm's VisionTransformer, got {type(model).__name__}")
    problems = {}  # feature -> where
    pe = model.patch_embed
    if type(pe).__name__ != "PatchEmbed" or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        problems[f"embed_layer={type(pe).__name__}"] = "patch_embed"
    else:
        if not isinstance(pe.norm, nn.Identity):
            problems["embed_norm_layer"] = "patch_embed.norm"
        if pe.patch_size[0] != pe.patch_size[1]:
            problems[f"non-square patch_size={tuple(pe.patch_size)}"] = "patch_embed"
    if model.pos_embed is None:
        problems["pos_embed='none'"] = "pos_embed"
    if not isinstance(model.patch_drop, nn.Identity):
        problems["patch_drop_rate > 0"] = "patch_drop"
    norms = {"norm_pre": model.norm_pre, "norm": model.norm}
    if whole_model:
        norms["fc_norm"] = model.fc_norm
        if model.attn_pool is not None:
            problems[f"global_pool={model.global_pool!r} (attention pooling)"] = "attn_pool"
    for i, block in enumerate(model.blocks):
        for feature in _block_problems(block, whole_model):
            problems.setdefault(feature, f"blocks.{i}")
        if type(block) is Block:  # (another block class is reported whole, above)
            norms.update({f"blocks.{i}.norm1": block.norm1, f"blocks.{i}.norm2": block.norm2})
    for where, norm in norms.items():
        if not isinstance(norm, nn.Identity) and not _is_layer_norm(norm):
            problems.setdefault(f"norm_layer={type(norm).__name__} (fastvit fuses LayerNorm only)", where)
    eps = {norm.eps for norm in norms.values() if _is_layer_norm(norm)}
    if whole_model and len(eps) > 1:
        problems[f"LayerNorms with different eps {sorted(eps)}"] = "norm layers"
    if problems:
        listing = "; ".join(f"{feature} (at {where})" for feature, where in problems.items())
        raise NotImplementedError(f"{type(model).__name__} uses features fastvit does not fuse: {listing}")


def _is_layer_norm(m: nn.Module) -> bool:
    return (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.weight is not None
            and m.bias is not None)  # fmt: skip


def _block_problems(block: nn.Module, whole_model: bool) -> list:
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        return [f"block_fn={type(block).__name__}"]
    attn, mlp, problems = block.attn, block.mlp, []
    if type(attn) is not Attention:
        problems.append(f"attn_layer={type(attn).__name__}")
    else:
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            problems.append("qk_norm=True")
        if not isinstance(attn.norm, nn.Identity):
            problems.append("scale_attn_norm=True")
        if getattr(attn, "gate", None) is not None:
            problems.append("gated attention")
        if attn.num_heads * attn.head_dim != attn.qkv.in_features:
            problems.append(f"attn_head_dim={attn.head_dim} (num_heads * head_dim != embed_dim)")
    if type(mlp) is not Mlp:
        problems.append(f"mlp_layer={type(mlp).__name__}")
    else:
        if not isinstance(mlp.norm, nn.Identity):
            problems.append("scale_mlp_norm=True")
        if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            problems.append("Mlp(use_conv=True)")
        try:
            _fused_layers().gelu_name(mlp.act)
        except NotImplementedError:
            problems.append(f"act_layer={type(mlp.act).__name__} (fastvit fuses GELU only)")
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(block, name), nn.Identity) and not hasattr(getattr(block, name), "gamma"):
            problems.append(f"{name}={type(getattr(block, name)).__name__}")
    if whole_model:
        for name in ("drop_path1", "drop_path2"):
            if not getattr(getattr(block, name), "scale_by_keep", True):
                problems.append("DropPath(scale_by_keep=False)")
    return problems
