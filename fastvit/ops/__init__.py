"""fastvit.ops: the public fused ops. Each validates its inputs, then runs the Triton kernel (as a
torch.library custom op with a registered backward, so torch.compile traces it without graph breaks) or,
under the "torch" backend or where Triton cannot run, the equivalent plain PyTorch ops.
"""
from .layer_norm import layer_norm

__all__ = ["layer_norm"]
