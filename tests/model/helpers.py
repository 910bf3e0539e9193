"""A tiny generated corpus and tiny training settings shared by the duo_model tests."""

from __future__ import annotations

import random
from pathlib import Path

from duo_model.train import TrainConfig

SUBJECTS = ["the cat", "a dog", "the king", "my lord", "the queen", "a fool", "the moon"]
VERBS = ["sees", "loves", "fears", "follows", "serves", "mocks"]
OBJECTS = ["the sun", "a rose", "the crown", "his sword", "her ring", "the sea"]


def write_corpus(folder: Path, documents: int = 4, sentences: int = 300, seed: int = 0) -> Path:
    """``documents`` .txt files of short sentences from a tiny grammar (a learnable language)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(sentences))
        (folder / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(corpus: Path, out_dir: Path, cache: Path, **overrides) -> TrainConfig:
    """A 2-block, d=32 DiT on bytes, L=32: ~10 ms a step on one CPU thread."""
    settings = dict(corpus=f"text:{corpus}", tokenizer="bytes", seq_len=32, cache_dir=str(cache), d_model=32,
                    n_blocks=2, n_heads=2, batch_size=8, max_steps=20, warmup_steps=5, curriculum_end=10,
                    log_every=5, eval_every=0, eval_batches=2, save_every=0, out_dir=str(out_dir), progress=False,
                    num_threads=1, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)
