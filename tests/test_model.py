"""The drop-in model: fastvit.VisionTransformer on the Triton kernels (interpreted on CPU) against the
eager reference and timm with the same weights: logits and every parameter's gradient."""
import functools

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import fastvit
from conftest import DEVICE, assert_close
from fastvit import reference

TINY = dict(img_size=(32, 48), patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
CONFIGS = {
    "token": {},
    "avg": dict(global_pool="avg"),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "reg_tokens": dict(reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
    "layer_scale_no_qkv_bias": dict(init_values=0.1, qkv_bias=False),
    "square_patch14_head_dim80": dict(img_size=28, patch_size=14, embed_dim=160, num_heads=2),
    "gelu_tanh_pre_norm": dict(act_layer="gelu_tanh", pre_norm=True, global_pool="avgmax"),
}


def image_batch(kwargs, batch=2):
    size = kwargs["img_size"]
    size = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, *size, device=DEVICE)


def build(config):
    kwargs = dict(TINY, **config)
    torch.manual_seed(0)
    timm_model = TimmViT(**kwargs).to(DEVICE)
    with torch.no_grad():  # timm zero-inits biases: randomise them so every bias path is exercised
        for name, p in timm_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model = fastvit.VisionTransformer(**kwargs).to(DEVICE)
    model.load_state_dict(timm_model.state_dict(), strict=True)
    return kwargs, model, timm_model


def gradients(model, images):
    model.zero_grad()
    logits = model(images)
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits))
    return logits, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_every_gradient_match(name):
    kwargs, model, timm_model = build(CONFIGS[name])
    images = image_batch(kwargs)
    logits, grads = gradients(model, images)
    timm_logits, timm_grads = gradients(timm_model, images)
    assert_close(logits, timm_logits, atol=1e-4, rtol=1e-4, name="logits vs timm")
    ref = reference.VisionTransformer(**{k: v for k, v in kwargs.items() if k not in ("act_layer", "pre_norm")},
                                      approximate="tanh" if kwargs.get("act_layer") else "none").to(DEVICE)
    if "pre_norm" not in kwargs and kwargs.get("global_pool") != "avgmax":
        ref.load_state_dict(timm_model.state_dict())
        assert_close(logits, ref(images), atol=1e-4, rtol=1e-4, name="logits vs reference")
    assert grads.keys() == timm_grads.keys()
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), f"{n}: no gradient or non-finite"
        assert_close(g, timm_grads[n], atol=2e-4, rtol=2e-3, name=f"grad {n}")


def test_forward_features_and_head_contracts():
    kwargs, model, timm_model = build({})
    images = image_batch(kwargs)
    feats = model.forward_features(images)
    assert_close(feats, timm_model.forward_features(images), atol=1e-4, rtol=1e-4, name="features")
    assert_close(model.forward_head(feats, pre_logits=True), timm_model.forward_head(feats, pre_logits=True))
    model.reset_classifier(3, global_pool="avg")
    timm_model.reset_classifier(3, global_pool="avg")
    timm_model.head.load_state_dict(model.head.state_dict())
    assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4)
    model.reset_classifier(0)
    assert model(images).shape == (2, 64)


def test_at_most_five_launches_per_block():
    """Exactly five launches per block forward (LN1 > QKV, attention, proj + residual, LN2 > fc1 > GELU,
    fc2 + residual): each residual GEMM hands its output's LayerNorm statistics to the next LN > GEMM, so
    the whole forward has one statistics pass (the first block's input, from the stem) and the head's LN
    takes the last block's statistics."""
    one = fastvit.VisionTransformer(**dict(TINY, depth=1)).to(DEVICE).eval()
    two = fastvit.VisionTransformer(**dict(TINY, depth=2)).to(DEVICE).eval()
    images = image_batch(TINY)
    counts = []
    for model in (one, two):
        with torch.no_grad():
            model(images)  # warm-up: on a GPU the first call also runs the autotuners' trials
        with torch.no_grad(), fastvit.count_launches() as launches:
            model(images)
        counts.append(launches.by_kernel)
    per_block = counts[1] - counts[0]
    assert sum(per_block.values()) == 5 and "_row_stats_kernel" not in per_block, f"per block: {dict(per_block)}"
    assert counts[0]["_row_stats_kernel"] == 1, f"one block, whole forward: {dict(counts[0])}"
    assert sum(counts[0].values()) == 1 + 1 + 5 + 1, f"embed, stats, block, head: {dict(counts[0])}"


