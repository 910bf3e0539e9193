"""Data parallelism: 2 CPU ranks under torchrun (gloo) match 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from duo_model.checkpoint import read_checkpoint
from duo_model.train import train
from tests.model.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if "loss" in m]


def test_two_ranks_match_one_process_with_the_same_global_batch(corpus, cache, tmp_path):
    # Global batch 8 = 2 ranks x 4, or 1 process x 4 x 2 accumulation steps: the same micro-batches,
    # times, noise and dropout masks (all derived from the seed, the step and the slice).
    settings = dict(batch_size=8, micro_batch_size=4, max_steps=12, curriculum_end=6, log_every=2, eval_batches=2)
    single = tiny_config(corpus, tmp_path / "one", cache, **settings)
    train(single)

    two = tiny_config(corpus, tmp_path / "two", cache, **settings)
    words = [f"{k}={v}" for k, v in vars(two).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "duo_model.cli", "train", *words],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) x 4 x 1 accumulation" in proc.stderr

    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 6
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-4, atol=1e-5)
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    for part in ("model", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{key}")
    assert b["config"]["train"]["batch_size"] == 8
