"""`duo demo --quick` end to end on the default corpus, its verdicts and table, and the installed `duo` command."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duo_model.cli import main
from duo_model.demo import AR_MODEL, COLUMNS, markdown_report, speed_verdict, verdicts


def test_quick_demo(tmp_path, monkeypatch, capsys):
    """The quick demo trains the judge, both Duo models and the DCD student, samples every cell over the
    sampling seeds, adds the entropy-matched control, the AR judge's own samples (KV cache) and the
    real-text row, and writes the tables, the verdicts, the stage timings, the plot and the samples
    (numbers meaningless at this size)."""
    monkeypatch.setenv("DUO_MODEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--quick", f"out_dir={out}", "progress=false", "sample_steps=8,4"]
    assert main(args + ["sampling_seeds=2"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert all(set(row) == set(COLUMNS) for row in rows)
    cells = {(r["model"], r["steps"], r["sampler"]) for r in rows}
    assert cells == ({(m, s, n) for m in ("Duo", "Duo + DCD") for s in (8, 4) for n in ("ancestral", "greedy")}
                     | {("Duo, entropy-matched", 8, "ancestral"), ("real text (validation)", None, "-"),
                        (AR_MODEL, 31, "next token")})
    for row in rows:
        assert row["gen_ppl"] > 1 and row["entropy"] >= 0
        assert (row["seconds_per_sample"] is None) == (row["steps"] is None)
    assert [p["step"] for p in results["curves"]["duo"]] == [p["step"] for p in results["curves"]["duo-none"]]
    assert set(results["stages"]) >= {"judge", "duo", "duo-none", "dcd", "sampling", "entropy-matched control",
                                      "AR sampling"}
    report = (out / "results.md").read_text()
    assert "| model | val PPL | sampler | steps | top-p | Gen PPL | entropy | ms per sample |" in report
    assert "Speed: AR with a KV cache takes" in printed
    assert "Claim 1 (curriculum helps training):" in printed and "Claim 2 (DCD makes 8 steps" in printed
    assert (out / "demo.png").stat().st_size > 1000
    # 2 seeds of 8 cells and of the AR row, 5 bisection trials of the control (seed 0), the chosen top-p's seed 1
    assert len(list((out / "samples").glob("*.json"))) == 2 * 9 + 5 + 1
    # a second run reuses every finished training stage and every samples file
    (out / "results.json").unlink()
    assert main(args + ["sampling_seeds=2"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    assert len(list((out / "samples").glob("*.json"))) == 2 * 9 + 5 + 1


def _results(curriculum: float, none: float, dcd8: float, matched8: float, matched64: float, sd: float = 1.0) -> dict:
    def row(model, steps, gen_ppl, top_p=1.0):
        return dict(model=model, sampler="ancestral", steps=steps, top_p=top_p, gen_ppl=gen_ppl, gen_ppl_sd=sd,
                    entropy=2.0, entropy_sd=0.1, val_ppl=10.0, seconds_per_sample=steps * 1e-3)

    rows = [row("Duo + DCD", 8, dcd8), row("Duo, entropy-matched", 8, matched8, 0.9),
            row("Duo, entropy-matched", 64, matched64, 0.9),
            dict(model="real text (validation)", sampler="-", steps=None, top_p=None, gen_ppl=9.0, gen_ppl_sd=None,
                 entropy=2.5, entropy_sd=None, val_ppl=None, seconds_per_sample=None)]
    return {"val_ppl": {"duo": curriculum, "duo-none": none}, "rows": rows, "sampling_seeds": 3,
            "sizes": {"sample_steps": [64, 8], "num_samples": 4, "seq_len": 32}, "judge_val_ppl": 5.0,
            "curves": {"duo": [{"step": 10, "val_ppl": curriculum}], "duo-none": [{"step": 10, "val_ppl": none}]}}


@pytest.mark.parametrize("numbers, held", [
    ((10.0, 12.0, 15.0, 20.0, 15.5), (True, True)),   # DCD 8 steps: below 8-step base, within 1 sd of 64-step
    ((12.0, 10.0, 15.0, 20.0, 13.0), (False, False)),  # no curriculum gain; DCD 8 steps 2 sd above 64 steps
    ((10.0, 12.0, 21.0, 20.0, 25.0), (True, False)),   # DCD 8 steps worse than the 8-step base
])
def test_verdicts_and_report_columns(numbers, held):
    results = _results(*numbers)
    results["verdicts"] = verdicts(results)
    assert [("HELD" in v and "DID NOT HOLD" not in v) for v in results["verdicts"].values()] == list(held)
    report = markdown_report(results)
    assert "| Duo, curriculum | " in report and "| Duo + DCD | 10.00 | ancestral | 8 | 1.000 |" in report
    assert "| real text (validation) | - | - | - | - | 9.00 | 2.500 | - |" in report


def test_speed_verdict():
    """The speed line names the most distilled steps that still beat AR's time per sample."""
    def row(model, steps, ms, sampler="ancestral"):
        return dict(model=model, sampler=sampler, steps=steps, gen_ppl=10.0 + steps, seconds_per_sample=ms * 1e-3)

    dcd = [row("Duo + DCD", s, s * 0.5) for s in (4, 8, 16, 64)]
    assert speed_verdict(dcd) == {}
    line = speed_verdict(dcd + [row(AR_MODEL, 31, 10.0, "next token")])["speed"]
    assert "faster up to 16 steps (8.00 ms, Gen PPL 26.00)" in line and "10.00 ms per sample (31 network" in line
    line = speed_verdict(dcd + [row(AR_MODEL, 31, 1.0, "next token")])["speed"]
    assert "slower at every step count measured (fewest: 4 steps, 2.00 ms)" in line


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
