"""Settings, overrides and the `duo` command line."""

import json

import pytest

from duo_model import cli
from duo_model.config import ConfigError, build
from duo_model.demo import DemoConfig
from duo_model.distill import DistillConfig
from duo_model.eval import EvalConfig
from duo_model.sample import SampleConfig
from duo_model.train import TrainConfig


def test_overrides_are_typed():
    cfg = build(TrainConfig, None, ["lr=1e-3", "max_steps=2e3", "fused_head=false", "curriculum=dense"])
    assert (cfg.lr, cfg.max_steps, cfg.fused_head, cfg.curriculum) == (1e-3, 2000, False, "dense")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 1e-4, "batch_size": 64, "model": "tiny"}))
    cfg = build(TrainConfig, path, ["batch_size=16"])
    assert (cfg.lr, cfg.batch_size, cfg.model) == (1e-4, 16, "tiny")


@pytest.mark.parametrize("override, message", [
    ("learning_rate=1", r"unknown setting 'learning_rate'; did you mean: lr"),
    ("batchsize=8", r"did you mean: batch_size"),
    ("max_steps=ten", r"max_steps='ten': expected int"),
    ("curriculum=sparse", r"choose one of topk, dense, none"),
    ("gamma_min=-inf", r"gamma_min=-inf: must be finite or nan"),
    ("lr", r"expected key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 3}))
    with pytest.raises(ConfigError, match=r"run.json: unknown setting 'steps'; did you mean: max_steps"):
        build(TrainConfig, path, [])


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert f"  {name}=" in out
    assert "duo train max_steps=300" in out
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}=" in out for name in EvalConfig.__dataclass_fields__)
    for command, cls in (("distill", DistillConfig), ("sample", SampleConfig), ("demo", DemoConfig)):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert all(f"  {name}=" in out for name in cls.__dataclass_fields__), command


def test_cli_errors_are_one_line_without_traceback(capsys, tmp_path):
    assert cli.main(["train", "learning_rate=1"]) == 2
    assert "duo train: error: unknown setting 'learning_rate'; did you mean: lr" in capsys.readouterr().err
    assert cli.main(["train", f"corpus=text:{tmp_path / 'missing'}", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "duo train: error: corpus path" in err and "does not exist" in err and "Traceback" not in err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "duo eval: error: no checkpoint at" in capsys.readouterr().err
    assert cli.main(["generate"]) == 2
    assert "unknown command 'generate'" in capsys.readouterr().err
