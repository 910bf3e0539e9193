"""linear_usdm_nelbo: the output projection fused with the NELBO, on the fused backends.

Truth is float64 throughout (``F.linear`` and eq. 3.5 in float64 from the same parameter values). The
budget (ARCHITECTURE.md) is twice the error of the reference run in the inputs' precision, i.e.
logits-then-loss: ``F.linear`` in that dtype, the reference loss, autograd back through ``F.linear``,
plus fp32-math noise (1e-5 of the largest value, or the loss budget of tests/ops/test_nelbo.py).
"""

import pytest
import torch
import torch.nn.functional as F

import duo_kernels
from duo_kernels.ops import nelbo as nelbo_ops
from duo_kernels.reference.nelbo import _usdm_nelbo_float64
from duo_kernels.reference.nelbo import usdm_nelbo as reference_usdm_nelbo
from tests.devices import device_for
from tests.ops.test_nelbo import loss_noise



def make_case(seed, batch, length, dim, vocab_size, *, dtype=torch.float32, bias=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen)
    weight = torch.randn(vocab_size, dim, generator=gen) / dim**0.5 * 3
    b = torch.randn(vocab_size, generator=gen) if bias else None
    x0 = torch.randint(vocab_size, (batch, length), generator=gen)
    z_t = torch.where(torch.rand(batch, length, generator=gen) < 0.5, x0,
                      torch.randint(vocab_size, (batch, length), generator=gen))
    alpha_t = 0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=torch.float64)
    dalpha_t = -2.0 * torch.rand(batch, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    upstream = torch.randn(batch, length, generator=gen)
    params = [t if t is None else t.to(dtype).to(device) for t in (hidden, weight, b)]
    rest = dict(z_t=z_t.to(device), x0=x0.to(device), alpha_t=alpha_t.to(device), dalpha_t=dalpha_t.to(device))
    return params, rest, mask.to(device), upstream.to(device)


def loss_and_grads(fn, params, rest, mask, upstream, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in params]
    loss = fn(*leaves, **rest, mask=mask, **kwargs)
    loss.backward(upstream)
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def float64_truth(params, rest, mask, upstream):
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in params]
    shape = mask.shape
    alpha = rest["alpha_t"].cpu().double()[:, None].expand(shape)
    dalpha = rest["dalpha_t"].cpu().double()[:, None].expand(shape)
    logits = torch.where(mask.cpu()[..., None], F.linear(*leaves), 0.0)
    loss = torch.where(mask.cpu(), _usdm_nelbo_float64(logits, rest["z_t"].cpu(), rest["x0"].cpu(), alpha, dalpha), 0.0)
    loss.backward(upstream.cpu().double())
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def logits_then_loss(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, *, mask):
    return reference_usdm_nelbo(F.linear(hidden, weight, bias), z_t, x0, alpha_t, dalpha_t, mask=mask)


def max_err(a, b):
    return float((a.detach().cpu().double() - b).abs().max())


@pytest.mark.parametrize("impl, dtype, bias", [
    ("cpu", torch.float32, True), ("cpu", torch.float32, False), ("cpu", torch.bfloat16, True),
    ("cpu", torch.bfloat16, False), ("triton", torch.float32, False), ("triton", torch.bfloat16, True),
])
def test_matches_float64_truth(impl, dtype, bias, monkeypatch):
    """Loss and the gradients of hidden, weight and bias over several token chunks (4 for the
    interpreted Triton kernels, each launch of which costs ~0.2 s; 20 of 2 tokens on cpu)."""
    if impl == "triton":
        monkeypatch.setattr(nelbo_ops, "LINEAR_MIN_CHUNKS", 4)
    params, rest, mask, upstream = make_case(0, 2, 20, 16, 37, dtype=dtype, bias=bias, device=device_for(impl))
    loss, grads = loss_and_grads(duo_kernels.linear_usdm_nelbo, params, rest, mask, upstream, impl=impl)
    assert loss.dtype == torch.float32 and loss.shape == (2, 20)
    assert all(g is None or g.dtype == dtype for g in grads)
    assert torch.all(loss[~mask] == 0)
    ref_loss, ref_grads = loss_and_grads(logits_then_loss, params, rest, mask, upstream)
    true_loss, true_grads = float64_truth(params, rest, mask, upstream)
    alpha = rest["alpha_t"][:, None].expand(mask.shape)
    dalpha = rest["dalpha_t"][:, None].expand(mask.shape)
    assert max_err(loss, true_loss) <= 2 * max_err(ref_loss, true_loss) + 4 * float(loss_noise(37, alpha, dalpha).max())
    for name, got, ref, true in zip(("hidden", "weight", "bias"), grads, ref_grads, true_grads):
        if true is None:
            assert got is None
            continue
        budget = 2 * max_err(ref, true) + 1e-5 * float(true.abs().max())
        assert max_err(got, true) <= budget, name


