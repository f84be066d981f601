"""Fused GEMM for every Linear of the ViT: one tiled tl.dot kernel with a prologue on the operands and an
epilogue on the fp32 accumulator, all selected by constexpr flags.

Forward (W in nn.Linear's (N, K) layout, read as W^T through strides; x may be LayerNorm-ed on the fly):

    z = LN?(x) W^T + b                         LN?(x)[m, k] = (x[m, k] - mean[m]) * rstd[m] * lw[k] + lb[k]
    y = residual + s * ls * dropout_p(act(z))   act = GELU (erf, or tanh approximation) or identity;
                                                s[m] = sample_scale[m // rows_per_sample]: stochastic depth

Backward, with d = s * dy * keep / (1 - p) (the dropout mask regenerated from the seed) and u = act(z):

    dz = d * ls * act'(z)                       computed in the *prologue* of both gradient GEMMs from dy
                                                and the saved pre-activation z; never stored
    dx_in = dz W          (M, K)                GEMM 1: A = dy, B = W
    dW = dz^T LN?(x)      (N, K)                GEMM 2: A = dy^T, B = x (LN re-applied in B's prologue)
    db = sum_m dz,  dls = sum_m d * u           row sums of GEMM 2's A tiles, taken by the programs that
                                                walk all of m for a block of n: deterministic, no atomics
    d residual = dy; LN's dx, dlw, dlb: kernels/layer_norm.py's backward on dx_in (one row-wise pass)

dGELU is fused from the *saved* pre-activation z (the tensor eager's GELU saves too), not recomputed: a
recompute would be a third GEMM. The dropout mask is never stored: tl.rand(seed, m * N + n) gives the same
keep decision in the forward epilogue and in both backward prologues. The per-sample factor s scales
dy's rows: in GEMM 2 they are the reduction (a prologue factor on A's columns), in GEMM 1 they are C's
rows, so it is applied in the epilogue there and A stays on the plain (asynchronous) path.

Where the GEMM that consumes a GELU's output is known (the MLP: fc2 reads fc1's h = GELU(z)), dGELU moves
to that GEMM's dx *epilogue* instead (PREACT_GRAD): dz = (dy W2) * GELU'(z) is formed once per element
and stored in place of dh, and fc1's gradient GEMMs read dz with no prologue (fastvit/ops/mlp.py). In
the prologue every column-block program recomputes it: at ViT-B widths 12 times per element, and the
K-step of fc1's dx GEMM is 809 SASS instructions for 2 HGMMA (BLOCK_K halved) instead of 115 for 4; its
dW GEMM's wgmma wait after each step (905 instructions for 1 HGMMA at BLOCK_K = 16 against 514 for 4,
3 groups in flight; sm_90, triton 3.6, bf16, default tiles).

Design:
- Program (pid_m, pid_n) owns a BLOCK_M x BLOCK_N tile of the output and walks K in BLOCK_K steps; programs
  are ordered in groups of GROUP_M row-blocks so neighbouring programs share A and B tiles in L2.
- Operands are cast to DOT_DTYPE (the compute dtype) right before tl.dot; the accumulator is fp32; fp32
  operands use DOT_PRECISION ("ieee" unless torch allows TF32). A LayerNorm-ed tile is x * rstd + shift
  then * lw + lb with no 2-D mask: its padded lanes meet zero pads of the other operand or are never
  stored. On sm_90 that lets the tile go from shared memory straight into the wgmma register layout
  (AOT SASS: 297 instead of ~450 instructions per K-step at 128 x 128); before sm_90 the unmasked tile
  spills, so ZERO_PADS masks it there. EVEN_K drops the K masks when BLOCK_K divides K.
- The K loop runs to max(k_len, 1): with a trip count the compiler cannot prove >= 1, triton 3.6 places
  the zero-trip path's accumulator initialisation after the loop and ptxas serialises every wgmma
  (warning C7515; WARPGROUP.DEPBAR 0x0 after each HGMMA, so the tensor cores never overlap the loads
  and the prologue). With it the forward and dx loops keep 1-3 wgmma groups in flight (compile_configs
  marks them async_wgmma: fastvit.inspect and tests/test_compile.py check it). So do the weight-gradient
  loops, given two things. dy^T's rows are dy's columns, contiguous: the JIT specialises N as a multiple
  of 16 (every ViT width), so the row-masked loads vectorise to 16-byte cp.async and Triton pipelines
  them (at N = 1000, the head's, they stay scalar loads staged through one shared buffer: serialised).
  And wgmma reads B from shared memory, so a LayerNorm-ed x tile computed in registers goes through one
  buffer each K-step overwrites: where dy needs no prologue (qkv's dW) the loop accumulates dW^T =
  LN(x)^T dy instead (SWAP_AB), the LN-ed tile then being the register operand; fc1's, with a dGELU
  prologue on dy too, still waits after each wgmma.
- Operands come by pointer loads, or on sm_90 through TMA tensor descriptors (A_DESC / B_DESC: host-side
  triton TensorDescriptors over the operand or its transpose, whichever has the unit stride, where its
  base and row pitch are 16-byte aligned; out-of-bounds reads are zeros, so the tails need no masks).
  In AOT compiles TMA only trims address arithmetic (87 vs ~100 instructions per K-step), so it is a
  tuner candidate, not the default: the GPU measurement decides (FASTVIT_TMA=0 leaves it out). On sm_90
  tl.dot lowers to wgmma (HGMMA) for BLOCK_M >= 64 and num_warps a multiple of 4, on sm_80 to mma.sync
  (HMMA): see compile_configs().
- LayerNorm statistics are handed from GEMM to GEMM: a residual GEMM (STATS_OUT) stores, per row, the
  mean and M2 (sum of squared deviations) of each STATS_GROUP = 64 columns of its output as stored, and
  the next LayerNorm -> GEMM (STATS_IN) combines those partials in its prologue (Chan et al.'s pairwise
  variance: no E[x^2] - E[x]^2 cancellation) and stores the row mean / rstd its backward needs. The
  hand-off costs 8 bytes per row per 64 columns (96 B per ViT-B row next to 1.5-3 KB of output) and a
  few reductions in the epilogue, so a block forward is exactly its 5 GEMM / attention launches. The
  group width is fixed, not BLOCK_N, so the consumer knows the layout whatever tile the producer ran.
  Where no producer hands statistics on (the stem's tokens, a standalone call) a separate row pass
  (_row_stats_kernel: x read once, 8 bytes written per row) computes them. Not an in-GEMM pass over K:
  measured on an H200 (triton 3.6; ViT-B QKV, M = 50432, K = 768, N = 2304, bf16), that made the GEMM
  23-50 % slower (648 -> 796 us at 128 x 256 tiles, 919 -> 1243 us at 128 x 128) since every column
  block re-reads its rows of x with no MMA to hide the reads, while the row pass costs 36-52 us.
- Split-K for the weight gradients: dW's (N, K) grid is small (ViT-B proj: 36 tiles of 128 x 128) while
  its reduction runs over all M = batch x tokens rows, so on CUDA the tile pick also tries cutting the
  reduction into slices (a second grid axis; _split_k sizes it to about one wave of SMs). Each slice
  writes fp32 partials of dW, db and dls, summed afterwards in a fixed order: deterministic, no atomics.
- Configs: one fixed config under the interpreter; on CUDA a measured pick among a few candidates per
  bucketed (M, N, K), dtype and flag set (their kernels compiled concurrently first), cached per process,
  with a pre-tuned default for ViT-S/B/L shapes used when FASTVIT_AUTOTUNE=0, or while a CUDA graph is
  being captured (unless the key was tuned before).

Limits: dy and W may have any strides (unit last-dim strides give vector loads), and so may x without a
LayerNorm prologue; with one, x needs a unit column stride (the statistics pass and LayerNorm's backward
read whole rows), as do the residual and the saved z; outputs are contiguous; offsets are int64. The ops
in fastvit/ops hand over rows with a unit column stride (rows_view copies any other).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._helpers import (COMPILE_FAILURES, TORCH_TO_TRITON_DTYPE, KernelConfig, compile_concurrently, device_context,
                       dot_precision, is_interpreter, may_measure, new_output, on_gpu)
from .layer_norm import _config as layer_norm_config
from .layer_norm import layer_norm_backward

_SQRT_1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), the tanh approximation's constant
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi), the Gaussian density's constant
# Row statistics handed from a GEMM to the next LayerNorm -> GEMM come in (mean, M2) pairs per this many
# columns: a width independent of the producer's tile, so the consumer knows the layout. Every tile's
# BLOCK_N is a multiple of it.
STATS_GROUP = tl.constexpr(64)


@triton.jit
def _tanh(x):
    # tl has no tanh in triton 3.6 outside libdevice; exp overflowing to inf still gives +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32: "gelu" = z Phi(z) (erf), "gelu_tanh" = timm / PyTorch's tanh approximation."""
    if ACTIVATION == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT_1_2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * _SQRT_2_PI))
    else:
        return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """GELU'(z) in fp32, for ACTIVATION "gelu" (erf) or "gelu_tanh"."""
    if ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.erf(z * _SQRT_1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    else:
        t = _tanh((z + 0.044715 * z * z * z) * _SQRT_2_PI)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3.0 * 0.044715 * z * z)


