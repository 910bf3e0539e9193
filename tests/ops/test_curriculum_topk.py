"""The fast top-k relaxation (duo-math §4.4) against the reference: same ids and z_t, weights to float32
rounding, on every backend and in both modes; its laws (P(z_t = x), uniform slot ids) on every
backend; hypothesis over V, k, tau and gamma; the float64 special functions of the Triton kernels;
bad inputs."""

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import duo_kernels
from duo_kernels import reference
from duo_kernels.ops.curriculum import MIN_TAU
from duo_kernels.reference.transform import diffusion_transform
from duo_kernels.triton import normal
from tests.devices import device_for
from tests.reference.test_curriculum import APPENDIX_A5, OWT_VOCAB, assert_frequency
from tests.stats import chi2_test

P_MIN = 1e-4
VOCABS = [2, 37, 1000, 50258, 151936]
KS = [1, 2, 16, 128]
BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
INTERPRETED = not torch.cuda.is_available()  # Triton runs under the interpreter here


def random_ids(shape, vocab_size, seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def topk(impl, x0, gamma, vocab_size, k, tau, compat=False, seed=0):
    device = device_for(impl)
    gamma = gamma.to(device) if isinstance(gamma, torch.Tensor) else gamma
    out = duo_kernels.tempered_softmax_topk(x0.to(device), gamma, vocab_size, k, tau, reference_compat=compat,
                                            seed=seed, impl=impl)
    return tuple(t.cpu() for t in out)


def assert_matches_reference(got, x0, gamma, vocab_size, k, tau, compat, seed):
    ids, weights, z_t = got
    ref_ids, ref_weights, ref_z = reference.tempered_softmax_topk(x0, gamma, vocab_size, k, tau,
                                                                  reference_compat=compat, seed=seed)
    assert ids.dtype == z_t.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (*x0.shape, k) and z_t.shape == x0.shape
    assert torch.equal(ids, ref_ids), int((ids != ref_ids).sum())
    assert torch.equal(z_t, ref_z)
    # float32 rounding of float64 weights that agree to a few double ulp: at most one float32 ulp
    torch.testing.assert_close(weights, ref_weights, rtol=2**-23, atol=1e-38)


# ------------------------------------------------------------------------------------------------
# the same outputs as the reference


@pytest.mark.parametrize("compat", [False, True], ids=["exact", "compat"])
@pytest.mark.parametrize("k", KS)
def test_native_matches_reference(k, compat):
    if compat and k < 2:
        pytest.skip("reference_compat needs k >= 2")
    b, l, vocab_size = 4, 64, OWT_VOCAB
    x0 = random_ids((b, l), vocab_size, seed=k)
    gamma = torch.tensor([-8.0, -3.55, -1.85, 6.0], dtype=torch.float64)  # around and beyond the OWT window
    # (the reference's k shuffle steps take seconds at k = 128: one temperature there)
    for i, tau in enumerate([1e-4, 1e-3, 0.1, 10.0] if k < 128 else [1e-3]):
        seed = 2**64 - 1 - i if i % 2 else i
        assert_matches_reference(topk("cpu", x0, gamma, vocab_size, k, tau, compat, seed), x0, gamma, vocab_size, k,
                                 tau, compat, seed)


@pytest.mark.parametrize("compat", [False, True], ids=["exact", "compat"])
@pytest.mark.parametrize("k", KS)
def test_triton_matches_reference(k, compat):
    if compat and k < 2:
        pytest.skip("reference_compat needs k >= 2")
    if compat and k == 128 and INTERPRETED:
        pytest.skip("~10 s interpreted; the compat slots are the same code at k = 16")
    # one interpreted program per call: 4096 // k tokens (32 at k = 128, ~4 s)
    b, l = (2, 16) if k == 128 else (4, 24)
    x0 = random_ids((b, l), OWT_VOCAB, seed=k)
    gamma = torch.linspace(-12.0, 4.0, b, dtype=torch.float64)[:, None]
    for tau in ([1e-3] if k == 128 else [1e-4, 1e-3, 1.0]):
        got = topk("triton", x0, gamma, OWT_VOCAB, k, tau, compat, seed=k)
        assert_matches_reference(got, x0, gamma, OWT_VOCAB, k, tau, compat, k)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("k", [2, 16, 128])
def test_matches_reference_at_scale_on_gpu(impl, k):
    b, l = 8, 1024
    x0 = random_ids((b, l), OWT_VOCAB, seed=3)
    gamma = torch.linspace(-3.55, -1.85, b, dtype=torch.float64)
    for compat in (False, True):
        got = topk(impl, x0, gamma, OWT_VOCAB, k, 1e-3, compat, seed=5)
        assert_matches_reference(got, x0, gamma, OWT_VOCAB, k, 1e-3, compat, 5)


@pytest.mark.parametrize("tau", [10**-3.3, 0.3])
def test_triton_inverse_temperature_stays_float64(tau):
    """1/tau is not a float32 number here: passed as a Python float it would reach the compiled kernel
    rounded to float32 (the interpreter tests emulate that: tests/compiled_scalars.py), ~6 float32 ulp
    off the reference's weights. The kernel's float64 parameter keeps it exact."""
    assert float(torch.tensor(1.0 / tau, dtype=torch.float32)) != 1.0 / tau
    x0 = random_ids((2, 64), OWT_VOCAB, seed=3)
    gamma = torch.linspace(-4.0, 4.0, 128, dtype=torch.float64).view(2, 64)
    for k, compat in [(8, False), (16, True)]:
        got = topk("triton", x0, gamma, OWT_VOCAB, k, tau, compat, seed=k)
        assert_matches_reference(got, x0, gamma, OWT_VOCAB, k, tau, compat, k)


@pytest.mark.parametrize("impl", BACKENDS)
def test_one_token_and_the_whole_vocabulary(impl):
    """A 1-token input; k = V - 1 (no tail: the weights are the exact softmax of all V coordinates)."""
    x0 = torch.tensor([[1]])
    for vocab_size, k, tau in [(50258, 2, 1e-3), (2, 1, 1.0), (37, 36, 0.3)]:
        got = topk(impl, x0, -2.0, vocab_size, k, tau, seed=vocab_size)
        assert_matches_reference(got, x0, -2.0, vocab_size, k, tau, False, vocab_size)
    ids, weights, _ = got
    assert ids.unique().numel() == 36  # every id but the hidden one, whose share the weights leave out
    assert float(weights.double().sum()) < 1.0


def test_native_takes_any_k():
    """The C++ kernel has no k limit (the GPU kernels stop at 128)."""
    x0 = random_ids((2, 4), 1000, seed=1)
    got = topk("cpu", x0, -2.5, 1000, 129, 0.5, seed=3)
    assert_matches_reference(got, x0, -2.5, 1000, 129, 0.5, False, 3)


@pytest.mark.parametrize("vocab_size, k, tau, compat", [(OWT_VOCAB, 8, 1e-3, False), (OWT_VOCAB, 8, 1e-4, True),
                                                     (37, 5, 10.0, False), (1000, 16, 0.05, True), (2, 1, 1.0, False)])
def test_native_simd_and_scalar_paths_agree(monkeypatch, vocab_size, k, tau, compat):
    """The C++ kernel's 4-token vector path (AVX2 CPUs) and its scalar path (DUO_KERNELS_NO_SIMD=1):
    token counts that are not a multiple of 4, 1 token, small vocabularies (lanes the vector code
    hands to the scalar functions), both modes; each matches the reference."""
    gamma = torch.tensor([[-3.55], [-2.0], [4.0]], dtype=torch.float64)
    for shape in [(3, 7), (1, 1), (2, 2)]:
        x0 = random_ids(shape, vocab_size, seed=shape[1])
        g = gamma[: shape[0]]
        monkeypatch.delenv("DUO_KERNELS_NO_SIMD", raising=False)
        simd = topk("cpu", x0, g, vocab_size, k, tau, compat, seed=7)
        monkeypatch.setenv("DUO_KERNELS_NO_SIMD", "1")
        scalar = topk("cpu", x0, g, vocab_size, k, tau, compat, seed=7)
        for got in (simd, scalar):
            assert_matches_reference(got, x0, g, vocab_size, k, tau, compat, 7)
        assert torch.equal(simd[0], scalar[0]) and torch.equal(simd[2], scalar[2])


# ------------------------------------------------------------------------------------------------
# laws, on every backend


def tokens(impl, n):
    return n // 25 if impl == "triton" and INTERPRETED else n


@pytest.mark.parametrize("impl", BACKENDS)
def test_clean_probability(impl):
    """Exact rule: P(z_t = x) = alpha + (1 - alpha)/V (Appendix A.5 'exact'); compat: the published
    rank <= k rule (A.5's k = 2 column)."""
    gammas = torch.tensor(sorted(APPENDIX_A5), dtype=torch.float64)
    n = tokens(impl, 50_000)
    x0 = random_ids((2, n), OWT_VOCAB, seed=4)
    alpha, _ = diffusion_transform(gammas, OWT_VOCAB)
    _, _, z_exact = topk(impl, x0, gammas, OWT_VOCAB, 2, 1e-3, seed=21)
    _, _, z_compat = topk(impl, x0, gammas, OWT_VOCAB, 2, 1e-3, compat=True, seed=22)
    for row, gamma in enumerate(gammas.tolist()):
        assert_frequency(z_exact[row] == x0[row], float(alpha[row] + (1 - alpha[row]) / OWT_VOCAB))
        assert_frequency(z_compat[row] == x0[row], APPENDIX_A5[gamma][2])


@pytest.mark.parametrize("impl", BACKENDS)
def test_slot_ids_are_uniform(impl):
    """Each slot's id is uniform over V \\ {x}, and the ordered pair of slots 0 and 1 uniform over
    distinct pairs: no Floyd ordering bias."""
    vocab_size, k, x = 11, 3, 6
    n = tokens(impl, 40_000)
    x0 = torch.full((1, n), x)
    ids, _, _ = topk(impl, x0, 3.0, vocab_size, k, 1e-3, seed=23)
    pool = ids - (ids > x).long()
    for slot in (0, k - 1):
        noise = pool[..., slot][ids[..., slot] != x]
        assert chi2_test(torch.bincount(noise, minlength=vocab_size - 1), torch.ones(vocab_size - 1)) > P_MIN
    both = (ids[..., 0] != x) & (ids[..., 1] != x)
    pairs = pool[..., 0][both] * (vocab_size - 1) + pool[..., 1][both]
    expected = 1.0 - torch.eye(vocab_size - 1).flatten()
    assert chi2_test(torch.bincount(pairs, minlength=(vocab_size - 1) ** 2), expected) > P_MIN


# ------------------------------------------------------------------------------------------------
# hypothesis: any V, k, tau, gamma


def valid_k(vocab_size, k, compat):
    return k <= vocab_size - 1 and (k >= 2 or not compat)


@settings(max_examples=15)
@given(vocab_size=st.sampled_from(VOCABS), k=st.sampled_from(KS), log10_tau=st.floats(-4.0, 1.0),
       gamma=st.floats(-20.0, 12.0), compat=st.booleans(), b=st.integers(1, 2), l=st.integers(1, 5),
       seed=st.integers(0, 2**64 - 1))
def test_native_matches_reference_everywhere(vocab_size, k, log10_tau, gamma, compat, b, l, seed):
    assume(valid_k(vocab_size, k, compat))
    x0 = random_ids((b, l), vocab_size, seed=b + l)
    tau = 10.0**log10_tau
    got = topk("cpu", x0, gamma, vocab_size, k, tau, compat, seed)
    assert_matches_reference(got, x0, gamma, vocab_size, k, tau, compat, seed)
    ids, weights, z_t = got
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all())
    assert bool(torch.isfinite(weights).all()) and bool((weights.double().sum(-1) <= 1 + 1e-6).all())


