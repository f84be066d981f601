"""fastvit.ops.attention / qkv_attention against an fp64 reference, through the Triton interpreter on CPU.

The interpreter config (kernels/attention.py) uses 64-row query tiles and 32-row key tiles forward (32 x 64
in the dK/dV kernel), so the sequence lengths below reach: a lone tail tile (N = 1, 10, 17, 50), full
tiles plus a 16-row tail in every direction (N = 197, 257), tiles that divide N (64); and a
non-power-of-two head dim reaches the masked head-dim columns (80, 96). Errors follow flash-attention's rule: ours vs fp64 <= 2 x eager's own
error in the same dtype, plus the dtype's atol from conftest.
"""
import importlib

import pytest
import torch
from conftest import DEVICE, TOLERANCES, assert_close, assert_error_within

from fastvit.backend import use_backend
from fastvit.ops.attention import attention, qkv_attention

# the module itself: fastvit.ops re-exports the function `attention`, which shadows the submodule attribute
attention_ops = importlib.import_module("fastvit.ops.attention")
attention_kernels = importlib.import_module("fastvit.kernels.attention")


def math_attention(q, k, v, scale, keep=None, dropout_p=0.0):
    """The eager formula: softmax(scale * q k^T) (times the scaled keep-mask) v, in the inputs' dtype."""
    weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    if keep is not None:
        weights = weights * keep.to(weights.dtype) / (1 - dropout_p)
    return weights @ v


def make_inputs(layout, B, H, N, d, dtype, n_kv=None):
    """Leaf tensors for one layout, and how to view them as q, k, v (B, H, N, d).

    contiguous: three (B, H, N, d) tensors; packed: timm's (B, N, 3 * H * d) qkv; transposed: q from a
    (B, N, H, d) buffer, k and v as head-dim slices of wider rows (row stride 2d, not d).
    """
    n_kv = N if n_kv is None else n_kv
    if layout == "contiguous":
        leaves = [torch.randn(B, H, n, d, device=DEVICE, dtype=dtype) for n in (N, n_kv, n_kv)]
        return leaves, lambda leaves: tuple(leaves)
    if layout == "packed":
        leaves = [torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=dtype)]
        return leaves, lambda leaves: leaves[0].view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert layout == "transposed"
    leaves = [
        torch.randn(B, N, H, d, device=DEVICE, dtype=dtype),
        torch.randn(B, H, n_kv, 2 * d, device=DEVICE, dtype=dtype),
        torch.randn(B, H, n_kv, 2 * d, device=DEVICE, dtype=dtype),
    ]
    return leaves, lambda leaves: (leaves[0].transpose(1, 2), leaves[1][..., :d], leaves[2][..., d:])


def run_ours(layout, leaves, views, H):
    """Our op on the leaves, as a (B, H, N, d) result (the packed op's (B, N, D) output viewed per head)."""
    if layout == "packed":
        B, N, C = leaves[0].shape
        return qkv_attention(leaves[0], H).view(B, N, H, C // (3 * H)).transpose(1, 2)
    return attention(*views(leaves))


def forward_backward(fn, leaves, dout):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(leaves)
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


CASES = [  # (layout, B, H, N, d, dtype)
    ("contiguous", 1, 2, 1, 64, torch.float32),
    ("packed", 2, 2, 10, 32, torch.float16),
    ("transposed", 3, 1, 17, 80, torch.bfloat16),
    ("packed", 2, 1, 50, 64, torch.bfloat16),
    ("contiguous", 1, 1, 197, 64, torch.float16),
    ("packed", 1, 1, 197, 80, torch.float32),
    ("transposed", 1, 1, 257, 32, torch.float32),
    ("contiguous", 2, 1, 33, 96, torch.float16),
    ("packed", 1, 2, 64, 32, torch.bfloat16),  # tiles divide N: the last tile is a full, masked one
]


@pytest.mark.parametrize("layout, B, H, N, d, dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_fp64_reference(layout, B, H, N, d, dtype):
    leaves, views = make_inputs(layout, B, H, N, d, dtype)
    dout = torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64)
    scale = d**-0.5
    math = lambda leaves: math_attention(*views(leaves), scale)  # noqa: E731
    ours, ours_grads = forward_backward(lambda leaves: run_ours(layout, leaves, views, H), leaves, dout)
    ref, ref_grads = forward_backward(math, [t.double() for t in leaves], dout)
    eager, eager_grads = forward_backward(math, leaves, dout)

    atol = TOLERANCES[dtype][0]
    assert ours.dtype == dtype and ours.shape == (B, H, N, d)
    assert_error_within(ours, eager, ref, atol=atol, name="out")
    for i, (g, e, r) in enumerate(zip(ours_grads, eager_grads, ref_grads)):
        assert_error_within(g, e, r, atol=atol, name=f"grad of input {i}")


def test_cross_attention_lengths():
    """Nq != Nk: a ragged query tail (17) against full key tiles plus a tail (50)."""
    leaves, views = make_inputs("contiguous", 1, 2, 17, 32, torch.float32, n_kv=50)
    dout = torch.randn(1, 2, 17, 32, device=DEVICE)
    ours, ours_grads = forward_backward(lambda t: attention(*t, scale=0.3), leaves, dout)
    ref, ref_grads = forward_backward(lambda t: math_attention(*t, 0.3), [t.double() for t in leaves], dout)
    assert_close(ours, ref, name="out")
    for g, r, name in zip(ours_grads, ref_grads, "qkv"):
        assert_close(g, r, name=f"d{name}")


def test_large_fp16_logits_stay_finite():
    """Logits of ~1e4 after scaling overflow fp16 exp; the fp32 online softmax must not."""
    B, H, N, d = 1, 2, 50, 64
    q = (torch.randn(B, H, N, d, device=DEVICE) * 40).half()
    k = (q.float() + torch.randn_like(q.float())).half()
    v = torch.randn(B, H, N, d, device=DEVICE).half()
    logits = (q.double() @ k.double().transpose(-2, -1)) * d**-0.5
    assert logits.abs().max() > 5e3
    dout = torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64)
    ours, grads = forward_backward(lambda t: attention(*t), [q, k, v], dout)
    ref, ref_grads = forward_backward(lambda t: math_attention(*t, d**-0.5), [q.double(), k.double(), v.double()], dout)
    assert torch.isfinite(ours).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(ours, ref, dtype=torch.float16, atol=1e-2, rtol=1e-2, name="out")
    assert_close(grads[2], ref_grads[2], dtype=torch.float16, atol=1e-2, rtol=1e-2, name="dv")


