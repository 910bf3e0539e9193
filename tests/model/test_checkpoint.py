"""Checkpoints under faults: a stale step folder, a full disk, corrupt files, runs that do not fit, a
NaN loss; each error is one line on the command line."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from duo_model import checkpoint, cli
from duo_model.checkpoint import CheckpointError, read_checkpoint
from duo_model.distill import DistillConfig, distill
from duo_model.runtime import RunError
from duo_model.train import train
from tests.model.helpers import tiny_config, write_corpus


def small(corpus, out_dir, cache, **overrides):
    settings = dict(max_steps=6, save_every=2, log_every=2, eval_batches=1, curriculum_end=3)
    settings.update(overrides)
    return tiny_config(corpus, out_dir, cache, **settings)


def assert_same_weights(a_dir, b_dir):
    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    assert a["state"]["step"] == b["state"]["step"]
    for part in ("model", "ema", "optimizer"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_a_new_run_never_adopts_a_step_folder_it_did_not_write(corpus, cache, tmp_path, monkeypatch):
    """A run killed between renaming step-2 into place and pointing latest.json at it leaves step-2
    behind; a new run (another seed) in the same folder writes its own step-2 and ends with its own
    weights, and a pointer to a folder another run wrote is refused."""
    def killed(path, data):
        raise KeyboardInterrupt  # dies before latest.json is written

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        train(small(corpus, tmp_path / "run", cache, seed=1))
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()
    train(small(corpus, tmp_path / "run", cache, seed=2))
    train(small(corpus, tmp_path / "clean", cache, seed=2))
    assert_same_weights(tmp_path / "clean", tmp_path / "run")

    # a pointer to a folder of another run
    folder = tmp_path / "run" / "checkpoints"
    pointer = json.loads((folder / "latest.json").read_text())
    (folder / "latest.json").write_text(json.dumps({**pointer, "run_id": "another"}))
    with pytest.raises(CheckpointError, match="which another run wrote"):
        read_checkpoint(tmp_path / "run")


def test_a_full_disk_fails_cleanly_and_resume_works_once_space_is_freed(corpus, cache, tmp_path, monkeypatch,
                                                                           capsys):
    real_write = checkpoint._write_file

    def disk_full(path, data):
        if ".step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", disk_full)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    args = ["train"] + [f"{k}={v}" for k, v in vars(small(corpus, tmp_path / "run", cache)).items()]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the run's progress lines
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert error.startswith("duo train: error: could not write checkpoint") and "No space left on device" in error
    assert "step-00000002 is intact" in error, error
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-00000002"]  # no temporaries left
    monkeypatch.undo()
    (folder / ".latest.json.dead.tmp").write_text("{")  # a killed pointer update: cleaned at start
    train(small(corpus, tmp_path / "run", cache), resume=True)
    assert not list(folder.glob(".*"))
    train(small(corpus, tmp_path / "straight", cache))
    assert_same_weights(tmp_path / "straight", tmp_path / "run")


def test_old_checkpoints_are_pruned_before_writing_when_space_is_short(corpus, cache, tmp_path, monkeypatch):
    present = []
    real_write = checkpoint._write_file

    def watch(path, data):
        if ".step-00000006" in str(path) and not present:
            present.append(sorted(p.name for p in (path.parent.parent).glob("step-*")))
        real_write(path, data)

    real_usage = shutil.disk_usage

    def usage(path):
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, used, 0 if len(list(checkpoint.Path(path).glob("step-*"))) > 1
                                      else free)

    monkeypatch.setattr(checkpoint, "_write_file", watch)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
    train(small(corpus, tmp_path / "run", cache, keep_checkpoints=3))
    assert present == [["step-00000004"]]


def test_corrupt_checkpoint_files_are_one_line_errors_naming_the_file(corpus, cache, tmp_path, capsys):
    train(small(corpus, tmp_path / "run", cache, max_steps=2))
    capsys.readouterr()
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    pristine = {p.name: p.read_bytes() for p in step.iterdir()}
    cases = {
        "ema.safetensors": lambda b: b[:len(b) // 2],  # truncated
        "model.safetensors": lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:],  # one bit flipped in a weight
        "optimizer.safetensors": lambda b: b"\x00" * 16,  # no header
        "config.json": lambda b: b[:-3],  # cut JSON
        "tokenizer.json": lambda b: b"[]",  # not an object
        "state.json": lambda b: b"{\"step\": 2",
    }
    for name, corrupt in cases.items():
        (step / name).write_bytes(corrupt(pristine[name]))
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            read_checkpoint(tmp_path / "run")
        assert cli.main(["eval", str(tmp_path / "run"), f"cache_dir={cache}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "Traceback" not in err[0], err
        (step / name).write_bytes(pristine[name])
    (step / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete \(missing \['ema.safetensors'\]\)"):
        read_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text("{\"step\":")
    with pytest.raises(CheckpointError, match=r"latest\.json is corrupt"):
        read_checkpoint(tmp_path / "run")


def test_resume_refuses_another_kind_of_run_and_changed_data(corpus, cache, tmp_path):
    train(small(corpus, tmp_path / "duo", cache, max_steps=2))
    dcd = DistillConfig(init=str(tmp_path / "duo"), out_dir=str(tmp_path / "dcd"), cache_dir=str(cache), max_steps=2,
                        rounds=1, batch_size=8, eval_batches=1, progress=False, num_threads=1)
    distill(dcd)
    before = sorted(p.name for p in (tmp_path / "dcd" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"is a distill run, this is a train run: continue it with `duo distill"):
        train(small(corpus, tmp_path / "dcd", cache, max_steps=4), resume=True)
    assert sorted(p.name for p in (tmp_path / "dcd" / "checkpoints").iterdir()) == before  # nothing pruned
    with pytest.raises(CheckpointError, match="is a train run, this is a distill run"):
        distill(DistillConfig(**{**vars(dcd), "out_dir": str(tmp_path / "duo"), "max_steps": 4}), resume=True)
    with pytest.raises(CheckpointError, match="is a train run, this is a ar run"):
        train(small(corpus, tmp_path / "duo", cache, max_steps=4, algo="ar"), resume=True)

    changed = write_corpus(tmp_path / "corpus", seed=1)  # the same tokenizer (bytes), other text
    with pytest.raises(CheckpointError, match="trained on other data"):
        train(small(changed, tmp_path / "duo", cache, max_steps=4), resume=True)


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, cache, tmp_path, monkeypatch):
    from duo_model.loss import DuoLoss

    real_forward = DuoLoss.forward
    calls = []

    def poisoned(self, x0, t, phase, seed):
        calls.append(1)
        loss = real_forward(self, x0, t, phase, seed)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(DuoLoss, "forward", poisoned)
    with pytest.raises(RunError, match="step 4: the loss or the gradient is not finite"):
        train(small(corpus, tmp_path / "run", cache))
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt["state"]["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())

    calls.clear()
    result = train(small(corpus, tmp_path / "skip", cache, on_nonfinite="skip"))
    lines = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped") for m in lines if "loss" in m] == [None, 1, 1]
    assert result["step"] == 6 and read_checkpoint(tmp_path / "skip")["state"]["ema_updates"] == 5


def test_an_unwritable_out_dir_is_a_one_line_error(corpus, cache, tmp_path, monkeypatch, capsys):
    real_mkdir = checkpoint.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Path, "mkdir", read_only)
    args = ["train"] + [f"{k}={v}" for k, v in vars(small(corpus, tmp_path / "run", cache)).items()]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"duo train: error: Read-only file system: {tmp_path / 'run'}"], err
