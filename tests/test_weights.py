"""Checkpoint loading (timm .pth / .safetensors, Hugging Face v4 / v5, Google .npz), position-embedding
resampling on load, from_timm and patch_timm.

Every check compares against the other library doing the same thing: transformers' logits for HF
checkpoints, timm's own .npz loader and checkpoint filter, timm's forward and backward for from_timm and
patch_timm. Weights are random (never timm's near-constant init), so a swapped q/k or a transposed
kernel shows. The fused models run under the "torch" backend: the kernels have their own tests, and
this file checks the wiring.
"""
import copy
import functools
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import assert_close
from fastvit import weights
from fastvit.backend import use_backend

timm_vit = pytest.importorskip("timm.models.vision_transformer")

IMG, PATCH, DIM, DEPTH, HEADS, CLASSES = 32, 8, 48, 2, 3, 5
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)


def randomize(model: nn.Module) -> nn.Module:
    """Random values in every parameter (LayerNorm weights around 1), so every tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0, 0.2)
    return model


def timm_model(**kwargs) -> nn.Module:
    return randomize(timm_vit.VisionTransformer(**{**TINY, **kwargs})).eval()


def images(size=IMG, batch=2):
    return torch.randn(batch, 3, *((size, size) if isinstance(size, int) else size))


def assert_same_state(actual: nn.Module, expected: nn.Module):
    a, e = actual.state_dict(), expected.state_dict()
    assert a.keys() == e.keys()
    for key in e:
        assert_close(a[key], e[key], atol=0, rtol=0, name=key)


@pytest.fixture
def fused_ops():
    """The fused model code on the plain-torch backend; skips until fastvit.ops exports the fused ops."""
    pytest.importorskip("fastvit.model")
    from fastvit import ops

    missing = [n for n in ("linear", "layer_norm_linear", "qkv_attention", "patch_embed") if not hasattr(ops, n)]
    if missing:
        pytest.skip(f"fastvit.ops does not export {missing} yet")
    with use_backend("torch"):
        yield ops


@pytest.fixture
def count_attention_calls(fused_ops, monkeypatch):
    """Counts fastvit.ops.qkv_attention calls, proving a forward took the fused path."""
    calls = []
    original = fused_ops.qkv_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_ops, "qkv_attention", counted)
    return calls


# ---- Hugging Face -----------------------------------------------------------------------------------

HF_EPS = 1e-12  # transformers' ViT default layer_norm_eps; its GELU is exact, as timm's


def hf_model(cls_name="ViTForImageClassification", **config):
    """A random transformers ViT of the tiny config (the Hugging Face tests skip without transformers, the
    timm / npz ones still run)."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face comparisons need transformers (a test extra)")
    config = transformers.ViTConfig(
        image_size=IMG, patch_size=PATCH, num_channels=3, hidden_size=DIM, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, intermediate_size=2 * DIM, num_labels=CLASSES, **config,
    )  # fmt: skip
    return randomize(getattr(transformers, cls_name)(config)).eval()


def v5_to_v4(key: str) -> str:
    """transformers v5 ViT key -> the v4 name of the same tensor (written independently of the loader)."""
    for new, old in ((".layers.", ".encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")):  # fmt: skip
        key = key.replace(new, old)
    return key


def write_hf(hf, tmp_path, layout):
    """The HF model's weights as `layout`: save_pretrained's folder, or a state_dict file with v5 / v4 keys."""
    if layout == "save_pretrained":
        hf.save_pretrained(tmp_path)
        return tmp_path
    state_dict = hf.state_dict()
    if layout == "v4_bin":
        state_dict = {v5_to_v4(k): v for k, v in state_dict.items()}
        assert any(".encoder.layer.0.attention.attention.query." in k for k in state_dict)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path)
    return path


def timm_for_hf(**kwargs):
    return timm_model(mlp_ratio=2.0, norm_layer=functools.partial(nn.LayerNorm, eps=HF_EPS), **kwargs)


