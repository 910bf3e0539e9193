"""Helpers shared by the pytest-benchmark files."""

import torch


def bench_device(impl: str) -> torch.device:
    """The GPU when there is one, so that every path but the C++ CPU kernels is timed where it runs."""
    return torch.device("cpu" if impl == "cpu" or not torch.cuda.is_available() else "cuda")


def synced(fn, device: torch.device):
    """``fn`` waited for: without the synchronize, a GPU call would time only its launch."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
