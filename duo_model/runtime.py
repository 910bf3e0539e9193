"""Process-level helpers shared by training and evaluation: derived seeds, ranks and devices, autocast."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from duo_model.config import ConfigError


class RunError(RuntimeError):
    """A run that cannot go on (a NaN loss, say), with what to do about it; the command line prints it
    as one line."""


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and keys (step, sequence index, ...), the same on every rank."""
    digest = hashlib.blake2b(json.dumps([seed, *keys]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device_choice: str) -> tuple[Distributed, torch.device]:
    """Rank and device from torchrun's environment (one process, rank 0, if there is none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = Distributed(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice == "cuda":
        device_choice = f"cuda:{env.local_rank}"
    device = torch.device(device_choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device_choice}: torch sees no CUDA device; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device_choice}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if env.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def autocast_context(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
