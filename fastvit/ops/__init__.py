"""fastvit.ops: the public fused ops. Each validates its inputs, then runs the Triton kernel (as a
torch.library custom op with a registered backward, so torch.compile traces it without graph breaks) or,
under the "torch" backend or where Triton cannot run, the equivalent plain PyTorch ops.

    layer_norm          kernels/layer_norm.py
    attention           kernels/attention.py     (q, k, v) -> o, and qkv_attention on timm's packed qkv
    linear              kernels/linear.py        GEMM + bias / GELU / layer scale / dropout / residual
    layer_norm_linear   kernels/linear.py        the same GEMM with LayerNorm fused into its prologue
    layer_norm_mlp      kernels/linear.py        LN > fc1 > GELU > fc2 + residual: the two GEMMs, with GELU's
                                                 gradient formed in the backward's epilogue (ops/mlp.py)
    patch_embed         kernels/patch_embed.py   im2col GEMM + bias + pos-embed + class / register rows
"""
from .attention import attention, qkv_attention
from .layer_norm import layer_norm
from .linear import layer_norm_linear, linear
from .mlp import layer_norm_mlp
from .patch_embed import patch_embed

__all__ = ["attention", "layer_norm", "layer_norm_linear", "layer_norm_mlp", "linear", "patch_embed", "qkv_attention"]
