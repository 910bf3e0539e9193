"""Training objectives: Duo's NELBO in its curriculum and discrete phases (duo-math §4.1, §4.6) and the
autoregressive baseline's cross-entropy. The noise, the relaxation and the loss head are ops of
:mod:`duo_model.ops` (fused where they have landed).

One Duo step on clean tokens ``x0`` (B, L) at times ``t`` (B,):

    curriculum ("dense" or "topk", §4.2-4.4):
        gamma = gamma_min + t (gamma_max - gamma_min);  alpha, alpha' = T(gamma), dT/dt      (§2)
        dense: (h0, z_t) = tempered_softmax_embedding(x0, gamma, tau, E)
        topk:  (ids, weights, z_t) = tempered_softmax_topk(x0, gamma, V, k, tau);  input (ids, weights)
    discrete (§3.1): alpha, alpha' = log-linear(t);  z_t = usdm_forward(x0, alpha);  input z_t
    loss_tok = usdm_nelbo(DiT(input, -log alpha), z_t, x0, alpha, alpha')                     (3.5)

with the head fused into the loss (``linear_usdm_nelbo``) when ``fused_head`` is set. Everything
random is drawn from the Philox streams of the ops with an explicit ``seed``, so a micro-batch's
noise depends only on (seed, micro-batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duo_model import ops
from duo_model.dit import DiT

PHASES = ("dense", "topk", "discrete")
TIME_EPS = 1e-3  # t in [eps, 1] (§3.5)
LOGLINEAR_EPS = 1e-3  # alpha_1 = eps (§3.1)


def antithetic_t(n: int, generator: torch.Generator, eps: float = TIME_EPS) -> torch.Tensor:
    """Stratified times for a batch of n (§3.5): ``t_i = (u_i / n + i / n) mod 1``, then mapped to
    ``[eps, 1]``; (n,) float32. The trainer draws them for the whole global batch and each rank and
    accumulation step takes its slice."""
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    t = (u / n + torch.arange(n, dtype=torch.float32) / n) % 1.0
    return (1.0 - eps) * t + eps


def curriculum_tau(step: int, log10_start: float, log10_end: float, start: int, end: int) -> float:
    """The softmax temperature of the curriculum at ``step`` (§4.3): ``10^log10_start`` before ``start``,
    log-linear to ``10^log10_end`` at ``end``."""
    if step < start or end <= start:
        return 10.0 ** log10_start
    frac = min(1.0, (step - start) / (end - start))
    return 10.0 ** (log10_start + frac * (log10_end - log10_start))


@dataclass(frozen=True)
class Phase:
    """What one Duo step does: ``kind`` in PHASES; ``tau``, ``k`` and the gamma window for the curriculum."""

    kind: str = "discrete"
    tau: float = 1e-3
    k: int = 2
    gamma_min: float = -3.55
    gamma_max: float = -1.85
    reference_compat: bool = False

    def __post_init__(self):
        if self.kind not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.kind!r}")


class DuoLoss(nn.Module):
    """Per-token Duo NELBO (B, L) fp32 of a DiT; the module that DDP wraps, so that the relaxation,
    the backbone and the loss head are one forward."""

    def __init__(self, model: DiT, fused_head: bool = True):
        super().__init__()
        self.model = model
        self.fused_head = fused_head

    def forward(self, x0: torch.Tensor, t: torch.Tensor, phase: Phase, seed: int) -> torch.Tensor:
        vocab_size = self.model.config.vocab_size
        device_type = x0.device.type
        t = t.to(x0.device)
        # The relaxation (and its soft-embedding GEMM) runs in fp32 (§7 "Precision").
        with torch.autocast(device_type, enabled=False):
            if phase.kind == "discrete":
                alpha, dalpha = ops.loglinear_schedule(t, eps=LOGLINEAR_EPS)
                z_t = ops.usdm_forward(x0, alpha, vocab_size, seed=seed)
                net_input = z_t
            else:
                gamma = phase.gamma_min + t.to(torch.float64) * (phase.gamma_max - phase.gamma_min)
                alpha, dalpha = ops.diffusion_transform_t(t, phase.gamma_min, phase.gamma_max, vocab_size)
                if phase.kind == "dense":
                    net_input, z_t = ops.tempered_softmax_embedding(x0, gamma, phase.tau, self.model.embedding.weight,
                                                                    seed=seed)
                else:
                    ids, weights, z_t = ops.tempered_softmax_topk(x0, gamma, vocab_size, phase.k, phase.tau,
                                                                  reference_compat=phase.reference_compat, seed=seed)
                    net_input = (ids, weights)
            sigma = (-torch.log(alpha)).float()
        if self.fused_head:
            hidden = self.model(net_input, sigma, return_hidden=True)
            head = self.model.output
            return ops.linear_usdm_nelbo(hidden, head.weight, head.bias, z_t, x0, alpha, dalpha)
        return ops.usdm_nelbo(self.model(net_input, sigma), z_t, x0, alpha, dalpha)


class ARLoss(nn.Module):
    """Next-token cross-entropy (B, L - 1) fp32 of a causal DiT (the AR baseline), called with sigma = 0."""

    def __init__(self, model: DiT):
        super().__init__()
        if not model.config.causal:
            raise ValueError("the AR loss needs a causal DiT (DiTConfig(causal=True))")
        self.model = model

    def forward(self, x0: torch.Tensor, t=None, phase=None, seed=None) -> torch.Tensor:
        """``t``, ``phase`` and ``seed`` are ignored (no noise): the signature is DuoLoss's, so that the
        trainer and the evaluator call either objective alike."""
        inputs, targets = x0[:, :-1], x0[:, 1:]
        logits = self.model(inputs, torch.zeros(x0.shape[0], device=x0.device))
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf
