"""Samplers (duo-math §3.2, §6, §12.3-12.4): the posterior against (3.2) and Appendix A.3, marginal
preservation, the mixture step against the dense Psi-posterior, streams, schedules, validation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_kernels.reference import rng
from duo_kernels.reference.sampling import (_psi_mixture, ancestral_step, psi_kappas, sample_categorical,
                                            sampling_timesteps, usdm_posterior)
from tests.stats import chi2_test

P_MIN = 1e-4
F64 = torch.float64


def forward_marginal(x, alpha, vocab_size):
    """q_alpha(. | x) = alpha x + (1 - alpha)/V (3.1)."""
    return alpha * x + (1 - alpha) / vocab_size


def posterior_eq_3_2(x, z_t, alpha_t, alpha_s, vocab_size):
    """(3.2) written out literally for one row: x (V,), z_t an int."""
    z = torch.nn.functional.one_hot(torch.tensor(z_t), vocab_size).to(F64)
    alpha_ts = alpha_t / alpha_s
    numerator = (vocab_size * alpha_t * x * z + (alpha_ts - alpha_t) * z + (alpha_s - alpha_t) * x
                 + (1 - alpha_ts) * (1 - alpha_s) / vocab_size)
    return numerator / (vocab_size * alpha_t * x[z_t] + 1 - alpha_t)


def dense_psi(x_theta, z_t, alpha_t, alpha_s, kappa, vocab_size):
    """(6.2): kappa q(z_s | z_t, x_theta) + (1 - kappa) [alpha_s q(z_0 | z_t, x_theta) + (1 - alpha_s)/V]."""
    return (kappa * posterior_eq_3_2(x_theta, z_t, alpha_t, alpha_s, vocab_size)
            + (1 - kappa) * forward_marginal(posterior_eq_3_2(x_theta, z_t, alpha_t, 1.0, vocab_size), alpha_s,
                                             vocab_size))


def nucleus_oracle(probs, top_p):
    """§6.3 by a loop: in descending order keep entries while the mass before them is <= top_p."""
    kept = torch.zeros_like(probs)
    mass = 0.0
    for i in sorted(range(probs.numel()), key=lambda i: -float(probs[i])):
        if mass > top_p:
            break
        kept[i] = probs[i]
        mass += float(probs[i])
    return kept / kept.sum()


def assert_law(counts, probs):
    """Nothing drawn outside the support, and a chi-square test on it (a point mass needs none)."""
    support = probs > 0
    assert int(counts[~support].sum()) == 0
    if int(support.sum()) > 1:
        assert chi2_test(counts[support], probs[support]) > P_MIN


# ------------------------------------------------------------------------------------------------
# usdm_posterior


def test_posterior_appendix_a3():
    logits = torch.tensor([-1.978243, -0.735573, 2.575851, 0.387949, 1.840462, 1.154208, -1.272927, 1.083904],
                          dtype=F64)
    q = usdm_posterior(torch.softmax(logits, 0)[None, None], torch.tensor([[2]]), 0.4, 0.7)
    expected = torch.tensor([0.00833972, 0.01007849, 0.87108308, 0.01515183, 0.03976304, 0.02380978,
                             0.00906242, 0.02271165], dtype=F64)
    # A.3 prints its logits to 6 decimals; that rounding alone moves q by up to 3e-8 (found 2.7e-8).
    torch.testing.assert_close(q[0, 0], expected, rtol=0, atol=5e-8)


@given(vocab_size=st.integers(2, 60), alpha_t=st.floats(1e-6, 1.0), s_frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31))
def test_posterior_is_eq_3_2(vocab_size, alpha_t, s_frac, seed):
    """The mixture evaluation equals (3.2) literally, and rows sum to 1 (float64, 1e-12)."""
    alpha_s = alpha_t + s_frac * (1 - alpha_t)
    gen = torch.Generator().manual_seed(seed)
    x_theta = torch.softmax(3 * torch.randn(2, 3, vocab_size, generator=gen, dtype=F64), -1)
    z_t = torch.randint(0, vocab_size, (2, 3), generator=gen)
    q = usdm_posterior(x_theta, z_t, alpha_t, alpha_s)
    assert q.dtype == F64 and q.shape == (2, 3, vocab_size)
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 3, dtype=F64), rtol=0, atol=1e-12)
    for b in range(2):
        for l in range(3):
            expected = posterior_eq_3_2(x_theta[b, l], int(z_t[b, l]), alpha_t, alpha_s, vocab_size)
            # rtol 1e-10: near alpha_t = 1 both forms divide by K alpha_t x_theta[z_t], which can be ~1e-5
            # (hypothesis found 4e-12 relative at alpha_t = 1)
            torch.testing.assert_close(q[b, l], expected, rtol=1e-10, atol=1e-14)


@given(vocab_size=st.integers(2, 60), alpha_t=st.floats(1e-3, 1.0, exclude_max=True), s_frac=st.floats(0.0, 1.0),
       kappa=st.floats(0.0, 1.0), x=st.integers(0, 59))
def test_marginal_preservation(vocab_size, alpha_t, s_frac, kappa, x):
    """sum_{z_t} q_t(z_t | x) q(z_s | z_t, x) = q_s(z_s | x), and so for the Psi-posterior (6.1) at any
    kappa; the model form (6.2) at x_theta = e_x is (6.1)."""
    x %= vocab_size
    alpha_s = alpha_t + s_frac * (1 - alpha_t)
    e_x = torch.nn.functional.one_hot(torch.tensor(x), vocab_size).to(F64)
    q_t, q_s = forward_marginal(e_x, alpha_t, vocab_size), forward_marginal(e_x, alpha_s, vocab_size)
    every_z_t = torch.arange(vocab_size)[None]
    posterior = usdm_posterior(e_x.expand(1, vocab_size, vocab_size), every_z_t, alpha_t, alpha_s)[0]
    torch.testing.assert_close(q_t @ posterior, q_s, rtol=0, atol=1e-12)
    psi = kappa * posterior + (1 - kappa) * q_s
    torch.testing.assert_close(q_t @ psi, q_s, rtol=0, atol=1e-12)
    denoised = usdm_posterior(e_x.expand(1, vocab_size, vocab_size), every_z_t, alpha_t, 1.0)[0]
    psi_model = kappa * posterior + (1 - kappa) * forward_marginal(denoised, alpha_s, vocab_size)
    torch.testing.assert_close(psi_model, psi, rtol=0, atol=1e-12)


@given(vocab_size=st.integers(2, 40), alpha_t=st.floats(1e-4, 1.0), s_frac=st.floats(0.0, 1.0),
       kappa=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_psi_mixture_weights(vocab_size, alpha_t, s_frac, kappa, seed):
    """(c_p, c_u, c_z) rebuild the dense Psi-posterior (6.2) and sum to 1."""
    alpha_s = alpha_t + s_frac * (1 - alpha_t)
    gen = torch.Generator().manual_seed(seed)
    x_theta = torch.softmax(2 * torch.randn(vocab_size, generator=gen, dtype=F64), 0)
    z_t = int(torch.randint(0, vocab_size, (1,), generator=gen))
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    c_p, c_u, c_z = _psi_mixture(x_theta[z_t], t(alpha_t), t(alpha_s), t(kappa), vocab_size)
    mixture = c_p * x_theta + c_u / vocab_size
    mixture[z_t] += c_z
    torch.testing.assert_close(mixture, dense_psi(x_theta, z_t, alpha_t, alpha_s, kappa, vocab_size),
                               rtol=1e-12, atol=1e-14)
    assert float(c_p + c_u + c_z) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# sample_categorical


def test_sample_categorical_law_and_zeros():
    probs = torch.tensor([[0.0, 2.0, 1.0, 0.0, 5.0, 0.5, 0.0, 1.5], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    ids = sample_categorical(probs.repeat_interleave(30_000, 0).view(2, 30_000, 8), seed=41)
    assert ids.shape == (2, 30_000) and ids.dtype == torch.int64
    for row in range(2):
        assert_law(torch.bincount(ids[row], minlength=8), probs[row])


def test_sample_categorical_stream_layout():
    seed = 42
    probs = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(0)).double()
    w0, w1, _, _ = rng.philox4x32(seed, torch.arange(72))
    gumbel = -torch.log(-torch.log(rng.uniform53(w0, w1))).view(3, 4, 6)
    assert torch.equal(sample_categorical(probs, seed=seed), (probs.log() + gumbel).argmax(-1))
    assert sample_categorical(probs[0, 0], seed=seed).shape == ()


# ------------------------------------------------------------------------------------------------
# ancestral_step

ROWS = 15_000
# (kappa, alpha_t, alpha_s, z_t's rank among the logits): ancestral, Psi halfway, pure corrector from a
# low-probability z_t, and the noise-removal step (alpha_s = 1).
STEP_CONFIGS = [(1.0, 0.3, 0.6, 2), (0.5, 0.3, 0.6, 2), (0.0, 0.3, 0.6, -5), (1.0, 0.3, 1.0, -5)]


def step_logits(vocab_size):
    logits = 1.5 * torch.randn(vocab_size, generator=torch.Generator().manual_seed(vocab_size), dtype=F64)
    if vocab_size > 2:
        logits[[1, 7, 30]] = -math.inf
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [2, 37])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_ancestral_step_law(vocab_size, top_p):
    """Frequencies of z_s match the dense Psi-posterior (6.2) with the nucleus-filtered x_theta."""
    logits = step_logits(vocab_size)
    x_theta = nucleus_oracle(torch.softmax(logits, 0), top_p)
    order = logits.argsort(descending=True)
    kappa, alpha_t, alpha_s, rank = (torch.tensor(c) for c in zip(*STEP_CONFIGS))
    z_t = order[rank % vocab_size]
    z_s = ancestral_step(logits.float().expand(len(STEP_CONFIGS), ROWS, vocab_size), z_t[:, None].expand(-1, ROWS),
                         alpha_t.double(), alpha_s.double(), kappa=kappa.double(), top_p=top_p, seed=43)
    for row, (k, a_t, a_s, _) in enumerate(STEP_CONFIGS):
        expected = dense_psi(x_theta, int(z_t[row]), a_t, a_s, k, vocab_size)
        counts = torch.bincount(z_s[row], minlength=vocab_size)
        assert_law(counts, expected)
        if k == 1.0 and a_s == 1.0:  # no uniform component: filtered and -inf tokens never come back
            never = (x_theta == 0) & (torch.arange(vocab_size) != z_t[row])
            assert int(counts[never].sum()) == 0


def test_ancestral_step_stream_layout():
    """Component choice from counter N V + t (u = uniform53(w0, w1), uniform id randint32_below(w2, V)),
    the model draw from sample_categorical's stream."""
    seed, vocab_size, b, l = 44, 11, 3, 40
    logits = torch.randn(b, l, vocab_size, generator=torch.Generator().manual_seed(1))
    z_t = torch.randint(0, vocab_size, (b, l), generator=torch.Generator().manual_seed(2))
    alpha_t, alpha_s, kappa = 0.2, 0.5, 0.6
    z_s = ancestral_step(logits, z_t, alpha_t, alpha_s, kappa=kappa, seed=seed)

    x_theta = torch.softmax(logits.double(), -1)
    c_p, c_u, _ = _psi_mixture(x_theta.gather(-1, z_t[..., None])[..., 0], torch.tensor(alpha_t, dtype=F64),
                               torch.tensor(alpha_s, dtype=F64), torch.tensor(kappa, dtype=F64), vocab_size)
    n = b * l
    w0, w1, w2, _ = rng.philox4x32(seed, n * vocab_size + torch.arange(n))
    u = rng.uniform53(w0, w1).view(b, l)
    uniform_id = ((w2 * vocab_size) >> 32).view(b, l)
    model_id = sample_categorical(x_theta, seed=seed)
    expected = torch.where(u < c_p, model_id, torch.where(u < c_p + c_u, uniform_id, z_t))
    assert torch.equal(z_s, expected)
    component = (u >= c_p).long() + (u >= c_p + c_u).long()
    assert set(component.flatten().tolist()) == {0, 1, 2}  # the case exercises all three components


