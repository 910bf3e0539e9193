"""Text from an autoregressive checkpoint (``duo train algo=ar``): one token per network call, with a
KV cache.

    x[:, 0] = BOS;  cache = KVCache(seq_len - 1)
    for i in 1 .. seq_len - 1:   logits = DiT(x[:, i - 1], sigma = 0, cache)      (B, V): position i - 1 only
                                 x[:, i] = next_token(logits, temperature, top_p, greedy)

The first call is the prefill (here of the one-token prompt BOS), every later call a decode step that
runs one position and attends to the cached keys and values of the earlier ones, so a sequence of L
tokens costs L - 1 calls and no position is ever recomputed. Sequences have a fixed length, as Duo's
samples do (an EOS does not stop them). ``next_token``: ``argmax`` with ``greedy``, else one draw
from ``softmax(logits / temperature)`` (float64) restricted to its nucleus ``top_p`` (sorted
descending, a token is kept while the mass before it is at most ``top_p``, as the Duo sampler's filter
does), by inverse CDF with one counter-based uniform per row.

Every draw comes from ``seed``: batch ``b``'s step ``i`` uses seed ``(seed, "ar", b, i)``, row r its
counter r (:mod:`duo_kernels.rng`, the same numbers on every device), so the same seed gives the same
text. On a GPU the model runs under bf16 autocast (``precision="auto"``), the cache in bf16.

Command line: ``duo sample AR_RUN [temperature=0.8] [top_p=0.9] [greedy=true] [num_samples=...]``.
"""

from __future__ import annotations

import json
import math

import torch

from duo_kernels import rng
from duo_model.checkpoint import load_model, resolve
from duo_model.config import ConfigError
from duo_model.dit import DiT, KVCache
from duo_model.runtime import autocast_context, derive_seed, setup_distributed
from duo_model.sample import SampleConfig, decode, sample_in_batches, write_samples

# Settings of `duo sample` that only the diffusion sampler reads; an AR run rejects changed ones.
DIFFUSION_ONLY = ("checkpoint", "steps", "recipe", "noise_removal", "time_profile", "kappa", "high_frac",
                  "middle_frac", "eps")
AR_ONLY = ("temperature", "greedy")


