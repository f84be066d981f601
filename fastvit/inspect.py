"""Compile every production kernel config for GPU architectures without a GPU, and read what the
compiler made of it.

    python -m fastvit.inspect --arch sm_90 --arch sm_80 --format table [--kernel NAME] [--jobs N]

For every module of the fastvit.kernels package it calls compile_configs() (kernels/_helpers.py,
KernelConfig), compiles each config ahead of time per arch (`triton.compile` with a `GPUTarget`: no
driver, no device), and reads the cubin with the cuobjdump / nvdisasm that ship inside the triton wheel:

    registers       REG per thread (cuobjdump -res-usage)
    spills          STACK + LOCAL bytes per thread: a Triton kernel has no stack frame or local arrays
                    of its own, so any byte here is a register spill slot
    shared_memory   the dynamic shared memory Triton launches the kernel with (bytes), checked against
                    the arch's per-block maximum (max_shared_memory)
    has_hgmma       Hopper warpgroup MMA (wgmma) in the SASS: the sm_90 tensor-core path
    has_hmma        warp-level MMA (mma.sync) in the SASS: the sm_80 tensor-core path
    wgmma_serialized  every loop waits for each of its wgmma groups to drain (WARPGROUP.DEPBAR.LE gsb0,
                    0x0 per group): no HGMMA overlaps anything, the tensor cores idle through every load
                    and prologue (ptxas C7515); a problem for a config that promises async_wgmma

Every @triton.jit function named `_*_kernel` must appear in at least one production config; one that
does not gets a row per arch with compiled False and error "no production config".

Compiles run in worker processes started with TRITON_INTERPRET off: under the interpreter (the CPU
test setup) @triton.jit yields interpreted functions, which cannot be compiled. Triton's on-disk cache
makes a second run cheap. The JSON output is a list of rows (dicts) with the keys of ROW_KEYS.
"""
import argparse
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

KERNELS_PACKAGE = "fastvit.kernels"
ROW_KEYS = (
    "kernel", "module", "config", "num_warps", "num_stages", "arch", "kind", "compiled", "error",
    "registers", "spills", "shared_memory", "max_shared_memory", "has_hgmma", "has_hmma", "wgmma_serialized",
    "async_wgmma", "ieee_fp32", "compile_s",
)  # fmt: skip
NO_CONFIG = "no production config"

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, per compute capability).
MAX_SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def parse_arch(arch) -> int:
    """'sm_90' / 'sm90' / '90' / 90 -> 90."""
    match = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", str(arch).strip().lower())
    if not match:
        raise ValueError(f"arch: expected e.g. 'sm_90' or 'sm_80', got {arch!r}")
    return int(match.group(1))


def _row(**fields):
    row = dict.fromkeys(ROW_KEYS)
    row.update(fields)
    return row


# ---------------------------------------------------------------- worker side (TRITON_INTERPRET off)


def _jit_function(obj):
    """The JITFunction under an @triton.autotune / @triton.heuristics wrapper, or None."""
    from triton.runtime.jit import JITFunction

    for _ in range(4):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
    return None


@functools.cache
def _module_configs(module_name):
    """(module, its production configs): compile_configs() runs once per worker process."""
    import importlib

    module = importlib.import_module(module_name)
    return module, tuple(getattr(module, "compile_configs", list)())


def _list_module(module_name):
    """Plain-data summary of one kernel module: its configs and the `_*_kernel` functions it defines."""
    try:
        module, configs = _module_configs(module_name)
    except Exception as error:  # a module that does not import is reported, not fatal
        return {"error": f"{type(error).__name__}: {error}", "configs": [], "kernels": []}
    listed = []
    for index, cfg in enumerate(configs):
        jit = _jit_function(cfg.kernel)
        listed.append({
            "index": index, "label": cfg.label, "kind": cfg.kind, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "kernel": jit.fn.__name__ if jit else repr(cfg.kernel),
            "kernel_module": jit.fn.__module__ if jit else module_name, "archs": list(cfg.archs),
        })  # fmt: skip
    defined = []
    for name, obj in vars(module).items():
        jit = _jit_function(obj) if name.startswith("_") and name.endswith("_kernel") else None
        if jit is not None and jit.fn.__module__ == module_name and jit.fn.__name__ not in defined:
            defined.append(jit.fn.__name__)
    return {"error": None, "configs": listed, "kernels": defined}


