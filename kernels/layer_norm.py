"""LayerNorm forward and backward over the last dimension.

    y = (x - mean) * rstd * w + b,          mean = sum(x) / D,   rstd = 1 / sqrt(sum((x - mean)^2) / D + eps)

Backward (the VJP, with xhat = (x - mean) * rstd and g = w * dy):

    dx = rstd * (g - (xhat * c1 + c2)),     c1 = sum(xhat * g) / D,   c2 = sum(g) / D
    dw = sum_rows(dy * xhat),               db = sum_rows(dy)

Design:
- Each program owns BLOCK_M whole rows (a [BLOCK_M, BLOCK_D] register tile), so the row statistics are
  in-register reductions and x is read exactly once; mean and variance are two passes over registers,
  which keeps large-mean inputs (mean >> std) exact where a one-pass E[x^2] - E[x]^2 would cancel.
- All arithmetic in fp32; mean and rstd are saved in fp32 for the backward; y is cast once on store.
- dw / db are deterministic: each backward program walks a contiguous chunk of rows, accumulates its
  partial sums in fp32 registers and writes one row of a (num_programs, D) fp32 buffer; the launcher
  reduces that buffer with one .sum(0). No atomics, so reruns are bitwise equal.
- Row offsets are computed in int64 (row * stride overflows int32 beyond 2^31 elements).

Limits: 1 <= D <= MAX_D (one row must fit in registers); the last dim must have stride 1 (rows may have
any stride). x, y, w, b may be fp32 / fp16 / bf16 independently; statistics are always fp32.
"""
import torch
import triton
import triton.language as tl

from ._helpers import device_context, new_output, on_gpu

MAX_D = 8192


