"""Fault injection: SIGKILL tiny training and distillation runs at random instants (also inside
checkpoint writes), continue each with --resume, and require the final checkpoint and metrics to be
bit-identical to an uninterrupted run's."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import time

import pytest
import torch

from duo_model.checkpoint import read_checkpoint
from tests.model import faults
from tests.model.helpers import tiny_config

KILLS = 10  # per command
SEED = int(os.environ.get("DUO_FAULT_SEED", "0"))
INJECTIONS = (("write", False), ("replace", False), ("replace", True), ("fsync", True), ("prune", False))


@pytest.fixture(scope="module")
def forkserver():
    """Processes forked from a server that has torch and duo_model imported: a run starts in ms."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "duo_model.train", "duo_model.distill", "tests.model.faults"])
    return context


def _run(context, command: str, settings: dict, *, inject=None, kill_after: float | None = None) -> int:
    """The exit code of one run (-9: killed), SIGKILLed after ``kill_after`` seconds if still running."""
    process = context.Process(target=faults.run, args=(command, settings, inject))
    process.start()
    process.join(kill_after)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def _final(run_dir) -> tuple[dict, list]:
    ckpt = read_checkpoint(run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [(m["step"], m.get("loss"), m.get("val_ppl"), m.get("val_kl")) for m in lines]
    return ckpt, metrics


def _assert_same(reference, run_dir, note: str) -> None:
    (a, metrics_a), (b, metrics_b) = reference, _final(run_dir)
    assert b["state"]["step"] == a["state"]["step"], note
    for part in ("model", "ema", "optimizer", "teacher"):
        assert (part in a) == (part in b), (part, note)
        for key in a.get(part, {}):
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs ({note})"
    assert metrics_b == metrics_a, note


def _kill_and_resume(context, command: str, settings: dict, run_dir, reference, seconds: float,
                     rng: random.Random) -> int:
    """Kill runs in ``run_dir`` until ``KILLS`` kills landed; every completed sequence must match."""
    kills, log = 0, []
    while kills < KILLS:
        shutil.rmtree(run_dir, ignore_errors=True)
        while True:
            if rng.random() < 0.5:
                where, after = INJECTIONS[rng.randrange(len(INJECTIONS))]
                inject, kill_after = (where, rng.randint(1, 4), after), None
            else:
                inject, kill_after = None, rng.uniform(0.0, seconds)
            code = _run(context, command, {**settings, "out_dir": str(run_dir)}, inject=inject,
                        kill_after=kill_after)
            log.append((inject, None if kill_after is None else round(kill_after, 3), code))
            if code == 0:
                break
            assert code == -9, f"a run failed (exit code {code}); runs so far: {log}"
            kills += 1
        _assert_same(reference, run_dir, f"seed {SEED}, runs {log}")
    return kills


def test_sigkill_at_any_instant_then_resume_is_bit_identical(corpus, cache, tmp_path, forkserver):
    rng = random.Random(SEED)
    settings = dataclasses.asdict(tiny_config(corpus, tmp_path / "unused", cache, max_steps=12, save_every=2,
                                              log_every=3, eval_batches=1, keep_checkpoints=2))
    start = time.perf_counter()
    assert _run(forkserver, "train", {**settings, "out_dir": str(tmp_path / "train-ref")}) == 0
    seconds = time.perf_counter() - start
    reference = _final(tmp_path / "train-ref")
    kills = _kill_and_resume(forkserver, "train", settings, tmp_path / "train", reference, seconds, rng)

    distill_settings = dict(init=str(tmp_path / "train-ref"), cache_dir=str(cache), max_steps=8, rounds=3,
                            final_dt=0.5, batch_size=8, lr=1e-3, warmup_steps=1, log_every=3, eval_every=0, eval_batches=1,
                            save_every=2, progress=False, num_threads=1, seed=5)
    start = time.perf_counter()
    assert _run(forkserver, "distill", {**distill_settings, "out_dir": str(tmp_path / "distill-ref")}) == 0
    seconds = time.perf_counter() - start
    reference = _final(tmp_path / "distill-ref")
    kills += _kill_and_resume(forkserver, "distill", distill_settings, tmp_path / "distill", reference, seconds, rng)
    assert kills >= 2 * KILLS