def dropout_mask(B, H, N, dropout_p, seed):
    """The keep-mask (B, H, N, N) that `seed` gives: with scale 0 every weight is 1/N, and with v = I the
    output row i is keep[i] / (N * (1 - p)). The mask depends on the seed and positions only."""
    q, k = (torch.randn(B, H, N, N, device=DEVICE) for _ in range(2))
    v = torch.eye(N, device=DEVICE).expand(B, H, N, N)
    torch.manual_seed(seed)
    return attention(q, k, v, scale=0.0, dropout_p=dropout_p) * (N * (1 - dropout_p))


def test_dropout_statistics_and_backward_mask():
    B, H, N, p, seed = 2, 1, 40, 0.3, 1234
    keep = dropout_mask(B, H, N, p, seed)
    assert_close(keep, keep.round(), dtype=torch.float32, name="keep-mask is 0/1")
    kept = keep.mean().item()  # 3200 Bernoulli(0.7) draws: std 0.008
    assert abs(kept - (1 - p)) < 0.035, f"kept fraction {kept:.3f}, expected {1 - p}"
    assert not torch.equal(keep[0], keep[1]), "batches must draw different masks"
    assert not torch.equal(keep, dropout_mask(B, H, N, p, seed + 1)), "another seed must draw another mask"

    # the same seed regenerates the same mask in the forward and the backward of a real input
    leaves, _ = make_inputs("contiguous", B, H, N, 40, torch.float32)
    dout = torch.randn(B, H, N, 40, device=DEVICE)

    def ours(t):
        torch.manual_seed(seed)
        return attention(*t, dropout_p=p)

    out, grads = forward_backward(ours, leaves, dout)
    ref, ref_grads = forward_backward(
        lambda t: math_attention(*t, 40**-0.5, keep.double(), p), [t.double() for t in leaves], dout
    )
    assert_close(out, ref, name="out with dropout")
    for g, r, name in zip(grads, ref_grads, "qkv"):
        assert_close(g, r, name=f"d{name} with dropout")


def test_dropout_preserves_the_mean():
    """E[dropout(P) v] = P v: averaged over many seeds the output approaches the no-dropout output."""
    q, k, v = (torch.randn(1, 1, 10, 16, device=DEVICE) for _ in range(3))
    expected = attention(q, k, v)
    mean = torch.stack([attention(q, k, v, dropout_p=0.5) for _ in range(40)]).mean(0)
    assert (mean - expected).abs().mean() < 0.15 * expected.abs().mean() + 0.05


def test_torch_backend_dropout_rate():
    with use_backend("torch"):
        keep = dropout_mask(2, 1, 40, 0.3, 7)
    assert abs(keep.mean().item() - 0.7) < 0.035


def test_backward_is_bitwise_deterministic():
    leaves, views = make_inputs("packed", 2, 2, 50, 32, torch.float16)
    dout = torch.randn(2, 2, 50, 32, device=DEVICE)
    run = lambda t: run_ours("packed", t, views, 2)  # noqa: E731
    first = forward_backward(run, leaves, dout)
    second = forward_backward(run, leaves, dout)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0])


