"""Flash-style multi-head self-attention, forward and backward, for ViT's short ragged sequences.

    S = scale * Q K^T,   P = softmax(S) (rows),   O = (P * Z) V          per (batch, head), non-causal

with Z the dropout keep-mask scaled by 1 / (1 - p) (Z = 1 without dropout). The (N, N) matrices S and P
never reach memory.

Forward (one program per query tile): stream K, V tiles through an online softmax in fp32 (running row
max m and row sum l, rescaling the accumulator when m grows). The scale is folded into one multiply by
scale * log2(e) so every exponential is a native exp2. The program stores O and the natural-log
log-sum-exp LSE = ln(sum_j exp(S_ij)) per row in fp32, which is all the backward needs to rebuild P.

Backward (the VJP, with dO the upstream gradient):

    Delta_i = sum_j P_ij * dP_ij = rowsum(dO * O)_i          dP = (dO V^T) * Z
    dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = (P * Z)^T dO

Two launches, deterministic (no atomics: reruns are bitwise equal):
1. dQ kernel, one program per query tile: computes Delta for its rows from dO and O first (the delta
   "preprocess", fused here instead of a third launch), stores it, then streams K, V tiles for dQ.
2. dK/dV kernel, one program per key tile: streams Q, dO, LSE and Delta tiles and accumulates dK, dV
   in fp32 registers. P is recomputed from the saved LSE in both kernels.

Tiling and the ragged tail (why N = 197 does not pay for 256): every sequence dimension is cut into
full BLOCK tiles that run without masks, plus one last tile of TAIL = max(16, next_pow2(rows left))
rows (a separate constexpr instantiation, masked; TAIL = BLOCK when BLOCK divides N). The program that
owns the last tile runs the TAIL-row variant of the kernel body, and every streamed loop starts with a
TAIL-wide masked step (before the full tiles: see "Why the tail step comes first"). At N = 197 with
64-row tiles both directions cover 3 x 64 + 16 = 208 rows:
1.11x the useful tensor-core work instead of (256 / 197)^2 = 1.69x. Tails smaller than 64 rows use mma.sync instead of Hopper's wgmma (which needs
64-row tiles), which is the right trade for 16 rows. 16 is the smallest tile tl.dot accepts.

Why the tail step comes first: the full-tile loop may run zero times (N <= BLOCK), and with the tail step
after it the accumulator's zero-trip value (tl.zeros) is materialised on the loop's bypass edge, right
before the exit block's wgmma wait. ptxas then reports C7515 ("wgmma.mma_async instructions are serialized
due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the
pipeline stage") and waits for every wgmma group as soon as it is issued (triton 3.6 and 3.8 alike). With
the tail step first, the loop's incoming accumulator is that step's wgmma result, nothing else writes it,
and the accumulating dot (P V, dS K, dS^T Q, (P Z)^T dO) stays in flight across the loop's back edge, over
the next tile's loads, until the next Q K^T result is needed. Triton itself waits (wait 0) right after any
dot whose result the same iteration reads (Q K^T, dO V^T), so no wait in these loops leaves groups pending.

Head dims: any d in 1..MAX_HEAD_DIM; the tile width is BLOCK_D = max(16, next_pow2(d)) and the padding
columns are masked (loaded as 0, never stored), so 80 / 88 / 96 run in 128-wide tiles.

Dropout: a counter-based Philox stream keyed by (seed + batch * H + head) and counted by
query_row * Nk + key_col, so the backward regenerates exactly the forward's mask from the same seed.
With p = 0 the DROPOUT constexpr compiles the random numbers out entirely.

Layouts: q, k, v, dO, O and every output take arbitrary (batch, head, row) strides with a unit last-dim
stride, so the packed qkv views of timm (B, N, 3, H, d) and a (B, N, H * d) output need no copies.
Every pointer offset is int64: batch, head and row indices are cast before they multiply their strides, so
row * row_stride may pass 2^31 elements (e.g. a (N, B, H, d) layout seen as (B, H, N, d)). The dropout
counter query_row * Nk + key_col stays int32: sequences up to 46340 tokens get distinct counters.

Caution: @triton.autotune runs only on CUDA (the interpreter has no driver); under the interpreter the
launchers pick one fixed config, and where no timing is allowed (a CUDA-graph capture, FASTVIT_AUTOTUNE=0)
the pick made earlier for the same launch, else the first candidate of the table. Each arch has its own
table (_ARCH_TABLES, chosen from the device's compute capability at launch): the defaults compile with
no spills at d = 64, 80 and 128 for the arch that runs them, with HGMMA on sm_90. Ampere's backward reloads its resident operands every step
(RELOAD): holding them in registers for mma.sync spills at BLOCK_D = 128. fp32 dots use
kernels/_helpers.dot_precision (IEEE unless torch allows TF32).
"""
import math

