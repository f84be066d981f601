"""Reliability across every public entry: bad input is refused before any launch with a message that names
the argument and what was expected; batch 0, batch 1 and N = 1; NaN / Inf propagate as in eager; no memory
growth; autograd keeps only what the backward needs; cross-device inputs; deterministic backward."""
import gc
import weakref

import pytest
import torch

import fastvit
from conftest import DEVICE, assert_close
from fastvit import ops

MODEL = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**dict(MODEL, **overrides)).to(DEVICE)
    with torch.no_grad():  # random biases and tokens, so every path carries signal
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images(batch, size=16):
    return rand(batch, 3, size, size)


# ---------------------------------------------------------------------------------------------------
# bad input: exception type, a message naming the argument and the expectation, no launch
# ---------------------------------------------------------------------------------------------------

x8, w8 = rand(2, 8), rand(8)
W, qkv = rand(4, 8), rand(1, 5, 24)
q = rand(1, 2, 5, 8)
img, pw = rand(1, 3, 16, 16), rand(4, 3, 8, 8)
META = torch.device("meta")

BAD_INPUTS = {
    # layer_norm
    "ln_x_not_tensor": (lambda: ops.layer_norm([1.0, 2.0], None, None), TypeError, r"x: expected a torch\.Tensor"),
    "ln_x_int": (lambda: ops.layer_norm(x8.long(), None, None), TypeError, r"x: expected dtype in .*torch\.int64"),
    "ln_weight_shape": (lambda: ops.layer_norm(x8, rand(7), None), ValueError, r"weight: expected shape \(8,\)"),
    "ln_bias_rank": (lambda: ops.layer_norm(x8, None, rand(1, 8)), ValueError, r"bias: expected a 1-D tensor"),
    "ln_eps": (lambda: ops.layer_norm(x8, None, None, 0.0), ValueError, r"eps: expected a finite float > 0, got 0\.0"),
    "ln_eps_bool": (lambda: ops.layer_norm(x8, None, None, True), ValueError, r"eps: expected a finite float > 0, got True"),
    "ln_eps_inf": (lambda: ops.layer_norm(x8, None, None, float("inf")), ValueError, r"eps: .* got inf"),
    "ln_mixed_dtype": (lambda: ops.layer_norm(x8, w8.half(), None), TypeError, r"weight is torch\.float16"),
    "ln_too_wide": (lambda: ops.layer_norm(rand(1, 8193), None, None), ValueError, r"x: .*1\.\.8192.*8193"),
    "ln_meta_weight": (lambda: ops.layer_norm(x8, w8.to(META), None), ValueError, r"weight on meta"),
    "ln_x_0d": (lambda: ops.layer_norm(torch.tensor(1.0), None, None), ValueError, r"x: expected at least 1 dims"),
    # linear / layer_norm_linear
    "linear_k_mismatch": (lambda: ops.linear(rand(2, 7), W), ValueError, r"x: expected last dim K = 8"),
    "linear_weight_rank": (lambda: ops.linear(x8, rand(8)), ValueError, r"weight: expected a 2-D tensor"),
    "linear_return_stats": (lambda: ops.linear(x8, W, return_stats="yes"), TypeError, r"return_stats: expected a bool"),
    "linear_bias_shape": (lambda: ops.linear(x8, W, rand(5)), ValueError, r"bias: expected shape \(4,\)"),
    "linear_residual_shape": (lambda: ops.linear(x8, W, residual=rand(2, 5)), ValueError,
                              r"residual: expected shape \(2, 4\)"),
    "linear_activation": (lambda: ops.linear(x8, W, activation="relu"), ValueError, r"activation: expected one of"),
    "linear_dropout": (lambda: ops.linear(x8, W, dropout_p=1.0), ValueError, r"dropout_p: expected a float in \[0, 1\)"),
    "linear_layer_scale_dtype": (lambda: ops.linear(x8, W, layer_scale=rand(4).half()), TypeError,
                                 r"layer_scale is torch\.float16"),
    "linear_meta_weight": (lambda: ops.linear(x8, W.to(META)), ValueError, r"weight on meta"),
    "ln_linear_ln_weight_shape": (lambda: ops.layer_norm_linear(x8, rand(3), None, W), ValueError,
                                  r"weight: expected shape \(8,\)"),
    "ln_linear_eps": (lambda: ops.layer_norm_linear(x8, None, None, W, eps=-1.0), ValueError, r"eps: expected"),
    # attention / qkv_attention
    "attn_rank": (lambda: ops.attention(rand(2, 5, 8), q, q), ValueError, r"q: expected a 4-D tensor"),
    "attn_k_heads": (lambda: ops.attention(q, rand(1, 3, 5, 8), rand(1, 3, 5, 8)), ValueError,
                     r"k: expected \(B, H, d\) = \(1, 2, 8\)"),
    "attn_v_length": (lambda: ops.attention(q, q, rand(1, 2, 4, 8)), ValueError, r"v: expected the shape of k"),
    "attn_head_dim": (lambda: ops.attention(*(rand(1, 1, 2, 300),) * 3), ValueError, r"q: .*head dim.*300"),
    "attn_scale": (lambda: ops.attention(q, q, q, scale=float("inf")), ValueError, r"scale: expected a finite"),
    "attn_zero_keys": (lambda: ops.attention(q, rand(1, 2, 0, 8), rand(1, 2, 0, 8)), ValueError, r"k: .*Nk >= 1"),
    "attn_meta_k": (lambda: ops.attention(q, q.to(META), q), ValueError, r"k on meta"),
    "attn_fp64": (lambda: ops.attention(*(q.double(),) * 3), TypeError, r"q: expected dtype in .*torch\.float64"),
    "qkv_num_heads": (lambda: ops.qkv_attention(qkv, 0), ValueError, r"num_heads: expected an int >= 1, got 0"),
    "qkv_width": (lambda: ops.qkv_attention(qkv, 5), ValueError, r"qkv: last dim must be 3 \* num_heads \* head_dim"),
    "qkv_dropout": (lambda: ops.qkv_attention(qkv, 2, dropout_p=-0.1), ValueError, r"dropout_p: expected"),
    # patch_embed
    "pe_channels": (lambda: ops.patch_embed(rand(1, 4, 16, 16), pw, None, None), ValueError, r"images: expected 3 channels"),
    "pe_not_multiple": (lambda: ops.patch_embed(rand(1, 3, 15, 16), pw, None, None), ValueError,
                        r"images: height and width must be positive multiples of the patch size 8"),
    "pe_pos_embed_len": (lambda: ops.patch_embed(img, pw, None, rand(1, 3, 4)), ValueError,
                         r"pos_embed: expected shape \(1, 4, 4\)"),
    "pe_cls_shape": (lambda: ops.patch_embed(img, pw, None, None, rand(1, 2, 4)), ValueError,
                     r"cls_token: expected shape \(1, 1, 4\)"),
    "pe_no_embed_class": (lambda: ops.patch_embed(img, pw, None, None, no_embed_class=1), TypeError,
                          r"no_embed_class: expected a bool"),
    "pe_meta_images": (lambda: ops.patch_embed(img.to(META), pw, None, None), ValueError, r"images on meta"),
    # the model
    "vit_heads_divide": (lambda: fastvit.VisionTransformer(**dict(MODEL, num_heads=3)), ValueError,
                         r"embed_dim: 32 is not divisible by num_heads=3"),
    "vit_num_heads_zero": (lambda: fastvit.VisionTransformer(**dict(MODEL, num_heads=0)), ValueError,
                           r"num_heads: expected an int >= 1, got 0"),
    "vit_depth_negative": (lambda: fastvit.VisionTransformer(**dict(MODEL, depth=-1)), ValueError,
                           r"depth: expected an int >= 0, got -1"),
    "vit_patch_size": (lambda: fastvit.VisionTransformer(**dict(MODEL, patch_size=0)), ValueError,
                       r"patch_size: expected .*>= 1, got 0"),
    "vit_drop_rate": (lambda: fastvit.VisionTransformer(**dict(MODEL, drop_rate=1.5)), ValueError,
                      r"drop_rate: expected a float in \[0, 1\), got 1\.5"),
    "vit_unknown_kwarg": (lambda: fastvit.VisionTransformer(bogus=1), TypeError, r"unexpected keyword argument 'bogus'"),
    "vit_unsupported_kwarg": (lambda: fastvit.VisionTransformer(qk_norm=True), NotImplementedError, r"qk_norm=True"),
    "forward_rank": (lambda: tiny_model()(rand(3, 16, 16)), ValueError, r"x: expected images of shape \(B, 3, H, W\)"),
    "forward_size": (lambda: tiny_model()(images(1, 24)), ValueError, r"x: image size \(24, 24\) does not match"),
    "forward_int_images": (lambda: tiny_model()(images(1).to(torch.uint8)), TypeError, r"images: expected dtype"),
    "forward_meta_images": (lambda: tiny_model()(images(1).to(META)), ValueError, r"images on meta"),
    "create_model_name": (lambda: fastvit.create_model("vit_nano"), ValueError, r"name: unknown model 'vit_nano'"),
    "create_model_name_type": (lambda: fastvit.create_model(["vit_tiny_patch16_224"]), TypeError,
                               r"name: expected a str"),
    "create_model_pretrained": (lambda: fastvit.create_model("vit_tiny_patch16_224", pretrained=True), ValueError,
                                r"pretrained=True .* Pass checkpoint_path="),
    "load_checkpoint_model": (lambda: fastvit.load_checkpoint("model.pth", "model.pth"), TypeError,
                              r"model: expected an nn\.Module"),
    "load_checkpoint_path": (lambda: fastvit.load_checkpoint(torch.nn.Linear(1, 1), 3), TypeError,
                             r"path: expected a str or os\.PathLike"),
    "load_checkpoint_missing": (lambda: fastvit.load_checkpoint(torch.nn.Linear(1, 1), "/nonexistent/ckpt.pth"),
                                FileNotFoundError, r"/nonexistent/ckpt\.pth"),
    "set_backend": (lambda: fastvit.set_backend("cuda"), ValueError, r"set_backend\(name\): unknown backend 'cuda'"),
    "set_backend_type": (lambda: fastvit.set_backend(None), TypeError, r"set_backend\(name\): expected a str"),
}


