"""fastvit.ops.layer_norm_mlp: LN > fc1 > GELU > fc2 (+ layer scale, dropout, residual) as one op whose
backward forms GELU's gradient in fc2's dx epilogue, through the interpreter on CPU.

Every output and gradient against an fp64 reference by the flash rule (ours <= 2 x eager's error at the
same dtype + a small atol), and against the two-op composition it replaces (layer_norm_linear, then
linear): the forward bitwise, the gradients to rounding. Shapes leave ragged tails in every dim of every
GEMM at the interpreter's 128 x 128 x 64 tile: hidden = 200 is fc2's ragged K and fc1's ragged N.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, assert_close, assert_error_within, tolerance

from fastvit import count_launches
from fastvit.backend import use_backend
from fastvit.ops import layer_norm_linear, layer_norm_mlp, linear
from fastvit.ops.mlp import _mlp_bwd, _mlp_fwd
from test_linear import wide_tiles

PIECES = ("ln_weight", "ln_bias", "fc1_bias", "fc2_bias", "residual", "layer_scale")


def make_inputs(M, D, hidden, N, dtype, lead=(2,), omit=()):
    """fp64-drawn leaves in `dtype`, random and never zero; x has a large mean (3) for the LayerNorm."""
    shapes = dict(x=(*lead, M, D), ln_weight=(D,), ln_bias=(D,), fc1_weight=(hidden, D), fc1_bias=(hidden,),
                  fc2_weight=(N, hidden), fc2_bias=(N,), residual=(*lead, M, N), layer_scale=(N,))  # fmt: skip
    inputs = {name: torch.randn(shape, dtype=torch.float64) for name, shape in shapes.items() if name not in omit}
    inputs["x"] += 3.0
    inputs["fc1_weight"] /= D**0.5
    inputs["fc2_weight"] /= hidden**0.5
    for name in ("ln_weight", "layer_scale"):
        if name in inputs:
            inputs[name] = inputs[name].abs() + 0.5
    return {name: t.to(DEVICE, dtype) for name, t in inputs.items()}


def fused(t, activation="gelu", dropout_p=0.0, sample_scale=None, hidden_dropout_p=0.0):
    return layer_norm_mlp(t["x"], t.get("ln_weight"), t.get("ln_bias"), t["fc1_weight"], t.get("fc1_bias"),
                          t["fc2_weight"], t.get("fc2_bias"), activation=activation, residual=t.get("residual"),
                          layer_scale=t.get("layer_scale"), dropout_p=dropout_p, sample_scale=sample_scale,
                          hidden_dropout_p=hidden_dropout_p)  # fmt: skip


def two_ops(t, activation="gelu", dropout_p=0.0, hidden_dropout_p=0.0):
    h = layer_norm_linear(t["x"], t.get("ln_weight"), t.get("ln_bias"), t["fc1_weight"], t.get("fc1_bias"),
                          activation=activation, dropout_p=hidden_dropout_p)  # fmt: skip
    return linear(h, t["fc2_weight"], t.get("fc2_bias"), residual=t.get("residual"), layer_scale=t.get("layer_scale"),
                  dropout_p=dropout_p)  # fmt: skip


def reference(t, activation="gelu", sample_scale=None):
    """Plain torch ops (fp64 inputs give the fp64 reference)."""
    x = F.layer_norm(t["x"], (t["x"].shape[-1],), t.get("ln_weight"), t.get("ln_bias"), 1e-6)
    h = F.linear(x, t["fc1_weight"], t.get("fc1_bias"))
    if activation is not None:
        h = F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")
    y = F.linear(h, t["fc2_weight"], t.get("fc2_bias"))
    if "layer_scale" in t:
        y = y * t["layer_scale"]
    if sample_scale is not None:
        y = y * sample_scale.to(y).view(-1, *[1] * (y.dim() - 1))
    return t["residual"] + y if "residual" in t else y


def forward_backward(fn, inputs, grad_out):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    y = fn(leaves)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation, sample_scale", [("gelu", None), ("gelu_tanh", None), ("gelu", (0.0, 2.5))],
                         ids=["gelu", "gelu_tanh", "gelu-stochastic-depth"])  # fmt: skip
def test_output_and_every_gradient_against_fp64(activation, sample_scale, dtype):
    """Stochastic depth: one of the 2 samples dropped, the other scaled, 17 rows each (a boundary inside the
    row tiles and the weight gradients' K-steps)."""
    inputs = make_inputs(17, 100, 200, 48, dtype)
    grad_out = torch.randn(2, 17, 48, dtype=torch.float64, device=DEVICE)
    scale = None if sample_scale is None else torch.tensor(sample_scale, device=DEVICE)
    with use_backend("triton"):
        ours, our_grads = forward_backward(lambda t: fused(t, activation, sample_scale=scale), inputs, grad_out)
    with use_backend("torch"):
        eager, eager_grads = forward_backward(lambda t: fused(t, activation, sample_scale=scale), inputs, grad_out)
    ref, ref_grads = forward_backward(lambda t: reference(t, activation, scale),
                                      {k: v.double() for k, v in inputs.items()}, grad_out)  # fmt: skip
    assert ours.dtype == dtype and ours.shape == (2, 17, 48)
    for name, actual, expected, base in [("y", ours, ref, eager)] + [
        (f"d{k}", our_grads[k], ref_grads[k], eager_grads[k]) for k in inputs
    ]:
        assert actual is not None and actual.dtype == inputs.get(name[1:], ours).dtype, name
        atol = tolerance(dtype)[0] * max(1.0, expected.abs().max().item())
        assert_error_within(actual, base, expected, atol=atol, name=f"{name} {activation} {dtype}")


def test_wide_tiles_against_fp64(monkeypatch):
    """With 128 x 256 tiles, whose epilogues are finished as two column halves: fc1's (GELU, its saved
    pre-activation), fc2's (layer scale, stochastic depth, residual) and fc2's dx GEMM's, which forms
    GELU's gradient there (hidden = 200: the right half partly padding)."""
    wide_tiles(monkeypatch, torch.bfloat16)
    test_output_and_every_gradient_against_fp64("gelu", (0.0, 2.5), torch.bfloat16)


@pytest.mark.parametrize("omit", [(), ("residual", "layer_scale"), ("ln_weight", "ln_bias", "fc1_bias", "fc2_bias")],
                         ids=["all", "no-residual-no-scale", "no-affine-no-bias"])  # fmt: skip
@pytest.mark.parametrize("activation", ["gelu", None])
def test_same_numbers_as_the_two_ops(omit, activation):
    """Forward bitwise equal to layer_norm_linear then linear (the same two GEMMs); every gradient equal to
    rounding (dz = dh * gelu'(z) is now formed from fp32 dh in the epilogue, not from stored dh), at 397
    rows: 4 row-blocks, two program groups."""
    inputs = make_inputs(397, 64, 200, 48, torch.float32, lead=(), omit=omit)
    grad_out = torch.randn(397, 48, device=DEVICE)
    with use_backend("triton"):
        y, grads = forward_backward(lambda t: fused(t, activation), inputs, grad_out)
        y_two, grads_two = forward_backward(lambda t: two_ops(t, activation), inputs, grad_out)
    assert torch.equal(y, y_two)
    assert set(grads) == set(inputs)
    for name in inputs:
        assert_close(grads[name], grads_two[name], atol=1e-4 * max(1.0, grads_two[name].abs().max().item()),
                     name=f"d{name}")  # fmt: skip


def test_statistics_hand_off_and_launches():
    """x_stats in and return_stats out as the two ops do (the same statistics, bitwise); a forward is the two
    GEMMs, a backward four GEMMs and one LayerNorm backward pass, with no statistics pass anywhere."""
    inputs = make_inputs(17, 64, 200, 64, torch.float32, lead=(2,))
    x, x_stats = linear(inputs["x"], torch.eye(64, device=DEVICE), residual=inputs["x"], return_stats=True)
    t = {name: v.requires_grad_() for name, v in dict(inputs, x=x).items()}
    args = (t["ln_weight"], t["ln_bias"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"])
    with use_backend("triton"), count_launches() as forward:
        y, y_stats = layer_norm_mlp(x, *args, residual=x, x_stats=x_stats, return_stats=True)
    with use_backend("triton"), count_launches() as backward:
        y.sum().backward()
    with use_backend("triton"):
        h = layer_norm_linear(x, *args[:4], activation="gelu", x_stats=x_stats)
        y_two, y_stats_two = linear(h, *args[4:], residual=x, return_stats=True)
    assert torch.equal(y, y_two) and torch.equal(y_stats, y_stats_two)
    assert forward.by_kernel == {"_linear_kernel": 2}, forward
    assert backward.by_kernel == {"_linear_kernel": 4, "_layer_norm_bwd_kernel": 1}, backward


@pytest.mark.parametrize("wide", [False, True], ids=["default-tiles", "128x256-tiles"])
@pytest.mark.parametrize("hidden_p, p", [(0.0, 0.3), (0.4, 0.0), (0.4, 0.3)])
def test_dropouts_match_the_two_ops(monkeypatch, hidden_p, p, wide):
    """Each dropout draws one seed from torch's generator (the hidden one first), as the two ops do: the
    same masks forward, and backward the hidden mask regenerated in fc2's dx epilogue (with wide tiles:
    in each column half of it)."""
    if wide:
        wide_tiles(monkeypatch, torch.float32)
    inputs = make_inputs(17, 64, 200, 48, torch.float32)
    grad_out = torch.randn(2, 17, 48, device=DEVICE)
    runs = []
    with use_backend("triton"):
        for fn in (fused, two_ops):
            torch.manual_seed(4)
            runs.append(forward_backward(lambda t: fn(t, dropout_p=p, hidden_dropout_p=hidden_p), inputs, grad_out))
        torch.manual_seed(4)
        undropped = fused(inputs)
    (y, grads), (y_two, grads_two) = runs
    assert torch.equal(y, y_two) and not torch.allclose(y, undropped)
    for name in inputs:
        assert_close(grads[name], grads_two[name], atol=1e-4 * max(1.0, grads_two[name].abs().max().item()),
                     name=f"d{name} with dropout")  # fmt: skip


def test_reruns_are_bitwise_equal_and_no_grad_saves_nothing():
    inputs = make_inputs(17, 64, 200, 48, torch.bfloat16)
    grad_out = torch.randn(2, 17, 48, device=DEVICE)
    with use_backend("triton"):
        (y0, g0), (y1, g1) = (forward_backward(fused, inputs, grad_out) for _ in range(2))
        with torch.no_grad():
            outputs = _mlp_fwd(inputs["x"], None, None, inputs["fc1_weight"], None, inputs["fc2_weight"], None, None,
                               None, None, None, None, None, "gelu", 0.0, 0.0, 1e-6, False, False, False,
                               torch.bfloat16)  # fmt: skip
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in inputs)
    assert [outputs[i].numel() for i in (2, 5, 6)] == [0, 0, 0]  # z, fc2's pre-activation, statistics: not asked for


def test_torch_compile_fullgraph_and_autocast():
    inputs = make_inputs(17, 64, 200, 48, torch.float32)
    grad_out = torch.randn(2, 17, 48, device=DEVICE)
    compiled = torch.compile(fused, fullgraph=True)
    with use_backend("triton"):
        y, grads = forward_backward(compiled, inputs, grad_out)
        y_eager, grads_eager = forward_backward(fused, inputs, grad_out)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y_auto, grads_auto = forward_backward(fused, inputs, grad_out)
    with use_backend("torch"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y_auto_eager, grads_auto_eager = forward_backward(fused, inputs, grad_out)
    assert torch.equal(y, y_eager)
    assert y_auto.dtype == y_auto_eager.dtype == torch.float32  # promote(bf16, fp32 residual)
    # two bf16 GEMMs in a row: a value may differ by an ulp of the branch's largest output
    assert_close(y_auto, y_auto_eager, dtype=torch.bfloat16, atol=3e-2 * y_auto_eager.abs().max().item(),
                 name="autocast y")  # fmt: skip
    for name in inputs:
        assert_close(grads[name], grads_eager[name], name=f"compiled d{name}")
        assert grads_auto[name].dtype == torch.float32, name
        scale = max(1.0, grads_auto_eager[name].abs().max().item())
        assert_close(grads_auto[name], grads_auto_eager[name], dtype=torch.bfloat16, atol=3e-2 * scale,
                     name=f"autocast d{name}")  # fmt: skip


def _bad_calls():
    x, w1, w2 = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(6, 12)
    lw, lb = torch.ones(8), torch.zeros(8)
    return {
        "x width": (ValueError, "x: expected last dim K = 8", lambda: layer_norm_mlp(torch.randn(2, 5, 7), None, None, w1, None, w2)),
        "fc1_bias length": (ValueError, "fc1_bias", lambda: layer_norm_mlp(x, lw, lb, w1, torch.ones(11), w2)),
        "fc2_weight width": (ValueError, "fc2_weight", lambda: layer_norm_mlp(x, lw, lb, w1, None, torch.randn(6, 11))),
        "fc2_bias length": (ValueError, "fc2_bias", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, torch.ones(5))),
        "residual shape": (ValueError, "residual", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, residual=torch.randn(2, 5, 8))),
        "layer_scale length": (ValueError, "layer_scale", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, layer_scale=torch.ones(8))),
        "ln_weight length": (ValueError, "weight", lambda: layer_norm_mlp(x, torch.ones(7), lb, w1, None, w2)),
        "unknown activation": (ValueError, "activation", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, activation="relu")),
        "dropout_p": (ValueError, "dropout_p", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, dropout_p=-0.1)),
        "hidden_dropout_p": (ValueError, "hidden_dropout_p", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, hidden_dropout_p=1.0)),
        "mixed dtypes": (TypeError, "fc2_weight", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2.double())),
        "mixed devices": (ValueError, "fc2_bias on meta", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, torch.ones(6, device="meta"))),
        "x_stats shape": (ValueError, "x_stats", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, x_stats=torch.randn(2, 1, 5))),
        "sample_scale shape": (ValueError, "sample_scale", lambda: layer_norm_mlp(x, lw, lb, w1, None, w2, sample_scale=torch.ones(5))),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_is_rejected_before_launch(case):
    error, mentions, bad_call = _bad_calls()[case]
    with use_backend("triton"), count_launches() as launches, pytest.raises(error, match=mentions):
        bad_call()
    assert launches.total == 0