@triton.jit
def _dropout(x, Seed, rows, cols, n_cols, p):
    """x with inverted dropout applied to element (rows, cols) of an (., n_cols) output: 0 where dropped,
    x / (1 - p) where kept. The keep bits depend only on the seed and the position, so the forward and
    both backward GEMMs regenerate the same mask."""
    keep = tl.rand(tl.load(Seed), rows.to(tl.int64) * n_cols + cols) >= p
    return tl.where(keep, x * (1.0 / (1.0 - p)), 0.0)


@triton.jit
def _load_tile(Operand, DESC: tl.constexpr, first_row, first_col, rows, cols, stride_row, stride_col, mask):
    """The operand tile at rows x cols (first_row, first_col: its first row and column). DESC "direct":
    Operand is a TMA descriptor over the operand as laid out; "transposed": over its transpose (the tile
    is loaded that way round and transposed in registers); TMA reads out of bounds as zeros. "none":
    Operand is a pointer, loaded with the mask (other 0)."""
    if DESC == "direct":
        return Operand.load([first_row, first_col])
    elif DESC == "transposed":
        return tl.trans(Operand.load([first_col, first_row]))
    else:
        return tl.load(Operand + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _layer_norm_rows(x, rstd, shift, cols, col_mask, LnW, LnB, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr):
    """LayerNorm of a tile x[rows, cols] of the input (rows of x, with their fp32 rstd and shift = -mean *
    rstd) as x * rstd + shift, then * lw + lb: two FFMA per element and no 2-D mask, so on sm_90 the tile
    goes straight from shared memory into the wgmma register layout. Padded lanes are left non-zero:
    each meets a zero pad of the other operand (a padded k) or is never stored (a padded row or column)."""
    y = x.to(tl.float32) * rstd[:, None] + shift[:, None]
    if HAS_LN_W:
        y = y * tl.load(LnW + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_LN_B:
        y = y + tl.load(LnB + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _store_group_stats(Stats, y, rows, row_mask, first_col, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row statistics of an output tile y[rows, first_col : first_col + BLOCK_N] (fp32, as stored), one
    (mean, M2) pair per STATS_GROUP columns, into Stats (2, cdiv(N, STATS_GROUP), M): plane 0 the means,
    plane 1 the sums of squared deviations from them. Columns >= N are left out of both."""
    GROUPS: tl.constexpr = BLOCK_N // STATS_GROUP
    group_cols = tl.arange(0, GROUPS)[None, :, None] * STATS_GROUP + tl.arange(0, STATS_GROUP)[None, None, :]
    valid = first_col + group_cols < N  # (1, GROUPS, STATS_GROUP)
    y = tl.reshape(y, (BLOCK_M, GROUPS, STATS_GROUP))
    count = tl.maximum(tl.sum(valid.to(tl.float32), axis=2), 1.0)
    mean = tl.sum(tl.where(valid, y, 0.0), axis=2) / count
    centered = tl.where(valid, y - mean[:, :, None], 0.0)
    m2 = tl.sum(centered * centered, axis=2)
    groups = (first_col // STATS_GROUP + tl.arange(0, GROUPS)).to(tl.int64)
    offsets = groups[None, :] * M + rows[:, None]
    mask = row_mask[:, None] & (groups * STATS_GROUP < N)[None, :]
    tl.store(Stats + offsets, mean, mask=mask)
    tl.store(Stats + tl.cdiv(N, STATS_GROUP).to(tl.int64) * M + offsets, m2, mask=mask)


@triton.jit
def _combine_group_stats(Stats, stride_s_kind, stride_s_group, stride_s_row, rows, row_mask, D, eps,
                         BLOCK_M: tl.constexpr):
    """LayerNorm's fp32 (mean, rstd) of rows of x (., D) from the per-group partials that the GEMM which
    wrote x stored (_store_group_stats): the parallel-variance combination of Chan et al., which stays
    accurate for rows whose mean is far larger than their spread (no E[x^2] - E[x]^2 cancellation)."""
    stats_rows = Stats + rows * stride_s_row
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    for group in range(0, tl.cdiv(D, STATS_GROUP)):
        count = tl.minimum(D - group * STATS_GROUP, STATS_GROUP).to(tl.float32)
        mean += count * tl.load(stats_rows + tl.cast(group, tl.int64) * stride_s_group, mask=row_mask, other=0.0)
    mean = mean / D
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for group in range(0, tl.cdiv(D, STATS_GROUP)):
        count = tl.minimum(D - group * STATS_GROUP, STATS_GROUP).to(tl.float32)
        group_means = stats_rows + tl.cast(group, tl.int64) * stride_s_group
        delta = tl.load(group_means, mask=row_mask, other=0.0) - mean
        m2 += tl.load(group_means + stride_s_kind, mask=row_mask, other=0.0) + count * delta * delta
    return mean, tl.rsqrt(m2 / D + eps)


@triton.jit
def _grad_prologue(dy, dy_rows, dy_cols, mask, row_mask, col_mask, Z, stride_zm, Scale, SampleScale, rows_per_sample,
                   Seed, n_fwd, dropout_p, ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_SAMPLE_SCALE: tl.constexpr, DROPOUT: tl.constexpr, NEED_DU: tl.constexpr):
    """(dz, d * u) for a tile of dy: d = s * dy * keep / (1 - p), u = act(z), dz = d * ls * act'(z).

    dy_rows, dy_cols: the tile's int64 indices into the (M, n_fwd) output as broadcastable (X, 1) and
    (1, Y) vectors (either way round), row_mask / col_mask shaped like them; masked lanes have dy = 0."""
    d = dy.to(tl.float32)
    if HAS_SAMPLE_SCALE:
        d = d * tl.load(SampleScale + dy_rows.to(tl.int32) // rows_per_sample, mask=row_mask, other=0.0)
    if DROPOUT:
        d = _dropout(d, Seed, dy_rows, dy_cols, n_fwd, dropout_p)
    dz = d
    du = d
    if ACTIVATION != "none" or NEED_DU:
        z = tl.load(Z + dy_rows * stride_zm + dy_cols, mask=mask, other=0.0).to(tl.float32)
        if NEED_DU:
            du = d * _activation(z, ACTIVATION)
        if ACTIVATION != "none":
            dz = dz * _activation_grad(z, ACTIVATION)
    if HAS_SCALE:
        dz = dz * tl.load(Scale + dy_cols, mask=col_mask, other=0.0).to(tl.float32)
    return dz, du


@triton.jit
def _epilogue(acc, first_col, C, Preact, StatsOut, Bias, Residual, Scale, SampleScale, Seed, PreactSeed, stride_cm,
              stride_rm, rows, row_mask, M, N, n_fwd, rows_per_sample, dropout_p, preact_dropout_p,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_SAMPLE_SCALE: tl.constexpr, DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              SAVE_PREACT: tl.constexpr, PREACT_GRAD: tl.constexpr, PREACT_DROPOUT: tl.constexpr,
              STATS_OUT: tl.constexpr, GRAD_A: tl.constexpr, TRANS_A: tl.constexpr, BLOCK_M: tl.constexpr,
              WIDTH: tl.constexpr):  # fmt: skip
    """Finish and store columns first_col .. first_col + WIDTH of _linear_kernel's C tile at `rows` from
    their fp32 accumulator acc (BLOCK_M, WIDTH): bias, the pre-activation's store or gradient, then (in a
    forward: a gradient GEMM applies them to dy in its prologue) activation, dropout and layer scale, the
    per-sample scale, the residual; C and its row statistics (STATS_OUT)."""
    cols = (first_col + tl.arange(0, WIDTH)).to(tl.int64)
    col_mask = cols < N
    c_mask = row_mask[:, None] & col_mask[None, :]
    c_offsets = rows[:, None] * stride_cm + cols[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SAVE_PREACT:
        tl.store(Preact + c_offsets, acc.to(Preact.dtype.element_ty), mask=c_mask)
    # the gradient of the producer's pre-activation, formed once per element here: through its dropout
    # (the mask regenerated over C's (M, N), the producer's output) and its activation
    if PREACT_DROPOUT:
        acc = _dropout(acc, PreactSeed, rows[:, None], cols[None, :], N, preact_dropout_p)
    if PREACT_GRAD != "none":
        acc *= _activation_grad(tl.load(Preact + c_offsets, mask=c_mask, other=0.0).to(tl.float32), PREACT_GRAD)
    if not GRAD_A:
        acc = _activation(acc, ACTIVATION)
    if DROPOUT and not GRAD_A:
        acc = _dropout(acc, Seed, rows[:, None], cols[None, :], n_fwd, dropout_p)
    if HAS_SCALE and not GRAD_A:
        acc *= tl.load(Scale + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SAMPLE_SCALE and not TRANS_A:  # C's rows are the forward's: y's, or dy's in the dx GEMM
        acc *= tl.load(SampleScale + rows.to(tl.int32) // rows_per_sample, mask=row_mask, other=0.0)[:, None]
    if HAS_RESIDUAL:
        residual = tl.load(Residual + rows[:, None] * stride_rm + cols[None, :], mask=c_mask, other=0.0)
        acc += residual.to(tl.float32)
    out = acc.to(C.dtype.element_ty)
    tl.store(C + c_offsets, out, mask=c_mask)
    if STATS_OUT:  # of the values as stored, which the next LayerNorm reads
        _store_group_stats(StatsOut, out.to(tl.float32), rows, row_mask, first_col, M, N, BLOCK_M, WIDTH)


@triton.jit
def _linear_kernel(
    C,  # (M, N) output, row stride stride_cm, unit column stride; split-K: (splits, M, N) fp32 partials
    Preact,  # (M, N) with C's strides: z before the activation, stored (SAVE_PREACT) in a forward, or read
    # (PREACT_GRAD) in a dx GEMM whose x was act(z); else None
    RowSum,  # (M,) fp32 output: sum over k of the prologue's dz (ROWSUM_DZ: db in the dW GEMM), or None;
    # split-K: (splits, M) partial sums
    RowSumU,  # (M,) fp32 output: sum over k of d * u (ROWSUM_DU: dls in the dW GEMM), or None; likewise
    StatsOut,  # (2, cdiv(N, STATS_GROUP), M) fp32 output: C's per-group row statistics (STATS_OUT), or None
    A,  # (M, K) left operand: x, dy, or dy^T (TRANS_A); strides stride_am, stride_ak; or a TMA descriptor (A_DESC)
    B,  # (K, N) right operand: W^T, W or x (all strided views); strides stride_bk, stride_bn; or a descriptor
    Bias,  # (N,) or None
    Residual,  # (M, N), row stride stride_rm, unit column stride; or None
    Scale,  # layer scale (n_fwd,): over C's columns in the forward, dy's columns in GRAD_A; or None
    SampleScale,  # (samples,) fp32 per-sample factor s over the forward's rows: C's in the forward (after the
    # layer scale, before the residual) and in the dx GEMM, A's columns in the weight gradient; or None
    LnW,  # LayerNorm weight over the columns of the normalised operand (A if LN_A, B if LN_B), or None
    LnB,  # LayerNorm bias, same length, or None
    Mean,  # fp32 row means of the normalised operand (x): an input, or an output with STATS_IN; or None
    Rstd,  # fp32 row 1/std of x, likewise; or None
    StatsIn,  # (2, cdiv(K, STATS_GROUP), M) per-group statistics of x (STATS_IN), any strides; or None
    Seed,  # (1,) int64 dropout seed, or None
    PreactSeed,  # (1,) int64 seed of the dropout after the producer's activation (PREACT_DROPOUT), or None
    Z,  # saved pre-activation (dy's shape), row stride stride_zm, for GRAD_A; or None
    stride_cm, stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_zm,
    stride_c_split,  # C's stride between split-K partials (0 without a split)
    stride_s_kind, stride_s_group, stride_s_row,  # StatsIn's
    M, N, K,
    k_per_split,  # program (., s) reduces k in [s * k_per_split, (s + 1) * k_per_split): K without a split
    n_fwd,  # columns of the forward output y (dropout counters are m * n_fwd + n)
    rows_per_sample,  # rows of y per SampleScale entry (row indices fit int32: the row count is < 2^31)
    dropout_p,
    preact_dropout_p,  # that producer dropout's probability
    eps,  # LayerNorm's, for STATS_IN
    LN_A: tl.constexpr,  # A is x: LayerNorm it in the prologue (forward)
    LN_B: tl.constexpr,  # B is x: LayerNorm it in the prologue (weight gradient)
    STATS_IN: tl.constexpr,  # LN_A's mean / rstd come from StatsIn (and are stored to Mean / Rstd)
    HAS_LN_W: tl.constexpr,
    HAS_LN_B: tl.constexpr,
    GRAD_A: tl.constexpr,  # A is dy: turn it into dz in the prologue (both gradient GEMMs)
    TRANS_A: tl.constexpr,  # A is dy^T: A's rows are dy's columns (weight gradient)
    ROWSUM_DZ: tl.constexpr,
    ROWSUM_DU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "gelu", "gelu_tanh": epilogue, or its derivative in GRAD_A
    HAS_SCALE: tl.constexpr,
    HAS_SAMPLE_SCALE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    PREACT_GRAD: tl.constexpr,  # "none", or the activation that made this dx GEMM's x from Preact: store dx * act'(z)
    PREACT_DROPOUT: tl.constexpr,  # that x was also dropped out after the activation: the mask applies first
    STATS_OUT: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    A_DESC: tl.constexpr,  # "none": A is a pointer; "direct" / "transposed": a TMA descriptor over A / over A^T
    B_DESC: tl.constexpr,  # likewise for B
    ZERO_PADS: tl.constexpr,  # zero a LayerNorm-ed tile's padded lanes (before sm_90: unmasked, it spills)
    DOT_DTYPE: tl.constexpr,  # operands are cast to this right before tl.dot
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-blocks sweep the column-blocks together, so the B tiles they share
    # (and their A tiles) stay in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < N
    # split-K: this program's share of the reduction, and its own slice of the partial outputs
    pid_k = tl.program_id(1)
    k_begin = pid_k * k_per_split
    k_len = tl.minimum(k_per_split, K - k_begin)
    C += pid_k.to(tl.int64) * stride_c_split
    if ROWSUM_DZ:
        RowSum += pid_k.to(tl.int64) * M
    if ROWSUM_DU:
        RowSumU += pid_k.to(tl.int64) * M

    # wgmma reads its B operand from shared memory: a B tile computed in registers (LN_B) is stored to one
    # shared buffer that every K-step overwrites, so Triton waits for each wgmma before the next. When A
    # is dy as loaded (no dz prologue), the K loop accumulates C^T = B^T A^T instead: the LayerNorm-ed tile
    # becomes the register operand and dy^T the B operand, straight from the pipelined shared buffers.
    SWAP_AB: tl.constexpr = LN_B and ACTIVATION == "none" and not HAS_SCALE and not HAS_SAMPLE_SCALE and not DROPOUT
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_sum_u = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LN_A and STATS_IN:  # A's rows are x's rows: their statistics are loop-invariant
        mean_a, rstd_a = _combine_group_stats(StatsIn, stride_s_kind, stride_s_group, stride_s_row, rows,
                                              row_mask, K, eps, BLOCK_M)
        tl.store(Mean + rows, mean_a, mask=row_mask & (pid_n == 0))  # saved for the backward
        tl.store(Rstd + rows, rstd_a, mask=row_mask & (pid_n == 0))
    elif LN_A:
        mean_a = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd_a = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    if LN_A:
        shift_a = -mean_a * rstd_a
    # max(., 1): a trip count provably >= 1, else triton 3.6 puts the zero-trip path's accumulator
    # initialisation after the loop and ptxas serialises every wgmma (module docstring)
    for k_offset in range(0, tl.maximum(k_len, 1), BLOCK_K):
        ks = k_begin + k_offset + tl.arange(0, BLOCK_K).to(tl.int64)
        if EVEN_K:
            k_mask = tl.full([BLOCK_K], 1, tl.int1)
        else:
            k_mask = ks < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = _load_tile(A, A_DESC, pid_m * BLOCK_M, k_begin + k_offset, rows, ks, stride_am, stride_ak, a_mask)
        if LN_A:
            a = _layer_norm_rows(a, rstd_a, shift_a, ks, k_mask, LnW, LnB, HAS_LN_W, HAS_LN_B)
            if ZERO_PADS:
                a = tl.where(a_mask, a, 0.0)
        if GRAD_A:
            # dy's row and column of each A element, as broadcast vectors (full int64 tiles cost registers)
            if TRANS_A:
                dy_rows, dy_row_mask = ks[None, :], k_mask[None, :]
                dy_cols, dy_col_mask = rows[:, None], row_mask[:, None]
            else:
                dy_rows, dy_row_mask = rows[:, None], row_mask[:, None]
                dy_cols, dy_col_mask = ks[None, :], k_mask[None, :]
            # the sample scale of dy's rows: here where they are A's columns (the weight gradient), in the
            # epilogue where they are C's rows (dx)
            a, du = _grad_prologue(a, dy_rows, dy_cols, a_mask, dy_row_mask, dy_col_mask, Z, stride_zm, Scale,
                                   SampleScale, rows_per_sample, Seed, n_fwd, dropout_p, ACTIVATION, HAS_SCALE,
                                   HAS_SAMPLE_SCALE and TRANS_A, DROPOUT, ROWSUM_DU)  # fmt: skip
            if ROWSUM_DZ:
                row_sum += tl.sum(a, axis=1)
            if ROWSUM_DU:
                row_sum_u += tl.sum(du, axis=1)

        b_mask = k_mask[:, None] & col_mask[None, :]
        b = _load_tile(B, B_DESC, k_begin + k_offset, pid_n * BLOCK_N, ks, cols, stride_bk, stride_bn, b_mask)
        if LN_B:
            rstd_b = tl.load(Rstd + ks, mask=k_mask, other=0.0)
            b = _layer_norm_rows(b, rstd_b, -tl.load(Mean + ks, mask=k_mask, other=0.0) * rstd_b, cols, col_mask,
                                 LnW, LnB, HAS_LN_W, HAS_LN_B)  # fmt: skip
            if ZERO_PADS:
                b = tl.where(b_mask, b, 0.0)
        if SWAP_AB:
            acc = tl.dot(tl.trans(b.to(DOT_DTYPE)), tl.trans(a.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)

    # the row sums span all of K in every program; the first column-block writes them
    if ROWSUM_DZ:
        tl.store(RowSum + rows, row_sum, mask=row_mask & (pid_n == 0))
    if ROWSUM_DU:
        tl.store(RowSumU + rows, row_sum_u, mask=row_mask & (pid_n == 0))

    # A 128 x 256 tile's fused epilogue (GELU and its pre-activation, residual and statistics, dGELU)
    # would hold its fp32 temporaries next to 128 accumulator registers per thread and spill: it is
    # finished as two 128-column halves, one after the other (a split of the accumulator's registers).
    HALVES: tl.constexpr = 2 if BLOCK_N > 128 else 1
    if HALVES == 2:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    else:
        left, right = acc, acc  # (one half: the right is never used)
    for half in tl.static_range(HALVES):
        _epilogue(left if half == 0 else right, pid_n * BLOCK_N + half * (BLOCK_N // HALVES), C, Preact, StatsOut,
                  Bias, Residual, Scale, SampleScale, Seed, PreactSeed, stride_cm, stride_rm, rows, row_mask, M, N,
                  n_fwd, rows_per_sample, dropout_p, preact_dropout_p, HAS_BIAS, ACTIVATION, HAS_SCALE,
                  HAS_SAMPLE_SCALE, DROPOUT, HAS_RESIDUAL, SAVE_PREACT, PREACT_GRAD, PREACT_DROPOUT, STATS_OUT,
                  GRAD_A, TRANS_A, BLOCK_M, BLOCK_N // HALVES)


@triton.jit
def _row_stats_kernel(
    Mean,  # (M,) fp32 output
    Rstd,  # (M,) fp32 output
    X,  # (M, D) input, row stride stride_x_row, unit column stride
    stride_x_row,
    M,
    D,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """LayerNorm's row statistics only (the GEMM normalises on the fly): two passes over registers, as in
    kernels/layer_norm.py, so a large row mean does not cancel the variance."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    x_centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(x_centered * x_centered, axis=1) / D + eps)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


# ----------------------------------------------------------------------------------------------- configs

# TMA: the operands are read through tensor descriptors (Hopper's bulk copies) instead of pointer loads
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "TMA")
# Under the interpreter every tl op costs ~0.1 ms of Python whatever the tile size: few, large tiles. The
# tests' shapes (K = 100, N = 48 / 200 / 576, M = 17 / 397) still leave ragged tails in every dim, and
# M = 397 (4 row-blocks) makes 2 program groups.
_INTERPRETER_TILE = dict(zip(_TILE_KEYS, (128, 128, 64, 2, 4, 1, False)))
# Hopper / Ampere candidates: 128-row tiles feed wgmma with 2 warpgroups (8 warps) or 1 (4 warps);
# 16-bit operands take BLOCK_K = 64 (128-byte rows for the swizzled shared-memory layout), fp32 half that.
# The 8-warp tiles are also tried with TMA loads on sm_90 (_tma_layout: where the operands allow it): in
# ahead-of-time compiles TMA only trims the K-step's address arithmetic (87 vs ~100 instructions), so the
# measurement decides; the defaults stay on pointer loads. The 128 x 256 tiles (an H200 run of an earlier
# revision had them fastest for LN -> QKV) finish their epilogue in two column halves, so on sm_90 the
# forward GEMMs' fused epilogues fit with no spills (GELU + pre-activation store: 256 bytes spilled when
# finished whole; residual + statistics: 536); fc2's dx GEMM with dGELU still spills ~100 bytes (1048),
# and on sm_80 the fused GEMMs spill 8-90 bytes at this tile: candidates, which the measurement judges.
_CANDIDATES_16 = [dict(zip(_TILE_KEYS, t)) for t in (
    (128, 128, 64, 8, 8, 3, False), (128, 256, 64, 8, 8, 3, False), (128, 128, 64, 8, 4, 4, False),
    (64, 128, 64, 8, 4, 4, False), (128, 64, 64, 8, 4, 4, False), (128, 128, 64, 8, 8, 3, True),
    (128, 256, 64, 8, 8, 3, True),
)]
_CANDIDATES_32 = [dict(zip(_TILE_KEYS, t)) for t in (
    (128, 128, 32, 8, 8, 3, False), (128, 64, 32, 8, 4, 3, False), (64, 128, 32, 8, 4, 3, False),
    (64, 64, 32, 8, 4, 3, False), (128, 128, 32, 8, 8, 3, True),
)]
_tuned = {}  # tile pick key -> the tile measured fastest
_measured = {}  # tile pick key -> (the pre-tuned default, [(ms, tile) for every candidate timed])
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _default_tile(M: int, N: int, dot_dtype: torch.dtype) -> dict:
    """The pre-tuned pick for ViT-S/B/L shapes (M = batch x 197 tokens in the thousands, N, K = 384..4096):
    128 x 128 tiles with 8 warps; 64-row tiles when M or N is small (the head, tiny batches), so the grid
    still covers the SMs."""
    wide = dot_dtype != torch.float32  # 16-bit operands
    if M <= 1024 or N <= 256:
        return _CANDIDATES_16[3] if wide else _CANDIDATES_32[2]  # 64 x 128, 4 warps
    return _CANDIDATES_16[0] if wide else _CANDIDATES_32[0]  # 128 x 128, 8 warps


def _fit_to_fusions(tile: dict, flags: dict) -> dict:
    """Shrink a tile where the fusions hold many live fp32 values per element, so nothing spills (checked
    by compile_configs on sm_90 and sm_80): a GELU / dropout / layer-scale gradient prologue halves
    BLOCK_K, and more when B is LayerNorm-ed too (on sm_80 both operands then pass through registers); a
    LayerNorm-ed B runs at most 3 stages (2 next to a dz prologue in fp32); an epilogue with per-element
    transcendental work caps BLOCK_N at 64: a dropout mask (philox: the forward's, or the producer's in
    PREACT_DROPOUT), or an activation gradient (PREACT_GRAD: erf and exp) on fp32 tiles (16-bit ones fit,
    at 255 registers); a per-sample scale on an fp32 weight gradient's dy^T tile takes BLOCK_K = 16.
    Checked with triton 3.6 and 3.8."""
    tile = dict(tile)
    heavy_a = flags["GRAD_A"] and (flags["ACTIVATION"] != "none" or flags["DROPOUT"] or flags["HAS_SCALE"])
    if heavy_a and flags["LN_B"] and tile["BLOCK_K"] > 32:  # 16-bit: 64 -> 16
        tile["BLOCK_K"] //= 4
    elif heavy_a and flags["LN_B"]:  # fp32: 32 -> 16 (tl.dot's minimum), a narrower tile, 2 stages
        tile["BLOCK_K"] //= 2
        tile["BLOCK_N"] = min(tile["BLOCK_N"], 64)
        tile["num_stages"] = 2
    elif heavy_a:
        tile["BLOCK_K"] //= 2
    if flags["LN_B"]:  # the LayerNorm-ed operand's statistics and affine stay live across the stages
        tile["num_stages"] = min(tile["num_stages"], 3)
    epilogue_dropout = (flags["DROPOUT"] and not flags["GRAD_A"]) or flags["PREACT_DROPOUT"]
    if epilogue_dropout or (flags["PREACT_GRAD"] != "none" and flags["DOT_DTYPE"] == tl.float32):
        tile["BLOCK_N"] = min(tile["BLOCK_N"], 64)
    if flags["HAS_SAMPLE_SCALE"] and flags["TRANS_A"] and flags["DOT_DTYPE"] == tl.float32:
        tile["BLOCK_K"] = min(tile["BLOCK_K"], 16)
    return tile


def _before_hopper(device) -> bool:
    """A CUDA device older than sm_90: there a LayerNorm-ed tile without its 2-D mask stays in the mma.sync
    operand layout and spills, so ZERO_PADS keeps the mask (wgmma on sm_90 gains from dropping it)."""
    return on_gpu(device) and torch.cuda.get_device_capability(device)[0] < 9


def _split_k(tiles: int, K: int, block_k: int, num_sms: int) -> int:
    """How many slices to cut a long reduction into when the (M, N) grid alone cannot fill the GPU: the
    weight gradients of ViT-B's proj (768 x 768: 36 tiles of 128 x 128, each reducing over 50432 rows)
    would leave three quarters of an H200's 132 SMs idle. Enough slices for about one full wave, each
    at least 8 K-steps long."""
    if tiles >= num_sms:
        return 1
    return max(1, min(num_sms // tiles, K // (8 * block_k), 16))


def _pick_tile(key, M, N, K, dot_dtype, launch, can_split, can_tma) -> dict:
    """The tile config for one GEMM: fixed under the interpreter; on CUDA the fastest candidate for this
    key (flags, dtypes, next_power_of_2(M), N, K, can_tma), measured once per process, each candidate also
    tried with a split K when can_split and the grid is small (_split_k), TMA candidates only when can_tma
    (operands TMA can address, on sm_90), all compiled at once before any is timed
    (kernels/_helpers.compile_concurrently). Measuring reruns `launch`, which is safe because every output
    is overwritten, never accumulated into. The pre-tuned default is used without measuring while a CUDA
    graph is captured or when FASTVIT_AUTOTUNE=0."""
    if is_interpreter():
        return _INTERPRETER_TILE
    if key in _tuned:
        return _tuned[key]
    flags = dict(key[0])
    num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def with_splits(tile):
        tile = _fit_to_fusions(tile, flags)
        tiles = triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"])
        split = _split_k(tiles, K, tile["BLOCK_K"], num_sms) if can_split else 1
        return [dict(tile, SPLIT_K=split)] + ([dict(tile, SPLIT_K=1)] if split > 1 else [])

    default = with_splits(_default_tile(M, N, dot_dtype))[0]
    if not may_measure():
        return default
    tiles = []
    for candidate in _CANDIDATES_16 if dot_dtype != torch.float32 else _CANDIDATES_32:
        if not candidate["TMA"] or can_tma:
            tiles += [tile for tile in with_splits(candidate) if tile not in tiles]  # fitting may make equals
    compile_concurrently([functools.partial(launch, tile, compile_only=True) for tile in tiles])
    timings = []
    for tile in tiles:
        try:
            timings.append((triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=25), len(timings), tile))
        except COMPILE_FAILURES:  # skipped, as triton.autotune does
            continue
    _tuned[key] = min(timings)[2] if timings else default
    _measured[key] = default, [(ms, tile) for ms, _, tile in timings]
    return _tuned[key]


def tuning_record() -> list:
    """What the CUDA tile pick measured in this process, one row per GEMM key: the fusion flags that were
    on, the dtypes (out, A, B), the bucketed M, N, K, every candidate's time in ms, the pick, and the
    pre-tuned default (what runs with FASTVIT_AUTOTUNE=0, or in a capture before any tuning) with its
    time when it was among the candidates. Empty under the interpreter, which measures nothing."""
    record = []
    for key, (default, timings) in _measured.items():
        flags, out_dtype, a_dtype, b_dtype, M, N, K, can_tma = key
        on = {name: str(value) for name, value in flags if value not in (False, "none")}
        default_ms = [ms for ms, tile in timings if tile == default]
        record.append({
            "kernel": "linear", "flags": on, "dtypes": [str(out_dtype), str(a_dtype), str(b_dtype)],
            "M_bucket": M, "N": N, "K": K, "tma_eligible": can_tma, "picked": _tuned[key], "default": default,
            "default_ms": default_ms[0] if default_ms else None,
            "candidates": [{"ms": ms, "tile": tile} for ms, tile in timings],
        })  # fmt: skip
    return record


def _tma_layout(t, shape, strides):
    """How a TMA descriptor can address the 2-D operand (shape, strides) of tensor t: "direct" (its column
    stride is 1), "transposed" (its row stride is 1: the descriptor is over its transpose), or None where
    TMA cannot (a base or row pitch not 16-byte aligned, an empty dim: triton's TensorDescriptor rules; a
    pitch of 0, an expanded operand, which a tensor map may not encode)."""
    (rows, cols), (row_stride, col_stride) = shape, strides
    if col_stride == 1 or cols == 1:
        layout, pitch = "direct", row_stride
    elif row_stride == 1 or rows == 1:
        layout, pitch = "transposed", col_stride
    else:
        return None
    aligned = t.data_ptr() % 16 == 0 and pitch > 0 and (pitch * t.element_size()) % 16 == 0
    return layout if aligned and rows > 0 and cols > 0 else None


def _operand(t, shape, strides, layout, block):
    """(the kernel argument, its *_DESC flag) for an operand: a TensorDescriptor tiled by block (rows,
    cols) in `layout` (_tma_layout), or with layout None t itself, loaded by pointer."""
    if layout is None:
        return t, "none"
    (rows, cols), (row_stride, col_stride) = shape, strides
    if layout == "direct":
        return TensorDescriptor(t, [rows, cols], [row_stride, 1], list(block)), layout
    return TensorDescriptor(t, [cols, rows], [col_stride, 1], list(block[::-1])), layout


def _gemm(out, a, b, a_strides, b_strides, M, N, K, *, dot_dtype, n_fwd=0, dropout_p=0.0, preact=None,
          row_sum=None, row_sum_u=None, stats_out=None, bias=None, residual=None, scale=None, sample_scale=None,
          ln_weight=None, ln_bias=None, mean=None, rstd=None, stats_in=None, eps=0.0, seed=None, z=None, ln_a=False,
          ln_b=False, grad_a=False, trans_a=False, activation="none", preact_activation="none", preact_seed=None,
          preact_dropout_p=0.0):
    """out (M, N) = epilogue(prologue(A) @ prologue(B)) with A (M, K), B (K, N) given by their strides.

    out, preact: contiguous (M, N); preact is written, or with preact_activation != "none" read (out is
    then multiplied by preact_activation'(preact), after the mask of the dropout (preact_seed,
    preact_dropout_p) that followed that activation); residual, z: unit column stride; stats_out: contiguous
    (2, cdiv(N, STATS_GROUP), M); stats_in: (2, cdiv(K, STATS_GROUP), M), any strides, with mean and rstd
    then written; sample_scale: contiguous fp32 (samples,), dividing the forward's n_rows rows evenly.
    Flags follow the pointers given."""
    flags = dict(
        LN_A=ln_a, LN_B=ln_b, STATS_IN=stats_in is not None, HAS_LN_W=ln_weight is not None,
        HAS_LN_B=ln_bias is not None, GRAD_A=grad_a, TRANS_A=trans_a, ROWSUM_DZ=row_sum is not None,
        ROWSUM_DU=row_sum_u is not None, HAS_BIAS=bias is not None, ACTIVATION=activation,
        HAS_SCALE=scale is not None, HAS_SAMPLE_SCALE=sample_scale is not None, DROPOUT=dropout_p > 0,
        HAS_RESIDUAL=residual is not None, SAVE_PREACT=preact is not None and preact_activation == "none",
        PREACT_GRAD=preact_activation, PREACT_DROPOUT=preact_dropout_p > 0, STATS_OUT=stats_out is not None,
        DOT_DTYPE=_TL_DTYPES[dot_dtype], DOT_PRECISION=dot_precision(dot_dtype),
    )

    can_split = trans_a and out.is_contiguous()  # the weight gradients: no epilogue to split around
    a_layout, b_layout = _tma_layout(a, (M, K), a_strides), _tma_layout(b, (K, N), b_strides)
    # TMA where the device has it (sm_90, or the interpreter when a test forces a TMA tile) and it is not
    # switched off: a tuned TMA tile replayed elsewhere (FASTVIT_TMA=0 since, an sm_80 device) loads by pointer
    can_tma = (not _before_hopper(out.device) and (a_layout or b_layout) is not None
               and os.environ.get("FASTVIT_TMA", "1") != "0")  # fmt: skip
    # the forward's rows are C's (forward, dx) or the reduction's (dW); samples divide them evenly
    rows_per_sample = (K if trans_a else M) // max(sample_scale.numel(), 1) if sample_scale is not None else 1

    def launch(tile, compile_only=False):
        """Run the GEMM with `tile`; with compile_only, only compile its kernel (JITFunction.warmup)."""
        tile = dict(tile)
        split = tile.pop("SPLIT_K", 1)  # (popped always: the kernel has no such argument)
        split = split if can_split else 1  # a split would cut the forward / dx GEMMs' epilogues
        tma = tile.pop("TMA", False) and can_tma
        a_arg, a_desc = _operand(a, (M, K), a_strides, a_layout if tma else None, (tile["BLOCK_M"], tile["BLOCK_K"]))
        b_arg, b_desc = _operand(b, (K, N), b_strides, b_layout if tma else None, (tile["BLOCK_K"], tile["BLOCK_N"]))
        k_per_split = triton.cdiv(triton.cdiv(K, split), tile["BLOCK_K"]) * tile["BLOCK_K"]
        splits = triton.cdiv(K, k_per_split)
        # split-K: each slice of the reduction writes fp32 partials, summed below in a fixed order
        # (deterministic); only for GEMMs with no epilogue beyond the store (the weight gradients). A compile
        # needs only their dtype: one-element placeholders then
        targets = (out, row_sum, row_sum_u)
        if splits > 1:
            targets = tuple(None if t is None else t.new_empty(1 if compile_only else (splits, *t.shape),
                                                               dtype=torch.float32) for t in targets)  # fmt: skip
        c, c_row_sum, c_row_sum_u = targets
        grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]), splits)
        run = functools.partial(_linear_kernel.warmup, grid=grid) if compile_only else _linear_kernel[grid]
        run(
            c, preact, c_row_sum, c_row_sum_u, stats_out, a_arg, b_arg, bias, residual, scale, sample_scale, ln_weight,
            ln_bias, mean, rstd, stats_in, seed, preact_seed, z, out.stride(0), *a_strides, *b_strides,
            residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0,
            M * N if splits > 1 else 0, *(stats_in.stride() if stats_in is not None else (0, 0, 0)),
            M, N, K, k_per_split, n_fwd, rows_per_sample, dropout_p, preact_dropout_p, eps, **flags,
            EVEN_K=K > 0 and K % tile["BLOCK_K"] == 0, A_DESC=a_desc, B_DESC=b_desc,
            ZERO_PADS=(ln_a or ln_b) and _before_hopper(out.device), **tile,
        )  # fmt: skip
        if splits > 1 and not compile_only:
            for total, partials in zip((out, row_sum, row_sum_u), targets):
                if total is not None:
                    total.copy_(partials.sum(0))

    if M == 0 or N == 0:
        return
    if K == 0 and bias is None and residual is None:
        # An empty reduction (the weight-gradient GEMM of a batch of 0 rows): every product and row sum is
        # zero, and nothing is launched. Forward GEMMs never get here: ops.linear validates K >= 1.
        for t in (out, row_sum, row_sum_u):
            if t is not None:
                t.zero_()
        return
    key = (tuple(flags.items()), out.dtype, a.dtype, b.dtype, triton.next_power_of_2(M), N, K, can_tma)
    with device_context(out):
        launch(_pick_tile(key, M, N, K, dot_dtype, launch, can_split, can_tma))