def test_catalogue_is_large():
    assert len(BAD_INPUTS) >= 25


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_any_launch(case):
    call, error, match = BAD_INPUTS[case]
    backend = fastvit.get_backend()
    with fastvit.count_launches() as launches, pytest.raises(error, match=match):
        call()
    assert launches.total == 0, launches
    assert fastvit.get_backend() == backend


def test_bad_load_checkpoint_file_names_the_mismatch(tmp_path):
    """The wrong checkpoint: a state_dict of another width is refused with the keys and shapes named."""
    path = tmp_path / "other.pth"
    torch.save(tiny_model(embed_dim=64).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer[\s\S]*pos_embed"):
        fastvit.load_checkpoint(tiny_model(), path)


# ---------------------------------------------------------------------------------------------------
# sizes: batch 0, batch 1, N = 1
# ---------------------------------------------------------------------------------------------------

def _op_cases(batch):
    """Each public op on `batch` leading rows: (name, inputs requiring grad, call)."""
    ln_x, ln_w, ln_b = rand(batch, 5, 16, grad=True), rand(16, grad=True), rand(16, grad=True)
    lin_x, lin_w, lin_b, res = rand(batch, 5, 16, grad=True), rand(8, 16, grad=True), rand(8, grad=True), rand(
        batch, 5, 8, grad=True)
    q, k, v = (rand(batch, 2, 5, 16, grad=True) for _ in range(3))
    packed = rand(batch, 5, 48, grad=True)
    fc1_w, fc1_b, fc2_w = rand(32, 16, grad=True), rand(32, grad=True), rand(16, 32, grad=True)
    imgs, pe_w, pe_b, pos, cls = (rand(batch, 3, 16, 16, grad=True), rand(8, 3, 8, 8, grad=True), rand(8, grad=True),
                                  rand(1, 5, 8, grad=True), rand(1, 1, 8, grad=True))
    return {
        "layer_norm": ((ln_x, ln_w, ln_b), lambda: ops.layer_norm(ln_x, ln_w, ln_b)),
        "linear": ((lin_x, lin_w, lin_b, res), lambda: ops.linear(lin_x, lin_w, lin_b, "gelu", residual=res)),
        "layer_norm_linear": ((lin_x, ln_w, ln_b, lin_w, lin_b),
                              lambda: ops.layer_norm_linear(lin_x, ln_w, ln_b, lin_w, lin_b, activation="gelu")),
        "attention": ((q, k, v), lambda: ops.attention(q, k, v)),
        "qkv_attention": ((packed,), lambda: ops.qkv_attention(packed, 2)),
        "patch_embed": ((imgs, pe_w, pe_b, pos, cls), lambda: ops.patch_embed(imgs, pe_w, pe_b, pos, cls)),
        "layer_norm_mlp": ((lin_x, ln_w, ln_b, fc1_w, fc1_b, fc2_w),
                           lambda: ops.layer_norm_mlp(lin_x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, residual=lin_x)),
    }


OPS = list(_op_cases(1))


@pytest.mark.parametrize("op", OPS)
def test_batch_zero_gives_empty_outputs_and_zero_gradients(op):
    inputs, call = _op_cases(0)[op]
    with fastvit.count_launches() as launches:
        out = call()
    assert out.numel() == 0 and out.shape[0] == 0
    assert launches.total == 0, f"forward launched {launches}"
    out.sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.equal(t.grad, torch.zeros_like(t)), "a batch of 0 contributes no gradient"


@pytest.mark.parametrize("op", OPS)
def test_batch_zero_backward_launches_nothing(op):
    inputs, call = _op_cases(0)[op]
    out = call()
    with fastvit.count_launches() as launches:
        out.sum().backward()
    assert launches.total == 0, launches


def test_batch_zero_through_the_model():
    model, x = tiny_model(), images(0).requires_grad_()
    with fastvit.count_launches() as launches:
        logits = model(x)
    assert logits.shape == (0, 5) and launches.total == 0, launches
    logits.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_batch_zero_model_backward_launches_nothing():
    model = tiny_model()
    logits = model(images(0))
    with fastvit.count_launches() as launches:
        logits.sum().backward()
    assert launches.total == 0, launches


@pytest.fixture
def no_tf32(monkeypatch):
    """torch's conv2d on CUDA uses TF32 by default (cudnn.allow_tf32): keep the torch path in IEEE fp32,
    as the kernels are unless torch allows TF32 matmuls."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _against_torch_backend(model, x):
    """Logits and every parameter gradient on the Triton path, then on the torch path."""
    results = []
    for backend in ("auto", "torch"):
        model.zero_grad()
        with fastvit.use_backend(backend):
            logits = model(x)
            logits.backward(torch.ones_like(logits))
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, our_grads), (theirs, their_grads) = results
    assert_close(ours, theirs, name="logits")
    for name in our_grads:
        assert_close(our_grads[name], their_grads[name], atol=2e-4, name=name)


@pytest.mark.parametrize(
    "config", [dict(), dict(img_size=8, class_token=False, global_pool="avg")], ids=["batch1", "batch1_one_token"]
)
def test_batch_one_and_a_single_token(config, no_tf32):
    """Batch 1, and N = 1 (one patch, no class token: every attention softmax is over a single key)."""
    model = tiny_model(**config)
    _against_torch_backend(model, images(1, model.patch_embed.img_size[0]))


# ---------------------------------------------------------------------------------------------------
# NaN / Inf propagate as in eager
# ---------------------------------------------------------------------------------------------------

def _poisoned(t, *spots):
    t = t.detach().clone()
    for index, value in spots:
        t[index] = value
    return t


NAN, INF = float("nan"), float("inf")


def _timm_eager_attention(q, k, v):
    """timm's non-fused attention: (q k^T * scale).softmax(-1) @ v. torch's CPU SDPA is not used as the
    reference here: its fused kernel returns 0 for a query row holding NaN, and its math kernel returns 0
    for a row whose scores are all -Inf (a "safe softmax" for masks); the formula gives NaN for both."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _eager(op, inputs, call):
    if op == "attention":
        return _timm_eager_attention(*inputs)
    if op == "qkv_attention":
        (packed,) = inputs
        B, N, C = packed.shape
        q, k, v = packed.reshape(B, N, 3, 2, C // 6).permute(2, 0, 3, 1, 4)
        return _timm_eager_attention(q, k, v).transpose(1, 2).reshape(B, N, C // 3)
    with fastvit.use_backend("torch"):
        return call()


# torch's CPU GELU returns NaN for +Inf where the kernels return +Inf, the limit: for ops ending in GELU
# the test compares which outputs are finite, not NaN vs Inf.
GELU_OPS = ("linear", "layer_norm_linear", "layer_norm_mlp")


@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_propagate_like_eager(op):
    """One NaN and one Inf in the first input, finite elsewhere: the output's NaN / Inf masks match eager's
    exactly (non-finite values stay confined to the outputs eager confines them to)."""
    inputs, call = _op_cases(2)[op]
    first = inputs[0]
    spots = [((0,) * first.dim(), NAN), ((1,) + (1,) * (first.dim() - 1), INF)]
    with torch.no_grad():
        first.copy_(_poisoned(first, *spots))
        out = call()
        expected = _eager(op, inputs, call)
    finite = expected.isfinite()
    assert torch.equal(out.isfinite(), finite), f"{int((out.isfinite() != finite).sum())} outputs differ in finiteness"
    if op not in GELU_OPS:
        assert torch.equal(out.isnan(), expected.isnan()), "NaN mask differs"
        assert torch.equal(out.isinf(), expected.isinf()), "Inf mask differs"
    assert finite.any() and not finite.all(), "the poison should reach some outputs and spare others"
    assert_close(out[finite], expected[finite], atol=1e-3, rtol=1e-3, name="finite part")


def test_nan_image_poisons_only_its_own_logits():
    model = tiny_model()
    x = _poisoned(images(2), ((0, 1, 3, 5), NAN))
    logits = model(x)
    with fastvit.use_backend("torch"):
        expected = model(x)
    assert logits[0].isnan().all() and logits[1].isfinite().all()
    assert torch.equal(logits.isnan(), expected.isnan())


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------

def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def _train_steps(model, x, steps):
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()


@pytest.mark.parametrize("backend, steps", [("torch", 100), ("auto", 4)])
def test_forward_backward_iterations_do_not_grow_live_tensors(backend, steps):
    """100 training steps on the torch path (cheap); a few on the Triton path (interpreted on CPU)."""
    model, x = tiny_model(), images(2)
    with fastvit.use_backend(backend):
        _train_steps(model, x, 2)  # warm-up: gradients and caches exist from here on
        before = _live_tensors()
        _train_steps(model, x, steps)
        after = _live_tensors()
    assert after <= before, f"{after - before} more live tensors after {steps} steps"


def test_autograd_keeps_only_what_the_backward_needs():
    """The residual of a fused linear is never saved (its gradient is dy), so the graph must not keep it
    alive once the caller drops it."""
    x, w, b = rand(3, 16, grad=True), rand(8, 16, grad=True), rand(8, grad=True)
    residual = rand(3, 8, grad=True) * 1.0  # a non-leaf: only a saved reference could keep it alive
    alive = weakref.ref(residual)
    y = ops.linear(x, w, b, residual=residual)
    del residual
    gc.collect()
    assert alive() is None, "the autograd graph holds the residual"
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("op", OPS)
def test_autograd_context_holds_no_tensor_outside_save_for_backward(op):
    inputs, call = _op_cases(2)[op]
    ctx = call().grad_fn
    while not hasattr(ctx, "__dict__"):  # the ops restore leading dims with a view after the custom op's node
        ctx = ctx.next_functions[0][0]
    stray = [name for name, value in vars(ctx).items()
             if torch.is_tensor(value) or (isinstance(value, (list, tuple)) and any(map(torch.is_tensor, value)))]
    assert not stray, f"tensors kept on the context outside save_for_backward: {stray}"


# ---------------------------------------------------------------------------------------------------
# outputs, parameter layouts and devices as a PyTorch user expects them
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [op for op in OPS if "attention" not in op])
def test_outputs_can_be_modified_in_place(op):
    """y.mul_(2) then backward, as on F.linear's output: the ops restore leading dims with a view made
    outside the custom op (a view made inside one cannot be modified in place under autograd). Not the
    attention ops: their backward reads the saved output, as SDPA's flash backward does, so modifying it
    raises torch's version-counter error there as it does for SDPA."""
    inputs, call = _op_cases(2)[op]
    wanted = torch.autograd.grad(call().sum() * 2, inputs)
    out = call()
    out.mul_(2)
    for i, (got, want) in enumerate(zip(torch.autograd.grad(out.sum(), inputs), wanted)):
        assert_close(got, want, name=f"{op}: gradient {i} after an in-place op on the output")


def _strided_vectors():
    """(name, call(vector), the parameter vector as a stride-2 or stride-0 view): kernels index 1-D
    parameters with unit stride, so the ops must hand them over contiguous."""
    x, w = rand(3, 5, 16, grad=True), rand(8, 16, grad=True)
    w1, w2 = rand(32, 16, grad=True), rand(16, 32, grad=True)
    return {
        "layer_norm weight": (lambda v: ops.layer_norm(x, v, None), rand(32, grad=True)[::2]),
        "linear bias": (lambda v: ops.linear(x, w, v), rand(16, grad=True)[::2]),
        "linear layer_scale (expanded)": (lambda v: ops.linear(x, w, layer_scale=v),
                                          rand(1, grad=True).expand(8)),  # fmt: skip
        "layer_norm_linear ln_weight": (lambda v: ops.layer_norm_linear(x, v, None, w), rand(32, grad=True)[::2]),
        "layer_norm_mlp fc1_bias": (lambda v: ops.layer_norm_mlp(x, None, None, w1, v, w2), rand(64, grad=True)[::2]),
    }


@pytest.mark.parametrize("case", list(_strided_vectors()))
def test_strided_parameter_vectors_read_correctly(case):
    call, vector = _strided_vectors()[case]
    out = call(vector)
    with fastvit.use_backend("torch"):
        expected = call(vector)
    assert_close(out, expected, name=case)
    leaf = vector._base if vector._base is not None else vector
    (got,), (want,) = (torch.autograd.grad(y.square().sum(), leaf) for y in (out, expected))
    assert_close(got, want, name=f"{case}: gradient")


def test_patch_embed_backward_for_frozen_stem():
    """Only the position embedding, class token and bias train (a frozen patch projection): the backward
    returns distinct empty tensors for the gradients not asked for (custom-op outputs may not alias),
    eager and compiled."""
    imgs, weight = rand(2, 3, 16, 16), rand(8, 3, 8, 8)
    bias, pos, cls = rand(8, grad=True), rand(1, 5, 8, grad=True), rand(1, 1, 8, grad=True)
    call = lambda *args: ops.patch_embed(*args).square().sum()  # noqa: E731
    wanted = torch.autograd.grad(call(imgs, weight, bias, pos, cls), (bias, pos, cls))
    with fastvit.use_backend("torch"):
        reference = torch.autograd.grad(call(imgs, weight, bias, pos, cls), (bias, pos, cls))
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(imgs, weight, bias, pos, cls), (bias, pos, cls))
    for name, g, w, r in zip(("bias", "pos_embed", "cls_token"), got, wanted, reference):
        assert_close(w, r, name=f"d{name} vs the torch backend")
        assert_close(g, w, name=f"d{name} compiled")


def test_compiled_backward_with_a_permuted_input():
    """x a (T, B, D) tensor seen as (B, T, D): the backward ops' fake (meta) outputs must have the strides
    the kernels write (contiguous), or Inductor's stride assertions fail."""
    x = rand(5, 2, 16).transpose(0, 1).requires_grad_()
    w, b, w1, w2 = rand(16, grad=True), rand(16, grad=True), rand(32, 16, grad=True), rand(16, 32, grad=True)

    def block(x):
        h = ops.layer_norm(x, w, b)
        h = ops.linear(h, w2[:, :16], residual=x)
        return ops.layer_norm_mlp(h, w, b, w1, None, w2, residual=h)

    wanted = torch.autograd.grad(block(x).square().sum(), (x, w, w1))
    got = torch.autograd.grad(torch.compile(block, fullgraph=True)(x).square().sum(), (x, w, w1))
    for name, g, want in zip(("x", "ln weight", "fc1 weight"), got, wanted):
        assert_close(g, want, name=f"d{name}")


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, deferred init) take the torch path: the right shape, no autocast error."""
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    x, w, W, W1, W2 = meta(2, 5, 16), meta(16), meta(8, 16), meta(32, 16), meta(16, 32)
    cases = {
        "layer_norm": (ops.layer_norm(x, w, w), (2, 5, 16)),
        "linear": (ops.linear(x, W, meta(8), "gelu", residual=meta(2, 5, 8)), (2, 5, 8)),
        "layer_norm_linear": (ops.layer_norm_linear(x, w, w, W), (2, 5, 8)),
        "layer_norm_mlp": (ops.layer_norm_mlp(x, w, w, W1, meta(32), W2, residual=x), (2, 5, 16)),
        "attention": (ops.attention(meta(2, 2, 5, 16), meta(2, 2, 7, 16), meta(2, 2, 7, 16)), (2, 2, 5, 16)),
        "qkv_attention": (ops.qkv_attention(meta(2, 5, 48), 2), (2, 5, 16)),
        "patch_embed": (ops.patch_embed(meta(2, 3, 16, 16), meta(8, 3, 8, 8), meta(8), meta(1, 5, 8), meta(1, 1, 8)),
                        (2, 5, 8)),
    }
    for name, (out, shape) in cases.items():
        assert out.device.type == "meta" and tuple(out.shape) == shape, name


def test_torch_func_transforms_take_the_torch_path():
    """torch.func.grad / vmap / jvp wrap the tensors; the custom ops have no batching or forward-mode rules
    (jvp gave zero tangents), so those calls run the plain PyTorch path: gradients as autograd's."""
    from torch.func import grad, jvp, vmap

    x, w = rand(4, 16), rand(8, 16)
    loss = lambda w, x: ops.linear(x, w, activation="gelu").square().sum()  # noqa: E731
    leaf = w.clone().requires_grad_()
    loss(leaf, x).backward()
    assert_close(grad(loss)(w, x), leaf.grad, atol=1e-4, rtol=1e-4, name="torch.func.grad")
    per_sample = vmap(grad(loss), in_dims=(None, 0))(w, x[:, None])
    assert per_sample.shape == (4, 8, 16)
    assert_close(per_sample.sum(0), leaf.grad, atol=1e-4, rtol=1e-4, name="per-sample gradients")
    tangent = jvp(lambda x: ops.linear(x, w), (x,), (torch.ones_like(x),))[1]
    assert_close(tangent, torch.ones_like(x) @ w.t(), atol=1e-4, rtol=1e-4, name="jvp tangent")