@settings(max_examples=10)
@given(vocab_size=st.sampled_from(VOCABS), k=st.sampled_from([1, 2, 16]), log10_tau=st.floats(-4.0, 1.0),
       gamma=st.floats(-20.0, 12.0), compat=st.booleans(), l=st.integers(1, 4), seed=st.integers(0, 2**64 - 1))
def test_triton_matches_reference_everywhere(vocab_size, k, log10_tau, gamma, compat, l, seed):
    """(k = 128 costs ~4 s per interpreted call: test_triton_matches_reference covers it.)"""
    assume(valid_k(vocab_size, k, compat))
    x0 = random_ids((1, l), vocab_size, seed=l)
    tau = 10.0**log10_tau
    got = topk("triton", x0, gamma, vocab_size, k, tau, compat, seed)
    assert_matches_reference(got, x0, gamma, vocab_size, k, tau, compat, seed)


@pytest.mark.parametrize("impl", ["cpu", "cpu scalar", "triton", "reference", pytest.param("cuda", marks=pytest.mark.gpu)])
@settings(max_examples=3, deadline=None)
@example(vocab_size=OWT_VOCAB, k=8, log10_tau=-19.0, gamma=-2.7, compat=False, seed=0)
@example(vocab_size=OWT_VOCAB, k=8, log10_tau=math.log10(MIN_TAU), gamma=-2.7, compat=True, seed=1)
@example(vocab_size=37, k=2, log10_tau=math.log10(MIN_TAU), gamma=4.0, compat=False, seed=2)
@given(vocab_size=st.sampled_from([37, OWT_VOCAB]), k=st.sampled_from([2, 8]), log10_tau=st.floats(-300.0, -15.0),
       gamma=st.floats(-8.0, 6.0), compat=st.booleans(), seed=st.integers(0, 2**64 - 1))
