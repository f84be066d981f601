"""Every production kernel config compiles for Hopper (sm_90) and Ampere (sm_80), without a GPU.

fastvit.inspect compiles each KernelConfig of each kernels/ module ahead of time, for each arch whose
launchers pick it (KernelConfig.archs), and reads the cubin;
each test below checks one property over all its rows and lists every offending (kernel, config, arch):
the config compiles, spills no registers, fits the arch's shared memory, and a "gemm" / "attention"
config reaches the tensor cores (HGMMA on sm_90, HMMA on sm_80). Every `_*_kernel` must appear in
some production config.

The compiles run once per process, at the first test (not at collection, so pytest-xdist workers that
do not run this file compile nothing); triton's on-disk cache makes reruns cheap.
"""
import functools

from fastvit import inspect as fv_inspect

ARCHS = ("sm_90", "sm_80")


@functools.cache
def inspect_rows():
    return tuple(fv_inspect.inspect_kernels(ARCHS))


def _row_id(row):
    return f"{row['kernel']}[{row['config'] or 'no config'}]-{row['arch']}"


def _failures(check):
    """'kernel[config]-arch: message' for every row where check(row) returns a message."""
    return [f"{_row_id(row)}: {message}" for row in inspect_rows() if (message := check(row))]


def test_every_kernel_module_was_inspected():
    modules = {row["module"] for row in inspect_rows()}
    kernel_modules = {m for m in fv_inspect.kernel_modules() if not m.rsplit(".", 1)[-1].startswith("_")}
    assert kernel_modules <= modules, f"kernel modules with no rows (no compile_configs?): {sorted(kernel_modules - modules)}"


def test_every_kernel_inspected_for_every_arch():
    """Each kernel has configs on Hopper and on Ampere (a config may target one arch: its archs field)."""
    archs_by_kernel = {}
    for row in inspect_rows():
        archs_by_kernel.setdefault(row["kernel"], set()).add(row["arch"])
    incomplete = {k: sorted(v) for k, v in archs_by_kernel.items() if v != set(ARCHS)}
    assert not incomplete, f"kernels not inspected for every arch: {incomplete}"


def test_every_jit_kernel_has_a_production_config():
    missing = _failures(lambda row: row["error"] if row["error"] == fv_inspect.NO_CONFIG else None)
    assert not missing, "\n".join(missing)


def test_configs_compile():
    failed = _failures(lambda row: None if row["compiled"] or row["error"] == fv_inspect.NO_CONFIG else row["error"])
    assert not failed, "\n".join(failed)


def test_no_register_spills():
    spilling = _failures(lambda row: row["compiled"] and row["spills"] and f"{row['spills']} bytes of spills at {row['registers']} registers")
    assert not spilling, "\n".join(spilling)


def test_shared_memory_fits():
    def too_big(row):
        if row["compiled"] and row["shared_memory"] > row["max_shared_memory"]:
            return f"{row['shared_memory']} B of shared memory > {row['max_shared_memory']} B"

    assert not (failed := _failures(too_big)), "\n".join(failed)


def test_gemm_and_attention_use_tensor_cores():
    def no_mma(row):
        if not row["compiled"] or row["kind"] not in ("gemm", "attention"):
            return None
        if row["ieee_fp32"]:
            return None  # IEEE fp32 dots (torch's default fp32 precision) have no tensor-core path
        if row["arch"] == "sm_90" and not row["has_hgmma"]:
            return "no HGMMA (wgmma) in the sm_90 SASS: not on Hopper's tensor-core path"
        if row["arch"] == "sm_80" and not row["has_hmma"]:
            return "no HMMA (mma.sync) in the sm_80 SASS: not on the tensor cores"

    assert not (failed := _failures(no_mma)), "\n".join(failed)


def test_promised_wgmma_pipelines_stay_asynchronous():
    """Configs marked async_wgmma (every linear GEMM but fc1's weight gradient, whose two register-computed
    operands force a single shared buffer; every attention kernel) keep wgmma groups in flight on sm_90: a
    loop that waits for each of its groups to drain leaves the tensor cores idle through each load and
    prologue (what triton 3.6 made of loops whose trip count was not provably >= 1: ptxas C7515)."""
    serialised = _failures(lambda row: row["compiled"] and row["arch"] == "sm_90" and row["async_wgmma"]
                           and row["wgmma_serialized"] and "every wgmma waits for the previous one")
    assert not serialised, "\n".join(serialised)
