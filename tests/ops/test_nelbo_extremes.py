"""usdm_nelbo as alpha_t -> 0 and -> 1, on every backend, against eq. (3.5) evaluated in 700-digit
arithmetic (mpmath): eq. (3.5) as written subtracts O(1) terms to get an O(alpha_t^2) bracket, so a
float evaluation of it loses every digit as alpha_t -> 0; the ops use a cancellation-free form.

The float64 reference must match to the fp32 rounding of its output. The fp32 kernels (cpu, triton)
may add the rounding of their fp32 per-entry terms: ``4 eps32 |coeff| (K + 2r + 1)(1 + log1p r)``
(the budget of the other NELBO tests), times ``min(1, r)^2`` since the bracket's terms are O(r^2) —
before this form, the error at small alpha_t was that budget without the factor: 1e27 relative at
alpha_t = 1e-30.

The gradient is checked the same way against eq. (3.5) differentiated exactly (chain rule through
``xbar_theta``, in mpmath): its terms are O(1/alpha_t) and sum to O(alpha_t), so (3.6) as written loses
every digit as alpha_t -> 0 (before its cancellation-free form: 4e-2 relative at alpha_t = 1e-6, K = 11)."""

from __future__ import annotations

import functools
import math

import mpmath
import pytest
import torch

import duo_kernels

from tests.devices import device_for

IMPLS = ("reference", "cpu", "triton")
# from the smallest positive float64 (every alpha_t > 0 is accepted) to the largest below 1
ALPHAS = (5e-324, 1e-300, 1e-38, 1e-30, 1e-12, 1e-9, 1e-6, 1e-3, 0.5, 1 - 1e-9, 1 - 2**-53)
TINY32 = 2.0**-149  # the smallest fp32 subnormal: a true loss below it rounds to 0
EPS32 = 2.0**-23


def natural_scale(vocab_size: int, alpha: float, dalpha: float) -> mpmath.mpf:
    """|coeff| (K + 2r + 1) min(1, r)^2: the size of the bracket's (and its gradient's) terms times coeff."""
    with mpmath.workdps(50):
        a, k = mpmath.mpf(alpha), vocab_size
        r = k * a / (1 - a)
        return abs(dalpha) / (1 - a) * min(r, 1) ** 2 / r * (k + 2 * r + 1)  # K a = r (1 - a): no 0/0


def fp32_noise(vocab_size: int, alpha: float, dalpha: float) -> mpmath.mpf:
    """4 eps32 |coeff| (K + 2r + 1)(1 + log1p r) min(1, r)^2, written so that a subnormal alpha is no 0/0."""
    with mpmath.workdps(50):
        a, k = mpmath.mpf(alpha), vocab_size
        r = k * a / (1 - a)
        coeff_r2 = abs(dalpha) / (1 - a) * min(r, 1) ** 2 / r / k  # |coeff| min(1, r)^2 = |alpha'| r min(1, r)^2/(K a r)
        return 4 * EPS32 * coeff_r2 * (k + 2 * r + 1) * (1 + mpmath.log1p(r))


def exact_softmax(logits: tuple[float, ...]) -> list:
    """softmax at mpmath's current precision."""
    top = max(logits)
    e = [mpmath.exp(mpmath.mpf(v) - top) for v in logits]
    return [x / sum(e) for x in e]


@functools.lru_cache(maxsize=None)
def exact_nelbo(logits: tuple[float, ...], i: int, m: int, alpha: float, dalpha: float) -> mpmath.mpf:
    """Eq. (3.5) as written, with enough digits for its cancellation (2 log10(1/alpha) + 40)."""
    with mpmath.workdps(40 + 2 * max(0, int(-math.log10(alpha)))):
        k, p, a, da = len(logits), exact_softmax(logits), mpmath.mpf(alpha), mpmath.mpf(dalpha)
        log_xbar = [mpmath.log(k * a * pj + 1 - a) for pj in p]
        eq = 1 if i == m else 0
        kappa = (1 - a) / (k * a + 1 - a)
        r = k * a / (1 - a)
        term1 = k * (1 / ((1 - a) + k * a * eq) - 1 / (k * a * p[i] + 1 - a))
        term2 = ((eq * kappa + 1 - eq) * (k * log_xbar[i] - sum(log_xbar)) - (1 - eq) * r * (log_xbar[m] - log_xbar[i])
                 + ((k - 1) * kappa * eq - (1 - eq) / kappa) * mpmath.log(kappa))
        return da / (k * a) * (term1 - term2)


