"""Backend selection: which implementation an op runs.

    "triton"  the fused Triton kernels: compiled on CUDA tensors, interpreted on CPU tensors when
              TRITON_INTERPRET=1 was set before triton was imported.
    "torch"   plain PyTorch ops with the same parameters (the fallback, and the eager side of parity tests).
    "auto"    triton wherever it can run for the tensors at hand, torch otherwise (the default).

The environment variable FASTVIT_BACKEND sets the initial value; set_backend() and the use_backend()
context manager change it at run time.
"""
import contextlib
import os

import torch

from fastvit.kernels._helpers import can_run_on, is_interpreter

BACKENDS = ("auto", "triton", "torch")


def _validated(name, source):
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a str, one of {', '.join(map(repr, BACKENDS))}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return name


_backend = _validated(os.environ.get("FASTVIT_BACKEND", "auto"), "FASTVIT_BACKEND")


def set_backend(name: str) -> None:
    """Select "auto", "triton" or "torch" for every fastvit op from now on."""
    global _backend
    _backend = _validated(name, "set_backend(name)")


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block of code under another backend, restoring the previous one afterwards."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(device: torch.device, *tensors) -> bool:
    """Whether ops on tensors of `device` run the Triton kernels under the current backend.

    `tensors` (the op's tensor arguments, None allowed): inside a torch.func transform (grad, vmap, jvp,
    functional_call under grad) they are functorch wrappers, and the custom ops have no batching or
    forward-mode rules (jvp would silently give zero tangents), so such calls take the plain PyTorch path,
    which the transforms handle. Raises RuntimeError when "triton" is forced on a device where the kernels
    cannot run.
    """
    if _backend == "torch" or _in_functorch_transform(tensors):
        return False
    runnable = can_run_on(device)
    if _backend == "triton" and not runnable:
        if device.type == "cpu":
            hint = "set TRITON_INTERPRET=1 before importing triton to interpret the kernels on CPU"
        elif device.type == "cuda" and is_interpreter():
            hint = "TRITON_INTERPRET=1 is set, which makes triton interpret instead of compile"
        else:
            hint = "the kernels run on CUDA devices only"
        raise RuntimeError(f"fastvit backend 'triton' cannot run on device {device}: {hint}; "
                           f"use set_backend('auto') to fall back to torch")
    return runnable


def _in_functorch_transform(tensors) -> bool:
    if torch.compiler.is_compiling():  # Dynamo traces its own way through torch.func; the check is eager-only
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(t is not None and wrapped(t) for t in tensors)
