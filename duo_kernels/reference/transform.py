"""The Diffusion Transformation operator T and the noise schedules (duo-math §1.1, §2, §3.1).

A token ``x`` of a vocabulary of size K is diffused through a Gaussian latent
``w_t = a~_t e_x + s~_t eps`` (eq. 1.1) with ``a~^2 = sigmoid(-gamma)``, ``s~^2 = sigmoid(gamma)`` (eq. 1.2);
its argmax ``z_t`` follows the uniform-state marginal ``Cat(alpha_t e_x + (1 - alpha_t)/K)`` with
``alpha_t = T(gamma_t)`` (eqs. 1.5, 1.6). Here T and its derivative are evaluated exactly in float64:

    mu = a~/s~ = exp(-gamma/2),   p(mu) = P(z_t = x),   alpha = (K p(mu) - 1)/(K - 1)
    dalpha/dgamma = K/(K - 1) * dp/dmu * (-mu/2)                                        (eq. 2.2)

The integral (2.1) is taken over the law of M, the maximum of the K - 1 other coordinates
(``z_t = x`` iff ``n + mu > M`` with ``n ~ N(0, 1)``, §1.2). With ``f_M(m) = (K-1) phi(m) Phi(m)^(K-2)``:

    p(mu)  = Int f_M(m) Phi(mu - m) dm
    dp/dmu = Int f_M(m) phi(mu - m) dm          (>= 0: the density of M - n at mu)

which is (2.1), and its derivative, after one integration by parts in u (``Phi(u)^(K-1)`` is the CDF
of M); the nodes and weights depend on K only, so they are computed once per vocabulary size. The
discrete-phase schedules of §3.1 (log-linear, cosine) complete the module; :func:`gamma_window`
inverts T to give the gamma window of a chosen alpha range for any vocabulary.
"""

from __future__ import annotations

import functools
import math

import torch

from duo_kernels import _validate

MAX_VOCAB_SIZE = 10**6

# Beyond mu = 60 (gamma < -8.19) P(M - n > mu) and its density, ~K exp(-mu^2/4), underflow to 0 in
# float64 for every K <= 10^6: alpha is exactly 1 and dalpha/dgamma exactly 0. Clamping mu there keeps
# exp(-gamma/2) finite for very negative gamma (0 * inf would be NaN) and the special functions off
# their huge-argument paths.
_MU_SATURATED = 60.0


def _as_float_tensor(name: str, value) -> torch.Tensor:
    """A floating-point tensor: float tensors as they are, integer tensors and numbers as float64."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real tensor or a number, got dtype {value.dtype}")
        return value if value.is_floating_point() else value.to(torch.float64)
    if not _validate.is_number(value):
        raise ValueError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)


def _check_finite(name: str, t: torch.Tensor) -> None:
    _validate.check_range(name, t, -math.inf, math.inf, lo_open=True, hi_open=True)


def _check_number(name: str, value) -> float:
    if not _validate.is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_eps(eps) -> float:
    eps = _check_number("eps", eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    return eps


def gaussian_params(gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise std of the Gaussian latent (duo-math §1.1, eq. 1.2).

    ``alpha_tilde = sqrt(sigmoid(-gamma))``, ``sigma_tilde = sqrt(sigmoid(gamma))``, so that
    ``alpha_tilde^2 + sigma_tilde^2 = 1`` and ``alpha_tilde / sigma_tilde = exp(-gamma/2)``.

    Args:
        gamma: tensor of any shape and floating dtype, or a number (then float64, shape ()).

    Returns:
        ``(alpha_tilde, sigma_tilde)``, each of gamma's shape, dtype and device.

    Example:
        >>> a, s = gaussian_params(-2.7)
        >>> round(float(a), 6), round(float(s), 6)
        (0.968001, 0.250945)
    """
    gamma = _as_float_tensor("gamma", gamma)
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


