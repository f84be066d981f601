"""LayerNorm kernel (kernels/layer_norm.py) through fastvit.ops.layer_norm: forward and every gradient
against an fp64 reference, across DESIGN.md §7's matrix."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, assert_close, assert_error_within, tolerance
from fastvit import ops
from fastvit.backend import use_backend
from fastvit.kernels.layer_norm import MAX_D, layer_norm_backward, layer_norm_forward


def make_inputs(shape, dtype, mean=0.0, std=1.0):
    D = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(DEVICE, dtype).requires_grad_()
    w = (torch.rand(D, dtype=torch.float64) + 0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(D, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    return x, w, b


def reference(x, w, b, eps, dy):
    """fp64 forward and gradients."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    y.backward(dy.double())
    return y, x64.grad, w64.grad, b64.grad


def check_against_reference(x, w, b, eps=1e-6, grad_scale=1.0):
    y = ops.layer_norm(x, w, b, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, eps, dy)
    dtype = x.dtype
    rows = x.numel() // x.shape[-1]
    assert y.dtype == dtype
    assert_close(y, y_ref, name="y")
    atol, rtol = tolerance(dtype, grad_scale)
    assert_close(x.grad, dx_ref, atol=atol, rtol=rtol, name="dx")
    # dweight / dbias reduce over every row: the absolute error grows with the row count
    atol_param, rtol_param = tolerance(dtype, rows**0.5)
    assert_close(w.grad, dw_ref, atol=atol_param, rtol=rtol_param, name="dweight")
    assert_close(b.grad, db_ref, atol=atol_param, rtol=rtol_param, name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 197, 192), (3, 17, 384), (5, 1023), (7, 1408), (2, 3, 1)])
def test_matches_fp64_reference(shape, dtype):
    check_against_reference(*make_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_mean_inputs(dtype):
    """mean ~ 1000 x std, where a one-pass E[x^2] - E[x]^2 variance cancels catastrophically.

    x itself carries rounding of ~1000 * eps(dtype), which LayerNorm amplifies by 1/std, so no fixed
    tolerance fits every dtype: demand at most 2x eager PyTorch's own error in the same dtype."""
    x, w, b = make_inputs((3, 50, 192), dtype, mean=1000.0, std=1.0)
    y = ops.layer_norm(x, w, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_eager = x.detach().requires_grad_()
    y_eager = F.layer_norm(x_eager, (192,), w.detach(), b.detach(), 1e-6)
    (dx_eager,) = torch.autograd.grad(y_eager, x_eager, dy)
    y_ref, dx_ref, _, _ = reference(x, w, b, 1e-6, dy)
    assert_error_within(y, y_eager, y_ref, atol=tolerance(dtype)[0], name="y")
    assert_error_within(dx, dx_eager, dx_ref, atol=tolerance(dtype)[0], name="dx")


def test_ragged_last_program_and_multi_chunk_backward():
    """Row counts that leave a partial BLOCK_M tile and several backward chunks, each with a partial tile."""
    for rows in (1, 3, 17, 61):
        check_against_reference(*make_inputs((rows, 96), torch.float32))


def test_strided_rows_without_copy():
    """Rows with a stride (a slice of a wider tensor) are read in place."""
    base = torch.randn(40, 300, device=DEVICE)
    x = base[:, 10:202].requires_grad_()  # row stride 300, last-dim stride 1
    w = torch.rand(192, device=DEVICE).requires_grad_()
    b = torch.randn(192, device=DEVICE).requires_grad_()
    assert x.stride() == (300, 1)
    check_against_reference(x, w, b)


def test_transposed_input():
    x = torch.randn(64, 20, device=DEVICE).t().requires_grad_()  # last-dim stride 20
    w = torch.rand(64, device=DEVICE).requires_grad_()
    b = torch.randn(64, device=DEVICE).requires_grad_()
    check_against_reference(x, w, b)


def test_without_affine_parameters():
    x = torch.randn(4, 33, 80, device=DEVICE, requires_grad=True)
    y = ops.layer_norm(x, None, None, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y_ref = F.layer_norm(x64, (80,), eps=1e-5)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, name="y")
    assert_close(x.grad, x64.grad, name="dx")


def test_only_requested_gradients():
    x, w, b = make_inputs((4, 64), torch.float32)
    w.requires_grad_(False)
    ops.layer_norm(x, w, b).sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None


def test_backward_is_deterministic():
    x, w, b = make_inputs((300, 256), torch.float32)
    y, mean, rstd = layer_norm_forward(x.detach(), w.detach(), b.detach(), 1e-6)
    dy = torch.randn_like(y)
    first = layer_norm_backward(dy, x.detach(), w.detach(), mean, rstd)
    second = layer_norm_backward(dy, x.detach(), w.detach(), mean, rstd)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_max_width():
    check_against_reference(*make_inputs((2, MAX_D), torch.float32), grad_scale=4.0)


def test_empty_batch():
    x, w, b = make_inputs((0, 5, 64), torch.float32)
    y = ops.layer_norm(x, w, b)
    y.sum().backward()
    assert y.shape == (0, 5, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_torch_backend_matches():
    x, w, b = make_inputs((3, 10, 192), torch.float32)
    with use_backend("torch"):
        y_torch = ops.layer_norm(x, w, b)
    assert_close(ops.layer_norm(x, w, b), y_torch)


def test_autocast_output_is_fp32_like_torch():
    x, w, b = make_inputs((2, 9, 64), torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = ops.layer_norm(x, w, b)
        y_ref = F.layer_norm(x, (64,), w, b, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref)


def test_torch_compile_fullgraph():
    x, w, b = make_inputs((2, 9, 64), torch.float32)
    compiled = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b) * 2, fullgraph=True)
    y = compiled(x, w, b)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    assert_close(y, 2 * F.layer_norm(x64, (64,), w.double(), b.double(), 1e-6))
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 8), torch.randn(7), torch.randn(8)), ValueError, r"weight: expected shape \(8,\)"),
        ((torch.randn(2, 8), torch.randn(8), torch.randn(2, 8)), ValueError, "bias: expected a 1-D tensor"),
        ((torch.randint(0, 5, (2, 8)), None, None), TypeError, "x: expected dtype"),
        ((torch.randn(2, 8), torch.randn(8, dtype=torch.float16), None), TypeError, "weight is torch.float16"),
        (("not a tensor", None, None), TypeError, "x: expected a torch.Tensor"),
        ((torch.randn(2, MAX_D + 1), None, None), ValueError, "last\\) dim must be in 1..8192"),
        ((torch.randn(2, 8), torch.randn(8, device="meta"), None), ValueError, "weight on meta"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.layer_norm(*args, 1e-6)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
        ops.layer_norm(torch.randn(2, 8), None, None, -1.0)