def extreme_inputs(vocab_size: int):
    """(2, len(ALPHAS)) tokens, fp32 logits and every alpha of ALPHAS (dalpha = -1); row 0: z_t == x0,
    row 1: z_t != x0."""
    gen = torch.Generator().manual_seed(vocab_size)
    n = len(ALPHAS)
    logits = (3 * torch.randn(2, n, vocab_size, generator=gen)).float()
    x0 = torch.randint(vocab_size, (2, n), generator=gen)
    z_t = x0.clone()
    z_t[1] = (x0[1] + 1) % vocab_size
    alpha = torch.tensor(ALPHAS, dtype=torch.float64).expand(2, n).contiguous()
    dalpha = torch.full((2, n), -1.0, dtype=torch.float64)
    return logits, z_t, x0, alpha, dalpha


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on branches not taken
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab_size", [2, 11, 97])
def test_nelbo_is_accurate_from_the_smallest_alpha_to_one(impl, vocab_size):
    logits, z_t, x0, alpha, dalpha = extreme_inputs(vocab_size)
    device = device_for(impl)
    loss = duo_kernels.usdm_nelbo(logits.to(device), z_t.to(device), x0.to(device), alpha.to(device),
                                  dalpha.to(device), impl=impl).cpu().double()
    for row in range(2):
        for j, a in enumerate(ALPHAS):
            expected = exact_nelbo(tuple(logits[row, j].double().tolist()), int(z_t[row, j]), int(x0[row, j]), a, -1.0)
            error = abs(mpmath.mpf(float(loss[row, j])) - expected)
            budget = 2e-6 * abs(expected) + TINY32 + (0 if impl == "reference" else fp32_noise(vocab_size, a, -1.0))
            assert error <= budget, (impl, vocab_size, row, a, float(loss[row, j]), float(expected), float(budget))


@functools.lru_cache(maxsize=None)
def exact_nelbo_gradient(logits: tuple[float, ...], i: int, m: int, alpha: float, dalpha: float) -> list:
    """d eq. (3.5) / d logits, exactly: d loss/d l_k = K a p_k (gamma_k - sum_j p_j gamma_j), with
    gamma_j = d loss / d xbar_theta_j of eq. (3.5) as written."""
    with mpmath.workdps(40 + 2 * max(0, int(-math.log10(alpha)))):
        k, p, a, da = len(logits), exact_softmax(logits), mpmath.mpf(alpha), mpmath.mpf(dalpha)
        q = [k * a * pj + 1 - a for pj in p]
        ne = 0 if i == m else 1
        r = k * a / (1 - a)
        c2 = ne + (1 - ne) / (1 + r)
        coeff = da / (k * a)
        gamma = [coeff * (c2 / q[j] + (k / q[i] ** 2 - c2 * k / q[i] - ne * r / q[i] if j == i else 0)
                          + (ne * r / q[m] if j == m else 0)) for j in range(k)]
        mean = sum(g * pj for g, pj in zip(gamma, p))
        return [k * a * pj * (g - mean) for g, pj in zip(gamma, p)]


def _logits_gradient(impl: str, logits, z_t, x0, alpha, dalpha) -> torch.Tensor:
    """d sum(loss) / d logits by ``usdm_nelbo``, or by ``linear_usdm_nelbo`` with weight = I (so that the
    logits are the hidden states and d hidden = d logits, exactly)."""
    linear = impl.startswith("linear-")
    impl = impl.removeprefix("linear-")
    device = device_for(impl)
    x = logits.to(device).requires_grad_()
    args = (z_t.to(device), x0.to(device), alpha.to(device), dalpha.to(device))
    if linear:
        eye = torch.eye(logits.shape[-1], device=device)
        loss = duo_kernels.linear_usdm_nelbo(x, eye, None, *args, impl=impl)
    else:
        loss = duo_kernels.usdm_nelbo(x, *args, impl=impl)
    loss.sum().backward()
    return x.grad.cpu().double()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS + ("linear-cpu", "linear-triton"))
@pytest.mark.parametrize("vocab_size", [2, 97])
def test_nelbo_gradient_is_accurate_from_the_smallest_alpha_to_one(impl, vocab_size):
    """Every entry of d loss / d logits within 16 eps32 of the natural scale of its terms (the fp32
    rounding of O(1) softmax terms; a row's dominant entry is a difference of such terms) and of a few
    fp32 subnormals."""
    logits, z_t, x0, alpha, dalpha = extreme_inputs(vocab_size)
    grad = _logits_gradient(impl, logits, z_t, x0, alpha, dalpha)
    for row in range(2):
        for j, a in enumerate(ALPHAS):
            expected = exact_nelbo_gradient(tuple(logits[row, j].double().tolist()), int(z_t[row, j]),
                                            int(x0[row, j]), a, -1.0)
            error = max(abs(mpmath.mpf(g) - e) for g, e in zip(grad[row, j].tolist(), expected))
            budget = 16 * EPS32 * natural_scale(vocab_size, a, -1.0) + (vocab_size + 2) * TINY32
            assert error <= budget, (impl, vocab_size, row, a, float(error), float(budget))