def test_stochastic_depth_matches_timm_and_stays_fused():
    """In training, drop_path's per-sample factor is applied in the residual GEMM's epilogue (sample_scale):
    a seeded run draws the same samples as timm's DropPath, so logits and every gradient match timm's, and
    a block is still its five launches with no statistics pass."""
    kwargs, model, timm_model = build(dict(drop_path_rate=0.6))  # block 1 at 0.6, block 0 at 0
    model.train(), timm_model.train()
    images = image_batch(kwargs, batch=4)
    grad_out = torch.randn(4, kwargs["num_classes"], device=DEVICE)
    results = []
    for m in (model, timm_model):
        torch.manual_seed(3)
        with fastvit.count_launches() as launches:
            logits = m(images)
        logits.backward(grad_out)
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}, launches.by_kernel))
    (logits, grads, launches), (timm_logits, timm_grads, _) = results
    with torch.no_grad():
        assert not torch.allclose(logits, model.eval()(images), atol=1e-3), "seed 3 dropped no sample"
    assert_close(logits, timm_logits, atol=1e-4, rtol=1e-4, name="train-mode logits vs timm")
    for n, g in grads.items():
        assert_close(g, timm_grads[n], atol=2e-4, rtol=2e-3, name=f"grad {n}")
    assert launches["_row_stats_kernel"] == 1 and sum(launches.values()) == 1 + 1 + 5 * 2 + 1, dict(launches)


def test_blocks_with_hooks_still_run_them_and_match():
    """A block with a forward hook is called as a module (the hook sees its tensor output) and takes its
    own LayerNorm statistics; the logits are the same as without the hook."""
    model = fastvit.VisionTransformer(**TINY).to(DEVICE).eval()
    images = image_batch(TINY)
    with torch.no_grad():
        expected = model(images)
        seen = []
        handle = model.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        with fastvit.count_launches() as launches:
            logits = model(images)
        handle.remove()
    assert seen == [(2, model.patch_embed.num_patches + 1, TINY["embed_dim"])]
    assert launches.by_kernel["_row_stats_kernel"] == 3  # for block 0 (the stem's output), the hooked block, the head
    assert_close(logits, expected, atol=1e-6, rtol=1e-6)