@pytest.mark.parametrize("layout, N, d", [("packed", 50, 32), ("transposed", 17, 80)])
def test_ampere_reload_path_is_bitwise_equal(monkeypatch, layout, N, d):
    """Ampere's backward loads its resident operands again at every step (RELOAD): the same arithmetic in
    the same order, so the gradients equal the resident path's bit for bit (ragged tails, masked head dims)."""
    leaves, views = make_inputs(layout, 2, 2, N, d, torch.float16)
    dout = torch.randn(2, 2, N, d, device=DEVICE)
    run = lambda t: run_ours(layout, t, views, 2)  # noqa: E731
    resident = forward_backward(run, leaves, dout)
    monkeypatch.setattr(attention_kernels, "_arch", lambda device: 80)
    reloaded = forward_backward(run, leaves, dout)
    assert torch.equal(resident[0], reloaded[0])
    for grad, grad_reloaded in zip(resident[1], reloaded[1]):
        assert torch.equal(grad, grad_reloaded)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the views live in a memory-mapped file, in host memory")
def test_int64_row_offsets(tmp_path):
    """Row offsets past 2^31 elements without allocating them: q, k, v, dO and every output are (1, 1, 3, d)
    views with a row stride of 2^30 elements into a sparse memory-mapped file, of which only the few pages
    the rows touch ever take memory. The views start 2^31 elements into the file, so an int32 row offset
    (row 2: 2^31 wraps to -2^31) would read the zeros at the file's start instead of faulting; the results
    must equal a run on contiguous copies, forward and backward."""
    N, d, row_stride, start = 3, 16, 2**30, 2**31
    slots = ("q", "k", "v", "do", "out", "dq", "dk", "dv")  # d columns each, side by side in every row
    numel = start + (N - 1) * row_stride + len(slots) * d
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(numel * 4)  # a hole: no disk blocks, no memory
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    views = {name: torch.as_strided(storage, (1, 1, N, d), (row_stride, row_stride, row_stride, 1), start + i * d)
             for i, name in enumerate(slots)}  # fmt: skip
    for name in ("q", "k", "v", "do"):
        views[name].copy_(torch.randn(1, 1, N, d))
    q, k, v, do = (views[name] for name in ("q", "k", "v", "do"))
    scale = d**-0.5

    out, lse = attention_kernels.attention_forward(q, k, v, scale, out=views["out"])
    grads = attention_kernels.attention_backward(do, q, k, v, out, lse, scale, dq=views["dq"], dk=views["dk"], dv=views["dv"])
    small = [t.clone() for t in (q, k, v, do)]
    out_ref, lse_ref = attention_kernels.attention_forward(*small[:3], scale)
    grads_ref = attention_kernels.attention_backward(small[3], *small[:3], out_ref, lse_ref, scale)
    assert_close(out, out_ref, name="out")
    assert_close(lse, lse_ref, name="lse")
    for name, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(grad, grad_ref, name=name)


def test_torch_backend_parity():
    leaves, views = make_inputs("packed", 2, 2, 17, 32, torch.float32)
    dout = torch.randn(2, 2, 17, 32, device=DEVICE)
    run = lambda t: run_ours("packed", t, views, 2)  # noqa: E731
    ours, (grad,) = forward_backward(run, leaves, dout)
    with use_backend("torch"):
        theirs, (their_grad,) = forward_backward(run, leaves, dout)
    assert_close(ours, theirs, name="out")
    assert_close(grad, their_grad, name="d(qkv)")


@pytest.mark.parametrize("packed", [False, True])
def test_autocast_casts_inputs_like_sdpa(packed):
    B, H, N, d = 1, 2, 17, 32
    leaves, views = make_inputs("packed" if packed else "contiguous", B, H, N, d, torch.float32)
    dout = torch.randn(B, H, N, d, device=DEVICE)

    def run(t):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return run_ours("packed" if packed else "contiguous", t, views, H)

    out, grads = forward_backward(run, leaves, dout)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    ref, ref_grads = forward_backward(lambda t: math_attention(*views(t), d**-0.5), [t.double() for t in leaves], dout)
    eager, eager_grads = forward_backward(
        lambda t: math_attention(*(x.bfloat16() for x in views(t)), d**-0.5), leaves, dout
    )
    assert_error_within(out, eager, ref, atol=TOLERANCES[torch.bfloat16][0], name="out")
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert_error_within(g, e, r, atol=TOLERANCES[torch.bfloat16][0], name="grad")


