"""fastvit.ops.linear / layer_norm_linear on the fused GEMM (kernels/linear.py), through the interpreter on CPU.

Every result and every gradient is compared with an fp64 reference built from plain torch ops, by the
flash rule: our error <= 2 x the error of the same computation in eager PyTorch at the same dtype
(+ a small atol). Shapes are the issue's (K, N) list at M in {1, 17, 2 * 197 + 3}, chosen so every
GEMM has ragged M, N and K tails (the interpreter tile is 128 x 128 x 64) and the 397-row cases run two
program groups; the biggest shapes run once, in bf16, because interpreter time scales with tiles.
"""
import json

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing
from conftest import DEVICE, DTYPES, INTERPRETED, assert_close, assert_error_within, tolerance

from fastvit import count_launches
from fastvit.backend import use_backend
from fastvit.ops.linear import _linear_bwd, _linear_fwd, layer_norm_linear, linear

# name -> the pieces of one fused call; `ln` makes it layer_norm_linear
FUSIONS_ALONE = {
    "plain": dict(),
    "bias": dict(bias=True),
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "residual": dict(residual=True),
    "layer_scale": dict(layer_scale=True),
    "ln": dict(ln=True),
    "ln_no_affine": dict(ln=True, ln_affine=False),
}
MODEL_USES = {  # the Linears of a ViT block and head, each at one of the shapes
    "ln_qkv_bias": (dict(ln=True, bias=True), (397, 192, 576)),
    "proj_bias_residual": (dict(bias=True, residual=True), (397, 64, 48)),
    "ln_fc1_bias_gelu": (dict(ln=True, bias=True, activation="gelu"), (17, 384, 1536)),
    "fc2_bias_residual": (dict(bias=True, residual=True), (17, 100, 200)),
    "fc2_bias_layer_scale_residual": (dict(bias=True, residual=True, layer_scale=True), (397, 100, 200)),
    "ln_fc1_bias_gelu_tanh": (dict(ln=True, bias=True, activation="gelu_tanh"), (1, 100, 200)),
    "ln_head": (dict(ln=True, bias=True), (17, 768, 1000)),
}


def make_inputs(M, K, N, spec, dtype, lead=()):
    """fp64 leaf tensors for one call: random, never zeros; LayerNorm inputs get a large mean (spec's
    ln_mean, default 3)."""
    x = torch.randn(*lead, M, K, dtype=torch.float64)
    inputs = {"x": x + spec.get("ln_mean", 3.0) if spec.get("ln") else x, "weight": torch.randn(N, K, dtype=torch.float64) / K**0.5}
    if spec.get("ln") and spec.get("ln_affine", True):
        inputs["ln_weight"] = torch.rand(K, dtype=torch.float64) + 0.5
        inputs["ln_bias"] = torch.randn(K, dtype=torch.float64) * 0.5
    if spec.get("bias"):
        inputs["bias"] = torch.randn(N, dtype=torch.float64)
    if spec.get("residual"):
        inputs["residual"] = torch.randn(*lead, M, N, dtype=torch.float64)
    if spec.get("layer_scale"):
        inputs["layer_scale"] = torch.rand(N, dtype=torch.float64) + 0.5
    return {name: t.to(DEVICE, dtype) for name, t in inputs.items()}


def call(inputs, spec, dropout_p=0.0):
    args = dict(bias=inputs.get("bias"), activation=spec.get("activation"), dropout_p=dropout_p)
    if spec.get("ln"):
        return layer_norm_linear(inputs["x"], inputs.get("ln_weight"), inputs.get("ln_bias"), inputs["weight"], **args)
    return linear(inputs["x"], inputs["weight"], residual=inputs.get("residual"),
                  layer_scale=inputs.get("layer_scale"), sample_scale=spec.get("sample_scale"), **args)  # fmt: skip


def reference(inputs, spec, keep=None, dropout_p=0.0):
    """The same computation in plain torch ops (fp64 inputs give the fp64 reference)."""
    x = inputs["x"]
    if spec.get("ln"):
        x = F.layer_norm(x, (x.shape[-1],), inputs.get("ln_weight"), inputs.get("ln_bias"), 1e-6)
    y = F.linear(x, inputs["weight"], inputs.get("bias"))
    if spec.get("activation"):
        y = F.gelu(y, approximate="tanh" if spec["activation"] == "gelu_tanh" else "none")
    if keep is not None:
        y = y * keep / (1.0 - dropout_p)
    if "layer_scale" in inputs:
        y = y * inputs["layer_scale"]
    if "sample_scale" in spec:  # a factor per sample (x's leading dim), not a differentiable input
        y = y * spec["sample_scale"].to(y).view(-1, *[1] * (y.dim() - 1))
    if "residual" in inputs:
        y = inputs["residual"] + y
    return y


def forward_backward(fn, inputs, grad_out):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    y = fn(leaves)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), {name: t.grad for name, t in leaves.items()}


