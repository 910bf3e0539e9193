"""Checkpoints: safetensors weights + JSON, committed atomically, checked on load.

A run folder holds ``checkpoints/step-XXXXXXXX/`` folders and ``checkpoints/latest.json``. Each
checkpoint folder has:

- ``model.safetensors``: the raw weights; ``ema.safetensors``: the EMA weights (same keys; the ones
  evaluation and sampling use); ``optimizer.safetensors``: AdamW's moments (``state.<i>.<name>``);
- ``config.json``: the run's settings, the DiT shape, the tokenizer's identity, the ops used, and
  ``run``: the kind of run (``train``, ``ar`` or ``distill``) and the fingerprint of its data;
- ``state.json``: step, tokens seen, EMA update count, the optimizer's param groups, the run's id and
  the SHA-256 of every other file of the folder (``files``);
- ``tokenizer.json``: the tokenizer, rebuildable offline (a trained BPE is stored whole);
- any further ``<name>.safetensors`` a run needs to resume (distillation: ``teacher.safetensors``).

Guarantees, whatever the instant a process is killed or the disk fills up:

- a checkpoint is written into a fresh temporary folder, every file fsynced, then renamed to its
  final name (``os.replace``; atomic on POSIX), and only then does ``latest.json`` (written to a
  temporary file, fsynced and renamed) point at it: ``latest.json`` always names a complete checkpoint;
- ``latest.json`` and every checkpoint carry the id of the run that wrote them; a run never adopts a
  step folder it did not write (a leftover one is replaced) and :func:`resolve` refuses a pointer whose
  folder belongs to another run;
- :func:`clean` (called when a run starts or resumes) removes what a killed run left: temporary
  folders and files, and step folders it renamed but never pointed to;
- old checkpoints are pruned before writing when the disk lacks room for a new one; a write that
  still fails (no space, read-only) removes its temporary folder and raises :class:`CheckpointError`,
  leaving the previous checkpoint intact, so ``--resume`` works again once space is freed;
- :func:`read_checkpoint` checks each file against its hash and raises :class:`CheckpointError` naming
  the file that is missing, corrupt or altered.

Loading a model for evaluation or sampling::

    model, info = load_model("runs/duo")          # a run folder (its latest checkpoint) or a step folder
    tokenizer = info["tokenizer"]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from duo_model.data import DataError, atomic_write_bytes, tokenizer_from_json
from duo_model.dit import DiT, DiTConfig

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "state.json",
         "tokenizer.json")
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit the run or data it is used with,
    or one that could not be written."""