def _nvidia_tool(name):
    """A CUDA binary tool: the copy inside the triton wheel first (always there), else one on PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def _read_cubin(cubin: bytes):
    """(registers, spill bytes, has_hgmma, has_hmma) of a single-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage.stdout))
    spills = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    has_hgmma = bool(re.search(r"\bHGMMA\.", sass))
    return int(fields["REG"]), spills, has_hgmma, bool(re.search(r"\bHMMA\.", sass)), _wgmma_serialized(sass)


def _wgmma_serialized(sass: str) -> bool:
    """Whether every loop with wgmma runs each wgmma group alone: as many waits that drain to 0
    (WARPGROUP.DEPBAR.LE gsb0, 0x0) as groups (HGMMA ... gsb0) and no wait that leaves one in flight.
    That is what ptxas makes of a loop it must serialise (warning C7515); a pipelined loop keeps at least
    one group in flight across some wait (a wait > 0, or fewer waits than groups)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):  # a loop: a backward branch to a label
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            body = "\n".join(lines[labels[target.group(1)]:i + 1])
            groups = len(re.findall(r"HGMMA\.[^\n]*gsb0", body))
            if groups:
                drained = len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", body))
                in_flight = len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x[1-9a-f]", body))
                loops.append(drained >= groups and not in_flight)
    return bool(loops) and all(loops)


def _summary(error):
    """One line for a compile failure: triton's CompilationError text is the kernel source with a caret,
    and the actual reason is in its __cause__."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if error.__cause__ is not None:
        text += f" {type(error.__cause__).__name__}: {' '.join(str(error.__cause__).split())}"
    return text[:500]