def test_ancestral_step_special_cases():
    vocab_size = 37
    logits = torch.randn(2, 500, vocab_size, generator=torch.Generator().manual_seed(3))
    z_t = torch.randint(0, vocab_size, (2, 500), generator=torch.Generator().manual_seed(4))
    # alpha_s = alpha_t: s = t, ancestral stays put.
    assert torch.equal(ancestral_step(logits, z_t, 0.4, 0.4, seed=0), z_t)
    # x_theta[z_t] = 0 and alpha_s = 1: the noise-removal step is a pure draw from x_theta.
    masked = logits.scatter(-1, z_t[..., None], -math.inf)
    assert torch.equal(ancestral_step(masked, z_t, 0.4, 1.0, seed=5),
                       sample_categorical(torch.softmax(masked.double(), -1), seed=5))
    # seeds
    first = ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=6)
    assert torch.equal(first, ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=6))
    assert not torch.equal(first, ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=7))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(ancestral_step(logits, z_t, 0.3, 0.6, generator=g1),
                       ancestral_step(logits, z_t, 0.3, 0.6, generator=g2))


# ------------------------------------------------------------------------------------------------
# Psi-sampler schedules


def test_worked_example_of_section_6_4():
    """duo_loop_remdm, 256 steps: n = 257, n_hi = 116, n_mid = 128, n_low = 13, c = 0.1; the middle
    kappa is 1 - 0.01/(1 - 0.9001) except at the segment's last point."""
    ts = sampling_timesteps("linear-constant-linear-0.9-inv", 256, high_frac=0.45, middle_frac=0.5)
    c = 1 - 0.9
    expected = torch.cat([torch.linspace(1, c, 116, dtype=F64), torch.full((128,), c, dtype=F64),
                          torch.linspace(c, 1e-5, 13, dtype=F64)])
    assert ts.dtype == F64 and torch.equal(ts, expected)
    kappa = psi_kappas(("pure-posterior", "constant-remdm-0.01", "pure-posterior"), ts,
                       high_frac=0.45, middle_frac=0.5)
    assert kappa.dtype == F64 and kappa.shape == (257,)
    middle = 1 - 0.01 / (1 - (1 - 0.999 * c))
    assert middle == pytest.approx(0.8999, abs=1e-4)
    torch.testing.assert_close(kappa[116:243], torch.full((127,), middle, dtype=F64), rtol=0, atol=1e-14)
    assert bool((kappa[:116] == 1).all()) and kappa[243] == 1 and bool((kappa[244:] == 1).all())


