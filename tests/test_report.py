"""benchmarks/report.py: the tables and the issues' target verdicts it renders from a GPU run's JSON
(synthetic results here: the renderer's logic, not a measurement); benchmarks/roofline.py's model of
what the targets ask."""
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import INTERPRETED

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"fastvit_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return load("report")


def result(group, provider, median_ms, **info):
    return {"group": group, "name": f"{group}-{provider}", "stats": {"median": median_ms / 1e3},
            "extra_info": {"provider": provider, "tflops": 1.0, "gbps": 1.0, **info}}  # fmt: skip


def gemm(case, provider, median_ms, M=50432, **info):
    return result(f"linear {case} fwd M={M} bf16", provider, median_ms, case=case, mode="fwd", M=M, **info)


def model(mode, provider, median_ms, batch=256, **info):
    return result(f"{mode} ViT-B/16", provider, median_ms, vit="base", batch=batch, mode=mode,
                  images_per_s=batch / median_ms * 1e3, **info)  # fmt: skip


def test_targets_say_met_missed_or_not_measured(report):
    benchmarks = [
        gemm("ln_fc1_gelu", "eager", 1.40), gemm("ln_fc1_gelu", "fastvit", 1.0), gemm("ln_fc1_gelu", "fastvit+stats", 1.2),
        gemm("plain", "eager", 0.90), gemm("plain", "fastvit", 1.0),
        gemm("proj_residual", "eager", 2.0, M=100), gemm("proj_residual", "fastvit", 1.0, M=100),  # not the M
        model("inference", "torch.compile(timm)", 13.0), model("inference", "fastvit", 10.0, pct_peak_tflops=61.0),
        model("train", "torch.compile(timm)", 11.0, batch=32), model("train", "fastvit", 10.0, batch=32),
    ]  # fmt: skip
    lines = {line[:52].strip(): line[52:].strip() for line in report.targets(benchmarks).splitlines()}
    assert lines["ln_fc1_gelu fwd vs eager (fastvit)"] == "1.40x (target >= 1.3x) met"
    assert lines["ln_fc1_gelu fwd vs eager (fastvit+stats)"] == "1.17x (target >= 1.3x) MISSED"
    assert lines["plain GEMM fwd vs cuBLAS"] == "0.90x (target >= 0.95x) MISSED"
    assert lines["proj_residual fwd vs eager (fastvit)"] == "not measured"
    assert lines["ViT-B/16 b256 inference vs torch.compile(timm)"] == "1.30x (target >= 1.3x) met"
    assert lines["ViT-B/16 b256 inference MFU"] == "61.0% (target >= 60%) met"
    assert lines["ViT-B/16 b256 train step vs torch.compile(timm)"] == "not measured"


def test_targets_end_with_the_model_at_the_measured_cublas_rate(report):
    """With cuBLAS's plain GEMM timed, the targets end with benchmarks/roofline.py's model at its rate: at
    50 % of the peak, fusion alone is 1.15x torch.compile(timm) and 1.3x needs GEMMs at 1.14x cuBLAS (the
    table in benchmarks/README.md); without that timing there is no such line."""
    benchmarks = [gemm("plain", "eager", 0.90, pct_peak_tflops=50.0), gemm("plain", "fastvit", 1.0)]
    last = report.targets(benchmarks).splitlines()[-1]
    assert last == ("model at cuBLAS's measured 50% of peak: fusion alone gives 1.15x torch.compile(timm) "
                    "inference; 1.3x needs fastvit's GEMMs at 1.14x cuBLAS"), last
    faster_memory = report.targets(benchmarks, {"tflops": 790.0, "gbps": 8600.0}).splitlines()[-1]
    assert "fusion alone gives 1.08x" in faster_memory, faster_memory  # the passes fusion removes cost less
    assert "model at" not in report.targets(benchmarks[1:])


