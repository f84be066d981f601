"""Validation and autocast helpers shared by every op in fastvit.ops.

Every public op validates its inputs here before anything is launched, so bad input gets a ValueError
or TypeError that names the argument, what it is and what was expected.
"""
import contextlib
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES, optional=False):
    """Type, rank and dtype of one argument."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({expected}), got {describe(t)}")


def check_shape(name, t, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {describe(t)}")


def check_same_device(**tensors):
    """All non-None tensors on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_same_dtype(**tensors):
    """All non-None tensors of one dtype (outside autocast, ops never cast behind the user's back)."""
    present = {k: v for k, v in tensors.items() if v is not None}
    if len({v.dtype for v in present.values()}) > 1:
        listing = ", ".join(f"{k} is {v.dtype}" for k, v in present.items())
        raise TypeError(f"expected one dtype, got {listing}; cast them, or run under torch.autocast")


def check_real(name, value, *, expected: str, valid) -> float:
    """A Python or NumPy real number (not a bool) for which valid(float(value)) holds, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not valid(float(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_probability(name, p) -> float:
    """A dropout probability: a float in [0, 1)."""
    return check_real(name, p, expected="a float in [0, 1)", valid=lambda v: 0.0 <= v < 1.0)


def check_positive(name, value) -> float:
    """A finite float > 0 (LayerNorm's eps, an MLP ratio)."""
    return check_real(name, value, expected="a finite float > 0", valid=lambda v: 0.0 < v < math.inf)


def check_int(name, value, minimum: int) -> int:
    """A Python or NumPy integer (not a bool) >= minimum, as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def _has_autocast(device: torch.device) -> bool:
    """Whether torch.autocast knows this device type (it raises for e.g. meta)."""
    try:
        torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False
    return True


def autocast_dtype(device: torch.device):
    """The autocast compute dtype active for `device`'s type, or None outside autocast."""
    if _has_autocast(device) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_off(device: torch.device):
    """A context with autocast off for `device`'s type (the torch fallback runs with dtypes resolved)."""
    return torch.autocast(device.type, enabled=False) if _has_autocast(device) else contextlib.nullcontext()


def or_empty(t, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an output that was not asked for comes back as an empty tensor, a new
    one each time (a custom op's outputs may not alias each other)."""
    return like.new_empty((0,)) if t is None else t


def contiguous_vector(t):
    """A 1-D parameter (bias, LayerNorm affine, layer scale) as the kernels index it: unit stride. A strided
    or expanded view is copied (a few KB; differentiable, so its gradient flows back to the view)."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit last-dim stride: a view when the leading dims collapse, else a copy.

    The kernels accept any row stride, so timm's usual layouts (contiguous, row slices) never copy; a
    transposed last dim is the documented case that does.
    """
    if x.dim() >= 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])
