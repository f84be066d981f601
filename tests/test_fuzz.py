"""Property-based tests: every public op against the torch backend over random shapes, memory layouts
(row slices, transposed and channels-last views, a strided last dim) and dtypes, forward and every
gradient.

The reference is the torch backend run in fp32 on the same values (inputs are rounded to the tested
dtype first, so only the op's own rounding is measured). Results must be within a per-dtype tolerance or,
in fp16 / bf16, within DESIGN's rule: at most 2x eager PyTorch's own error in that dtype, with a slack of
two ulps of the largest value (assert_accurate). Examples are tiny and few, derandomized so CI sees the
same cases on every run; shapes still cross the kernels' tile edges (ragged tails, padded head
dims and LayerNorm widths). FASTVIT_FUZZ_EXAMPLES=200 runs a deeper local search.
"""
import functools
import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastvit  # noqa: E402
from conftest import DEVICE, DTYPES, assert_close, assert_error_within, tolerance  # noqa: E402
from fastvit import ops  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("FASTVIT_FUZZ_EXAMPLES", 8)), deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
LAYOUTS = ("contiguous", "row_slice", "transposed", "strided_last")

dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


def arranged(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a fresh leaf tensor, so gradients land on it).

    row_slice: the rows are a slice of wider rows; transposed: the first two dims are swapped in memory;
    strided_last: the last dim has stride 2 (the ops copy it once)."""
    if layout == "row_slice":
        wide = values.new_zeros((*values.shape[:-1], values.shape[-1] + 3))
        out = wide[..., 1:-2]
    elif layout == "transposed" and values.dim() >= 2:
        out = values.new_zeros((values.shape[1], values.shape[0], *values.shape[2:])).transpose(0, 1)
    elif layout == "strided_last":
        out = values.new_zeros((*values.shape, 2))[..., 0]
    else:
        out = values.new_zeros(values.shape)
    with torch.no_grad():
        out.copy_(values)
    return out.requires_grad_()


def random(shape, dtype, layout="contiguous", scale=1.0):
    return arranged((scale * torch.randn(shape, device=DEVICE)).to(dtype), layout)


def optional(draw, shape, dtype):
    return random(shape, dtype) if draw(st.booleans()) else None


def _torch_backend_run(call, inputs, dy, dtype):
    """The torch backend's output and input gradients on copies of `inputs` in `dtype`."""
    copies = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    with fastvit.use_backend("torch"):
        out = call(*copies)
    out.backward(dy.to(dtype))
    return out, [t.grad for t in copies if t is not None]


def assert_accurate(ours, expected, eager, dtype, *, atol, rtol, name):
    """The per-dtype tolerance elementwise or, failing that in fp16 / bf16, DESIGN's rule: the max error
    against the fp32 reference at most 2x eager PyTorch's own in the same dtype, plus a slack (not in
    DESIGN) of two ulps of the reference's largest value, for results eager happens to get exact. A fixed
    atol misjudges long low-precision reductions, where eager itself errs by more (gradients summed over
    many rows, GELU' at large inputs)."""
    try:
        assert_close(ours, expected, dtype=dtype, atol=atol, rtol=rtol, name=name)
    except AssertionError as fixed:
        if dtype == torch.float32:
            raise
        ulps = 2 * torch.finfo(dtype).eps * expected.detach().abs().max().item()
        try:
            assert_error_within(ours, eager(), expected, factor=2.0, atol=ulps, name=name)
        except AssertionError as rule:
            raise AssertionError(f"{fixed}\nand by DESIGN's rule: {rule}") from None


def check_against_torch(call, inputs, dtype, *, grad_scale=4.0):
    """Forward and the gradient of every input tensor, ours against the torch backend on fp32 copies
    (eager in `dtype` too, computed only when a half-precision result misses the fixed tolerance)."""
    out = call(*inputs)
    dy = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    out.backward(dy)
    expected, expected_grads = _torch_backend_run(call, inputs, dy, torch.float32)
    eager = functools.cache(lambda: _torch_backend_run(call, inputs, dy, dtype))
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_accurate(out, expected, lambda: eager()[0], dtype, atol=tolerance(dtype, 2.0)[0], rtol=tolerance(dtype)[1],
                    name="output")  # fmt: skip
    ours_grads = [t.grad for t in inputs if t is not None]
    for i, (ours, ref) in enumerate(zip(ours_grads, expected_grads)):
        assert_accurate(ours, ref, lambda i=i: eager()[1][i], dtype, atol=tolerance(dtype, grad_scale)[0],
                        rtol=tolerance(dtype)[1] * 2, name=f"grad of input {i}")  # fmt: skip


