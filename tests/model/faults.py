"""The child side of the kill-and-resume test: one ``duo train`` or ``duo distill`` run in a forked
process, continued with ``--resume`` when its folder holds a checkpoint, that may SIGKILL itself at
a chosen instant of checkpoint writing (``inject``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _kill_on_call(function, count: int, after: bool):
    """``function`` that kills this process on its ``count``-th call, before or after running it."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = function(*args, **kwargs)
        if calls[0] == count and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped


def run(command: str, settings: dict, inject: tuple[str, int, bool] | None) -> None:
    """Run ``command`` (train or distill) with ``settings``; ``inject = (where, count, after)`` kills the
    process at the ``count``-th call of ``where``: ``write`` (a file of a temporary checkpoint folder),
    ``replace`` (any ``os.replace``: the folder rename, ``latest.json``, the metrics), ``fsync`` (a
    folder's fsync) or ``prune``."""
    import torch

    from duo_model import checkpoint
    from duo_model.distill import DistillConfig, distill
    from duo_model.train import TrainConfig, train

    torch.set_num_threads(1)
    if inject is not None:
        where, count, after = inject
        if where == "replace":
            os.replace = _kill_on_call(os.replace, count, after)
        else:
            name = {"write": "_write_file", "fsync": "_fsync_dir", "prune": "_prune"}[where]
            setattr(checkpoint, name, _kill_on_call(getattr(checkpoint, name), count, after))
    resume = (Path(settings["out_dir"]) / "checkpoints" / "latest.json").exists()
    if command == "train":
        train(TrainConfig(**settings), resume=resume)
    else:
        distill(DistillConfig(**settings), resume=resume)
