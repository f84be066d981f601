"""Count Triton kernel launches: how many a forward (or forward + backward) of a model issues.

    with count_launches() as launches:
        model(images)
    launches.total, launches.by_kernel   # e.g. 5 per block + embed + head

It wraps the `run` method that every `kernel[grid](...)` call goes through (the compiled JITFunction,
or the interpreter's InterpretedFunction), so it works on a GPU and through the CPU interpreter alike.
An autotuned kernel counts each benchmarking launch during its first (tuning) call; warm it up first.
"""
import collections
import contextlib


class LaunchCounter:
    def __init__(self):
        self.by_kernel = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def __repr__(self):
        return f"LaunchCounter(total={self.total}, by_kernel={dict(self.by_kernel)})"


def _launch_classes():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return (JITFunction, InterpretedFunction)


@contextlib.contextmanager
def count_launches():
    """Within the block, count every Triton kernel launch by kernel name. Not thread-safe."""
    counter = LaunchCounter()
    originals = {cls: cls.run for cls in _launch_classes()}

    def counting(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                counter.by_kernel[self.fn.__name__ if hasattr(self, "fn") else self.__name__] += 1
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        yield counter
    finally:
        for cls, original in originals.items():
            cls.run = original
