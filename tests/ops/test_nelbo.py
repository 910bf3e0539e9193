"""usdm_nelbo on the fused backends ("cpu": chunked PyTorch; "triton": interpreted on CPU here) against
the float64 reference: loss and gradient, masks, schedules, bad input, torch.compile and opcheck.

Error budget (ARCHITECTURE.md): the reference computes in float64 from the input logits, so a fused
backend is compared with the float64 reference evaluated on the same (bf16/fp16-rounded) logits, and
its budget is fp32-math noise: ``|err| <= 1e-5 |ref| + 4 * loss_noise`` for the loss, where
``loss_noise`` is one fp32 ulp of the formula's largest terms (|coeff| (K + 2r + 1)(1 + log1p r)), and
``|err| <= rtol(dtype) |ref| + 32 * grad_noise(row)`` for the gradient, ``grad_noise`` one fp32 ulp of
the terms that (3.6) combines in that row and ``rtol(dtype)`` the rounding of the gradient to the
logits' dtype (the interpreter truncates bf16, hence 2^-7). At V = 50258 the loss must be within
1e-5 relative of the reference with no absolute slack (test_large_vocab_accuracy).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duo_kernels
from duo_kernels.ops import nelbo as nelbo_ops
from duo_kernels.reference.nelbo import _usdm_nelbo_float64
from duo_kernels.reference.nelbo import usdm_nelbo as reference_usdm_nelbo
from tests.devices import device_for
from tests.reference.test_nelbo import BAD_ARGUMENTS, good_args

IMPLS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = 2.0**-24
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 1e-5}
# fp16 gradients below its smallest normal lose absolute precision (subnormal spacing 6e-8)
GRAD_ATOL = {torch.float16: 6e-8}


def make_case(seed, batch, length, vocab_size, *, dtype=torch.float32, scale=3.0, alpha_range=(0.05, 0.95),
              neg_inf=0.0, confident=0.0, device="cpu"):
    """Random logits (rounded to ``dtype``), ids (half z_t == x0), per-token alpha, dalpha in (-2, 0),
    a ~30% mask and a random upstream gradient. ``neg_inf``: share of -inf logits (never a whole row);
    ``confident``: share of rows whose x0 logit is raised by 30 (a near-zero loss)."""
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, length, vocab_size, generator=gen)
    x0 = torch.randint(vocab_size, (batch, length), generator=gen)
    z_t = torch.where(torch.rand(batch, length, generator=gen) < 0.5, x0,
                      torch.randint(vocab_size, (batch, length), generator=gen))
    rows = torch.rand(batch, length, generator=gen) < confident
    logits += 30.0 * rows[..., None] * torch.nn.functional.one_hot(x0, vocab_size)
    if neg_inf:
        hole = torch.rand(batch, length, vocab_size, generator=gen) < neg_inf
        hole[..., 0] = False
        logits = logits.masked_fill(hole, -math.inf)
    lo, hi = alpha_range
    alpha_t = lo + (hi - lo) * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    dalpha_t = -2.0 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    upstream = torch.randn(batch, length, generator=gen)
    # fp16 holds |x| <= 65504
    case = dict(logits=logits.clamp(-6e4, 6e4).to(dtype), z_t=z_t, x0=x0, alpha_t=alpha_t, dalpha_t=dalpha_t)
    return {k: v.to(device) for k, v in case.items()}, mask.to(device), upstream.to(device)


def oracle(logits, z_t, x0, alpha_t, dalpha_t, mask, upstream):
    """Float64 per-token loss (0 where masked) and d sum(upstream * loss) / d logits, from the reference's
    eq. (3.5) on the same logits values."""
    logits64 = logits.detach().cpu().double().requires_grad_()
    mask, z_t, x0 = mask.cpu(), z_t.cpu(), x0.cpu()
    alpha_t, dalpha_t = alpha_t.cpu().double(), dalpha_t.cpu().double()
    dropped = torch.where(mask[..., None], logits64, 0.0)
    loss = torch.where(mask, _usdm_nelbo_float64(dropped, z_t, x0, alpha_t, dalpha_t), 0.0)
    (grad,) = torch.autograd.grad(loss, logits64, upstream.cpu().double())
    return loss.detach(), grad


def loss_noise(vocab_size, alpha_t, dalpha_t):
    """One fp32 ulp of the largest terms of the fused form, per token."""
    k = float(vocab_size)
    alpha_t, dalpha_t = alpha_t.cpu().double(), dalpha_t.cpu().double()
    r = k * alpha_t / (1 - alpha_t)
    return dalpha_t.abs() / (k * alpha_t) * (k + 2 * r + 1) * (1 + torch.log1p(r)) * EPS32


def grad_noise(logits, z_t, x0, alpha_t, dalpha_t, upstream):
    """One fp32 ulp of the terms that the gradient (3.6) adds up in each row: |g coeff| (c2 max u +
    C max p + |s_i| + s_m), in the variables of duo_kernels.triton.nelbo; (B, L, 1)."""
    k = float(logits.shape[-1])
    p = torch.softmax(logits.detach().cpu().double(), -1)
    alpha_t, dalpha_t = alpha_t.cpu().double(), dalpha_t.cpu().double()
    z_t, x0 = z_t.cpu(), x0.cpu()
    r = k * alpha_t / (1 - alpha_t)
    coeff = dalpha_t / (k * alpha_t)
    ne = (z_t != x0).double()
    c2 = ne + (1 - ne) / (1 + r)
    t = r[..., None] * p
    u = t / (1 + t)
    t_i = t.gather(-1, z_t[..., None])[..., 0]
    u_m = u.gather(-1, x0[..., None])[..., 0]
    s_i = (t_i / (1 + t_i) * (k / ((1 - alpha_t) * (1 + t_i)) - c2 * k - ne * r)).abs()
    s_m = ne * r * u_m
    scale = c2 * u.amax(-1) + (c2 * u.sum(-1) + s_i + s_m) * p.amax(-1) + s_i + s_m
    return ((upstream.cpu().double() * coeff).abs() * scale * EPS32)[..., None]


def assert_loss_within_budget(loss, expected, vocab_size, alpha_t, dalpha_t, rtol=1e-5, noise=4.0):
    loss = loss.detach().cpu().double()
    budget = rtol * expected.abs() + noise * loss_noise(vocab_size, alpha_t, dalpha_t)
    err = (loss - expected).abs()
    assert torch.all(err <= budget), f"loss error {float((err / budget).max()):.3g} x budget"


def assert_grad_within_budget(grad, expected, case, mask, upstream, noise=32.0):
    dtype = grad.dtype
    grad = grad.detach().cpu().double()
    scale = grad_noise(case["logits"], case["z_t"], case["x0"], case["alpha_t"], case["dalpha_t"], upstream)
    budget = GRAD_RTOL[dtype] * expected.abs() + noise * scale + GRAD_ATOL.get(dtype, 0.0)
    err = (grad - expected).abs()
    assert torch.all(err <= budget), f"gradient error {float((err / budget).max()):.3g} x budget"
    assert torch.all(grad[~mask.cpu()] == 0)


def run(case, mask, upstream, impl, **kwargs):
    logits = case["logits"].clone().requires_grad_()
    loss = duo_kernels.usdm_nelbo(logits, case["z_t"], case["x0"], case["alpha_t"], case["dalpha_t"], mask=mask,
                                  impl=impl, **kwargs)
    loss.backward(upstream)
    return loss, logits.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(impl, dtype):
    """Loss and gradient, random upstream gradient, ~30% masked tokens, 20% near-zero-loss rows."""
    vocab_size = 37
    case, mask, upstream = make_case(0, 3, 7, vocab_size, dtype=dtype, confident=0.2, device=device_for(impl))
    loss, grad = run(case, mask, upstream, impl)
    assert loss.dtype == torch.float32 and loss.shape == (3, 7)
    assert grad.dtype == dtype and grad.shape == case["logits"].shape
    expected_loss, expected_grad = oracle(**case, mask=mask, upstream=upstream)
    assert_loss_within_budget(loss, expected_loss, vocab_size, case["alpha_t"], case["dalpha_t"])
    assert torch.all(loss[~mask] == 0)
    assert_grad_within_budget(grad, expected_grad, case, mask, upstream)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab_size, dtype", [(50258, torch.float32), (50258, torch.bfloat16),
                                               (151936, torch.float32)])
def test_large_vocab_accuracy(impl, vocab_size, dtype):
    """<= 1e-5 relative to float64 at large V, alpha from 1e-4 to 1 - 1e-4 (measured: <= 5e-7); gradient
    within budget."""
    gen = torch.Generator().manual_seed(vocab_size)
    alphas = torch.tensor([[1e-4, 0.5, 1 - 1e-4]], dtype=torch.float64)
    case, _, upstream = make_case(1, 1, 3, vocab_size, dtype=dtype, device=device_for(impl))
    case["alpha_t"] = alphas.to(case["alpha_t"].device)
    case["z_t"][0, 1] = case["x0"][0, 1]
    case["z_t"][0, 2] = (case["x0"][0, 2] + 1 + torch.randint(vocab_size - 1, (), generator=gen)) % vocab_size
    mask = torch.ones(1, 3, dtype=torch.bool, device=upstream.device)
    loss, grad = run(case, mask, upstream, impl)
    expected_loss, expected_grad = oracle(**case, mask=mask, upstream=upstream)
    rel = ((loss.detach().cpu().double() - expected_loss).abs() / expected_loss.abs()).max()
    assert rel <= 1e-5
    assert_grad_within_budget(grad, expected_grad, case, mask, upstream)


@given(seed=st.integers(0, 2**31), vocab_size=st.sampled_from([2, 37, 1000, 50258, 151936]),
       alpha=st.floats(1e-4, 1 - 1e-4), scale=st.sampled_from([0.0, 1.0, 5.0, 100.0, 1e4]),
       neg_inf=st.sampled_from([0.0, 0.3]), confident=st.sampled_from([0.0, 0.5]),
       dtype=st.sampled_from(DTYPES), impl=st.sampled_from(IMPLS))
def test_property_matches_reference(seed, vocab_size, alpha, scale, neg_inf, confident, dtype, impl):
    """Awkward V (1-2 rows at large V), alpha at the edges, logits up to 1e4, rows with -inf entries."""
    rows = 6 if vocab_size <= 1000 else 2
    case, mask, upstream = make_case(seed, 1, rows, vocab_size, dtype=dtype, scale=scale,
                                     alpha_range=(alpha, alpha), neg_inf=neg_inf, confident=confident,
                                     device=device_for(impl))
    loss, grad = run(case, mask, upstream, impl)
    expected_loss, expected_grad = oracle(**case, mask=mask, upstream=upstream)
    assert_loss_within_budget(loss, expected_loss, vocab_size, case["alpha_t"], case["dalpha_t"])
    assert_grad_within_budget(grad, expected_grad, case, mask, upstream)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the NaN rows
@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_logits_stay_in_their_row(impl):
    case, _, upstream = make_case(2, 2, 4, 9, device=device_for(impl))
    mask = torch.ones(2, 4, dtype=torch.bool, device=upstream.device)
    clean_loss, clean_grad = run(case, mask, upstream, impl)
    case["logits"][0, 1, 3] = math.nan
    case["logits"][1, 2, 0] = math.inf
    case["logits"][1, 3, 5] = -math.inf  # a zero probability: finite
    loss, grad = run(case, mask, upstream, impl)
    bad = torch.zeros(2, 4, dtype=torch.bool, device=upstream.device)
    bad[0, 1] = bad[1, 2] = True
    assert torch.all(torch.isnan(loss[bad])) and torch.all(torch.isnan(grad[bad]))
    keep = ~bad
    assert torch.all(torch.isfinite(loss[keep])) and torch.all(torch.isfinite(grad[keep]))
    keep[1, 3] = False
    assert torch.equal(loss[keep], clean_loss[keep]) and torch.equal(grad[keep], clean_grad[keep])


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_non_finite_rows_give_exact_zeros(impl):
    case, _, upstream = make_case(3, 2, 3, 7, device=device_for(impl))
    case["logits"][0, 2] = math.nan
    case["logits"][1, 0, 4] = math.inf
    case["logits"][1, 1] = -math.inf
    mask = torch.ones(2, 3, dtype=torch.bool, device=upstream.device)
    mask[0, 2] = mask[1, 0] = mask[1, 1] = False
    loss, grad = run(case, mask, upstream, impl)
    assert torch.all(loss[~mask] == 0) and torch.all(grad[~mask] == 0)
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(grad))
    total = duo_kernels.usdm_nelbo(case["logits"], case["z_t"], case["x0"], case["alpha_t"], case["dalpha_t"],
                                   reduction="sum", mask=mask, impl=impl)
    assert torch.isfinite(total)


def test_reductions_and_weights():
    """Reductions are backend-independent PyTorch on the op's per-token loss: checked on "cpu"; "triton"
    once, with float weights."""
    case, mask, _ = make_case(4, 3, 4, 11)
    weights = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) * mask
    for reduction in ("none", "sum", "mean"):
        for m in (None, mask, weights):
            got = duo_kernels.usdm_nelbo(**case, reduction=reduction, mask=m, impl="cpu")
            expected = reference_usdm_nelbo(**case, reduction=reduction, mask=m)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    nothing = duo_kernels.usdm_nelbo(**case, reduction="mean", mask=torch.zeros_like(mask), impl="cpu")
    assert torch.isnan(nothing)
    device = device_for("triton")
    got = duo_kernels.usdm_nelbo(**{k: v.to(device) for k, v in case.items()}, reduction="mean",
                                 mask=weights.to(device), impl="triton")
    torch.testing.assert_close(got.cpu(), reference_usdm_nelbo(**case, reduction="mean", mask=weights), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_shapes(impl):
    device = device_for(impl)
    case, _, _ = make_case(6, 2, 3, 8, device=device)
    del case["alpha_t"], case["dalpha_t"]
    per_sequence = torch.tensor([0.3, 0.7], dtype=torch.float64, device=device)
    expected = duo_kernels.usdm_nelbo(**case, alpha_t=per_sequence[:, None].expand(2, 3), dalpha_t=-1.0, impl=impl)
    for alpha_t in (per_sequence, per_sequence[:, None], per_sequence.float()):
        got = duo_kernels.usdm_nelbo(**case, alpha_t=alpha_t, dalpha_t=torch.tensor([-1.0, -1.0], device=device),
                                     impl=impl)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    number = duo_kernels.usdm_nelbo(**case, alpha_t=0.3, dalpha_t=-1.0, impl=impl)
    torch.testing.assert_close(number, duo_kernels.usdm_nelbo(**case, alpha_t=torch.full((2, 3), 0.3, device=device),
                                                              dalpha_t=-1.0, impl=impl), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits_and_untouched_inputs(impl):
    """(L, B, V).transpose(0, 1) does not flatten to rows; a V-strided view is copied once; the inputs
    are never written."""
    case, mask, upstream = make_case(7, 2, 3, 13, device=device_for(impl))
    expected_loss, expected_grad = run(case, mask, upstream, impl)
    for logits in (case["logits"].transpose(0, 1).contiguous().transpose(0, 1),
                   case["logits"].transpose(1, 2).contiguous().transpose(1, 2)):
        before = logits.clone()
        loss, grad = run({**case, "logits": logits}, mask, upstream, impl)
        assert torch.equal(logits, before)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def test_cpu_chunks_bound_memory(monkeypatch):
    """The cpu path works on at most CPU_CHUNK_ELEMENTS logits at a time: several chunks, same result."""
    case, mask, upstream = make_case(8, 2, 16, 37)
    expected = run(case, mask, upstream, "cpu")
    monkeypatch.setattr(nelbo_ops.row_chunks, "__defaults__", (3 * 37,))
    assert len(nelbo_ops.row_chunks(32, 37)) == 11
    for got, want in zip(run(case, mask, upstream, "cpu"), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_reference_impl_is_the_reference():
    case, mask, _ = make_case(9, 2, 3, 10)
    torch.testing.assert_close(duo_kernels.usdm_nelbo(**case, mask=mask, impl="reference"),
                               reference_usdm_nelbo(**case, mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, value, match", BAD_ARGUMENTS)
def test_bad_arguments(impl, name, value, match):
    args = good_args()
    args[name] = value
    with pytest.raises(ValueError, match=match):
        duo_kernels.usdm_nelbo(**args, impl=impl)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.full((2, 3), -1.0)), ValueError, "mask"),
    (dict(impl="fast"), ValueError, "impl"),
    (dict(impl="cuda"), NotImplementedError, "no 'cuda' kernel"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        duo_kernels.usdm_nelbo(**good_args(), **{"impl": "cpu", **kwargs})


def test_torch_compile_fullgraph():
    case, mask, upstream = make_case(10, 2, 4, 37)

    def loss_fn(logits, alpha_t):
        return duo_kernels.usdm_nelbo(logits, case["z_t"], case["x0"], alpha_t, -1.0, mask=mask, reduction="sum",
                                      impl="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    alpha_t = torch.tensor([0.2, 0.6])
    logits = case["logits"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(compiled(logits, alpha_t), logits)
    (expected,) = torch.autograd.grad(loss_fn(logits, alpha_t), logits)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    case, mask, _ = make_case(11, 1, 3, 9, device=device_for(impl))
    args = (case["logits"].requires_grad_(), case["z_t"], case["x0"], case["alpha_t"], case["dalpha_t"])
    torch.library.opcheck(torch.ops.duo_kernels.usdm_nelbo.default, (*args, mask, impl))
    torch.library.opcheck(torch.ops.duo_kernels.usdm_nelbo.default, (*args, None, impl))


def test_checkpoint_and_accumulation():
    """Activation checkpointing recomputes the op; two backward passes accumulate."""
    case, mask, upstream = make_case(12, 2, 3, 17)
    logits = case["logits"].clone().requires_grad_()

    def loss_fn(x):
        return duo_kernels.usdm_nelbo(x * 1.0, case["z_t"], case["x0"], case["alpha_t"], case["dalpha_t"], mask=mask,
                                      impl="cpu")

    torch.utils.checkpoint.checkpoint(loss_fn, logits, use_reentrant=False).backward(upstream)
    once = logits.grad.clone()
    loss_fn(logits).backward(upstream)
    torch.testing.assert_close(logits.grad, 2 * once, rtol=1e-6, atol=0)
