"""benchmarks/report.py: the tables and the issues' target verdicts it renders from a GPU run's JSON
(synthetic results here: the renderer's logic, not a measurement)."""
import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).parent.parent / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("fastvit_bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(group, provider, median_ms, **info):
    return {"group": group, "name": f"{group}-{provider}", "stats": {"median": median_ms / 1e3},
            "extra_info": {"provider": provider, "tflops": 1.0, "gbps": 1.0, **info}}  # fmt: skip


def gemm(case, provider, median_ms, M=50432):
    return result(f"linear {case} fwd M={M} bf16", provider, median_ms, case=case, mode="fwd", M=M)


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