@triton.jit
def _layer_norm_fwd_kernel(
    Y,  # (M, D) output, row stride stride_y_row
    Mean,  # (M,) fp32 output
    Rstd,  # (M,) fp32 output
    X,  # (M, D) input, row stride stride_x_row
    W,  # (D,) weight, or None when not HAS_WEIGHT
    B,  # (D,) bias, or None when not HAS_BIAS
    stride_y_row,
    stride_x_row,
    M,
    D,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    x_centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(x_centered * x_centered, axis=1) / D + eps)
    y = x_centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DX,  # (M, D) output, row stride stride_dx_row
    DW_partial,  # (num_programs, D) fp32 output: this program's sum of dy * xhat, or None
    DB_partial,  # (num_programs, D) fp32 output: this program's sum of dy, or None
    DY,  # (M, D) upstream gradient, row stride stride_dy_row
    X,  # (M, D) forward input, row stride stride_x_row
    W,  # (D,) weight, or None when not HAS_WEIGHT
    Mean,  # (M,) fp32 from the forward
    Rstd,  # (M,) fp32 from the forward
    stride_dx_row,
    stride_dy_row,
    stride_x_row,
    M,
    D,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)

        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)

        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.sum(x_hat * g, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if COMPUTE_DW:
            dw_acc += dy * x_hat
        if COMPUTE_DB:
            db_acc += dy

    if COMPUTE_DW:
        tl.store(DW_partial + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_partial + pid * D + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _config(D: int):
    """(BLOCK_M, BLOCK_D, num_warps): a register tile of about 4K fp32 elements per program.

    Short rows (ViT's D = 192..1280) share a program so each launch moves enough bytes; long rows get one
    program each and more warps, keeping ~16 fp32 values per thread per live tile (no spills up to MAX_D).
    """
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = min(16, max(4, block_m * block_d // 512))
    return block_m, block_d, num_warps


def _backward_grid(M: int, block_m: int, device: torch.device):
    """(num_programs, rows_per_program) for the backward: enough programs to fill the GPU a few times
    over, each owning a contiguous, BLOCK_M-aligned chunk of rows (few programs under the interpreter,
    where each program costs milliseconds)."""
    if on_gpu(device):
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    rows_per_program = triton.cdiv(triton.cdiv(M, target), block_m) * block_m
    return triton.cdiv(M, rows_per_program), rows_per_program


def layer_norm_forward(x, weight, bias, eps, out_dtype=None):
    """LayerNorm over the last dim of a 2-D x.

    x: (M, D), x.stride(1) == 1; weight, bias: (D,) or None; out_dtype defaults to x.dtype.
    Returns y (M, D) contiguous in out_dtype, mean (M,) fp32, rstd (M,) fp32.
    """
    M, D = x.shape
    block_m, block_d, num_warps = _config(D)
    y = new_output((M, D), out_dtype or x.dtype, x.device)
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    if M == 0:
        return y, mean, rstd
    with device_context(x):
        _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
            y, mean, rstd, x, weight, bias,
            y.stride(0), x.stride(0), M, D, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, compute_dweight=True, compute_dbias=True, dx_dtype=None):
    """Gradients of layer_norm_forward.

    dy, x: (M, D) with unit last-dim stride; weight: (D,) or None; mean, rstd: (M,) fp32.
    Returns dx (M, D) in dx_dtype (default x.dtype), dweight (D,) and dbias (D,) in weight's dtype
    (fp32 when weight is None), each None when not requested.
    """
    M, D = x.shape
    block_m, block_d, num_warps = _config(D)
    dx = new_output((M, D), dx_dtype or x.dtype, x.device)
    param_dtype = weight.dtype if weight is not None else torch.float32
    if M == 0:
        zeros = torch.zeros(D, dtype=param_dtype, device=x.device)
        return dx, (zeros if compute_dweight else None), (zeros.clone() if compute_dbias else None)

    num_programs, rows_per_program = _backward_grid(M, block_m, x.device)
    dw_partial = new_output((num_programs, D), torch.float32, x.device) if compute_dweight else None
    db_partial = new_output((num_programs, D), torch.float32, x.device) if compute_dbias else None
    with device_context(x):
        _layer_norm_bwd_kernel[(num_programs,)](
            dx, dw_partial, db_partial, dy, x, weight, mean, rstd,
            dx.stride(0), dy.stride(0), x.stride(0), M, D, rows_per_program,
            HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dweight, COMPUTE_DB=compute_dbias,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    dweight = dw_partial.sum(0).to(param_dtype) if compute_dweight else None
    dbias = db_partial.sum(0).to(param_dtype) if compute_dbias else None
    return dx, dweight, dbias


def compile_configs():
    """The configs the launchers pick for ViT widths (S 384, B 768, L 1024, H 1280) and MAX_D."""
    from ._helpers import KernelConfig

    configs = []
    for D in (384, 768, 1024, 1280, MAX_D):
        block_m, block_d, num_warps = _config(D)
        for dtype in ("bf16", "fp32"):
            shapes = {"BLOCK_M": block_m, "BLOCK_D": block_d}
            configs.append(KernelConfig(
                _layer_norm_fwd_kernel, "rowwise", f"fwd D={D} {dtype}",
                types={"Y": f"*{dtype}", "Mean": "*fp32", "Rstd": "*fp32", "X": f"*{dtype}", "W": f"*{dtype}",
                       "B": f"*{dtype}", "stride_y_row": "i32:16", "stride_x_row": "i32:16", "M": "i32", "D": "i32:16",
                       "eps": "fp32"},
                constexprs={"HAS_WEIGHT": True, "HAS_BIAS": True, **shapes}, num_warps=num_warps,
            ))  # fmt: skip
            configs.append(KernelConfig(
                _layer_norm_bwd_kernel, "rowwise", f"bwd D={D} {dtype}",
                types={"DX": f"*{dtype}", "DW_partial": "*fp32", "DB_partial": "*fp32", "DY": f"*{dtype}",
                       "X": f"*{dtype}", "W": f"*{dtype}", "Mean": "*fp32", "Rstd": "*fp32", "stride_dx_row": "i32:16",
                       "stride_dy_row": "i32:16", "stride_x_row": "i32:16", "M": "i32", "D": "i32:16",
                       "rows_per_program": "i32:16"},
                constexprs={"HAS_WEIGHT": True, "COMPUTE_DW": True, "COMPUTE_DB": True, **shapes},
                num_warps=num_warps,
            ))  # fmt: skip
    return configs