@pytest.mark.parametrize("layout", ["save_pretrained", "v5_bin", "v4_bin"])
def test_hf_classifier_checkpoint_matches_transformers_logits(tmp_path, layout):
    hf = hf_model()
    model = weights.load_checkpoint(timm_for_hf(), write_hf(hf, tmp_path, layout))
    x = images()
    with torch.no_grad():
        assert_close(model(x), hf(pixel_values=x).logits, atol=2e-5, rtol=1e-5, name="logits")


def test_hf_backbone_without_prefix_drops_pooler(tmp_path):
    hf = hf_model("ViTModel")  # keys without `vit.`, with a pooler timm has no place for
    model = weights.load_checkpoint(timm_for_hf(num_classes=0), write_hf(hf, tmp_path, "v5_bin"))
    x = images()
    with torch.no_grad():
        assert_close(model.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=2e-5, rtol=1e-5,
                     name="features")  # fmt: skip


def test_hf_without_qkv_bias(tmp_path):
    hf = hf_model(qkv_bias=False)
    model = weights.load_checkpoint(timm_for_hf(qkv_bias=False), write_hf(hf, tmp_path, "save_pretrained"))
    x = images()
    with torch.no_grad():
        assert_close(model(x), hf(pixel_values=x).logits, atol=2e-5, rtol=1e-5, name="logits")


def test_hf_checkpoint_resampled_like_interpolate_pos_encoding(tmp_path):
    hf = hf_model()
    model = weights.load_checkpoint(timm_for_hf(img_size=48), write_hf(hf, tmp_path, "save_pretrained"))
    x = images(48)
    with torch.no_grad():
        expected = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        assert_close(model(x), expected, atol=2e-5, rtol=1e-5, name="logits at 48 px")


def test_hf_checkpoint_into_fastvit_model(tmp_path, fused_ops):
    import fastvit.model

    hf = hf_model()
    model = fastvit.model.VisionTransformer(**TINY, mlp_ratio=2.0, norm_layer=functools.partial(nn.LayerNorm, eps=HF_EPS))
    weights.load_checkpoint(model.eval(), write_hf(hf, tmp_path, "save_pretrained"))
    x = images()
    with torch.no_grad():
        assert_close(model(x), hf(pixel_values=x).logits, atol=2e-5, rtol=1e-5, name="logits")


def test_hf_partial_qkv_is_an_error():
    state_dict = {k: v for k, v in hf_model().state_dict().items() if "layers.1.attention.k_proj" not in k}
    with pytest.raises(ValueError, match=r"layer 1 .*\['k'\]"):
        weights.convert_hf_state_dict(state_dict)


# ---- Google .npz --------------------------------------------------------------------------------------


def test_npz_written_by_save_npz_loads_in_timm_and_fastvit(tmp_path):
    source = timm_model()
    path = tmp_path / "vit.npz"
    weights.save_npz(source, path)
    by_timm, ours = timm_model(), timm_model()
    by_timm.load_pretrained(str(path))
    weights.load_checkpoint(ours, path)
    assert_same_state(ours, source)
    assert_same_state(by_timm, source)
    x = images()
    with torch.no_grad():
        assert_close(ours(x), source(x), atol=0, rtol=0, name="logits")


def test_npz_round_trips_fastvit_extensions(tmp_path):
    # register tokens, LayerScale and the post-pool norm have no place in Google's layout: extension keys
    source = timm_model(reg_tokens=2, init_values=0.1, global_pool="avg", no_embed_class=True, class_token=False)
    path = tmp_path / "vit.npz"
    weights.save_npz(source.state_dict(), path, num_heads=HEADS)
    ours = weights.load_checkpoint(timm_model(reg_tokens=2, init_values=0.1, global_pool="avg", no_embed_class=True,
                                              class_token=False), path)  # fmt: skip
    assert_same_state(ours, source)


