"""The trainer: the loss falls, phases and schedules, checkpoints survive a crash, resume checks."""

import json
import math

import pytest
import torch

from duo_model import checkpoint, cli
from duo_model.checkpoint import CheckpointError, read_checkpoint
from duo_model.loss import antithetic_t, curriculum_tau
from duo_model.train import EMA, batch_indices, train
from tests.model.helpers import tiny_config


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_loss_falls(corpus, cache, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", cache, curriculum="none", max_steps=200, batch_size=16, lr=1e-3,
                      warmup_steps=20, log_every=20, eval_batches=4)
    result = train(cfg)
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    # From ~V = 259 for a fresh (uniform) model to the perplexity of a learned byte language.
    assert result["val_ppl"] < 30


def test_curriculum_then_discrete_phase_with_the_tau_schedule(corpus, cache, tmp_path):
    for kind in ("topk", "dense"):
        cfg = tiny_config(corpus, tmp_path / kind, cache, curriculum=kind, max_steps=12, curriculum_end=8,
                          tau_log10_start=-1.0, tau_log10_end=-3.0, log_every=2)
        train(cfg)
        lines = [m for m in metrics(tmp_path / kind) if "loss" in m]
        assert [m["phase"] for m in lines] == [kind] * 4 + ["discrete"] * 2
        # tau of the step before each log line: 10^(-1 - 2 s / 8) for s = 1, 3, 5, 7.
        assert [m["tau"] for m in lines[:4]] == pytest.approx([10 ** (-1 - s / 4) for s in (1, 3, 5, 7)])
        assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in lines)


def test_schedules_and_batches():
    t = antithetic_t(8, torch.Generator().manual_seed(0))
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor()
    assert strata.tolist() == list(range(8))  # one time per eighth of [eps, 1]
    assert curriculum_tau(5, -1.0, -3.0, 10, 20) == pytest.approx(0.1)
    assert curriculum_tau(15, -1.0, -3.0, 10, 20) == pytest.approx(0.01)
    # An epoch of 10 batches of 4 visits 40 of the 42 sequences once each.
    seen = torch.cat([batch_indices(s, 4, 42, seed=1) for s in range(10)])
    assert len(seen.unique()) == 40
    assert not torch.equal(batch_indices(10, 4, 42, seed=1), batch_indices(0, 4, 42, seed=1))


def test_ema_decay_warms_up():
    layer = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    ema = EMA(layer, decay=0.9999)
    layer.weight.data.fill_(1.0)
    ema.update()  # decay (1 + 0)/(10 + 0) = 0.1
    assert float(ema.shadow[0]) == pytest.approx(0.9)


def test_a_crash_during_a_checkpoint_write_loses_nothing(corpus, cache, tmp_path, monkeypatch):
    reference = tiny_config(corpus, tmp_path / "straight", cache, save_every=10)
    train(reference)

    real_write = checkpoint._write_file

    def crash_midway(path, data):
        if ".step-00000020" in str(path) and path.name == "ema.safetensors":
            real_write(path, data[: len(data) // 2])  # the temporary file is partly written ...
            raise RuntimeError("simulated crash")  # ... when the process dies
        real_write(path, data)

    cfg = tiny_config(corpus, tmp_path / "crashed", cache, save_every=10)
    monkeypatch.setattr(checkpoint, "_write_file", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    monkeypatch.setattr(checkpoint, "_write_file", real_write)
    folder = tmp_path / "crashed" / "checkpoints"
    assert json.loads((folder / "latest.json").read_text())["step"] == 10
    assert not list(folder.glob(".step-*"))  # the broken temporary folder is removed, never pointed to

    train(cfg, resume=True)
    assert not list(folder.glob(".step-*"))
    a, b = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "crashed")
    assert b["state"]["step"] == 20
    for part in ("model", "ema", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    straight = [m for m in metrics(tmp_path / "straight") if "loss" in m]
    resumed = [m for m in metrics(tmp_path / "crashed") if "loss" in m and m["step"] > 10]
    assert [m["loss"] for m in straight if m["step"] > 10] == [m["loss"] for m in resumed]


def test_resume_checks(corpus, cache, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", cache, max_steps=5, eval_batches=1)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        train(cfg)
    other_vocab = tiny_config(corpus, tmp_path / "run", cache, tokenizer="bpe:300", max_steps=10)
    with pytest.raises(CheckpointError, match=r"trained with tokenizer bytes \(V=259.*uses bpe:300 \(V=300"):
        train(other_vocab, resume=True)
    wider = tiny_config(corpus, tmp_path / "run", cache, d_model=64, max_steps=10)
    with pytest.raises(CheckpointError, match="use the checkpoint's model settings"):
        train(wider, resume=True)


def test_ar_baseline_trains_and_duo_eval_scores_it(corpus, cache, tmp_path, capsys):
    cfg = tiny_config(corpus, tmp_path / "ar", cache, algo="ar", max_steps=30, lr=1e-3, eval_batches=0)
    result = train(cfg)
    assert result["val_ppl"] < 100
    assert cli.main(["eval", str(tmp_path / "ar"), f"cache_dir={cache}", "batch_size=8"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["algo"] == "ar" and scored["step"] == 30
    assert scored["val_ppl"] == pytest.approx(result["val_ppl"], rel=1e-5)


def test_duo_eval_is_the_discrete_nelbo_and_deterministic(corpus, cache, tmp_path, capsys):
    train(tiny_config(corpus, tmp_path / "duo", cache, max_steps=12, curriculum_end=6))
    args = ["eval", str(tmp_path / "duo"), f"cache_dir={cache}", "batches=2", "batch_size=8"]
    assert cli.main(args) == 0 and cli.main(args) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert first == second and first["algo"] == "duo" and first["val_tokens"] == 2 * 8 * 32
    assert 1 < first["val_ppl"] < 1000


def test_a_resumed_run_logs_the_same_metrics_as_an_uninterrupted_one(corpus, cache, tmp_path, monkeypatch):
    """A checkpoint between metric lines (step 4, lines every 3): the loss summed since the last line
    is saved with it, so the line at step 6 after a crash and --resume is the uninterrupted run's."""
    settings = dict(max_steps=9, log_every=3, save_every=4, eval_batches=1)
    train(tiny_config(corpus, tmp_path / "straight", cache, **settings))
    real_write = checkpoint._write_file

    def crash_at_step_8(path, data):
        if ".step-00000008" in str(path):
            raise RuntimeError("simulated crash")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", crash_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(corpus, tmp_path / "crashed", cache, **settings))
    monkeypatch.undo()
    train(tiny_config(corpus, tmp_path / "crashed", cache, **settings), resume=True)
    keep = ("step", "loss", "grad_norm", "val_ppl")
    assert [{k: m.get(k) for k in keep} for m in metrics(tmp_path / "crashed")] == \
        [{k: m.get(k) for k in keep} for m in metrics(tmp_path / "straight")]