class LoraLinear(torch.nn.Module):
    """A LoRA-style adapter as peft builds one: it exposes the base layer's weight and bias, so a fused path
    that read qkv.weight instead of calling qkv would silently drop the adapter."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank, device=base.weight.device) * 0.1)

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()


def _wrap_qkv(model):
    model.blocks[0].attn.qkv = LoraLinear(model.blocks[0].attn.qkv)
    return model


@pytest.mark.parametrize("how", ["fastvit", "patch_timm"])
def test_replaced_and_wrapped_modules_are_called(how):
    """Modules the fused path cannot reproduce from their parameters (a LoRA wrapper, an MLP head, a
    wrapped final norm) are called as modules: the logits and the adapter's gradients equal timm's."""
    kwargs, model, timm_model = build({})
    if how == "patch_timm":
        model = fastvit.patch_timm(build({})[2])
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.GELU(), torch.nn.Linear(16, 10)).to(DEVICE)
    norm = torch.nn.Sequential(timm_model.norm, torch.nn.Dropout(0.0))
    _wrap_qkv(timm_model)
    _wrap_qkv(model).load_state_dict(timm_model.state_dict())
    for m in (timm_model, model):
        m.head, m.norm = head, norm
    images = image_batch(kwargs)
    assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4, name="logits")
    wanted = torch.autograd.grad(timm_model(images).sum(), [timm_model.blocks[0].attn.qkv.lora_b, head[0].weight])
    got = torch.autograd.grad(model(images).sum(), [model.blocks[0].attn.qkv.lora_b, head[0].weight])
    for g, w in zip(got, wanted):
        assert_close(g, w, atol=1e-4, rtol=1e-3, name="adapter / head gradient")


@pytest.mark.parametrize("how", ["fastvit", "patch_timm"])
def test_hooks_on_any_submodule_fire(how):
    """A forward hook on any submodule fires once per forward, as in timm; the logits do not change."""
    kwargs, model, timm_model = build({})
    if how == "patch_timm":
        model = fastvit.patch_timm(timm_model)
    model.eval()
    images = image_batch(kwargs)
    with torch.no_grad():
        expected = model(images)
    for name in ("patch_embed", "patch_embed.proj", "blocks", "blocks.0.attn", "blocks.0.attn.qkv", "blocks.1.mlp.fc1",
                 "blocks.1.norm2", "blocks.1.ls2", "norm", "head"):  # fmt: skip
        calls = []
        handle = model.get_submodule(name).register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            logits = model(images)
        handle.remove()
        assert len(calls) == 1, f"hook on {name} fired {len(calls)} times"
        # a hooked part runs unfused (nn.Linear, its own statistics): fp32 rounding differs, nothing more
        assert_close(logits, expected, atol=1e-4, rtol=1e-4, name=f"logits with a hook on {name}")


def test_gradient_accumulation_and_clipping_match_timm():
    """Two backward passes accumulate into .grad exactly as timm's do, and no two parameters' .grad share
    memory (the class token's gradient once was a view of pos_embed's: clipping or unscaling one then
    changed the other)."""
    kwargs, model, timm_model = build(dict(reg_tokens=2))
    images = image_batch(kwargs)
    grads = []
    for m in (model, timm_model):
        for _ in range(2):
            m(images).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    storages = [g.untyped_storage().data_ptr() for g in grads[0].values()]
    assert len(set(storages)) == len(storages), "two parameters' gradients share memory"
    for name, g in grads[0].items():  # the tolerance of the plain gradient test (a shared buffer was off 2x)
        assert_close(g, grads[1][name], atol=2e-4, rtol=2e-3, name=f"accumulated, clipped grad {name}")


def test_blocks_replaced_subclassed_or_wrapped_are_called():
    """A block whose forward is not block_forward (a subclass, an instance-level forward, a wrapper, an
    nn.Identity that drops it) is called as a module, as timm calls it; so are overridden model stages."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Doubled(fastvit.layers.Block):
        def forward(self, x):
            return 2 * fastvit.layers.block_forward(self, x)

    kwargs, model, timm_model = build({})
    images = image_batch(kwargs)
    model.eval(), timm_model.eval()
    with torch.no_grad():
        model.blocks[0] = checkpoint_wrapper(model.blocks[0])
        timm_model.blocks[1] = torch.nn.Identity()
        model.blocks[1] = torch.nn.Identity()
        assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4, name="wrapped / dropped blocks")
        model.blocks[1] = build({})[1].blocks[1]
        model.blocks[1].__class__ = Doubled
        doubled = model.forward_features(images)
        model.blocks[1].__class__ = fastvit.layers.Block
        model.blocks[1].forward = lambda x: 2 * fastvit.layers.block_forward(model.blocks[1], x)
        assert_close(model.forward_features(images), doubled, name="instance-level forward")

    class Shifted(fastvit.VisionTransformer):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits) + 100

    shifted = Shifted(**kwargs).to(DEVICE).eval()
    shifted.load_state_dict(build({})[2].state_dict())
    with torch.no_grad():
        assert (shifted(images) > 50).all(), "a subclass's forward_head was bypassed"


def test_deferred_init_on_the_meta_device():
    with torch.device("meta"):
        model = fastvit.VisionTransformer(**TINY, drop_path_rate=0.1)
    assert model.pos_embed.is_meta and model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


