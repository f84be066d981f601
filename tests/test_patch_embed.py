"""Fused patch embedding (kernels/patch_embed.py) through fastvit.ops.patch_embed: tokens and every
gradient against an fp64 conv2d + flatten + cat + add reference, timm's own ViT stem, determinism,
torch.compile, autocast, bad input; and fastvit.resample_pos_embed against timm and Hugging Face."""
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from conftest import DEVICE, DTYPES, assert_close, assert_error_within, tolerance
from fastvit.backend import use_backend
from fastvit.ops.patch_embed import _patch_embed_torch, patch_embed
from fastvit.pos_embed import resample_pos_embed


@dataclasses.dataclass
class Case:
    P: int
    C: int
    grid: tuple  # (GH, GW) patches
    D: int
    cls: bool = True
    reg: int = 0
    no_embed_class: bool = False
    layout: str = "nchw"  # "nchw", "channels_last" or "strided" (a non-contiguous view)
    B: int = 2
    pos: bool = True
    bias: bool = True


# interpreter tiles are 32 x 64 x 32: M = B*N and D cross tile edges raggedly, K = C*P*P too (P=14),
# dW's B*N reduction spans both of its split slices in the larger grids
CASES = [
    Case(16, 3, (2, 3), 72),
    Case(8, 4, (3, 2), 40, reg=2, layout="channels_last", B=3),
    Case(14, 1, (2, 2), 36, cls=False, no_embed_class=True, layout="strided"),
    Case(32, 3, (1, 2), 48, reg=1, no_embed_class=True),
    Case(8, 3, (5, 6), 40, reg=4, layout="channels_last"),
    Case(8, 2, (2, 5), 24, cls=False, pos=False, bias=False, B=1),
]


def make_inputs(case, dtype):
    """Random leaves in `dtype` (scaled so tokens are O(1)), images in the case's layout."""
    H, W = case.grid[0] * case.P, case.grid[1] * case.P
    shape = (case.B, case.C, H, W)
    images = torch.randn(shape[:3] + (2 * W,), dtype=torch.float64)[..., ::2] if case.layout == "strided" else torch.randn(shape, dtype=torch.float64)
    images = images.to(DEVICE, dtype)
    if case.layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    prefix = case.cls + case.reg
    num_pos = case.grid[0] * case.grid[1] + (0 if case.no_embed_class else prefix)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_()

    return dict(
        images=images.requires_grad_(),
        weight=leaf(case.D, case.C, case.P, case.P, scale=(case.C * case.P * case.P) ** -0.5),
        bias=leaf(case.D) if case.bias else None,
        pos_embed=leaf(1, num_pos, case.D) if case.pos else None,
        cls_token=leaf(1, 1, case.D) if case.cls else None,
        reg_tokens=leaf(1, case.reg, case.D) if case.reg else None,
        no_embed_class=case.no_embed_class,
    )


def leaves(inputs):
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def run(fn, inputs, dtokens=None):
    """tokens and the gradient of every tensor input (dtokens random unless given)."""
    tokens = fn(**inputs)
    dtokens = torch.randn_like(tokens) if dtokens is None else dtokens
    grads = torch.autograd.grad(tokens, list(leaves(inputs).values()), dtokens)
    return tokens, dict(zip(leaves(inputs), grads)), dtokens


def as_fp64(inputs):
    return {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c.P}-C{c.C}-{c.grid[0]}x{c.grid[1]}-D{c.D}-cls{int(c.cls)}-reg{c.reg}-nec{int(c.no_embed_class)}-{c.layout}")