def _as_big_vision_scanned(npz_path, out_path):
    """Rewrite a vision_transformer .npz as big_vision's scanned layout: params/ prefix, pos_embedding at
    the top, sub-module indices 0/1/0, and one array per name stacked over the blocks."""
    with np.load(npz_path) as npz:
        w = dict(npz)
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "MlpBlock_3": "MlpBlock_0",
               "LayerNorm_2": "LayerNorm_1"}  # fmt: skip
    out, stacked = {}, {}
    for key, value in w.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["params/pos_embedding"] = value
        elif key.startswith("Transformer/encoderblock_"):
            block, rest = key[len("Transformer/encoderblock_"):].split("/", 1)
            for old, new in renames.items():
                rest = rest.replace(old, new)
            stacked.setdefault(rest, {})[int(block)] = value
        else:
            out["params/" + key] = value
    for rest, per_block in stacked.items():
        out[f"params/Transformer/encoderblock/{rest}"] = np.stack([per_block[i] for i in sorted(per_block)])
    np.savez(out_path, **out)


def test_npz_big_vision_scanned_and_opt_target_prefix(tmp_path):
    source = timm_model()
    classic = tmp_path / "vit.npz"
    weights.save_npz(source, classic)
    scanned = tmp_path / "scanned.npz"
    _as_big_vision_scanned(classic, scanned)
    with np.load(classic) as npz:
        np.savez(tmp_path / "opt.npz", **{f"opt/target/{k}": v for k, v in npz.items()}, **{"opt/state/step": np.ones(1)})
    for path in (scanned, tmp_path / "opt.npz"):
        by_timm, ours = timm_model(), weights.load_checkpoint(timm_model(), path)
        by_timm.load_pretrained(str(path))
        assert_same_state(ours, source)
        assert_same_state(by_timm, source)


def test_npz_resampled_like_timm(tmp_path):
    path = tmp_path / "vit.npz"
    weights.save_npz(timm_model(), path)
    by_timm, ours = timm_model(img_size=(48, 40)), timm_model(img_size=(48, 40))
    by_timm.load_pretrained(str(path))
    weights.load_checkpoint(ours, path)
    assert_same_state(ours, by_timm)


def test_npz_unknown_arrays_reported(tmp_path):
    path = tmp_path / "vit.npz"
    weights.save_npz(timm_model(), path)
    with np.load(path) as npz:
        np.savez(path, **npz, **{"pre_logits/kernel": np.ones((DIM, DIM), np.float32)})
    with pytest.raises(ValueError, match=r"(?s)Google \.npz.*not in the model \(1\): pre_logits/kernel"):
        weights.load_checkpoint(timm_model(), path)


# ---- timm files -------------------------------------------------------------------------------------


def test_pth_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    source, ema = timm_model(), timm_model()
    files = {
        "plain.pth": source.state_dict(),
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
        "model.bin": {"model": source.state_dict()},
        "ema.pth": {"state_dict": ema.state_dict(), "state_dict_ema": source.state_dict()},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    for name in [*files, "model.safetensors"]:
        assert_same_state(weights.load_checkpoint(timm_model(), tmp_path / name), source)
    assert_same_state(weights.load_checkpoint(timm_model(), tmp_path / "ema.pth", use_ema=False), ema)


@pytest.mark.parametrize("kwargs", [{}, dict(no_embed_class=True, reg_tokens=2)], ids=["cls", "no_embed_class+reg"])
def test_pos_embed_resampled_like_timm_checkpoint_filter(tmp_path, kwargs):
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(timm_model(**kwargs).state_dict(), path)
    target = timm_model(img_size=(48, 40), **kwargs)
    expected = timm_vit.checkpoint_filter_fn(
        {k: v.clone() for k, v in weights.read_checkpoint(path)[0].items()}, target
    )["pos_embed"]  # fmt: skip
    weights.load_checkpoint(target, path)
    assert target.pos_embed.shape == (1, 30 + (0 if kwargs else 1), DIM)
    assert_close(target.pos_embed.detach(), expected, atol=1e-6, rtol=1e-6, name="pos_embed")


def test_mismatches_are_listed(tmp_path):
    state_dict = timm_model().state_dict()
    del state_dict["blocks.1.mlp.fc2.bias"]
    state_dict["blocks.0.attn.extra"] = torch.ones(1)
    state_dict["head.weight"] = torch.ones(7, DIM)
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(ValueError) as error:
        weights.load_checkpoint(timm_model(), path)
    message = str(error.value)
    for needle in (str(path), "missing from the checkpoint (1): blocks.1.mlp.fc2.bias",
                   "not in the model (1): blocks.0.attn.extra",
                   "shape mismatch: head.weight: checkpoint (7, 48), model (5, 48)", "strict=False"):  # fmt: skip
        assert needle in message

    model = timm_model()
    head_before = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="head.weight"):
        weights.load_checkpoint(model, path, strict=False)
    assert_close(model.head.weight.detach(), head_before, atol=0, rtol=0, name="head.weight (skipped)")
    assert_close(model.blocks[0].attn.qkv.weight.detach(), state_dict["blocks.0.attn.qkv.weight"], atol=0, rtol=0)