def test_plain_means_a_known_forward_and_no_hooks():
    from fastvit.layers import plain

    class Called(torch.nn.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    class Forwarded(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked, instance = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    hooked.register_forward_pre_hook(lambda *args: None)
    instance.forward = lambda x: x
    assert plain(torch.nn.Linear(2, 2), "linear") and plain(type("Same", (torch.nn.Linear,), {})(2, 2), "linear")
    for module in (Called(2, 2), Forwarded(2, 2), hooked, instance, torch.nn.LayerNorm(2)):
        assert not plain(module, "linear"), module


def test_standard_blocks_stay_fused():
    """The checks that route modified blocks to their modules leave a standard model on the fused ops."""
    model = fastvit.VisionTransformer(**TINY).to(DEVICE).eval()
    with torch.no_grad(), fastvit.count_launches() as launches:
        model(image_batch(TINY))
    assert fastvit.layers.fusable(model.blocks[0]) and fastvit.layers.fusable_stem(model.patch_embed)
    assert "_row_stats_kernel" in launches.by_kernel and launches.by_kernel["_row_stats_kernel"] == 1


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(indices=1, norm=True, output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[0], stop_early=True, intermediates_only=True),
])  # fmt: skip
def test_forward_intermediates_match_timm(kwargs):
    config, model, timm_model = build(dict(reg_tokens=2))
    images = image_batch(config)
    with torch.no_grad():
        got, wanted = model.forward_intermediates(images, **kwargs), timm_model.forward_intermediates(images, **kwargs)
    flat = lambda out: [out] if torch.is_tensor(out) else [t for item in out for t in flat(item)]  # noqa: E731
    assert len(flat(got)) == len(flat(wanted))
    for g, w in zip(flat(got), flat(wanted)):
        assert_close(g, w, atol=1e-4, rtol=1e-4, name="intermediates")
    assert [t.shape for t in model.get_intermediate_layers(images, 2, reshape=True)] == [(2, 64, 4, 6)] * 2


def test_set_input_size_resamples_like_timm():
    kwargs, model, timm_model = build(dict(reg_tokens=1))
    for m in (model, timm_model):
        m.set_input_size((48, 40))
    images = torch.randn(2, 3, 48, 40, device=DEVICE)
    with torch.no_grad():
        assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4, name="logits at the new size")
    with pytest.raises(NotImplementedError, match="patch_size"):
        model.set_input_size(patch_size=4)


def test_timm_training_utilities_see_timm_metadata():
    """timm's layer-wise lr decay groups by group_matcher, and its data config reads pretrained_cfg."""
    import timm
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    kwargs, model, timm_model = build({})
    groups = [len(create_optimizer_v2(m, "adamw", lr=1e-3, layer_decay=0.65).param_groups) for m in (model, timm_model)]
    assert groups[0] == groups[1] > 2
    name = "vit_tiny_patch16_224"
    timm_named = timm.create_model(name)
    assert resolve_data_config(model=fastvit.create_model(name)) == resolve_data_config(model=timm_named)
    assert fastvit.from_timm(timm_named).pretrained_cfg == timm_named.pretrained_cfg


def test_grad_checkpointing_gives_the_same_gradients():
    """Same logits and gradients with checkpointing, and every block is recomputed in the backward, a
    block with hooks (called as a module) included: its pre-hook fires once more per step (a post-hook
    may not: the recomputation stops as soon as the saved tensors are rebuilt)."""
    kwargs, model, _ = build({})
    images = image_batch(kwargs)
    logits, grads = gradients(model, images)
    model.set_grad_checkpointing(True)
    calls = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: calls.append(1))
    logits_ckpt, grads_ckpt = gradients(model, images)
    handle.remove()
    assert len(calls) == 2, "the hooked block was not recomputed in the backward (not checkpointed)"
    assert torch.equal(logits, logits_ckpt)
    for n in grads:
        assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-6, name=n)


def test_torch_compile_fullgraph():
    kwargs, model, timm_model = build({})
    images = image_batch(kwargs)
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(images)
    logits.sum().backward()
    assert_close(logits, timm_model(images), atol=1e-4, rtol=1e-4)
    assert all(p.grad is not None for p in model.parameters())


def test_autocast_bf16_over_fp32_weights():
    kwargs, model, timm_model = build({})
    images = image_batch(kwargs)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits = model(images)
        timm_logits = timm_model(images)
    reference_logits = timm_model(images)
    assert logits.dtype == timm_logits.dtype
    ours = (logits.float() - reference_logits).abs().max()
    theirs = (timm_logits.float() - reference_logits).abs().max()
    assert ours <= 2 * theirs + 1e-2, f"autocast error {ours:.3g} vs timm's {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pure_low_precision_weights(dtype):
    kwargs, model, timm_model = build({})
    images = image_batch(kwargs)
    logits = model.to(dtype)(images.to(dtype))
    assert logits.dtype == dtype
    expected = timm_model(images)
    eager = timm_model.to(dtype)(images.to(dtype)).float()
    ours = (logits.float() - expected).abs().max()
    theirs = (eager - expected).abs().max()
    assert ours <= 2 * theirs + 1e-2, f"{dtype}: error {ours:.3g} vs eager's {theirs:.3g}"