def next_token(logits: torch.Tensor, *, seed: int, temperature: float = 1.0, top_p: float = 1.0,
               greedy: bool = False) -> torch.Tensor:
    """One token per row of logits (B, V): argmax with ``greedy``, else a draw from the nucleus
    ``top_p`` of ``softmax(logits / temperature)`` (module docstring). Returns (B,) int64.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
        >>> next_token(logits, seed=0, greedy=True).tolist()
        [1, 0]
        >>> next_token(logits, seed=0, top_p=0.5).tolist()        # the nucleus is the top token
        [1, 0]
    """
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(probs, dim=-1).roll(1, dims=-1)
        mass_before[:, 0] = 0.0
        probs = torch.where(mass_before <= top_p, probs, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    u = rng.uniform((len(cdf),), seed=seed, dtype=torch.float64, device=cdf.device)
    # the first index whose cdf reaches u * mass: never an entry of probability 0, as u > 0
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def _check_sampler(temperature: float, top_p: float, greedy: bool) -> None:
    if greedy and (temperature != 1.0 or top_p != 1.0):
        raise ValueError("greedy decoding takes the argmax: leave temperature (1) and top_p (1) unset")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


@torch.no_grad()
def generate_ar(model: DiT, *, num_samples: int, seq_len: int, bos_id: int, temperature: float = 1.0,
                top_p: float = 1.0, greedy: bool = False, seed: int = 1, batch_size: int = 16,
                device: torch.device | str = "cpu", precision: str = "auto") -> tuple[torch.Tensor, dict]:
    """Sample ``num_samples`` sequences of ``seq_len`` ids (BOS first) from a causal DiT with a KV cache
    (module docstring).

    Returns ``(ids, stats)``: ids (num_samples, seq_len) int64 on the CPU and stats ``{"seconds",
    "seconds_per_sample", "tokens_per_s", "nfe"}`` (network calls per sequence: seq_len - 1), the
    keys of :func:`duo_model.sample.generate`.

    Example::

        >>> from duo_model.dit import DiTConfig
        >>> model = DiT(DiTConfig.preset("demo", vocab_size=50, causal=True)).eval()
        >>> ids, stats = generate_ar(model, num_samples=2, seq_len=8, bos_id=0, seed=0)
        >>> ids.shape, ids[:, 0].tolist(), stats["nfe"]
        (torch.Size([2, 8]), [0, 0], 7)
    """
    if not model.config.causal:
        raise ValueError("this is a Duo model; autoregressive generation needs a causal (algo=ar) model")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (BOS and one generated token), got {seq_len}")
    if not 0 <= bos_id < model.config.vocab_size:
        raise ValueError(f"bos_id {bos_id} is not an id of the vocabulary (size {model.config.vocab_size})")
    _check_sampler(temperature, top_p, greedy)
    device = torch.device(device)

    def sample_batch(b, n):
        x = torch.empty(n, seq_len, dtype=torch.int64, device=device)
        x[:, 0] = bos_id
        sigma = torch.zeros(n, device=device)
        cache = KVCache(seq_len - 1)
        for i in range(1, seq_len):
            with autocast_context(device, precision):
                logits = model(x[:, i - 1:i], sigma, cache=cache)[:, -1]
            x[:, i] = next_token(logits, seed=derive_seed(seed, "ar", b, i), temperature=temperature, top_p=top_p,
                                 greedy=greedy)
        return x

    ids, stats = sample_in_batches(model, sample_batch, num_samples=num_samples, seq_len=seq_len,
                                   batch_size=batch_size, device=device)
    return ids, {**stats, "nfe": seq_len - 1}


def checkpoint_algo(path: str) -> str:
    """``"duo"`` or ``"ar"``: the algorithm a run folder's latest checkpoint (or a checkpoint folder) was
    trained with."""
    return json.loads((resolve(path) / "config.json").read_text())["train"]["algo"]


def check_settings(cfg: SampleConfig, algo: str) -> None:
    """A ConfigError for a changed setting that the checkpoint's sampler would not read."""
    defaults = SampleConfig()
    unused = DIFFUSION_ONLY if algo == "ar" else AR_ONLY
    changed = [name for name in unused if getattr(cfg, name) != getattr(defaults, name)]
    if changed:
        kind = "an autoregressive (algo=ar)" if algo == "ar" else "a Duo"
        raise ConfigError(f"{', '.join(changed)} cannot be used with {kind} checkpoint: its sampler does not read it")


def sample_ar_checkpoint(path: str, cfg: SampleConfig) -> dict:
    """``duo sample`` on an AR run folder or checkpoint: generate, write ``cfg.out``, return the summary."""
    check_settings(cfg, "ar")
    for name in ("num_samples", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    top_p = cfg.top_p or 1.0
    try:
        _check_sampler(cfg.temperature, top_p, cfg.greedy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _, device = setup_distributed(cfg.device)
    model, info = load_model(path, ema=cfg.ema, device=device)
    tokenizer = info["tokenizer"]
    seq_len = cfg.seq_len or info["config"]["train"]["seq_len"]
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    ids, stats = generate_ar(model, num_samples=cfg.num_samples, seq_len=seq_len, bos_id=tokenizer.bos_id,
                             temperature=cfg.temperature, top_p=top_p, greedy=cfg.greedy, seed=cfg.seed,
                             batch_size=cfg.batch_size, device=device, precision=cfg.precision)
    summary = {"checkpoint": str(info["path"]), "step": info["state"]["step"], "algo": "ar",
               "sampler": {"temperature": cfg.temperature, "top_p": top_p, "greedy": cfg.greedy},
               "num_samples": cfg.num_samples, "seq_len": seq_len, "seed": cfg.seed, "device": str(device), **stats,
               "out": cfg.out}
    write_samples(cfg.out, summary, ids, decode(tokenizer, ids), tokenizer.to_json())
    return summary

