"""Validation perplexity of a checkpoint (duo-math §3.4, §4.1, §8), and the generative evaluation of
samples (§6.5).

Duo: the true discrete NELBO with the log-linear schedule whatever phase the model was trained in,
one time per sequence, stratified within each batch (§3.5), no prior or reconstruction term (as the
paper reports it): ``ppl = exp(sum of per-token NELBO / tokens)``. AR: ``exp`` of the mean next-token
cross-entropy. Batch ``b`` draws its times and noise from ``(seed, b)``, so the number is
deterministic and the same on any number of ranks.

Generative evaluation of samples (a ``duo sample`` file): the **generative perplexity** under a
judge, an autoregressive model — a ``duo train algo=ar`` checkpoint or a Hugging Face causal LM
(``hf:NAME``, with ``transformers``) — and the **unigram entropy** of the samples. Each sample's text
is re-tokenized with the judge's tokenizer, cut into windows of the judge's context (its training
length), each window prefixed with BOS; ``gen_ppl = exp(sum of -log p(token | window prefix) / tokens)``
over every text token. The entropy is that of each sample's own token-id histogram (nats), averaged
over samples. A sampler that truncates the tail lowers both; compare Gen PPL at matched entropy.

Command line: ``duo eval RUN_OR_CHECKPOINT [key=value ...]`` and
``duo eval --gen SAMPLES_FILE judge=RUN_OR_hf:NAME`` (see ``duo eval --help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from duo_model.checkpoint import CheckpointError, load_model
from duo_model.config import (ConfigError, at_least, corpus_spec, device_spec, existing_path, setting, validate,
                              within, writable_path)
from duo_model.data import prepare_data
from duo_model.dit import DiT
from duo_model.loss import ARLoss, DuoLoss, Phase, antithetic_t, perplexity
from duo_model.published import load_for_commands
from duo_model.runtime import autocast_context, derive_seed, setup_distributed


@dataclass
class EvalConfig:
    """Every setting of ``duo eval`` (``key=value`` on the command line)."""

    checkpoint: str = setting("", "a published Duo model instead of a run folder: hf:OWNER/NAME, a snapshot folder "
                              "(config.json + model.safetensors) or a Lightning .ckpt of the Duo code; needs corpus=",
                              group="Model", check=existing_path(optional=True, also="hf:"))
    corpus: str = setting("", "text to evaluate on (default: the checkpoint's corpus), tokenized with the "
                          "checkpoint's tokenizer", group="Data", check=corpus_spec(optional=True))
    seq_len: int = setting(0, "tokens per sequence (0 = the checkpoint's)", check=at_least(0))
    val_fraction: float = setting(0.0, "held-out share of the corpus (0 = the checkpoint's)",
                                  check=within(0, 1, hi_open=True))
    split: str = setting("validation", "which split to score", ("validation", "train"))
    cache_dir: str = setting("", "cache folder (default $DUO_MODEL_CACHE or ~/.cache/duo_model)",
                             check=writable_path(optional=True))
    batch_size: int = setting(32, "sequences per batch", group="Evaluation", check=at_least(1))
    batches: int = setting(0, "batches to score (0 = the whole split)", check=at_least(0))
    ema: bool = setting(True, "score the EMA weights (false: the raw weights)")
    seed: int = setting(1, "seed of the times and noise", check=at_least(0))
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N", check=device_spec())
    precision: str = setting("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32", ("auto", "bf16", "fp32"))
    num_threads: int = setting(0, "torch CPU threads (0 = torch's default)", check=at_least(0))
    judge: str = setting("", "with --gen: the judge, an AR run or checkpoint (`duo train algo=ar`) or hf:NAME (a "
                         "Hugging Face causal LM; needs transformers)", group="Generative evaluation (--gen)",
                         check=existing_path(optional=True, also="hf:"))


@torch.no_grad()
def validation_nll(model: DiT, sequences: torch.Tensor, *, algo: str, batch_size: int, seed: int,
                   device: torch.device, precision: str = "auto", max_batches: int | None = None, rank: int = 0,
                   world_size: int = 1) -> dict:
    """``{"val_nll", "val_ppl", "val_tokens"}`` of ``sequences`` (N, L); batches are spread over ranks
    and the sums all-reduced."""
    was_training = model.training
    model.eval()
    objective = ARLoss(model) if algo == "ar" else DuoLoss(model)
    total, count = mean_loss(lambda x0, t, noise: objective(x0, t, Phase("discrete"), noise), sequences,
                             batch_size=batch_size, seed=seed, device=device, precision=precision,
                             max_batches=max_batches, rank=rank, world_size=world_size)
    model.train(was_training)
    return {"val_nll": total / count, "val_ppl": perplexity(total / count), "val_tokens": count}


def mean_loss(loss_fn, sequences: torch.Tensor, *, batch_size: int, seed: int, device: torch.device,
              precision: str = "auto", max_batches: int | None = None, rank: int = 0,
              world_size: int = 1) -> tuple[float, int]:
    """(sum, count) of the per-token losses ``loss_fn(x0, t, noise_seed)`` over the batches of
    ``sequences`` (N, L), all-reduced over ranks (rank r scores batches r, r + world_size, ...). Batch
    ``b`` takes stratified times and a noise seed from ``(seed, b)``, so the result is deterministic."""
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(rank, n_batches, world_size):
        x0 = sequences[b * batch_size:(b + 1) * batch_size].to(device)
        t = antithetic_t(len(x0), torch.Generator().manual_seed(derive_seed(seed, "eval-t", b)))
        with autocast_context(device, precision):
            loss = loss_fn(x0, t, derive_seed(seed, "eval-noise", b))
        totals[0] += loss.double().sum()
        totals[1] += loss.numel()
    if world_size > 1:
        dist.all_reduce(totals)
    return float(totals[0]), int(totals[1])


def evaluate_checkpoint(path: str | None, cfg: EvalConfig) -> dict:
    """Score a run folder's latest checkpoint (or a checkpoint folder), or the published model
    ``cfg.checkpoint``, as configured."""
    validate(cfg)
    if bool(path) == bool(cfg.checkpoint):
        raise ConfigError("give either a run or checkpoint folder (positional) or checkpoint=<published model>")
    if cfg.checkpoint and not cfg.corpus:
        raise ConfigError("a published model brings no corpus: give corpus=text:PATH or corpus=hf:NAME")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    env, device = setup_distributed(cfg.device)
    try:
        if cfg.checkpoint:
            model, info = load_for_commands(cfg.checkpoint, ema=cfg.ema, device=device)
            saved = {"algo": "duo", "seq_len": info["seq_len"], "val_fraction": 0.05}
        else:
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


def unigram_entropy(ids: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token-id histogram (§6.5); ids (N, L)."""
    entropies = []
    for row in ids:
        p = torch.bincount(row).double()
        p = p[p > 0] / row.numel()
        entropies.append(float(-(p * p.log()).sum()))
    return sum(entropies) / len(entropies)


