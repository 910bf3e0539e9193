import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_kernels.reference.nelbo import _usdm_nelbo_float64, usdm_nelbo

# duo-math Appendix A.3: K = 8, alpha = 0.4, alpha' = -1.3.
A3_LOGITS = [
    [-1.978243, -0.735573, 2.575851, 0.387949, 1.840462, 1.154208, -1.272927, 1.083904],
    [-0.633191, -0.644778, 0.194335, -3.051861, 2.384332, -1.342179, 2.000539, 0.272642],
]
A3_X0, A3_Z_T, A3_LOSS = [3, 5], [3, 1], [2.4537313037, 3.3736328132]


def udlm_nelbo(logits, z_t, x0, alpha_t, dalpha_t):
    """The UDLM form of the loss (duo-math §3.3), on dense xbar = K alpha e_x + (1 - alpha) 1; float64 (B, L)."""
    k = logits.shape[-1]
    alpha, dalpha = alpha_t[..., None], dalpha_t[..., None]
    xbar = k * alpha * torch.nn.functional.one_hot(x0, k) + (1 - alpha)
    xbar_theta = k * alpha * torch.softmax(logits, -1) + (1 - alpha)
    xbar_i = xbar.gather(-1, z_t[..., None])
    xbar_theta_i = xbar_theta.gather(-1, z_t[..., None])
    log_ratio = torch.log(xbar_theta_i * xbar / (xbar_theta * xbar_i))
    loss = dalpha / (k * alpha) * (k / xbar_i - k / xbar_theta_i - (xbar / xbar_i * log_ratio).sum(-1, keepdim=True))
    return loss[..., 0]


def nelbo_gradient(logits, z_t, x0, alpha_t, dalpha_t):
    """d loss / d logits by duo-math eq. (3.6), the backward a fused kernel implements; float64 (B, L, V)."""
    k = logits.shape[-1]
    p = torch.softmax(logits, -1)
    a = k * alpha_t
    q = a[..., None] * p + (1 - alpha_t)[..., None]
    eq = (z_t == x0).double()
    ne = 1 - eq
    kappa = (1 - alpha_t) / (k * alpha_t + 1 - alpha_t)
    r = k * alpha_t / (1 - alpha_t)
    coeff = dalpha_t / (k * alpha_t)
    c2 = eq * kappa + ne
    q_i = q.gather(-1, z_t[..., None])[..., 0]
    q_m = q.gather(-1, x0[..., None])[..., 0]
    g = c2[..., None] / q
    g = g.scatter_add(-1, z_t[..., None], (k / q_i**2 - c2 * k / q_i - ne * r / q_i)[..., None])
    g = g.scatter_add(-1, x0[..., None], (ne * r / q_m)[..., None])
    g = coeff[..., None] * g
    big_g = (g * p).sum(-1, keepdim=True)
    return a[..., None] * p * (g - big_g)


def rounding_noise(vocab_size: int, alpha: float, dalpha: float) -> float:
    """Float64 rounding noise of (3.5) near 0: an ulp-sized share of its largest terms,
    |coeff| (K + r + 1/kappa)(1 + |log kappa|); large as alpha -> 1, where r and 1/kappa blow up."""
    k = vocab_size
    kappa = (1 - alpha) / (k * alpha + 1 - alpha)
    return abs(dalpha) / (k * alpha) * (k + k * alpha / (1 - alpha) + 1 / kappa) * (1 + abs(math.log(kappa))) * 1e-15


def random_case(seed: int, batch: int, length: int, vocab_size: int, *, scale: float = 3.0):
    """Random float64 logits, ids with about half z_t == x0, alpha_t in (0.05, 0.95), dalpha_t in (-2, 0)."""
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, length, vocab_size, generator=gen, dtype=torch.float64)
    x0 = torch.randint(vocab_size, (batch, length), generator=gen)
    noise = torch.randint(vocab_size, (batch, length), generator=gen)
    z_t = torch.where(torch.rand(batch, length, generator=gen) < 0.5, x0, noise)
    alpha_t = 0.05 + 0.9 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    dalpha_t = -2 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    return logits, z_t, x0, alpha_t, dalpha_t


def test_appendix_a3():
    """A.3 was computed from unrounded logits; its 6-decimal logits move the loss by up to
    5e-7 * |grad|_1 = 7.8e-7 and 2.5e-7: measured differences 1.1e-7 and 6.6e-8. The UDLM form agrees
    with (3.5) on the printed logits to 1e-15 (test_equals_udlm_form)."""
    logits = torch.tensor([A3_LOGITS], dtype=torch.float64)
    loss = usdm_nelbo(logits, torch.tensor([A3_Z_T]), torch.tensor([A3_X0]), 0.4, -1.3)
    assert loss.dtype == torch.float32 and loss.shape == (1, 2)
    alpha_t = torch.full((1, 2), 0.4, dtype=torch.float64)
    loss64 = _usdm_nelbo_float64(logits, torch.tensor([A3_Z_T]), torch.tensor([A3_X0]), alpha_t, alpha_t * 0 - 1.3)
    torch.testing.assert_close(loss64, torch.tensor([A3_LOSS], dtype=torch.float64), rtol=0, atol=2e-7)
    torch.testing.assert_close(loss, torch.tensor([A3_LOSS], dtype=torch.float32), rtol=0, atol=5e-7)


