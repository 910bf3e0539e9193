"""`duo demo --quick` end to end on the default corpus (issue 8), and the installed `duo` command."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duo_model.cli import main


def test_quick_demo(tmp_path, monkeypatch, capsys):
    """The quick demo trains the judge, the Duo model and the DCD student, samples 64/16/8 steps with
    both endings, and writes the table, the plot and the samples (numbers meaningless at this size)."""
    monkeypatch.setenv("DUO_MODEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", f"out_dir={out}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    cells = {(r["model"], r["steps"], r["noise_removal"]) for r in results["rows"]}
    assert cells == {(m, s, n) for m in ("Duo", "Duo + DCD") for s in (64, 16, 8) for n in ("ancestral", "greedy")}
    for row in results["rows"]:
        assert row["gen_ppl"] > 1 and row["val_ppl"] > 1 and row["entropy"] >= 0
    table = (out / "results.md").read_text()
    assert "| Duo + DCD |" in table and "Gen PPL (Greedy-Tail)" in table and table.split("\n\n")[0] in printed
    assert (out / "gen_ppl.png").stat().st_size > 1000
    assert len(list((out / "samples").glob("*.json"))) == 12
    # a second run reuses every finished stage
    assert main(["demo", "--quick", f"out_dir={out}", "progress=false", "sample_steps=4"]) == 0
    assert capsys.readouterr().out.count("reusing") == 3


def _console_script() -> Path | None:
    """The `duo` executable pip installed beside this interpreter, if the package is installed."""
    try:
        entry = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "duo"]
    except importlib.metadata.PackageNotFoundError:
        entry = []
    if not entry:
        return None
    return Path(shutil.which("duo", path=str(Path(sys.executable).parent)) or "duo")


@pytest.mark.skipif(_console_script() is None, reason="the package is not pip-installed (running from a source tree)")
def test_duo_console_script():
    """`pip install` puts `duo` on the PATH and it is duo_model.cli:main."""
    script = _console_script()
    assert script.is_file(), f"the duo entry point is registered but {script} does not exist"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "duo demo" in done.stdout
    done = subprocess.run([str(script), "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "recipe=" in done.stdout
