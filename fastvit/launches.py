"""Count Triton kernel launches, and the HBM bytes they must move, for a forward (or forward + backward).

    with count_launches() as launches:
        model(images)
    launches.total, launches.by_kernel   # e.g. 5 per block + embed + statistics pass + head
    launches.bytes                       # modelled traffic: each launch's tensor arguments moved once

It wraps the `run` method that every `kernel[grid](...)` call goes through (the compiled JITFunction,
or the interpreter's InterpretedFunction), so it works on a GPU and through the CPU interpreter alike.
An autotuned kernel counts each benchmarking launch during its first (tuning) call; warm it up first.

`bytes` is the compulsory-traffic model: every distinct tensor argument of a launch (its logical extent,
or its storage when smaller, as for broadcasts) read or written once. Real kernels move more (tiles
re-read across programs, partly from L2); eager PyTorch's count under the same model is the fair
comparison (benchmarks/benchlib.count_eager).

count_launches(dry_run=True), interpreter only, counts without running any program: full-size shapes
(ViT-B at batch 256) cost nothing, and the outputs are garbage.
"""
import collections
import contextlib


class LaunchCounter:
    def __init__(self):
        self.by_kernel = collections.Counter()
        self.bytes = 0

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    launches = total

    def __repr__(self):
        return f"LaunchCounter(total={self.total}, bytes={self.bytes}, by_kernel={dict(self.by_kernel)})"


def tensor_bytes(t) -> int:
    """Bytes a kernel must move for tensor t: its logical extent, or its storage if smaller (broadcasts)."""
    logical = t.numel() * t.element_size()
    try:
        return min(logical, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # meta / fake tensors have no storage to measure
        return logical


def distinct_tensor_bytes(values) -> int:
    """tensor_bytes summed over the distinct tensors (same data, shape and strides count once) in values."""
    import torch

    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor):
            key = (v.data_ptr() if v.device.type != "meta" else id(v), tuple(v.shape), tuple(v.stride()))
            if key not in seen:
                seen.add(key)
                total += tensor_bytes(v)
    return total


def _launch_classes():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return (JITFunction, InterpretedFunction)


@contextlib.contextmanager
def count_launches(dry_run: bool = False):
    """Within the block, count every Triton kernel launch by kernel name and the bytes it must move.
    dry_run=True skips the programs (interpreter only). Not thread-safe."""
    from fastvit.kernels._helpers import is_interpreter

    if dry_run and not is_interpreter():
        raise ValueError("dry_run: counting without running needs the Triton interpreter (TRITON_INTERPRET=1)")
    counter = LaunchCounter()
    originals = {cls: cls.run for cls in _launch_classes()}

    def counting(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            name = self.fn.__name__ if hasattr(self, "fn") else self.__name__
            counter.by_kernel[name] += 1
            counter.bytes += distinct_tensor_bytes(list(args) + list(kwargs.values()))
            return None if dry_run else original(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        yield counter
    finally:
        for cls, original in originals.items():
            cls.run = original
