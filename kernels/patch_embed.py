"""Patch embedding as one implicit-im2col GEMM, with timm's class / register tokens and position embedding
written by the same launch; its backward as two more launches of the same kernel.

With P the patch size, a (GH, GW) grid of N = GH * GW patches, K = C * P * P and the im2col matrix
X[(b, ph, pw), (c, i, j)] = images[b, c, ph * P + i, pw * P + j] (never stored: gathered in the loads),

    forward   tokens[b, prefix + n, :] = X[(b, n), :] W^T + bias + pos[n']          M = B*N, N = D, K = C*P*P
              tokens[b, t, :]          = token_t + pos[t]  (t < prefix)
    dW        dW = dY_p^T X                (D, C*P*P), reduced over all B*N patches   M = D, N = C*P*P, K = B*N
    dimages   dX = dY_p W, scattered back to pixels                                   M = B*N, N = C*P*P, K = D

where W is the Conv2d weight (D, C, P, P) read as (D, C*P*P) (its flattening order is (c, i, j)), dY_p the
patch rows of the token gradient, token_t the class token then the register tokens, n' = prefix + n with
pos on the prefix rows (timm's default), n' = n and no pos on the prefix rows with no_embed_class=True.

Design:
- One GEMM kernel serves all three products. Each GEMM dimension counts patches, pixels-in-a-patch or
  embedding channels (a constexpr KIND per operand dimension: KIND_A_M, KIND_A_K, KIND_B_K, KIND_B_N,
  KIND_C_M, KIND_C_N), and every operand addresses a dimension through three
  strides applied to the index's digits: a patch index (b, ph, pw), a pixel index (c, i, j), a channel d.
  So NCHW, channels-last or any strided images, the weight as stored, the token tensor and its gradient
  are all read and written in place: no im2col buffer, no transposed copy, no cast copy (operands are
  converted to DOT_DTYPE after loading, so fp32 images under bf16 autocast are read once, as fp32). One
  exception: dimages is always written NCHW, then copied to channels-last when the images are (the
  element-by-element channels-last scatter spills registers at every tile size tried).
- The forward's grid has extra programs after the GEMM tiles that write the B * prefix class / register
  rows (token + pos), so the whole token tensor comes from one launch.
- dW splits the long B*N reduction over SPLIT programs per output tile (the (D, C*P*P) output alone has
  too few tiles to fill an H200); each writes its own fp32 slice of a (SPLIT, D, C*P*P) buffer and the
  launcher sums the slices: deterministic, no atomics, so reruns are bitwise equal. dbias, dpos, dcls and
  dreg come from one fp32 batch-sum of the token gradient (dbias = the patch rows of that sum, summed).
- Accumulation in fp32; fp32 operands use input_precision "ieee" unless torch allows TF32; offsets int64.
- Configs: @triton.autotune over a few tile shapes on CUDA (every output element is overwritten, so
  re-running a config is harmless); a fixed config under the interpreter and during CUDA-graph capture.
  Three candidate tables (_CUDA_CONFIGS): 16-bit dots whose image pixels vectorise (128 x 128 tiles), 16-bit
  dots whose pixels are gathered element by element (P = 14, channels-last: 64 x 64 tiles) and IEEE fp32
  (64 x 64). On sm_90 tl.dot lowers to wgmma (HGMMA), on sm_80 to mma.sync (HMMA); every candidate compiles
  for both with 0 spills (compile_configs(), which passes the JIT's multiple-of-16 hints on the integers).

Caution: the gathered operand is loaded element by element (Triton cannot prove the digit-decomposed
offsets contiguous), which costs load instructions, not bandwidth; the layer is ~1% of a ViT's FLOPs.
Limits: H, W multiples of P (checked by fastvit.ops.patch_embed); B*N and C*P*P below 2^31.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ._helpers import (TORCH_TO_TRITON_DTYPE, KernelConfig, device_context, dot_precision, is_interpreter,
                       launch_autotuned, new_output, on_gpu, picks_record)

# What a GEMM dimension counts, which fixes how its index splits into digits (see _offsets).
PATCH = tl.constexpr(0)  # index = (b * GH + ph) * GW + pw
PIXEL = tl.constexpr(1)  # index = (c * P + i) * P + j
CHANNEL = tl.constexpr(2)  # index = d


@triton.jit
def _offsets(idx, KIND: tl.constexpr, GH, GW, P: tl.constexpr, stride_0, stride_1, stride_2):
    """int64 memory offsets of the indices `idx` (int32, 1-D) of one GEMM dimension:
    digit_0 * stride_0 + digit_1 * stride_1 + digit_2 * stride_2, with the digits of KIND's index."""
    if KIND == CHANNEL:
        offsets = idx.to(tl.int64) * stride_0
    else:
        if KIND == PATCH:
            radix_1 = GH
            radix_2 = GW
        else:
            radix_1 = P
            radix_2 = P
        digit_2 = idx % radix_2
        digit_1 = (idx // radix_2) % radix_1
        digit_0 = idx // radix_2 // radix_1
        offsets = digit_0.to(tl.int64) * stride_0 + digit_1.to(tl.int64) * stride_1 + digit_2.to(tl.int64) * stride_2
    return offsets


@triton.jit
def _prefix_tile(
    C,  # token tensor's patch rows: tokens[:, prefix:, :]; the prefix rows lie before them
    Pos,  # pos_embed rows of the patches (contiguous, D columns), or None
    Cls,  # (D,) contiguous class token, or None
    Reg,  # (R, D) contiguous register tokens, or None
    tile,
    stride_c_b,
    stride_c_t,
    stride_c_d,
    num_rows,  # B * PREFIX
    D,
    PREFIX: tl.constexpr,
    HAS_CLS: tl.constexpr,
    POS_ON_PREFIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """tokens[b, t, :] = token_t (+ pos[t]) for a BLOCK_M x BLOCK_N tile of the B * PREFIX prefix rows."""
    if PREFIX == 0:  # no prefix programs are launched; this keeps `rows % PREFIX` out of the compiled code
        return
    num_tiles_n = tl.cdiv(D, BLOCK_N)
    rows = (tile // num_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % num_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    t = rows % PREFIX  # token position; negative offsets below reach back from the patch rows
    b = (rows // PREFIX).to(tl.int64)

    value = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_CLS:
        value += tl.load(Cls + cols[None, :] + 0 * t[:, None], mask=mask & (t == 0)[:, None], other=0.0).to(tl.float32)
    if PREFIX > HAS_CLS:
        reg_row = tl.maximum(t - HAS_CLS, 0).to(tl.int64)
        value += tl.load(Reg + reg_row[:, None] * D + cols[None, :], mask=mask & (t >= HAS_CLS)[:, None],
                         other=0.0).to(tl.float32)  # fmt: skip
    if POS_ON_PREFIX:
        value += tl.load(Pos + (t - PREFIX).to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = C + b[:, None] * stride_c_b + (t - PREFIX).to(tl.int64)[:, None] * stride_c_t + cols[None, :] * stride_c_d
    tl.store(out, value.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tile(
    C, A, B, Bias, Pos,
    tile,
    stride_a_m0, stride_a_m1, stride_a_m2, stride_a_k0, stride_a_k1, stride_a_k2,
    stride_b_k0, stride_b_k1, stride_b_k2, stride_b_n0, stride_b_n1, stride_b_n2,
    stride_c_m0, stride_c_m1, stride_c_m2, stride_c_n0, stride_c_n1, stride_c_n2, stride_c_split,
    M, N, K, GH, GW,
    KIND_A_M: tl.constexpr, KIND_A_K: tl.constexpr, KIND_B_K: tl.constexpr, KIND_B_N: tl.constexpr,
    KIND_C_M: tl.constexpr, KIND_C_N: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M x BLOCK_N tile of C = A @ B over this program's slice of K (+ bias + pos)."""
    # grouped ordering: GROUP_M row-blocks walk the column-blocks together, so their A/B tiles stay in L2
    num_tiles_m = tl.cdiv(M, BLOCK_M)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * num_tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (tile % (GROUP_M * num_tiles_n)) % group_size
    tile_n = (tile % (GROUP_M * num_tiles_n)) // group_size

    # this program's slice of K: num_programs(1) slices, each a whole number of BLOCK_K steps (maybe none)
    split = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, tl.num_programs(1)), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = A + _offsets(offs_m, KIND_A_M, GH, GW, P, stride_a_m0, stride_a_m1, stride_a_m2)[:, None]
    b_cols = B + _offsets(offs_n, KIND_B_N, GH, GW, P, stride_b_n0, stride_b_n1, stride_b_n2)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # max(., 1): a trip count provably >= 1 keeps triton 3.6's wgmma asynchronous (kernels/linear.py
    # explains); an empty slice then runs one fully masked step, which adds 0
    for k_offset in range(0, tl.maximum(k_end - k_start, 1), BLOCK_K):
        offs_k = tl.multiple_of(k_start + k_offset, BLOCK_K) + tl.arange(0, BLOCK_K)  # k_start: a multiple too
        mask_k = offs_k < K  # slices end on a BLOCK_K boundary or at K, so only K cuts a step short
        a_k = _offsets(offs_k, KIND_A_K, GH, GW, P, stride_a_k0, stride_a_k1, stride_a_k2)
        b_k = _offsets(offs_k, KIND_B_K, GH, GW, P, stride_b_k0, stride_b_k1, stride_b_k2)
        a = tl.load(a_rows + a_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + b_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:  # forward only: M counts patches, and patch n of every image adds pos row n
        pos_rows = (offs_m % (GH * GW)).to(tl.int64) * N
        acc += tl.load(Pos + pos_rows[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    c_rows = _offsets(offs_m, KIND_C_M, GH, GW, P, stride_c_m0, stride_c_m1, stride_c_m2)
    c_cols = _offsets(offs_n, KIND_C_N, GH, GW, P, stride_c_n0, stride_c_n1, stride_c_n2)
    c = C + split * stride_c_split + c_rows[:, None] + c_cols[None, :]
    tl.store(c, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_kernel(
    C,  # output: tokens[:, prefix:] (forward), (SPLIT, D, C*P*P) fp32 slices (dW) or dimages (dX)
    A,  # (M, K) operand: images (forward), the token gradient's patch rows, transposed (dW) or not (dX)
    B,  # (K, N) operand: weight (D, C, P, P) read as W^T (forward) or W (dX); images (dW)
    Bias,  # (N,) contiguous, or None
    Pos,  # pos_embed rows of the patches, contiguous rows of N values, or None
    Cls,  # (N,) contiguous class token, or None (forward only)
    Reg,  # (R, N) contiguous register tokens, or None (forward only)
    stride_a_m0, stride_a_m1, stride_a_m2,  # A's strides for the three digits of an M index
    stride_a_k0, stride_a_k1, stride_a_k2,  # ... of a K index
    stride_b_k0, stride_b_k1, stride_b_k2,
    stride_b_n0, stride_b_n1, stride_b_n2,
    stride_c_m0, stride_c_m1, stride_c_m2,
    stride_c_n0, stride_c_n1, stride_c_n2,
    stride_c_split,  # between dW's fp32 slices (0 elsewhere)
    M, N, K,
    GH, GW,  # patch grid
    num_prefix_rows,  # B * PREFIX
    KIND_A_M: tl.constexpr, KIND_A_K: tl.constexpr,  # PATCH / PIXEL / CHANNEL: how each operand
    KIND_B_K: tl.constexpr, KIND_B_N: tl.constexpr,  # splits an index into digits (CHANNEL = one flat
    KIND_C_M: tl.constexpr, KIND_C_N: tl.constexpr,  # stride, also for patch or pixel dims laid out flat)
    P: tl.constexpr,  # patch size
    PREFIX: tl.constexpr,  # class + register tokens, written by the programs after the GEMM tiles
    HAS_CLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    POS_ON_PREFIX: tl.constexpr,  # timm's default order: pos_embed also has rows for the prefix tokens
    DOT_DTYPE: tl.constexpr,  # tl.float32 / tl.float16 / tl.bfloat16: the weight's dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 operands only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C = A @ B (+ bias + pos) with every operand gathered through per-digit strides (module docstring).

    Axis 0: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) GEMM tiles, then (forward with PREFIX > 0 only)
    cdiv(B * PREFIX, BLOCK_M) * cdiv(N, BLOCK_N) prefix-row tiles. Axis 1: the K split (dW only).
    """
    tile = tl.program_id(0)
    num_gemm_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if tile >= num_gemm_tiles:
        # tokens' patch rows: an M index's digits (b, ph, pw) have strides (batch, GW * token, token)
        _prefix_tile(C, Pos, Cls, Reg, tile - num_gemm_tiles, stride_c_m0, stride_c_m2, stride_c_n0, num_prefix_rows,
                     N, PREFIX, HAS_CLS, POS_ON_PREFIX, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        _gemm_tile(
            C, A, B, Bias, Pos, tile,
            stride_a_m0, stride_a_m1, stride_a_m2, stride_a_k0, stride_a_k1, stride_a_k2,
            stride_b_k0, stride_b_k1, stride_b_k2, stride_b_n0, stride_b_n1, stride_b_n2,
            stride_c_m0, stride_c_m1, stride_c_m2, stride_c_n0, stride_c_n1, stride_c_n2, stride_c_split,
            M, N, K, GH, GW, KIND_A_M, KIND_A_K, KIND_B_K, KIND_B_N, KIND_C_M, KIND_C_N, P,
            HAS_BIAS, HAS_POS, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Under the interpreter every program costs milliseconds: small tiles, and tests reach every ragged branch.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
# Candidates on CUDA, per operand class (_Launch.table); the first of each list is the CUDA-graph default. Every
# one compiles for sm_90 (HGMMA) and sm_80 (HMMA) with 0 spills at the shapes of compile_configs(), with triton 3.6
# and 3.8 (3.6 spilled 64 x 64 x 16 with 4 warps), so one table serves both archs.
# - "16-bit": fp16 / bf16 dots whose image operand comes in unit-stride runs of a multiple of 16 pixels (NCHW
#   with P = 16 or 32): the gathers vectorise and 128 x 128 tiles fit the registers.
# - "16-bit gathered": shorter or strided pixel runs (P = 14's 14-pixel rows, channels-last's C-strided pixels)
#   load element by element, each element with its own 64-bit address: 64 x 64 tiles keep those in registers.
# - "fp32": IEEE fp32 dots run on the FMA units, holding operand slices in registers: 64 x 64 tiles.
_CUDA_CONFIGS = {
    "16-bit": [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ],
    "16-bit gathered": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ],
}
# every constexpr that is not a tile size, so a pick is never reused across fusions or dot precision
_AUTOTUNE_KEY = ["M", "N", "K", "KIND_A_M", "KIND_A_K", "KIND_B_K", "KIND_B_N", "KIND_C_M", "KIND_C_N", "P",
                 "PREFIX", "HAS_CLS", "HAS_BIAS", "HAS_POS", "POS_ON_PREFIX", "DOT_DTYPE", "DOT_PRECISION"]  # fmt: skip
_AUTOTUNED = {table: triton.autotune(configs, key=_AUTOTUNE_KEY)(_patch_embed_kernel) for table, configs in _CUDA_CONFIGS.items()}
_picks = {}  # launch key -> the triton.Config autotuning picked (kernels/_helpers.launch_autotuned)


def tuning_record() -> list:
    """The tiles autotuning picked in this process, per candidate table and launch key
    (kernels/_helpers.picks_record); empty under the interpreter."""
    return picks_record(_picks)


def _patch_dim(stride_b, stride_ph, stride_pw, grid):
    """(kind, strides) of a patch dimension whose digits (b, ph, pw) step by these strides; CHANNEL (one
    flat stride) when the grid is laid out row-major without gaps, so Triton can see contiguous runs."""
    if stride_ph == grid[1] * stride_pw and stride_b == grid[0] * stride_ph:
        return CHANNEL, (stride_pw, 0, 0)
    return PATCH, (stride_b, stride_ph, stride_pw)


def _pixel_dim(stride_c, stride_i, stride_j, P):
    """(kind, strides) of a pixel-in-patch dimension (c, i, j); flat like _patch_dim when it can be."""
    if stride_i == P * stride_j and stride_c == P * stride_i:
        return CHANNEL, (stride_j, 0, 0)
    return PIXEL, (stride_c, stride_i, stride_j)


def _image_dims(images, P, grid):
    """An image tensor's patch and pixel dimensions, for any strides (NCHW, channels-last, views)."""
    s_b, s_c, s_h, s_w = images.stride()
    return _patch_dim(s_b, P * s_h, P * s_w, grid), _pixel_dim(s_c, s_h, s_w, P)


def _token_patch_dim(tokens, prefix, grid):
    """The patch dimension of a (B, prefix + N, D) token tensor (patch rows start at row `prefix`)."""
    s_b, s_t, _ = tokens.stride()
    return _patch_dim(s_b, grid[1] * s_t, s_t, grid)


@dataclasses.dataclass
class _Launch:
    """One _patch_embed_kernel launch before its tile config is chosen (compile_configs() reads these too)."""

    args: dict  # runtime argument name -> tensor, int or None
    constexprs: dict  # everything but the tile config
    M: int
    N: int
    num_prefix_rows: int
    split: int
    gathered: bool  # an image operand's pixels come in runs too short or strided to vectorise

    def grid(self, meta):
        tiles_n = triton.cdiv(self.N, meta["BLOCK_N"])
        return (triton.cdiv(self.M, meta["BLOCK_M"]) + triton.cdiv(self.num_prefix_rows, meta["BLOCK_M"])) * tiles_n, self.split

    def candidates(self):
        """The CUDA configs to choose from for this launch's dot dtype."""
        return _CUDA_CONFIGS[self.table]

    @property
    def table(self):
        """The key of this launch's candidates in _CUDA_CONFIGS."""
        if self.constexprs["DOT_DTYPE"] == tl.float32:
            return "fp32"
        return "16-bit gathered" if self.gathered else "16-bit"

    def run(self):
        """Under the interpreter with its fixed config; on CUDA autotuned, where timing is not allowed
        (a CUDA-graph capture, FASTVIT_AUTOTUNE=0) with the pick made earlier for the same launch, else
        the table's first candidate (kernels/_helpers.launch_autotuned)."""
        with device_context(self.args["C"]):
            if is_interpreter():
                config = _INTERPRETER_CONFIG
                _patch_embed_kernel[self.grid(config.kwargs)](**self.args, **self.constexprs, **config.all_kwargs())
                return
            tensors = tuple(str(t.dtype) for t in self.args.values() if isinstance(t, torch.Tensor))
            sizes = tuple(v for v in self.args.values() if isinstance(v, int))
            key = (f"patch_embed {self.table}", tensors, sizes, tuple(sorted(self.constexprs.items())))
            launch_autotuned(_AUTOTUNED[self.table], self.grid, (), {**self.args, **self.constexprs}, key, _picks,
                             self.candidates()[0])  # fmt: skip


def _plan(C, A, B, dims, sizes, *, bias=None, pos=None, cls=None, reg=None, prefix=0, pos_on_prefix=False,
          num_prefix_rows=0, split=1, stride_c_split=0, dot_dtype, P):  # fmt: skip
    """A _Launch of C = A @ B. dims: (kind, strides) of A's M and K, B's K and N, C's M and N dimensions,
    in that order; sizes: (M, N, K, GH, GW)."""
    M, N, K, GH, GW = sizes
    args = dict(C=C, A=A, B=B, Bias=bias, Pos=pos, Cls=cls, Reg=reg)
    constexprs = {}
    for operand_dim, (kind, strides) in zip(("a_m", "a_k", "b_k", "b_n", "c_m", "c_n"), dims):
        args.update({f"stride_{operand_dim}{digit}": stride for digit, stride in enumerate(strides)})
        constexprs[f"KIND_{operand_dim.upper()}"] = kind.value
    args.update(stride_c_split=stride_c_split, M=M, N=N, K=K, GH=GH, GW=GW, num_prefix_rows=num_prefix_rows)
    constexprs.update(
        P=P, PREFIX=prefix, HAS_CLS=cls is not None, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        POS_ON_PREFIX=pos_on_prefix, DOT_DTYPE=_TL_DTYPE[dot_dtype], DOT_PRECISION=dot_precision(dot_dtype),
    )  # fmt: skip
    # pixel digits (c, i, j) vectorise when j has unit stride and runs a multiple of 16 elements
    gathered = any(kind.value == PIXEL.value and (strides[2] != 1 or P % 16) for kind, strides in dims)
    return _Launch(args, constexprs, M, N, num_prefix_rows, split, gathered)


def _forward_launch(tokens, images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
    B, _, H, W = images.shape
    D, C, P, _ = weight.shape
    grid = (H // P, W // P)
    prefix = tokens.shape[1] - grid[0] * grid[1]
    pos_rows = None
    if pos_embed is not None:  # the patches' rows; with pos on the prefix, the prefix rows lie just before
        pos_rows = pos_embed.contiguous()[0, (0 if no_embed_class else prefix):]
    dims = (*_image_dims(images, P, grid), _pixel_dim(*weight.stride()[1:], P), (CHANNEL, (weight.stride(0), 0, 0)),
            _token_patch_dim(tokens, prefix, grid), (CHANNEL, (tokens.stride(2), 0, 0)))  # fmt: skip
    return _plan(
        tokens[:, prefix:], images, weight, dims, (B * grid[0] * grid[1], D, C * P * P, *grid),
        bias=None if bias is None else bias.contiguous(), pos=pos_rows,
        cls=None if cls_token is None else cls_token.contiguous(),
        reg=None if reg_tokens is None else reg_tokens.contiguous(),
        prefix=prefix, pos_on_prefix=pos_embed is not None and not no_embed_class, num_prefix_rows=B * prefix,
        dot_dtype=weight.dtype, P=P,
    )  # fmt: skip


def _dimages_launch(dimages, dtokens, weight, prefix):
    B, C, H, W = dimages.shape
    D, _, P, _ = weight.shape
    grid = (H // P, W // P)
    dims = (_token_patch_dim(dtokens, prefix, grid), (CHANNEL, (dtokens.stride(2), 0, 0)),
            (CHANNEL, (weight.stride(0), 0, 0)), _pixel_dim(*weight.stride()[1:], P), *_image_dims(dimages, P, grid))  # fmt: skip
    sizes = (B * grid[0] * grid[1], C * P * P, D, *grid)
    return _plan(dimages, dtokens[:, prefix:], weight, dims, sizes, dot_dtype=weight.dtype, P=P)


def _dweight_launch(partial, dtokens, images, weight, prefix):
    B, _, H, W = images.shape
    D, C, P, _ = weight.shape
    grid = (H // P, W // P)
    split, KK = partial.shape[0], C * P * P
    image_patch_dim, image_pixel_dim = _image_dims(images, P, grid)
    dims = ((CHANNEL, (dtokens.stride(2), 0, 0)), _token_patch_dim(dtokens, prefix, grid), image_patch_dim,
            image_pixel_dim, (CHANNEL, (KK, 0, 0)), (CHANNEL, (1, 0, 0)))  # fmt: skip
    sizes = (D, KK, B * grid[0] * grid[1], *grid)
    return _plan(partial, dtokens[:, prefix:], images, dims, sizes, split=split, stride_c_split=D * KK,
                 dot_dtype=weight.dtype, P=P)  # fmt: skip


def patch_embed_forward(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class, out_dtype):
    """Tokens of timm's ViT stem (see fastvit.ops.patch_embed for the semantics).

    images: (B, C, H, W), any strides and float dtype, H and W multiples of P; weight: (D, C, P, P), any
    strides, its dtype is the dot's (images are converted to it while loading); bias: (D,) or None;
    pos_embed: (1, L, D) or None, L = N + (0 if no_embed_class else prefix); cls_token: (1, 1, D) or None;
    reg_tokens: (1, R, D) or None. Returns tokens (B, prefix + N, D), contiguous, in out_dtype.
    """
    B, _, H, W = images.shape
    D, _, P, _ = weight.shape
    prefix = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
    tokens = new_output((B, prefix + (H // P) * (W // P), D), out_dtype, images.device)
    if B > 0:
        _forward_launch(tokens, images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class).run()
    return tokens


def _dweight_split(D, KK, rows, device):
    """How many programs share each dW tile's reduction over the B*N patch rows: about two waves of
    programs on the GPU, each with >= 8 steps of 64 rows; two under the interpreter, so tests cover it."""
    if not on_gpu(device):
        return 2
    tiles = triton.cdiv(D, 128) * triton.cdiv(KK, 128)
    waves = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(waves // tiles, triton.cdiv(rows, 512)))


def images_grad_is_channels_last(images):
    """Whether dimages is allocated channels-last: exactly when the images are (and not also NCHW)."""
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def patch_embed_backward(dtokens, images, weight, prefix, compute_dimages, compute_dweight):
    """Gradients of patch_embed_forward, given dtokens (B, prefix + N, D) with any strides.

    Returns (dimages, dweight, dtokens_sum): dimages (B, C, H, W) in images' dtype and memory format
    (channels-last stays channels-last) or None; dweight (D, C, P, P) in weight's dtype or None; and
    dtokens_sum (prefix + N, D) fp32, dtokens summed over the batch, from which the caller takes dcls
    (row 0), dreg, dpos (all rows, or the patch rows with no_embed_class) and dbias (patch rows summed).
    """
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    dimages = None
    if compute_dimages:
        # always written NCHW: a channels-last scatter is element by element (C-strided pixel runs) and spills
        # past 255 registers at any tile size; one copy of dimages into channels-last is far cheaper
        dimages = new_output((B, C, H, W), images.dtype, images.device)
        if B > 0:
            _dimages_launch(dimages, dtokens, weight, prefix).run()
        if images_grad_is_channels_last(images):
            dimages = dimages.contiguous(memory_format=torch.channels_last)

    dweight = None
    if compute_dweight:
        rows = B * (H // P) * (W // P)
        partial = new_output((_dweight_split(D, C * P * P, rows, images.device), D, C * P * P), torch.float32,
                             images.device)  # fmt: skip
        if B > 0:
            _dweight_launch(partial, dtokens, images, weight, prefix).run()
        else:
            partial.zero_()
        dweight = partial.sum(0).view(D, C, P, P).to(weight.dtype)
    return dimages, dweight, dtokens.sum(0, dtype=torch.float32)


def _production_launches(dtype, P=16, image_dtype=None, channels_last=False, reg=0, no_embed_class=False):
    """The forward, dW and dX launches of ViT-B's stem (B = 256, 224 x 224 images, D = 768) on meta tensors."""
    meta = dict(device="meta")
    images = torch.empty(256, 3, 224, 224, dtype=image_dtype or dtype, **meta)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    weight = torch.empty(768, 3, P, P, dtype=dtype, **meta)
    grid = (224 // P, 224 // P)
    prefix = 1 + reg
    out_dtype = torch.promote_types(dtype, images.dtype)
    tokens = torch.empty(256, prefix + grid[0] * grid[1], 768, dtype=out_dtype, **meta)
    pos = torch.empty(1, grid[0] * grid[1] + (0 if no_embed_class else prefix), 768, dtype=out_dtype, **meta)
    cls = torch.empty(1, 1, 768, dtype=out_dtype, **meta)
    regs = torch.empty(1, reg, 768, dtype=out_dtype, **meta) if reg else None
    bias = torch.empty(768, dtype=dtype, **meta)
    partial = torch.empty(7, 768, 3 * P * P, dtype=torch.float32, **meta)
    return {
        "fwd": _forward_launch(tokens, images, weight, bias, pos, cls, regs, no_embed_class),
        "dW": _dweight_launch(partial, tokens, images, weight, prefix),
        "dX": _dimages_launch(torch.empty(images.shape, dtype=images.dtype, **meta), tokens, weight, prefix),  # NCHW
    }


def _kernel_config(label, launch, config):
    """The KernelConfig of one launch under one tile config, typed as the JIT specialises it."""
    types, constexprs = {}, dict(launch.constexprs, **config.kwargs)
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor):
            types[name] = "*" + TORCH_TO_TRITON_DTYPE[value.dtype]
        elif value is None or value == 1:  # Triton's launcher specialises None and ints equal to 1
            constexprs[name] = value
        else:  # and marks the integers that are multiples of 16 (tt.divisibility): so must we
            types[name] = "i32:16" if value % 16 == 0 else "i32"
    tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return KernelConfig(_patch_embed_kernel, "gemm", f"{label} {tiles} w{config.num_warps} s{config.num_stages}",
                        types, constexprs, num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip


def compile_configs():
    """ViT-B's stem at 224 (forward with a class token, dW, dX; B = 256): every CUDA candidate for bf16 with
    P = 16, P = 14 and channels-last images (the gathered table) and for fp32 (IEEE), and the default config
    for fp16, bf16 autocast on fp32 images, register tokens with no_embed_class and P = 32. Built from the
    launchers' own plans on meta tensors, so the kinds, strides, dtypes, divisibility hints and tables are
    exactly what the launchers pass and pick."""
    every_candidate = {
        "bf16": dict(dtype=torch.bfloat16),
        "bf16 P=14": dict(dtype=torch.bfloat16, P=14),
        "bf16 channels-last": dict(dtype=torch.bfloat16, channels_last=True),
        "fp32": dict(dtype=torch.float32),
    }
    default_only = {
        "fp16": dict(dtype=torch.float16),
        "bf16 autocast (fp32 images)": dict(dtype=torch.bfloat16, image_dtype=torch.float32),
        "bf16 reg=4 no_embed_class": dict(dtype=torch.bfloat16, reg=4, no_embed_class=True),
        "bf16 P=32": dict(dtype=torch.bfloat16, P=32),
    }
    configs = []
    for variants, every in ((every_candidate, True), (default_only, False)):
        for label, variant in variants.items():
            for mode, launch in _production_launches(**variant).items():
                candidates = launch.candidates() if every else launch.candidates()[:1]
                configs += [_kernel_config(f"{mode} {label}", launch, config) for config in candidates]
    return configs