def _row_stats(x, eps):
    """fp32 (mean, rstd) of each row of x (M, D), unit column stride, with LayerNorm's row tiling."""
    M, D = x.shape
    block_m, block_d, num_warps = layer_norm_config(D)
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    if M:
        with device_context(x):
            _row_stats_kernel[(triton.cdiv(M, block_m),)](
                mean, rstd, x, x.stride(0), M, D, eps, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            )  # fmt: skip
    return mean, rstd


# --------------------------------------------------------------------------------------------- launchers


def stats_groups(n_cols: int) -> int:
    """How many (mean, M2) groups describe a row of n_cols columns: the middle dim of a stats tensor."""
    return triton.cdiv(n_cols, STATS_GROUP.value)


def linear_forward(x, weight, bias, residual, layer_scale, ln_weight, ln_bias, seed, *, activation="none",
                   dropout_p=0.0, eps=1e-6, has_ln=False, save_preact=False, out_dtype=None, x_stats=None,
                   emit_stats=False, sample_scale=None):
    """y = residual + s * ls * dropout_p(act(LN?(x) W^T + b)), each piece optional.

    x: (M, K), unit column stride (any dtype when has_ln: LayerNorm reads it and computes in fp32;
    else weight's dtype); weight: (N, K) any strides, its dtype is the compute dtype; bias, layer_scale:
    (N,); residual: (M, N), unit column stride; ln_weight, ln_bias: (K,) or None; seed: (1,) int64 on
    x's device when dropout_p > 0; x_stats: None, or with has_ln the (2, stats_groups(K), M) fp32
    statistics that the GEMM which wrote x emitted (any strides), replacing the statistics pass;
    sample_scale: None or fp32 (S,) with S dividing M: row m is scaled by sample_scale[m // (M / S)].
    Returns y (M, N) contiguous in out_dtype (default weight's dtype), preact z (M, N) in weight's dtype
    when save_preact (else None), fp32 mean, rstd (M,) when has_ln (else None), and y's statistics
    (2, stats_groups(N), M) fp32 when emit_stats (else None).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = new_output((M, N), out_dtype or weight.dtype, x.device)
    preact = new_output((M, N), weight.dtype, x.device) if save_preact else None
    stats = new_output((2, stats_groups(N), M), torch.float32, x.device) if emit_stats else None
    if has_ln and x_stats is not None:  # the GEMM combines x_stats and stores mean, rstd
        mean, rstd = (new_output((M,), torch.float32, x.device) for _ in range(2))
    else:
        mean, rstd = _row_stats(x, eps) if has_ln else (None, None)
    _gemm(
        y, x, weight, x.stride(), (weight.stride(1), weight.stride(0)), M, N, K, dot_dtype=weight.dtype,
        n_fwd=N, dropout_p=dropout_p, preact=preact, stats_out=stats, bias=bias, residual=residual,
        scale=layer_scale, sample_scale=sample_scale, ln_weight=ln_weight, ln_bias=ln_bias, mean=mean, rstd=rstd,
        stats_in=x_stats if has_ln else None, eps=eps, seed=seed, ln_a=has_ln, activation=activation,
    )  # fmt: skip
    return y, preact, mean, rstd, stats


def linear_backward(dy, x, weight, preact, layer_scale, ln_weight, ln_bias, mean, rstd, seed, *,
                    activation="none", dropout_p=0.0, needs=(True,) * 6, x_preact=None, x_activation="none",
                    x_seed=None, x_dropout_p=0.0, sample_scale=None):
    """Gradients of linear_forward (without the residual's, which is dy itself).

    dy: (M, N) unit column stride; x, weight, layer_scale, ln_weight, ln_bias, seed as in the forward;
    preact: (M, N) saved z, needed when activation != "none" or dlayer_scale is asked for; mean, rstd:
    the forward's fp32 statistics when it had LayerNorm, else None. needs: which of (dx, dweight, dbias,
    dlayer_scale, dln_weight, dln_bias) to compute. Returns those six, each None when not asked for; dx in
    x's dtype, dweight and dbias in weight's, dlayer_scale in its own, LayerNorm's in their own.

    sample_scale: the forward's, if any.
    x_preact, x_activation, x_seed, x_dropout_p: when x = dropout(x_activation(x_preact)) (the GEMM before
    this one saved its pre-activation, contiguous (M, K), and drew its dropout from x_seed; no LayerNorm
    here), dx comes back as the gradient of x_preact: the dx GEMM's epilogue applies the dropout mask and
    x_activation'(x_preact), so the previous GEMM's backward needs no prologue (the MLP's fc2 -> fc1
    hand-off).
    """
    need_dx, need_dw, need_db, need_dls, need_dlw, need_dlb = needs
    M, N = dy.shape
    K = x.shape[1]
    has_ln = mean is not None
    prologue = dict(dot_dtype=weight.dtype, n_fwd=N, dropout_p=dropout_p, scale=layer_scale,
                    sample_scale=sample_scale, seed=seed, z=preact, grad_a=True, activation=activation)
    dx = dweight = dbias = dscale = dln_weight = dln_bias = None

    if need_dx or need_dlw or need_dlb:
        # dx_in = dz W, kept in fp32 when LayerNorm's backward still has to consume it
        dx_in = new_output((M, K), torch.float32 if has_ln else x.dtype, x.device)
        _gemm(dx_in, dy, weight, dy.stride(), weight.stride(), M, K, N, preact=x_preact,
              preact_activation=x_activation, preact_seed=x_seed, preact_dropout_p=x_dropout_p, **prologue)  # fmt: skip
        dx = dx_in
        if has_ln:
            dx, dln_weight, dln_bias = layer_norm_backward(dx_in, x, ln_weight, mean, rstd, need_dlw, need_dlb)
            if dln_bias is not None:
                dln_bias = dln_bias.to(ln_bias.dtype)

    if need_dw or need_db or need_dls:
        # dW = dz^T LN?(x): A is dy read transposed, B is x normalised again from the saved statistics
        dweight = new_output((N, K), weight.dtype, x.device)
        row_sum = new_output((N,), torch.float32, x.device) if need_db else None
        row_sum_u = new_output((N,), torch.float32, x.device) if need_dls else None
        _gemm(dweight, dy, x, (dy.stride(1), dy.stride(0)), x.stride(), N, K, M, row_sum=row_sum,
              row_sum_u=row_sum_u, ln_weight=ln_weight, ln_bias=ln_bias, mean=mean, rstd=rstd, ln_b=has_ln,
              trans_a=True, **prologue)  # fmt: skip
        dbias = row_sum.to(weight.dtype) if need_db else None
        dscale = row_sum_u.to(layer_scale.dtype) if need_dls else None

    keep = (need_dx, need_dw, need_db, need_dls, need_dlw, need_dlb)
    grads = (dx, dweight, dbias, dscale, dln_weight, dln_bias)
    return tuple(g if k else None for g, k in zip(grads, keep))


_POINTER_ARGS = ("C", "Preact", "RowSum", "RowSumU", "StatsOut", "A", "B", "Bias", "Residual", "Scale", "SampleScale",
                 "LnW", "LnB", "Mean", "Rstd", "StatsIn", "Seed", "PreactSeed", "Z")
_FLAGS_OFF = dict(LN_A=False, LN_B=False, STATS_IN=False, STATS_OUT=False, HAS_LN_W=False, HAS_LN_B=False, GRAD_A=False,
                  TRANS_A=False, ROWSUM_DZ=False, ROWSUM_DU=False, HAS_BIAS=False, ACTIVATION="none", HAS_SCALE=False,
                  HAS_SAMPLE_SCALE=False, DROPOUT=False, HAS_RESIDUAL=False, SAVE_PREACT=False, PREACT_GRAD="none",
                  PREACT_DROPOUT=False)


def _gemm_config(label, used, flags, torch_dtype, tile_m, tile, archs):
    """The KernelConfig of one GEMM as the model launches it: `used` pointers, `flags` on, operands in
    torch_dtype (under autocast the residual stream stays fp32), tile_m rows (the weight gradients reduce
    over them), a candidate `tile` fitted to the fusions as the tuner fits it (its TMA entry: A and B as
    tensor descriptors), compiled for `archs`."""
    tile = _fit_to_fusions(tile, {**_FLAGS_OFF, **flags, "DOT_DTYPE": _TL_DTYPES[torch_dtype]})
    dtype = TORCH_TO_TRITON_DTYPE[torch_dtype]
    trans = flags.get("TRANS_A", False)
    # under autocast the residual stream (x of LN->GEMM, the residual, the output) stays fp32
    stream = "fp32" if flags.get("LN_A") or flags.get("HAS_RESIDUAL") else dtype
    types = {name: f"*{dtype}" for name in used}
    types.update({name: "*fp32" for name in ("RowSum", "RowSumU", "Mean", "Rstd", "StatsOut", "StatsIn",
                                             "SampleScale") if name in used})  # fmt: skip
    types.update({name: "*i64" for name in ("Seed", "PreactSeed") if name in used})
    types.update({"A": f"*{stream}" if flags.get("LN_A") else f"*{dtype}",
                  "Residual": "*fp32", "C": "*fp32" if flags.get("HAS_RESIDUAL") else f"*{dtype}"})
    types = {k: v for k, v in types.items() if k in used or k == "C"}
    # row strides, N and K are multiples of 16 at ViT widths (the JIT specialises on that); M is not
    ints = {name: "i32:16" for name in ("stride_cm", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                        "stride_rm", "stride_zm", "N", "K", "n_fwd")}
    ints.update(M="i32", rows_per_sample="i32", dropout_p="fp32", preact_dropout_p="fp32", eps="fp32",
                stride_s_kind="i32", stride_s_group="i32", stride_s_row="i32", stride_c_split="i32:16",
                k_per_split="i32:16")
    # unit strides (constexpr 1 in the JIT too): A's columns, or its rows when A is dy^T; B's rows when B
    # is W^T (forward), else B's columns
    units = ("stride_am" if trans else "stride_ak", "stride_bn" if flags.get("GRAD_A") else "stride_bk")
    ints = {name: t for name, t in ints.items() if name not in units}
    # the weight gradients' M is the forward's N (a ViT width: the JIT specialises it as a multiple of 16,
    # which lets dy^T's masked loads vectorise) and their K its tile_m rows
    sizes = dict(M="i32:16", K="i32:16" if tile_m % 16 == 0 else "i32") if trans else {}
    constexprs = {name: None for name in _POINTER_ARGS if name not in types}
    constexprs.update({name: 1 for name in units})
    constexprs.update({**_FLAGS_OFF, **flags, "DOT_DTYPE": _TL_DTYPES[torch_dtype], "DOT_PRECISION": "tf32"})
    constexprs.update({k: tile[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
    # K is a ViT width, except for the weight gradients' reduction over M rows
    constexprs["EVEN_K"] = tile_m % tile["BLOCK_K"] == 0 if trans else True
    has_ln = flags.get("LN_A") or flags.get("LN_B")
    constexprs["ZERO_PADS"] = bool(has_ln) and archs == (80,)  # before sm_90 only
    constexprs["A_DESC"] = constexprs["B_DESC"] = "none"
    if tile["TMA"]:  # descriptors laid out as _tma_layout finds the model's operands
        for name, layout, (rows, cols) in (
            ("A", "transposed" if trans else "direct", (tile["BLOCK_M"], tile["BLOCK_K"])),
            ("B", "direct" if flags.get("GRAD_A") else "transposed", (tile["BLOCK_K"], tile["BLOCK_N"])),
        ):  # fmt: skip
            block = (rows, cols) if layout == "direct" else (cols, rows)
            types[name] = f"tensordesc<{types[name][1:]}[{block[0]}, {block[1]}]>"
            constexprs[f"{name}_DESC"] = layout
    # a LayerNorm-ed B next to a dz prologue (fc1's weight gradient) keeps the wgmma serialised
    serial = flags.get("LN_B", False) and flags.get("ACTIVATION", "none") != "none"
    return KernelConfig(
        _linear_kernel, "gemm", f"{label} {dtype} M={tile_m}", types={**types, **ints, **sizes}, constexprs=constexprs,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], archs=archs, async_wgmma=not serial,
    )  # fmt: skip


def compile_configs():
    """Every GEMM the model launches (forward, dx and dW of each Linear) in bf16, fp16 and fp32, at the
    pre-tuned default tiles for large and small M; sm_90's TMA and 128 x 256 candidates for the block's
    big GEMMs (bf16, batch 256); and the LayerNorm statistics pass. Unit strides are constexpr 1 and row
    strides, N and K carry the multiple-of-16 hint, as the JIT specialises them at ViT widths. fp32 is listed with TF32 dots, its tensor-core path; fp32 under torch's default "highest"
    matmul precision runs IEEE FFMA dots on purpose (as cuBLAS does), with the same tiles."""
    uses = {  # label -> (pointers used, flags): the fused ops of one block, the head and their gradients
        "LN->qkv+bias": ({"A", "B", "Bias", "LnW", "LnB", "Mean", "Rstd"},
                         dict(LN_A=True, HAS_LN_W=True, HAS_LN_B=True, HAS_BIAS=True)),
        "proj/fc2+bias+residual": ({"A", "B", "Bias", "Residual", "StatsOut"},
                                   dict(HAS_BIAS=True, HAS_RESIDUAL=True, STATS_OUT=True)),
        "LN(handed-on stats)->qkv+bias": ({"A", "B", "Bias", "LnW", "LnB", "Mean", "Rstd", "StatsIn"},
                                          dict(LN_A=True, STATS_IN=True, HAS_LN_W=True, HAS_LN_B=True,
                                               HAS_BIAS=True)),
        "LN(handed-on stats)->fc1+bias+gelu": ({"A", "B", "Bias", "LnW", "LnB", "Mean", "Rstd", "StatsIn", "Preact"},
                                               dict(LN_A=True, STATS_IN=True, HAS_LN_W=True, HAS_LN_B=True,
                                                    HAS_BIAS=True, ACTIVATION="gelu", SAVE_PREACT=True)),
        "LN(handed-on stats)->fc1+bias+gelu+dropout": (
            {"A", "B", "Bias", "LnW", "LnB", "Mean", "Rstd", "StatsIn", "Preact", "Seed"},
            dict(LN_A=True, STATS_IN=True, HAS_LN_W=True, HAS_LN_B=True, HAS_BIAS=True, ACTIVATION="gelu",
                 SAVE_PREACT=True, DROPOUT=True)),
        "fc2+bias+dropout+ls+residual": ({"A", "B", "Bias", "Residual", "Scale", "Seed", "Preact", "StatsOut"},
                                         dict(HAS_BIAS=True, DROPOUT=True, HAS_SCALE=True, HAS_RESIDUAL=True,
                                              SAVE_PREACT=True, STATS_OUT=True)),
        "proj/fc2+bias+drop path+residual": ({"A", "B", "Bias", "Residual", "SampleScale", "StatsOut"},
                                             dict(HAS_BIAS=True, HAS_SAMPLE_SCALE=True, HAS_RESIDUAL=True,
                                                  STATS_OUT=True)),
        "dx plain": ({"A", "B"}, dict(GRAD_A=True)),
        "dx, drop path": ({"A", "B", "SampleScale"}, dict(GRAD_A=True, HAS_SAMPLE_SCALE=True)),
        "dx into gelu's input, drop path": ({"A", "B", "Preact", "SampleScale"},
                                            dict(GRAD_A=True, PREACT_GRAD="gelu", HAS_SAMPLE_SCALE=True)),
        "dx into gelu+dropout's input, dropout": ({"A", "B", "Preact", "Seed", "PreactSeed"},
                                                  dict(GRAD_A=True, PREACT_GRAD="gelu", PREACT_DROPOUT=True,
                                                       DROPOUT=True)),
        "dx through gelu": ({"A", "B", "Z"}, dict(GRAD_A=True, ACTIVATION="gelu")),
        "dx into gelu's input": ({"A", "B", "Preact"}, dict(GRAD_A=True, PREACT_GRAD="gelu")),
        "dW+db": ({"A", "B", "RowSum"}, dict(GRAD_A=True, TRANS_A=True, ROWSUM_DZ=True)),
        "dW+db, drop path": ({"A", "B", "RowSum", "SampleScale"},
                             dict(GRAD_A=True, TRANS_A=True, ROWSUM_DZ=True, HAS_SAMPLE_SCALE=True)),
        "dW+db, LN(x)": ({"A", "B", "RowSum", "LnW", "LnB", "Mean", "Rstd"},
                         dict(GRAD_A=True, TRANS_A=True, ROWSUM_DZ=True, LN_B=True, HAS_LN_W=True, HAS_LN_B=True)),
        "dW+db through gelu, LN(x)": ({"A", "B", "RowSum", "Z", "LnW", "LnB", "Mean", "Rstd"},
                                      dict(GRAD_A=True, TRANS_A=True, ROWSUM_DZ=True, ACTIVATION="gelu", LN_B=True,
                                           HAS_LN_W=True, HAS_LN_B=True)),
    }
    configs = []
    for D in (384, 768, 1024, 1280):
        block_m, block_d, num_warps = layer_norm_config(D)
        for dtype in ("bf16", "fp32"):
            configs.append(KernelConfig(
                _row_stats_kernel, "rowwise", f"LN statistics D={D} {dtype}",
                types={"Mean": "*fp32", "Rstd": "*fp32", "X": f"*{dtype}", "stride_x_row": "i32:16",
                       "M": "i32", "D": "i32:16", "eps": "fp32"},
                constexprs={"BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=num_warps,
            ))  # fmt: skip
    for torch_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for label, (used, flags) in uses.items():
            for tile_m in (50432, 394):
                tile = _default_tile(tile_m, 768, torch_dtype)
                has_ln = flags.get("LN_A") or flags.get("LN_B")
                for archs in ((90,), (80,)) if has_ln else ((90, 80),):  # ZERO_PADS differs
                    configs.append(_gemm_config(label, used, flags, torch_dtype, tile_m, tile, archs))
    # sm_90's TMA candidate at the default 128 x 128 tile on the block's big GEMMs (forward, dx, dW), and
    # the 128 x 256 candidates (TMA or not) on its forward GEMMs, in bf16 at batch 256. (At 128 x 256, fc2's
    # dx GEMM, which forms GELU's gradient in its epilogue, still spills ~100 bytes on sm_90, and every
    # fused GEMM 8-90 bytes on sm_80: those stay candidates for the measurement to judge.)
    wide = [c for c in _CANDIDATES_16 if c["BLOCK_N"] == 256]
    tma_tile = next(c for c in _CANDIDATES_16 if c["TMA"] and c["BLOCK_N"] == 128)
    for label, tiles in (("LN(handed-on stats)->fc1+bias+gelu", [tma_tile, *wide]),
                         ("proj/fc2+bias+residual", [tma_tile, *wide]), ("LN(handed-on stats)->qkv+bias", wide),
                         ("dx into gelu's input", [tma_tile]), ("dW+db", [tma_tile])):  # fmt: skip
        used, flags = uses[label]
        for tile in tiles:
            name = f"{label} {'TMA ' if tile['TMA'] else ''}{tile['BLOCK_M']}x{tile['BLOCK_N']}"
            configs.append(_gemm_config(name, used, flags, torch.bfloat16, 50432, tile, (90,)))
    return configs
