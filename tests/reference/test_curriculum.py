"""The curriculum relaxations (duo-math §4.2, §4.4, §12.6-12.7): Duo++'s top-k sampler against
Appendix A.5 and the dense construction, its ids, weights and tail; the embeddings and their gradients."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from duo_kernels.reference import rng
from duo_kernels.reference.curriculum import (_log_truncated_mean_exp, _topk_draws, relaxed_embedding,
                                              tempered_softmax_dense, tempered_softmax_embedding,
                                              tempered_softmax_topk)
from duo_kernels.reference.forward_process import gaussian_argmax_dense
from duo_kernels.reference.transform import diffusion_transform, gaussian_params
from tests.stats import chi2_test

P_MIN = 1e-4
OWT_VOCAB = 50258
# duo-math Appendix A.5, K = 50258: P(z_t = x) exact and with the published rule (clean rank <= k).
APPENDIX_A5 = {-3.0: {"exact": 0.5963, 2: 0.6802, 3: 0.7216}, -2.5: {"exact": 0.2380, 2: 0.3063, 3: 0.3473}}


def random_ids(shape, vocab_size, seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def assert_frequency(hits: torch.Tensor, p: float):
    """A Bernoulli frequency within 4 standard errors of p (plus the table's rounding)."""
    n = hits.numel()
    assert abs(float(hits.double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n) + 5e-5


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    f_a = torch.searchsorted(a, grid, right=True) / a.numel()
    f_b = torch.searchsorted(b, grid, right=True) / b.numel()
    return float((f_a - f_b).abs().max())


def ks_critical(n: int, m: int, alpha: float = 1e-4) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


# ------------------------------------------------------------------------------------------------
# tempered_softmax_topk: P(z_t = x)


@pytest.mark.slow
def test_topk_clean_probability_matches_appendix_a5():
    """Exact rule: P(z_t = x) = alpha + (1 - alpha)/V (the A.5 'exact' column) for every k; with
    reference_compat, the published rank <= k rule (A.5's k columns)."""
    gammas = torch.tensor(sorted(APPENDIX_A5), dtype=torch.float64)
    x0 = random_ids((2, 100_000), OWT_VOCAB)
    alpha, _ = diffusion_transform(gammas, OWT_VOCAB)
    p_clean = alpha + (1 - alpha) / OWT_VOCAB

    _, _, z_exact = tempered_softmax_topk(x0, gammas, OWT_VOCAB, 3, 1e-3, seed=21)
    _, _, z_k1 = tempered_softmax_topk(x0, gammas, OWT_VOCAB, 1, 1e-3, seed=21)
    assert torch.equal(z_exact, z_k1)  # the exact z_t does not depend on k
    for row, gamma in enumerate(gammas.tolist()):
        assert_frequency(z_exact[row] == x0[row], float(p_clean[row]))
        assert abs(float(p_clean[row]) - APPENDIX_A5[gamma]["exact"]) < 5e-5
    for k in (2, 3):
        _, _, z_compat = tempered_softmax_topk(x0, gammas, OWT_VOCAB, k, 1e-3, reference_compat=True, seed=22)
        for row, gamma in enumerate(gammas.tolist()):
            assert_frequency(z_compat[row] == x0[row], APPENDIX_A5[gamma][k])


# ------------------------------------------------------------------------------------------------
# tempered_softmax_topk: structure of the outputs


@given(vocab_size=st.sampled_from([2, 3, 37, 1000, 50258]), k_frac=st.floats(0.0, 1.0),
       log10_tau=st.floats(-4.0, 1.0), gamma=st.floats(-8.0, 6.0), compat=st.booleans(),
       b=st.integers(1, 3), l=st.integers(1, 7), seed=st.integers(0, 2**64 - 1))
def test_topk_structure(vocab_size, k_frac, log10_tau, gamma, compat, b, l, seed):
    """Any V, k, tau in [1e-4, 10], gamma: distinct ids, x only in the clean slot, finite weights in
    [0, 1] summing to <= 1; exact mode is sorted with z_t = ids[..., 0]."""
    k = min(1 + int(k_frac * (vocab_size - 1)), vocab_size - 1, 8)
    if compat and k < 2:
        k = 2
    if k > vocab_size - 1:
        return
    x0 = random_ids((b, l), vocab_size, seed=b + l)
    ids, weights, z_t = tempered_softmax_topk(x0, gamma, vocab_size, k, 10.0**log10_tau,
                                              reference_compat=compat, seed=seed)
    assert ids.shape == weights.shape == (b, l, k) and z_t.shape == (b, l)
    assert ids.dtype == z_t.dtype == torch.int64 and weights.dtype == torch.float32
    assert bool(((ids >= 0) & (ids < vocab_size)).all())
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all())  # distinct
    is_x = ids == x0[..., None]
    assert bool((is_x.sum(-1) <= 1).all())
    assert bool(torch.isfinite(weights).all()) and bool(((weights >= 0) & (weights <= 1)).all())
    assert bool((weights.double().sum(-1) <= 1 + 1e-6).all())
    if compat:
        assert not bool(is_x[..., :-1].any())  # only the last slot may be overwritten by x
        assert torch.equal(z_t, torch.where(is_x[..., -1], x0, ids[..., 0]))
    else:
        assert torch.equal(z_t, ids[..., 0])
        assert bool((weights.diff(dim=-1) <= 0).all())


def test_topk_slot_ids_are_uniform():
    """Every slot's id is uniform over V \\ {x}, jointly for slots 0 and 1: no Floyd ordering bias
    (Floyd's set would never put the pool's k - 1 largest ids in slot 0)."""
    vocab_size, k = 37, 3
    for x in (0, 17, 36):
        x0 = torch.full((1, 40_000), x)
        ids, _, _ = tempered_softmax_topk(x0, 3.0, vocab_size, k, 1e-3, seed=23 + x)
        pool = ids - (ids > x).long()  # ids of V \ {x} as [0, V - 1)
        for slot in (0, k - 1):
            noise = pool[..., slot][ids[..., slot] != x]
            assert chi2_test(torch.bincount(noise, minlength=vocab_size - 1), torch.ones(vocab_size - 1)) > P_MIN
        both = (ids[..., 0] != x) & (ids[..., 1] != x)
        pairs = pool[..., 0][both] * (vocab_size - 1) + pool[..., 1][both]
        expected = 1.0 - torch.eye(vocab_size - 1).flatten()  # ordered pairs of distinct ids
        assert chi2_test(torch.bincount(pairs, minlength=(vocab_size - 1) ** 2), expected) > P_MIN


def test_order_statistics_match_dense_topk():
    """The drawn o_0 > ... > o_{k-1} have the law of the top k of V - 1 dense normals (KS per rank)."""
    vocab_size, k, n, m = 200, 3, 20_000, 4000
    ones = torch.ones(n, dtype=torch.float64)
    _, others, _ = _topk_draws(torch.zeros(n, dtype=torch.int64), 0 * ones, ones, vocab_size, k, seed=24)
    assert bool((others.diff(dim=-1) < 0).all())
    dense = rng.normal((m, vocab_size - 1), 25, 0, torch.float64).topk(k, dim=-1).values
    for rank in (0, k - 1):
        assert ks_statistic(others[:, rank], dense[:, rank]) < ks_critical(n, m)


# ------------------------------------------------------------------------------------------------
# tempered_softmax_topk: weights


def test_log_truncated_mean_exp_matches_quadrature():
    """log E[exp(Y/tau) | Y < c], Y ~ N(0, s^2), against scipy quadrature, tau from 1e-4 to 10.

    With u = (c - y)/tau: E = tau/s * exp(c/tau) * Int_0^inf e^-u phi((c - tau u)/s) du / Phi(c/s)."""
    for c, s, tau in [(0.9, 0.2, 1e-4), (0.9, 0.2, 1e-3), (1.7, 0.38, 1e-3), (-0.3, 0.38, 1e-3),
                      (0.5, 0.17, 0.1), (1.2, 0.3, 1.0), (-0.2, 0.5, 10.0), (2.5, 0.5, 10.0)]:
        integral, _ = integrate.quad(lambda u: math.exp(-u) * stats.norm.pdf((c - tau * u) / s), 0, math.inf,
                                     epsabs=0, epsrel=1e-12, limit=200)
        expected = c / tau + math.log(tau / s * integral) - stats.norm.logcdf(c / s)
        got = float(_log_truncated_mean_exp(torch.tensor(c, dtype=torch.float64),
                                            torch.tensor(s, dtype=torch.float64), 1 / tau))
        assert got == pytest.approx(expected, rel=1e-11, abs=1e-9), (c, s, tau)


def oracle_weights(tau, vocab_size, x, w_x, others, other_ids, s_tilde):
    """An independent exact-mode assembly: sort the k + 1 drawn values, softmax with the published
    closed-form tail for the V - k - 1 undrawn noise coordinates below o_{k-1}."""
    k = others.shape[1]
    values = torch.cat([w_x[:, None], others], 1)
    labels = torch.cat([x[:, None], other_ids], 1)
    order = values.argsort(dim=1, descending=True)
    values, labels = values.gather(1, order), labels.gather(1, order)
    big_s, big_c = s_tilde / tau, others[:, -1] / tau
    log_mu = big_s**2 / 2 + torch.special.log_ndtr((big_c - big_s**2) / big_s) - torch.special.log_ndtr(big_c / big_s)
    terms = [values / tau]
    if vocab_size - k - 1 > 0:
        terms.append((math.log(vocab_size - k - 1) + log_mu)[:, None])
    log_z = torch.logsumexp(torch.cat(terms, 1), dim=1, keepdim=True)
    return labels[:, :k], torch.exp(values[:, :k] / tau - log_z)


@pytest.mark.parametrize("vocab_size, k, tau", [(37, 3, 0.3), (37, 36, 0.3), (1000, 2, 1e-2), (2, 1, 1.0)])
def test_topk_exact_weights_recomputed(vocab_size, k, tau):
    """Weights and ids are the oracle's from the same draws; with k = V - 1 they are the exact softmax."""
    x0 = random_ids((2, 500), vocab_size)
    gamma = torch.tensor([-2.5, -0.5], dtype=torch.float64)
    ids, weights, _ = tempered_softmax_topk(x0, gamma, vocab_size, k, tau, seed=26)
    a, s = gaussian_params(gamma.repeat_interleave(500))
    w_x, others, other_ids = _topk_draws(x0.flatten(), a, s, vocab_size, k, seed=26)
    labels, expected = oracle_weights(tau, vocab_size, x0.flatten(), w_x, others, other_ids, s)
    assert torch.equal(ids.view(-1, k), labels)
    torch.testing.assert_close(weights.view(-1, k).double(), expected, rtol=1e-6, atol=1e-9)
    if k == vocab_size - 1:  # nothing hidden but one drawn value: the weights are the exact softmax
        full = torch.softmax(torch.cat([w_x[:, None], others], 1) / tau, dim=1).sort(1, descending=True).values
        torch.testing.assert_close(weights.view(-1, k).double(), full[:, :k], rtol=1e-6, atol=1e-9)


def published_sampler(tau, vocab_size, x, w_x, others, other_ids, s_tilde):
    """Steps 3-9 of the published ``sample_tempered_softmax_topk`` (duo-math §4.4), on given draws."""
    k = others.shape[1]
    top_k, ids = others.clone(), other_ids.clone()
    in_topk = w_x > top_k[:, -1]
    top_k[:, -1] = torch.where(in_topk, w_x, top_k[:, -1])
    min_rv = torch.where(in_topk, top_k[:, -2], top_k[:, -1])
    big_s, big_c = s_tilde / tau, min_rv / tau
    log_mu = big_s**2 / 2 + torch.special.log_ndtr((big_c - big_s**2) / big_s) - torch.special.log_ndtr(big_c / big_s)
    count = torch.where(in_topk, vocab_size - k, vocab_size - k - 1).double()
    log_extra = torch.where(in_topk, -math.inf, w_x / tau)
    log_z = torch.logsumexp(torch.cat([top_k / tau, (torch.log(count) + log_mu)[:, None], log_extra[:, None]], 1),
                            dim=1, keepdim=True)
    ids[:, -1] = torch.where(in_topk, x, ids[:, -1])
    return ids, torch.exp(top_k / tau - log_z), torch.where(in_topk, x, ids[:, 0])


@pytest.mark.parametrize("k", [2, 4])
def test_topk_reference_compat_reproduces_published_steps(k):
    vocab_size, tau = 50258, 1e-3
    x0 = random_ids((2, 2000), vocab_size)
    gamma = torch.tensor([-3.5, -2.0], dtype=torch.float64)
    ids, weights, z_t = tempered_softmax_topk(x0, gamma, vocab_size, k, tau, reference_compat=True, seed=27)
    a, s = gaussian_params(gamma.repeat_interleave(2000))
    draws = _topk_draws(x0.flatten(), a, s, vocab_size, k, seed=27)
    expected_ids, expected_weights, expected_z = published_sampler(tau, vocab_size, x0.flatten(), *draws, s)
    assert torch.equal(ids.view(-1, k), expected_ids)
    assert torch.equal(z_t.flatten(), expected_z)
    torch.testing.assert_close(weights.view(-1, k).double(), expected_weights, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_weights_match_dense_softmax(k):
    """§12.6c: the top-k weights have the law of the k largest dense softmax(w / tau) probabilities:
    per-slot means agree within the tail estimate's error (exactly in law at k = V - 1)."""
    vocab_size, tau, gamma, n = 8, 0.3, -1.0, 40_000
    x0 = random_ids((1, n), vocab_size)
    _, weights, _ = tempered_softmax_topk(x0, gamma, vocab_size, k, tau, seed=28)
    probs, _ = tempered_softmax_dense(x0, gamma, vocab_size, tau, seed=29)
    dense = probs.double().sort(-1, descending=True).values[..., :k]
    weights = weights.double()
    standard_error = torch.sqrt((weights.var(dim=1) + dense.var(dim=1)) / n)
    gap = (weights.mean(dim=1) - dense.mean(dim=1)).abs()
    # Replacing the random tail sum by its conditional mean biases E[weight] down (Jensen): 0.009 at
    # k = 1 here; at k >= 3 it is below this test's noise.
    tail_error = 0.012 if k == 1 else 0.0
    assert bool((gap < 4 * standard_error + tail_error).all()), gap


def test_k1_and_extreme_temperatures():
    x0 = random_ids((2, 50), 50258)
    for tau in (1e-4, 1e-3, 1.0, 10.0):
        ids, weights, z_t = tempered_softmax_topk(x0, -2.0, 50258, 1, tau, seed=30)
        assert ids.shape == (2, 50, 1) and torch.equal(z_t, ids[..., 0])
        assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    with pytest.raises(ValueError, match="k"):
        tempered_softmax_topk(x0, -2.0, 50258, 1, 1e-3, reference_compat=True, seed=0)


def test_topk_seeds():
    x0 = random_ids((2, 100), 1000)
    first = tempered_softmax_topk(x0, -2.0, 1000, 3, 1e-3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, tempered_softmax_topk(x0, -2.0, 1000, 3, 1e-3, seed=1)))
    assert not torch.equal(first[0], tempered_softmax_topk(x0, -2.0, 1000, 3, 1e-3, seed=2)[0])
    # The draws for k are a prefix of those for k + 1: the same largest noise coordinate and id.
    bigger = tempered_softmax_topk(x0, -2.0, 1000, 4, 1e-3, seed=1)
    assert torch.equal(first[2], bigger[2])


# ------------------------------------------------------------------------------------------------
# embeddings


def test_relaxed_embedding_values_and_gradients():
    vocab_size, d = 11, 5
    gen = torch.Generator().manual_seed(31)
    weight = torch.randn(vocab_size, d, dtype=torch.float64, generator=gen, requires_grad=True)
    ids, w32, _ = tempered_softmax_topk(random_ids((2, 3), vocab_size), 0.0, vocab_size, 4, 0.5, seed=32)
    weights = w32.double().requires_grad_()
    h = relaxed_embedding(weight, ids, weights)
    expected = sum(weights[..., j, None] * weight[ids[..., j]] for j in range(4))
    torch.testing.assert_close(h, expected, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda e, w: relaxed_embedding(e, ids, w), (weight, weights))
    assert relaxed_embedding(weight.detach().bfloat16(), ids, w32).dtype == torch.float32


def test_tempered_softmax_dense_matches_stream():
    vocab_size, tau = 7, 0.2
    x0 = random_ids((2, 5), vocab_size)
    gamma = torch.tensor([-3.0, 0.5], dtype=torch.float64)
    probs, z_t = tempered_softmax_dense(x0, gamma, vocab_size, tau, seed=33)
    eps = rng.normal((2, 5, vocab_size), 33, 0, torch.float32).double()
    a, s = gaussian_params(gamma)
    w = s[:, None, None] * eps + a[:, None, None] * torch.nn.functional.one_hot(x0, vocab_size)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(w / tau, -1).float())
    assert torch.equal(z_t, w.argmax(-1))
    assert torch.equal(z_t, gaussian_argmax_dense(x0, gamma, vocab_size, seed=33))