def test_bad_files_are_clear_errors(tmp_path):
    torch.save({k: v for k, v in timm_model().state_dict().items() if k != "pos_embed"}
               | {"pos_embed": torch.ones(1, 1 + 15, DIM)}, tmp_path / "odd.pth")  # fmt: skip
    with pytest.raises(ValueError, match="not 1 prefix token.*square grid"):
        weights.load_checkpoint(timm_model(), tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        weights.load_checkpoint(timm_model(), tmp_path)
    with pytest.raises(ValueError, match="num_heads"):
        weights.save_npz(timm_model().state_dict(), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="no place for.*norm_pre"):
        weights.save_npz(timm_model(pre_norm=True), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="embedding/kernel"):
        np.savez(tmp_path / "empty.npz", other=np.ones(1))
        weights.load_checkpoint(timm_model(), tmp_path / "empty.npz")


# ---- from_timm and patch_timm -----------------------------------------------------------------------

CONFIGS = {
    "token": {},
    "avg_fc_norm": dict(global_pool="avg", init_values=0.1),
    "no_class_token_reg": dict(class_token=False, global_pool="avg", reg_tokens=3, no_embed_class=True),
    "rect_no_qkv_bias_tanh": dict(img_size=(32, 24), qkv_bias=False, act_layer="gelu_tanh"),
    # fc1 has int(224 * 2.15) = 481 outputs, and int(481 / 224 * 224) = 480: from_timm must rebuild 481
    "odd_mlp_width": dict(embed_dim=224, num_heads=2, mlp_ratio=2.15),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_from_timm_matches_timm(fused_ops, count_attention_calls, config):
    import fastvit.model

    source = timm_model(**CONFIGS[config])
    model = weights.from_timm(source)
    assert type(model) is fastvit.model.VisionTransformer and not model.training
    assert_same_state(model, source)
    x = images(source.patch_embed.img_size)
    with torch.no_grad():
        assert_close(model(x), source(x), atol=1e-5, rtol=1e-5, name="logits")
    assert len(count_attention_calls) == DEPTH


@pytest.mark.parametrize("config", CONFIGS)
def test_patch_timm_matches_timm_forward_and_backward(fused_ops, count_attention_calls, config):
    source = timm_model(**CONFIGS[config])
    patched = copy.deepcopy(source)
    pointers = {k: v.data_ptr() for k, v in patched.state_dict().items()}
    assert weights.patch_timm(patched) is patched
    assert isinstance(patched, timm_vit.VisionTransformer) and isinstance(patched.blocks[0], timm_vit.Block)
    assert {k: v.data_ptr() for k, v in patched.state_dict().items()} == pointers  # no copies

    x = images(source.patch_embed.img_size)
    expected, actual = source(x), patched(x)
    assert len(count_attention_calls) == DEPTH
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="logits")
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    reference = dict(source.named_parameters())
    for name, p in patched.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, reference[name].grad, atol=1e-5, rtol=1e-4, name=f"grad {name}")


def test_patch_timm_survives_pickle_deepcopy_and_repatching(fused_ops, count_attention_calls):
    source = timm_model()
    patched = weights.patch_timm(copy.deepcopy(source))
    assert weights.patch_timm(patched) is patched
    x = images()
    with torch.no_grad():
        expected = source(x)
        for clone in (pickle.loads(pickle.dumps(patched)), copy.deepcopy(patched)):
            assert type(clone) is type(patched)
            assert_close(clone(x), expected, atol=1e-5, rtol=1e-5, name="logits of a copy")
        # timm's masked path still works on a patched model (it falls back to timm's own code)
        mask = torch.zeros(1, 1, 17, 17, dtype=torch.bool).fill_(True)
        assert_close(patched.forward_features(x, attn_mask=mask), source.forward_features(x, attn_mask=mask),
                     atol=1e-5, rtol=1e-5, name="masked features")  # fmt: skip
    assert len(count_attention_calls) == 2 * DEPTH


