"""Patch embedding, B=256, ViT-B/16 at 224 and 384 px, bf16: fastvit's one-launch im2col GEMM (+ bias,
pos-embed, cls row) vs eager conv2d + flatten + cat + add, and that under torch.compile.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import roofline
from benchlib import (DEVICE, Work, assert_close_rel, at_scale, count_eager, count_triton, fastvit_op, measure,
                      record_count, rotation)  # fmt: skip

B, C, P, D = at_scale((256, 3, 16, 768), (2, 3, 16, 64))
IMAGE_SIZES = at_scale((224, 384), (32, 48))
PROVIDERS = ("fastvit", "eager", "torch.compile")


def eager_patch_embed(images, weight, bias, pos_embed, cls_token):
    """timm's order: conv, flatten to tokens, prepend the class token, then add the position embedding."""
    tokens = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], 1) + pos_embed


@functools.cache
def compiled_patch_embed():
    return torch.compile(eager_patch_embed, dynamic=False)


def _provider(name):
    return {"fastvit": lambda: fastvit_op("patch_embed"), "eager": lambda: eager_patch_embed, "torch.compile": compiled_patch_embed}[name]()


def make_inputs(img, device, make=torch.randn):
    new = functools.partial(make, device=device, dtype=torch.bfloat16)
    tokens = (img // P) ** 2 + 1
    return new(B, C, img, img), new(D, C, P, P) * (C * P * P) ** -0.5, new(D), new(1, tokens, D), new(1, 1, D)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("img", IMAGE_SIZES)
def test_patch_embed(benchmark, gpu, peaks, img, provider):
    def check(out, inputs):
        assert_close_rel(out, eager_patch_embed(*(t.float() for t in inputs)), 1e-2, "tokens")

    work = Work(*roofline.patch_embed(B, D, img, P, C))
    sets = rotation(lambda: make_inputs(img, DEVICE), work.bytes)
    measure(benchmark, _provider(provider), sets, check=check, work=work, peaks=peaks,
            group=f"patch_embed B={B} {img}px bf16", provider=provider, extra={"img": img, "batch": B, "dtype": "bf16"})  # fmt: skip


@pytest.mark.parametrize("img", IMAGE_SIZES)
def test_patch_embed_launches_and_bytes(cpu_only, img):
    """One launch at the benchmark shape (dry run), vs eager's conv + cat + add."""
    from fastvit.backend import use_backend

    inputs = make_inputs(img, "cpu", make=torch.empty)
    with use_backend("triton"), count_triton() as ours:
        fastvit_op("patch_embed")(*inputs)
    meta_inputs = make_inputs(img, "meta", make=torch.empty)
    with count_eager() as eager:
        eager_patch_embed(*meta_inputs)
    record_count(f"patch_embed B={B} {img}px bf16", "fastvit", ours)
    record_count(f"patch_embed B={B} {img}px bf16", "torch eager", eager)
    assert ours.launches == 1, ours.by_kernel
    modelled = roofline.patch_embed(B, D, img, P, C)[1]
    assert ours.bytes <= 1.02 * modelled, (ours.bytes, modelled)
