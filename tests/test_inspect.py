"""The `python -m fastvit.inspect` command line and the problem detection it reports with.

The CLI runs in a subprocess on one small kernel (LayerNorm forward, sm_90), so the compiles are
cheap and usually hit triton's cache from tests/test_compile.py.
"""
import json
import subprocess
import sys

import pytest

from fastvit import inspect as fv_inspect

KERNEL = "_layer_norm_fwd_kernel"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastvit.inspect", "--kernel", KERNEL, "--arch", "sm_90", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def json_run():
    return run_cli("--format", "json", "--jobs", "1")


def test_json_rows(json_run):
    assert json_run.returncode == 0, json_run.stderr
    rows = json.loads(json_run.stdout)
    assert rows and all(set(row) == set(fv_inspect.ROW_KEYS) for row in rows)
    assert {row["kernel"] for row in rows} == {KERNEL}
    assert {row["arch"] for row in rows} == {"sm_90"}
    for row in rows:
        assert row["compiled"] is True and row["error"] is None
        assert isinstance(row["registers"], int) and 0 < row["registers"] <= 255
        assert row["spills"] == 0 and row["kind"] == "rowwise"
        assert row["has_hgmma"] is False and row["has_hmma"] is False  # LayerNorm has no dot


def test_table_format():
    result = run_cli("--format", "table", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["kernel", "config", "w"]
    assert all(KERNEL in line and "sm_90" in line for line in lines[1:-1])
    assert lines[-1].endswith("0 with problems")


def test_unknown_kernel_and_arch_are_usage_errors():
    assert run_cli("--kernel", "no_such_kernel").returncode == 2
    bad_arch = subprocess.run([sys.executable, "-m", "fastvit.inspect", "--arch", "volta"], capture_output=True, text=True)
    assert bad_arch.returncode == 2 and "sm_90" in bad_arch.stderr


@pytest.mark.parametrize("arch, expected", [("sm_90", 90), ("sm80", 80), ("90", 90), (80, 80), ("sm_90a", 90)])
def test_parse_arch(arch, expected):
    assert fv_inspect.parse_arch(arch) == expected


def _clean_row(**changes):
    row = fv_inspect._row(kernel="_k", module="m", config="c", arch="sm_90", kind="gemm", compiled=True, registers=128,
                          spills=0, shared_memory=1024, max_shared_memory=232448, has_hgmma=True, has_hmma=False)
    row.update(changes)
    return row


@pytest.mark.parametrize("changes, expected", [
    ({}, None),
    ({"compiled": False, "error": "boom"}, "boom"),
    ({"spills": 8}, "spills"),
    ({"shared_memory": 300000}, "shared memory"),
    ({"has_hgmma": False}, "HGMMA"),
    ({"arch": "sm_80", "has_hgmma": False}, "HMMA"),
    ({"kind": "rowwise", "has_hgmma": False}, None),
    ({"ieee_fp32": True, "has_hgmma": False}, None),
    ({"ieee_fp32": True, "arch": "sm_80", "has_hgmma": False}, None),
    ({"wgmma_serialized": True}, None),  # no promise made
    ({"wgmma_serialized": True, "async_wgmma": True}, "serialised"),
    ({"wgmma_serialized": False, "async_wgmma": True}, None),
])  # fmt: skip
def test_problems(changes, expected):
    found = fv_inspect.problems(_clean_row(**changes))
    assert (not found) if expected is None else any(expected in p for p in found), found


def test_missing_config_is_reported(tmp_path, monkeypatch):
    """A `_*_kernel` that no production config lists comes back as a failing row per arch."""
    package = tmp_path / "fake_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "orphan.py").write_text(
        "import triton\n\n@triton.jit\ndef _orphan_kernel(X):\n    pass\n\n\ndef compile_configs():\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the spawned workers import it too
    monkeypatch.setattr(fv_inspect, "KERNELS_PACKAGE", "fake_kernels")
    rows = fv_inspect.inspect_kernels(("sm_90", "sm_80"), jobs=1)
    assert [(r["kernel"], r["arch"], r["compiled"], r["error"]) for r in rows] == [
        ("_orphan_kernel", "sm_90", False, fv_inspect.NO_CONFIG),
        ("_orphan_kernel", "sm_80", False, fv_inspect.NO_CONFIG),
    ]


def _sass_loop(*body):
    """A minimal nvdisasm-style loop: a label, the body lines, a backward branch to the label."""
    return "\n".join([".L_x_1:", *(f"        /*0000*/  {line} ;" for line in body), "        /*0000*/  BRA `(.L_x_1) ;"])


@pytest.mark.parametrize("body, serialised", [
    (["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
      "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0"], True),
    (["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1"], False),
    (["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
      "HGMMA.64x64x16.F32.BF16 R56, R88, gdesc[UR8], R56, gsb0"], False),  # the second group stays in flight
    (["FFMA R1, R2, R3, R4"], False),  # no wgmma in the loop
])  # fmt: skip
def test_wgmma_serialised_means_every_group_drains_alone(body, serialised):
    assert fv_inspect._wgmma_serialized(_sass_loop(*body)) is serialised
