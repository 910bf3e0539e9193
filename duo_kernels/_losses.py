"""Argument checks, masks and reductions shared by the losses (reference and fast ops alike).

The NELBO (:mod:`duo_kernels.reference.nelbo`, :mod:`duo_kernels.ops.nelbo`) and the DCD KL
(:mod:`duo_kernels.reference.dcd`, :mod:`duo_kernels.ops.dcd`) take (B, L, V) logits, (B, L) token
ids, an optional (B, L) mask and ``reduction="none" | "sum" | "mean"``, checked and reduced here the
same way. Checks that read tensor values go through :func:`duo_kernels._validate.values_checked`
(skipped while ``torch.compile`` traces); eager calls check everything.
"""

from __future__ import annotations

import math

import torch

from duo_kernels import _validate

REDUCTIONS = ("none", "sum", "mean")


def _check_logits(name: str, logits) -> int:
    """(B, L, V) floating-point logits with V >= 2; returns V."""
    _validate.check_tensor(name, logits, dtypes=_validate.FLOAT_DTYPES, ndim=3)
    if logits.shape[-1] < 2:
        raise ValueError(f"{name} must have a vocabulary dimension of at least 2, got shape {tuple(logits.shape)}")
    return logits.shape[-1]


def _check_token_ids(name: str, ids, shape: tuple[int, int], vocab_size: int) -> None:
    _validate.check_tensor(name, ids, dtypes=(torch.int64,), ndim=2)
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the logits' first two dimensions), got {tuple(ids.shape)}")
    _validate.check_ids(name, ids, vocab_size)


def _check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_alpha_t(alpha_t: torch.Tensor) -> None:
    if not _validate.values_checked(alpha_t) or alpha_t.numel() == 0:
        return
    lo, hi = float(alpha_t.min()), float(alpha_t.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("alpha_t must be finite")
    if hi >= 1.0:
        raise ValueError(
            f"alpha_t must be < 1, found {hi}: at alpha_t = 1 (no noise) kappa = (1 - alpha_t)/(K alpha_t + 1"
            " - alpha_t) is 0 and the NELBO is undefined; keep t away from 0 (the schedules' eps does this)")
    if lo <= 0.0:
        raise ValueError(f"alpha_t must be > 0, found {lo}")


def _check_dalpha_t(dalpha_t: torch.Tensor) -> None:
    """d alpha_t / dt: finite and <= 0."""
    _validate.check_range("dalpha_t", dalpha_t, -math.inf, 0.0, lo_open=True, hi_open=False)


def _token_weights(mask, shape: tuple[int, int]) -> torch.Tensor | None:
    """The mask as float64 (B, L) token weights, or None for "every token counts once"."""
    if mask is None:
        return None
    _validate.check_tensor("mask", mask, dtypes=(torch.bool,) + _validate.FLOAT_DTYPES, ndim=2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {shape} (the logits' first two dimensions), got {tuple(mask.shape)}")
    if mask.is_floating_point():
        _validate.check_range("mask", mask, 0.0, math.inf, lo_open=False, hi_open=True)
    return mask.to(torch.float64)


def _reduce(loss: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Weight per-token losses (B, L) by the mask and reduce them; float32 out.

    "mean" divides by the sum of the weights (the number of unmasked tokens for a 0/1 mask), so the
    mean over zero unmasked tokens is NaN, as in ``torch.nn.functional.cross_entropy``.
    """
    if weights is not None:
        loss = loss * weights
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (loss.numel() if weights is None else weights.sum())
    return loss.to(torch.float32)