def check_against_fp64(M, K, N, spec, dtype, lead=()):
    """Output and every gradient: |ours - fp64| <= 2 |eager(dtype) - fp64| + atol."""
    inputs = make_inputs(M, K, N, spec, dtype, lead)
    grad_out = torch.randn(*lead, M, N, dtype=torch.float64, device=DEVICE)
    with use_backend("triton"):
        ours, our_grads = forward_backward(lambda t: call(t, spec), inputs, grad_out)
    with use_backend("torch"):
        eager, eager_grads = forward_backward(lambda t: call(t, spec), inputs, grad_out)
    fp64_inputs = {k: v.double() for k, v in inputs.items()}
    ref, ref_grads = forward_backward(lambda t: reference(t, spec), fp64_inputs, grad_out)

    assert ours.dtype == dtype and ours.shape == (*lead, M, N)
    for name, actual, expected, base in [("y", ours, ref, eager)] + [
        (f"d{k}", our_grads[k], ref_grads[k], eager_grads[k]) for k in inputs
    ]:
        assert actual is not None and actual.dtype == inputs.get(name[1:], ours).dtype, name
        atol = tolerance(dtype)[0] * max(1.0, expected.abs().max().item())
        assert_error_within(actual, base, expected, atol=atol, name=f"{name} M={M} K={K} N={N} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fusion", FUSIONS_ALONE)
def test_each_fusion_alone(fusion, dtype):
    check_against_fp64(17, 100, 200, FUSIONS_ALONE[fusion], dtype)


@pytest.mark.parametrize("M, K, N", [(1, 64, 48), (397, 64, 48), (397, 100, 200)])
def test_ragged_shapes_all_epilogues(M, K, N):
    spec = dict(bias=True, activation="gelu", residual=True, layer_scale=True)
    check_against_fp64(M, K, N, spec, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("use", MODEL_USES)
def test_model_uses(use, dtype):
    spec, (M, K, N) = MODEL_USES[use]
    if dtype == torch.float32 and K * N > 200_000:
        pytest.skip("the biggest shapes run once, in bf16 (interpreter time)")
    check_against_fp64(M, K, N, spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, M, scale", [((3,), 17, (0.0, 2.0, 0.5)), ((), 5, (2.0, 0.0, 1.0, 0.0, 3.0))],
                         ids=["3 samples of 17 rows", "2-D x: a factor per row"])  # fmt: skip
def test_sample_scale_stochastic_depth(lead, M, scale, dtype):
    """sample_scale, stochastic depth's keep / (1 - p) per sample (zeros included), on the branch before the
    residual add: output and every gradient against fp64. With 17 rows per sample, sample boundaries fall
    inside the forward's row tiles and inside the weight gradient's K-steps (its reduction is over rows)."""
    spec = dict(bias=True, activation="gelu", residual=True, layer_scale=True,
                sample_scale=torch.tensor(scale, device=DEVICE))  # fmt: skip
    check_against_fp64(M, 64, 48, spec, dtype, lead)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_layer_norm_prologue_large_mean(dtype):
    """LayerNorm -> GEMM with mean ~ 1000 x std (where a one-pass E[x^2] - E[x]^2 cancels) over K = 200
    (three K tiles, the last ragged): the output and every gradient hold the flash rule, and the mean /
    rstd saved for the backward match fp64 (fp32 inputs)."""
    spec = dict(ln=True, bias=True, ln_mean=1000.0)
    check_against_fp64(17, 200, 48, spec, dtype)
    if dtype == torch.float32:
        inputs = make_inputs(17, 200, 48, spec, dtype)
        x = inputs["x"]
        args = (x, inputs["weight"], inputs["bias"], None, None, inputs["ln_weight"], inputs["ln_bias"], None, None,
                None, "none", 0.0, 1e-6, True, False, False, dtype)  # fmt: skip
        _, _, mean, rstd, _ = _linear_fwd(*args)
        x64 = x.double()
        assert_close(mean, x64.mean(-1).float(), atol=0.0, rtol=1e-6, name="saved mean")
        assert_close(rstd, (x64.var(-1, unbiased=False) + 1e-6).rsqrt().float(), atol=0.0, rtol=1e-4, name="rstd")


def test_fc2_vit_base_shape_forward():
    """The longest K loop of ViT-B (fc2, K = 3072), forward only: its gradients' GEMMs are the cases above."""
    spec = dict(bias=True, residual=True)
    inputs = make_inputs(1, 3072, 768, spec, torch.bfloat16)
    with use_backend("triton"):
        ours = call(inputs, spec)
    with use_backend("torch"):
        eager = call(inputs, spec)
    ref = reference({k: v.double() for k, v in inputs.items()}, spec)
    assert_error_within(ours, eager, ref, atol=tolerance(torch.bfloat16)[0], name="fc2 y")


def force_tile(monkeypatch, dtype, block_n=None, **overrides):
    """Every GEMM launches with the tile the tuner would try (fitted to its fusions, as the tuner fits
    it), with `overrides` (SPLIT_K: slices where the GEMM can split; TMA): on a GPU the first candidate
    of the dtype's list with that TMA setting (and BLOCK_N, if given), under the interpreter its fixed tile."""
    from fastvit.kernels import linear as linear_kernels

    candidates = linear_kernels._CANDIDATES_16 if dtype != torch.float32 else linear_kernels._CANDIDATES_32
    tile = linear_kernels._INTERPRETER_TILE if INTERPRETED else next(
        (c for c in candidates if c["TMA"] == overrides.get("TMA", False) and block_n in (None, c["BLOCK_N"])), None)
    if tile is None:
        pytest.skip(f"no such {dtype} candidate: TMA {overrides.get('TMA', False)}, BLOCK_N {block_n}")
    fitted = lambda key, *_: dict(linear_kernels._fit_to_fusions(tile, dict(key[0])), **overrides)  # noqa: E731
    monkeypatch.setattr(linear_kernels, "_pick_tile", fitted)


def wide_tiles(monkeypatch, dtype):
    """Every GEMM runs 128 x 256 tiles, whose epilogue is finished as two 128-column halves: under the
    interpreter its fixed tile widened, on a GPU the tuner's 128 x 256 candidate (16-bit operands only)."""
    from fastvit.kernels import linear as linear_kernels

    if INTERPRETED:
        monkeypatch.setitem(linear_kernels._INTERPRETER_TILE, "BLOCK_N", 256)
    else:
        force_tile(monkeypatch, dtype, 256)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("spec", [
    dict(ln=True, bias=True, activation="gelu"),
    dict(bias=True, activation="gelu", residual=True, layer_scale=True, sample_scale=(0.0, 2.0)),
], ids=["ln_fc1", "fc2_ls_stochastic_depth"])  # fmt: skip
def test_wide_tiles_finish_the_epilogue_in_halves(monkeypatch, spec, dtype):
    """128 x 256 tiles, their epilogue finished as two column halves (kernels/linear.py), at N = 300: the
    first column block fills both halves, the second part of its left half (its right half is all
    padding). Output and every gradient against fp64 by the flash rule; the statistics a residual GEMM
    emits are those of its stored output."""
    wide_tiles(monkeypatch, dtype)
    if "sample_scale" in spec:
        spec = dict(spec, sample_scale=torch.tensor(spec["sample_scale"], device=DEVICE))
    check_against_fp64(75, 104, 300, spec, dtype, lead=(2,))
    if spec.get("residual"):
        inputs = make_inputs(75, 104, 300, spec, dtype, lead=(2,))
        with use_backend("triton"):
            y, stats = linear(inputs["x"], inputs["weight"], inputs["bias"], "gelu", inputs["residual"] + 100,
                              inputs["layer_scale"], return_stats=True)  # fmt: skip
        expected = group_stats_reference(y).reshape(stats.shape)
        assert_close(stats[0], expected[0].float(), atol=1e-5, rtol=1e-6, name="group means")
        assert_close(stats[1], expected[1].float(), atol=1e-4, rtol=1e-4, name="group M2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("spec", [dict(ln=True, bias=True, activation="gelu"), dict(ln=True, bias=True),
                                  dict(bias=True, residual=True, layer_scale=True)], ids=["ln_fc1", "ln_qkv", "fc2_ls"])
