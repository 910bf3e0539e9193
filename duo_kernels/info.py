"""``python -m duo_kernels.info``: versions, the backends this machine can run (and why not), and
where the native build cache lives. Building the native kernels is part of the check, so the first
run on a machine takes a minute."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import torch

from duo_kernels import _dispatch, _native
from duo_kernels._version import __version__


def _tool_version(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{exe} (version unknown: {exc})"
    return f"{out[-1] if cmd[0] == 'nvcc' else out[0]} ({exe})" if out else exe


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({exc})"
    return triton.__version__


# The devices a backend can serve at all: the native "cpu"/"cuda" backends serve one each.
SERVED = {"reference": ("cpu", "cuda"), "triton": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",)}


def _verdicts(backend: str) -> list[str]:
    verdicts = []
    for device in SERVED[backend]:
        if device == "cuda" and not torch.cuda.is_available():
            ok, why = False, _native.status(cuda=True)[1]
        else:
            ok, why = _dispatch.backend_status(backend, torch.device(device))
        verdicts.append(f"{device}: yes" if ok else f"{device}: no, {why}")
    return verdicts


def report() -> list[str]:
    lines = [
        f"duo-kernels   {__version__}",
        f"python        {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton        {_triton_version()}",
        f"C++ compiler  {_tool_version([os.environ.get('CXX', 'c++'), '--version'])}",
        f"nvcc          {_tool_version(['nvcc', '--version'])}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU           {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU           none visible")
    for var in ("TRITON_INTERPRET", _dispatch.ENV_VAR, "DUO_KERNELS_CACHE"):
        lines.append(f"{var:<13} {os.environ.get(var, '(unset)')}")
    lines.append("")
    lines.append("backends (which tensors each can run on):")
    for backend in _dispatch.BACKENDS:
        lines.append(f"  {backend:<10} " + "; ".join(_verdicts(backend)))
    lines.append("")
    lines.append(f"native build cache: {_native.cache_dir()}")
    lines.append(f"  this machine's build: {_native.cache_dir() / _native.build_key(_native._want_cuda())}")
    return lines


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