def test_tiny_temperatures(impl, vocab_size, k, log10_tau, gamma, compat, seed):
    """Down to the smallest accepted tau every backend (the C++ kernel's vector and scalar paths
    included) gives the reference's finite weights, ids and z_t; below it every backend rejects tau.
    (The vector path once contracted w / tau - m into an FMA, whose unrounded product turned the
    weights into NaN from tau ~ 1e-19 on.)"""
    x0 = random_ids((2, 5), vocab_size, seed=seed % 1000)
    tau = max(10.0**log10_tau, MIN_TAU)
    with pytest.MonkeyPatch.context() as patch:
        if impl == "cpu scalar":
            patch.setenv("DUO_KERNELS_NO_SIMD", "1")
        backend = impl.split()[0]
        got = topk(backend, x0, gamma, vocab_size, k, tau, compat, seed)
        assert bool(torch.isfinite(got[1]).all())
        assert_matches_reference(got, x0, gamma, vocab_size, k, tau, compat, seed)
        with pytest.raises(ValueError, match="tau"):
            topk(backend, x0, gamma, vocab_size, k, MIN_TAU * (1 - 2**-52), compat, seed)


# ------------------------------------------------------------------------------------------------
# the float64 special functions of the Triton kernels (the C++ ones are covered by the bit-level
# agreement of the native weights with the reference)


