"""Discrete Consistency Distillation (DCD, duo-math §5): a Duo model taught to jump from t to s = t - dt
in one step, so that it samples in a few steps.

One optimizer step, as the trainer's (global batch, micro-batches, ranks, warm-up, clipping, EMA):

    round r = step // update_teacher_every; at the start of a round the teacher takes the student's
        raw weights (the EMA ones with teacher_ema)
    dt = 2^r / T  (linear_growth_dt: 0.001 + (step / max_steps)(0.25 - 0.001))                    (§5.1)
    t ~ stratified in [1e-3, 1] (§3.5);  t <- min(t + dt, 1);  s = t - dt
    gamma_u = gamma_min + u (gamma_max - gamma_min);  alpha_u = T(gamma_u)  for u in {t, s}       (§2)
    (z_t, z_s) = gaussian_argmax_pair(x0, gamma_t, gamma_s, V)  (one shared Gaussian noise)       (§5.4)
    loss_tok = KL(student(z_t, -log alpha_t) || teacher(z_s, -log alpha_s))  (kl-bwd; kl-fwd swaps)
             = dcd_kl(student logits, teacher logits)

The student starts from the checkpoint's EMA weights (``init_weights=raw`` for the raw ones) and its
EMA restarts from them. The run folder is a checkpoint like a training run's (its config keeps the
initial run's ``train`` settings, so ``duo eval`` and ``duo sample`` read it alike) plus the teacher
(``teacher.safetensors``), so ``--resume`` continues mid-round exactly. Validation reports the
distillation KL (``val_kl``) of the EMA student against the current teacher at the current dt, as the
published code does.

Command line: ``duo distill init=RUN_OR_CHECKPOINT [key=value ...]`` (see ``duo distill --help``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import duo_kernels
from duo_model import ops
from duo_model.checkpoint import (CheckpointError, clean, new_run_id, read_checkpoint, restore_optimizer,
                                  save_checkpoint)
from duo_model.config import (ConfigError, above, at_least, corpus_spec, device_spec, existing_path, finite, setting,
                              validate, within, writable_path)
from duo_model.data import prepare_data, tokenizer_from_json
from duo_model.dit import DiT, DiTConfig, count_parameters
from duo_model.eval import mean_loss
from duo_model.runtime import Distributed, setup_distributed
from duo_model.train import EMA, MetricsLog, check_resume, data_fingerprint, micro_batches, optimize, resume_point

DT_LINEAR = (0.001, 0.25)  # linear_growth_dt: dt from 0.001 to 0.25 over the run (§5.2)


@dataclass
class DistillConfig:
    """Every setting of ``duo distill`` (``key=value`` on the command line)."""

    init: str = setting("", "the Duo run folder (its latest checkpoint) or checkpoint folder to distill; required",
                        group="Initialisation", check=existing_path())
    init_weights: str = setting("ema", "start the student from the checkpoint's ema or raw weights", ("ema", "raw"))
    corpus: str = setting("", "training text (default: the checkpoint's), tokenized with the checkpoint's tokenizer",
                          group="Data", check=corpus_spec(optional=True))
    seq_len: int = setting(0, "tokens per sequence (0 = the checkpoint's)", check=at_least(0))
    val_fraction: float = setting(0.0, "held-out share of the corpus (0 = the checkpoint's)",
                                  check=within(0, 1, hi_open=True))
    cache_dir: str = setting("", "cache folder (default $DUO_MODEL_CACHE or ~/.cache/duo_model)",
                             check=writable_path(optional=True))
    T: int = setting(64, "the first round's step is dt = 1/T (the published script: 512)",
                     group="DCD (duo-math §5)", check=at_least(1))
    update_teacher_every: int = setting(100, "steps per round: the teacher is refreshed and dt doubles every this "
                                        "many steps (the paper: 10000)", check=at_least(1))
    linear_growth_dt: bool = setting(False, "grow dt linearly from 0.001 to 0.25 over max_steps instead of doubling")
    loss: str = setting("kl-bwd", "kl-bwd: KL(student || teacher) (the paper's); kl-fwd: KL(teacher || student)",
                        ("kl-bwd", "kl-fwd"))
    gamma_min: float = setting(-4.0, "gamma at t = 0 (alpha = 0.9987 for the GPT-2 vocabulary)", check=finite())
    gamma_max: float = setting(-1.0, "gamma at t = 1 (alpha = 0.0062 for the GPT-2 vocabulary)", check=finite())
    teacher_ema: bool = setting(False, "refresh the teacher from the EMA weights instead of the raw ones")
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
        if self.gamma_min >= self.gamma_max:
            raise ConfigError(f"gamma_min={self.gamma_min} must be < gamma_max={self.gamma_max}")


def dt_at(cfg: DistillConfig, step: int) -> float:
    """The step size dt of ``step`` (§5.1): doubling every round, or linear growth."""
    if cfg.linear_growth_dt:
        lo, hi = DT_LINEAR
        return lo + (step / cfg.max_steps) * (hi - lo)
    return min(1.0, 2.0 ** (step // cfg.update_teacher_every) / cfg.T)


class DCDLoss(nn.Module):
    """Per-token DCD loss (B, L) fp32 of a student DiT against a frozen teacher DiT: the module DDP
    wraps. ``forward(x0, t, dt, seed)`` takes clean ids (B, L), raw times t (B,) in [1e-3, 1] (shifted
    up by dt here), the step size and the noise seed."""

    def __init__(self, student: DiT, teacher: DiT, *, loss: str = "kl-bwd", gamma_min: float = -4.0,
                 gamma_max: float = -1.0):
        super().__init__()
        if loss not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"loss must be 'kl-bwd' or 'kl-fwd', got {loss!r}")
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False)
        self.direction = "reverse" if loss == "kl-bwd" else "forward"
        self.gamma_min, self.gamma_max = gamma_min, gamma_max

    def forward(self, x0: torch.Tensor, t: torch.Tensor, dt: float, seed: int) -> torch.Tensor:
        vocab_size = self.student.config.vocab_size
        t = torch.clamp(t.to(x0.device, torch.float64) + dt, max=1.0)
        s = t - dt
        with torch.autocast(x0.device.type, enabled=False):
            gamma_t = self.gamma_min + t * (self.gamma_max - self.gamma_min)
            gamma_s = self.gamma_min + s * (self.gamma_max - self.gamma_min)
            z_t, z_s = ops.gaussian_argmax_pair(x0, gamma_t, gamma_s, vocab_size, seed=seed)
            sigma_t = -torch.log(ops.diffusion_transform(gamma_t, vocab_size)[0]).float()
            sigma_s = -torch.log(ops.diffusion_transform(gamma_s, vocab_size)[0]).float()
        self.teacher.eval()
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
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
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
    student, teacher = DiT(mcfg).to(device), DiT(mcfg).to(device)
    student.load_state_dict(init[cfg.init_weights])
    objective = DCDLoss(student, teacher, loss=cfg.loss, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    ema = EMA(student, cfg.ema)
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
                    f"x {micro} x {accum} accumulation, device {device}, from step {step}")

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
        evaluator = DCDLoss(ema_student, teacher, loss=cfg.loss, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max)
        result = validation_kl(evaluator, data.validation, dt, batch_size=cfg.batch_size, seed=cfg.seed,
                               device=device, precision=cfg.precision, max_batches=cfg.eval_batches or None,
                               rank=env.rank, world_size=env.world_size)
        if env.main:
            log.write({"step": at_step, "dt": dt, **result}, f"val kl {result['val_kl']:.4f}")
        return result

    def step_inputs(at_step: int):
        if at_step % cfg.update_teacher_every == 0:
            teacher.load_state_dict(ema.state_dict() if cfg.teacher_ema else student.state_dict())
        dt = dt_at(cfg, at_step)
        return dt, {"dt": dt}, f"dt {dt:.4f}"

    student.train()
    return optimize(cfg, env=env, device=device, sequences=data.train, objective=trained, optimizer=optimizer,
                    ema=ema, step=step, micro=micro, accum=accum, log=log, step_inputs=step_inputs,
                    run_eval=lambda at_step: run_eval(at_step, dt_at(cfg, at_step - 1)), save=save, pending=pending)