def test_frozen_head_and_no_hidden_grad():
    params, rest, mask, upstream = make_case(1, 2, 16, 8, 37)
    hidden = params[0].clone().requires_grad_()
    weight, bias = params[1], params[2].clone().requires_grad_()
    duo_kernels.linear_usdm_nelbo(hidden, weight, bias, **rest, mask=mask, impl="cpu").backward(upstream)
    _, (d_hidden, _, d_bias) = loss_and_grads(duo_kernels.linear_usdm_nelbo, params, rest, mask, upstream, impl="cpu")
    torch.testing.assert_close(hidden.grad, d_hidden, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias.grad, d_bias, rtol=1e-6, atol=1e-7)
    assert weight.grad is None


def test_logits_never_materialized(monkeypatch):
    """Every projection the op runs covers at most 1/10 of the tokens (1/16 by the chunk rule), in the
    forward and in the backward's recomputation (the chunk loop is the same for every backend); at the
    paper's shape, a chunk holds at most 2^26 logits (1/25 of B·L·V)."""
    params, rest, mask, upstream = make_case(2, 4, 40, 8, 37)
    rows = []
    linear = F.linear

    def spy(x, w, b=None):
        rows.append(x.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(nelbo_ops.F, "linear", spy)
    loss_and_grads(duo_kernels.linear_usdm_nelbo, params, rest, mask, upstream, impl="cpu")
    n = mask.numel()
    assert rows and max(rows) * 10 <= n and sum(rows) == 2 * n
    paper_tokens, paper_vocab = 32 * 1024, 50257
    chunk = nelbo_ops.linear_chunk_rows(paper_tokens, paper_vocab)
    assert chunk * paper_vocab * 16 <= paper_tokens * paper_vocab and chunk * paper_vocab <= 2**26


def test_autocast_casts_the_projection():
    params, rest, mask, upstream = make_case(3, 2, 16, 8, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = duo_kernels.linear_usdm_nelbo(*params, **rest, mask=mask, impl="cpu")
    expected = duo_kernels.linear_usdm_nelbo(*(t.bfloat16() for t in params), **rest, mask=mask, impl="cpu")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_reference_impl_is_logits_then_loss():
    params, rest, mask, _ = make_case(4, 2, 3, 8, 11)
    torch.testing.assert_close(duo_kernels.linear_usdm_nelbo(*params, **rest, mask=mask, impl="reference"),
                               logits_then_loss(*params, **rest, mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("change, match", [
    (lambda p: (p[0].double(), p[1], p[2]), "weight must have dtype"),
    (lambda p: (p[0], p[1][:, :4], p[2]), "weight must have shape"),
    (lambda p: (p[0], p[1][:1], p[2][:1]), "at least 2 rows"),
    (lambda p: (p[0], p[1], p[2][:5]), "bias must have shape"),
    (lambda p: (p[0][0], p[1], p[2]), "hidden must have 3 dimensions"),
])
def test_bad_arguments(change, match):
    params, rest, _, _ = make_case(5, 2, 3, 8, 11)
    with pytest.raises(ValueError, match=match):
        duo_kernels.linear_usdm_nelbo(*change(params), **rest, impl="cpu")
    rest["x0"] = torch.full((2, 3), 11)
    with pytest.raises(ValueError, match="x0"):
        duo_kernels.linear_usdm_nelbo(*params, **rest, impl="cpu")


def test_torch_compile_fullgraph():
    params, rest, mask, upstream = make_case(6, 2, 16, 8, 37)

    def loss_fn(hidden, weight, bias):
        return duo_kernels.linear_usdm_nelbo(hidden, weight, bias, **rest, mask=mask, reduction="mean", impl="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in params]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss_fn(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    params, rest, mask, _ = make_case(7, 1, 16, 4, 9, bias=bias)
    hidden, weight, b = (None if t is None else t.requires_grad_() for t in params)
    shape = mask.shape
    alpha = rest["alpha_t"][:, None].expand(shape).contiguous()
    dalpha = rest["dalpha_t"][:, None].expand(shape).contiguous()
    torch.library.opcheck(torch.ops.duo_kernels.linear_usdm_nelbo.default,
                          (hidden, weight, b, rest["z_t"], rest["x0"], alpha, dalpha, mask, "cpu"))