lead_dims = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)


@FUZZ
@given(data=st.data(), lead=lead_dims, D=st.integers(1, 70), dtype=dtypes, layout=layouts)
def test_layer_norm(data, lead, D, dtype, layout):
    x = random((*lead, D), dtype, layout, scale=3.0)
    weight, bias = optional(data.draw, (D,), dtype), optional(data.draw, (D,), dtype)
    check_against_torch(lambda x, w, b: ops.layer_norm(x, w, b), (x, weight, bias), dtype)


def _linear_case(data, lead, K, N, dtype, layout):
    x = random((*lead, K), dtype, layout)
    weight = random((N, K), dtype, data.draw(st.sampled_from(("contiguous", "row_slice"))), scale=K**-0.5)
    bias = optional(data.draw, (N,), dtype)
    activation = data.draw(st.sampled_from((None, "gelu", "gelu_tanh")))
    return x, weight, bias, activation


@FUZZ
@given(data=st.data(), lead=lead_dims, K=st.integers(1, 40), N=st.integers(1, 40), dtype=dtypes, layout=layouts)
def test_linear(data, lead, K, N, dtype, layout):
    x, weight, bias, activation = _linear_case(data, lead, K, N, dtype, layout)
    residual = optional(data.draw, (*lead, N), dtype)
    layer_scale = optional(data.draw, (N,), dtype)
    sample_scale = _sample_scale(data, lead)
    check_against_torch(
        lambda x, w, b, r, s: ops.linear(x, w, b, activation, residual=r, layer_scale=s, sample_scale=sample_scale),
        (x, weight, bias, residual, layer_scale), dtype,
    )


def _sample_scale(data, lead):
    """None, or stochastic depth's factor per sample of the leading dim: 0 (dropped) or 1 / keep."""
    if not data.draw(st.booleans()):
        return None
    return torch.tensor(data.draw(st.lists(st.sampled_from((0.0, 1.25, 2.0)), min_size=lead[0], max_size=lead[0])),
                        device=DEVICE)  # fmt: skip


@FUZZ
@given(data=st.data(), lead=lead_dims, D=st.integers(1, 40), hidden=st.integers(1, 80), N=st.integers(1, 40),
       dtype=dtypes, layout=layouts)  # fmt: skip
def test_layer_norm_mlp(data, lead, D, hidden, N, dtype, layout):
    x = random((*lead, D), dtype, layout, scale=3.0)
    ln_weight, ln_bias = optional(data.draw, (D,), dtype), optional(data.draw, (D,), dtype)
    fc1_weight, fc1_bias = random((hidden, D), dtype, scale=D**-0.5), optional(data.draw, (hidden,), dtype)
    fc2_weight, fc2_bias = random((N, hidden), dtype, scale=hidden**-0.5), optional(data.draw, (N,), dtype)
    residual, layer_scale = optional(data.draw, (*lead, N), dtype), optional(data.draw, (N,), dtype)
    activation = data.draw(st.sampled_from((None, "gelu", "gelu_tanh")))
    sample_scale = _sample_scale(data, lead)
    check_against_torch(
        lambda x, lw, lb, w1, b1, w2, b2, r, s: ops.layer_norm_mlp(
            x, lw, lb, w1, b1, w2, b2, activation=activation, residual=r, layer_scale=s, sample_scale=sample_scale),
        (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale), dtype,
    )  # fmt: skip


