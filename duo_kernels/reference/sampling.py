"""Samplers of uniform-state diffusion in plain PyTorch (duo-math §3.2, §6): the posterior, the
categorical draw, the ancestral / Psi-sampler step with nucleus filtering, and the Psi-sampler
time profiles and kappa schedules.

The step is computed through the three-component mixture (3.4)/(6.2) — model, uniform, stay — so
that a fused kernel needs one Gumbel-max pass over each logits row and nothing of size (B, L, V) in
float64; this reference materialises the row only to filter and normalise it.
"""

from __future__ import annotations

import math
import re

import torch

from duo_kernels import _validate
from duo_kernels.reference import rng as _rng
from duo_kernels.reference.forward_process import _block_words, _signal_level
from duo_kernels.reference.transform import cosine_schedule, loglinear_schedule
from duo_kernels.rng import resolve_seed


def _check_rows(name: str, t, *, ndim: int | None = None) -> int:
    """A float tensor whose last dim is the vocabulary; returns V."""
    _validate.check_tensor(name, t, dtypes=_validate.FLOAT_DTYPES, ndim=ndim)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
    return _validate.check_vocab_size(t.shape[-1], name=f"{name}.shape[-1]")


def _check_order(alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> None:
    if _validate.values_checked(alpha_s) and bool((alpha_s < alpha_t).any()):
        raise ValueError("alpha_s must be >= alpha_t (s is the earlier, less noisy time)")


def _signal_levels(alpha_t, alpha_s, shape, device):
    alpha_t = _signal_level("alpha_t", alpha_t, shape, device)
    alpha_s = _signal_level("alpha_s", alpha_s, shape, device)
    _check_order(alpha_t, alpha_s)
    return alpha_t, alpha_s


def _posterior_mixture(x_z, alpha_t, alpha_s, vocab_size: int):
    """Weights ``(c_p, c_u, c_z)`` of (3.4): ``q(z_s | z_t, x) = c_p x + c_u Uniform(V) + c_z delta_{z_t}``
    for any x on the simplex, given ``x_z = x[z_t]``; they sum to 1."""
    denom = vocab_size * alpha_t * x_z + 1 - alpha_t
    alpha_ts = alpha_t / alpha_s
    c_p = (alpha_s - alpha_t) / denom
    c_u = (1 - alpha_ts) * (1 - alpha_s) / denom
    c_z = (vocab_size * alpha_t * x_z + alpha_ts - alpha_t) / denom
    return c_p, c_u, c_z


def _psi_mixture(x_z, alpha_t, alpha_s, kappa, vocab_size: int):
    """Weights of the Psi-posterior (6.2) on (x_theta, Uniform(V), delta_{z_t}) (duo-math §6.2):
    ``kappa q(z_s | z_t, x_theta) + (1 - kappa) [alpha_s q(z_0 | z_t, x_theta) + (1 - alpha_s) Uniform]``."""
    post_p, post_u, post_z = _posterior_mixture(x_z, alpha_t, alpha_s, vocab_size)
    den_p, _, den_z = _posterior_mixture(x_z, alpha_t, torch.ones_like(alpha_s), vocab_size)  # (3.3)
    return (kappa * post_p + (1 - kappa) * alpha_s * den_p,
            kappa * post_u + (1 - kappa) * (1 - alpha_s),
            kappa * post_z + (1 - kappa) * alpha_s * den_z)


def usdm_posterior(probs: torch.Tensor, z_t: torch.Tensor, alpha_t, alpha_s) -> torch.Tensor:
    """The USDM posterior ``q(z_s | z_t, x)`` (duo-math §3.2, eq. 3.2; ``alpha_s = 1`` gives 3.3).

    With ``x`` one-hot it is the true posterior; with the model's ``x_theta`` it is the reverse
    kernel ``p_theta(z_s | z_t)``. Evaluated through its mixture form (3.4).

    Args:
        probs: x, (B, L, V) on the simplex (rows summing to 1), any float dtype; V >= 2.
        z_t: (B, L) int64 in [0, V).
        alpha_t: signal level at t, in (0, 1], a number or (B,), (B, 1), (B, L).
        alpha_s: signal level at s, in (0, 1], same shapes; ``alpha_s >= alpha_t``.

    Returns:
        (B, L, V) float64; rows sum to 1.

    Example::

        >>> x = torch.eye(4, dtype=torch.float64)[None, :2]           # x = [0, 1]
        >>> q = usdm_posterior(x, torch.tensor([[0, 3]]), 0.4, 0.7)
        >>> q.shape, torch.allclose(q.sum(-1), torch.ones(1, 2, dtype=torch.float64))
        (torch.Size([1, 2, 4]), True)
    """
    vocab_size = _check_rows("probs", probs, ndim=3)
    _validate.check_ids("z_t", z_t, vocab_size, ndim=2)
    if z_t.shape != probs.shape[:2]:
        raise ValueError(f"z_t must have shape {tuple(probs.shape[:2])}, got {tuple(z_t.shape)}")
    _validate.check_same_device(probs=probs, z_t=z_t)
    _validate.check_range("probs", probs, 0.0, 1.0, lo_open=False, hi_open=False)
    alpha_t, alpha_s = _signal_levels(alpha_t, alpha_s, z_t.shape, z_t.device)

    x = probs.to(torch.float64)
    x_z = x.gather(-1, z_t[..., None]).squeeze(-1)
    c_p, c_u, c_z = _posterior_mixture(x_z, alpha_t, alpha_s, vocab_size)
    q = c_p[..., None] * x + (c_u / vocab_size)[..., None]
    return q.scatter_add_(-1, z_t[..., None], c_z[..., None])


def _gumbel(w0, w1, w2, w3) -> torch.Tensor:
    return -torch.log(-torch.log(_rng.uniform53(w0, w1)))


def _gumbel_argmax(probs: torch.Tensor, seed: int) -> torch.Tensor:
    """``argmax_v log(probs[t, v]) + G[t, v]`` for rows ``t`` of (N, V) probs, float64.

    ``G = -log(-log U)`` with ``U = uniform53(w0, w1)`` of counter ``t * V + v``: 52-bit uniforms, so
    the Gumbel tail is not truncated (§6.1). ``log 0 = -inf``: zero entries never win.
    """
    num, vocab_size = probs.shape
    gumbel = _rng.counter_stream(seed, num * vocab_size, _gumbel, device=probs.device).view(num, vocab_size)
    return (torch.log(probs.to(torch.float64)) + gumbel).argmax(dim=-1)


def sample_categorical(probs: torch.Tensor, *, seed: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of the categorical ``probs`` by Gumbel-max (duo-math §6.1).

    Equivalent to the reference's exponential race ``argmax(q / E)``, without its 1e-10 clamps.

    Args:
        probs: (..., V), any float dtype; entries finite and >= 0, every row with positive mass
            (need not be normalised); V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        ids: ``probs.shape[:-1]`` int64; entries with probability 0 are never drawn.

    Stream: rows ``t`` = all leading dims flattened row-major; entry ``v`` of row ``t`` uses counter
    ``t * V + v``: ``U = uniform53(w0, w1)``, Gumbel ``-log(-log U)`` in float64.

    Example::

        >>> probs = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]])
        >>> sample_categorical(probs, seed=0)[1].item()
        0
    """
    vocab_size = _check_rows("probs", probs)
    if _validate.values_checked(probs) and probs.numel():
        _validate.check_range("probs", probs, 0.0, math.inf, lo_open=False, hi_open=True)
        if bool((probs.sum(dim=-1) <= 0).any()):
            raise ValueError("probs must have positive mass in every row")
    seed = resolve_seed(seed, generator)
    return _gumbel_argmax(probs.reshape(-1, vocab_size), seed).view(probs.shape[:-1])


def _nucleus(x_theta: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering (duo-math §6.3) of probability rows, renormalised.

    Sorted descending (stable), an entry is dropped when the mass strictly before it exceeds
    ``top_p``; the top entry is always kept.
    """
    if top_p == 1.0:
        return x_theta
    sorted_probs, order = torch.sort(x_theta, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1).roll(1, dims=-1)
    mass_before[..., 0] = 0.0
    keep = torch.empty_like(x_theta, dtype=torch.bool).scatter_(-1, order, mass_before <= top_p)
    kept = torch.where(keep, x_theta, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def _check_logits(logits, z_t, check_values: bool = True) -> int:
    """(B, L, V) logits, finite or -inf with a finite entry per row, and (B, L) ids ``z_t`` (or None); returns V.
    ``check_values=False`` leaves the logits' values to the caller (a kernel that reads them anyway)."""
    vocab_size = _check_rows("logits", logits, ndim=3)
    if z_t is not None:
        _validate.check_ids("z_t", z_t, vocab_size, ndim=2)
        if z_t.shape != logits.shape[:2]:
            raise ValueError(f"z_t must have shape {tuple(logits.shape[:2])}, got {tuple(z_t.shape)}")
        _validate.check_same_device(logits=logits, z_t=z_t)
    if check_values and _validate.values_checked(logits) and logits.numel():
        if bool(torch.isnan(logits).any() | (logits == math.inf).any()):
            raise ValueError("logits must be finite or -inf")
        if bool((logits == -math.inf).all(dim=-1).any()):
            raise ValueError("logits must have a finite entry in every row")
    return vocab_size


def _step_args(logits, z_t, alpha_t, alpha_s, kappa, top_p, check_logit_values: bool = True):
    """The validated arguments of :func:`ancestral_step` (shared with the fast ops): V, then
    ``alpha_t, alpha_s, kappa`` broadcast to (B, L) float64, and ``top_p`` as a float."""
    vocab_size = _check_logits(logits, z_t, check_logit_values)
    alpha_t, alpha_s = _signal_levels(alpha_t, alpha_s, z_t.shape, z_t.device)
    kappa = _validate.per_token("kappa", kappa, tuple(z_t.shape), device=z_t.device)
    _validate.check_range("kappa", kappa, 0.0, 1.0, lo_open=False, hi_open=False)
    top_p = _validate.check_positive_number("top_p", top_p)
    if top_p > 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    return vocab_size, alpha_t, alpha_s, kappa, top_p


def _greedy_args(logits, z_t, return_probs) -> int:
    """The validated arguments of :func:`greedy_tail`; returns V."""
    if not isinstance(return_probs, bool):
        raise ValueError(f"return_probs must be a bool, got {return_probs!r}")
    if return_probs and z_t is None:
        raise ValueError("z_t is needed with return_probs=True: the probabilities returned are x_theta[z_t]")
    return _check_logits(logits, z_t)


def ancestral_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_t, alpha_s, *, kappa=1.0, top_p: float = 1.0,
                   seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One reverse step ``z_s ~ Psi^theta_{s|t}(. | z_t)`` (duo-math §6.1-6.4, eq. 6.2).

    ``x_theta = softmax(logits)`` in float64, nucleus-filtered to ``top_p`` (§6.3) and renormalised;
    then a draw from ``kappa q(z_s | z_t, x_theta) + (1 - kappa) [alpha_s q(z_0 | z_t, x_theta) +
    (1 - alpha_s) Uniform]``. ``kappa = 1`` is plain ancestral sampling (3.2), ``alpha_s = 1`` with
    ``kappa = 1`` the noise-removal step (3.3), ``kappa < 1`` a Psi-sampler (predictor-corrector)
    step. The draw goes through the mixture (3.4): weights ``(c_p, c_u, c_z)`` on (x_theta,
    Uniform(V), delta_{z_t}) are ``kappa (3.4 at alpha_s) + (1 - kappa) (alpha_s (3.4 at 1) +
    (1 - alpha_s) (0, 1, 0))``.

    Args:
        logits: (B, L, V), any float dtype; entries finite or -inf, at least one finite per row.
        z_t: current tokens, (B, L) int64 in [0, V).
        alpha_t: signal level at t, in (0, 1], a number or (B,), (B, 1), (B, L).
        alpha_s: signal level at s, in (0, 1], same shapes; ``alpha_s >= alpha_t``.
        kappa: Psi weight in [0, 1], a number or (B,), (B, 1), (B, L); default 1.
        top_p: nucleus mass in (0, 1]; default 1 (no filtering).
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        z_s: (B, L) int64.

    Stream (a fused kernel reproduces it): ``N = B L`` rows, row-major. Row ``t``:

    - counter ``N V + t`` (block V of the per-token layout): ``u = uniform53(w0, w1)`` picks the
      component — x_theta if ``u < c_p``, uniform if ``u < c_p + c_u``, else ``z_t`` — and
      ``randint32_below(w2, V)`` is the uniform id;
    - counters ``t V + v``: the Gumbel-max draw from the filtered x_theta, exactly
      :func:`sample_categorical`'s stream (only needed when the component is x_theta).

    Example::

        >>> logits = torch.randn(2, 3, 37)
        >>> z_t = torch.randint(0, 37, (2, 3))
        >>> z_s = ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=0)
        >>> z_s.shape
        torch.Size([2, 3])
    """
    vocab_size, alpha_t, alpha_s, kappa, top_p = _step_args(logits, z_t, alpha_t, alpha_s, kappa, top_p)
    seed = resolve_seed(seed, generator)

    x_theta = _nucleus(torch.softmax(logits.to(torch.float64), dim=-1), top_p)
    x_z = x_theta.gather(-1, z_t[..., None]).squeeze(-1)
    c_p, c_u, _ = _psi_mixture(x_z, alpha_t, alpha_s, kappa, vocab_size)
    num = z_t.numel()
    w0, w1, w2, _ = _block_words(seed, num, vocab_size, z_t.device)
    u = _rng.uniform53(w0, w1).view_as(alpha_t)
    uniform_id = _rng.randint32_below(w2, vocab_size).view_as(z_t)
    model_id = _gumbel_argmax(x_theta.reshape(num, vocab_size), seed).view_as(z_t)
    return torch.where(u < c_p, model_id, torch.where(u < c_p + c_u, uniform_id, z_t))


def greedy_tail(logits: torch.Tensor, z_t: torch.Tensor | None = None, *, return_probs: bool = False):
    """The Greedy-Tail noise removal (duo-math §6.1): ``argmax_v logits[..., v]``, the first index on ties.

    Args:
        logits: (B, L, V), any float dtype; entries finite or -inf, at least one finite per row.
        z_t: current tokens, (B, L) int64 in [0, V); needed only with ``return_probs``.
        return_probs: also return ``x_theta[z_t] = softmax(logits)[z_t]``.

    Returns:
        ids: (B, L) int64; with ``return_probs`` the pair ``(ids, probs)``, probs (B, L) float32
        (computed in float64).

    Example::

        >>> logits = torch.tensor([[[0.0, 2.0, 2.0], [1.0, 0.0, 0.0]]])
        >>> ids, probs = greedy_tail(logits, torch.tensor([[1, 0]]), return_probs=True)
        >>> ids.tolist(), [round(p, 4) for p in probs[0].tolist()]
        ([[1, 0]], [0.4683, 0.5761])
    """
    _greedy_args(logits, z_t, return_probs)
    ids = logits.argmax(dim=-1)
    if not return_probs:
        return ids
    log_x = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return ids, log_x.gather(-1, z_t[..., None]).squeeze(-1).exp().to(torch.float32)


# ------------------------------------------------------------------------------------------------
# Psi-sampler schedules (duo-math §6.4)

_SCHEDULES = {"loglinear": loglinear_schedule, "cosine": cosine_schedule}
_PROFILE = re.compile(r"linear-constant-linear-(?P<c>[0-9.eE+-]+?)(?P<inv>-inv)?")
_KAPPA_MODE = re.compile(r"(?P<kind>constant-remdm|max-capped|max-rescale|constant)-(?P<eta>[0-9.eE+-]+)")


def _check_schedule(schedule: str):
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}")
    return _SCHEDULES[schedule]


def _time_of_alpha(alpha: float, schedule: str) -> float:
    """The published ``get_t_for_alpha``: the inverse schedule ignoring its eps (§3.1)."""
    if schedule == "loglinear":
        return 1.0 - alpha
    return 1.0 - 2.0 / math.pi * math.acos(1.0 - alpha)


def _parse_number(name: str, spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {spec!r} does not end in a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} {spec!r} must end in a finite number")
    return value


def _segment_sizes(n: int, high_frac, middle_frac) -> tuple[int, int, int]:
    """(n_hi, n_mid, n_low) with Python's round (half to even), as the published code."""
    for name, frac in (("high_frac", high_frac), ("middle_frac", middle_frac)):
        if not _validate.is_number(frac) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {frac!r}")
    n_hi, n_mid = round(float(high_frac) * n), round(float(middle_frac) * n)
    if n_hi + n_mid > n:
        raise ValueError(f"high_frac + middle_frac must be <= 1, got {high_frac} + {middle_frac}")
    return n_hi, n_mid, n - n_hi - n_mid


