"""The GPU a Triton launch is tiled for.

Tiles and warp counts differ between a GPU (registers, shared memory per block) and the interpreter
(cost per program step). A launch site asks :func:`gpu_capability` for its device: the CUDA device's
compute capability, or None for CPU tensors in the interpreter. The compile gate (``tests/compile_gate.py``)
records the launches of the public ops under the interpreter with :func:`tiled_for` set, so that they
pick the tiles of the GPU it then compiles for.
"""

from __future__ import annotations

import contextlib

import torch

_gate_capability: tuple[int, int] | None = None


def gpu_capability(device) -> tuple[int, int] | None:
    """(major, minor) of the GPU that launches on ``device`` are tiled for; None: interpreter tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return _gate_capability


@contextlib.contextmanager
def tiled_for(capability: tuple[int, int]):
    """Within this block, launches on CPU tensors pick the tiles of a GPU of this compute capability."""
    global _gate_capability
    previous, _gate_capability = _gate_capability, tuple(capability)
    try:
        yield
    finally:
        _gate_capability = previous
