"""Argument checks shared by the reference and the fast ops.

Each check raises ``ValueError`` naming the argument, before any kernel runs. Checks that would need
the values of a device tensor (ids in range, alpha in (0, 1]) read them only for CPU tensors or when
``DUO_KERNELS_CHECK_VALUES=1``: reading a CUDA tensor synchronizes the host, which no op's forward may
do by default. They never read values while ``torch.compile`` traces (a value read is a
data-dependent graph break); eager calls check.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def values_checked(t: torch.Tensor) -> bool:
    """Whether value checks (ranges, finiteness) may read ``t``: without a host synchronization, and
    not while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("DUO_KERNELS_CHECK_VALUES") == "1"


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and not isinstance(value, np.bool_)


def is_number(value) -> bool:
    """A Python or NumPy real number (int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not isinstance(value, np.bool_)


def check_tensor(name: str, t, *, dtypes=None, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_vocab_size(vocab_size, name: str = "vocab_size") -> int:
    """An int V in [2, 2^31]; ``name`` says where it came from (e.g. ``logits.shape[-1]``)."""
    if not is_int(vocab_size):
        raise ValueError(f"{name} must be an int, got {vocab_size!r}")
    if not 2 <= vocab_size <= 2**31:
        raise ValueError(f"{name} must be in [2, 2^31], got {vocab_size}")
    return int(vocab_size)


def check_ids(name: str, ids, vocab_size: int, *, ndim: int | None = 2) -> None:
    """int64 token ids with every value in [0, vocab_size)."""
    check_tensor(name, ids, dtypes=(torch.int64,), ndim=ndim)
    if ids.numel() and values_checked(ids):
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), found values in [{lo}, {hi}]")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def per_token(name: str, value, shape: tuple[int, int], *, device, dtype=torch.float64) -> torch.Tensor:
    """A per-sequence or per-token scalar ((), (B,), (B, 1) or (B, L)) broadcast to (B, L)."""
    b, l = shape
    if not (isinstance(value, torch.Tensor) or is_number(value)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    # a Python number is taken at float64: torch.as_tensor would round 0.9 to float32 first
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64, device=device)
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        raise ValueError(f"{name} must be a floating-point tensor or a number, got dtype {t.dtype}")
    if t.device != torch.device(device) and t.dim() > 0:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if t.dim() == 1:
        if t.shape[0] != b:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match batch size {b}")
        t = t[:, None]
    elif t.dim() == 2:
        if t.shape[0] != b or t.shape[1] not in (1, l):
            raise ValueError(f"{name} must have shape ({b},), ({b}, 1) or ({b}, {l}); got {tuple(t.shape)}")
    elif t.dim() != 0:
        raise ValueError(f"{name} must have shape ({b},), ({b}, 1) or ({b}, {l}); got {tuple(t.shape)}")
    return t.to(dtype).expand(b, l)


def check_range(name: str, t: torch.Tensor, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> None:
    """Every value of ``t`` finite and in the interval (lo or [lo, hi or hi]."""
    if not values_checked(t) or t.numel() == 0:
        return
    # min and max propagate NaN and show +-inf: one pass checks finiteness and the interval
    tmin, tmax = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(tmin) and math.isfinite(tmax)):
        raise ValueError(f"{name} must be finite")
    below = tmin <= lo if lo_open else tmin < lo
    above = tmax >= hi if hi_open else tmax > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, found values in [{tmin}, {tmax}]")


def check_positive_number(name: str, value) -> float:
    if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)
