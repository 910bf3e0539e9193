"""tempered_softmax_embedding (Duo's dense curriculum) against the reference: the same z_t for the same
seed, h_0 and dE within the error budget (random upstream gradient, 30% of tokens masked), bounded
memory, determinism, bad inputs."""

import math

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
# The Triton interpreter runs ~1 ms per program step: keep its shapes tiny (B L <= 8, V <= 300, d <= 32).
TRITON_SHAPE = dict(b=2, l=3, vocab=300, d=20)
CPU_SHAPE = dict(b=2, l=12, vocab=1000, d=48)


def _inputs(b, l, vocab, d, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=gen) / math.sqrt(d)
    x0 = torch.randint(0, vocab, (b, l), generator=gen)
    upstream = torch.randn(b, l, d, generator=gen)
    upstream[torch.rand(b, l, generator=gen) < 0.3] = 0  # masked tokens
    return weight, x0, upstream


def _run(fn, weight, upstream):
    weight = weight.detach().clone().requires_grad_()
    h, z_t = fn(weight)
    h.backward(upstream)
    return h.detach(), z_t, weight.grad


def _check_against_reference(weight, x0, upstream, gamma, tau, seed, impl):
    device = device_for(impl)
    g_dev = gamma.to(device) if isinstance(gamma, torch.Tensor) else gamma
    h, z_t, d_weight = _run(lambda e: duo_kernels.tempered_softmax_embedding(x0.to(device), g_dev, tau, e, seed=seed,
                                                                             impl=impl),
                            weight.to(device), upstream.to(device))

    def ref(e):
        return reference.tempered_softmax_embedding(x0, gamma, tau, e, seed=seed)

    exact = _run(ref, weight.double(), upstream.double())
    low = _run(ref, weight.float(), upstream.float())
    magnitude = _run(ref, weight.double().abs(), upstream.double().abs())
    assert z_t.dtype == torch.int64 and torch.equal(z_t.cpu(), exact[1])
    assert h.dtype == d_weight.dtype == torch.float32
    assert_within_budget("h", h.cpu(), low[0], exact[0], magnitude[0])
    assert_within_budget("dE", d_weight.cpu(), low[2], exact[2], magnitude[2])
    return h, z_t, d_weight