def sampling_timesteps(profile: str, steps: int, eps: float = 1e-5, *, high_frac: float | None = None,
                       middle_frac: float | None = None, schedule: str = "loglinear") -> torch.Tensor:
    """The sampler's time grid ``ts`` (steps + 1 points, step i goes from ts[i] to ts[i+1]) (duo-math §6.4).

    - ``"linear"``: ``linspace(1, eps, steps + 1)``.
    - ``"linear-constant-linear-<c>"`` / ``"linear-constant-linear-<c>-inv"``: with ``n = steps + 1``,
      ``n_hi = round(high_frac n)``, ``n_mid = round(middle_frac n)`` (Python's round, half to even):
      ``linspace(1, c, n_hi) ++ [c] * n_mid ++ linspace(c, eps, n - n_hi - n_mid)``. With ``-inv``,
      c is a signal level converted to a time by the schedule's inverse ignoring its eps, as the
      published code (log-linear: ``1 - c``; cosine: ``1 - (2/pi) acos(1 - c)``). In the constant
      segment s = t: pure corrector steps.

    Args:
        profile: the profile string above.
        steps: number of sampler steps, an int >= 1.
        eps: the last time, in (0, 1); default 1e-5.
        high_frac, middle_frac: segment fractions, needed by linear-constant-linear.
        schedule: ``"loglinear"`` (default) or ``"cosine"``, for ``-inv``.

    Returns:
        ts: (steps + 1,) float64 (the published code builds it in float32).

    Example::

        >>> ts = sampling_timesteps("linear-constant-linear-0.9-inv", 256, high_frac=0.45, middle_frac=0.5)
        >>> ts.shape, round(float(ts[116]), 12)
        (torch.Size([257]), 0.1)
    """
    if not _validate.is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not _validate.is_number(eps) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    steps, eps = int(steps), float(eps)
    _check_schedule(schedule)
    n = steps + 1
    if profile == "linear":
        return torch.linspace(1.0, eps, n, dtype=torch.float64)
    match = _PROFILE.fullmatch(profile) if isinstance(profile, str) else None
    if match is None:
        raise ValueError(f"profile must be 'linear' or 'linear-constant-linear-<c>[-inv]', got {profile!r}")
    c = _parse_number("profile", profile, match["c"])
    if match["inv"]:
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"profile's signal level c must lie in [0, 1], got {c}")
        c = _time_of_alpha(c, schedule)
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"profile's time c must lie in [0, 1], got {c}")
    n_hi, n_mid, n_low = _segment_sizes(n, high_frac, middle_frac)
    return torch.cat([torch.linspace(1.0, c, n_hi, dtype=torch.float64),
                      torch.full((n_mid,), c, dtype=torch.float64),
                      torch.linspace(c, eps, n_low, dtype=torch.float64)])