def test_timestep_profiles():
    assert torch.equal(sampling_timesteps("linear", 8), torch.linspace(1, 1e-5, 9, dtype=F64))
    # banker's rounding: 0.5 * 9 = 4.5 -> 4, 0.25 * 9 = 2.25 -> 2
    ts = sampling_timesteps("linear-constant-linear-0.3", 8, eps=1e-3, high_frac=0.5, middle_frac=0.25)
    expected = torch.tensor([1.0, 0.3 + 0.7 * 2 / 3, 0.3 + 0.7 / 3, 0.3, 0.3, 0.3, 0.3, (0.3 + 1e-3) / 2, 1e-3],
                            dtype=F64)
    torch.testing.assert_close(ts, expected, rtol=0, atol=1e-15)
    cosine = sampling_timesteps("linear-constant-linear-0.5-inv", 8, high_frac=0.5, middle_frac=0.25,
                                schedule="cosine")
    assert float(cosine[4]) == pytest.approx(1 - 2 / math.pi * math.acos(0.5), abs=1e-15)


def test_kappa_modes():
    ts = sampling_timesteps("linear", 6, eps=1e-2)
    alpha = 1 - 0.999 * ts
    a_t, a_s = alpha[:-1], alpha[1:]
    one = torch.ones(1, dtype=F64)

    def remdm(sigma):
        return torch.cat([(1 - sigma / (1 - a_s)).clamp(0, 1), one])

    expected = {
        "pure-posterior": torch.ones(7, dtype=F64),
        "pure-pc": torch.zeros(7, dtype=F64),
        "constant-0.95": torch.full((7,), 0.95, dtype=F64),
        "constant-remdm-0.05": remdm(torch.full((6,), 0.05, dtype=F64)),
        "max-capped-0.3": remdm(torch.minimum((1 - a_s) / a_t, torch.tensor(0.3, dtype=F64))),
        "max-rescale-0.3": remdm(0.3 * torch.minimum((1 - a_s) / a_t, torch.tensor(0.3, dtype=F64))),
    }
    for mode, kappa in expected.items():
        torch.testing.assert_close(psi_kappas(mode, ts), kappa, rtol=0, atol=1e-15, msg=mode)
    assert psi_kappas("max-capped-0.3", ts, "cosine").shape == (7,)
    # A one-point ReMDM segment is its own last point.
    assert psi_kappas(("constant-remdm-0.1",) * 3, ts, high_frac=0.0, middle_frac=1 / 7).tolist()[0] == 1.0