import torch
import triton
import triton.language as tl

from ._helpers import (device_context, dot_precision, is_interpreter, launch_autotuned, new_output, on_gpu,
                       picks_record)

MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A [len(rows), len(cols)] tile; masked lanes read 0 (padding rows and head-dim columns)."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Store a [len(rows), len(cols)] tile, skipping padding rows and head-dim columns."""
    value = value.to(ptrs.dtype.element_ty)
    if MASK_ROWS and MASK_COLS:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    elif MASK_ROWS:
        tl.store(ptrs, value, mask=rows[:, None] < n_rows)
    elif MASK_COLS:
        tl.store(ptrs, value, mask=cols[None, :] < n_cols)
    else:
        tl.store(ptrs, value)


@triton.jit
def _resident(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, RELOAD: tl.constexpr):
    """A backward program's resident operand (dQ: its q, dO rows; dK/dV: its k, v rows): the tile itself,
    or with RELOAD its pointers, for _operand to load again at every step."""
    if RELOAD:
        resident = ptrs
    else:
        resident = _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS, MASK_COLS)
    return resident


@triton.jit
def _operand(resident, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, RELOAD: tl.constexpr):
    """The tile of a _resident operand, for one step."""
    if RELOAD:
        tile = _load_tile(resident, rows, n_rows, cols, n_cols, MASK_ROWS, MASK_COLS)
    else:
        tile = resident
    return tile


@triton.jit
def _dropout_keep(seed_bh, q_rows, kv_cols, N_KV, dropout_p):
    """[len(q_rows), len(kv_cols)] keep-mask of attention dropout; identical in forward and backward."""
    offsets = q_rows[:, None] * N_KV + kv_cols[None, :]
    return tl.rand(seed_bh, offsets) >= dropout_p