def test_custom_ops_pass_opcheck():
    """Fake kernels, schemas and autograd registration agree with the real ops (every piece, both dropouts on)."""
    t = {k: v.requires_grad_() for k, v in make_inputs(5, 16, 40, 24, torch.float32).items()}
    hidden_seed, seed = torch.tensor([5], device=DEVICE), torch.tensor([7], device=DEVICE)
    sample_scale = torch.tensor([1.25, 0.0], device=DEVICE)
    x_stats = linear(t["x"].detach(), torch.eye(16, device=DEVICE), residual=t["x"].detach(), return_stats=True)[1]
    args = (t["x"], t["ln_weight"], t["ln_bias"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"],
            t["residual"], t["layer_scale"], hidden_seed, seed, x_stats, sample_scale, "gelu", 0.1, 0.2, 1e-6, True,
            True, True, torch.float32)
    torch.library.opcheck(_mlp_fwd, args)
    _, h, z, mean, rstd, fc2_preact, _ = _mlp_fwd(*(a.detach() if torch.is_tensor(a) else a for a in args))
    bwd_args = (torch.randn(2, 5, 24, device=DEVICE), t["x"].detach(), h, z, t["fc1_weight"].detach(),
                t["fc2_weight"].detach(), fc2_preact, t["layer_scale"].detach(), t["ln_weight"].detach(),
                t["ln_bias"].detach(), mean, rstd, hidden_seed, seed, sample_scale, "gelu", 0.1, 0.2,
                [True] * 8)  # fmt: skip
    torch.library.opcheck(_mlp_bwd, bwd_args)