def new_run_id() -> str:
    """A fresh id for a new run; checkpoints and ``latest.json`` record it."""
    return uuid.uuid4().hex


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _read_latest(folder: Path) -> dict | None:
    """``latest.json`` of a ``checkpoints`` folder, None if there is none."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        record = json.loads(pointer.read_text())
        if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                and isinstance(record.get("step"), int)):
            raise ValueError("not a checkpoint pointer")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is corrupt ({exc}); point it at a complete step folder or start "
                              "another out_dir") from None
    return record


def _step_of(name: str) -> int | None:
    try:
        return int(name[len("step-"):]) if name.startswith("step-") else None
    except ValueError:
        return None


def clean(run_dir: str | Path) -> None:
    """Remove what a killed run left in ``run_dir/checkpoints``: temporary folders and files, and the step
    folders it renamed but never pointed ``latest.json`` at (newer than the latest one, or any if there
    is no ``latest.json``). Call it from the one process that writes the run folder, before it trains."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    record = _read_latest(folder)
    newest = record["step"] if record else -1
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".step-") or (name.startswith(f".{LATEST}.") and name.endswith(".tmp")):
            _remove(path)
        elif (step := _step_of(name)) is not None and step > newest:
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, config: dict, state: dict, tokenizer: dict,
                    keep: int = 2, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``step-<step>`` atomically, point ``latest.json`` at it, keep the newest ``keep`` (0: all).
    ``state`` must hold the run's ``run_id``; ``extra`` maps a name to more tensors, written as
    ``<name>.safetensors``. Raises :class:`CheckpointError` if the disk is full or not writable (the
    previous checkpoint stays intact and pointed to)."""
    run_id = state["run_id"]
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step-{step:08d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record = _read_latest(folder)
        if record and record["path"] == final.name and record.get("run_id") == run_id:
            return final  # this step is already committed by this run
        opt_tensors, groups = optimizer_tensors(optimizer)
        files = {"model.safetensors": _tensors_bytes(model.state_dict()), "ema.safetensors": _tensors_bytes(ema),
                 "optimizer.safetensors": _tensors_bytes(opt_tensors)}
        files.update({f"{name}.safetensors": _tensors_bytes(t) for name, t in (extra or {}).items()})
        files["config.json"] = json.dumps(config, indent=2).encode()
        files["tokenizer.json"] = json.dumps(tokenizer).encode()
        hashes = {name: _sha256(data) for name, data in files.items()}
        files["state.json"] = json.dumps({**state, "optimizer_param_groups": groups, "files": hashes},
                                         indent=2).encode()
        needed = sum(map(len, files.values())) + (1 << 20)
        if keep > 0 and shutil.disk_usage(folder).free < needed:
            _prune(folder, 1, record["path"] if record else None)  # room first: keep only the latest
        _commit(folder, final, files, step, run_id)
    except OSError as exc:
        where = f"the previous checkpoint {record['path']} is intact" if record else "no checkpoint was kept"
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {reason} ({exc.filename or folder}); {where}; "
                              "free space or fix the folder, then continue with --resume") from None
    _prune(folder, keep, final.name)
    return final


def _commit(folder: Path, final: Path, files: dict[str, bytes], step: int, run_id: str) -> None:
    tmp = folder / f".step-{step:08d}.tmp-{os.getpid()}"
    stale = folder / f".step-{step:08d}.stale-{os.getpid()}"
    try:
        _remove(tmp)
        tmp.mkdir()
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        if final.exists():  # left by a run killed before it pointed at it: never adopted, replaced
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        _remove(tmp)
        raise
    atomic_write_bytes(folder / LATEST, json.dumps({"step": step, "path": final.name, "run_id": run_id}).encode())
    _fsync_dir(folder)
    _remove(stale)


def _prune(folder: Path, keep: int, current: str | None) -> None:
    """Keep the newest ``keep`` step folders (``current`` always; ``keep`` 0: all)."""
    if keep <= 0:
        return
    steps = sorted(p.name for p in folder.glob("step-*") if p.is_dir() and _step_of(p.name) is not None)
    for name in steps[:-keep]:
        if name != current:
            shutil.rmtree(folder / name, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a step folder or a run folder (its ``latest.json``)."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "state.json").is_file():
        folder, run_id = path, None
    else:
        record = _read_latest(path / "checkpoints")
        if record is None:
            raise CheckpointError(f"no checkpoint at {str(path)!r}: expected a run folder with "
                                  f"checkpoints/{LATEST} or a checkpoint folder with config.json")
        folder, run_id = path / "checkpoints" / record["path"], record.get("run_id")
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete (missing {missing})")
    if run_id is not None:
        written_by = _read_json(folder / "state.json").get("run_id")
        if written_by != run_id:
            raise CheckpointError(f"{path / 'checkpoints' / LATEST} points at {folder.name}, which another run wrote "
                                  f"(run {written_by}, not {run_id}); remove the folder or start another out_dir")
    return folder


def latest(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None if it has none."""
    if not (Path(run_dir) / "checkpoints" / LATEST).is_file():
        return None
    return resolve(run_dir)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); use another checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror})") from None


def read_checkpoint(path: str | Path) -> dict:
    """Everything in a checkpoint: ``model``, ``ema``, ``optimizer`` and any extra tensor files (tensor
    dicts, by file name), ``config``, ``state``, ``tokenizer`` (JSON dicts) and ``path``. Every file is
    checked against the hash ``state.json`` records (:class:`CheckpointError` names a bad one)."""
    folder = resolve(path)
    out = {"path": folder}
    state = _read_json(folder / "state.json")
    hashes = state.get("files")
    if hashes is not None:
        absent = [name for name in hashes if not (folder / name).is_file()]
        if absent:
            raise CheckpointError(f"checkpoint {folder} is incomplete (missing {absent})")
    for file in sorted(folder.iterdir()):
        if file.name == "state.json" or not file.name.endswith((".safetensors", ".json")):
            continue
        data = file.read_bytes()
        if hashes is not None and file.name in hashes and _sha256(data) != hashes[file.name]:
            raise CheckpointError(f"{file} is corrupt: its content does not match the hash written with it; "
                                  "use another checkpoint")
        if file.name.endswith(".safetensors"):
            try:
                out[file.name[:-len(".safetensors")]] = load_tensors(data)
            except Exception as exc:  # safetensors raises its own error type for a bad header
                raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
        else:
            out[file.name[:-len(".json")]] = _read_json(file)
    out["state"] = state
    for name in ("config", "tokenizer"):
        if name not in out:
            raise CheckpointError(f"checkpoint {folder} is incomplete (missing {name}.json)")
    return out


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """The DiT of a checkpoint (EMA weights by default), in eval mode, and ``info``: the checkpoint's
    ``config``, ``state``, ``path`` and its rebuilt ``tokenizer``."""
    ckpt = read_checkpoint(path)
    try:
        model = DiT(DiTConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
        tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    except (KeyError, TypeError, RuntimeError, DataError) as exc:
        raise CheckpointError(f"checkpoint {ckpt['path']} does not describe a model this version can load "
                              f"({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    model.to(device).eval()
    info = {k: ckpt[k] for k in ("config", "state", "path")}
    info["tokenizer"] = tokenizer
    return model, info