def test_tokens_and_every_gradient_match_fp64(case, dtype):
    inputs = make_inputs(case, dtype)
    tokens, grads, dtokens = run(patch_embed, inputs)
    ref_tokens, ref_grads, _ = run(_patch_embed_torch, as_fp64(inputs), dtokens.double())
    assert tokens.dtype == dtype and tokens.shape == ref_tokens.shape
    assert_close(tokens, ref_tokens, name="tokens")
    if dtype == torch.float32:
        for name, grad in grads.items():
            # batch-reduced gradients: error grows with the number of summed rows
            rows = case.B * case.grid[0] * case.grid[1] if name != "images" else 1
            atol, rtol = tolerance(dtype, rows**0.5)
            assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape
            assert_close(grad, ref_grads[name], atol=atol, rtol=rtol, name=f"d{name}")
    else:
        # low precision: the flash rule against eager PyTorch in the same dtype (CPU conv2d does fp16/bf16)
        _, eager_grads, _ = run(_patch_embed_torch, inputs, dtokens)
        for name, grad in grads.items():
            assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape
            assert_error_within(grad, eager_grads[name], ref_grads[name], atol=tolerance(dtype)[0], name=f"d{name}")
    if case.layout == "channels_last":
        assert grads["images"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 3}, {"no_embed_class": True, "reg_tokens": 2},
                                    {"class_token": False, "global_pool": "avg"}])  # fmt: skip
def test_matches_timm_vit_stem(kwargs):
    """The exact token layout of timm's VisionTransformer: PatchEmbed then _pos_embed."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), embed_dim=48, depth=1, num_heads=3,
                              **kwargs).to(DEVICE)  # fmt: skip
    for p in (model.cls_token, model.reg_token, model.pos_embed):
        if p is not None:
            torch.nn.init.normal_(p)
    images = torch.randn(2, 3, 32, 48, device=DEVICE)
    proj = model.patch_embed.proj
    ours = patch_embed(images, proj.weight, proj.bias, model.pos_embed, model.cls_token, model.reg_token,
                       model.no_embed_class)  # fmt: skip
    assert_close(ours, model._pos_embed(model.patch_embed(images)), name="tokens")


def test_backward_is_deterministic():
    inputs = make_inputs(CASES[4], torch.float32)
    first = run(patch_embed, inputs)
    second = run(patch_embed, inputs, first[2])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between identical runs"


def test_torch_compile_fullgraph():
    inputs = make_inputs(CASES[1], torch.float32)
    compiled = torch.compile(patch_embed, fullgraph=True)
    tokens = compiled(**inputs)
    grads = torch.autograd.grad(tokens.sum(), list(leaves(inputs).values()))  # an expanded, stride-0 gradient
    ref_tokens = _patch_embed_torch(**as_fp64(inputs))
    ref = as_fp64(inputs)
    ref_grads = torch.autograd.grad(_patch_embed_torch(**ref).sum(), list(leaves(ref).values()))
    assert_close(tokens, ref_tokens, name="tokens")
    for name, grad, ref_grad in zip(leaves(inputs), grads, ref_grads):
        assert_close(grad, ref_grad, atol=1e-3, name=f"d{name}")


def test_autocast_follows_timm_promotion():
    """Under bf16 autocast conv2d runs in bf16 and the fp32 tokens / pos_embed promote: fp32 tokens."""
    inputs = make_inputs(CASES[1], torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        tokens, grads, dtokens = run(patch_embed, inputs)
        with use_backend("torch"):
            eager, eager_grads, _ = run(patch_embed, inputs, dtokens)
    ref, ref_grads, _ = run(_patch_embed_torch, as_fp64(inputs), dtokens.double())
    assert tokens.dtype == eager.dtype == torch.float32
    assert_error_within(tokens, eager, ref, atol=1e-3, name="tokens")
    for name, grad in grads.items():
        assert grad.dtype == eager_grads[name].dtype == torch.float32
        assert_error_within(grad, eager_grads[name], ref_grads[name], atol=1e-2, name=f"d{name}")


def test_empty_batch():
    inputs = make_inputs(dataclasses.replace(CASES[0], B=0), torch.float32)
    tokens, grads, _ = run(patch_embed, inputs)
    assert tokens.shape == (0, 1 + 6, 72)
    assert grads["images"].shape == (0, 3, 32, 48)
    assert torch.equal(grads["weight"], torch.zeros_like(grads["weight"]))


def bad(**changes):
    """A valid call's inputs with `changes`, every tensor on DEVICE (so only the intended problem is wrong)."""
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(CASES[1], torch.float32).items()}
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()})
    return inputs