def test_torch_compile_fullgraph():
    B, H, N, d = 1, 2, 10, 32
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    dout = torch.randn(B, H, N, d, device=DEVICE)

    def block(t):
        q, k, v = t[0].view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        packed = qkv_attention(t[0], H).view(B, N, H, d).transpose(1, 2)
        return packed + attention(q, k, v, scale=0.5)

    compiled, (grad,) = forward_backward(torch.compile(block, fullgraph=True), [qkv], dout)
    eager, (eager_grad,) = forward_backward(block, [qkv], dout)
    assert_close(compiled, eager, name="out")
    assert_close(grad, eager_grad, name="d(qkv)")


def _q(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = [  # (description, call, exception, words the message must contain)
    ("rank 3 q", lambda: attention(_q(2, 10, 32), _q(2, 1, 10, 32), _q(2, 1, 10, 32)), ValueError, ["q", "4-D"]),
    ("rank 5 v", lambda: attention(_q(2, 1, 10, 32), _q(2, 1, 10, 32), _q(1, 2, 1, 10, 32)), ValueError, ["v", "4-D"]),
    ("batch differs", lambda: attention(_q(2, 1, 10, 32), _q(3, 1, 10, 32), _q(3, 1, 10, 32)), ValueError, ["k", "(3, 1, 10, 32)"]),
    ("heads differ", lambda: attention(_q(2, 2, 10, 32), _q(2, 1, 10, 32), _q(2, 1, 10, 32)), ValueError, ["k", "(2, 1, 10, 32)"]),
    ("head dims differ", lambda: attention(_q(2, 1, 10, 32), _q(2, 1, 10, 64), _q(2, 1, 10, 64)), ValueError, ["k"]),
    ("k, v lengths differ", lambda: attention(_q(2, 1, 10, 32), _q(2, 1, 10, 32), _q(2, 1, 11, 32)), ValueError, ["v", "(2, 1, 11, 32)"]),
    ("head dim 300", lambda: attention(_q(1, 1, 4, 300), _q(1, 1, 4, 300), _q(1, 1, 4, 300)), ValueError, ["head dim", "300"]),
    ("no keys", lambda: attention(_q(1, 1, 4, 32), _q(1, 1, 0, 32), _q(1, 1, 0, 32)), ValueError, ["k", "Nk"]),
    ("mixed dtypes", lambda: attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32, dtype=torch.float16), _q(1, 1, 4, 32)), TypeError, ["k", "float16"]),
    ("integer q", lambda: attention(torch.ones(1, 1, 4, 32, dtype=torch.int32), _q(1, 1, 4, 32), _q(1, 1, 4, 32)), TypeError, ["q", "int32"]),
    ("mixed devices", lambda: attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32, device="meta"), _q(1, 1, 4, 32)), ValueError, ["k", "meta"]),
    ("not a tensor", lambda: attention([[1.0]], _q(1, 1, 4, 32), _q(1, 1, 4, 32)), TypeError, ["q", "list"]),
    ("dropout_p 1", lambda: attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), dropout_p=1.0), ValueError, ["dropout_p"]),
    ("scale nan", lambda: attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), scale=float("nan")), ValueError, ["scale"]),
    ("qkv rank 4", lambda: qkv_attention(_q(1, 4, 3, 96), 3), ValueError, ["qkv", "3-D"]),
    ("qkv width not 3*H*d", lambda: qkv_attention(_q(2, 4, 100), 2), ValueError, ["qkv", "(2, 4, 100)", "num_heads=2"]),
    ("qkv head dim too big", lambda: qkv_attention(_q(1, 4, 3 * 2 * 300), 2), ValueError, ["head dim", "300"]),
    ("num_heads 0", lambda: qkv_attention(_q(2, 4, 96), 0), ValueError, ["num_heads"]),
    ("num_heads float", lambda: qkv_attention(_q(2, 4, 96), 2.0), ValueError, ["num_heads"]),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_before_launch(monkeypatch, call, error, words):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel launched before validation rejected the input")

    monkeypatch.setattr(attention_ops, "attention_forward", no_launch)
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_custom_ops_pass_opcheck():
    """Fake kernels, schemas and autograd registrations agree with the real ops (with dropout on)."""
    B, N, H, d, seed = 1, 10, 2, 16, torch.tensor([5], device=DEVICE)
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE, requires_grad=True)
    q, k, v = (torch.randn(B, H, N, d, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attention_ops._qkv_attention_fwd, (qkv, seed, H, 0.25, 0.2))
    torch.library.opcheck(attention_ops._attention_fwd, (q, k, v, seed, 0.25, 0.2))
    out, lse = attention_ops._qkv_attention_fwd(qkv.detach(), seed, H, 0.25, 0.2)
    torch.library.opcheck(
        attention_ops._qkv_attention_bwd, (torch.randn_like(out), qkv.detach(), out, lse, seed, H, 0.25, 0.2)
    )
    o, lse = attention_ops._attention_fwd(q.detach(), k.detach(), v.detach(), seed, 0.25, 0.2)
    torch.library.opcheck(
        attention_ops._attention_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, seed, 0.25, 0.2)
    )
