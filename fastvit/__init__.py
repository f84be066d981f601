"""fastvit: a Vision Transformer whose hot paths are fused Triton kernels, a drop-in replacement for
timm's VisionTransformer (same kwargs, same state_dict keys, same numbers).

    model = fastvit.create_model("vit_base_patch16_224", checkpoint_path="weights.safetensors")
    model = fastvit.from_timm(timm_model)       # same weights, same config
    fastvit.patch_timm(timm_model)              # in place: its blocks now run fastvit's kernels
    fastvit.set_backend("auto" | "triton" | "torch")
"""
from fastvit import ops
from fastvit.backend import get_backend, set_backend, use_backend
from fastvit.launches import count_launches
from fastvit.model import VisionTransformer, create_model, list_models
from fastvit.pos_embed import resample_pos_embed
from fastvit.weights import from_timm, load_checkpoint, patch_timm

__version__ = "0.1.0"

__all__ = [
    "VisionTransformer", "count_launches", "create_model", "from_timm", "get_backend", "list_models",
    "load_checkpoint", "ops", "patch_timm", "resample_pos_embed", "set_backend", "use_backend",
]  # fmt: skip