W = torch.randn(40, 4, 8, 8)
BAD_INPUTS = [
    (dict(images=torch.randn(3, 3, 24, 16)), ValueError, "channels"),
    (dict(images=torch.randn(3, 4, 25, 16)), ValueError, "multiples of the patch size"),
    (dict(images=torch.randn(3, 4, 24)), ValueError, "images"),
    (dict(images=torch.randn(3, 4, 24, 16).int()), TypeError, "images"),
    (dict(weight=torch.randn(40, 4, 8, 4)), ValueError, "square"),
    (dict(weight=W, bias=torch.randn(41)), ValueError, "bias"),
    (dict(pos_embed=torch.randn(1, 8, 40)), ValueError, "num_prefix_tokens"),
    (dict(pos_embed=torch.randn(1, 9, 40), no_embed_class=True), ValueError, "pos_embed"),
    (dict(cls_token=torch.randn(1, 2, 40)), ValueError, "cls_token"),
    (dict(reg_tokens=torch.randn(1, 2, 39)), ValueError, "reg_tokens"),
    (dict(no_embed_class=1), TypeError, "no_embed_class"),
    (dict(bias=torch.randn(40, dtype=torch.float64)), TypeError, "bias"),
    (dict(bias=torch.randn(40).half()), TypeError, "one dtype"),
]  # (built on the CPU at import; bad() moves them to DEVICE)


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS, ids=lambda x: str(x)[:40] if isinstance(x, str) else None)
def test_bad_input_is_rejected_before_launch(changes, error, message):
    with pytest.raises(error, match=message):
        patch_embed(**bad(**changes))


# ------------------------------------------------------------------------------------------------------------
# resample_pos_embed
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, old_grid, new_grid", [(1, None, (24, 24)), (0, None, (5, 9)), (5, (4, 6), (7, 3)),
                                                        (1, (3, 3), (3, 3))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resample_equals_timm(prefix, old_grid, new_grid, dtype):
    grid = old_grid or (14, 14)
    pos = torch.randn(1, prefix + grid[0] * grid[1], 32).to(dtype)
    ours = resample_pos_embed(pos, new_grid, num_prefix_tokens=prefix, old_grid=old_grid)
    assert torch.equal(ours, resample_abs_pos_embed(pos, list(new_grid), old_grid, num_prefix_tokens=prefix))
    npz = resample_pos_embed(pos, new_grid, num_prefix_tokens=prefix, old_grid=old_grid, style="npz")
    timm_npz = resample_abs_pos_embed(pos, list(new_grid), old_grid, num_prefix_tokens=prefix,
                                      interpolation="bilinear", antialias=False)  # fmt: skip
    assert torch.equal(npz, timm_npz)


@pytest.mark.parametrize("image_size", [(384, 384), (160, 224)])
def test_resample_equals_hugging_face(image_size):
    transformers = pytest.importorskip("transformers", reason="the comparison needs transformers (a test extra)")
    ViTConfig, ViTEmbeddings = transformers.ViTConfig, transformers.models.vit.modeling_vit.ViTEmbeddings

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=32)
    embeddings = ViTEmbeddings(config)
    torch.nn.init.normal_(embeddings.position_embeddings)
    tokens = torch.zeros(1, 1 + (image_size[0] // 16) * (image_size[1] // 16), 32)
    expected = embeddings.interpolate_pos_encoding(tokens, *image_size)
    ours = resample_pos_embed(embeddings.position_embeddings.detach(), (image_size[0] // 16, image_size[1] // 16),
                              style="hf")  # fmt: skip
    assert torch.equal(ours, expected.detach())


def test_resample_bad_input():
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
    with pytest.raises(ValueError, match="style"):
        resample_pos_embed(torch.randn(1, 17, 8), (4, 4), style="jax")
    with pytest.raises(ValueError, match="new_grid"):
        resample_pos_embed(torch.randn(1, 17, 8), (4, 0))
    with pytest.raises(ValueError, match="does not hold"):
        resample_pos_embed(torch.randn(1, 17, 8), (4, 4), old_grid=(3, 4))