@pytest.mark.parametrize("tau", [1e-4, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_with_masked_gradient(impl, tau):
    shape = TRITON_SHAPE if impl == "triton" else CPU_SHAPE
    weight, x0, upstream = _inputs(**shape, seed=1)
    gamma = torch.linspace(-3.55, -1.85, shape["b"])  # the OWT window, one gamma per sequence
    _check_against_reference(weight, x0, upstream, gamma, tau, seed=7, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_gamma_per_token(impl):
    # gamma = -40: s~ ~ 1e-9, the clean token always wins; gamma = 30: a~ ~ 3e-7, pure noise;
    # gamma = -1500: s~ underflows to 0 (a one-hot latent)
    weight, x0, upstream = _inputs(b=2, l=3, vocab=37, d=8, seed=2)
    gamma = torch.tensor([[-40.0, 30.0, 0.0], [-1500.0, -3.0, 5.0]])
    _check_against_reference(weight, x0, upstream, gamma, 1e-3, seed=3, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [2, 37])
def test_one_token(impl, vocab):
    weight, x0, upstream = _inputs(b=1, l=1, vocab=vocab, d=3, seed=vocab)
    _check_against_reference(weight, x0, upstream + 1, -1.0, 0.3, seed=9, impl=impl)


@given(vocab=st.sampled_from([2, 37, 1000]), b=st.integers(1, 3), l=st.integers(1, 6), d=st.sampled_from([1, 5, 16]),
       log_tau=st.floats(-4, 1), gamma=st.floats(-8, 8), seed=st.integers(0, 2**64 - 1))
def test_cpu_property(vocab, b, l, d, log_tau, gamma, seed):
    weight, x0, upstream = _inputs(b, l, vocab, d, seed % 2**32)
    _check_against_reference(weight, x0, upstream, gamma, 10.0**log_tau, seed, impl="cpu")


@settings(max_examples=6)
@given(vocab=st.sampled_from([2, 37, 300]), l=st.integers(1, 8), d=st.sampled_from([1, 32]),
       log_tau=st.floats(-4, 1), gamma=st.floats(-6, 6), seed=st.integers(0, 2**64 - 1))
def test_triton_property(vocab, l, d, log_tau, gamma, seed):
    weight, x0, upstream = _inputs(1, l, vocab, d, seed % 2**32)
    _check_against_reference(weight, x0, upstream, gamma, 10.0**log_tau, seed, impl="triton")


def test_cpu_path_in_several_chunks(monkeypatch):
    monkeypatch.setattr(embedding, "_CPU_CHUNK", 4 * 3 * 37)  # 3 tokens a chunk
    weight, x0, upstream = _inputs(b=2, l=5, vocab=37, d=8, seed=4)
    _check_against_reference(weight, x0, upstream, -2.5, 0.05, seed=5, impl="cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_saves_o_of_tokens_for_backward(impl):
    """Nothing of size B L V is kept for backward: only per-token statistics (and ids)."""
    device = device_for(impl)
    weight, x0, _ = _inputs(**TRITON_SHAPE, seed=6)
    weight = weight.to(device).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        duo_kernels.tempered_softmax_embedding(x0.to(device), -3.0, 1e-3, weight, seed=0, impl=impl)
    assert sum(saved) <= 5 * x0.numel()


def test_triton_gradient_is_bitwise_reproducible():
    device = device_for("triton")
    weight, x0, upstream = _inputs(**TRITON_SHAPE, seed=8)
    runs = [_run(lambda e: duo_kernels.tempered_softmax_embedding(x0.to(device), -2.0, 1e-2, e, seed=1,
                                                                  impl="triton"),
                 weight.to(device), upstream.to(device)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bfloat16_weight_on_triton():
    device = device_for("triton")
    weight, x0, upstream = _inputs(b=1, l=4, vocab=37, d=16, seed=9)
    weight = weight.to(torch.bfloat16)
    h, z_t, d_weight = _run(lambda e: duo_kernels.tempered_softmax_embedding(x0.to(device), -3.0, 1e-3, e, seed=2,
                                                                             impl="triton"),
                            weight.to(device), upstream.to(device))
    ref = _run(lambda e: reference.tempered_softmax_embedding(x0, -3.0, 1e-3, e, seed=2), weight, upstream)
    assert h.dtype == torch.float32 and d_weight.dtype == torch.bfloat16
    assert torch.equal(z_t.cpu(), ref[1])
    torch.testing.assert_close(h.cpu(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_weight.cpu(), ref[2])


def test_float64_weight():
    weight, x0, upstream = _inputs(b=1, l=4, vocab=37, d=8, seed=10)
    weight = weight.double()
    got = _run(lambda e: duo_kernels.tempered_softmax_embedding(x0, -3.0, 1e-2, e, seed=3), weight, upstream.double())
    ref = _run(lambda e: reference.tempered_softmax_embedding(x0, -3.0, 1e-2, e, seed=3), weight, upstream.double())
    assert got[0].dtype == got[2].dtype == torch.float64
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="float64"):
        duo_kernels.tempered_softmax_embedding(x0, -3.0, 1e-2, weight, seed=3, impl="triton")


def test_seed_from_the_generator():
    weight, x0, _ = _inputs(b=1, l=4, vocab=37, d=8, seed=11)
    torch.manual_seed(5)
    h, z_t = duo_kernels.tempered_softmax_embedding(x0, -3.0, 1e-3, weight)
    torch.manual_seed(5)
    ref_h, ref_z = reference.tempered_softmax_embedding(x0, -3.0, 1e-3, weight)
    assert torch.equal(z_t, ref_z)
    torch.testing.assert_close(h, ref_h)
    gen = torch.Generator().manual_seed(6)
    h, z_t = duo_kernels.tempered_softmax_embedding(x0, -3.0, 1e-3, weight, generator=gen)
    ref_h, ref_z = reference.tempered_softmax_embedding(x0, -3.0, 1e-3, weight,
                                                        generator=torch.Generator().manual_seed(6))
    assert torch.equal(z_t, ref_z)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("word,change", [
    ("tau", dict(tau=0.0)),
    ("tau", dict(tau=-1.0)),
    ("tau", dict(tau=math.nan)),
    ("tau", dict(tau=math.inf)),
    ("x0", dict(x0=torch.tensor([[1, 37]]))),
    ("x0", dict(x0=torch.tensor([[1.0, 2.0]]))),
    ("weight", dict(weight=torch.randn(37))),
    ("weight", dict(weight=torch.randn(1, 4))),
    ("device", dict(weight=torch.randn(37, 4, device="meta"))),
    ("gamma", dict(gamma=math.nan)),
    ("gamma", dict(gamma=torch.zeros(3))),
    ("seed", dict(seed=-1)),
])
def test_bad_inputs_name_the_argument(impl, word, change):
    kwargs = dict(x0=torch.tensor([[1, 2]]), gamma=-2.0, tau=1e-3, weight=torch.randn(37, 4), seed=0)
    kwargs.update(change)
    with pytest.raises(ValueError, match=word):
        duo_kernels.tempered_softmax_embedding(**kwargs, impl=impl)


def test_triton_launches_are_registered_custom_ops():
    """torch.library registration: schema, fake (meta) implementation and AOT dispatch agree; seeds of
    2^63 and above travel through the int64 schema as their two's-complement bits."""
    device = device_for("triton")
    weight, x0, upstream = _inputs(b=1, l=6, vocab=37, d=8, seed=13)
    x, weight, upstream = x0.view(-1).to(device), weight.to(device), upstream.view(6, 8).to(device)
    a_tilde, s_tilde = reference.gaussian_params(torch.full((6,), -2.0, dtype=torch.float64, device=device))
    torch.library.opcheck(embedding._dense_forward_op, (x, a_tilde, s_tilde, weight, 0.1, -5))
    _, _, c, stats = embedding._dense_forward_op(x, a_tilde, s_tilde, weight, 0.1, -5)
    torch.library.opcheck(embedding._dense_backward_op, (upstream, x, c, stats, 37, -5))
    h, z_t = duo_kernels.tempered_softmax_embedding(x.view(1, 6), -2.0, 0.1, weight, seed=2**64 - 5, impl="triton")
    ref_h, ref_z = reference.tempered_softmax_embedding(x0, -2.0, 0.1, weight.cpu(), seed=2**64 - 5)
    assert torch.equal(z_t.cpu(), ref_z)
    torch.testing.assert_close(h.cpu(), ref_h, rtol=1e-6, atol=1e-6)


WIDE_STRIDE_CHECK = r'''
import sys, torch, duo_kernels
from duo_kernels import reference
# a (3, 16) bf16 weight whose rows are 2^30 elements apart, in a sparse file: row 2 starts at element
# 2^31, so row offsets overflow int32 (V d >= 2^31 in a real model); the file takes no disk space
stride = 2**30
storage = torch.from_file(sys.argv[1], shared=True, size=2 * stride + 16, dtype=torch.bfloat16)
weight = storage.as_strided((3, 16), (stride, 1))
for i in range(3):
    weight[i] = torch.arange(16) * 0.25 + i
x0 = torch.tensor([[0, 1, 2, 2]])
h, z = duo_kernels.tempered_softmax_embedding(x0, 0.0, 0.5, weight, seed=3, impl="triton")
ref_h, ref_z = reference.tempered_softmax_embedding(x0, 0.0, 0.5, weight.contiguous(), seed=3)
assert torch.equal(z, ref_z)
torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-5)
print("ok")
'''


def test_triton_row_offsets_are_int64(tmp_path):
    """Row offsets ``v * stride`` of the embedding reach 2^31 once V d >= 2^31: int64 products, not int32
    (the interpreter sees the compiled int32 stride: tests/compiled_scalars.py). In a subprocess, as an
    int32 overflow reads a wild address."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import conftest\n" + WIDE_STRIDE_CHECK  # conftest installs the compiled-scalar emulation
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "weight.bin")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
