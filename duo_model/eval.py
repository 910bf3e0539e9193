"""Validation perplexity of a checkpoint (duo-math §3.4, §4.1, §8).

Duo: the true discrete NELBO with the log-linear schedule whatever phase the model was trained in,
one time per sequence, stratified within each batch (§3.5), no prior or reconstruction term (as the
paper reports it): ``ppl = exp(sum of per-token NELBO / tokens)``. AR: ``exp`` of the mean next-token
cross-entropy. Batch ``b`` draws its times and noise from ``(seed, b)``, so the number is
deterministic and the same on any number of ranks.

Command line: ``duo eval RUN_OR_CHECKPOINT [key=value ...]`` (see ``duo eval --help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from duo_model.checkpoint import load_model
from duo_model.config import ConfigError, setting
from duo_model.data import prepare_data
from duo_model.dit import DiT
from duo_model.loss import ARLoss, DuoLoss, Phase, antithetic_t, perplexity
from duo_model.runtime import autocast_context, derive_seed, setup_distributed


@dataclass
class EvalConfig:
    """Every setting of ``duo eval`` (``key=value`` on the command line)."""

    corpus: str = setting("", "text to evaluate on (default: the checkpoint's corpus), tokenized with the "
                          "checkpoint's tokenizer", group="Data")
    seq_len: int = setting(0, "tokens per sequence (0 = the checkpoint's)")
    val_fraction: float = setting(0.0, "held-out share of the corpus (0 = the checkpoint's)")
    split: str = setting("validation", "which split to score", ("validation", "train"))
    cache_dir: str = setting("", "cache folder (default $DUO_MODEL_CACHE or ~/.cache/duo_model)")
    batch_size: int = setting(32, "sequences per batch", group="Evaluation")
    batches: int = setting(0, "batches to score (0 = the whole split)")
    ema: bool = setting(True, "score the EMA weights (false: the raw weights)")
    seed: int = setting(1, "seed of the times and noise")
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    precision: str = setting("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32", ("auto", "bf16", "fp32"))
    num_threads: int = setting(0, "torch CPU threads (0 = torch's default)")


@torch.no_grad()
def validation_nll(model: DiT, sequences: torch.Tensor, *, algo: str, batch_size: int, seed: int,
                   device: torch.device, precision: str = "auto", max_batches: int | None = None, rank: int = 0,
                   world_size: int = 1) -> dict:
    """``{"val_nll", "val_ppl", "val_tokens"}`` of ``sequences`` (N, L); batches are spread over ranks
    and the sums all-reduced."""
    was_training = model.training
    model.eval()
    objective = ARLoss(model) if algo == "ar" else DuoLoss(model)
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(rank, n_batches, world_size):
        x0 = sequences[b * batch_size:(b + 1) * batch_size].to(device)
        t = antithetic_t(len(x0), torch.Generator().manual_seed(derive_seed(seed, "eval-t", b)))
        with autocast_context(device, precision):
            loss = objective(x0, t, Phase("discrete"), derive_seed(seed, "eval-noise", b))
        totals[0] += loss.double().sum()
        totals[1] += loss.numel()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    nll = float(totals[0] / totals[1])
    return {"val_nll": nll, "val_ppl": perplexity(nll), "val_tokens": int(totals[1])}


def evaluate_checkpoint(path: str, cfg: EvalConfig) -> dict:
    """Score a run folder's latest checkpoint (or a checkpoint folder) as configured."""
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    env, device = setup_distributed(cfg.device)
    try:
        model, info = load_model(path, ema=cfg.ema, device=device)
        saved = info["config"]["train"]
        data = prepare_data(corpus=cfg.corpus or saved["corpus"], tokenizer=info["tokenizer"],
                            seq_len=cfg.seq_len or saved["seq_len"],
                            val_fraction=cfg.val_fraction or saved["val_fraction"], cache=cfg.cache_dir or None)
        sequences = data.validation if cfg.split == "validation" else data.train
        result = validation_nll(model, sequences, algo=saved["algo"], batch_size=cfg.batch_size, seed=cfg.seed,
                                device=device, precision=cfg.precision, max_batches=cfg.batches or None,
                                rank=env.rank, world_size=env.world_size)
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return {"checkpoint": str(info["path"]), "step": info["state"]["step"], "algo": saved["algo"],
            "corpus": data.corpus, "split": cfg.split, **result}
