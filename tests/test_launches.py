"""fastvit.count_launches: launches by kernel, the modelled bytes they move, and the dry run."""
import pytest
import torch
from conftest import DEVICE

import fastvit
from fastvit import ops
from fastvit.backend import use_backend


def test_counts_launches_and_the_bytes_of_distinct_tensor_arguments():
    M, K, N = 5, 16, 24
    x, w = torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    with use_backend("triton"), fastvit.count_launches() as launches:
        ops.linear(x, w)
        ops.linear(x, w, residual=torch.randn(M, N, device=DEVICE))
    assert launches.by_kernel == {"_linear_kernel": 2} and launches.total == launches.launches == 2
    # y, x, w once each per launch (plus the residual in the second); scalars and None cost nothing
    assert launches.bytes == 4 * (2 * (M * N + M * K + N * K) + M * N)


def test_a_broadcast_tensor_counts_its_storage_only():
    from fastvit.launches import distinct_tensor_bytes

    t = torch.randn(8)
    assert distinct_tensor_bytes([t.expand(1000, 8), t.expand(1000, 8), t]) == 2 * 8 * 4  # the views repeat


@pytest.mark.skipif(DEVICE.type == "cuda", reason="dry runs need the interpreter; GPU runs compile instead")
def test_dry_run_counts_the_same_launches_without_running_programs():
    model = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), fastvit.count_launches() as real:
        model(images)
    with torch.no_grad(), fastvit.count_launches(dry_run=True) as dry:
        model(images)
    assert dry.by_kernel == real.by_kernel and dry.bytes == real.bytes


def test_forward_and_backward_launches_of_one_block():
    """What one training step of a depth-1 model launches: the forward (embed, the first LayerNorm's
    statistics, 5 block launches, head) and its backward (dx and dW of each of the 5 GEMMs, a row pass per
    LayerNorm, the two attention kernels, and the patch-embed weight gradient; images need none)."""
    model = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2).to(DEVICE)
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    model(images).sum().backward()  # warm-up: on a GPU the first call also runs the autotuners' trials
    with fastvit.count_launches() as forward:
        logits = model(images)
    with fastvit.count_launches() as backward:
        logits.sum().backward()
    assert forward.by_kernel == {"_patch_embed_kernel": 1, "_row_stats_kernel": 1, "_linear_kernel": 5,
                                 "_attn_fwd_kernel": 1}, forward  # fmt: skip
    assert backward.by_kernel == {"_linear_kernel": 10, "_layer_norm_bwd_kernel": 3, "_attn_bwd_dq_kernel": 1,
                                  "_attn_bwd_dkdv_kernel": 1, "_patch_embed_kernel": 1}, backward  # fmt: skip
    assert forward.bytes > 0 and backward.bytes > forward.bytes


def test_dry_run_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr("fastvit.kernels._helpers.is_interpreter", lambda: False)
    with pytest.raises(ValueError, match="dry_run"):
        with fastvit.count_launches(dry_run=True):
            pass
