"""Settings, overrides and the `duo` command line."""

import dataclasses
import json
import os
import subprocess
import sys

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
    ("gamma_min=-inf", r"gamma_min=-inf: must be a finite number or nan"),
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


# ------------------------------------------------------------------------------------------------
# every setting of every command, with an invalid value

COMMANDS = {"train": TrainConfig, "distill": DistillConfig, "sample": SampleConfig, "eval": EvalConfig,
            "demo": DemoConfig}


def invalid_value(field: dataclasses.Field):
    """A value the setting's own rule rejects: its check's example, a value outside its choices, or a
    word that is no bool; None when the setting has no rule."""
    if field.metadata.get("check") is not None:
        return field.metadata["check"].invalid
    if field.metadata.get("choices"):
        return "no-such-choice"
    if field.type in (bool, "bool"):
        return "maybe"
    return None


def base_arguments(command: str, tmp_path) -> list[str]:
    """Arguments under which the command, if a bad setting slipped through, fails fast with an error
    that does not name the setting (a missing corpus or checkpoint), instead of training."""
    missing = f"text:{tmp_path / 'no-corpus'}"
    return {"train": ["train", f"corpus={missing}", f"out_dir={tmp_path / 'run'}"],
            "distill": ["distill", f"init={tmp_path}", f"out_dir={tmp_path / 'run'}"],
            "sample": ["sample", str(tmp_path / "no-run"), f"out={tmp_path / 'samples.json'}"],
            "eval": ["eval", str(tmp_path / "no-run")],
            "demo": ["demo", f"corpus={missing}", f"out_dir={tmp_path / 'demo'}"]}[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_rejects_an_invalid_value_in_one_line(command, tmp_path, capsys):
    """Settings come from the config definitions, so one added later is covered, or this test names it."""
    fields = dataclasses.fields(COMMANDS[command])
    lacking = [f.name for f in fields if invalid_value(f) is None]
    assert not lacking, (f"duo {command}: no invalid-value case for {lacking}: give each setting() choices or a "
                         "check (duo_model.config)")
    for field in fields:
        argv = base_arguments(command, tmp_path) + [f"{field.name}={invalid_value(field)}"]
        code = cli.main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code != 0, f"duo {command} accepted {field.name}={invalid_value(field)!r}"
        assert len(lines) == 1 and "Traceback" not in captured.err, (field.name, captured.err)
        assert lines[0].startswith(f"duo {command}: error: ") and field.name in lines[0], (field.name, lines[0])


@pytest.mark.parametrize("override, message", [
    ("gamma_min=-1", r"give both gamma_min and gamma_max, or neither"),
    ("n_heads=3", r"d_model \(128\) must be n_heads \(3\)"),
    ("curriculum_start=600", r"curriculum_start=600 must be <= curriculum_end=500"),
    ("lr=nan", r"lr=nan: must be > 0"),
])
def test_rules_between_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, None, [override])


def test_a_bad_setting_exits_with_one_line_and_no_traceback_in_a_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "duo_model.cli", "train", "log_every=0"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["duo train: error: log_every=0: must be >= 1"], result.stderr
