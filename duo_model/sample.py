"""Few-step sampling from a Duo checkpoint (duo-math §6): ancestral steps, Psi-samplers, nucleus
filtering and the greedy tail, at any step count.

    x ~ Uniform ids (N, L);  ts = time profile (steps + 1 points);  kappa = kappa schedule (§6.4)
    for i in 0 .. steps-1:   (t, s) = (ts[i], ts[i+1]),  alpha = log-linear schedule (§3.1)
        x = ancestral_step(DiT(x, -log alpha_t), x, alpha_t, alpha_s, kappa=kappa[i], top_p)    (6.2)
    noise removal at t0 = ts[-1]:  greedy: x = greedy_tail(DiT(x, -log alpha_t0))  (the Greedy-Tail)
                                   ancestral: one more step with alpha_s = 1;  none: keep x

So a run costs steps + 1 network calls (steps with ``noise_removal=none``). The step is the fused
``ancestral_step`` (one pass over each logits row, float64-grade Gumbel) where it has landed.

Recipes (``recipe=``; each sets the time profile, kappa modes, segment fractions and top-p of a
published script, duo-math §6.4; any of them can be overridden):

============== ========================================== ============================================ =====
recipe          time profile                               kappa (high / middle / low segments)         top-p
============== ========================================== ============================================ =====
``ancestral``   linear                                     pure-posterior (kappa = 1)                   1
``max-rescale`` linear                                     max-rescale-0.05                             0.9
``max-capped``  linear                                     max-capped-0.01                              0.9
``loop``        linear-constant-linear-0.9-inv (0.45, 0.5) pure-posterior / constant-remdm-0.01 / pure  0.95
``psi-pc``      linear (0.5, 0.4)                          pure-posterior / constant-0.95 / pure        1
============== ========================================== ============================================ =====

Every draw comes from ``seed``: sample batch ``b`` starts from ids of ``(seed, b)`` and step ``i``
draws with seed ``(seed, b, i)``, so the same seed gives the same samples on any device count.

Command line: ``duo sample RUN_OR_CHECKPOINT steps=8 [key=value ...]``, or for a published Duo model
``duo sample checkpoint=hf:s-sahoo/duo-distilled steps=8`` (:mod:`duo_model.published`; see
``duo sample --help``); on an autoregressive (``algo=ar``) run it runs :mod:`duo_model.ar_sample` instead.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duo_model import ops
from duo_model.checkpoint import load_model
from duo_model.config import (ConfigError, above, at_least, device_spec, existing_path, matches, setting,
                              validate, within, writable_path)
from duo_model.dit import DiT
from duo_model.loss import LOGLINEAR_EPS
from duo_model.published import load_for_commands
from duo_model.runtime import autocast_context, derive_seed, setup_distributed


@dataclass(frozen=True)
class Recipe:
    """A sampler: time profile, kappa mode (one, or a high/middle/low triple), fractions, top-p."""

    profile: str = "linear"
    kappa: str | tuple[str, str, str] = "pure-posterior"
    high_frac: float | None = None
    middle_frac: float | None = None
    top_p: float = 1.0


RECIPES = {
    "ancestral": Recipe(),
    "max-rescale": Recipe(kappa="max-rescale-0.05", top_p=0.9),
    "max-capped": Recipe(kappa="max-capped-0.01", top_p=0.9),
    "loop": Recipe("linear-constant-linear-0.9-inv", ("pure-posterior", "constant-remdm-0.01", "pure-posterior"),
                   0.45, 0.5, 0.95),
    "psi-pc": Recipe("linear", ("pure-posterior", "constant-0.95", "pure-posterior"), 0.5, 0.4, 1.0),
}


_NUMBER = r"[0-9.eE+-]+"
PROFILE = matches(rf"|linear|linear-constant-linear-{_NUMBER}(-inv)?", "linear or linear-constant-linear-<c>[-inv]",
                  "zigzag")
_KAPPA_MODE = rf"pure-posterior|pure-pc|(constant|constant-remdm|max-capped|max-rescale)-{_NUMBER}"
KAPPA = matches(rf"|\s*({_KAPPA_MODE})\s*|(\s*({_KAPPA_MODE})\s*,){{2}}\s*({_KAPPA_MODE})\s*",
                "a kappa mode (pure-posterior, pure-pc, constant-<eta>, constant-remdm-<eta>, max-capped-<eta>, "
                "max-rescale-<eta>) or three separated by commas", "sometimes")


@dataclass
class SampleConfig:
    """Every setting of ``duo sample`` (``key=value`` on the command line)."""

    checkpoint: str = setting("", "a published Duo model instead of a run folder: hf:OWNER/NAME (downloaded with "
                              "huggingface_hub), a snapshot folder (config.json + model.safetensors) or a Lightning "
                              ".ckpt of the Duo code (EMA weights unless ema=false)", group="Model",
                              check=existing_path(optional=True, also="hf:"))
    steps: int = setting(64, "sampler steps (network calls: steps + 1 with a noise-removal step)", group="Sampler",
                         check=at_least(1))
    recipe: str = setting("ancestral", "sampler recipe (module docstring; duo-math §6.4)", tuple(RECIPES))
    noise_removal: str = setting("greedy", "last step at t = eps: greedy (argmax, the Greedy-Tail), ancestral (one "
                                 "more step to alpha = 1), none", ("greedy", "ancestral", "none"))
    time_profile: str = setting("", "time profile: linear or linear-constant-linear-<c>[-inv] (default: the "
                                "recipe's)", check=PROFILE)
    kappa: str = setting("", "kappa mode, or high,middle,low modes separated by commas (default: the recipe's)",
                         check=KAPPA)
    high_frac: float = setting(-1.0, "share of the grid in the high segment (-1 = the recipe's)",
                               check=within(0, 1, also=(-1,)))
    middle_frac: float = setting(-1.0, "share of the grid in the middle segment (-1 = the recipe's)",
                                 check=within(0, 1, also=(-1,)))
    top_p: float = setting(0.0, "nucleus mass in (0, 1] (0 = the recipe's)",
                           check=within(0, 1, lo_open=True, also=(0,)))
    eps: float = setting(1e-5, "last time of the grid", check=within(0, 1, lo_open=True, hi_open=True))
    temperature: float = setting(1.0, "softmax temperature of each token", group="Autoregressive models (algo=ar; "
                                 "top_p applies too, 0 = 1)", check=above(0))
    greedy: bool = setting(False, "argmax decoding (temperature and top_p unset)")
    num_samples: int = setting(16, "sequences to generate", group="Output", check=at_least(1))
    seq_len: int = setting(0, "tokens per sequence (0 = the checkpoint's)", check=at_least(0))
    batch_size: int = setting(16, "sequences per network call", check=at_least(1))
    out: str = setting("samples.json", "output file: settings, throughput, and each sample's text and ids",
                       check=writable_path())
    ema: bool = setting(True, "sample with the EMA weights (false: the raw weights)")
    seed: int = setting(1, "seed of the initial ids and every step", check=at_least(0))
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N", group="Run", check=device_spec())
    precision: str = setting("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32", ("auto", "bf16", "fp32"))
    num_threads: int = setting(0, "torch CPU threads (0 = torch's default)", check=at_least(0))

    def validate(self) -> None:
        """The rules between settings (:func:`duo_model.config.validate` checks each setting first)."""
        if max(self.high_frac, 0) + max(self.middle_frac, 0) > 1:
            raise ConfigError(f"high_frac={self.high_frac} and middle_frac={self.middle_frac} add up to more than 1")


def resolve_recipe(cfg: SampleConfig) -> Recipe:
    """The configured recipe with the explicit settings applied on top."""
    base = RECIPES[cfg.recipe]
    kappa = base.kappa
    if cfg.kappa:
        parts = tuple(p.strip() for p in cfg.kappa.split(","))
        if len(parts) not in (1, 3):
            raise ConfigError(f"kappa={cfg.kappa!r}: give one mode or three (high,middle,low)")
        kappa = parts[0] if len(parts) == 1 else parts
    return Recipe(profile=cfg.time_profile or base.profile, kappa=kappa,
                  high_frac=base.high_frac if cfg.high_frac < 0 else cfg.high_frac,
                  middle_frac=base.middle_frac if cfg.middle_frac < 0 else cfg.middle_frac,
                  top_p=cfg.top_p or base.top_p)


def sampling_plan(recipe: Recipe, steps: int, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ts, kappa)``: the (steps + 1,) time grid and the kappa of every point (step i uses kappa[i]),
    float64 (duo-math §6.4). A constant kappa mode splits nothing, so it needs no fractions."""
    try:
        ts = ops.sampling_timesteps(recipe.profile, steps, eps, high_frac=recipe.high_frac,
                                    middle_frac=recipe.middle_frac)
        kappa = ops.psi_kappas(recipe.kappa, ts, noise_eps=LOGLINEAR_EPS, high_frac=recipe.high_frac,
                               middle_frac=recipe.middle_frac)
    except ValueError as exc:
        raise ConfigError(f"sampler: {exc}") from None
    return ts, kappa


