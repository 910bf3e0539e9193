"""relaxed_embedding and tempered_softmax_topk_embedding against the reference: outputs and every
gradient (random upstream gradient, 30% of tokens masked), determinism, dtypes, bad inputs."""

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import duo_kernels
from duo_kernels import reference
from duo_kernels.ops import embedding
from tests.budget import assert_within_budget
from tests.devices import device_for

IMPLS = ["cpu", "triton"]


def _inputs(b, l, k, vocab, d, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=gen)
    ids = torch.randint(0, vocab, (b, l, k), generator=gen)
    weights = torch.rand(b, l, k, generator=gen)
    upstream = torch.randn(b, l, d, generator=gen)
    upstream[torch.rand(b, l, generator=gen) < 0.3] = 0  # masked tokens
    return [t.to(device) for t in (weight, ids, weights, upstream)]


def _run(fn, weight, ids, weights, upstream):
    weight = weight.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    h = fn(weight, ids, weights)
    h.backward(upstream)
    return h.detach(), weight.grad, weights.grad


def _check_against_reference(weight, ids, weights, upstream, **op_kwargs):
    got = _run(lambda e, i, w: duo_kernels.relaxed_embedding(e, i, w, **op_kwargs), weight, ids, weights, upstream)
    cpu = [t.cpu() for t in (weight, ids, weights, upstream)]
    weight, ids, weights, upstream = cpu
    exact = _run(reference.relaxed_embedding, weight.double(), ids, weights.double(), upstream.double())
    low = _run(reference.relaxed_embedding, weight.float(), ids, weights.float(), upstream.float())
    magnitude = _run(reference.relaxed_embedding, weight.double().abs(), ids, weights.double().abs(),
                     upstream.double().abs())
    for name, g, lo, ex, mag in zip(("h", "dE", "dweights"), got, low, exact, magnitude):
        assert g.dtype == torch.float32, name
        assert_within_budget(name, g.cpu(), lo, ex, mag)
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference_with_masked_gradient(impl, deterministic):
    shape = (2, 3, 4, 37, 20) if impl == "triton" else (4, 16, 16, 1000, 64)
    _check_against_reference(*_inputs(*shape, seed=1, device=device_for(impl)), deterministic=deterministic,
                             impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_one_token(impl, deterministic):
    weight, ids, weights, upstream = _inputs(1, 1, 1, 2, 3, seed=10, device=device_for(impl))
    _check_against_reference(weight, ids, weights, upstream + 1, deterministic=deterministic, impl=impl)


@given(vocab=st.sampled_from([2, 37, 1000]), b=st.integers(1, 3), l=st.integers(1, 5), k=st.integers(1, 4),
       d=st.sampled_from([1, 3, 16, 33]), deterministic=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_property(vocab, b, l, k, d, deterministic, seed):
    _check_against_reference(*_inputs(b, l, k, vocab, d, seed), deterministic=deterministic, impl="cpu")


@settings(max_examples=6)  # the interpreter runs ~1 ms per program: V <= 300 (one program per row of dE)
@given(vocab=st.sampled_from([2, 37, 300]), l=st.integers(1, 4), k=st.sampled_from([1, 3]),
       d=st.sampled_from([1, 20]), deterministic=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_property(vocab, l, k, d, deterministic, seed):
    _check_against_reference(*_inputs(1, l, k, vocab, d, seed, device=device_for("triton")),
                             deterministic=deterministic, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_gradient_is_bitwise_reproducible(impl):
    # V = 2: every row of dE sums ~half of the 4 * 8 * 4 slots
    weight, ids, weights, upstream = _inputs(4, 8, 4, 2, 40, seed=3, device=device_for(impl))
    runs = [_run(lambda e, i, w: duo_kernels.relaxed_embedding(e, i, w, deterministic=True, impl=impl),
                 weight, ids, weights, upstream) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    fast = _run(lambda e, i, w: duo_kernels.relaxed_embedding(e, i, w, impl=impl), weight, ids, weights, upstream)
    torch.testing.assert_close(fast[1], runs[0][1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_weight(impl):
    weight, ids, weights, upstream = _inputs(2, 3, 4, 37, 20, seed=4, device=device_for(impl))
    weight = weight.to(torch.bfloat16)
    h, d_weight, d_weights = _run(lambda e, i, w: duo_kernels.relaxed_embedding(e, i, w, impl=impl),
                                  weight, ids, weights, upstream)
    ref = _run(reference.relaxed_embedding, weight.cpu(), ids.cpu(), weights.cpu(), upstream.cpu())
    assert h.dtype == torch.float32 and d_weight.dtype == torch.bfloat16 and d_weights.dtype == torch.float32
    torch.testing.assert_close(h.cpu(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_weight.cpu(), ref[1])
    torch.testing.assert_close(d_weights.cpu(), ref[2], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64(impl):
    weight, ids, weights, upstream = [t.double() if t.is_floating_point() else t
                                      for t in _inputs(2, 3, 4, 37, 20, seed=5, device=device_for(impl))]
    got = _run(lambda e, i, w: duo_kernels.relaxed_embedding(e, i, w, impl=impl), weight, ids, weights, upstream)
    ref = _run(reference.relaxed_embedding, weight.cpu(), ids.cpu(), weights.cpu(), upstream.cpu())
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12)


def test_auto_runs_the_cpu_path_on_cpu(recwarn):
    weight, ids, weights, _ = _inputs(1, 2, 3, 37, 8, seed=6)
    h = duo_kernels.relaxed_embedding(weight, ids, weights)
    assert torch.equal(h, duo_kernels.relaxed_embedding(weight, ids, weights, impl="cpu"))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def _bad_relaxed_inputs():
    weight, ids, weights, _ = _inputs(1, 2, 3, 37, 8, seed=7)
    return [
        ("ids", dict(ids=ids.clone().fill_(37))),
        ("ids", dict(ids=ids.clone().fill_(-1))),
        ("ids", dict(ids=ids.to(torch.int32))),
        ("ids", dict(ids=ids[..., :0], weights=weights[..., :0])),
        ("weights", dict(weights=weights[..., :2])),
        ("weights", dict(weights=weights.to(torch.int64))),
        ("weight", dict(weight=weight[0])),
        ("weight", dict(weight=weight[:1])),
        ("device", dict(weight=weight.to("meta"))),
        ("deterministic", dict(deterministic=1)),
        ("impl", dict(impl="gpu")),
    ], dict(weight=weight, ids=ids, weights=weights)


@pytest.mark.parametrize("case", range(11))
def test_bad_inputs_name_the_argument(case):
    cases, good = _bad_relaxed_inputs()
    word, change = cases[case]
    kwargs = {**good, **change}
    with pytest.raises(ValueError, match=word):
        duo_kernels.relaxed_embedding(kwargs.pop("weight"), kwargs.pop("ids"), kwargs.pop("weights"), **kwargs)


# ---- tempered_softmax_topk_embedding -------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reference_compat", [False, True])
def test_topk_embedding_is_the_sampler_then_the_embedding(impl, reference_compat):
    device = device_for(impl)
    vocab, d = 300, 16
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(vocab, d, generator=gen)
    x0 = torch.randint(0, vocab, (2, 4), generator=gen)
    gamma = torch.tensor([-3.0, -1.0])
    upstream = torch.randn(2, 4, d, generator=gen)
    upstream[torch.rand(2, 4, generator=gen) < 0.3] = 0
    e = weight.clone().to(device).requires_grad_()
    h, z_t = duo_kernels.tempered_softmax_topk_embedding(x0.to(device), gamma.to(device), vocab, 3, 1e-2, e,
                                                         reference_compat=reference_compat, seed=11, impl=impl)
    h.backward(upstream.to(device))
    ids, weights, ref_z = reference.tempered_softmax_topk(x0, gamma, vocab, 3, 1e-2,
                                                          reference_compat=reference_compat, seed=11)
    e_ref = weight.clone().requires_grad_()
    ref_h = reference.relaxed_embedding(e_ref, ids, weights)
    ref_h.backward(upstream)
    assert torch.equal(z_t.cpu(), ref_z)
    torch.testing.assert_close(h.detach().cpu(), ref_h.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e.grad.cpu(), e_ref.grad, rtol=1e-6, atol=1e-6)


def test_topk_embedding_draws_its_seed_from_the_generator():
    weight = torch.randn(50, 4)
    x0 = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    h, z_t = duo_kernels.tempered_softmax_topk_embedding(x0, -2.0, 50, 2, 1e-3, weight)
    torch.manual_seed(0)
    ids, weights, ref_z = reference.tempered_softmax_topk(x0, -2.0, 50, 2, 1e-3)
    assert torch.equal(z_t, ref_z)
    torch.testing.assert_close(h, reference.relaxed_embedding(weight, ids, weights))


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_embedding_torch_compile_fullgraph(impl):
    """One compiled graph (the sampler op, the embedding and its backward) gives eager's h, z_t and dE."""
    device = device_for(impl)
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(37, 8, generator=gen).to(device).requires_grad_()
    x0, gamma = torch.randint(0, 37, (2, 3), generator=gen).to(device), torch.tensor([-3.0, -1.0], device=device)
    upstream = torch.randn(2, 3, 8, generator=gen).to(device)

    def embed(x0, gamma, weight, seed):
        return duo_kernels.tempered_softmax_topk_embedding(x0, gamma, 37, 3, 1e-2, weight, seed=seed, impl=impl)

    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    outputs = []
    for fn in (compiled, embed):
        h, z_t = fn(x0, gamma, weight, 2**64 - 3)
        outputs.append((h, z_t, *torch.autograd.grad(h, weight, upstream)))
    for got, want in zip(*outputs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("word,change", [
    ("weight", dict(weight=torch.randn(49, 4))),
    ("device", dict(weight=torch.randn(50, 4, device="meta"))),
    ("tau", dict(tau=0.0)),
    ("tau", dict(tau=-1e-3)),
    ("k", dict(k=50)),
    ("x0", dict(x0=torch.tensor([[50]]))),
    ("vocab_size", dict(vocab_size=1)),
])
def test_topk_embedding_bad_inputs(word, change):
    kwargs = dict(x0=torch.tensor([[1, 2]]), gamma=-2.0, vocab_size=50, k=2, tau=1e-3, weight=torch.randn(50, 4),
                  seed=0)
    kwargs.update(change)
    with pytest.raises(ValueError, match=word):
        duo_kernels.tempered_softmax_topk_embedding(**kwargs)


def test_docstring_examples():
    result = doctest.testmod(embedding, extraglobs={"torch": torch},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_triton_launches_are_registered_custom_ops():
    """torch.library registration: schema, fake (meta) implementation and AOT dispatch agree."""
    weight, ids, weights, upstream = _inputs(2, 3, 4, 37, 20, seed=12, device=device_for("triton"))
    ids, weights, upstream = ids.view(6, 4), weights.view(6, 4), upstream.view(6, 20)
    torch.library.opcheck(embedding._relaxed_forward_op, (weight, ids, weights))
    for need_weight, need_weights, deterministic in [(True, True, False), (True, False, True), (False, True, False)]:
        torch.library.opcheck(embedding._relaxed_backward_op,
                              (upstream, weight, ids, weights, need_weight, need_weights, deterministic))
