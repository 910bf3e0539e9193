"""benchmarks/gpu_check.sh must not rot: its --dry-run runs the same steps on the CPU."""

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine, run the real check")
def test_gpu_check_dry_run(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-2000:] + done.stderr[-2000:]
    assert summary.count(": ok in ") == 3, summary
    assert (tmp_path / "report.md").exists() and (tmp_path / "env.txt").exists()
    assert "tests/" in (tmp_path / "gpu-tests.log").read_text()  # the -m gpu tests were collected