@FUZZ
@given(data=st.data(), lead=lead_dims, K=st.integers(1, 40), N=st.integers(1, 40), dtype=dtypes, layout=layouts)
def test_layer_norm_linear(data, lead, K, N, dtype, layout):
    x, weight, bias, activation = _linear_case(data, lead, K, N, dtype, layout)
    ln_weight, ln_bias = optional(data.draw, (K,), dtype), optional(data.draw, (K,), dtype)
    check_against_torch(
        lambda x, lw, lb, w, b: ops.layer_norm_linear(x, lw, lb, w, b, activation=activation),
        (x, ln_weight, ln_bias, weight, bias), dtype,
    )


@FUZZ
@given(B=st.integers(1, 2), H=st.integers(1, 2), Nq=st.integers(1, 20), Nk=st.integers(1, 20),
       d=st.integers(1, 40), dtype=dtypes, layouts=st.lists(layouts, min_size=3, max_size=3))  # fmt: skip
def test_attention(B, H, Nq, Nk, d, dtype, layouts):
    q = random((B, H, Nq, d), dtype, layouts[0])
    k, v = (random((B, H, Nk, d), dtype, layout) for layout in layouts[1:])
    check_against_torch(lambda q, k, v: ops.attention(q, k, v), (q, k, v), dtype)


@FUZZ
@given(B=st.integers(1, 2), N=st.integers(1, 20), heads=st.integers(1, 3), head_dim=st.integers(1, 24),
       dtype=dtypes, layout=st.sampled_from(("contiguous", "row_slice", "strided_last")))  # fmt: skip
def test_qkv_attention(B, N, heads, head_dim, dtype, layout):
    qkv = random((B, N, 3 * heads * head_dim), dtype, layout)
    check_against_torch(lambda qkv: ops.qkv_attention(qkv, heads), (qkv,), dtype)


@FUZZ
@given(data=st.data(), B=st.integers(1, 2), C=st.integers(1, 3), P=st.integers(1, 5), GH=st.integers(1, 3),
       GW=st.integers(1, 3), D=st.integers(1, 20), dtype=dtypes,
       layout=st.sampled_from(("contiguous", "channels_last", "row_slice")))  # fmt: skip
def test_patch_embed(data, B, C, P, GH, GW, D, dtype, layout):
    images = random((B, C, GH * P, GW * P), dtype, "row_slice" if layout == "row_slice" else "contiguous")
    if layout == "channels_last":
        images = images.detach().to(memory_format=torch.channels_last).requires_grad_()
    weight = random((D, C, P, P), dtype, scale=(C * P * P) ** -0.5)
    bias = optional(data.draw, (D,), dtype)
    cls_token = optional(data.draw, (1, 1, D), dtype)
    reg_tokens = random((1, data.draw(st.integers(1, 2)), D), dtype) if data.draw(st.booleans()) else None
    no_embed_class = data.draw(st.booleans())
    prefix = (cls_token is not None) + (0 if reg_tokens is None else reg_tokens.shape[1])
    pos_embed = optional(data.draw, (1, GH * GW + (0 if no_embed_class else prefix), D), dtype)
    check_against_torch(
        lambda *t: ops.patch_embed(*t, no_embed_class=no_embed_class),
        (images, weight, bias, pos_embed, cls_token, reg_tokens), dtype,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_arranged_keeps_values_and_changes_strides(layout):
    """The fuzzers' layouts are what they claim: equal values, the intended strides."""
    values = torch.randn(3, 4, 5)
    t = arranged(values, layout)
    assert torch.equal(t, values)
    assert t.is_contiguous() == (layout == "contiguous")


def test_assert_accurate_can_fail():
    """The fallback rule passes a result as accurate as eager's and still fails a wrong one."""
    expected = torch.randn(64)
    eager = expected.half()  # eager's own error: fp16 rounding
    assert_accurate(eager, expected, lambda: eager, torch.float16, atol=0.0, rtol=0.0, name="as eager")
    wrong = eager.clone()
    wrong[3] += 0.1
    with pytest.raises(AssertionError, match="DESIGN's rule"):
        assert_accurate(wrong, expected, lambda: eager, torch.float16, atol=2e-3, rtol=2e-3, name="wrong")
    with pytest.raises(AssertionError, match="elements off"):  # fp32 has no fallback
        assert_accurate(expected + 1e-3, expected, lambda: expected, torch.float32, atol=1e-4, rtol=1e-4, name="fp32")