@given(seed=st.integers(0, 2**31), vocab_size=st.sampled_from([2, 3, 8, 37, 1000]), scale=st.floats(0.1, 30.0))
def test_equals_udlm_form(seed, vocab_size, scale):
    logits, z_t, x0, alpha_t, dalpha_t = random_case(seed, 2, 3, vocab_size, scale=scale)
    torch.testing.assert_close(_usdm_nelbo_float64(logits, z_t, x0, alpha_t, dalpha_t),
                               udlm_nelbo(logits, z_t, x0, alpha_t, dalpha_t), rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**31), vocab_size=st.sampled_from([2, 3, 8, 37, 1000]), scale=st.floats(0.0, 50.0),
       alpha=st.floats(1e-6, 1 - 1e-6), dalpha=st.floats(-100.0, 0.0))
def test_loss_is_non_negative(seed, vocab_size, scale, alpha, dalpha):
    logits, z_t, x0, _, _ = random_case(seed, 2, 4, vocab_size, scale=scale)
    alpha_t = torch.full((2, 4), alpha, dtype=torch.float64)
    loss = _usdm_nelbo_float64(logits, z_t, x0, alpha_t, torch.full((2, 4), dalpha, dtype=torch.float64))
    assert torch.all(loss >= -rounding_noise(vocab_size, alpha, dalpha))


@pytest.mark.parametrize("vocab_size", [2, 8, 50258])
@pytest.mark.parametrize("alpha", [1e-3, 0.4, 0.999])
@pytest.mark.parametrize("off_logit", [-math.inf, -1e4])
def test_zero_at_the_clean_token(vocab_size, alpha, off_logit):
    """x_theta = onehot(x0) gives 0 loss, for z_t = x0 and z_t != x0."""
    x0 = torch.tensor([[1, 1]])
    z_t = torch.tensor([[1, 0]])
    logits = torch.full((1, 2, vocab_size), off_logit, dtype=torch.float64)
    logits[..., 1] = 0.0
    loss = _usdm_nelbo_float64(logits, z_t, x0, torch.full((1, 2), alpha, dtype=torch.float64),
                               torch.full((1, 2), -1.0, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=rounding_noise(vocab_size, alpha, -1.0))
    assert torch.all(usdm_nelbo(logits, z_t, x0, alpha, -1.0).abs() < 1e-6)


def test_gradcheck_float64():
    logits, z_t, x0, alpha_t, dalpha_t = random_case(0, 2, 3, 5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda lg: _usdm_nelbo_float64(lg, z_t, x0, alpha_t, dalpha_t), (logits,))


@pytest.mark.parametrize("vocab_size", [2, 37, 1000])
def test_gradient_matches_eq_3_6(vocab_size):
    """Autograd through the public float32 loss, with a random upstream gradient and ~30% masked tokens."""
    logits, z_t, x0, alpha_t, dalpha_t = random_case(1, 3, 5, vocab_size)
    logits.requires_grad_()
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    upstream = torch.randn(3, 5, generator=gen)
    usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, mask=mask).backward(upstream)
    expected = (upstream * mask).double()[..., None] * nelbo_gradient(logits.detach(), z_t, x0, alpha_t, dalpha_t)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits(dtype):
    logits, z_t, x0, alpha_t, dalpha_t = random_case(3, 2, 3, 37)
    logits = logits.to(dtype)
    loss = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t)
    assert loss.dtype == torch.float32
    expected = _usdm_nelbo_float64(logits.double(), z_t, x0, alpha_t, dalpha_t)
    torch.testing.assert_close(loss, expected.float(), rtol=0, atol=0)


def test_alpha_t_shapes():
    logits, z_t, x0, _, _ = random_case(4, 2, 3, 8)
    per_sequence = torch.tensor([0.3, 0.7], dtype=torch.float64)
    expected = usdm_nelbo(logits, z_t, x0, per_sequence[:, None].expand(2, 3), -1.0)
    for alpha_t in (per_sequence, per_sequence[:, None], per_sequence.float()):
        torch.testing.assert_close(usdm_nelbo(logits, z_t, x0, alpha_t, torch.tensor([-1.0, -1.0])), expected,
                                   rtol=1e-6, atol=0)
    number = usdm_nelbo(logits, z_t, x0, 0.3, -1.0)
    torch.testing.assert_close(number, usdm_nelbo(logits, z_t, x0, torch.full((2, 3), 0.3), -1.0), rtol=1e-6, atol=0)