class _CheckpointJudge:
    """A ``duo train algo=ar`` checkpoint as a judge: windows of its training length."""

    def __init__(self, path: str, device: torch.device, precision: str):
        self.model, info = load_model(path, device=device)
        algo = info["config"]["train"]["algo"]
        if algo != "ar":
            raise CheckpointError(f"judge {info['path']} is an algo={algo} model; the judge must be autoregressive: "
                                  "train one with `duo train algo=ar`")
        self.tokenizer = info["tokenizer"]
        self.window = info["config"]["train"]["seq_len"]
        self.name, self.device, self.precision = str(info["path"]), device, precision

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.precision):
            return self.model(inputs, torch.zeros(len(inputs), device=self.device)).float()


class _HFJudge:
    """A Hugging Face causal LM as a judge (``hf:NAME``), windows of its context length."""

    def __init__(self, name: str, device: torch.device):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError(f"judge=hf:{name} needs the transformers package (`pip install transformers`) and "
                              "the model in its cache or a network; or judge with a `duo train algo=ar` run") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
        except OSError as exc:
            raise ConfigError(f"judge=hf:{name} could not be loaded: {exc}") from None
        self.tokenizer.bos_id = self.tokenizer.bos_token_id
        self.tokenizer.pad_id = self.tokenizer.eos_token_id
        self.window = min(1024, getattr(self.model.config, "max_position_embeddings", 1024))
        self.name, self.device = f"hf:{name}", device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs).logits.float()


def load_judge(spec: str, device: torch.device, precision: str = "auto"):
    """The judge of ``spec``: ``hf:NAME`` or an AR run/checkpoint folder."""
    if not spec:
        raise ConfigError("generative evaluation needs judge=RUN_OR_CHECKPOINT (an AR model: `duo train algo=ar`) "
                          "or judge=hf:NAME")
    if spec.startswith("hf:"):
        return _HFJudge(spec[3:], device)
    return _CheckpointJudge(spec, device, precision)


@torch.no_grad()
def generative_perplexity(texts: list[str], judge, *, batch_size: int = 8) -> dict:
    """``{"gen_nll", "gen_ppl", "gen_tokens", "judge"}`` of ``texts`` under ``judge`` (module docstring)."""
    bos, pad = judge.tokenizer.bos_id, judge.tokenizer.pad_id
    windows = []
    for text in texts:
        ids = judge.encode(text)
        windows += [[bos] + ids[i:i + judge.window - 1] for i in range(0, len(ids), judge.window - 1)]
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), pad, dtype=torch.int64)
        for r, w in enumerate(chunk):
            batch[r, :len(w)] = torch.tensor(w)
        lengths = torch.tensor([len(w) for w in chunk])
        batch = batch.to(judge.device)
        logits = judge.logits(batch[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").cpu()
        keep = torch.arange(1, width)[None, :] < lengths[:, None]
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ConfigError("the samples hold no text to score")
    return {"gen_nll": total / count, "gen_ppl": perplexity(total / count), "gen_tokens": count, "judge": judge.name}


def evaluate_samples(path: str, cfg: EvalConfig) -> dict:
    """Gen PPL and unigram entropy of a samples file under ``cfg.judge``."""
    from duo_model.sample import read_samples

    validate(cfg)
    record = read_samples(path)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _, device = setup_distributed(cfg.device)
    judge = load_judge(cfg.judge, device, cfg.precision)
    ids = torch.tensor([s["ids"] for s in record["samples"]])
    result = generative_perplexity([s["text"] for s in record["samples"]], judge, batch_size=cfg.batch_size)
    return {"samples": str(path), "steps": record.get("steps"), "num_samples": len(ids), **result,
            "entropy": unigram_entropy(ids)}
