"""The fast forward processes against the reference: the same z_t for the same seed on every backend
(native C++ on CPU, Triton under the interpreter on small shapes, CUDA and Triton on a GPU), the laws
of duo-math §1.2, §3.1 and §5.4 on every backend, hypothesis over V, gamma and shapes, bad inputs."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duo_kernels
from duo_kernels import reference
from tests.devices import device_for
from tests.reference.test_forward_process import offset_cells, offset_probs, p_clean, pair_cells, pair_probs
from tests.stats import chi2_test

P_MIN = 1e-4
VOCABS = [2, 37, 1000, 50258, 151936]
# Triton runs here under the interpreter (TRITON_INTERPRET=1): small shapes; on a GPU, CUDA tensors.
BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_ids(shape, vocab_size, seed=0, device="cpu"):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def run(op: str, impl: str, x0, vocab_size, seed, **schedule):
    """One op on ``impl`` with x0 on that backend's device; the outputs come back on the CPU."""
    device = device_for(impl)
    x0 = x0.to(device)
    schedule = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in schedule.items()}
    if op == "argmax":
        out = (duo_kernels.gaussian_argmax(x0, schedule["gamma"], vocab_size, seed=seed, impl=impl),)
    elif op == "pair":
        out = duo_kernels.gaussian_argmax_pair(x0, schedule["gamma_t"], schedule["gamma_s"], vocab_size, seed=seed,
                                               impl=impl)
    else:
        out = (duo_kernels.usdm_forward(x0, schedule["alpha"], vocab_size, seed=seed, impl=impl),)
    return tuple(z.cpu() for z in out)


def expected(op: str, x0, vocab_size, seed, **schedule):
    if op == "argmax":
        return (reference.gaussian_argmax(x0, schedule["gamma"], vocab_size, seed=seed),)
    if op == "pair":
        return reference.gaussian_argmax_pair(x0, schedule["gamma_t"], schedule["gamma_s"], vocab_size, seed=seed)
    return (reference.usdm_forward(x0, schedule["alpha"], vocab_size, seed=seed),)


def same(got, want) -> bool:
    return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def schedules(b, l):
    """Per-sequence and per-token schedules in every accepted form, across and beyond the windows."""
    gamma = torch.linspace(-12.0, 8.0, b, dtype=torch.float64)
    return [
        dict(gamma=-2.7, gamma_t=-2.0, gamma_s=-3.55, alpha=0.9),
        dict(gamma=gamma.float(), gamma_t=gamma, gamma_s=gamma - 1.5, alpha=torch.linspace(0.01, 1.0, b)),
        dict(gamma=gamma[:, None], gamma_t=gamma[:, None], gamma_s=gamma[:, None] - 0.25,
             alpha=torch.linspace(0.01, 1.0, b, dtype=torch.float64)[:, None]),
        dict(gamma=torch.linspace(-40.0, 40.0, b * l).view(b, l), gamma_t=torch.linspace(-4.0, -1.0, b * l).view(b, l),
             gamma_s=torch.full((b, l), -4.0), alpha=torch.linspace(1e-6, 1.0, b * l, dtype=torch.float64).view(b, l)),
    ]


# ------------------------------------------------------------------------------------------------
# the same stream as the reference


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("op", ["argmax", "pair", "forward"])
@pytest.mark.parametrize("vocab_size", [2, 37, 50258, 151936])
def test_same_z_as_reference(impl, op, vocab_size):
    b, l = 3, 419
    x0 = random_ids((b, l), vocab_size, seed=vocab_size)
    for i, schedule in enumerate(schedules(b, l)):
        seed = 2**64 - 1 - i if i % 2 else 1000 + i
        got = run(op, impl, x0, vocab_size, seed, **schedule)
        for z, ref in zip(got, expected(op, x0, vocab_size, seed, **schedule)):
            assert z.dtype == torch.int64 and z.shape == (b, l)
            assert torch.equal(z, ref), (i, int((z != ref).sum()))


