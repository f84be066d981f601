"""The CUDA-only launch path, on a machine without a GPU: tests/fake_cuda.py runs the launchers with a
fake sm_90 / sm_80 driver (real JIT compiles, launches recorded, not run). The interpreter tests never
reach this code: tile picks and autotuning (their concurrent compiles), split-K, the capture /
FASTVIT_AUTOTUNE=0 defaults, Ampere's tables and LayerNorm-tile masks, GPU-sized grids, and Triton's own
argument binding (a stray launch keyword would have failed every GEMM on a GPU, unseen by the rest).
On a GPU machine the rest of the suite runs this path for real, so this test skips there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs the CUDA launch path itself")

SCRIPT = Path(__file__).with_name("fake_cuda.py")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVIT_AUTOTUNE")}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"tests/fake_cuda.py failed (it relies on Triton internals: see its docstring)\n{done.stderr[-3000:]}"
    return {row["scenario"]: row for row in json.loads(done.stdout)}


def kernels(row):
    return {launch[0] for launch in row["launches"]}


def test_every_scenario_launches(report):
    failed = {name: row["error"] for name, row in report.items() if not row["ok"]}
    assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
    assert all(row["launches"] for row in report.values())


def test_gemm_tuner_times_every_candidate_with_tma_and_split_k(report):
    row = report["GEMMs autotuned (LayerNorm prologue; split-K weight gradient)"]
    forward, weight_grad = row["returned"]
    assert forward["flags"]["LN_A"] == "True" and len(forward["candidates"]) >= 4
    assert {c["tile"]["TMA"] for c in forward["candidates"] + weight_grad["candidates"]} == {False, True}  # sm_90
    splits = [c["tile"]["SPLIT_K"] for c in weight_grad["candidates"]]
    assert 1 in splits and max(splits) > 1, splits
    assert row["bench_calls"] == len(forward["candidates"]) + len(weight_grad["candidates"])
    assert any(grid[1] > 1 for name, grid, *_ in row["launches"] if name == "_linear_kernel")  # a split launch
    # the tuner compiles every candidate in its concurrent warm-up (JITFunction.warmup in a thread pool),
    # with the specialisation of the launches it then times: none of them compiles again
    gemm_compiles = [warmup for name, warmup in row["compiles"] if name == "_linear_kernel"]
    assert len(gemm_compiles) == row["bench_calls"] and all(gemm_compiles), row["compiles"]


def test_triton_autotune_picks_attention_and_patch_embed_tiles(report):
    row = report["attention and patch embed autotuned"]
    assert row["bench_calls"] > 0
    assert {r["kernel"] for r in row["returned"]} == {"attention fwd sm_90", "attention dq sm_90", "attention dkdv sm_90",
                                                       "patch_embed 16-bit"}  # fmt: skip
    # every config compiled by the concurrent warm-up before triton.autotune times it, none again then
    warm_ups = [warmup for _, warmup in row["compiles"]]
    assert len(warm_ups) == row["bench_calls"] and all(warm_ups), row["compiles"]


@pytest.mark.parametrize("scenario", ["model train step + eval, bf16", "model train step + eval, fp32",
                                      "sm_80: model train step + eval, bf16"])  # fmt: skip
def test_model_step_with_pinned_defaults_measures_nothing(report, scenario):
    [row] = [row for name, row in report.items() if name.startswith(scenario)]
    assert row["bench_calls"] == 0
    assert {"_patch_embed_kernel", "_linear_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
            "_layer_norm_bwd_kernel"} <= kernels(row)  # fmt: skip


def test_capture_runs_defaults_without_timing(report):
    row = report["CUDA-graph capture, untuned shapes"]
    assert row["bench_calls"] == 0
    assert kernels(row) == {"_attn_fwd_kernel", "_linear_kernel", "_patch_embed_kernel"}


def test_ampere_autotunes_from_its_own_table(report):
    row = report["sm_80: attention autotuned"]
    assert row["arch"] == 80 and row["bench_calls"] > 0
    assert {r["kernel"] for r in row["returned"]} >= {"attention fwd sm_80", "attention dq sm_80", "attention dkdv sm_80"}


def test_capture_after_warm_up_relaunches_the_picks(report):
    """A graph captured after a warm-up runs the tiles the warm-up picked (the fake timer makes every pick
    differ from its default), for the GEMM, attention and the patch embedding alike."""
    row = report["CUDA-graph capture after a warm-up"]
    picked, captured = row["returned"]["picked"], row["returned"]["captured"]
    assert [p[0] for p in picked] == ["_attn_fwd_kernel", "_linear_kernel", "_patch_embed_kernel"]
    assert captured == picked
