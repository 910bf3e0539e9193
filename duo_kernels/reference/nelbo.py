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


def log1p_minus(t: torch.Tensor) -> torch.Tensor:
    """g(t) = t - log(1 + t) >= 0 for t >= 0, without cancellation: its series below 1e-3."""
    series = t * t * (0.5 - t * (1.0 / 3.0 - t * (0.25 - t * 0.2)))
    return torch.where(t < 1e-3, series, t - torch.log1p(t))


def log1p_over(t: torch.Tensor) -> torch.Tensor:
    """h(t) = log(1 + t) - t/(1 + t) >= 0 for t >= 0, without cancellation: its series below 1e-3."""
    series = t * t * (0.5 - t * (2.0 / 3.0 - t * (0.75 - t * 0.8)))
    return torch.where(t < 1e-3, series, torch.log1p(t) - t / (1.0 + t))


def _usdm_nelbo_float64(logits: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor,
                        alpha_t: torch.Tensor, dalpha_t: torch.Tensor) -> torch.Tensor:
    """Eq. (3.5) on float64 logits (B, L, V) and float64 alpha_t, dalpha_t (B, L); float64 (B, L).

    Written without cancellation, so that it stays accurate as alpha_t -> 0, where eq. (3.5) as written
    subtracts O(1) terms to get an O(alpha_t^2) bracket. With ``r = K a/(1 - a)``, ``p = x_theta``,
    ``t_j = r p_j`` (so ``xbar_theta_j = (1 - a)(1 + t_j)``), ``g(t) = t - log(1 + t)``,
    ``h(t) = log(1 + t) - t/(1 + t)`` and ``G = sum_j g(t_j)``, the bracket of eq. (3.5) is exactly

        z_t != x0:  -(K + r) h(t_i) - G - r^2 (1 - p_m) - r g(t_m) + (1 + r) g(r)
        z_t == x0:  (-r^2 (1 - p_i)(1 - K p_i)/(1 + t_i) + K g(t_i) - G - (K - 1) g(r)) / (1 + r)

    (substitute ``log xbar_theta_j = log(1 - a) + t_j - g(t_j)``, ``sum_j t_j = r``): every term is
    O(r^2), and g, h are evaluated by their series for small arguments. For r >= 1 (where these O(r^2)
    terms cancel instead) the bracket is eq. (3.5) with ``log xbar_theta_j - log(1 - a) = log(1 + t_j)``.
    """
    k = float(logits.shape[-1])
    log_p = torch.log_softmax(logits, dim=-1)
    r = k * alpha_t / (1.0 - alpha_t)
    t = r[..., None] * torch.exp(log_p)
    big_g = log1p_minus(t).sum(-1)
    s_l = torch.log1p(t).sum(-1)
    log_p_i = log_p.gather(-1, z_t[..., None]).squeeze(-1)
    log_p_m = log_p.gather(-1, x0[..., None]).squeeze(-1)
    # coeff * bracket = dalpha/(1 - a) * (bracket / r): coeff overflows for a subnormal alpha_t
    return dalpha_t / (1.0 - alpha_t) * nelbo_bracket_over_r(k, r, big_g, s_l, log_p_i, log_p_m, z_t == x0)


def nelbo_bracket_over_r(k: float, r: torch.Tensor, big_g: torch.Tensor, s_l: torch.Tensor, log_p_i: torch.Tensor,
                         log_p_m: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """The bracket of eq. (3.5) divided by r, from per-token float64 ``r``, ``G = sum_j g(t_j)``,
    ``S = sum_j log(1 + t_j)``, ``log p_i``, ``log p_m`` and ``same = [z_t == x0]``: the
    cancellation-free form for r < 1, eq. (3.5) in log1p form for r >= 1 (see :func:`_usdm_nelbo_float64`)."""
    small = r < 1.0
    rs = torch.where(small, r, 0.5)  # each branch sees finite inputs: no NaN reaches a gradient
    p_i = torch.exp(log_p_i)
    t_i, t_m = rs * p_i, rs * torch.exp(log_p_m)
    differ = -(k + rs) * log1p_over(t_i) - big_g + rs * rs * torch.expm1(log_p_m) - rs * log1p_minus(t_m) \
        + (1.0 + rs) * log1p_minus(rs)
    equal = (rs * rs * torch.expm1(log_p_i) * (1.0 - k * p_i) / (1.0 + t_i) + k * log1p_minus(t_i)
             - big_g - (k - 1.0) * log1p_minus(rs)) / (1.0 + rs)
    # below r = 1e-150 the O(r^2) bracket is 0 in float64, so dividing by max(r, 1e-150) changes no value and
    # keeps 1/r finite for the backward (0 * inf would be NaN at a subnormal alpha_t)
    cancellation_free = torch.where(same, equal, differ) / rs.clamp_min(1e-150)

    rl = torch.where(small, 2.0, r)
    t_i, t_m = rl * p_i, rl * torch.exp(log_p_m)
    l_i, l_m, l_r = torch.log1p(t_i), torch.log1p(t_m), torch.log1p(rl)
    differ = (k + rl) * (1.0 - 1.0 / (1.0 + t_i)) - (k * l_i - s_l) + rl * (l_m - l_i) - (1.0 + rl) * l_r
    equal = (k + rl) * (1.0 / (1.0 + rl) - 1.0 / (1.0 + t_i)) - (k * l_i - s_l) / (1.0 + rl) \
        + (k - 1.0) / (1.0 + rl) * l_r
    log1p_form = torch.where(same, equal, differ) / rl
    return torch.where(small, cancellation_free, log1p_form)


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
