import math
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_kernels.reference.transform import (
    cosine_schedule,
    diffusion_transform,
    diffusion_transform_t,
    gaussian_params,
    loglinear_schedule,
)

VOCAB_SIZES = [2, 37, 1000, 50258, 10**6]
OWT_WINDOW = (-3.55, -1.85)

# duo-math Appendix A.2 (K = 50258, OWT window): t, gamma, a~, s~, alpha_t, d alpha/dt, sigma = -log alpha.
APPENDIX_A2 = [
    (0.00, -3.5500, 0.985940, 0.167100, 0.94547366, -0.52790242, 0.056069),
    (0.10, -3.3800, 0.983399, 0.181456, 0.87358139, -0.91412878, 0.135154),
    (0.25, -3.1250, 0.978730, 0.205153, 0.69901861, -1.35650789, 0.358078),
    (0.50, -2.7000, 0.968001, 0.250945, 0.36012446, -1.18452969, 1.021306),
    (0.75, -2.2750, 0.952253, 0.305311, 0.14177919, -0.57655929, 1.953484),
    (0.90, -2.0200, 0.939617, 0.342227, 0.07573838, -0.32293004, 2.580470),
    (1.00, -1.8500, 0.929584, 0.368609, 0.04931718, -0.21235768, 3.009483),
]


def column(i: int) -> torch.Tensor:
    return torch.tensor([row[i] for row in APPENDIX_A2], dtype=torch.float64)


def trapezoid_transform(gamma: torch.Tensor, vocab_size: int, step: float = 0.004):
    """An independent evaluation of (2.1)-(2.2) in the form duo-math writes them: a 0.004-step trapezoid
    rule in u of phi(u - mu) Phi(u)^(K-1) and (u - mu) phi(u - mu) Phi(u)^(K-1), on a window that covers
    both peaks (u ~ sqrt(2 ln K) and u ~ mu)."""
    mu = torch.exp(-gamma / 2)[:, None]
    u = torch.arange(-12.0, float(mu.max()) + 14.0, step, dtype=torch.float64)
    log_integrand = (-0.5 * (u - mu) ** 2 - 0.5 * math.log(2 * math.pi)
                     + (vocab_size - 1) * torch.special.log_ndtr(u))
    integrand = torch.exp(log_integrand)
    p = integrand.sum(-1) * step
    dp_dmu = ((u - mu) * integrand).sum(-1) * step
    k = vocab_size
    return (k * p - 1) / (k - 1), k / (k - 1) * dp_dmu * (-mu[:, 0] / 2)