def test_backward_through_a_graph_exported_without_gradients_is_refused():
    """Exported under no_grad the fused ops decide to save nothing for a backward; training through that
    graph is a clear error, not a read of tensors that were never saved."""
    block = torch.nn.Linear(16, 8, device=DEVICE)
    call = lambda m, x: ops.linear(x, m.weight, m.bias, activation="gelu")  # noqa: E731
    module = type("Gelu", (torch.nn.Module,), {"forward": lambda self, x: call(block, x)})()
    module.block = block
    with torch.no_grad():
        exported = torch.export.export(module, (rand(2, 16),)).module()
    with pytest.raises(RuntimeError, match="saved nothing for a backward"):
        exported(rand(2, 16)).sum().backward()


def test_numbers_may_be_numpy_scalars():
    np = pytest.importorskip("numpy")
    x = rand(2, 5, 16)
    ops.layer_norm(x, None, None, np.float32(1e-5))
    ops.linear(x, rand(8, 16), dropout_p=np.float64(0.1))
    ops.qkv_attention(rand(2, 5, 48), np.int64(2), scale=np.float32(0.25))


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------

def test_model_backward_is_bitwise_deterministic():
    model, x = tiny_model(), images(2)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in runs[0].items():
        assert torch.equal(grad, runs[1][name]), f"{name}: gradients differ between two identical backward runs"