# ---------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kv_step(
    acc, l_i, m_i, q, q_rows, K, V, kv_start, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh, dropout_p,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys kv_start .. kv_start + BLOCK_N (log2 domain)."""
    kv_rows = kv_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kv_rows.to(tl.int64)[:, None] * stride_kn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)
    v = _load_tile(V + kv_rows.to(tl.int64)[:, None] * stride_vn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASK_N:
        s = tl.where(kv_rows[None, :] < N_KV, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds at least one real key
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DROPOUT:  # the 1 / (1 - p) rescale is applied once to the final output
        p = tl.where(_dropout_keep(seed_bh, q_rows, kv_rows, N_KV, dropout_p), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_rows(
    Out, LSE, Q, K, V, q_start, stride_on, stride_qn, stride_kn, stride_vn, N_Q, N_KV, scale, seed_bh, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Output rows q_start .. q_start + BLOCK_M of one (batch, head): all key tiles, then the epilogue."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_rows = q_start + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_rows.to(tl.int64)[:, None] * stride_qn + cols_d[None, :], q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    qk_scale = scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV - 1) // BLOCK_N * BLOCK_N  # the last tile, full or not: the masked tail step, run first
    acc, l_i, m_i = _fwd_kv_step(
        acc, l_i, m_i, q, q_rows, K, V, n_full, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh,
        dropout_p, HEAD_DIM, EVEN_D, TAIL_N, True, DROPOUT, DOT_PRECISION,
    )  # fmt: skip
    for kv_start in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_kv_step(
            acc, l_i, m_i, q, q_rows, K, V, kv_start, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh,
            dropout_p, HEAD_DIM, EVEN_D, BLOCK_N, False, DROPOUT, DOT_PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    _store_tile(Out + q_rows.to(tl.int64)[:, None] * stride_on + cols_d[None, :], out, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to the natural log: ln(2)
    if MASK_M:
        tl.store(LSE + q_rows, lse, mask=q_rows < N_Q)
    else:
        tl.store(LSE + q_rows, lse)


@triton.jit
def _attn_fwd_kernel(
    Out,  # (B, H, N_Q, HEAD_DIM) output, strides (stride_ob, stride_oh, stride_on, 1)
    LSE,  # (B, H, N_Q) fp32 output, contiguous: natural-log log-sum-exp of each row of scale * Q K^T
    Q,  # (B, H, N_Q, HEAD_DIM), strides (stride_qb, stride_qh, stride_qn, 1)
    K,  # (B, H, N_KV, HEAD_DIM), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, H, N_KV, HEAD_DIM), strides (stride_vb, stride_vh, stride_vn, 1)
    Seed,  # (1,) int64 dropout seed, or None when not DROPOUT
    stride_ob, stride_oh, stride_on,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N_Q, N_KV,
    scale,  # softmax scale applied to Q K^T
    dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    n_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_tiles  # query tiles of one head are neighbours, so its K / V stay in L2
    tile = pid % n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Out += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * N_Q
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    seed_bh = 0
    if DROPOUT:
        seed_bh = tl.load(Seed) + bh  # one Philox key per (batch, head)

    q_start = tile * BLOCK_M
    if tile < n_tiles - 1:
        _fwd_rows(
            Out, LSE, Q, K, V, q_start, stride_on, stride_qn, stride_kn, stride_vn, N_Q, N_KV, scale, seed_bh,
            dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, False, BLOCK_N, TAIL_N, DROPOUT, DOT_PRECISION,
        )  # fmt: skip
    else:  # the ragged last query tile, TAIL_M rows
        _fwd_rows(
            Out, LSE, Q, K, V, q_start, stride_on, stride_qn, stride_kn, stride_vn, N_Q, N_KV, scale, seed_bh,
            dropout_p, HEAD_DIM, BLOCK_D, TAIL_M, True, BLOCK_N, TAIL_N, DROPOUT, DOT_PRECISION,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# backward: dQ (with the Delta prologue), then dK / dV
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_kv_step(
    dq, q, do, lse2, delta, q_rows, N_Q, K, V, kv_start, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh,
    dropout_p, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, RELOAD: tl.constexpr,
):  # fmt: skip
    """dQ += dS K over keys kv_start .. kv_start + BLOCK_N (without the final scale); q, do are _resident."""
    q = _operand(q, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D, RELOAD)
    do = _operand(do, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D, RELOAD)
    kv_rows = kv_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kv_rows.to(tl.int64)[:, None] * stride_kn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)
    v = _load_tile(V + kv_rows.to(tl.int64)[:, None] * stride_vn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:
        p = tl.where(kv_rows[None, :] < N_KV, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed_bh, q_rows, kv_rows, N_KV, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_rows(
    DQ, Delta, Q, K, V, O, DO, LSE, q_start,
    stride_dqn, stride_qn, stride_kn, stride_vn, stride_on, stride_don,
    N_Q, N_KV, scale, seed_bh, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RELOAD: tl.constexpr,
):  # fmt: skip
    """Delta and dQ for query rows q_start .. q_start + BLOCK_M of one (batch, head)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_rows = q_start + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + q_rows.to(tl.int64)[:, None] * stride_qn + cols_d[None, :]
    do_ptrs = DO + q_rows.to(tl.int64)[:, None] * stride_don + cols_d[None, :]
    do = _load_tile(do_ptrs, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    o = _load_tile(O + q_rows.to(tl.int64)[:, None] * stride_on + cols_d[None, :], q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    q = _resident(q_ptrs, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D, RELOAD)
    if RELOAD:  # the dO tile loaded for Delta stays resident, unless the steps reload it too
        do = do_ptrs
    if MASK_M:
        tl.store(Delta + q_rows, delta, mask=q_rows < N_Q)
        lse = tl.load(LSE + q_rows, mask=q_rows < N_Q, other=0.0)
    else:
        tl.store(Delta + q_rows, delta)
        lse = tl.load(LSE + q_rows)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    lse2 = lse * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV - 1) // BLOCK_N * BLOCK_N  # the last tile, full or not: the masked tail step, run first
    dq = _bwd_dq_kv_step(
        dq, q, do, lse2, delta, q_rows, N_Q, K, V, n_full, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh,
        dropout_p, HEAD_DIM, EVEN_D, MASK_M, TAIL_N, True, DROPOUT, DOT_PRECISION, RELOAD,
    )  # fmt: skip
    for kv_start in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_kv_step(
            dq, q, do, lse2, delta, q_rows, N_Q, K, V, kv_start, cols_d, stride_kn, stride_vn, N_KV, qk_scale, seed_bh,
            dropout_p, HEAD_DIM, EVEN_D, MASK_M, BLOCK_N, False, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip
    dq = dq * scale
    _store_tile(DQ + q_rows.to(tl.int64)[:, None] * stride_dqn + cols_d[None, :], dq, q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)


@triton.jit
def _attn_bwd_dq_kernel(
    DQ,  # (B, H, N_Q, HEAD_DIM) output, strides (stride_dqb, stride_dqh, stride_dqn, 1)
    Delta,  # (B, H, N_Q) fp32 output, contiguous: rowsum(dO * O), read by the dK / dV kernel
    Q,  # (B, H, N_Q, HEAD_DIM), strides (stride_qb, stride_qh, stride_qn, 1)
    K,  # (B, H, N_KV, HEAD_DIM), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, H, N_KV, HEAD_DIM), strides (stride_vb, stride_vh, stride_vn, 1)
    O,  # (B, H, N_Q, HEAD_DIM) forward output, strides (stride_ob, stride_oh, stride_on, 1)
    DO,  # (B, H, N_Q, HEAD_DIM) upstream gradient, strides (stride_dob, stride_doh, stride_don, 1)
    LSE,  # (B, H, N_Q) fp32, contiguous, from the forward
    Seed,  # (1,) int64 dropout seed, or None when not DROPOUT
    stride_dqb, stride_dqh, stride_dqn,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q, N_KV,
    scale,
    dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RELOAD: tl.constexpr,  # load the program's resident operands again at every step (sm_80: see _ARCH_TABLES)
):  # fmt: skip
    n_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    tile = pid % n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    DQ += b * stride_dqb + h * stride_dqh
    Delta += bh.to(tl.int64) * N_Q
    LSE += bh.to(tl.int64) * N_Q
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    seed_bh = 0
    if DROPOUT:
        seed_bh = tl.load(Seed) + bh

    q_start = tile * BLOCK_M
    if tile < n_tiles - 1:
        _bwd_dq_rows(
            DQ, Delta, Q, K, V, O, DO, LSE, q_start, stride_dqn, stride_qn, stride_kn, stride_vn, stride_on,
            stride_don, N_Q, N_KV, scale, seed_bh, dropout_p,
            HEAD_DIM, BLOCK_D, BLOCK_M, False, BLOCK_N, TAIL_N, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip
    else:
        _bwd_dq_rows(
            DQ, Delta, Q, K, V, O, DO, LSE, q_start, stride_dqn, stride_qn, stride_kn, stride_vn, stride_on,
            stride_don, N_Q, N_KV, scale, seed_bh, dropout_p,
            HEAD_DIM, BLOCK_D, TAIL_M, True, BLOCK_N, TAIL_N, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip


@triton.jit
def _bwd_dkdv_q_step(
    dk, dv, k, v, kv_rows, Q, DO, LSE, Delta, q_start, cols_d, stride_qn, stride_don, N_Q, N_KV, qk_scale, seed_bh,
    dropout_p, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_M: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, RELOAD: tl.constexpr,
):  # fmt: skip
    """dK += dS^T Q and dV += (P Z)^T dO over query rows q_start .. q_start + BLOCK_M (transposed tiles); k, v
    are _resident."""
    k = _operand(k, kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D, RELOAD)
    v = _operand(v, kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D, RELOAD)
    q_rows = q_start + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + q_rows.to(tl.int64)[:, None] * stride_qn + cols_d[None, :], q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    do = _load_tile(DO + q_rows.to(tl.int64)[:, None] * stride_don + cols_d[None, :], q_rows, N_Q, cols_d, HEAD_DIM, MASK_M, not EVEN_D)
    if MASK_M:  # padding query rows get LSE = +inf, so their P column is exactly 0
        lse2 = tl.load(LSE + q_rows, mask=q_rows < N_Q, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + q_rows, mask=q_rows < N_Q, other=0.0)
    else:
        lse2 = tl.load(LSE + q_rows) * 1.4426950408889634
        delta = tl.load(Delta + q_rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M] = S^T
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep_t = tl.trans(_dropout_keep(seed_bh, q_rows, kv_rows, N_KV, dropout_p))
        pz_t = tl.where(keep_t, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
        dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pz_t = p_t
    dv += tl.dot(pz_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_rows(
    DK, DV, Q, K, V, DO, LSE, Delta, kv_start,
    stride_dkn, stride_dvn, stride_qn, stride_kn, stride_vn, stride_don,
    N_Q, N_KV, scale, seed_bh, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RELOAD: tl.constexpr,
):  # fmt: skip
    """dK and dV for key rows kv_start .. kv_start + BLOCK_N of one (batch, head)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    kv_rows = kv_start + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    k = _resident(K + kv_rows.to(tl.int64)[:, None] * stride_kn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D, RELOAD)
    v = _resident(V + kv_rows.to(tl.int64)[:, None] * stride_vn + cols_d[None, :], kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D, RELOAD)
    qk_scale = scale * 1.4426950408889634  # log2(e)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_full = (N_Q - 1) // BLOCK_M * BLOCK_M  # the last tile, full or not: the masked tail step, run first
    dk, dv = _bwd_dkdv_q_step(
        dk, dv, k, v, kv_rows, Q, DO, LSE, Delta, n_full, cols_d, stride_qn, stride_don, N_Q, N_KV, qk_scale,
        seed_bh, dropout_p, HEAD_DIM, EVEN_D, MASK_N, TAIL_M, True, DROPOUT, DOT_PRECISION, RELOAD,
    )  # fmt: skip
    for q_start in range(0, n_full, BLOCK_M):
        dk, dv = _bwd_dkdv_q_step(
            dk, dv, k, v, kv_rows, Q, DO, LSE, Delta, q_start, cols_d, stride_qn, stride_don, N_Q, N_KV, qk_scale,
            seed_bh, dropout_p, HEAD_DIM, EVEN_D, MASK_N, BLOCK_M, False, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip
    dk = dk * scale
    _store_tile(DK + kv_rows.to(tl.int64)[:, None] * stride_dkn + cols_d[None, :], dk, kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)
    _store_tile(DV + kv_rows.to(tl.int64)[:, None] * stride_dvn + cols_d[None, :], dv, kv_rows, N_KV, cols_d, HEAD_DIM, MASK_N, not EVEN_D)


@triton.jit
def _attn_bwd_dkdv_kernel(
    DK,  # (B, H, N_KV, HEAD_DIM) output, strides (stride_dkb, stride_dkh, stride_dkn, 1)
    DV,  # (B, H, N_KV, HEAD_DIM) output, strides (stride_dvb, stride_dvh, stride_dvn, 1)
    Q,  # (B, H, N_Q, HEAD_DIM), strides (stride_qb, stride_qh, stride_qn, 1)
    K,  # (B, H, N_KV, HEAD_DIM), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, H, N_KV, HEAD_DIM), strides (stride_vb, stride_vh, stride_vn, 1)
    DO,  # (B, H, N_Q, HEAD_DIM) upstream gradient, strides (stride_dob, stride_doh, stride_don, 1)
    LSE,  # (B, H, N_Q) fp32, contiguous, from the forward
    Delta,  # (B, H, N_Q) fp32, contiguous, from the dQ kernel
    Seed,  # (1,) int64 dropout seed, or None when not DROPOUT
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    H, N_Q, N_KV,
    scale,
    dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RELOAD: tl.constexpr,  # load the program's resident operands again at every step (sm_80: see _ARCH_TABLES)
):  # fmt: skip
    n_tiles = tl.cdiv(N_KV, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    tile = pid % n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += bh.to(tl.int64) * N_Q
    Delta += bh.to(tl.int64) * N_Q
    seed_bh = 0
    if DROPOUT:
        seed_bh = tl.load(Seed) + bh

    kv_start = tile * BLOCK_N
    if tile < n_tiles - 1:
        _bwd_dkdv_rows(
            DK, DV, Q, K, V, DO, LSE, Delta, kv_start, stride_dkn, stride_dvn, stride_qn, stride_kn, stride_vn,
            stride_don, N_Q, N_KV, scale, seed_bh, dropout_p,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, BLOCK_M, TAIL_M, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip
    else:
        _bwd_dkdv_rows(
            DK, DV, Q, K, V, DO, LSE, Delta, kv_start, stride_dkn, stride_dvn, stride_qn, stride_kn, stride_vn,
            stride_don, N_Q, N_KV, scale, seed_bh, dropout_p,
            HEAD_DIM, BLOCK_D, TAIL_N, True, BLOCK_M, TAIL_M, DROPOUT, DOT_PRECISION, RELOAD,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# configs and launchers
# ---------------------------------------------------------------------------------------------------


def _tail(n: int, block: int) -> int:
    """Rows of the last tile's instantiation: the rows left after the full tiles (block when block divides
    n), rounded up to a power of 2 and at least 16, the smallest tl.dot tile."""
    rest = n % block or block
    return max(16, triton.next_power_of_2(rest))


_TAILS = {"TAIL_M": lambda args: _tail(args["N_Q"], args["BLOCK_M"]), "TAIL_N": lambda args: _tail(args["N_KV"], args["BLOCK_N"])}


def _configs(table):
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a {BLOCK_D: candidates} table as triton.Configs."""
    shapes = sorted({shape for candidates in table.values() for shape in candidates})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch and BLOCK_D, first = the default.
# Query tiles of 64 rows keep the N = 197 tail cheap; a 128-wide head dim needs 8 warps (or 32-row key tiles)
# to stay clear of spills. 256 is supported for completeness, not tuned.
# sm_90 (Hopper and newer): wgmma reads its operands from shared memory, so each backward program keeps its
# resident operands (dQ: q, dO; dK/dV: k, v) loaded once. Ampere (sm_8x): mma.sync needs them in registers,
# where at BLOCK_D = 128 they push ptxas past 255 registers; its backward reloads them every step instead
# (RELOAD, from L1 / L2), and its forward takes 32-row key tiles at BLOCK_D = 128.
_ARCH_TABLES = {
    90: {
        "fwd": {
            64: [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3)],
            128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
            256: [(64, 32, 8, 2), (32, 32, 4, 2)],
        },
        "dq": {64: [(64, 64, 8, 2), (64, 32, 4, 3)], 128: [(64, 64, 8, 2), (64, 32, 8, 2)], 256: [(32, 32, 8, 2)]},
        "dkdv": {64: [(32, 64, 4, 3), (64, 64, 4, 2)], 128: [(32, 64, 8, 2), (64, 64, 8, 2)], 256: [(32, 32, 8, 2)]},
    },
    80: {
        "fwd": {64: [(64, 64, 4, 3), (64, 32, 4, 3)], 128: [(64, 32, 8, 2)], 256: [(32, 32, 4, 2)]},
        "dq": {64: [(64, 64, 8, 2), (64, 32, 4, 3)], 128: [(64, 64, 8, 2), (64, 32, 8, 2)], 256: [(32, 32, 8, 2)]},
        "dkdv": {64: [(32, 64, 4, 3), (64, 64, 4, 2)], 128: [(32, 64, 8, 2), (64, 64, 8, 2)], 256: [(32, 32, 8, 2)]},
    },
}
# Fixed configs under the interpreter (no driver to autotune with): small tiles, so the tests' short
# sequences still cross full tiles and a ragged tail in every direction.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}
_INTERPRETER_DKDV_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4}


def _table_row(table, block_d):
    return table[max(64, block_d)]


def _prune(table):
    """Keep the candidates listed for the launch's BLOCK_D."""

    def prune(configs, named_args, **kwargs):
        allowed = set(_table_row(table, kwargs["BLOCK_D"]))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    return {"early_config_prune": prune}


def _tuned(kernel, table):
    """Tails follow the chosen tile sizes; autotuning only where a GPU driver exists (not the interpreter)."""
    kernel = triton.heuristics(_TAILS)(kernel)
    if is_interpreter():
        return kernel
    # the key holds what fastvit's launch key holds (the tensors' dtypes are always in it), so a pick is never
    # reused across dropout or dot precision, and a launch key's first call is the autotuner's too
    key = ["N_Q", "N_KV", "HEAD_DIM", "DROPOUT", "DOT_PRECISION"]
    return triton.autotune(_configs(table), key=key, prune_configs_by=_prune(table))(kernel)


_KERNEL_FUNCTIONS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}
_TUNED = {arch: {name: _tuned(_KERNEL_FUNCTIONS[name], table) for name, table in tables.items()}
          for arch, tables in _ARCH_TABLES.items()}  # fmt: skip


def tuning_record() -> list:
    """The tiles autotuning picked in this process, per attention kernel, arch and launch key
    (kernels/_helpers.picks_record); empty under the interpreter."""
    return picks_record(_picks)


def _arch(device) -> int:
    """The _ARCH_TABLES key for a device: 90 for sm_90 and newer, 80 for Ampere / Ada; 90 under the interpreter."""
    if on_gpu(device) and torch.cuda.get_device_capability(device)[0] < 9:
        return 80
    return 90


_picks = {}  # launch key -> the triton.Config autotuning picked (kernels/_helpers.launch_autotuned)


def _launch(arch, name, grid, args, constexprs, interpreter_config, shape):
    """One launch of attention kernel `name` (args positional, constexprs by name): the fixed config under
    the interpreter; on CUDA autotuned, where timing is not allowed (a CUDA-graph capture,
    FASTVIT_AUTOTUNE=0) with the pick made earlier for this shape (N_Q, N_KV, dtype) and constexprs, else
    the first candidate of its table for this BLOCK_D, the pre-tuned default."""
    tuned = _TUNED[arch][name]
    if is_interpreter():
        tuned[grid](*args, **constexprs, **interpreter_config)
        return
    block_m, block_n, num_warps, num_stages = _table_row(_ARCH_TABLES[arch][name], constexprs["BLOCK_D"])[0]
    default = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
    key = (f"attention {name} sm_{arch}", shape, tuple(sorted(constexprs.items())))
    launch_autotuned(tuned, grid, args, constexprs, key, _picks, default)


def _strides(t):
    """(batch, head, row) strides of a (B, H, N, d) tensor whose last dim has stride 1."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, f"last dim must have stride 1, got strides {t.stride()}"
    return t.stride(0), t.stride(1), t.stride(2)


def _block_d(head_dim: int) -> int:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def attention_forward(q, k, v, scale, dropout_p=0.0, seed=None, out=None):
    """softmax(scale * q k^T) (with dropout) v for every batch and head.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d) with Nk >= 1; any strides with stride 1 on the last dim; one
    dtype (fp32 / fp16 / bf16). seed: (1,) int64 tensor, required when dropout_p > 0. out: optional
    (B, H, Nq, d) view (unit last-dim stride) to write into, e.g. a (B, N, H, d) buffer transposed.
    Returns out (B, H, Nq, d) and lse (B, H, Nq) fp32 contiguous (natural-log log-sum-exp of each row).
    """
    B, H, N_Q, head_dim = q.shape
    N_KV = k.shape[2]
    block_d = _block_d(head_dim)
    out = new_output(q.shape, q.dtype, q.device) if out is None else out
    lse = new_output((B, H, N_Q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    dropout = dropout_p > 0
    grid = lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    args = (out, lse, q, k, v, seed if dropout else None, *_strides(out), *_strides(q), *_strides(k), *_strides(v),
            H, N_Q, N_KV, float(scale), float(dropout_p))  # fmt: skip
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DROPOUT=dropout, DOT_PRECISION=dot_precision(q.dtype))
    with device_context(q):
        _launch(_arch(q.device), "fwd", grid, args, constexprs, _INTERPRETER_CONFIG, (N_Q, N_KV, q.dtype))
    return out, lse


def attention_backward(do, q, k, v, o, lse, scale, dropout_p=0.0, seed=None, dq=None, dk=None, dv=None):
    """Gradients of attention_forward with respect to q, k and v.

    do, o: (B, H, Nq, d) and q, k, v as in attention_forward (unit last-dim strides, any others); lse:
    (B, H, Nq) fp32 contiguous from the forward; seed and dropout_p as given to the forward.
    dq, dk, dv: optional views (unit last-dim stride) to write into, e.g. slices of a packed d(qkv).
    Returns dq (B, H, Nq, d), dk and dv (B, H, Nk, d), in q's dtype.
    """
    B, H, N_Q, head_dim = q.shape
    N_KV = k.shape[2]
    block_d = _block_d(head_dim)
    dq = new_output(q.shape, q.dtype, q.device) if dq is None else dq
    dk = new_output(k.shape, k.dtype, k.device) if dk is None else dk
    dv = new_output(v.shape, v.dtype, v.device) if dv is None else dv
    if B * H * N_KV == 0:
        return dq, dk, dv
    if N_Q == 0:  # no query attends to the keys: their gradients are 0
        return dq, dk.zero_(), dv.zero_()
    delta = new_output((B, H, N_Q), torch.float32, q.device)
    dropout = dropout_p > 0
    seed = seed if dropout else None
    arch = _arch(q.device)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DROPOUT=dropout, DOT_PRECISION=dot_precision(q.dtype),
                  RELOAD=arch < 90)  # fmt: skip
    shape = (N_Q, N_KV, q.dtype)
    with device_context(q):
        # dQ first: its prologue writes Delta = rowsum(dO * O), which the dK / dV kernel reads
        _launch(arch, "dq", lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,), (
            dq, delta, q, k, v, o, do, lse, seed,
            *_strides(dq), *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            H, N_Q, N_KV, float(scale), float(dropout_p),
        ), common, _INTERPRETER_CONFIG, shape)  # fmt: skip
        _launch(arch, "dkdv", lambda meta: (triton.cdiv(N_KV, meta["BLOCK_N"]) * B * H,), (
            dk, dv, q, k, v, do, lse, delta, seed,
            *_strides(dk), *_strides(dv), *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            H, N_Q, N_KV, float(scale), float(dropout_p),
        ), common, _INTERPRETER_DKDV_CONFIG, shape)  # fmt: skip
    return dq, dk, dv


_KERNEL_ARGS = {  # name: (tensors in the dtype, their stride-name prefixes, fp32 tensors)
    "fwd": (("Out", "Q", "K", "V"), ("o", "q", "k", "v"), ("LSE",)),
    "dq": (("DQ", "Q", "K", "V", "O", "DO"), ("dq", "q", "k", "v", "o", "do"), ("Delta", "LSE")),
    "dkdv": (("DK", "DV", "Q", "K", "V", "DO"), ("dk", "dv", "q", "k", "v", "do"), ("LSE", "Delta")),
}


def _kernel_config(name, arch, head_dim, dtype, dropout, shape, archs, n_ctx=197):
    """The KernelConfig of kernel `name` for ViT's layouts at sequence length n_ctx: packed qkv views in, (B, N,
    H * d) out, so every batch / head / row stride is a multiple of 16 for d = 64, 80, 128 (the JIT's "i32:16");
    H and the lengths are not assumed to be. arch: the _ARCH_TABLES key the config is for; shape: (BLOCK_M,
    BLOCK_N, num_warps, num_stages); archs: the compute capabilities whose launchers pick it."""
    from ._helpers import KernelConfig

    kernel, (tensors, stride_names, fp32_tensors) = _KERNEL_FUNCTIONS[name], _KERNEL_ARGS[name]
    block_m, block_n, num_warps, num_stages = shape
    types = {t: f"*{dtype}" for t in tensors}
    types.update({t: "*fp32" for t in fp32_tensors})
    types.update({f"stride_{s}{dim}": "i32:16" for s in stride_names for dim in "bhn"})
    types.update({"H": "i32", "N_Q": "i32", "N_KV": "i32", "scale": "fp32", "dropout_p": "fp32"})
    if dropout:
        types["Seed"] = "*i64"
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": block_m, "BLOCK_N": block_n,
        "TAIL_M": _tail(n_ctx, block_m), "TAIL_N": _tail(n_ctx, block_n), "DROPOUT": dropout,
        "DOT_PRECISION": "tf32", **({} if dropout else {"Seed": None}), **({} if name == "fwd" else {"RELOAD": arch < 90}),
    }  # fmt: skip
    tiles = "x".join(map(str, shape[:2])) + f" w{shape[2]} s{shape[3]}"
    label = f"{name} N={n_ctx} d={head_dim} {dtype}{' dropout' if dropout else ''} sm_{arch} table {tiles}"
    # async_wgmma: each loop's tail step runs first, so no loop waits for every wgmma group (module docstring)
    return KernelConfig(kernel, "attention", label, types, constexprs, num_warps=num_warps, num_stages=num_stages,
                        archs=archs, async_wgmma=True)


def compile_configs():
    """Forward, dQ and dK/dV at ViT's N = 197 (ragged 16-row tails in both directions) for head dims 64, 80
    (ViT-H/so400m style padded 128) and 128, bf16 and fp16, with the first (default) autotune candidate of each
    arch's table, plus the dropout variants at d = 64 bf16. A config both archs run alike (same tiles, no
    RELOAD difference) is listed once, as sm_90's."""
    listed = {}  # config key -> (the first arch listing it, the archs that launch it)
    for arch, tables in _ARCH_TABLES.items():
        for head_dim in (64, 80, 128):
            for dtype in ("bf16", "fp16"):
                for dropout in (False, True) if (head_dim, dtype) == (64, "bf16") else (False,):
                    for name, table in tables.items():
                        shape = _table_row(table, _block_d(head_dim))[0]
                        key = (name, head_dim, dtype, dropout, shape, name != "fwd" and arch < 90)
                        listed.setdefault(key, (arch, []))[1].append(arch)
    return [
        _kernel_config(name, arch, head_dim, dtype, dropout, shape, tuple(archs))
        for (name, head_dim, dtype, dropout, shape, _), (arch, archs) in listed.items()
    ]