@torch.no_grad()
def generate(model: DiT, *, num_samples: int, seq_len: int, steps: int, recipe: Recipe = RECIPES["ancestral"],
             noise_removal: str = "greedy", eps: float = 1e-5, seed: int = 1, batch_size: int = 16,
             device: torch.device | str = "cpu", precision: str = "auto") -> tuple[torch.Tensor, dict]:
    """Sample ``num_samples`` sequences of ``seq_len`` ids from a Duo DiT (module docstring).

    Returns ``(ids, stats)``: ids (num_samples, seq_len) int64 on the CPU and stats ``{"seconds",
    "seconds_per_sample", "tokens_per_s", "nfe"}`` (nfe: network calls per sequence).

    Example::

        >>> from duo_model.dit import DiTConfig
        >>> model = DiT(DiTConfig.preset("demo", vocab_size=50)).eval()
        >>> ids, stats = generate(model, num_samples=2, seq_len=8, steps=4, seed=0)
        >>> ids.shape, stats["nfe"]
        (torch.Size([2, 8]), 5)
    """
    if noise_removal not in ("greedy", "ancestral", "none"):
        raise ValueError(f"noise_removal must be greedy, ancestral or none, got {noise_removal!r}")
    if model.config.causal:
        raise ValueError("this is an autoregressive (algo=ar) model; the diffusion sampler needs a Duo model")
    device = torch.device(device)
    ts, kappa = sampling_plan(recipe, steps, eps)
    alpha = ops.loglinear_schedule(ts, eps=LOGLINEAR_EPS)[0]
    vocab_size = model.config.vocab_size

    def logits_at(x, i):
        sigma = torch.full((len(x),), float(-math.log(alpha[i])), device=device)
        with autocast_context(device, precision):
            return model(x, sigma)

    def sample_batch(b, n):
        generator = torch.Generator().manual_seed(derive_seed(seed, "init", b))
        x = torch.randint(0, vocab_size, (n, seq_len), generator=generator).to(device)
        for i in range(steps):
            x = ops.ancestral_step(logits_at(x, i), x, float(alpha[i]), float(alpha[i + 1]), kappa=float(kappa[i]),
                                   top_p=recipe.top_p, seed=derive_seed(seed, "step", b, i))
        if noise_removal == "greedy":
            x = ops.greedy_tail(logits_at(x, steps))
        elif noise_removal == "ancestral":
            x = ops.ancestral_step(logits_at(x, steps), x, float(alpha[steps]), 1.0, top_p=recipe.top_p,
                                   seed=derive_seed(seed, "step", b, steps))
        return x

    ids, stats = sample_in_batches(model, sample_batch, num_samples=num_samples, seq_len=seq_len,
                                   batch_size=batch_size, device=device)
    return ids, {**stats, "nfe": steps + (noise_removal != "none")}