# ---------------------------------------------------------------------------------------------------
# int64 offsets: element offsets past 2^31 through views of a sparse file (virtual memory, no allocation)
# ---------------------------------------------------------------------------------------------------

ROW_STRIDE = 2**30  # row 2 starts 2^31 elements past row 0: an int32 offset computation wraps there
BASE = 2**31  # views start here, so a wrapped (negative) offset still lands inside the file: a wrong value


@pytest.fixture
def huge_storage(tmp_path):
    """A 1-D fp32 tensor of 2^32 + 2^20 elements (16 GiB of address space) backed by a sparse file: pages
    exist only once written, so the test touches a few KiB while the kernels address beyond 2^31."""
    if DEVICE.type != "cpu":
        pytest.skip("the sparse-file views are CPU tensors, read through the interpreter")
    size = 2**32 + 2**20
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size * 4)
    return torch.from_file(str(path), shared=False, size=size, dtype=torch.float32)


def far_apart(storage, values, offset=0):
    """`values` (R, ...) with rows ROW_STRIDE elements apart in `storage`, starting at BASE + `offset`."""
    view = torch.as_strided(storage, values.shape, (ROW_STRIDE, *values[0].stride()), BASE + offset)
    with torch.no_grad():
        view.copy_(values)
    return view.requires_grad_()