def _segment_kappas(mode: str, ts: torch.Tensor, schedule: str, noise_eps: float) -> torch.Tensor:
    """kappa for every point of one segment of the time grid (the published ``_mode_to_psi_kappas``)."""
    n = ts.numel()
    if mode == "pure-posterior":
        return torch.ones(n, dtype=torch.float64)
    if mode == "pure-pc":
        return torch.zeros(n, dtype=torch.float64)
    match = _KAPPA_MODE.fullmatch(mode) if isinstance(mode, str) else None
    if match is None:
        raise ValueError("mode must be pure-posterior, pure-pc, constant-<eta>, max-capped-<eta>, "
                         f"max-rescale-<eta> or constant-remdm-<eta>; got {mode!r}")
    eta = _parse_number("mode", mode, match["eta"])
    if match["kind"] == "constant":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"mode constant-<eta> needs eta in [0, 1], got {mode!r}")
        return torch.full((n,), eta, dtype=torch.float64)
    if n == 0:
        return torch.ones(0, dtype=torch.float64)
    # ReMDM-style: sigma per consecutive pair (t, s) of the segment; kappa = 1 - sigma / (1 - alpha_s)
    # (from sigma = (1 - kappa)(1 - alpha_s)); the segment's last point gets kappa = 1.
    alpha, _ = _SCHEDULES[schedule](ts, noise_eps)
    alpha_t, alpha_s = alpha[:-1], alpha[1:]
    capped = torch.clamp((1 - alpha_s) / alpha_t, max=eta)
    if match["kind"] == "constant-remdm":
        sigma = torch.full_like(alpha_t, eta)
    elif match["kind"] == "max-capped":
        sigma = torch.where(alpha_t > 0, capped, eta)
    else:
        # max-rescale as coded: capped at eta, then scaled by eta again (ReMDM caps at 1) (§6.4, §11.7).
        sigma = torch.where(alpha_t > 0, capped * eta, eta)
    kappas = torch.clamp(1 - sigma / (1 - alpha_s), 0.0, 1.0)
    return torch.cat([kappas, torch.ones(1, dtype=torch.float64)])