def test_patch_timm_with_grad_checkpointing_and_drop_path(fused_ops):
    source = timm_model(drop_path_rate=0.5, proj_drop_rate=0.1).train()
    patched = weights.patch_timm(copy.deepcopy(source))
    patched.set_grad_checkpointing(True)
    x = images()
    patched(x).sum().backward()  # training mode: stochastic, so only "runs and reaches every parameter"
    assert all(p.grad is not None for p in patched.parameters())
    patched.eval(), source.eval()
    with torch.no_grad():
        assert_close(patched(x), source(x), atol=1e-5, rtol=1e-5, name="eval logits")


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(qk_norm=True), "qk_norm=True"),
        (dict(global_pool="map"), "attention pooling"),
        (dict(norm_layer="rmsnorm"), "norm_layer=RmsNorm"),
        (dict(act_layer="silu"), "act_layer=SiLU"),
        (dict(patch_drop_rate=0.1), "patch_drop_rate"),
    ],
)
def test_unsupported_timm_features_are_named(fused_ops, kwargs, feature):
    source = timm_model(**kwargs)
    with pytest.raises(NotImplementedError, match=feature):
        weights.from_timm(source)
    if kwargs.get("global_pool") != "map":  # patch_timm leaves the pooling to timm
        with pytest.raises(NotImplementedError, match=feature):
            weights.patch_timm(source)
        assert type(source) is timm_vit.VisionTransformer, "a refused model must be left untouched"


def test_from_timm_keeps_frozen_parameters_and_checkpointing(fused_ops):
    source = timm_model()
    source.patch_embed.proj.weight.requires_grad_(False)
    source.set_grad_checkpointing(True)
    model = weights.from_timm(source)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["patch_embed.proj.weight"] and model.grad_checkpointing


def test_parallel_blocks_are_named(fused_ops):
    """timm's parallel-branch ViTs (block_fn=ParallelThingsBlock) have no norm1: refused by name."""
    import timm

    source = timm.create_model("vit_small_patch16_18x2_224", img_size=IMG, patch_size=PATCH, embed_dim=DIM,
                               depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)  # fmt: skip
    for convert in (weights.from_timm, weights.patch_timm):
        with pytest.raises(NotImplementedError, match="block_fn=ParallelThingsBlock"):
            convert(source)


def test_patched_blocks_run_the_triton_kernels(fused_ops):
    """patch_timm's blocks on the Triton path (interpreted on CPU): forward and every gradient vs timm."""
    from fastvit.kernels._helpers import can_run_on

    if not can_run_on(torch.device("cpu")):
        pytest.skip("Triton cannot run here (no GPU and no interpreter)")
    source = timm_model(img_size=16, embed_dim=32, num_heads=2, depth=1, init_values=0.1)
    patched = weights.patch_timm(copy.deepcopy(source))
    tokens = torch.randn(2, 5, 32)
    from fastvit.launches import count_launches

    with use_backend("triton"), count_launches() as launches:
        actual = patched.blocks(tokens)
        forward_launches = dict(launches.by_kernel)
        actual.backward(torch.ones_like(actual))
    # the block's four GEMMs and its attention ran as kernels (the launch budget is the model tests' job)
    assert forward_launches.get("_linear_kernel") == 4 and forward_launches.get("_attn_fwd_kernel") == 1, launches
    expected = source.blocks(tokens)
    expected.backward(torch.ones_like(expected))
    assert_close(actual, expected, atol=1e-4, rtol=1e-4, name="block output")
    reference = dict(source.named_parameters())
    for name, p in patched.blocks.named_parameters():
        assert_close(p.grad, reference[f"blocks.{name}"].grad, atol=1e-4, rtol=1e-4, name=f"grad blocks.{name}")