@pytest.mark.parametrize(
    "config, image_size",
    [
        (dict(img_size=32, dynamic_img_size=True), (48, 40)),  # pos_embed resampled to the input's grid
        (dict(img_size=(32, 48), dynamic_img_size=True, dynamic_img_pad=True), (30, 43)),  # padded to P
    ],
    ids=["dynamic_img_size", "dynamic_img_pad"],
)
def test_dynamic_image_sizes_match_timm(config, image_size):
    kwargs = dict(TINY, **config)
    torch.manual_seed(0)
    timm_model = TimmViT(**kwargs).to(DEVICE).eval()
    model = fastvit.VisionTransformer(**kwargs).to(DEVICE).eval()
    model.load_state_dict(timm_model.state_dict())
    images = torch.randn(1, 3, *image_size, device=DEVICE)
    assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4)


def test_training_mode_regularisers_run():
    """Every dropout and stochastic depth on: finite logits and gradients, and still five launches per block
    (each regulariser lives in a kernel's prologue or epilogue)."""
    kwargs = dict(TINY, drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, pos_drop_rate=0.1, drop_rate=0.1)
    model = fastvit.VisionTransformer(**kwargs).to(DEVICE).train()
    images = image_batch(kwargs)
    with fastvit.count_launches() as launches:
        logits = model(images)
    depth = TINY["depth"]  # per block: 4 GEMMs and attention; the final norm runs alone (head dropout follows it)
    assert launches.by_kernel == {"_patch_embed_kernel": 1, "_row_stats_kernel": 1, "_attn_fwd_kernel": depth,
                                  "_linear_kernel": 4 * depth + 1, "_layer_norm_fwd_kernel": 1}, launches  # fmt: skip
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images)), "eval mode must be deterministic"


def test_registry_matches_timm():
    import timm

    assert "vit_base_patch16_224" in fastvit.list_models()
    for name in ("vit_tiny_patch16_224", "vit_small_patch32_384"):
        ours = fastvit.create_model(name)
        theirs = timm.create_model(name)
        assert ours.patch_embed.img_size == theirs.patch_embed.img_size
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}


def test_create_model_errors():
    with pytest.raises(ValueError, match="name: unknown model 'vit_gigantic'; available: "):
        fastvit.create_model("vit_gigantic")
    with pytest.raises(ValueError, match="does not download weights. Pass checkpoint_path="):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True)


def test_create_model_with_checkpoint_path(tmp_path):
    import timm
    from safetensors.torch import save_file

    timm_model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    path = tmp_path / "weights.safetensors"
    save_file(timm_model.state_dict(), str(path))
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=1, checkpoint_path=str(path)).eval()
    images = torch.randn(1, 3, 32, 32)
    with fastvit.use_backend("torch"):
        assert_close(model(images), timm_model(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(qk_norm=True), NotImplementedError, "qk_norm=True is not supported"),
        (dict(global_pool="map"), NotImplementedError, "global_pool: expected one of"),
        (dict(patch_drop_rate=0.5), NotImplementedError, "patch_drop_rate=0.5"),
        (dict(weight_init="jax"), NotImplementedError, "weight_init='jax'"),
        (dict(act_layer="relu"), NotImplementedError, "act_layer: fastvit fuses GELU only"),
        (dict(norm_layer=torch.nn.BatchNorm1d), NotImplementedError, "norm_layer: fastvit fuses LayerNorm only"),
        (dict(norm_layer=type("MyNorm", (torch.nn.LayerNorm,), {"forward": lambda self, x: x})), NotImplementedError,
         "norm_layer: fastvit fuses LayerNorm only"),
        (dict(pos_embed=None), NotImplementedError, "pos_embed=None is not supported"),
        (dict(block_fn=torch.nn.Identity), NotImplementedError, "block_fn=.*only timm's default, Block"),
        (dict(no_such_kwarg=1), TypeError, "unexpected keyword argument 'no_such_kwarg'"),
        (dict(class_token=False), ValueError, "global_pool='token' needs class_token=True"),
        (dict(embed_dim=65), ValueError, "embed_dim: 65 is not divisible by num_heads=2"),
    ],
)
def test_unsupported_kwargs_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvit.VisionTransformer(**dict(TINY, **kwargs))