def test_tempered_softmax_embedding_values_and_gradient():
    vocab_size, d, tau = 9, 4, 0.5
    x0 = random_ids((2, 3), vocab_size)
    weight = torch.randn(vocab_size, d, dtype=torch.float64, generator=torch.Generator().manual_seed(34),
                         requires_grad=True)
    h, z_t = tempered_softmax_embedding(x0, -1.0, tau, weight, seed=35)
    probs, z_dense = tempered_softmax_dense(x0, -1.0, vocab_size, tau, seed=35)
    assert torch.equal(z_t, z_dense)
    torch.testing.assert_close(h, probs.double() @ weight, rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda e: tempered_softmax_embedding(x0, -1.0, tau, e, seed=35)[0], (weight,))
    h32, _ = tempered_softmax_embedding(x0, -1.0, tau, weight.detach().float(), seed=35)
    assert h32.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# validation

X0 = torch.zeros(2, 3, dtype=torch.int64)
E = torch.zeros(10, 4)
IDS = torch.zeros(2, 3, 2, dtype=torch.int64)
W = torch.zeros(2, 3, 2)

BAD_CALLS = [
    ("k", lambda: tempered_softmax_topk(X0, -2.0, 10, 0, 1e-3, seed=0)),
    ("k", lambda: tempered_softmax_topk(X0, -2.0, 10, 10, 1e-3, seed=0)),
    ("k", lambda: tempered_softmax_topk(X0, -2.0, 10, 2.0, 1e-3, seed=0)),
    ("k", lambda: tempered_softmax_topk(X0, -2.0, 10, 1, 1e-3, reference_compat=True, seed=0)),
    ("tau", lambda: tempered_softmax_topk(X0, -2.0, 10, 2, 0.0, seed=0)),
    ("tau", lambda: tempered_softmax_topk(X0, -2.0, 10, 2, -1.0, seed=0)),
    ("tau", lambda: tempered_softmax_dense(X0, -2.0, 10, math.inf, seed=0)),
    ("tau", lambda: tempered_softmax_embedding(X0, -2.0, math.nan, E, seed=0)),
    ("x0", lambda: tempered_softmax_topk(X0 + 10, -2.0, 10, 2, 1e-3, seed=0)),
    ("x0", lambda: tempered_softmax_dense(X0.float(), -2.0, 10, 1e-3, seed=0)),
    ("x0", lambda: tempered_softmax_embedding(X0 + 10, -2.0, 1e-3, E, seed=0)),
    ("vocab_size", lambda: tempered_softmax_topk(X0, -2.0, 1, 1, 1e-3, seed=0)),
    ("gamma", lambda: tempered_softmax_topk(X0, math.nan, 10, 2, 1e-3, seed=0)),
    ("gamma", lambda: tempered_softmax_dense(X0, torch.zeros(5), 10, 1e-3, seed=0)),
    ("weight", lambda: tempered_softmax_embedding(X0, -2.0, 1e-3, E[0], seed=0)),
    ("weight", lambda: relaxed_embedding(E.long(), IDS, W)),
    ("ids", lambda: relaxed_embedding(E, IDS + 10, W)),
    ("ids", lambda: relaxed_embedding(E, IDS[0], W)),
    ("weight", lambda: relaxed_embedding(E[:1], IDS, W)),
    ("weights", lambda: relaxed_embedding(E, IDS, W[..., :1])),
    ("weights", lambda: relaxed_embedding(E, IDS, W.long())),
]


@pytest.mark.parametrize("name, call", BAD_CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD_CALLS)])
def test_bad_arguments(name, call):
    with pytest.raises(ValueError, match=name):
        call()