# ------------------------------------------------------------------------------------------------
# validation

LOGITS = torch.zeros(2, 3, 5)
Z = torch.zeros(2, 3, dtype=torch.int64)
PROBS = torch.full((2, 3, 5), 0.2)
TS = sampling_timesteps("linear", 4)

BAD_CALLS = [
    ("alpha_s", lambda: ancestral_step(LOGITS, Z, 0.5, 0.4, seed=0)),
    ("alpha_s", lambda: usdm_posterior(PROBS, Z, 0.5, torch.tensor([0.6, 0.3]))),
    ("alpha_t", lambda: ancestral_step(LOGITS, Z, 0.0, 0.4, seed=0)),
    ("alpha_t", lambda: usdm_posterior(PROBS, Z, math.nan, 0.5)),
    ("alpha_s", lambda: ancestral_step(LOGITS, Z, 0.5, 1.5, seed=0)),
    ("alpha_s", lambda: ancestral_step(LOGITS, Z, 0.5, torch.ones(3), seed=0)),
    ("kappa", lambda: ancestral_step(LOGITS, Z, 0.3, 0.4, kappa=1.5, seed=0)),
    ("kappa", lambda: ancestral_step(LOGITS, Z, 0.3, 0.4, kappa=-0.1, seed=0)),
    ("top_p", lambda: ancestral_step(LOGITS, Z, 0.3, 0.4, top_p=0.0, seed=0)),
    ("top_p", lambda: ancestral_step(LOGITS, Z, 0.3, 0.4, top_p=1.1, seed=0)),
    ("logits", lambda: ancestral_step(LOGITS[0], Z, 0.3, 0.4, seed=0)),
    ("logits", lambda: ancestral_step(LOGITS.long(), Z, 0.3, 0.4, seed=0)),
    ("logits", lambda: ancestral_step(LOGITS + math.nan, Z, 0.3, 0.4, seed=0)),
    ("logits", lambda: ancestral_step(LOGITS - math.inf, Z, 0.3, 0.4, seed=0)),
    ("logits", lambda: ancestral_step(LOGITS[..., :1], Z, 0.3, 0.4, seed=0)),
    ("z_t", lambda: ancestral_step(LOGITS, Z + 5, 0.3, 0.4, seed=0)),
    ("z_t", lambda: ancestral_step(LOGITS, Z[:, :2], 0.3, 0.4, seed=0)),
    ("z_t", lambda: usdm_posterior(PROBS, Z.float(), 0.3, 0.4)),
    ("probs", lambda: usdm_posterior(PROBS - 1, Z, 0.3, 0.4)),
    ("probs", lambda: sample_categorical(-PROBS, seed=0)),
    ("probs", lambda: sample_categorical(PROBS * 0, seed=0)),
    ("probs", lambda: sample_categorical(PROBS.long(), seed=0)),
    ("seed", lambda: sample_categorical(PROBS, seed=2**64)),
    ("profile", lambda: sampling_timesteps("cosine", 8)),
    ("profile", lambda: sampling_timesteps("linear-constant-linear-x", 8, high_frac=0.4, middle_frac=0.4)),
    ("high_frac", lambda: sampling_timesteps("linear-constant-linear-0.1", 8)),
    ("middle_frac", lambda: sampling_timesteps("linear-constant-linear-0.1", 8, high_frac=0.5, middle_frac=2)),
    ("middle_frac", lambda: sampling_timesteps("linear-constant-linear-0.1", 8, high_frac=0.6, middle_frac=0.6)),
    ("steps", lambda: sampling_timesteps("linear", 0)),
    ("eps", lambda: sampling_timesteps("linear", 8, eps=0.0)),
    ("schedule", lambda: sampling_timesteps("linear", 8, schedule="sqrt")),
    ("mode", lambda: psi_kappas("remdm", TS)),
    ("mode", lambda: psi_kappas("constant-1.5", TS)),
    ("mode", lambda: psi_kappas(("pure-pc", "pure-pc"), TS)),
    ("high_frac", lambda: psi_kappas(("pure-pc",) * 3, TS)),
    ("timesteps", lambda: psi_kappas("pure-pc", TS + 1)),
    ("timesteps", lambda: psi_kappas("pure-pc", TS.tolist())),
    ("timesteps", lambda: psi_kappas("max-capped-0.1", torch.tensor([1.0, math.nan]))),
    ("noise_eps", lambda: psi_kappas("max-capped-0.1", TS, noise_eps=1.0)),
]


@pytest.mark.parametrize("name, call", BAD_CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD_CALLS)])
def test_bad_arguments(name, call):
    with pytest.raises(ValueError, match=name):
        call()