@triton.jit
def special_kernel(x_ptr, out_ptr, n, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.5)
    if WHICH == 0:
        y = normal.expm1(x)
    elif WHICH == 1:
        y = normal.ndtri(x)
    elif WHICH == 2:
        y = normal.erfcx_nonnegative(x)
    else:
        y = normal.log_ndtr(x)
    tl.store(out_ptr + o, y, mask=m)


def test_triton_special_functions():
    def run(x, which):
        x = x.to(device_for("triton"))
        out = torch.empty_like(x)
        special_kernel[(1,)](x, out, x.numel(), WHICH=which, BLOCK=triton.next_power_of_2(x.numel()))
        return out.cpu()

    f64 = dict(dtype=torch.float64)
    cases = [
        (-torch.logspace(-18, 2, 512, **f64), torch.expm1, 4e-16),
        (torch.cat([torch.logspace(-300, -1e-3, 400, **f64), torch.linspace(0.01, 0.99, 100, **f64),
                    1 - torch.logspace(-16, -1, 12, **f64)]), torch.special.ndtri, 8e-16),
        (torch.cat([torch.linspace(0, 10, 400, **f64), torch.logspace(1, 9, 112, **f64)]), torch.special.erfcx, 2e-15),
        (torch.linspace(-40, 5, 512, **f64), torch.special.log_ndtr, 1e-14),
    ]
    for which, (x, fn, rtol) in enumerate(cases):
        torch.testing.assert_close(run(x, which), fn(x), rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------------------
# torch.compile and the torch.library op

BIG_SEED = 2**64 - 3  # >= 2^63: the op takes the int64 of its bits


@pytest.mark.parametrize("impl", BACKENDS)
def test_torch_compile_fullgraph(impl):
    device = device_for(impl)
    x0, gamma = random_ids((2, 3), 37, seed=4).to(device), torch.tensor([-3.0, -1.0], device=device)

    def draw(x0, gamma, seed):
        return duo_kernels.tempered_softmax_topk(x0, gamma, 37, 3, 1e-2, seed=seed, impl=impl)

    got = torch.compile(draw, fullgraph=True, backend="aot_eager")(x0, gamma, BIG_SEED)
    for a, b in zip(got, draw(x0, gamma, BIG_SEED)):
        assert torch.equal(a, b)
    assert_matches_reference(tuple(t.cpu() for t in got), x0.cpu(), gamma.cpu(), 37, 3, 1e-2, False, BIG_SEED)


@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck(impl):
    device = device_for(impl)
    x0 = random_ids((2, 3), 37, seed=5).to(device)
    gamma = torch.tensor([[-3.0], [-1.0]], dtype=torch.float64, device=device).expand(2, 3)
    seed = duo_kernels.rng.seed_to_int64(BIG_SEED)
    for k, compat in [(1, False), (3, True)]:
        torch.library.opcheck(torch.ops.duo_kernels.tempered_softmax_topk.default,
                              (x0, gamma, 37, k, 1e-2, compat, seed, impl))


def test_weights_are_constants_for_autograd():
    """As before registration: the fast backends' weights take no gradient from gamma."""
    gamma = torch.tensor([-3.0, -1.0], requires_grad=True)
    _, weights, _ = duo_kernels.tempered_softmax_topk(random_ids((2, 3), 37), gamma, 37, 3, 1e-2, seed=0, impl="cpu")
    assert not weights.requires_grad


# ------------------------------------------------------------------------------------------------
# validation

X0 = torch.zeros(2, 3, dtype=torch.int64)

BAD_CALLS = [
    ("k", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 0, 1e-3, seed=0)),
    ("k", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 10, 1e-3, seed=0)),
    ("k", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 12, 1e-3, seed=0, impl="triton")),
    ("k", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 2.0, 1e-3, seed=0)),
    ("k", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 1, 1e-3, reference_compat=True, seed=0)),
    ("tau", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 2, 0.0, seed=0)),
    ("tau", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 2, -1e-3, seed=0)),
    ("tau", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 2, math.nan, seed=0)),
    ("tau", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 10, 2, math.inf, seed=0)),
    ("x0", lambda: duo_kernels.tempered_softmax_topk(X0 + 10, -2.0, 10, 2, 1e-3, seed=0)),
    ("x0", lambda: duo_kernels.tempered_softmax_topk(X0 - 1, -2.0, 10, 2, 1e-3, seed=0, impl="triton")),
    ("x0", lambda: duo_kernels.tempered_softmax_topk(X0.int(), -2.0, 10, 2, 1e-3, seed=0)),
    ("vocab_size", lambda: duo_kernels.tempered_softmax_topk(X0, -2.0, 1, 1, 1e-3, seed=0)),
    ("gamma", lambda: duo_kernels.tempered_softmax_topk(X0, math.nan, 10, 2, 1e-3, seed=0)),
    ("gamma", lambda: duo_kernels.tempered_softmax_topk(X0, torch.zeros(5), 10, 2, 1e-3, seed=0)),
]


@pytest.mark.parametrize("name, call", BAD_CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD_CALLS)])
def test_bad_arguments(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_gpu_kernels_stop_at_k_128():
    x0 = random_ids((1, 4), 1000)
    for impl in ("cuda", "triton"):
        with pytest.raises(NotImplementedError, match="k <= 128"):
            duo_kernels.tempered_softmax_topk(x0, -2.0, 1000, 129, 1e-3, seed=0, impl=impl)