@pytest.mark.parametrize("impl", BACKENDS)
def test_one_token_and_empty_inputs(impl):
    x0 = torch.tensor([[7]])
    for op in ("argmax", "pair", "forward"):
        schedule = dict(gamma=-3.0, gamma_t=-1.0, gamma_s=-4.0, alpha=0.5)
        assert same(run(op, impl, x0, 50258, 5, **schedule), expected(op, x0, 50258, 5, **schedule))
    empty = torch.zeros(2, 0, dtype=torch.int64)
    assert run("argmax", impl, empty, 10, 1, gamma=0.0)[0].shape == (2, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_same_z_as_reference_at_scale_on_gpu(impl):
    """B L = 65536 tokens on the GPU: float64 per-token math keeps every decision the reference's."""
    b, l, vocab_size = 64, 1024, 50258
    x0 = random_ids((b, l), vocab_size, seed=1)
    gamma_t = torch.linspace(-3.55, -1.85, b, dtype=torch.float64)
    schedule = dict(gamma=gamma_t, gamma_t=gamma_t, gamma_s=gamma_t - 0.3, alpha=torch.rand(b, 1, dtype=torch.float64))
    for op in ("argmax", "pair", "forward"):
        assert same(run(op, impl, x0, vocab_size, 9, **schedule), expected(op, x0, vocab_size, 9, **schedule))


# ------------------------------------------------------------------------------------------------
# laws, on every backend


def draws(impl):
    """Tokens per row of a law test: the interpreter is ~1000x slower per token than the C++ kernel."""
    return 100_000 if impl != "triton" or torch.cuda.is_available() else 10_000


@pytest.mark.parametrize("impl", BACKENDS)
def test_gaussian_argmax_law(impl):
    """P(z_t = x) = alpha + (1 - alpha)/V (1.5)-(1.6), the rest uniform over V \\ {x}."""
    vocab_size, n = 1000, draws(impl)
    gammas = torch.tensor([-3.0, -2.2, -1.0], dtype=torch.float64)
    x0 = random_ids((3, n), vocab_size, seed=2)
    (z,) = run("argmax", impl, x0, vocab_size, 11, gamma=gammas)
    for row, p in enumerate(p_clean(gammas, vocab_size)):
        assert chi2_test(offset_cells(z[row], x0[row], vocab_size, 50), offset_probs(p, 50)) > P_MIN


@pytest.mark.parametrize("impl", BACKENDS)
def test_gaussian_argmax_pair_law(impl):
    """The DDT pair (§5.3-5.4): cells (x, x), (other, x), (same other, same other); carry-over."""
    vocab_size, gamma_t, gamma_s, n = 1000, -2.2, -3.0, draws(impl)
    x0 = random_ids((1, n), vocab_size, seed=3)
    z_t, z_s = run("pair", impl, x0, vocab_size, 13, gamma_t=gamma_t, gamma_s=gamma_s)
    counts = pair_cells(z_t, z_s, x0)
    assert counts[3:].sum() == 0
    assert chi2_test(counts[:3], pair_probs(gamma_t, gamma_s, vocab_size)) > P_MIN


@pytest.mark.parametrize("impl", BACKENDS)
def test_usdm_forward_law(impl):
    """(3.1): P(z_t = x) = alpha + (1 - alpha)/V, every other id (1 - alpha)/V; alpha = 1 keeps x."""
    vocab_size, n = 37, draws(impl) // 2
    alphas = torch.tensor([1.0, 0.95, 0.5, 0.05], dtype=torch.float64)
    x0 = random_ids((4, n), vocab_size, seed=4)
    (z,) = run("forward", impl, x0, vocab_size, 15, alpha=alphas[:, None])
    assert torch.equal(z[0], x0[0])
    for row in range(1, 4):
        probs = torch.full((vocab_size,), (1 - alphas[row]) / vocab_size, dtype=torch.float64)
        probs[0] += alphas[row]
        assert chi2_test(torch.bincount((z[row] - x0[row]) % vocab_size, minlength=vocab_size), probs) > P_MIN


# ------------------------------------------------------------------------------------------------
# hypothesis: any V, shape, schedule and seed


@given(b=st.integers(1, 3), l=st.integers(1, 9), vocab_size=st.sampled_from(VOCABS),
       gamma_t=st.floats(-30.0, 30.0), drop=st.floats(0.0, 10.0), alpha=st.floats(1e-9, 1.0),
       seed=st.integers(0, 2**64 - 1))
def test_native_matches_reference_everywhere(b, l, vocab_size, gamma_t, drop, alpha, seed):
    x0 = random_ids((b, l), vocab_size, seed=b * l)
    schedule = dict(gamma=gamma_t, gamma_t=gamma_t, gamma_s=gamma_t - drop, alpha=alpha)
    for op in ("argmax", "pair", "forward"):
        assert same(run(op, "cpu", x0, vocab_size, seed, **schedule), expected(op, x0, vocab_size, seed, **schedule))


@given(b=st.integers(1, 2), l=st.integers(1, 5), vocab_size=st.sampled_from(VOCABS),
       gamma_t=st.floats(-30.0, 30.0), drop=st.floats(0.0, 10.0), alpha=st.floats(1e-9, 1.0),
       seed=st.integers(0, 2**64 - 1))
def test_triton_matches_reference_everywhere(b, l, vocab_size, gamma_t, drop, alpha, seed):
    x0 = random_ids((b, l), vocab_size, seed=b * l)
    schedule = dict(gamma=gamma_t, gamma_t=gamma_t, gamma_s=gamma_t - drop, alpha=alpha)
    for op in ("argmax", "pair", "forward"):
        assert same(run(op, "triton", x0, vocab_size, seed, **schedule), expected(op, x0, vocab_size, seed, **schedule))


# ------------------------------------------------------------------------------------------------
# torch.compile and the torch.library ops

BIG_SEED = 2**64 - 3  # >= 2^63: the ops take the int64 of its bits


def draw_all(x0, gamma_t, seed, impl):
    z_t = duo_kernels.gaussian_argmax(x0, gamma_t, 37, seed=seed, impl=impl)
    pair = duo_kernels.gaussian_argmax_pair(x0, gamma_t, gamma_t - 1.0, 37, seed=seed, impl=impl)
    return (z_t, *pair, duo_kernels.usdm_forward(x0, torch.sigmoid(gamma_t), 37, seed=seed, impl=impl))


@pytest.mark.parametrize("impl", BACKENDS)
def test_torch_compile_fullgraph(impl):
    device = device_for(impl)
    x0, gamma_t = random_ids((2, 3), 37, seed=5, device=device), torch.tensor([-1.0, 0.5], device=device)
    compiled = torch.compile(draw_all, fullgraph=True, backend="aot_eager")
    got = compiled(x0, gamma_t, BIG_SEED, impl)
    assert same(got, draw_all(x0, gamma_t, BIG_SEED, impl))
    assert same(tuple(z.cpu() for z in got), draw_all(x0.cpu(), gamma_t.cpu(), BIG_SEED, "reference"))


@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck(impl):
    device = device_for(impl)
    x0 = random_ids((2, 3), 37, seed=6, device=device)
    gamma = torch.tensor([[-1.0], [0.5]], dtype=torch.float64, device=device).expand(2, 3)
    seed = duo_kernels.rng.seed_to_int64(BIG_SEED)
    ops = torch.ops.duo_kernels
    torch.library.opcheck(ops.gaussian_argmax.default, (x0, gamma, 37, seed, impl))
    torch.library.opcheck(ops.gaussian_argmax_pair.default, (x0, gamma, gamma - 1.0, 37, seed, impl))
    torch.library.opcheck(ops.usdm_forward.default, (x0, torch.sigmoid(gamma), 37, seed, impl))


# ------------------------------------------------------------------------------------------------
# seeds, generators, validation


def test_seed_from_generators():
    x0 = random_ids((2, 50), 100)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(duo_kernels.gaussian_argmax(x0, -1.0, 100, generator=g1),
                       reference.gaussian_argmax(x0, -1.0, 100, generator=g2))
    torch.manual_seed(0)
    a = duo_kernels.usdm_forward(x0, 0.5, 100)
    torch.manual_seed(0)
    assert torch.equal(a, duo_kernels.usdm_forward(x0, 0.5, 100))


X0 = torch.zeros(2, 3, dtype=torch.int64)

BAD_CALLS = [
    ("x0", lambda: duo_kernels.gaussian_argmax(X0 + 10, -2.0, 10, seed=0)),
    ("x0", lambda: duo_kernels.gaussian_argmax(X0 - 1, -2.0, 10, seed=0, impl="triton")),
    ("x0", lambda: duo_kernels.gaussian_argmax_pair(X0.float(), -2.0, -3.0, 10, seed=0)),
    ("x0", lambda: duo_kernels.usdm_forward(X0[0], 0.5, 10, seed=0)),
    ("vocab_size", lambda: duo_kernels.gaussian_argmax(X0, -2.0, 1, seed=0)),
    ("vocab_size", lambda: duo_kernels.usdm_forward(X0, 0.5, 2**40, seed=0)),
    ("gamma", lambda: duo_kernels.gaussian_argmax(X0, math.nan, 10, seed=0)),
    ("gamma", lambda: duo_kernels.gaussian_argmax(X0, torch.zeros(3), 10, seed=0)),
    ("gamma_t", lambda: duo_kernels.gaussian_argmax_pair(X0, math.inf, -3.0, 10, seed=0)),
    ("gamma_s", lambda: duo_kernels.gaussian_argmax_pair(X0, -3.0, -2.0, 10, seed=0)),
    ("alpha_t", lambda: duo_kernels.usdm_forward(X0, 0.0, 10, seed=0)),
    ("alpha_t", lambda: duo_kernels.usdm_forward(X0, torch.tensor([0.5, 1.5]), 10, seed=0)),
    ("seed", lambda: duo_kernels.gaussian_argmax(X0, -2.0, 10, seed=2**64)),
    ("impl", lambda: duo_kernels.gaussian_argmax(X0, -2.0, 10, seed=0, impl="fast")),
]


@pytest.mark.parametrize("name, call", BAD_CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD_CALLS)])
def test_bad_arguments(name, call):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_impl_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        duo_kernels.gaussian_argmax(X0, -2.0, 10, seed=0, impl="cuda")