def test_reduction_and_mask():
    logits, z_t, x0, alpha_t, dalpha_t = random_case(5, 3, 4, 11)
    per_token = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t)
    assert per_token.shape == (3, 4)
    torch.testing.assert_close(usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="sum"), per_token.sum())
    torch.testing.assert_close(usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="mean"), per_token.mean())

    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, False]])
    masked = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, mask=mask)
    assert torch.all(masked[~mask] == 0)
    torch.testing.assert_close(masked[mask], per_token[mask], rtol=0, atol=0)
    total = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="sum", mask=mask)
    torch.testing.assert_close(total, per_token[mask].sum())
    mean = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="mean", mask=mask)
    torch.testing.assert_close(mean, per_token[mask].sum() / mask.sum())

    weights = torch.rand(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float32) * mask
    mean = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="mean", mask=weights)
    torch.testing.assert_close(mean, (per_token * weights).sum() / weights.sum())
    nothing = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="mean", mask=torch.zeros(3, 4, dtype=torch.bool))
    assert torch.isnan(nothing)


def test_non_finite_logits_stay_in_their_row():
    logits, z_t, x0, alpha_t, dalpha_t = random_case(7, 2, 4, 9)
    clean = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t)
    logits[0, 1, 3] = math.nan
    logits[1, 2, 0] = math.inf
    logits[1, 3, 5] = -math.inf  # a zero probability: finite loss
    loss = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.all(torch.isnan(loss[bad]))
    assert torch.all(torch.isfinite(loss[~bad]))
    keep = ~bad
    keep[1, 3] = False
    torch.testing.assert_close(loss[keep], clean[keep], rtol=0, atol=0)


def test_masked_non_finite_rows_give_zero_loss_and_gradient():
    logits, z_t, x0, alpha_t, dalpha_t = random_case(8, 2, 3, 7)
    logits[0, 2] = math.nan
    logits[1, 0, 4] = math.inf
    logits.requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = False
    loss = usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction="sum", mask=mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(torch.isfinite(logits.grad))
    assert torch.all(logits.grad[0, 2] == 0) and torch.all(logits.grad[1, 0] == 0)


def good_args():
    logits, z_t, x0, alpha_t, dalpha_t = random_case(9, 2, 3, 6)
    return dict(logits=logits, z_t=z_t, x0=x0, alpha_t=alpha_t, dalpha_t=dalpha_t)


BAD_ARGUMENTS = [
    ("logits", [[[0.0, 1.0]]], "logits"),
    ("logits", torch.zeros(2, 3, 6, dtype=torch.int64), "logits"),
    ("logits", torch.zeros(2, 6, dtype=torch.float64), "logits"),
    ("logits", torch.zeros(2, 3, 1, dtype=torch.float64), "logits"),
    ("z_t", torch.zeros(2, 3, dtype=torch.int32), "z_t"),
    ("z_t", torch.zeros(2, 4, dtype=torch.int64), "z_t"),
    ("z_t", torch.full((2, 3), 6), "z_t"),
    ("z_t", torch.zeros(2, 3, dtype=torch.int64, device="meta"), "z_t"),
    ("x0", torch.full((2, 3), -1), "x0"),
    ("x0", torch.zeros(3, 2, dtype=torch.int64), "x0"),
    ("alpha_t", 1.0, "alpha_t must be < 1"),
    ("alpha_t", torch.tensor([0.5, 1.0]), "alpha_t must be < 1"),
    ("alpha_t", 0.0, "alpha_t must be > 0"),
    ("alpha_t", math.nan, "alpha_t must be finite"),
    ("alpha_t", torch.full((3,), 0.5), "alpha_t"),
    ("dalpha_t", 0.5, "dalpha_t"),
    ("dalpha_t", -math.inf, "dalpha_t"),
    ("dalpha_t", torch.full((2, 2), -1.0), "dalpha_t"),
]


@pytest.mark.parametrize("name, value, match", BAD_ARGUMENTS)
def test_bad_arguments(name, value, match):
    args = good_args()
    args[name] = value
    with pytest.raises(ValueError, match=match):
        usdm_nelbo(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="avg"), "reduction"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(2, 3, dtype=torch.int64)), "mask"),
    (dict(mask=torch.full((2, 3), -1.0)), "mask"),
    (dict(mask=torch.full((2, 3), math.nan)), "mask"),
    (dict(mask=[[True] * 3] * 2), "mask"),
])
def test_bad_reduction_and_mask(kwargs, match):
    with pytest.raises(ValueError, match=match):
        usdm_nelbo(**good_args(), **kwargs)