def psi_kappas(mode, timesteps: torch.Tensor, schedule: str = "loglinear", *, high_frac: float | None = None,
               middle_frac: float | None = None, noise_eps: float = 1e-3) -> torch.Tensor:
    """The Psi-sampler's kappa for every point of the time grid; step i uses ``kappa[i]`` (duo-math §6.4).

    Modes: ``pure-posterior`` (kappa = 1), ``pure-pc`` (0), ``constant-<eta>`` (eta), and the
    ReMDM-style ``max-capped-<eta>`` (sigma = min(eta, (1 - alpha_s)/alpha_t)), ``max-rescale-<eta>``
    (sigma = eta min(eta, (1 - alpha_s)/alpha_t): the published form, which caps at eta where ReMDM
    caps at 1, §11.7) and ``constant-remdm-<eta>`` (sigma = eta). A ReMDM-style mode takes sigma of
    each consecutive pair ``(t, s) = (ts[j], ts[j+1])`` inside its segment, with alpha from the
    schedule, sets ``kappa = clip(1 - sigma / (1 - alpha_s), 0, 1)``, and gives the segment's last
    point kappa = 1.

    Args:
        mode: one mode string for the whole grid, or a (high, middle, low) triple of modes for the
            segments of sizes ``round(high_frac n)``, ``round(middle_frac n)`` and the rest — the
            published configuration (it always splits, so a single mode there equals the triple
            ``(mode, mode, mode)`` with its fractions).
        timesteps: (n,) the grid of :func:`sampling_timesteps`, any float dtype, values in [0, 1].
        schedule: ``"loglinear"`` (default) or ``"cosine"``, evaluated with ``noise_eps``.
        high_frac, middle_frac: fractions, needed with a triple.
        noise_eps: the schedule's eps (default 1e-3, the reference's).

    Returns:
        kappa: (n,) float64 in [0, 1].

    The published code returns no kappa at all for a one-point ReMDM-style segment (and then fails
    its length assertion); here such a segment gets kappa = 1, its "last point".

    Example::

        >>> ts = sampling_timesteps("linear-constant-linear-0.9-inv", 256, high_frac=0.45, middle_frac=0.5)
        >>> kappa = psi_kappas(("pure-posterior", "constant-remdm-0.01", "pure-posterior"), ts,
        ...                    high_frac=0.45, middle_frac=0.5)
        >>> round(float(kappa[116]), 6)  # 1 - 0.01 / (1 - 0.9001)
        0.8999
    """
    _check_schedule(schedule)
    if not _validate.is_number(noise_eps) or not 0.0 <= noise_eps < 1.0:
        raise ValueError(f"noise_eps must be a number in [0, 1), got {noise_eps!r}")
    noise_eps = float(noise_eps)
    _validate.check_tensor("timesteps", timesteps, dtypes=_validate.FLOAT_DTYPES, ndim=1)
    ts = timesteps.to(torch.float64)
    _validate.check_range("timesteps", ts, 0.0, 1.0, lo_open=False, hi_open=False)
    if isinstance(mode, str):
        return _segment_kappas(mode, ts, schedule, noise_eps)
    if not (isinstance(mode, (tuple, list)) and len(mode) == 3):
        raise ValueError(f"mode must be a mode string or a (high, middle, low) triple, got {mode!r}")
    n_hi, n_mid, _ = _segment_sizes(ts.numel(), high_frac, middle_frac)
    segments = (ts[:n_hi], ts[n_hi:n_hi + n_mid], ts[n_hi + n_mid:])
    return torch.cat([_segment_kappas(m, seg, schedule, noise_eps) for m, seg in zip(mode, segments)])