@functools.lru_cache(maxsize=16)
def _max_of_normals_rule(vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoid nodes ``m`` and weights ``w`` (float64, (n,)) for the law of the maximum M of
    ``vocab_size - 1`` standard normals: ``E[g(M)] ~= sum(w * g(m))``.

    The trapezoid rule on the real line converges geometrically for a smooth, fast-decaying density.
    f_M is narrowest at large K, where its width is ~1/sqrt(2 ln K); the step resolves it with ~3 nodes
    per width (max error 6e-16 in alpha against a 0.004-step rule over gamma in [-12, 8], K in [2, 10^6];
    a step 1/3 longer gives 1e-12 at K = 10^6), and nodes whose density is below e^-40 are dropped:
    69 nodes at K = 2, 106 at K = 50258, 112 at K = 10^6.
    """
    k = vocab_size
    step = 0.3 / math.sqrt(2.0 * math.log(k))
    m = torch.arange(-13.0, 14.0, step, dtype=torch.float64)
    log_density = (math.log(k - 1) - 0.5 * math.log(2.0 * math.pi) - 0.5 * m * m
                   + (k - 2) * torch.special.log_ndtr(m))
    keep = log_density > -40.0
    m, weight = m[keep], torch.exp(log_density[keep])
    # Normalised so that p(mu -> inf) = sum(w) is 1 to rounding, not to the rule's (tiny) error.
    return m.to(device), (weight / weight.sum()).to(device)


def diffusion_transform(gamma, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Diffusion Transformation operator ``alpha = T(gamma)`` and its exact derivative (duo-math §2).

    ``alpha = (K p(mu) - 1)/(K - 1)`` with ``p(mu) = Int phi(u - mu) Phi(u)^(K-1) du`` and
    ``mu = exp(-gamma/2)`` (eqs. 2.1, 1.6); ``dalpha/dgamma = K/(K-1) dp/dmu (-mu/2)`` (eq. 2.2), computed
    by quadrature, not by finite differences. Accurate to ~1e-15 absolute for every finite gamma;
    ``alpha -> 0`` as ``gamma -> +inf`` (p(0) = 1/K) and ``alpha = 1`` exactly for ``gamma < -8.19``.
    No host synchronization for device tensors (the quadrature nodes are cached per vocab_size and device).

    Args:
        gamma: tensor of any shape (any real dtype) or a number; finite.
        vocab_size: K, an int in [2, 10^6].

    Returns:
        ``(alpha, dalpha_dgamma)``: float64 tensors of gamma's shape and device; alpha in [0, 1],
        dalpha_dgamma <= 0.

    Example:
        >>> alpha, dalpha = diffusion_transform(torch.tensor([-3.55, -1.85], dtype=torch.float64), 50258)
        >>> [round(a, 8) for a in alpha.tolist()]
        [0.94547366, 0.04931718]
        >>> round(float(dalpha[1]) * 1.7, 8)  # per unit t for the OWT window of width 1.7
        -0.21235768
    """
    vocab_size = _validate.check_vocab_size(vocab_size)
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [2, {MAX_VOCAB_SIZE}], got {vocab_size}")
    gamma = _as_float_tensor("gamma", gamma)
    _check_finite("gamma", gamma)
    m, w = _max_of_normals_rule(vocab_size, gamma.device)

    mu = torch.exp(-0.5 * gamma.to(torch.float64)).clamp(max=_MU_SATURATED)
    # [..., n]: mu - m for every quadrature node.
    d = mu[..., None] - m
    # 1 - p = E[Phi(M - mu)], a sum of non-negative terms that are exactly 0 once mu saturates, so alpha
    # is exactly 1 there. Phi via erf, not erfc or ndtr: absolute precision suffices, and erf is 2x
    # faster than erfc on CPU (0.46 vs 1.07 ms for 512 x 115 float64 values, one thread).
    one_minus_p = (0.5 - 0.5 * torch.erf(d * math.sqrt(0.5))) @ w
    dp_dmu = torch.exp(-0.5 * d * d) @ w * (1.0 / math.sqrt(2.0 * math.pi))
    k = float(vocab_size)
    # Rounding may put alpha a few ulp below 0 where p ~ 1/K.
    alpha = (1.0 - k / (k - 1.0) * one_minus_p).clamp(min=0.0)
    dalpha_dgamma = k / (k - 1.0) * dp_dmu * (-0.5 * mu)
    return alpha, dalpha_dgamma


def diffusion_transform_t(t, gamma_min: float, gamma_max: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T on the training time axis: ``gamma_t = gamma_min + t (gamma_max - gamma_min)`` (eq. 1.3).

    ``dalpha/dt = dalpha/dgamma * (gamma_max - gamma_min)`` (eq. 2.2). The Duo OWT run uses
    ``gamma_min = -3.55, gamma_max = -1.85``; DCD uses ``-4, -1`` (§1.1, §5.2).

    Args:
        t: tensor of any shape (any real dtype) or a number; finite (usually in [0, 1]).
        gamma_min, gamma_max: finite numbers with ``gamma_min < gamma_max``.
        vocab_size: K, an int in [2, 10^6].

    Returns:
        ``(alpha, dalpha_dt)``: float64 tensors of t's shape and device.

    Example:
        >>> alpha, dalpha_dt = diffusion_transform_t(torch.tensor([0.0, 0.5]), -3.55, -1.85, 50258)
        >>> [round(a, 8) for a in alpha.tolist()], round(float(dalpha_dt[1]), 8)
        ([0.94547366, 0.36012446], -1.18452969)
    """
    gamma_min = _check_number("gamma_min", gamma_min)
    gamma_max = _check_number("gamma_max", gamma_max)
    if not gamma_min < gamma_max:
        raise ValueError(f"gamma_min must be < gamma_max, got gamma_min={gamma_min}, gamma_max={gamma_max}")
    t = _as_float_tensor("t", t)
    _check_finite("t", t)
    gamma = gamma_min + t.to(torch.float64) * (gamma_max - gamma_min)
    alpha, dalpha_dgamma = diffusion_transform(gamma, vocab_size)
    return alpha, dalpha_dgamma * (gamma_max - gamma_min)


def gamma_window(vocab_size: int, alpha_max: float = 0.95, alpha_min: float = 0.05) -> tuple[float, float]:
    """The gamma window whose alpha runs from ``alpha_max`` (t = 0) to ``alpha_min`` (t = 1) for vocabulary
    size K: ``T(gamma_min) = alpha_max`` and ``T(gamma_max) = alpha_min``, through the exact transform.

    The same gamma window means different noise for different K (T depends on K): the Duo OWT window
    [-3.55, -1.85] spans alpha 0.945 -> 0.049 at K = 50258, but 0.998 -> 0.39 at K = 259, where the
    curriculum would never see high noise. Choosing the window by its alpha range gives every vocabulary
    the same span of noise. T decreases strictly in gamma, so each end is found by bisection in float64
    (to a bracket of a few ulp; alpha then matches to ~1e-15).

    Args:
        vocab_size: K, an int in [2, 10^6].
        alpha_max, alpha_min: numbers with ``0 < alpha_min < alpha_max < 1``; defaults 0.95 and 0.05,
            about the OWT window's range.

    Returns:
        ``(gamma_min, gamma_max)``: Python floats, ``gamma_min < gamma_max``.

    Example:
        >>> [round(g, 4) for g in gamma_window(50258, 0.94547366, 0.04931718)]  # the OWT window back
        [-3.55, -1.85]
        >>> [round(g, 4) for g in gamma_window(259)]
        [-3.0555, -0.2088]
    """
    vocab_size = _validate.check_vocab_size(vocab_size)
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [2, {MAX_VOCAB_SIZE}], got {vocab_size}")
    alpha_max = _check_number("alpha_max", alpha_max)
    alpha_min = _check_number("alpha_min", alpha_min)
    if not 0.0 < alpha_min < alpha_max < 1.0:
        raise ValueError(f"need 0 < alpha_min < alpha_max < 1, got alpha_min={alpha_min}, alpha_max={alpha_max}")
    target = torch.tensor([alpha_max, alpha_min], dtype=torch.float64)
    # T = 1 exactly below gamma = -8.19 (see _MU_SATURATED), so the low end brackets every alpha < 1.
    lo = torch.full((2,), -2.0 * math.log(_MU_SATURATED) - 1.0, dtype=torch.float64)
    hi = torch.full((2,), 1.0, dtype=torch.float64)
    while float(diffusion_transform(hi[1], vocab_size)[0]) >= alpha_min:
        hi = hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if bool(((mid == lo) | (mid == hi)).all()):
            break
        above = diffusion_transform(mid, vocab_size)[0] > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    gammas = 0.5 * (lo + hi)
    return float(gammas[0]), float(gammas[1])


def _schedule_time(t) -> torch.Tensor:
    t = _as_float_tensor("t", t)
    _validate.check_range("t", t, 0.0, 1.0, lo_open=False, hi_open=False)
    return t


def loglinear_schedule(t, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-linear schedule of the discrete phase and of sampling (duo-math §3.1, the text default).

    ``alpha_t = 1 - (1 - eps) t``, ``dalpha_t/dt = -(1 - eps)``, so alpha runs from 1 at t = 0 to eps at t = 1.

    Args:
        t: tensor of any shape (any real dtype; integers become float64) or a number (float64), in [0, 1].
        eps: in [0, 1); default 1e-3.

    Returns:
        ``(alpha_t, dalpha_t)``, each of t's shape, dtype and device.

    Example:
        >>> alpha, dalpha = loglinear_schedule(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
        >>> [round(a, 12) for a in alpha.tolist()], dalpha.tolist()
        ([1.0, 0.5005, 0.001], [-0.999, -0.999, -0.999])
    """
    eps = _check_eps(eps)
    t = _schedule_time(t)
    alpha_t = 1.0 - (1.0 - eps) * t
    return alpha_t, torch.full_like(t, -(1.0 - eps))


def cosine_schedule(t, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine schedule (duo-math §3.1, used for CIFAR-10).

    With ``t' = (1 - eps) t`` and ``g = pi/2 (1 - t')``: ``alpha_t = 1 - cos(g)`` and the exact derivative
    ``dalpha_t/dt = -(pi/2) (1 - eps) sin(g)``. The published code omits the chain-rule factor
    ``(1 - eps)``; this function keeps it. alpha is evaluated as ``2 sin^2(g/2)``, which equals
    ``1 - cos(g)`` without its cancellation as alpha -> 0 (near t = 1: ~1e-10 relative error in float64,
    ~1.5% in float32 otherwise); at t = 0 it gives 1 - 2^-52 rather than 1.

    Args:
        t: tensor of any shape (any real dtype; integers become float64) or a number (float64), in [0, 1].
        eps: in [0, 1); default 1e-3.

    Returns:
        ``(alpha_t, dalpha_t)``, each of t's shape, dtype and device.

    Example:
        >>> alpha, dalpha = cosine_schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
        >>> [f"{a:.6e}" for a in alpha.tolist()], [round(d, 6) for d in dalpha.tolist()]
        (['1.000000e+00', '1.233700e-06'], [-1.569226, -0.002465])
    """
    eps = _check_eps(eps)
    t = _schedule_time(t)
    g = 0.5 * math.pi * (1.0 - (1.0 - eps) * t)
    alpha_t = 2.0 * torch.sin(0.5 * g) ** 2
    dalpha_t = -0.5 * math.pi * (1.0 - eps) * torch.sin(g)
    return alpha_t, dalpha_t
