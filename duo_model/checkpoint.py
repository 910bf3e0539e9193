"""Checkpoints: safetensors weights + JSON, committed atomically.

A run folder holds ``checkpoints/step-XXXXXXXX/`` folders and ``checkpoints/latest.json``. Each
checkpoint folder has:

- ``model.safetensors``: the raw weights; ``ema.safetensors``: the EMA weights (same keys; the ones
  evaluation and sampling use); ``optimizer.safetensors``: AdamW's moments (``state.<i>.<name>``);
- ``config.json``: the run's settings, the DiT shape, the tokenizer's identity, the ops used;
- ``state.json``: step, tokens seen, EMA update count, the optimizer's param groups;
- ``tokenizer.json``: the tokenizer, rebuildable offline (a trained BPE is stored whole);
- any further ``<name>.safetensors`` a run needs to resume (distillation: ``teacher.safetensors``).

A checkpoint is written into a temporary folder, flushed, then renamed to its final name
(``os.replace``; atomic on POSIX), and only then does ``latest.json`` (itself written to a temporary
file and renamed) point at it. A crash at any moment leaves the previous checkpoint intact and
pointed to; a half-written temporary folder is ignored and removed by the next save.

Loading a model for evaluation or sampling::

    model, info = load_model("runs/duo")          # a run folder (its latest checkpoint) or a step folder
    tokenizer = info["tokenizer"]
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from duo_model.data import atomic_write_bytes, tokenizer_from_json
from duo_model.dit import DiT, DiTConfig

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "state.json",
         "tokenizer.json")
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit the run or data it is used with."""


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as flat tensors ``state.<param index>.<name>`` and its JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{name}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, state in sd["state"].items() for name, v in state.items()}
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, config: dict, state: dict, tokenizer: dict,
                    keep: int = 2, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``step-<step>`` atomically, point ``latest.json`` at it, keep the newest ``keep``.
    ``extra`` maps a name to more tensors, written as ``<name>.safetensors``."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    if not final.exists():
        tmp = folder / f".step-{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors, groups = optimizer_tensors(optimizer)
        _write_file(tmp / "model.safetensors", _tensors_bytes(model.state_dict()))
        _write_file(tmp / "ema.safetensors", _tensors_bytes(ema))
        _write_file(tmp / "optimizer.safetensors", _tensors_bytes(opt_tensors))
        for name, tensors in (extra or {}).items():
            _write_file(tmp / f"{name}.safetensors", _tensors_bytes(tensors))
        _write_file(tmp / "config.json", json.dumps(config, indent=2).encode())
        _write_file(tmp / "state.json", json.dumps({**state, "optimizer_param_groups": groups}, indent=2).encode())
        _write_file(tmp / "tokenizer.json", json.dumps(tokenizer).encode())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(folder)
    atomic_write_bytes(folder / LATEST, json.dumps({"step": step, "path": final.name}).encode())
    _prune(folder, keep, final.name)
    return final


def _prune(folder: Path, keep: int, current: str) -> None:
    steps = sorted(p.name for p in folder.glob("step-*") if p.is_dir())
    for name in steps[:-keep] if keep > 0 else []:
        if name != current:
            shutil.rmtree(folder / name, ignore_errors=True)
    for tmp in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a step folder or a run folder (its ``latest.json``)."""
    path = Path(path)
    if (path / "config.json").is_file():
        folder = path
    else:
        pointer = path / "checkpoints" / LATEST
        if not pointer.is_file():
            raise CheckpointError(f"no checkpoint at {str(path)!r}: expected a run folder with "
                                  f"checkpoints/{LATEST} or a checkpoint folder with config.json")
        folder = path / "checkpoints" / json.loads(pointer.read_text())["path"]
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete (missing {missing})")
    return folder


def latest(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None if it has none."""
    if not (Path(run_dir) / "checkpoints" / LATEST).is_file():
        return None
    return resolve(run_dir)


def read_checkpoint(path: str | Path) -> dict:
    """Everything in a checkpoint: ``model``, ``ema``, ``optimizer`` and any extra tensor files (tensor
    dicts, by file name), ``config``, ``state``, ``tokenizer`` (JSON dicts) and ``path``."""
    folder = resolve(path)
    out = {"path": folder}
    for file in sorted(folder.glob("*.safetensors")):
        out[file.name[:-len(".safetensors")]] = load_tensors(file.read_bytes())
    for name in ("config", "state", "tokenizer"):
        out[name] = json.loads((folder / f"{name}.json").read_text())
    return out


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """The DiT of a checkpoint (EMA weights by default), in eval mode, and ``info``: the checkpoint's
    ``config``, ``state``, ``path`` and its rebuilt ``tokenizer``."""
    ckpt = read_checkpoint(path)
    model = DiT(DiTConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    model.to(device).eval()
    info = {k: ckpt[k] for k in ("config", "state", "path")}
    info["tokenizer"] = tokenizer_from_json(ckpt["tokenizer"])
    return model, info