def test_appendix_a2():
    """alpha_t and d alpha/dt to the table's 8 decimals (largest difference seen: 5.0e-9, its rounding)."""
    alpha, dalpha_dt = diffusion_transform_t(column(0), *OWT_WINDOW, 50258)
    torch.testing.assert_close(alpha, column(4), rtol=0, atol=1e-8)
    torch.testing.assert_close(dalpha_dt, column(5), rtol=0, atol=1e-8)
    torch.testing.assert_close(-torch.log(alpha), column(6), rtol=0, atol=1e-6)
    alpha_tilde, sigma_tilde = gaussian_params(column(1))
    torch.testing.assert_close(alpha_tilde, column(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(sigma_tilde, column(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_against_fine_trapezoid_rule(vocab_size):
    gamma = torch.linspace(-12.0, 8.0, 41, dtype=torch.float64)
    alpha, dalpha_dgamma = diffusion_transform(gamma, vocab_size)
    expected_alpha, expected_dalpha = trapezoid_transform(gamma, vocab_size)
    torch.testing.assert_close(alpha, expected_alpha, rtol=0, atol=1e-10)
    torch.testing.assert_close(dalpha_dgamma, expected_dalpha, rtol=0, atol=1e-10)


def test_against_scipy_quad():
    integrate = pytest.importorskip("scipy.integrate")
    special = pytest.importorskip("scipy.special")
    for vocab_size in (37, 50258):
        for gamma in (-6.0, -3.0, -1.0, 3.0):
            mu = math.exp(-gamma / 2)

            def p_integrand(u, mu=mu):
                return math.exp(-0.5 * (u - mu) ** 2 + (vocab_size - 1) * special.log_ndtr(u)) / math.sqrt(2 * math.pi)

            window = dict(a=-12.0, b=mu + 14.0, points=[mu, math.sqrt(2 * math.log(vocab_size))],
                          epsabs=1e-14, epsrel=1e-13, limit=200)
            p = integrate.quad(p_integrand, **window)[0]
            dp_dmu = integrate.quad(lambda u: (u - mu) * p_integrand(u), **window)[0]
            k = vocab_size
            alpha, dalpha_dgamma = diffusion_transform(gamma, vocab_size)
            assert float(alpha) == pytest.approx((k * p - 1) / (k - 1), abs=1e-10)
            assert float(dalpha_dgamma) == pytest.approx(k / (k - 1) * dp_dmu * (-mu / 2), abs=1e-10)


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_derivative_matches_central_difference(vocab_size):
    gamma = torch.linspace(-12.0, 8.0, 81, dtype=torch.float64)
    h = 1e-5
    _, dalpha_dgamma = diffusion_transform(gamma, vocab_size)
    alpha_above, _ = diffusion_transform(gamma + h, vocab_size)
    alpha_below, _ = diffusion_transform(gamma - h, vocab_size)
    finite_difference = (alpha_above - alpha_below) / (2 * h)
    torch.testing.assert_close(dalpha_dgamma, finite_difference, rtol=0, atol=1e-8)


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_alpha_to_zero_as_gamma_grows(vocab_size):
    """p(0) = 1/K, so alpha -> 0; near there alpha ~ -2 dalpha/dgamma (alpha is linear in mu, with a
    slope below 1)."""
    alpha, dalpha_dgamma = diffusion_transform(torch.tensor([40.0, 200.0, 1e6], dtype=torch.float64), vocab_size)
    assert 0.0 <= float(alpha[0]) < math.exp(-40.0 / 2)
    assert float(alpha[0]) == pytest.approx(-2 * float(dalpha_dgamma[0]), rel=1e-3, abs=1e-15)
    assert torch.all(alpha[1:] <= 1e-15) and torch.all(alpha[1:] >= 0)
    assert torch.all(dalpha_dgamma <= 0) and torch.all(dalpha_dgamma > -1e-9)


def test_first_moment_of_series_coefficients():
    """dalpha/dmu at mu = 0 is K/(K-1) m_1, with m_1 = 8.41981e-5 for K = 50258 (duo-math §2.3)."""
    k, gamma = 50258, 40.0
    _, dalpha_dgamma = diffusion_transform(gamma, k)
    dalpha_dmu = float(dalpha_dgamma) / (-math.exp(-gamma / 2) / 2)
    assert dalpha_dmu == pytest.approx(k / (k - 1) * 8.41981e-5, rel=1e-5)


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_alpha_to_one_as_gamma_falls(vocab_size):
    """alpha = 1 and dalpha/dgamma = 0 exactly once they saturate in float64; no NaN for any finite gamma."""
    gamma = torch.tensor([-12.0, -100.0, -1e4, -1e300], dtype=torch.float64)
    alpha, dalpha_dgamma = diffusion_transform(gamma, vocab_size)
    assert torch.equal(alpha, torch.ones_like(alpha))
    assert torch.equal(dalpha_dgamma, torch.zeros_like(dalpha_dgamma))
    alpha, _ = diffusion_transform(-4.0, vocab_size)
    assert 0.99 < float(alpha) < 1


@given(vocab_size=st.integers(2, 10**6), gamma=st.floats(-12.0, 8.0), gap=st.floats(1e-3, 5.0))
def test_alpha_decreases_with_gamma(vocab_size, gamma, gap):
    alpha, dalpha_dgamma = diffusion_transform(torch.tensor([gamma, gamma + gap], dtype=torch.float64), vocab_size)
    assert torch.all((alpha >= 0) & (alpha <= 1))
    assert float(alpha[0]) >= float(alpha[1]) - 1e-15
    assert torch.all(dalpha_dgamma <= 0)


def test_shapes_dtypes_and_numbers():
    alpha, dalpha = diffusion_transform(torch.full((2, 3), -2.0, dtype=torch.float32), 1000)
    assert alpha.shape == dalpha.shape == (2, 3) and alpha.dtype == dalpha.dtype == torch.float64
    alpha, dalpha = diffusion_transform(-2, 1000)
    assert alpha.shape == () and alpha.dtype == torch.float64
    assert float(alpha) == float(diffusion_transform(torch.tensor(-2.0, dtype=torch.float64), 1000)[0])


def test_transform_t_is_transform_of_linear_gamma():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    alpha, dalpha_dt = diffusion_transform_t(t, -4.0, -1.0, 50258)
    alpha_g, dalpha_dgamma = diffusion_transform(-4.0 + 3.0 * t, 50258)
    torch.testing.assert_close(alpha, alpha_g, rtol=0, atol=0)
    torch.testing.assert_close(dalpha_dt, 3.0 * dalpha_dgamma, rtol=1e-15, atol=0)
    # DCD window (duo-math §1.1): alpha from 0.9987 at t = 0 to 0.0062 at t = 1.
    assert float(alpha[0]) == pytest.approx(0.9987, abs=5e-5) and float(alpha[2]) == pytest.approx(0.0062, abs=5e-5)


def test_speed_of_512_values():
    """Measured ~0.7 ms on one thread; the bound is loose against CI noise. One thread, because on a busy
    2-core machine two OpenMP threads wait on each other (seen: 100x slower)."""
    gamma = torch.linspace(-12.0, 8.0, 512, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        diffusion_transform(gamma, 50258)
        best = math.inf
        for _ in range(20):
            start = time.perf_counter()
            diffusion_transform(gamma, 50258)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 20e-3


@pytest.mark.parametrize("vocab_size", [1, 10**6 + 1, 2.0, True, "50258"])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        diffusion_transform(-2.0, vocab_size)


@pytest.mark.parametrize("gamma", [math.nan, math.inf, torch.tensor([0.0, -math.inf]), "1", torch.tensor([True])])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        diffusion_transform(gamma, 1000)


def test_bad_window_and_t():
    with pytest.raises(ValueError, match="gamma_min"):
        diffusion_transform_t(0.5, -1.0, -1.0, 1000)
    with pytest.raises(ValueError, match="gamma_max"):
        diffusion_transform_t(0.5, -1.0, math.inf, 1000)
    with pytest.raises(ValueError, match="t must be finite"):
        diffusion_transform_t(torch.tensor([0.5, math.nan]), -3.0, -1.0, 1000)


def test_gaussian_params():
    gamma = torch.linspace(-30.0, 30.0, 61, dtype=torch.float64)
    alpha_tilde, sigma_tilde = gaussian_params(gamma)
    torch.testing.assert_close(alpha_tilde**2 + sigma_tilde**2, torch.ones_like(gamma), rtol=0, atol=1e-15)
    torch.testing.assert_close(alpha_tilde / sigma_tilde, torch.exp(-gamma / 2), rtol=1e-14, atol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert gaussian_params(torch.zeros(3, dtype=dtype))[0].dtype == dtype
    alpha_tilde, sigma_tilde = gaussian_params(0.0)
    assert alpha_tilde.dtype == torch.float64 and float(alpha_tilde) == float(sigma_tilde) == math.sqrt(0.5)


def test_loglinear_schedule():
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    alpha, dalpha = loglinear_schedule(t)
    torch.testing.assert_close(alpha, 1 - 0.999 * t, rtol=0, atol=0)
    torch.testing.assert_close(dalpha, torch.full_like(t, -0.999), rtol=0, atol=0)
    alpha, dalpha = loglinear_schedule(torch.tensor([0.25], dtype=torch.bfloat16), eps=0.0)
    assert alpha.dtype == dalpha.dtype == torch.bfloat16 and float(alpha) == 0.75
    alpha, _ = loglinear_schedule(1)
    assert alpha.dtype == torch.float64 and float(alpha) == pytest.approx(1e-3, abs=1e-15)


def test_cosine_schedule():
    eps = 1e-3
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    alpha, dalpha = cosine_schedule(t, eps)
    torch.testing.assert_close(alpha, 1 - torch.cos(math.pi / 2 * (1 - (1 - eps) * t)), rtol=0, atol=1e-15)
    assert float(alpha[0]) == pytest.approx(1.0, abs=3e-16) and torch.all(alpha <= 1)
    # The exact derivative, (1 - eps) factor included.
    h = 1e-6
    inner = t[1:-1]
    finite_difference = (cosine_schedule(inner + h, eps)[0] - cosine_schedule(inner - h, eps)[0]) / (2 * h)
    torch.testing.assert_close(dalpha[1:-1], finite_difference, rtol=0, atol=1e-9)
    # No cancellation as alpha -> 0: in float32 at t = 1, 1 - cos(g) is off by 1.5%; what remains here is
    # the float32 rounding of 1 - eps (2.6e-5 relative).
    alpha32, _ = cosine_schedule(torch.ones(1, dtype=torch.float32), eps)
    assert float(alpha32) == pytest.approx(float(alpha[-1]), rel=1e-4)


@pytest.mark.parametrize("schedule", [loglinear_schedule, cosine_schedule])
def test_bad_schedule_arguments(schedule):
    with pytest.raises(ValueError, match="t must lie in"):
        schedule(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t must lie in"):
        schedule(-0.1)
    with pytest.raises(ValueError, match="t must be finite"):
        schedule(torch.tensor([math.nan]))
    with pytest.raises(ValueError, match="eps"):
        schedule(0.5, eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        schedule(0.5, eps=math.nan)
