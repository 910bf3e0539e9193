"""Discrete Consistency Distillation (DCD, duo-math §5): a Duo model taught to jump from t to s = t - dt
in one step, so that it samples in a few steps.

One optimizer step, as the trainer's (global batch, micro-batches, ranks, warm-up, clipping, EMA):

    max_steps is split into ``rounds`` rounds of R = ceil(max_steps / rounds) steps; round r = step // R
    at the start of a round the teacher takes the student's raw weights (the EMA ones with teacher_ema)
    dt = final_dt * 2^(r - rounds + 1)  =  2^r / T  with  T = 2^(rounds - 1) / final_dt            (§5.1)
        (linear_growth_dt: 0.001 + (step / max_steps)(0.25 - 0.001))
    t ~ stratified in [1e-3, 1] (§3.5);  time_shift=up: t <- min(t + dt, 1), s = t - dt
                                         time_shift=down: s = max(t - dt, 0)
    gamma_u = gamma_min + u (gamma_max - gamma_min);  alpha_u = T(gamma_u)  for u in {t, s}       (§2)
    (z_t, z_s) = gaussian_argmax_pair(x0, gamma_t, gamma_s, V)  (one shared Gaussian noise)       (§5.4)
    loss_tok = KL(student(z_t, -log alpha_t) || teacher(z_s, -log alpha_s))  (kl-bwd; kl-fwd swaps)
             = dcd_kl(student logits, teacher logits)

The published recipe (the Duo code's OWT distillation script, GPT-2 tokenizer): T = 512 and rounds of
10 000 steps (the paper: 5 rounds, so dt = 1/512 ... 1/32: ``final_dt=1/32 rounds=5``), batch 128,
lr 6e-5 after 500 warm-up steps, EMA 0.999, kl-bwd, gamma window [-4, -1] (alpha 0.9987 -> 0.0062),
teacher refreshed from the raw weights. What the published code does in the details this module makes
options of: the student starts from the checkpoint's raw weights (``init_weights=raw``), the EMA
continues from the checkpoint's (``student_ema=carry``), the teacher runs in training mode, so with
dropout (``teacher_dropout=true``), and times are shifted up (``time_shift=up``). The defaults here
keep the EMA weights, a restarted EMA and a dropout-free teacher instead: the settings the byte-level
demo was measured with (RESULTS.md).

The run folder is a checkpoint like a training run's (its config keeps the initial run's ``train``
settings, so ``duo eval`` and ``duo sample`` read it alike) plus the teacher (``teacher.safetensors``),
so ``--resume`` continues mid-round exactly. Validation reports the distillation KL (``val_kl``) of
the EMA student against the current teacher at the current dt, as the published code does.

Command line: ``duo distill init=RUN_OR_CHECKPOINT [key=value ...]`` (see ``duo distill --help``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import duo_kernels
from duo_model import ops
from duo_model.checkpoint import (CheckpointError, clean, new_run_id, read_checkpoint, restore_optimizer,
                                  save_checkpoint)
from duo_model.config import (ConfigError, above, at_least, corpus_spec, device_spec, existing_path, setting,
                              check_gamma_window, validate, within, writable_path)
from duo_model.data import prepare_data, tokenizer_from_json
from duo_model.dit import DiT, DiTConfig, count_parameters
from duo_model.eval import mean_loss
from duo_model.runtime import Distributed, setup_distributed
from duo_model.train import (EMA, MetricsLog, check_resume, data_fingerprint, gamma_or_nan, micro_batches, noise_window,
                              optimize, resume_point, set_threads)

DT_LINEAR = (0.001, 0.25)  # linear_growth_dt: dt from 0.001 to 0.25 over the run (§5.2)
# The alpha range of DCD's published gamma window [-4, -1] at GPT-2's vocabulary (50258 tokens).
DCD_ALPHA_RANGE = (0.9987, 0.0062)


@dataclass
class DistillConfig:
    """Every setting of ``duo distill`` (``key=value`` on the command line)."""

    init: str = setting("", "the Duo run folder (its latest checkpoint) or checkpoint folder to distill; required",
                        group="Initialisation", check=existing_path())
    init_weights: str = setting("ema", "start the student from the checkpoint's ema or raw weights (the published "
                                "code: raw)", ("ema", "raw"))
    student_ema: str = setting("restart", "the student's EMA: restart from its initial weights, or carry on the "
                               "checkpoint's EMA (the published code: carry)", ("restart", "carry"))
    corpus: str = setting("", "training text (default: the checkpoint's), tokenized with the checkpoint's tokenizer",
                          group="Data", check=corpus_spec(optional=True))
    seq_len: int = setting(0, "tokens per sequence (0 = the checkpoint's)", check=at_least(0))
    val_fraction: float = setting(0.0, "held-out share of the corpus (0 = the checkpoint's)",
                                  check=within(0, 1, hi_open=True))
    cache_dir: str = setting("", "cache folder (default $DUO_MODEL_CACHE or ~/.cache/duo_model)",
                             check=writable_path(optional=True))
    final_dt: float = setting(1 / 32, "the last round's step dt; dt doubles every round up to it, so the first "
                              "round's is final_dt / 2^(rounds-1) = 1/T (the paper: 1/32, T = 512)",
                              group="DCD (duo-math §5)", check=within(0, 1, lo_open=True))
    rounds: int = setting(5, "teacher refreshes: max_steps is split into this many rounds of ceil(max_steps / "
                          "rounds) steps; the teacher is refreshed and dt doubles at each (the paper: 5 of 10000 "
                          "steps)", check=at_least(1))
    linear_growth_dt: bool = setting(False, "grow dt linearly from 0.001 to 0.25 over max_steps instead of doubling "
                                     "(the teacher is still refreshed every round)")
    time_shift: str = setting("up", "up: t <- min(t + dt, 1), s = t - dt (the published code's); down: s = max(t - "
                              "dt, 0), so the student also trains at t < dt", ("up", "down"))
    loss: str = setting("kl-bwd", "kl-bwd: KL(student || teacher) (the paper's); kl-fwd: KL(teacher || student)",
                        ("kl-bwd", "kl-fwd"))
    gamma_min: float = setting(math.nan, "gamma at t = 0; nan: where alpha = 0.9987 for this vocabulary, as "
                               "the published -4 for GPT-2's (gamma_window)", check=gamma_or_nan())
    gamma_max: float = setting(math.nan, "gamma at t = 1; nan: where alpha = 0.0062 for this vocabulary, as the "
                               "published -1 for GPT-2's", check=gamma_or_nan())
    teacher_ema: bool = setting(False, "refresh the teacher from the EMA weights instead of the raw ones (the "
                                "published script: false)")
    teacher_dropout: bool = setting(False, "run the teacher with dropout, in training mode, as the published code "
                                    "does (false: the teacher is deterministic given its input)")
    max_steps: int = setting(500, "optimizer steps (the paper: 50000, five rounds)", group="Optimization",
                             check=at_least(1))
    batch_size: int = setting(32, "global batch: sequences per optimizer step over all ranks (the paper: 128)",
                              check=at_least(1))
    micro_batch_size: int = setting(0, "sequences per forward pass on one rank; 0 = batch_size / ranks",
                                    check=at_least(0))
    lr: float = setting(6e-5, "AdamW learning rate after warm-up (constant)", check=above(0))
    warmup_steps: int = setting(50, "linear learning-rate warm-up from 0 (the paper: 500)", check=at_least(0))
    beta1: float = setting(0.9, "AdamW beta1", check=within(0, 1, hi_open=True))
    beta2: float = setting(0.999, "AdamW beta2", check=within(0, 1, hi_open=True))
    weight_decay: float = setting(0.0, "AdamW weight decay", check=at_least(0))
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)", check=at_least(0))
    ema: float = setting(0.999, "EMA decay of the student (warmed up as min(ema, (1+n)/(10+n)))", check=within(0, 1))
    out_dir: str = setting("runs/distill", "run folder: metrics.jsonl, checkpoints/", group="Run",
                           check=writable_path())
    seed: int = setting(1, "seed of data order, times and noise", check=at_least(0))
    log_every: int = setting(10, "steps between metric lines", check=at_least(1))
    eval_every: int = setting(100, "steps between validation KL evaluations (0 = only at the end)", check=at_least(0))
    eval_batches: int = setting(8, "validation batches of batch_size per evaluation (0 = the whole split)",
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
        if self.rounds > self.max_steps:
            raise ConfigError(f"rounds={self.rounds} exceeds max_steps={self.max_steps}: every round needs a step")


def round_steps(cfg: DistillConfig) -> int:
    """Steps per round: ceil(max_steps / rounds) (the last round may be shorter)."""
    return math.ceil(cfg.max_steps / cfg.rounds)


def dt_at(cfg: DistillConfig, step: int) -> float:
    """The step size dt of ``step`` (§5.1): ``final_dt * 2^(r - rounds + 1)`` in round r, or linear growth."""
    if cfg.linear_growth_dt:
        lo, hi = DT_LINEAR
        return lo + (step / cfg.max_steps) * (hi - lo)
    r = min(step // round_steps(cfg), cfg.rounds - 1)
    return cfg.final_dt * 2.0 ** (r - cfg.rounds + 1)


class DCDLoss(nn.Module):
    """Per-token DCD loss (B, L) fp32 of a student DiT against a frozen teacher DiT: the module DDP
    wraps. ``forward(x0, t, dt, seed)`` takes clean ids (B, L), raw times t (B,) in [1e-3, 1], the step
    size and the noise seed; ``time_shift`` "up" moves t to min(t + dt, 1) and s = t - dt, "down" keeps
    t and takes s = max(t - dt, 0). With ``teacher_dropout`` the teacher runs in training mode (dropout
    on) whenever the student does."""

    def __init__(self, student: DiT, teacher: DiT, *, loss: str = "kl-bwd", gamma_min: float = -4.0,
                 gamma_max: float = -1.0, time_shift: str = "up", teacher_dropout: bool = False):
        super().__init__()
        if loss not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"loss must be 'kl-bwd' or 'kl-fwd', got {loss!r}")
        if time_shift not in ("up", "down"):
            raise ValueError(f"time_shift must be 'up' or 'down', got {time_shift!r}")
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False)
        self.direction = "reverse" if loss == "kl-bwd" else "forward"
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.time_shift, self.teacher_dropout = time_shift, teacher_dropout

    def forward(self, x0: torch.Tensor, t: torch.Tensor, dt: float, seed: int) -> torch.Tensor:
        vocab_size = self.student.config.vocab_size
        t = t.to(x0.device, torch.float64)
        if self.time_shift == "up":
            t = torch.clamp(t + dt, max=1.0)
            s = t - dt
        else:
            s = torch.clamp(t - dt, min=0.0)
        with torch.autocast(x0.device.type, enabled=False):
            gamma_t = self.gamma_min + t * (self.gamma_max - self.gamma_min)
            gamma_s = self.gamma_min + s * (self.gamma_max - self.gamma_min)
            z_t, z_s = ops.gaussian_argmax_pair(x0, gamma_t, gamma_s, vocab_size, seed=seed)
            sigma_t = -torch.log(ops.diffusion_transform(gamma_t, vocab_size)[0]).float()
            sigma_s = -torch.log(ops.diffusion_transform(gamma_s, vocab_size)[0]).float()
        self.teacher.train(self.teacher_dropout and self.student.training)
        with torch.no_grad():
            teacher_logits = self.teacher(z_s, sigma_s)
        return ops.dcd_kl(self.student(z_t, sigma_t), teacher_logits, direction=self.direction)


@torch.no_grad()
def validation_kl(objective: DCDLoss, sequences: torch.Tensor, dt: float, *, batch_size: int, seed: int,
                  device: torch.device, precision: str = "auto", max_batches: int | None = None, rank: int = 0,
                  world_size: int = 1) -> dict:
    """``{"val_kl", "val_tokens"}``: the mean per-token DCD loss of ``objective`` at step size ``dt`` on
    ``sequences`` (N, L), with times and noise fixed by ``(seed, batch)``; batches spread over ranks."""
    was_training = objective.student.training
    objective.student.eval()
    total, count = mean_loss(lambda x0, t, noise: objective(x0, t, dt, noise), sequences, batch_size=batch_size,
                             seed=seed, device=device, precision=precision, max_batches=max_batches, rank=rank,
                             world_size=world_size)
    objective.student.train(was_training)
    return {"val_kl": total / count, "val_tokens": count}


def _read_init(cfg: DistillConfig) -> dict:
    try:
        ckpt = read_checkpoint(cfg.init)
    except CheckpointError as exc:
        raise CheckpointError(f"init={cfg.init}: {exc}") from None
    algo = ckpt["config"]["train"]["algo"]
    if algo != "duo":
        raise CheckpointError(f"init={cfg.init}: checkpoint {ckpt['path']} is an algo={algo} model; DCD distills "
                              "a Duo model")
    return ckpt


def distill(cfg: DistillConfig, resume: bool = False) -> dict:
    """Distill as configured; returns the last metrics (``step``, ``loss``, ``dt``, ``val_kl``, ...)."""
    if not cfg.init:
        raise ConfigError("init='': duo distill needs init=RUN_OR_CHECKPOINT, the Duo model to distill (a `duo "
                          "train` run)")
    validate(cfg)
    set_threads(cfg.num_threads)
    env, device = setup_distributed(cfg.device)
    try:
        return _distill(cfg, resume, env, device)
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _distill(cfg: DistillConfig, resume: bool, env: Distributed, device: torch.device) -> dict:
    micro, accum = micro_batches(cfg, env)
    out_dir = Path(cfg.out_dir)

    init = _read_init(cfg)
    saved = init["config"]["train"]
    tokenizer = tokenizer_from_json(init["tokenizer"])
    data_args = dict(corpus=cfg.corpus or saved["corpus"], tokenizer=tokenizer, seq_len=cfg.seq_len or saved["seq_len"],
                     val_fraction=cfg.val_fraction or saved["val_fraction"], cache=cfg.cache_dir or None)
    data = prepare_data(**data_args) if env.main else None
    env.barrier()
    data = data or prepare_data(**data_args)
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(data.train)} training sequences")

    mcfg = DiTConfig(**init["config"]["model"])
    gamma_min, gamma_max = noise_window(cfg.gamma_min, cfg.gamma_max, mcfg.vocab_size, DCD_ALPHA_RANGE)
    cfg = dataclasses.replace(cfg, gamma_min=gamma_min, gamma_max=gamma_max)
    student, teacher = DiT(mcfg).to(device), DiT(mcfg).to(device)
    student.load_state_dict(init["model" if cfg.init_weights == "raw" else "ema"])
    objective = DCDLoss(student, teacher, loss=cfg.loss, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max,
                        time_shift=cfg.time_shift, teacher_dropout=cfg.teacher_dropout)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    ema = EMA(student, cfg.ema)
    if cfg.student_ema == "carry":
        ema.load(init["ema"], init["state"]["ema_updates"])
    step, run_id, pending = 0, new_run_id(), {}

    if env.main:
        clean(out_dir)
    env.barrier()

    ckpt_path = resume_point(out_dir, resume)
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        check_resume(ckpt, mcfg, data, "distill")
        if "teacher" not in ckpt:
            raise CheckpointError(f"checkpoint {ckpt['path']} is incomplete (missing teacher.safetensors)")
        schedule = ("max_steps", "rounds", "final_dt", "linear_growth_dt")
        saved_schedule = {k: ckpt["config"]["distill"].get(k) for k in schedule}
        if saved_schedule != {k: getattr(cfg, k) for k in schedule}:
            raise CheckpointError(f"checkpoint {ckpt['path']} was distilled with {saved_schedule}; the rounds and dt "
                                  "follow from these settings, so resume with the same ones")
        student.load_state_dict(ckpt["model"])
        teacher.load_state_dict(ckpt["teacher"])
        restore_optimizer(optimizer, ckpt["optimizer"], ckpt["state"]["optimizer_param_groups"])
        ema.load(ckpt["ema"], ckpt["state"]["ema_updates"])
        step, pending = ckpt["state"]["step"], ckpt["state"].get("pending", {})
        run_id = ckpt["state"].get("run_id", run_id)

    trained = objective
    if env.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    run_config = {"train": saved, "model": mcfg.to_dict(), "distill": dataclasses.asdict(cfg),
                  "init": str(init["path"]), "run": {"kind": "distill", "data": data_fingerprint(data)},
                  "duo_kernels": duo_kernels.__version__, "ops": ops.sources()}
    log = None
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out_dir / "metrics.jsonl", cfg.max_steps, step, cfg.progress)
        log.message(f"duo distill: DCD ({cfg.loss}) of {init['path']} (DiT-{saved['model']}, "
                    f"{count_parameters(student) / 1e6:.2f}M params, V={mcfg.vocab_size}), {env.world_size} rank(s) "
                    f"x {micro} x {accum} accumulation, device {device}, from step {step}; {cfg.rounds} rounds of "
                    f"{round_steps(cfg)} steps, dt {dt_at(cfg, 0):.4g} -> {dt_at(cfg, cfg.max_steps - 1):.4g}, gamma "
                    f"window [{gamma_min:.4f}, {gamma_max:.4f}]")

    def save(at_step: int, progress: dict) -> None:
        if env.main:
            state = {"step": at_step, "ema_updates": ema.updates, "run_id": run_id, "pending": progress}
            path = save_checkpoint(out_dir, at_step, model=student, ema=ema.state_dict(), optimizer=optimizer,
                                   config=run_config, state=state, tokenizer=init["tokenizer"],
                                   keep=cfg.keep_checkpoints, extra={"teacher": teacher.state_dict()})
            log.message(f"saved {path}")
        env.barrier()

    def run_eval(at_step: int, dt: float) -> dict:
        ema_student = DiT(mcfg).to(device)
        ema_student.load_state_dict(ema.state_dict())
        evaluator = DCDLoss(ema_student, teacher, loss=cfg.loss, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max,
                            time_shift=cfg.time_shift)
        result = validation_kl(evaluator, data.validation, dt, batch_size=cfg.batch_size, seed=cfg.seed,
                               device=device, precision=cfg.precision, max_batches=cfg.eval_batches or None,
                               rank=env.rank, world_size=env.world_size)
        if env.main:
            log.write({"step": at_step, "dt": dt, **result}, f"val kl {result['val_kl']:.4f}")
        return result

    def step_inputs(at_step: int):
        if at_step % round_steps(cfg) == 0:
            teacher.load_state_dict(ema.state_dict() if cfg.teacher_ema else student.state_dict())
        dt = dt_at(cfg, at_step)
        return dt, {"dt": dt}, f"dt {dt:.4f}"

    student.train()
    return optimize(cfg, env=env, device=device, sequences=data.train, objective=trained, optimizer=optimizer,
                    ema=ema, step=step, micro=micro, accum=accum, log=log, step_inputs=step_inputs,
                    run_eval=lambda at_step: run_eval(at_step, dt_at(cfg, at_step - 1)), save=save, pending=pending)
