"""Where each backend's test tensors live: Triton on the GPU when there is one, else interpreted."""

import torch


def device_for(impl: str) -> torch.device:
    if impl in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