INT64_OPS = {
    "layer_norm": lambda s: (ops.layer_norm, far_apart(s, rand(3, 8)), rand(8), rand(8)),
    "linear": lambda s: (ops.linear, far_apart(s, rand(3, 8)), rand(4, 8), rand(4)),
    "layer_norm_linear": lambda s: (ops.layer_norm_linear, far_apart(s, rand(3, 8)), rand(8), rand(8), rand(4, 8)),
    "layer_norm_mlp": lambda s: (ops.layer_norm_mlp, far_apart(s, rand(3, 8)), rand(8), rand(8), rand(16, 8), rand(16),
                                 rand(8, 16)),
    "attention_batch": lambda s: (ops.attention, *(far_apart(s, rand(3, 1, 5, 16), i * 80) for i in range(3))),
    "qkv_attention_batch": lambda s: (lambda qkv: ops.qkv_attention(qkv, 2), far_apart(s, rand(3, 5, 48))),
    "attention_rows": lambda s: (ops.attention, *(far_apart(s, rand(3, 1, 1, 16), i * 16).permute(1, 2, 0, 3)
                                                  for i in range(3))),
    "patch_embed_batch": lambda s: (ops.patch_embed, far_apart(s, rand(3, 3, 16, 16)), rand(8, 3, 8, 8), rand(8), None),
}


@pytest.mark.parametrize("op", INT64_OPS)
def test_offsets_beyond_2_pow_31_elements(op, huge_storage):
    """The third row (or batch) of the input lies 2^31 elements past the first: the output and every
    gradient (the backward reads the saved input through the same strides) match the same values
    laid out contiguously, which an int32 offset would not (it wraps 2^32 elements back, to unwritten
    zeros of the file)."""
    call, *args = INT64_OPS[op](huge_storage)
    args = [a.requires_grad_() if torch.is_tensor(a) and a.is_leaf else a for a in args]
    compact = [a.detach().contiguous().requires_grad_() if torch.is_tensor(a) else a for a in args]
    outputs = [call(*inputs) for inputs in (args, compact)]
    dy = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad(out, [a for a in inputs if torch.is_tensor(a)], dy)
             for out, inputs in zip(outputs, (args, compact))]
    assert_close(outputs[0], outputs[1], name=op)
    for i, (far, near) in enumerate(zip(*grads)):
        assert_close(far, near, name=f"{op}: gradient of input {i}")