def test_timm_spellings_of_the_defaults_are_accepted():
    """timm's own default layer classes passed explicitly, and norm_layer by name, build the same model."""
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block

    model = fastvit.VisionTransformer(**TINY, block_fn=Block, mlp_layer=Mlp, attn_layer=Attention,
                                      embed_layer=PatchEmbed, norm_layer="LayerNorm")  # fmt: skip
    assert model.norm.eps == 1e-6 and model.state_dict().keys() == TimmViT(**TINY).state_dict().keys()


@pytest.mark.parametrize("norm_layer, eps, affine", [
    (type("MyLayerNorm", (torch.nn.LayerNorm,), {}), 1e-5, True),  # a subclass keeps nn.LayerNorm's eps
    (functools.partial(torch.nn.LayerNorm, eps=1e-3, elementwise_affine=False), 1e-3, False),
])  # fmt: skip
def test_norm_layer_is_built_as_timm_builds_it(norm_layer, eps, affine):
    kwargs = dict(TINY, norm_layer=norm_layer)
    torch.manual_seed(0)
    timm_model = TimmViT(**kwargs).to(DEVICE).eval()
    model = fastvit.VisionTransformer(**kwargs).to(DEVICE).eval()
    model.load_state_dict(timm_model.state_dict(), strict=True)
    assert model.blocks[0].norm1.eps == eps and (model.norm.weight is not None) == affine
    images = image_batch(kwargs)
    with torch.no_grad():
        assert_close(model(images), timm_model(images), atol=1e-4, rtol=1e-4, name="logits")


def test_weight_init_reset_uses_each_module_reset_parameters():
    model = fastvit.VisionTransformer(**TINY, weight_init="reset")
    assert model.blocks[0].attn.qkv.bias.std() > 0.01  # nn.Linear's uniform bias, not timm's zeros


def test_bad_images_are_named():
    model = fastvit.VisionTransformer(**TINY)
    with pytest.raises(ValueError, match=r"x: expected images of shape \(B, 3, H, W\), got shape \(2, 1, 32, 48\)"):
        model(torch.randn(2, 1, 32, 48))
    with pytest.raises(ValueError, match="x: image size \\(32, 32\\) does not match the model's img_size"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU (the CPU run uses the interpreter)")
def test_cuda_graph_capture_of_inference_after_warm_up():
    """After one warm-up call (which runs the autotuners), the whole forward captures into a CUDA graph and
    its replays on new images equal eager calls bitwise: no host sync, allocation or tuning inside."""
    model = fastvit.VisionTransformer(**TINY).to(DEVICE).eval()
    static_images = image_batch(TINY)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        model(static_images)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_logits = model(static_images)
    for _ in range(2):
        images = image_batch(TINY)
        static_images.copy_(images)
        graph.replay()
        with torch.no_grad():
            assert torch.equal(static_logits, model(images))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU (the CPU run uses the interpreter)")
def test_cuda_graph_capture_of_a_training_step():
    """torch.cuda.make_graphed_callables captures forward and backward (with dropout and stochastic depth
    off, so replays are deterministic): logits and every parameter gradient equal the eager step's."""
    kwargs = dict(TINY, init_values=0.1)
    model = fastvit.VisionTransformer(**kwargs).to(DEVICE).train()
    images = image_batch(kwargs)
    grad_out = torch.randn(2, kwargs["num_classes"], device=DEVICE)

    def step(forward):
        for p in model.parameters():
            p.grad = None
        logits = forward(images)
        logits.backward(grad_out)
        return logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, expected_grads = step(model)
    graphed = torch.cuda.make_graphed_callables(model, (images,))
    logits, grads = step(graphed)
    assert torch.equal(logits, expected)
    for name in expected_grads:
        assert torch.equal(grads[name], expected_grads[name]), name
