"""Choosing a backend for an op: ``impl="auto" | "triton" | "cuda" | "cpu" | "reference"``.

- ``"reference"``: the plain-PyTorch path of :mod:`duo_kernels.reference`; runs everywhere.
- ``"cpu"`` / ``"cuda"``: the compiled ``csrc/`` kernels (:mod:`duo_kernels._native`), for CPU or CUDA
  tensors. An op whose fast CPU path is plain PyTorch (chunked, bounded memory) marks it with
  :func:`pure_torch`; it then runs wherever the tensors are on the CPU, with no build.
- ``"triton"``: the Triton kernels, for CUDA tensors, or for CPU tensors under ``TRITON_INTERPRET=1``.
- ``"auto"`` (the default): ``DUO_KERNELS_IMPL`` if that is set, else the op's first backend that can
  run on the tensors' device. It skips a backend only because it cannot run here (no GPU, no compiler,
  a failed build, which it reports once as a warning), never because a kernel raised.

An explicit backend that the op has no kernel for raises ``NotImplementedError``; one that cannot run
on this machine or device raises ``RuntimeError`` and says why. Neither falls back.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
IMPLS = ("auto",) + BACKENDS
ENV_VAR = "DUO_KERNELS_IMPL"

# The order "auto" tries backends in, per device type; an op may list fewer.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


# Triton reads TRITON_INTERPRET when the package's kernels are defined, at import: the value then counts.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in the interpreter (TRITON_INTERPRET=1 when duo_kernels was imported)."""
    return _INTERPRETED_AT_IMPORT


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc}); install it with `pip install triton` (Linux only)"
    return None


def backend_status(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors on ``device`` here, and if not, why."""
    device = torch.device(device)
    if backend == "reference":
        return True, ""
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return False, error
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreted():
            return True, ""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return False, ("TRITON_INTERPRET=1 was set after duo_kernels was imported, so its Triton kernels were "
                           "defined for the GPU; set it before the import (e.g. in the shell)")
        return False, (
            f"triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"duo_kernels is imported); got tensors on {device}"
        )
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return False, f"impl={backend!r} runs on {backend} tensors; got tensors on {device}"
        from duo_kernels import _native

        return _native.status(cuda=backend == "cuda")
    raise ValueError(f"impl must be one of {IMPLS}, got {backend!r}")


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR)
        if env:
            if env not in IMPLS:
                raise ValueError(f"{ENV_VAR} must be one of {IMPLS}, got {env!r}")
            return env
    return impl


_warned: set[tuple[str, str]] = set()


def pure_torch(fn: Callable) -> Callable:
    """Marks a "cpu" kernel written in PyTorch: it needs no native build."""
    fn.duo_pure_torch = True
    return fn


def _status(backend: str, device: torch.device, fn: Callable) -> tuple[bool, str]:
    if backend == "cpu" and getattr(fn, "duo_pure_torch", False):
        if device.type != "cpu":
            return False, f"impl='cpu' runs on cpu tensors; got tensors on {device}"
        return True, ""
    return backend_status(backend, device)


def dispatch(op: str, impl: str, device: torch.device, kernels: dict[str, Callable]) -> tuple[str, Callable]:
    """The backend name and function that run ``op`` for ``impl`` on ``device``.

    ``kernels`` maps backend names to functions; it always holds ``"reference"``.
    """
    impl = check_impl(impl)
    device = torch.device(device)
    if impl != "auto":
        if impl not in kernels:
            have = ", ".join(k for k in BACKENDS if k in kernels)
            raise NotImplementedError(f"{op} has no {impl!r} kernel (it has: {have})")
        ok, why = _status(impl, device, kernels[impl])
        if not ok:
            raise RuntimeError(f"{op}: impl={impl!r} cannot run: {why}")
        return impl, kernels[impl]
    for backend in AUTO_ORDER.get(device.type, ("reference",)):
        if backend not in kernels:
            continue
        ok, why = _status(backend, device, kernels[backend])
        if ok:
            return backend, kernels[backend]
        if backend != "triton" and (op, backend) not in _warned:
            _warned.add((op, backend))
            warnings.warn(f"{op}: impl='auto' skips {backend!r}: {why}", RuntimeWarning, stacklevel=3)
    return "reference", kernels["reference"]


@torch.compiler.assume_constant_result
def resolve_backend(op: str, impl: str, device: str, kernels: dict[str, Callable]) -> str:
    """The name of the backend that :func:`dispatch` picks, for ops whose fast backends are
    ``torch.library`` ops taking that name: a constant for torch.compile, which calls it once per
    trace (``device`` is ``str(tensor.device)``)."""
    return dispatch(op, impl, torch.device(device), kernels)[0]

