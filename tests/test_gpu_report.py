"""benchmarks/gpu_report.py must not rot: its CPU smoke run covers every registered case."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.cases import CASES, Case
from benchmarks.gpu_report import markdown_table, run_case

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_reports_every_case(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--cpu-smoke", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["copy_bandwidth_GBps"] > 0
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {case.name for case in CASES}
    for name, row in rows.items():
        assert row["error"] is None, f"{name}: {row['error']}"
        for key in ("fused_ms", "ref_ms", "speedup", "floor_ms", "x_floor"):
            assert isinstance(row[key], float) and row[key] > 0, f"{name}: {key} = {row[key]!r}"
        assert row["fused_peak_gib"] is None  # not measured on CPU
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "| rng.uniform fp32 |" in (tmp_path / "report.md").read_text()


def test_a_failing_path_is_recorded_and_the_other_still_timed():
    def out_of_memory(inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 36.80 GiB")

    case = Case(
        name="failing", family="test",
        make_inputs=lambda shape, device: {"x": torch.rand(shape["B"], device=device)},
        fused=lambda inputs: inputs["x"] * 2,
        reference=out_of_memory,
        bytes_moved=lambda shape: 8 * shape["B"],
    )
    row = run_case(case, dict(B=16), torch.device("cpu"), repeats=2, bandwidth=1e9)
    assert row["fused_ms"] > 0 and row["ref_ms"] is None and row["speedup"] is None
    assert row["error"] == "ref: OutOfMemoryError: CUDA out of memory. Tried to allocate 36.80 GiB"
    assert "n/a" in markdown_table([row]) and "- failing: ref: OutOfMemoryError" in markdown_table([row])
