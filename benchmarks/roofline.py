"""The roofline model of every benchmarked kernel: floating-point operations and compulsory HBM bytes
(each input read once, each output written once) per call, and which ceiling binds on a given GPU.

Used by the benchmarks for TFLOP/s, GB/s and % of peak, and by `python benchmarks/roofline.py` which
prints the markdown tables of benchmarks/README.md (DESIGN.md section 6, recomputed, and what issue 6's
inference target asks of the GEMMs):

    python benchmarks/roofline.py [--peak-tflops 790] [--peak-gbps 4300]

The default peaks are the H200 figures measured on this project's lent machine (DESIGN.md section 6);
benchmarks never use them: they measure their own GPU's peaks in the same run.
"""
import argparse
import dataclasses

BF16 = 2


@dataclasses.dataclass(frozen=True)
class ViT:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch: int = 16
    img: int = 224
    classes: int = 1000
    mlp_ratio: int = 4

    @property
    def tokens(self):
        return (self.img // self.patch) ** 2 + 1

    @property
    def timm_name(self):
        return f"vit_{self.name}_patch{self.patch}_{self.img}"


VITS = {v.name: v for v in (ViT("small", 384, 12, 6), ViT("base", 768, 12, 12), ViT("large", 1024, 24, 16))}


# Per call: (flops, bytes). s = bytes per element of the activations / weights.


def layer_norm(M, D, s=BF16, backward=False):
    """Forward: read x, w, b, write y and fp32 mean/rstd. Backward adds: read x, dy, w, mean, rstd,
    write dx and fp32 partial dw/db (negligible)."""
    fwd_bytes = 2 * M * D * s + 2 * D * s + 8 * M
    bwd_bytes = 3 * M * D * s + D * s + 8 * M
    return (8 * M * D + (12 * M * D if backward else 0)), fwd_bytes + (bwd_bytes if backward else 0)


def attention(B, H, N, d, s=BF16, backward=False):
    """Flash attention: QK^T and PV are 2*N*N*d FLOPs each per head; the backward does 5 such products
    (2.5x the forward). Bytes: q, k, v, o and the fp32 LSE; the backward reads q, k, v, o, do, LSE and
    writes dq, dk, dv. No (N, N) tensor ever reaches memory."""
    fwd_flops = 4 * B * H * N * N * d
    fwd_bytes = 4 * B * H * N * d * s + 4 * B * H * N
    if not backward:
        return fwd_flops, fwd_bytes
    return fwd_flops * 3.5, fwd_bytes + 8 * B * H * N * d * s + 4 * B * H * N


def eager_attention_bytes(B, H, N, d, s=BF16):
    """Unfused attention also writes and re-reads the (B, H, N, N) scores and probabilities."""
    return attention(B, H, N, d, s)[1] + 4 * B * H * N * N * s


def linear(M, K, N, s=BF16, bias=True, residual=False, layer_norm=False):
    """y = [LN](x) W^T + b [+ residual]: 2MKN FLOPs; read x, W, b [, residual, ln w/b], write y."""
    elements = M * K + N * K + M * N + (N if bias else 0) + (M * N if residual else 0) + (2 * K if layer_norm else 0)
    return 2 * M * K * N, elements * s


def patch_embed(B, D, img, patch=16, C=3, s=BF16):
    """im2col GEMM + bias + pos-embed + cls row: read images, weight, bias, pos-embed, cls; write tokens."""
    n = (img // patch) ** 2
    elements = B * C * img * img + D * C * patch * patch + D + (n + 1) * D + D + B * (n + 1) * D
    return 2 * B * n * C * patch * patch * D, elements * s


def block_launches(vit: ViT, B, s=BF16):
    """The five fused launches of one block forward (DESIGN.md section 2) as (name, flops, bytes)."""
    M, D, N, H = B * vit.tokens, vit.embed_dim, vit.tokens, vit.num_heads
    hidden = vit.mlp_ratio * D
    return [
        ("LN1 + QKV GEMM", *linear(M, D, 3 * D, s, layer_norm=True)),
        ("flash attention", *attention(B, H, N, D // H, s)),
        ("proj GEMM + residual", *linear(M, D, D, s, residual=True)),
        ("LN2 + fc1 GEMM + GELU", *linear(M, D, hidden, s, layer_norm=True)),
        ("fc2 GEMM + residual", *linear(M, hidden, D, s, residual=True)),
    ]


def model_forward(vit: ViT, B, s=BF16):
    """(flops, fused bytes) of one forward: patch embed, depth blocks, final LN on the cls rows, head."""
    flops, nbytes = patch_embed(B, vit.embed_dim, vit.img, vit.patch, s=s)
    for _, f, b in block_launches(vit, B, s):
        flops, nbytes = flops + vit.depth * f, nbytes + vit.depth * b
    head_flops, head_bytes = linear(B, vit.embed_dim, vit.classes, s, layer_norm=True)
    return flops + head_flops, nbytes + head_bytes


def train_step_flops(vit: ViT, B):
    """Forward + backward = 3x the forward's FLOPs (the MFU convention)."""
    return 3 * model_forward(vit, B)[0]


def compiled_timm_extra_bytes(vit: ViT, B, s=BF16):
    """HBM bytes a torch.compile(timm) forward moves outside its GEMMs and attention. Inductor's default
    mode runs every Linear on cuBLAS (bias inside addmm) and cannot fuse a pointwise epilogue into it, so
    each block keeps two residual-add + LayerNorm kernels (read x and the branch, write their sum and its
    normalised copy) and GELU after fc1 (read and write the 4D-wide hidden activation)."""
    M, D = B * vit.tokens, vit.embed_dim
    return vit.depth * (2 * 4 * M * D + 2 * M * vit.mlp_ratio * D) * s


def fastvit_extra_bytes(vit: ViT, B, s=BF16):
    """HBM bytes a fastvit forward moves outside its GEMMs and attention: the first block's LayerNorm
    statistics pass (read x, write fp32 mean / rstd) and the statistics each residual GEMM hands to the
    next LayerNorm GEMM (an fp32 (mean, M2) pair per row per 64 columns, written once and read once)."""
    M, D = B * vit.tokens, vit.embed_dim
    return M * D * s + 8 * M + vit.depth * 2 * (2 * 8 * M * -(-D // 64))


def inference_target(vit: ViT, B, cublas_fraction, speedup=1.3, peak_tflops=790.0, peak_gbps=4300.0):
    """What a forward `speedup` x faster than torch.compile(timm) asks of fastvit's GEMMs, in a model where
    both run attention at its memory roofline (both are flash kernels) and every other byte at peak
    bandwidth, and compiled timm's GEMMs (patch embedding included) run at cublas_fraction of peak.
    Returns milliseconds per forward for compiled timm and for fastvit with cuBLAS's GEMM rate (fusion
    alone), and the GEMM rate fastvit needs for the speedup, as a fraction of peak and of cuBLAS's."""
    flops = model_forward(vit, B)[0]
    attention_flops, attention_bytes = attention(B, vit.num_heads, vit.tokens, vit.embed_dim // vit.num_heads)
    gemm_flops = flops - vit.depth * attention_flops
    attention_s = vit.depth * attention_bytes / (peak_gbps * 1e9)
    gemm_s = gemm_flops / (cublas_fraction * peak_tflops * 1e12)
    compiled_s = gemm_s + attention_s + compiled_timm_extra_bytes(vit, B) / (peak_gbps * 1e9)
    fastvit_other_s = attention_s + fastvit_extra_bytes(vit, B) / (peak_gbps * 1e9)
    needed_gemm_s = compiled_s / speedup - fastvit_other_s
    needed_fraction = gemm_flops / needed_gemm_s / (peak_tflops * 1e12)
    return dict(compiled_ms=compiled_s * 1e3, fused_at_cublas_rate_ms=(gemm_s + fastvit_other_s) * 1e3,
                needed_gemm_fraction=needed_fraction, needed_vs_cublas=needed_fraction / cublas_fraction,
                needed_mfu=flops * speedup / compiled_s / (peak_tflops * 1e12))  # fmt: skip


def bound(flops, nbytes, peak_tflops, peak_gbps):
    """'memory' or 'compute', and the roofline time in microseconds."""
    memory_us, compute_us = nbytes / peak_gbps / 1e3, flops / peak_tflops / 1e6
    return ("compute" if compute_us > memory_us else "memory"), max(memory_us, compute_us)


def markdown(peak_tflops=790.0, peak_gbps=4300.0):
    """The roofline table of the benchmarked cases."""
    vit = VITS["base"]
    M = 256 * vit.tokens
    cases = [
        ("LayerNorm fwd 50432x768", *layer_norm(M, 768)),
        ("LayerNorm fwd+bwd 50432x768", *layer_norm(M, 768, backward=True)),
        ("attention fwd (256,12,197,64)", *attention(256, 12, 197, 64)),
        ("attention fwd+bwd (256,12,197,64)", *attention(256, 12, 197, 64, backward=True)),
        ("attention fwd (64,16,577,64)", *attention(64, 16, 577, 64)),
        ("attention fwd (256,16,257,80)", *attention(256, 16, 257, 80)),
        ("LN+QKV 50432x768 -> 2304", *linear(M, 768, 2304, layer_norm=True)),
        ("proj 50432x768 -> 768 + residual", *linear(M, 768, 768, residual=True)),
        ("LN+fc1 50432x768 -> 3072 + GELU", *linear(M, 768, 3072, layer_norm=True)),
        ("fc2 50432x3072 -> 768 + residual", *linear(M, 3072, 768, residual=True)),
        ("patch embed B=256 224px", *patch_embed(256, 768, 224)),
        ("patch embed B=256 384px", *patch_embed(256, 768, 384)),
        ("ViT-B/16 forward, batch 256", *model_forward(vit, 256)),
    ]
    lines = [f"Peaks assumed: {peak_tflops:g} TFLOP/s dense bf16, {peak_gbps:g} GB/s (ridge {peak_tflops * 1e3 / peak_gbps:.0f} FLOP/B).",
             "", "| case (bf16) | GFLOP | MB moved | FLOP/B | bound | roofline time |", "|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for name, flops, nbytes in cases:
        which, us = bound(flops, nbytes, peak_tflops, peak_gbps)
        lines.append(f"| {name} | {flops / 1e9:,.1f} | {nbytes / 1e6:,.1f} | {flops / nbytes:,.0f} | {which} | {us:,.0f} µs |")
    lines += ["", f"ViT-B/16 forward: {model_forward(vit, 1)[0] / 1e9:.1f} GFLOP/image; "
              f"ideal {peak_tflops * 1e12 / model_forward(vit, 1)[0]:,.0f} img/s inference and "
              f"{peak_tflops * 1e12 / train_step_flops(vit, 1):,.0f} img/s training at the peak."]  # fmt: skip
    lines += ["", "ViT-B/16 inference at batch 256 against torch.compile(timm), modelled (inference_target):", "",
              "| cuBLAS GEMMs at | compiled timm | fastvit, GEMMs at cuBLAS's rate | speedup from fusion alone "
              "| GEMM rate 1.3x needs | = x cuBLAS | MFU at 1.3x |",
              "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for fraction in (0.5, 0.6, 0.7, 0.8):
        t = inference_target(vit, 256, fraction, 1.3, peak_tflops, peak_gbps)
        lines.append(f"| {fraction:.0%} of peak | {t['compiled_ms']:.1f} ms | {t['fused_at_cublas_rate_ms']:.1f} ms "
                     f"| {t['compiled_ms'] / t['fused_at_cublas_rate_ms']:.2f}x | {t['needed_gemm_fraction']:.0%} of peak "
                     f"| {t['needed_vs_cublas']:.2f}x | {t['needed_mfu']:.0%} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--peak-gbps", type=float, default=4300.0)
    args = parser.parse_args()
    print(markdown(args.peak_tflops, args.peak_gbps))