def test_split_k_weight_gradients(monkeypatch, spec, dtype):
    """The weight-gradient GEMM split over 3 slices of its 397-row reduction (the last one ragged), as on a
    GPU when its grid is too small to fill the SMs: dW, db and dls from the fp32 partials still hold the
    flash rule against fp64 (with the LayerNorm re-applied to x in each slice; ln_qkv accumulates dW^T,
    SWAP_AB), and reruns are bitwise."""
    force_tile(monkeypatch, dtype, SPLIT_K=3)
    check_against_fp64(397, 100, 200, spec, dtype)
    inputs = make_inputs(397, 100, 200, spec, dtype)
    grad_out = torch.randn(397, 200, device=DEVICE)
    with use_backend("triton"):
        first, second = (forward_backward(lambda t: call(t, spec), inputs, grad_out)[1] for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("block_n", [128, pytest.param(256, marks=pytest.mark.skipif(
    INTERPRETED, reason="the interpreter runs its one fixed tile: BLOCK_N 128 covers it"))])  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [dict(ln=True, bias=True, activation="gelu"), dict(ln=True, bias=True),
                                  dict(bias=True, residual=True, layer_scale=True)], ids=["ln_fc1", "ln_qkv", "fc2_ls"])
def test_tma_operand_loads(monkeypatch, spec, dtype, block_n):
    """Every GEMM of a layer (forward, dx, and dW split in 3 slices) with its operands read through TMA
    tensor descriptors, as the sm_90 tuner's TMA candidates read them: in both layouts (direct: x, dy, W in
    dx; transposed: W^T in the forward, dy^T in dW), the ragged M, N, K tails read as the descriptor's zeros
    instead of masked loads; ln_qkv's weight gradient accumulates dW^T (SWAP_AB). Same flash rule against
    fp64. (K = 104: 16-byte-aligned rows in 16-bit.) On a GPU the tiles are the tuner's TMA candidates,
    forced: gpu_check.sh leaves TMA out of the benchmarks' tuning if this (or the autocast case) fails."""
    from fastvit.kernels import linear as linear_kernels

    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors are sm_90's")
    layouts, operand = [], linear_kernels._operand
    monkeypatch.setattr(linear_kernels, "_operand", lambda *args: layouts.append(operand(*args)[1]) or operand(*args))
    force_tile(monkeypatch, dtype, block_n, TMA=True, SPLIT_K=3)
    check_against_fp64(397, 104, 200, spec, dtype)
    assert set(layouts) == {"direct", "transposed"}, layouts


