"""The per-token NELBO of uniform-state discrete diffusion, Duo's form (duo-math §3.3, eq. 3.5).

The model's prediction ``x_theta = softmax(logits)`` of the clean token enters through
``xbar_theta = K alpha_t x_theta + (1 - alpha_t)``, the unnormalised marginal it implies for ``z_t``
(§3.1); the loss is the continuous-time ELBO integrand of the reverse CTMC, non-negative and zero iff
``x_theta`` is the one-hot of the clean token ``x0``. Everything is computed in float64 and returned as
float32. The checks, masks and reductions are shared with every loss (:mod:`duo_kernels._losses`).
"""

from __future__ import annotations

import math

import torch

from duo_kernels import _validate
from duo_kernels._losses import (_check_alpha_t, _check_logits, _check_reduction, _check_token_ids, _reduce,
                                  _token_weights)


def _drop_masked_rows(logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Zero the logits of masked tokens, so that a masked row of NaN/inf gives a 0 loss and a 0 gradient
    (a where() on the loss alone would still send NaN through the backward of its softmax)."""
    if weights is None:
        return logits
    return torch.where(weights[..., None] != 0, logits, 0.0)


def _usdm_nelbo_float64(logits: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor,
                        alpha_t: torch.Tensor, dalpha_t: torch.Tensor) -> torch.Tensor:
    """Eq. (3.5) on float64 logits (B, L, V) and float64 alpha_t, dalpha_t (B, L); float64 (B, L)."""
    k = float(logits.shape[-1])
    x_theta = torch.softmax(logits, dim=-1)
    alpha = alpha_t[..., None]
    xbar_theta = k * alpha * x_theta + (1.0 - alpha)
    log_xbar_theta = torch.log(xbar_theta)
    # The only reduction over the vocabulary; the rest gathers at z_t (index i) and x0 (index m).
    s_log = log_xbar_theta.sum(-1)
    xbar_theta_i = xbar_theta.gather(-1, z_t[..., None]).squeeze(-1)
    log_xbar_theta_i = log_xbar_theta.gather(-1, z_t[..., None]).squeeze(-1)
    log_xbar_theta_m = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)

    eq = (z_t == x0).to(torch.float64)
    ne = 1.0 - eq
    xbar_i = (1.0 - alpha_t) + k * alpha_t * eq
    kappa = (1.0 - alpha_t) / (k * alpha_t + 1.0 - alpha_t)
    r = k * alpha_t / (1.0 - alpha_t)
    coeff = dalpha_t / (k * alpha_t)

    term1 = k * (1.0 / xbar_i - 1.0 / xbar_theta_i)
    term2 = ((eq * kappa + ne) * (k * log_xbar_theta_i - s_log)
             - ne * r * (log_xbar_theta_m - log_xbar_theta_i)
             + ((k - 1.0) * kappa * eq - ne / kappa) * torch.log(kappa))
    return coeff * (term1 - term2)


def usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, *, reduction: str = "none", mask=None) -> torch.Tensor:
    """Per-token NELBO of uniform-state diffusion from logits, Duo's Rao-Blackwellised form (duo-math §3.3).

    With ``K = V``, ``x_theta = softmax(logits)``, ``xbar_theta = K alpha_t x_theta + 1 - alpha_t``,
    ``i = z_t``, ``m = x0``, ``kappa = (1 - alpha_t)/(K alpha_t + 1 - alpha_t)``, ``r = K alpha_t/(1 - alpha_t)``
    and ``coeff = dalpha_t/(K alpha_t)``, the loss is eq. (3.5):

        loss = coeff * (K (1/xbar_i - 1/xbar_theta[i])
                        - ([i = m] kappa + [i != m]) (K log xbar_theta[i] - sum_j log xbar_theta[j])
                        + [i != m] r (log xbar_theta[m] - log xbar_theta[i])
                        - ((K - 1) kappa [i = m] - [i != m]/kappa) log kappa)

    It equals the UDLM loss and the CTMC ELBO integrand, is >= 0 per token and 0 iff x_theta is the
    one-hot of x0. Computed in float64 (log-softmax inside) and differentiable w.r.t. logits. A -inf
    logit is a zero probability; a row with a NaN or +inf logit gives NaN in that token only, and a
    masked token gives exactly 0 (and a 0 gradient) whatever its logits.

    Args:
        logits: (B, L, V) float16/bfloat16/float32/float64, V >= 2.
        z_t: (B, L) int64 noisy tokens in [0, V).
        x0: (B, L) int64 clean tokens in [0, V).
        alpha_t: number or tensor of shape (), (B,), (B, 1) or (B, L); every value in (0, 1).
        dalpha_t: d alpha_t / dt, same shapes as alpha_t; finite and <= 0.
        reduction: "none" (default) -> (B, L); "sum" -> (); "mean" -> () the sum divided by the number of
            unmasked tokens (the sum of the mask's weights).
        mask: None (default, every token counts) or (B, L) bool or float weights >= 0: the per-token loss
            is multiplied by the mask (False / 0 drops the token).

    Returns:
        float32 loss, (B, L) or ().

    Example (duo-math Appendix A.3, K = 8):
        >>> logits = torch.tensor([[[-1.978243, -0.735573, 2.575851, 0.387949,
        ...                          1.840462, 1.154208, -1.272927, 1.083904]]], dtype=torch.float64)
        >>> x0 = z_t = torch.tensor([[3]])
        >>> round(float(usdm_nelbo(logits, z_t, x0, 0.4, -1.3)), 6)
        2.453731
    """
    vocab_size = _check_logits("logits", logits)
    shape = (logits.shape[0], logits.shape[1])
    _check_token_ids("z_t", z_t, shape, vocab_size)
    _check_token_ids("x0", x0, shape, vocab_size)
    device = _validate.check_same_device(logits=logits, z_t=z_t, x0=x0, mask=mask)
    _check_reduction(reduction)
    alpha_t = _validate.per_token("alpha_t", alpha_t, shape, device=device)
    _check_alpha_t(alpha_t)
    dalpha_t = _validate.per_token("dalpha_t", dalpha_t, shape, device=device)
    _validate.check_range("dalpha_t", dalpha_t, -math.inf, 0.0, lo_open=True, hi_open=False)
    weights = _token_weights(mask, shape)

    logits = _drop_masked_rows(logits.to(torch.float64), weights)
    loss = _usdm_nelbo_float64(logits, z_t, x0, alpha_t, dalpha_t)
    return _reduce(loss, weights, reduction)
