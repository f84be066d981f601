"""The eager reference ViT equals timm's VisionTransformer with the same weights (fp32 precision)."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from conftest import assert_close
from fastvit import reference

TINY = dict(img_size=(32, 48), patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
CONFIGS = [
    {},
    dict(global_pool="avg"),
    dict(class_token=False, global_pool="avg"),
    dict(reg_tokens=4),
    dict(no_embed_class=True, reg_tokens=2),
    dict(init_values=0.1, qkv_bias=False),
    dict(patch_size=14, img_size=28, embed_dim=160, num_heads=2),  # head_dim 80
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_reference_equals_timm(config):
    kwargs = dict(TINY, **config)
    timm_model = TimmViT(**kwargs).eval()
    ref = reference.VisionTransformer(**kwargs).eval()
    ref.load_state_dict(timm_model.state_dict(), strict=True)
    images = torch.randn(2, 3, *((kwargs["img_size"],) * 2 if isinstance(kwargs["img_size"], int) else kwargs["img_size"]))
    assert_close(ref(images), timm_model(images), atol=1e-5, rtol=1e-5, name="logits")
    assert_close(ref.forward_features(images), timm_model.forward_features(images), atol=1e-5, rtol=1e-5)