def sample_in_batches(model: torch.nn.Module, sample_batch, *, num_samples: int, seq_len: int, batch_size: int,
                      device: torch.device) -> tuple[torch.Tensor, dict]:
    """``sample_batch(b, n)`` (ids (n, seq_len) on ``device``) for batches ``b`` of ``n <= batch_size``
    sequences, the model in eval mode: the ids concatenated on the CPU and ``{"seconds",
    "seconds_per_sample", "tokens_per_s"}`` of wall time, GPU work included."""
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = [sample_batch(b, min(batch_size, num_samples - b * batch_size)).cpu()
           for b in range(math.ceil(num_samples / batch_size))]
    seconds = time.perf_counter() - start
    model.train(was_training)
    return torch.cat(out), {"seconds": seconds, "seconds_per_sample": seconds / num_samples,
                            "tokens_per_s": num_samples * seq_len / seconds}


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """The text of each sample (special tokens dropped)."""
    return [tokenizer.decode(row.tolist()) for row in ids]


def sample_checkpoint(path: str | None, cfg: SampleConfig) -> dict:
    """Sample from a run folder's latest checkpoint (or a checkpoint folder), or from the published
    model ``cfg.checkpoint``; write ``cfg.out``, and return the summary (everything but the samples)."""
    validate(cfg)
    if bool(path) == bool(cfg.checkpoint):
        raise ConfigError("give either a run or checkpoint folder (positional) or checkpoint=<published model>")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _, device = setup_distributed(cfg.device)
    if cfg.checkpoint:
        model, info = load_for_commands(cfg.checkpoint, ema=cfg.ema, device=device)
        info["decode"] = info["tokenizer"].batch_decode  # as the Duo code decodes its samples
    else:
        model, info = load_model(path, ema=cfg.ema, device=device)
        if info["config"]["train"]["algo"] != "duo":
            raise ConfigError(f"checkpoint {info['path']} is an algo={info['config']['train']['algo']} model; "
                              "duo sample samples Duo models")
        info.update(seq_len=info["config"]["train"]["seq_len"], decode=lambda ids: decode(info["tokenizer"], ids))
    recipe = resolve_recipe(cfg)
    seq_len = cfg.seq_len or info["seq_len"]
    ids, stats = generate(model, num_samples=cfg.num_samples, seq_len=seq_len, steps=cfg.steps, recipe=recipe,
                          noise_removal=cfg.noise_removal, eps=cfg.eps, seed=cfg.seed, batch_size=cfg.batch_size,
                          device=device, precision=cfg.precision)
    summary = {"checkpoint": str(info["path"]), "step": info["state"]["step"], "steps": cfg.steps,
               "recipe": cfg.recipe, "sampler": recipe.__dict__, "noise_removal": cfg.noise_removal,
               "num_samples": cfg.num_samples, "seq_len": seq_len, "seed": cfg.seed, "device": str(device), **stats,
               "out": cfg.out}
    write_samples(cfg.out, summary, ids, info["decode"](ids), info["tokenizer"].to_json())
    return summary


def write_samples(path: str | Path, summary: dict, ids: torch.Tensor, texts: list[str], tokenizer: dict) -> None:
    """A samples file: ``summary`` plus ``tokenizer`` (spec and fingerprint) and ``samples``, a list of
    ``{"text", "ids"}``, as JSON (what ``duo eval --gen`` reads)."""
    record = {**summary, "tokenizer": {k: tokenizer[k] for k in ("spec", "vocab_size", "fingerprint")},
              "samples": [{"text": t, "ids": row.tolist()} for t, row in zip(texts, ids)]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def read_samples(path: str | Path) -> dict:
    """A samples file written by :func:`write_samples`, with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"samples file {str(path)!r} does not exist (write one with `duo sample`)")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record["samples"], list) or not all("ids" in s and "text" in s for s in record["samples"]):
            raise KeyError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a samples file of `duo sample`") from None
    return record