def test_tma_layout_follows_the_unit_stride_and_alignment():
    """_tma_layout: a descriptor over the operand or its transpose, whichever has the unit stride; None
    where triton's TensorDescriptor would refuse (an unaligned base or row pitch), so those load by pointer."""
    from fastvit.kernels.linear import _tma_layout

    x = torch.empty(64, 48, dtype=torch.bfloat16)
    assert _tma_layout(x, (64, 48), x.stride()) == "direct"
    assert _tma_layout(x, (48, 64), x.t().stride()) == "transposed"
    assert _tma_layout(x[:, :40], (64, 40), x.stride()) == "direct"  # a column slice keeps a 96-byte pitch
    assert _tma_layout(x[:, 1:], (64, 47), x.stride()) is None  # base 2 bytes past alignment
    odd = torch.empty(64, 44, dtype=torch.bfloat16)
    assert _tma_layout(odd, (64, 44), odd.stride()) is None  # 88-byte rows
    assert _tma_layout(x[:, ::2], (64, 24), x[:, ::2].stride()) is None  # no unit stride
    row = x[:1].expand(64, 48)
    assert _tma_layout(row, (64, 48), row.stride()) is None  # a pitch of 0 (expanded)


def group_stats_reference(y):
    """fp64 (mean, M2) of every 64-column group of y's rows: what the epilogue's statistics hold."""
    y = y.double().reshape(-1, y.shape[-1])
    means, m2s = [], []
    for group in y.split(64, dim=1):
        means.append(group.mean(1))
        m2s.append(((group - group.mean(1, keepdim=True)) ** 2).sum(1))
    return torch.stack([torch.stack(means), torch.stack(m2s)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N, spec", [
    (17, 100, 200, dict(bias=True, residual=True)),  # groups 64 + 64 + 64 + 8 over two column tiles
    (397, 64, 48, dict(bias=True, residual=True, layer_scale=True)),  # one ragged group, four row tiles
    (5, 64, 256, dict(activation="gelu")),  # no residual: any output can hand its statistics on
])  # fmt: skip
def test_emitted_statistics_are_those_of_the_stored_output(M, K, N, spec, dtype):
    """linear(..., return_stats=True): per 64-column group, the mean and M2 of y as stored (its dtype's
    values), to fp32 rounding, with residual streams of large mean (the LayerNorm-relevant case)."""
    inputs = make_inputs(M, K, N, spec, dtype)
    if "residual" in inputs:
        inputs["residual"] = inputs["residual"] * 3 + 100
    with use_backend("triton"):
        y, stats = linear(inputs["x"], inputs["weight"], inputs.get("bias"), spec.get("activation"),
                          inputs.get("residual"), inputs.get("layer_scale"), return_stats=True)  # fmt: skip
    assert stats.shape == (2, -(-N // 64), M) and stats.dtype == torch.float32
    expected = group_stats_reference(y).reshape(stats.shape)
    assert_close(stats[0], expected[0].float(), atol=1e-5, rtol=1e-6, name="group means")
    assert_close(stats[1], expected[1].float(), atol=1e-4, rtol=1e-4, name="group M2")
    with use_backend("torch"):
        assert linear(inputs["x"], inputs["weight"], return_stats=True)[1] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("ln_mean", [3.0, 1000.0])
def test_layer_norm_linear_from_emitted_statistics(dtype, ln_mean):
    """The block's hand-off: proj + residual emits statistics, LN2 -> fc1 -> GELU consumes them instead of a
    statistics pass. The output and every gradient (through both ops, to x, the residual and every
    weight) hold the flash rule against fp64, at ordinary and at large row means, and the mean / rstd the
    consumer saves for its backward are exact."""
    M, K, N, H = 23, 100, 200, 48
    proj = make_inputs(M, K, N, dict(bias=True, residual=True), dtype)
    proj["residual"] = proj["residual"] + ln_mean
    fc1 = {k: v for k, v in make_inputs(M, N, H, dict(ln=True, bias=True), dtype).items() if k != "x"}
    inputs = {**proj, **{f"fc1_{k}": v for k, v in fc1.items()}}

    def chain(t):
        y, stats = linear(t["x"], t["weight"], t["bias"], residual=t["residual"], return_stats=True)
        return layer_norm_linear(y, t["fc1_ln_weight"], t["fc1_ln_bias"], t["fc1_weight"], t["fc1_bias"],
                                 activation="gelu", x_stats=stats)  # fmt: skip

    def chain_reference(t):
        y = reference(t, dict(bias=True, residual=True))
        fc1_inputs = {"x": y, **{k[4:]: v for k, v in t.items() if k.startswith("fc1_")}}
        return reference(fc1_inputs, dict(ln=True, bias=True, activation="gelu"))

    grad_out = torch.randn(M, H, dtype=torch.float64, device=DEVICE)
    with use_backend("triton"):
        ours, our_grads = forward_backward(chain, inputs, grad_out)
        with torch.no_grad(), count_launches() as launches:
            chain(inputs)
    assert "_row_stats_kernel" not in launches.by_kernel and launches.total == 2, launches.by_kernel
    with use_backend("torch"):
        eager, eager_grads = forward_backward(chain, inputs, grad_out)
    ref, ref_grads = forward_backward(chain_reference, {k: v.double() for k, v in inputs.items()}, grad_out)
    for name, actual, expected, base in [("y", ours, ref, eager)] + [
        (f"d{k}", our_grads[k], ref_grads[k], eager_grads[k]) for k in inputs
    ]:
        atol = tolerance(dtype)[0] * max(1.0, expected.abs().max().item())
        assert_error_within(actual, base, expected, atol=atol, name=f"{name} mean={ln_mean} {dtype}")

    if dtype == torch.float32:  # the consumer's saved statistics, straight from the custom op
        with use_backend("triton"):
            y, stats = linear(inputs["x"], inputs["weight"], inputs["bias"], residual=inputs["residual"],
                              return_stats=True)  # fmt: skip
        args = (y, fc1["weight"], fc1["bias"], None, None, fc1["ln_weight"], fc1["ln_bias"], None, stats, None,
                "gelu", 0.0, 1e-6, True, False, False, dtype)  # fmt: skip
        _, _, mean, rstd, _ = _linear_fwd(*args)
        y64 = y.double()
        assert_close(mean, y64.mean(-1).float(), atol=1e-6, rtol=1e-6, name="saved mean")
        assert_close(rstd, (y64.var(-1, unbiased=False) + 1e-6).rsqrt().float(), atol=0.0, rtol=1e-4, name="rstd")


def test_statistics_follow_row_selections():
    """The head's case: statistics of (B, T, D) tokens, indexed like them ([..., 0] for the class rows, a
    strided view), feed a LayerNorm -> GEMM over x[:, 0]."""
    B, T, K, N = 3, 5, 192, 10
    x, w = torch.randn(B, T, K, device=DEVICE), torch.randn(K, K, device=DEVICE) / K**0.5
    head_w, lw, lb = torch.randn(N, K, device=DEVICE), torch.rand(K, device=DEVICE) + 0.5, torch.randn(K, device=DEVICE)
    with use_backend("triton"):
        tokens, stats = linear(x, w, residual=x + 5, return_stats=True)
        assert stats.shape == (2, 3, B, T)
        ours = layer_norm_linear(tokens[:, 0], lw, lb, head_w, x_stats=stats[..., 0])
    expected = F.linear(F.layer_norm(tokens[:, 0].double(), (K,), lw.double(), lb.double(), 1e-6), head_w.double())
    assert_close(ours, expected.float(), atol=1e-4, rtol=1e-4, name="head logits")


def run_with_dropout(M, K, N, spec, p, dropped):
    """Forward + backward with dropout; recovers the keep-mask from the output (`dropped(y, inputs)`) and
    checks the output and every gradient against the fp64 reference with that mask: the backward must
    regenerate exactly the forward's mask. Returns the keep-mask."""
    inputs = make_inputs(M, K, N, spec, torch.float32)
    grad_out = torch.randn(M, N, dtype=torch.float64, device=DEVICE)
    with use_backend("triton"):
        y, grads = forward_backward(lambda t: call(t, spec, dropout_p=p), inputs, grad_out)
    keep = (~dropped(y, inputs)).double()
    ref, ref_grads = forward_backward(lambda t: reference(t, spec, keep, p), {k: v.double() for k, v in inputs.items()},
                                      grad_out)  # fmt: skip
    assert_close(y, ref, name="y with dropout")
    for name in inputs:
        assert_close(grads[name], ref_grads[name], atol=1e-3, name=f"d{name} with dropout")
    return keep


@pytest.mark.parametrize("wide", [False, True], ids=["default-tiles", "128x256-tiles"])
def test_dropout_statistics_and_backward_consistency(monkeypatch, wide):
    """Kept fraction ~ 1 - p; kept values scaled by 1/(1-p); the backward regenerates the forward's mask.
    With 128 x 256 tiles the forward's mask comes from both column halves of its epilogue (an interpreter
    path: on a GPU a dropout epilogue caps BLOCK_N at 64)."""
    if wide:
        wide_tiles(monkeypatch, torch.float32)
    p = 0.25
    spec = dict(bias=True, activation="gelu", residual=True, layer_scale=True)
    # a dropped element adds exactly 0 to the residual
    keep = run_with_dropout(64, 64, 256, spec, p, lambda y, inputs: y == inputs["residual"])
    kept = keep.mean().item()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5, f"kept fraction {kept}"


def test_dropout_seeded_by_torch_generator():
    inputs = make_inputs(17, 64, 48, {}, torch.float32)
    with use_backend("triton"):
        torch.manual_seed(1)
        first = call(inputs, {}, dropout_p=0.5)
        torch.manual_seed(1)
        again = call(inputs, {}, dropout_p=0.5)
        other = call(inputs, {}, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_layer_norm_linear_with_dropout():
    run_with_dropout(17, 100, 200, dict(ln=True, bias=True), 0.5, lambda y, inputs: y == 0)


def test_reruns_are_bitwise_equal():
    """No atomics anywhere: the forward and every gradient are bitwise reproducible."""
    spec = dict(ln=True, bias=True, activation="gelu")
    inputs = make_inputs(397, 100, 200, spec, torch.bfloat16)
    grad_out = torch.randn(397, 200, device=DEVICE)
    runs = []
    with use_backend("triton"):
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(forward_backward(lambda t: call(t, spec, dropout_p=0.1), inputs, grad_out))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1)
    for name in inputs:
        assert torch.equal(g0[name], g1[name]), name


def test_leading_dims_row_strides_and_empty():
    spec = dict(bias=True, activation="gelu", residual=True)
    inputs = make_inputs(9, 64, 48, spec, torch.float32, lead=(2,))
    wide = torch.randn(2, 9, 80, device=DEVICE)
    wide[..., :64] = inputs["x"]
    inputs["x"] = wide[..., :64]  # row stride 80: read in place
    with use_backend("triton"):
        y = call(inputs, spec)
        empty = linear(torch.randn(0, 3, 64, device=DEVICE), inputs["weight"])
    assert y.shape == (2, 9, 48) and empty.shape == (0, 3, 48)
    assert_close(y, reference({k: v.double() for k, v in inputs.items()}, spec), name="strided y")


def test_torch_compile_fullgraph():
    spec = dict(bias=True, activation="gelu", residual=True, layer_scale=True)
    ln_spec = dict(ln=True, bias=True, activation="gelu_tanh")
    inputs = make_inputs(17, 64, 48, spec, torch.float32)
    ln_inputs = make_inputs(17, 64, 48, ln_spec, torch.float32)
    grad_out = torch.randn(17, 48, device=DEVICE)
    compiled = torch.compile(call, fullgraph=True)
    with use_backend("triton"):
        for s, t in ((spec, inputs), (ln_spec, ln_inputs)):
            y, grads = forward_backward(lambda leaves: compiled(leaves, s), t, grad_out)
            y_eager, grads_eager = forward_backward(lambda leaves: call(leaves, s), t, grad_out)
            assert torch.equal(y, y_eager)
            for name in t:
                assert_close(grads[name], grads_eager[name], name=f"compiled d{name}")


@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma_operand_loads"])
def test_autocast_policy(monkeypatch, tma):
    """Under bf16 autocast: fp32 params and residual stream in, GEMM in bf16, the residual add stays fp32,
    LayerNorm reads the fp32 stream; both backends agree on dtypes and (to bf16 accuracy) values. With
    TMA forced, the fp32 x of the LayerNorm GEMM and the bf16 W come through descriptors of two dtypes."""
    if tma:
        if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("TMA descriptors are sm_90's")
        force_tile(monkeypatch, torch.bfloat16, TMA=True)
    spec = dict(bias=True, residual=True, layer_scale=True)
    ln_spec = dict(ln=True, bias=True, activation="gelu")
    results = {}
    for backend in ("triton", "torch"):
        for name, s in (("linear", spec), ("ln", ln_spec)):
            torch.manual_seed(5)
            inputs = make_inputs(17, 64, 48, s, torch.float32)
            grad_out = torch.randn(17, 48, device=DEVICE)
            with use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                results[backend, name] = forward_backward(lambda t: call(t, s), inputs, grad_out)
    assert results["triton", "linear"][0].dtype == torch.float32  # promote(bf16, fp32 residual)
    assert results["triton", "ln"][0].dtype == torch.bfloat16
    for name in ("linear", "ln"):
        (y, grads), (y_eager, grads_eager) = results["triton", name], results["torch", name]
        assert y.dtype == y_eager.dtype
        assert_close(y, y_eager, dtype=torch.bfloat16, atol=3e-2, name=f"{name} y")
        for k in grads:
            assert grads[k].dtype == torch.float32, k
            scale = max(1.0, grads_eager[k].abs().max().item())
            assert_close(grads[k], grads_eager[k], dtype=torch.bfloat16, atol=3e-2 * scale, name=f"{name} d{k}")


def test_torch_backend_parity_fp32():
    spec = dict(ln=True, bias=True, activation="gelu")
    inputs = make_inputs(17, 100, 200, spec, torch.float32)
    grad_out = torch.randn(17, 200, device=DEVICE)
    with use_backend("triton"):
        y, grads = forward_backward(lambda t: call(t, spec), inputs, grad_out)
    with use_backend("torch"):
        y_eager, grads_eager = forward_backward(lambda t: call(t, spec), inputs, grad_out)
    assert_close(y, y_eager, name="y")
    for name in inputs:
        assert_close(grads[name], grads_eager[name], atol=1e-3, name=f"d{name}")


def _bad_calls():
    x, w, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    lw = torch.ones(8)
    return {
        "K mismatch": (ValueError, "x", lambda: linear(x, torch.randn(6, 7))),
        "bias length": (ValueError, "bias", lambda: linear(x, w, torch.randn(5))),
        "layer_scale length": (ValueError, "layer_scale", lambda: linear(x, w, layer_scale=torch.randn(7))),
        "residual shape": (ValueError, "residual", lambda: linear(x, w, residual=torch.randn(2, 5, 5))),
        "weight rank": (ValueError, "weight", lambda: linear(x, torch.randn(48))),
        "ln_weight length": (ValueError, "weight", lambda: layer_norm_linear(x, torch.ones(7), None, w)),
        "ln_bias length": (ValueError, "bias", lambda: layer_norm_linear(x, lw, torch.ones(9), w)),
        "unknown activation": (ValueError, "activation", lambda: linear(x, w, activation="relu")),
        "dropout_p": (ValueError, "dropout_p", lambda: linear(x, w, dropout_p=1.0)),
        "eps": (ValueError, "eps", lambda: layer_norm_linear(x, lw, None, w, eps=0.0)),
        "mixed dtypes": (TypeError, "bias", lambda: linear(x, w, b.half())),
        "mixed residual dtype": (TypeError, "residual", lambda: linear(x, w, residual=torch.randn(2, 5, 6).double())),
        "mixed devices": (ValueError, "bias on meta", lambda: linear(x, w, b.to("meta"))),
        "not a tensor": (TypeError, "weight", lambda: linear(x, w.tolist())),
        "integer x": (TypeError, "x", lambda: linear(x.long(), w)),
        "x_stats shape": (ValueError, "x_stats", lambda: layer_norm_linear(x, lw, None, w, x_stats=torch.randn(2, 1, 5))),
        "sample_scale shape": (ValueError, "sample_scale", lambda: linear(x, w, sample_scale=torch.ones(5))),
        "sample_scale without batch": (ValueError, "sample_scale", lambda: linear(x[0, 0], w, sample_scale=torch.ones(1))),
        "sample_scale with grad": (ValueError, "sample_scale", lambda: linear(x, w, sample_scale=torch.ones(2, requires_grad=True))),
        "sample_scale device": (ValueError, "sample_scale on meta", lambda: linear(x, w, sample_scale=torch.ones(2, device="meta"))),
        "x_stats dtype": (TypeError, "x_stats", lambda: layer_norm_linear(x, lw, None, w, x_stats=torch.randn(2, 1, 2, 5).half())),
        "x_stats device": (ValueError, "x_stats on meta", lambda: layer_norm_linear(x, lw, None, w, x_stats=torch.randn(2, 1, 2, 5, device="meta"))),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_is_rejected_before_launch(case):
    error, mentions, bad_call = _bad_calls()[case]
    with use_backend("triton"), pytest.raises(error, match=mentions):
        bad_call()


def test_custom_ops_pass_opcheck():
    """Fake kernels, schemas and autograd registrations agree with the real ops (all fusions, dropout and
    a sample scale on)."""
    M, K, N, seed = 5, 16, 24, torch.tensor([7], device=DEVICE)
    sample_scale = torch.tensor([0.0, 1.25], device=DEVICE)
    x, ln_w, ln_b = (torch.randn(shape, device=DEVICE, requires_grad=True) for shape in ((2, M, K), (K,), (K,)))
    w, b, ls = (torch.randn(shape, device=DEVICE, requires_grad=True) for shape in ((N, K), (N,), (N,)))
    residual = torch.randn(2, M, N, device=DEVICE, requires_grad=True)
    x_stats = linear(x.detach(), torch.eye(K, device=DEVICE), residual=x.detach() + 1, return_stats=True)[1]
    for ln in (False, True):
        args = (x, w, b, None if ln else residual, None if ln else ls, ln_w if ln else None, ln_b if ln else None,
                seed, x_stats if ln else None, None if ln else sample_scale, "gelu", 0.2, 1e-6, ln, True, not ln,
                torch.float32)  # fmt: skip
        torch.library.opcheck(_linear_fwd, args)
        _, preact, mean, rstd, _ = _linear_fwd(*(a.detach() if torch.is_tensor(a) else a for a in args))
        bwd_args = (torch.randn(2, M, N, device=DEVICE), x.detach(), w.detach(), preact,
                    None if ln else ls.detach(), ln_w.detach() if ln else None, ln_b.detach() if ln else None,
                    mean, rstd, seed, None if ln else sample_scale, "gelu", 0.2, ln,
                    [True, True, True, not ln, ln, ln])  # fmt: skip
        torch.library.opcheck(_linear_bwd, bwd_args)


def test_cuda_tile_pick_tries_split_k_for_small_weight_gradient_grids(monkeypatch):
    """The CUDA-only tile pick, run on CPU with the device queries faked: for ViT-B proj's dW (768 x 768 out,
    50432-row reduction) on 132 SMs every candidate is also timed with K split (about one wave), the
    fastest (here: a fake timer favouring more programs) wins and is cached; GEMMs that cannot split and
    FASTVIT_AUTOTUNE=0 never split. Every candidate is compiled (concurrently) before any is timed.
    tuning_record() reports every candidate's time, the pick and the default."""
    import types

    from fastvit.kernels import linear as linear_kernels

    monkeypatch.setattr(linear_kernels, "is_interpreter", lambda: False)
    monkeypatch.setattr(linear_kernels, "_tuned", {})
    monkeypatch.setattr(linear_kernels, "_measured", {})
    monkeypatch.delenv("FASTVIT_AUTOTUNE", raising=False)  # (gpu_check.sh runs the tests with it 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tried, compiled = [], []

    def launch(tile, compile_only=False):
        if compile_only:
            assert not tried, "a candidate was compiled after the timing began"
        (compiled if compile_only else tried).append(tile)

    def fake_do_bench(fn, warmup, rep):
        fn()
        tile = tried[-1]
        return 1.0 / (triton.cdiv(768, tile["BLOCK_M"]) * triton.cdiv(768, tile["BLOCK_N"]) * tile.get("SPLIT_K", 1))

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    flags = dict(LN_A=False, LN_B=False, GRAD_A=True, TRANS_A=True, ACTIVATION="none", DROPOUT=False, HAS_SCALE=False,
                 HAS_SAMPLE_SCALE=False, PREACT_GRAD="none", PREACT_DROPOUT=False, DOT_DTYPE=triton.language.bfloat16)  # fmt: skip
    # proj's dW; operands TMA cannot address
    key = (tuple(flags.items()), torch.bfloat16, torch.bfloat16, torch.bfloat16, 1024, 768, 50432, False)
    picked = linear_kernels._pick_tile(key, 768, 768, 50432, torch.bfloat16, launch, True, False)
    assert compiled == tried
    splits = {t["SPLIT_K"] for t in tried}
    assert 1 in splits and max(splits) > 1 and picked["SPLIT_K"] == max(splits), tried
    tiles = triton.cdiv(768, picked["BLOCK_M"]) * triton.cdiv(768, picked["BLOCK_N"])
    assert tiles * picked["SPLIT_K"] <= 132, picked
    assert linear_kernels._pick_tile(key, 768, 768, 50432, torch.bfloat16, None, True, False) is picked  # cached
    [row] = linear_kernels.tuning_record()
    assert row["flags"] == {"GRAD_A": "True", "TRANS_A": "True", "DOT_DTYPE": "bf16"}, row["flags"]
    assert (row["M_bucket"], row["N"], row["K"], row["tma_eligible"]) == (1024, 768, 50432, False)
    assert row["picked"] == picked
    assert [c["tile"] for c in row["candidates"]] == tried
    default = row["default"]
    assert default in tried
    assert row["default_ms"] == 1.0 / (triton.cdiv(768, default["BLOCK_M"]) * triton.cdiv(768, default["BLOCK_N"])
                                       * default["SPLIT_K"])  # fmt: skip
    json.dumps(row)  # goes into the benchmarks' JSON

    tried.clear()
    compiled.clear()
    tma_key = key[:-1] + (True,)  # operands TMA can address: a key of its own, tuned anew
    unsplit = linear_kernels._pick_tile(tma_key, 768, 768, 50432, torch.bfloat16, launch, False, True)
    assert unsplit["SPLIT_K"] == 1 and {t["SPLIT_K"] for t in tried} == {1}
    assert {t["TMA"] for t in tried} == {False, True}  # TMA candidates where the operands allow (sm_90)
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    monkeypatch.setattr(linear_kernels, "_tuned", {})
    assert linear_kernels._pick_tile(key, 768, 768, 50432, torch.bfloat16, None, False, False)["SPLIT_K"] == 1


def test_compile_concurrently_skips_failures_and_yields_to_an_outer_async_mode():
    """kernels/_helpers.compile_concurrently: every warm-up is called, one failing to compile does not stop
    the others (the tuner skips it when timed), and inside a caller's own triton.AsyncCompileMode (which
    Triton does not nest) it warms nothing up instead of raising."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime.errors import PTXASError

    from fastvit.kernels._helpers import compile_concurrently

    called = []

    def failing():
        called.append("failing")
        raise PTXASError("ptxas failed")

    compile_concurrently([failing, lambda: called.append("next")])
    assert called == ["failing", "next"]
    with ThreadPoolExecutor(1) as pool, triton.AsyncCompileMode(pool):
        compile_concurrently([lambda: called.append("inside")])
    assert called == ["failing", "next"]
