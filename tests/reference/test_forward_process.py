"""The forward processes: exact stream layouts, laws against the closed forms of duo-math §1.2,
§3.1, §5.3-5.4, and argument validation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_kernels.reference import rng
from duo_kernels._validate import per_token
from duo_kernels.reference.forward_process import (gaussian_argmax, gaussian_argmax_dense,
                                                   gaussian_argmax_pair, usdm_forward)
from duo_kernels.reference.transform import diffusion_transform, gaussian_params
from tests.stats import chi2_test

P_MIN = 1e-4  # every stream is seeded, so each test is deterministic; this only sets its strictness


def random_ids(shape, vocab_size, seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def p_clean(gamma, vocab_size):
    """P(z_t = x) = alpha + (1 - alpha)/V with alpha = T(gamma) (1.5)-(1.6)."""
    alpha, _ = diffusion_transform(torch.as_tensor(gamma, dtype=torch.float64), vocab_size)
    return alpha + (1 - alpha) / vocab_size


def offset_cells(z, x0, vocab_size, bins):
    """Counts of z - x mod V: cell 0 is z = x, cells 1..bins split the other V - 1 offsets evenly."""
    offset = (z - x0) % vocab_size
    cell = torch.where(offset == 0, 0, 1 + (offset - 1) * bins // (vocab_size - 1))
    return torch.bincount(cell.flatten(), minlength=bins + 1)


def offset_probs(p, bins):
    return torch.cat([p.reshape(1), ((1 - p) / bins).expand(bins)])


# ------------------------------------------------------------------------------------------------
# exact streams: the layouts the kernels reproduce


def test_gaussian_argmax_stream_layout():
    seed, vocab_size = 1234, 50258
    x0 = random_ids((3, 7), vocab_size)
    gamma = torch.tensor([-4.0, -2.7, 0.5], dtype=torch.float64)
    w0, w1, w2, w3 = rng.philox4x32(seed, torch.arange(21))
    n = rng.box_muller(rng.uniform24(w0), rng.uniform24(w1), torch.float64)
    m = -torch.special.ndtri(-torch.expm1(torch.log(rng.uniform24(w2).double()) / (vocab_size - 1)))
    j = (w3 * (vocab_size - 1)) >> 32
    x = x0.flatten()
    expected = torch.where(n + torch.exp(-gamma.repeat_interleave(7) / 2) > m, x, j + (j >= x).long())
    assert torch.equal(gaussian_argmax(x0, gamma, vocab_size, seed=seed).flatten(), expected)


def test_gaussian_argmax_dense_stream_layout():
    seed, vocab_size = 99, 7
    x0 = random_ids((2, 5), vocab_size)
    w0, w1, _, _ = rng.philox4x32(seed, torch.arange(2 * 5 * vocab_size))
    eps = rng.box_muller(rng.uniform24(w0), rng.uniform24(w1), torch.float32).view(2, 5, vocab_size)
    a, s = gaussian_params(torch.tensor([-3.0, 1.0], dtype=torch.float64))
    w = s[:, None, None] * eps.double() + a[:, None, None] * torch.nn.functional.one_hot(x0, vocab_size)
    z = gaussian_argmax_dense(x0, torch.tensor([-3.0, 1.0]), vocab_size, seed=seed)
    assert torch.equal(z, w.argmax(-1))


def test_usdm_forward_stream_layout():
    seed, vocab_size = 5, 37
    x0 = random_ids((4, 9), vocab_size)
    alpha = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    w0, w1, _, _ = rng.philox4x32(seed, torch.arange(36))
    move = rng.uniform24(w0).double() < 1 - alpha.repeat_interleave(9)
    expected = torch.where(move, (w1 * vocab_size) >> 32, x0.flatten())
    assert torch.equal(usdm_forward(x0, alpha, vocab_size, seed=seed).flatten(), expected)


@pytest.mark.parametrize("op", ["argmax", "pair", "forward"])
def test_seeds_and_generators(op):
    x0 = random_ids((2, 300), 50)

    def draw(**kw):
        if op == "argmax":
            return gaussian_argmax(x0, -1.0, 50, **kw)
        if op == "pair":
            return torch.cat(gaussian_argmax_pair(x0, -1.0, -2.0, 50, **kw))
        return usdm_forward(x0, 0.5, 50, **kw)

    assert torch.equal(draw(seed=3), draw(seed=3))
    assert not torch.equal(draw(seed=3), draw(seed=4))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(draw(generator=g1), draw(generator=g2))
    torch.manual_seed(0)
    a = draw()
    torch.manual_seed(0)
    assert torch.equal(a, draw())


# ------------------------------------------------------------------------------------------------
# laws


def test_gaussian_argmax_law():
    """O(1) sampler: P(z_t = x) = p(mu) and uniform over the other V - 1 ids (every offset a cell)."""
    vocab_size = 1000
    gammas = torch.tensor([-3.0, -2.2, -1.0], dtype=torch.float64)
    x0 = random_ids((3, 100_000), vocab_size)
    z = gaussian_argmax(x0, gammas, vocab_size, seed=11)
    for row, p in enumerate(p_clean(gammas, vocab_size)):
        counts = offset_cells(z[row], x0[row], vocab_size, vocab_size - 1)
        assert chi2_test(counts, offset_probs(p, vocab_size - 1)) > P_MIN


@pytest.mark.slow
def test_gaussian_argmax_dense_law():
    """The literal argmax over V = 1000 dense normals has the same law (the closed form of §1.2)."""
    vocab_size, bins = 1000, 9
    gammas = torch.tensor([-3.0, -2.2], dtype=torch.float64)
    x0 = random_ids((2, 4_000), vocab_size, seed=1)
    z = gaussian_argmax_dense(x0, gammas, vocab_size, seed=12)
    for row, p in enumerate(p_clean(gammas, vocab_size)):
        assert chi2_test(offset_cells(z[row], x0[row], vocab_size, bins), offset_probs(p, bins)) > P_MIN


def pair_cells(z_t, z_s, x0):
    """Counts of (x, x), (other, x), (same other, same other) and the two impossible cells."""
    t_clean, s_clean = z_t == x0, z_s == x0
    return torch.tensor([
        int((t_clean & s_clean).sum()),
        int((~t_clean & s_clean).sum()),
        int((~t_clean & ~s_clean & (z_t == z_s)).sum()),
        int((t_clean & ~s_clean).sum()),  # carry-over forbids it
        int((~t_clean & ~s_clean & (z_t != z_s)).sum()),  # a token flips at most once
    ])


def pair_probs(gamma_t, gamma_s, vocab_size):
    p_t, p_s = p_clean(gamma_t, vocab_size), p_clean(gamma_s, vocab_size)
    return torch.stack([p_t, p_s - p_t, 1 - p_s])


def test_gaussian_argmax_pair_law():
    vocab_size, gamma_t, gamma_s = 1000, -2.2, -3.0
    x0 = random_ids((2, 100_000), vocab_size, seed=2)
    z_t, z_s = gaussian_argmax_pair(x0, gamma_t, gamma_s, vocab_size, seed=13)
    counts = pair_cells(z_t, z_s, x0)
    assert counts[3:].sum() == 0
    assert chi2_test(counts[:3], pair_probs(gamma_t, gamma_s, vocab_size)) > P_MIN
    moved = z_t != x0
    offsets = ((z_t - x0) % vocab_size)[moved]
    assert chi2_test(torch.bincount(offsets - 1, minlength=vocab_size - 1), torch.ones(vocab_size - 1)) > P_MIN
    # Each coordinate of the pair is the single-time sampler of the same stream.
    assert torch.equal(z_t, gaussian_argmax(x0, gamma_t, vocab_size, seed=13))
    assert torch.equal(z_s, gaussian_argmax(x0, gamma_s, vocab_size, seed=13))


@pytest.mark.slow
def test_dense_shared_noise_pair_law():
    """The DCD construction itself — two argmaxes of one dense eps (same seed, two gammas) — has the
    law of the O(1) pair."""
    vocab_size, gamma_t, gamma_s = 500, -2.2, -3.0
    x0 = random_ids((1, 5000), vocab_size, seed=3)
    z_t = gaussian_argmax_dense(x0, gamma_t, vocab_size, seed=14)
    z_s = gaussian_argmax_dense(x0, gamma_s, vocab_size, seed=14)
    counts = pair_cells(z_t, z_s, x0)
    assert counts[3:].sum() == 0
    assert chi2_test(counts[:3], pair_probs(gamma_t, gamma_s, vocab_size)) > P_MIN


@pytest.mark.parametrize("vocab_size", [2, 37])
def test_usdm_forward_law(vocab_size):
    """(3.1): P(z_t = x) = alpha + (1 - alpha)/V, every other id (1 - alpha)/V; alpha = 1 keeps x."""
    alphas = torch.tensor([1.0, 0.95, 0.5, 0.05], dtype=torch.float64)
    x0 = random_ids((4, 50_000), vocab_size, seed=4)
    z = usdm_forward(x0, alphas[:, None], vocab_size, seed=15)
    assert torch.equal(z[0], x0[0])
    for row in range(1, 4):
        alpha = alphas[row]
        probs = torch.full((vocab_size,), (1 - alpha) / vocab_size, dtype=torch.float64)
        probs[0] += alpha
        counts = torch.bincount(((z[row] - x0[row]) % vocab_size), minlength=vocab_size)
        assert chi2_test(counts, probs) > P_MIN


@given(b=st.integers(1, 3), l=st.integers(1, 9), vocab_size=st.sampled_from([2, 37, 1000, 50258]),
       gamma_t=st.floats(-12.0, 12.0), drop=st.floats(0.0, 8.0), seed=st.integers(0, 2**64 - 1))
def test_pair_properties(b, l, vocab_size, gamma_t, drop, seed):
    """Any shape, V and window: ids in range, each z is x or one shared j* != x, carry-over."""
    x0 = random_ids((b, l), vocab_size, seed=b * l)
    z_t, z_s = gaussian_argmax_pair(x0, gamma_t, gamma_t - drop, vocab_size, seed=seed)
    for z in (z_t, z_s):
        assert z.dtype == torch.int64 and z.shape == (b, l)
        assert bool(((z >= 0) & (z < vocab_size)).all())
    assert bool(((z_t != x0) | (z_s == x0)).all())
    assert bool(((z_t == x0) | (z_s == x0) | (z_s == z_t)).all())


# ------------------------------------------------------------------------------------------------
# validation

X0 = torch.zeros(2, 3, dtype=torch.int64)

BAD_CALLS = [
    ("x0", lambda: gaussian_argmax(X0.float(), -2.0, 10, seed=0)),
    ("x0", lambda: gaussian_argmax(X0[0], -2.0, 10, seed=0)),
    ("x0", lambda: gaussian_argmax(X0 + 10, -2.0, 10, seed=0)),
    ("x0", lambda: gaussian_argmax_dense(X0 - 1, -2.0, 10, seed=0)),
    ("x0", lambda: usdm_forward([[0, 1]], 0.5, 10, seed=0)),
    ("vocab_size", lambda: gaussian_argmax(X0, -2.0, 1, seed=0)),
    ("vocab_size", lambda: gaussian_argmax_pair(X0, -2.0, -3.0, 10.0, seed=0)),
    ("vocab_size", lambda: usdm_forward(X0, 0.5, 0, seed=0)),
    ("gamma", lambda: gaussian_argmax(X0, math.nan, 10, seed=0)),
    ("gamma", lambda: gaussian_argmax_dense(X0, torch.tensor([-1.0, math.inf]), 10, seed=0)),
    ("gamma", lambda: gaussian_argmax(X0, torch.zeros(3), 10, seed=0)),
    ("gamma", lambda: gaussian_argmax(X0, torch.zeros(2, 2), 10, seed=0)),
    ("gamma_t", lambda: gaussian_argmax_pair(X0, math.inf, -3.0, 10, seed=0)),
    ("gamma_s", lambda: gaussian_argmax_pair(X0, -2.0, torch.zeros(4), 10, seed=0)),
    ("gamma_s", lambda: gaussian_argmax_pair(X0, -3.0, -2.0, 10, seed=0)),
    ("alpha_t", lambda: usdm_forward(X0, 0.0, 10, seed=0)),
    ("alpha_t", lambda: usdm_forward(X0, 1.5, 10, seed=0)),
    ("alpha_t", lambda: usdm_forward(X0, torch.tensor([0.5, math.nan]), 10, seed=0)),
    ("seed", lambda: gaussian_argmax(X0, -2.0, 10, seed=-1)),
    ("seed", lambda: usdm_forward(X0, 0.5, 10, seed=1.5)),
]


@pytest.mark.parametrize("name, call", BAD_CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD_CALLS)])
def test_bad_arguments(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_numbers_keep_float64():
    """A Python float schedule value is used at float64 precision, not rounded through float32."""
    assert per_token("alpha_t", 0.9, (2, 3), device="cpu").tolist() == [[0.9] * 3] * 2