def test_command_line_renders_markdown_plot_and_short_table(report, tmp_path, capsys):
    path = tmp_path / "bench.json"
    benchmarks = [model("inference", p, ms, batch=b) for p, ms in (("fastvit", 10.0), ("timm", 20.0)) for b in (32, 256)]
    path.write_text(json.dumps({"benchmarks": benchmarks, "fastvit": {
        "environment": {"date": "2026-11-29", "device": "a GPU", "torch": "2.11", "triton": "3.6"},
        "peaks": {"tflops": 790.0, "gbps": 4300.0}, "counts": []}}))  # fmt: skip
    assert report.main([str(path), "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Measured 2026-11-29 on a GPU, torch 2.11, triton 3.6." in text and "790 TFLOP/s" in text
    assert "| fastvit | 256 | 10.000 |" in text and "The issues' targets" in text
    assert (tmp_path / "p.png").stat().st_size > 0
    assert report.main([str(path), "--short"]) == 0
    out = capsys.readouterr().out
    assert "25,600 img/s" in out and "ViT-B/16 b256 inference MFU" in out


def gemm_tuning(default_ms, best_ms):
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_K=1, TMA=False)
    best = dict(tile, BLOCK_N=256, TMA=True)
    return {"kernel": "linear", "flags": {"LN_A": "True", "ACTIVATION": "gelu"}, "dtypes": ["bf16"] * 3,
            "M_bucket": 65536, "N": 3072, "K": 768, "tma_eligible": True, "picked": best, "default": tile,
            "default_ms": default_ms,
            "candidates": [{"ms": default_ms, "tile": tile}, {"ms": best_ms, "tile": best}]}  # fmt: skip


def test_tuning_lines_show_picks_and_slow_defaults(report):
    attention = {"kernel": "attention fwd sm_90", "key": ["197", "197", "64", "torch.bfloat16"],
                 "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}  # fmt: skip
    tuning = [gemm_tuning(1.2, 1.0), gemm_tuning(1.02, 1.0), attention]
    lines = report.tuning_lines(tuning)
    assert len(lines) == 3 and lines[2].startswith("attention fwd sm_90 key 197 197 64")
    assert lines[0] == ("GEMM M<=65536 N=3072 K=768 bf16/bf16/bf16 [LN_A ACTIVATION=gelu], TMA-addressable: picked 128x256x64 group 8 "
                        "warps 8 stages 3 TMA, 1.000 ms; default 128x128x64 group 8 warps 8 stages 3, 1.200 ms (1.20x the pick)")  # fmt: skip
    assert report.tuning_lines(tuning, slower_than=1.05) == lines[:1]  # only the default worth changing


def test_tuning_record_reaches_markdown_and_short_table(report, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [model("inference", "fastvit", 10.0)],
                                "fastvit": {"counts": [], "tuning": [gemm_tuning(1.5, 1.0)]}}))  # fmt: skip
    assert report.main([str(path), "--markdown", str(tmp_path / "r.md")]) == 0
    assert "Tile configs the tuners picked" in (tmp_path / "r.md").read_text()
    assert report.main([str(path), "--short"]) == 0
    assert "(1.50x the pick)" in capsys.readouterr().out


def test_picks_record_lists_what_launch_autotuned_remembered():
    """kernels/_helpers.picks_record on picks as launch_autotuned remembers them (a GPU run's: the
    interpreter cannot benchmark): the key's first part names the kernel, the config its launch options."""
    import triton

    from fastvit.kernels import attention, linear, patch_embed
    from fastvit.kernels._helpers import picks_record

    config = triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=2)
    record = picks_record({("attention fwd sm_90", (197, 197, "torch.bfloat16"), (("BLOCK_D", 64),)): config})
    assert record == [{"kernel": "attention fwd sm_90", "key": ["(197, 197, 'torch.bfloat16')", "(('BLOCK_D', 64),)"],
                       "config": config.all_kwargs()}]  # fmt: skip
    assert record[0]["config"]["BLOCK_M"] == 32 and record[0]["config"]["num_warps"] == 8
    json.dumps(record)  # goes into the benchmarks' JSON
    if INTERPRETED:  # nothing is measured: the records the benchmarks store are empty, not an error
        assert attention.tuning_record() == [] and linear.tuning_record() == [] and patch_embed.tuning_record() == []


def test_inference_target_model_is_consistent():
    """roofline.inference_target: compiled timm's extra passes are 16 activation-sized bf16 elements per
    token per block (14.9 GB at ViT-B batch 256); asking for exactly the speedup fusion gives needs exactly
    cuBLAS's GEMM rate; a larger speedup needs a faster GEMM; the MFU follows from the model's FLOPs."""
    roofline = load("roofline")
    vit = roofline.VITS["base"]
    assert roofline.compiled_timm_extra_bytes(vit, 256) == 12 * 16 * 256 * 197 * 768 * 2
    for fraction in (0.5, 0.8):
        t = roofline.inference_target(vit, 256, fraction)
        fusion_alone = t["compiled_ms"] / t["fused_at_cublas_rate_ms"]
        assert 1.0 < fusion_alone < 1.3 and t["needed_vs_cublas"] > 1.0
        at_fusion = roofline.inference_target(vit, 256, fraction, speedup=fusion_alone)
        assert at_fusion["needed_vs_cublas"] == pytest.approx(1.0)
        flops = roofline.model_forward(vit, 256)[0]
        assert t["needed_mfu"] == pytest.approx(flops / (t["compiled_ms"] / 1.3 * 1e-3) / 790e12)
    assert "| 60% of peak |" in roofline.markdown()