def _compile_row(module_name, index, arch):
    """Compile config `index` of `module_name` for sm_`arch` and return its row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, configs = _module_configs(module_name)
    cfg = configs[index]
    jit = _jit_function(cfg.kernel)
    if jit is None:
        return _row(kernel=repr(cfg.kernel), module=module_name, config=cfg.label, arch=f"sm_{arch}", kind=cfg.kind,
                    compiled=False, error="KernelConfig.kernel is not a @triton.jit function")  # fmt: skip
    row = _row(
        kernel=jit.fn.__name__, module=module_name, config=cfg.label, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, arch=f"sm_{arch}", kind=cfg.kind, compiled=False,
        max_shared_memory=MAX_SHARED_MEMORY.get(arch), async_wgmma=cfg.async_wgmma, ieee_fp32=cfg.ieee_fp32,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        source = ASTSource(fn=jit, signature=cfg.signature(), constexprs=cfg.constexprs, attrs=cfg.attrs())
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        )
        registers, spills, has_hgmma, has_hmma, serialized = _read_cubin(compiled.asm["cubin"])
    except Exception as error:
        row.update(error=_summary(error))
    else:
        row.update(
            compiled=True, registers=registers, spills=spills, shared_memory=compiled.metadata.shared,
            has_hgmma=has_hgmma, has_hmma=has_hmma, wgmma_serialized=serialized,
        )  # fmt: skip
    row["compile_s"] = round(time.perf_counter() - start, 3)
    return row


# ---------------------------------------------------------------- driver side


@contextlib.contextmanager
def _compiling_environment():
    """Workers must import triton with the interpreter off; they are spawned inside this block and
    inherit os.environ at start."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def kernel_modules():
    """Fully qualified names of the modules of the fastvit.kernels package (pkgutil discovery)."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec(KERNELS_PACKAGE)
    return [f"{KERNELS_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(spec.submodule_search_locations)]


def _selected(kernel, module_name, kernel_name):
    return kernel is None or kernel in (module_name, module_name.rsplit(".", 1)[-1], kernel_name)


def inspect_kernels(archs=("sm_90", "sm_80"), kernel=None, jobs=None):
    """Rows (dicts with ROW_KEYS) for every production config of every kernel module, per arch.

    archs: e.g. ("sm_90", "sm_80"); kernel: only a module ("layer_norm") or one jit function
    ("_layer_norm_fwd_kernel"); jobs: worker processes (default: the CPU count, at most 8).
    Rows come in a stable order: module, config (as compile_configs() lists them), arch.
    """
    arch_numbers = [parse_arch(a) for a in archs]
    modules = kernel_modules()
    jobs = jobs or min(8, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    pending = []  # rows and futures of rows, in report order: module, config, arch
    with _compiling_environment(), concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        listings = dict(zip(modules, pool.map(_list_module, modules)))
        covered = {(c["kernel_module"], c["kernel"]) for listing in listings.values() for c in listing["configs"]}
        for module_name, listing in listings.items():
            if listing["error"] is not None:
                if _selected(kernel, module_name, None):
                    pending += [_row(kernel=module_name, module=module_name, arch=f"sm_{a}", compiled=False,
                                     error=f"import or compile_configs() failed: {listing['error']}") for a in arch_numbers]
                continue
            for cfg in listing["configs"]:
                if _selected(kernel, module_name, cfg["kernel"]):
                    pending += [pool.submit(_compile_row, module_name, cfg["index"], a)
                                for a in arch_numbers if a in cfg["archs"]]
            for name in listing["kernels"]:
                if (module_name, name) not in covered and _selected(kernel, module_name, name):
                    pending += [_row(kernel=name, module=module_name, config="", arch=f"sm_{a}", compiled=False,
                                     error=NO_CONFIG) for a in arch_numbers]
        return [item.result() if isinstance(item, concurrent.futures.Future) else item for item in pending]


def problems(row):
    """What is wrong with one row, as a list of strings (empty when the config is production-ready)."""
    if not row["compiled"]:
        return [row["error"] or "not compiled"]
    found = []
    if row["spills"]:
        found.append(f"{row['spills']} bytes of register spills")
    if row["max_shared_memory"] is not None and row["shared_memory"] > row["max_shared_memory"]:
        found.append(f"shared memory {row['shared_memory']} B > {row['max_shared_memory']} B")
    if row["kind"] in ("gemm", "attention") and not row["ieee_fp32"]:  # IEEE fp32 dots have no tensor-core path
        if row["arch"] == "sm_90" and not row["has_hgmma"]:
            found.append("no HGMMA (wgmma) in sm_90 SASS")
        if row["arch"] == "sm_90" and row["async_wgmma"] and row["wgmma_serialized"]:
            found.append("every wgmma waits for the previous one (serialised)")
        if row["arch"] == "sm_80" and not row["has_hmma"]:
            found.append("no HMMA (mma.sync) in sm_80 SASS")
    return found


def format_table(rows):
    """A fixed-width text table, one line per row, then a summary line."""
    columns = [("kernel", 26), ("config", 30), ("w", 2), ("s", 2), ("arch", 5), ("kind", 9), ("ok", 3),
               ("regs", 4), ("spill", 5), ("smem", 7), ("HGMMA", 5), ("HMMA", 4), ("serial", 6), ("problems", 0)]  # fmt: skip

    def cell(value):
        return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

    lines = [" ".join(name.ljust(width) for name, width in columns).rstrip()]
    for row in rows:
        values = [row["kernel"], row["config"], row["num_warps"], row["num_stages"], row["arch"], row["kind"],
                  row["compiled"], row["registers"], row["spills"], row["shared_memory"], row["has_hgmma"],
                  row["has_hmma"], row["wgmma_serialized"] if row["arch"] == "sm_90" else None,
                  "; ".join(problems(row))]  # fmt: skip
        lines.append(" ".join(cell(v).ljust(w) for v, (_, w) in zip(values, columns)).rstrip())
    bad = sum(1 for row in rows if problems(row))
    lines.append(f"{len(rows)} rows, {len(rows) - bad} clean, {bad} with problems")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastvit.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="GPU arch to compile for, e.g. sm_90 (repeatable; default sm_90 and sm_80)")
    parser.add_argument("--format", choices=("json", "table"), default="table")
    parser.add_argument("--kernel", help="only this kernel module (e.g. layer_norm) or jit function (e.g. _layer_norm_fwd_kernel)")
    parser.add_argument("--jobs", type=int, help="worker processes (default: CPU count, at most 8)")
    args = parser.parse_args(argv)
    try:
        archs = [f"sm_{parse_arch(a)}" for a in (args.arch or ["sm_90", "sm_80"])]
    except ValueError as error:
        parser.error(str(error))
    rows = inspect_kernels(archs, kernel=args.kernel, jobs=args.jobs)
    if args.kernel is not None and not rows:
        parser.error(f"--kernel {args.kernel!r} matches no kernel module or jit function")
    print(json.dumps(rows, indent=1) if args.format == "json" else format_table(rows))
    return 1 if any(problems(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
