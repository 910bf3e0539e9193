import math

import pytest
import torch

from duo_kernels import rng
from duo_kernels.reference import rng as ref
from tests.devices import device_for
from tests.stats import chi2_test, normal_sf

BACKENDS = ["cpu", "triton"] + (["cuda"] if torch.cuda.is_available() else [])
# (seed, offset): small, large seeds, and offsets whose counters cross a 2^32 boundary.
STREAMS = [(0, 0), (1234, 17), (2**63 + 5, 2**32 - 3), (2**64 - 1, 2**40)]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype floats, across zero too."""
    int_type, magnitude = (torch.int32, 2**31 - 1) if a.dtype == torch.float32 else (torch.int64, 2**63 - 1)

    def key(x):  # a monotone integer line through the sign-magnitude encodings
        i = x.view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    return (key(a) - key(b)).abs()


def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = ref.philox4x32_10(*(t(c) for c in counter), *key)
        assert tuple(int(w) for w in words) == expected


def test_counter_layout_matches_triton_randint4x():
    """Our counter block (offset lo, offset hi, 0, 0) is what tl.randint4x uses for int64 offsets."""
    import triton
    import triton.language as tl

    @triton.jit
    def words_kernel(out_ptr, seed, offset, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, offset + o.to(tl.int64))
        tl.store(out_ptr + o * 4 + 0, w0.to(tl.uint32, bitcast=True).to(tl.int64))
        tl.store(out_ptr + o * 4 + 1, w1.to(tl.uint32, bitcast=True).to(tl.int64))
        tl.store(out_ptr + o * 4 + 2, w2.to(tl.uint32, bitcast=True).to(tl.int64))
        tl.store(out_ptr + o * 4 + 3, w3.to(tl.uint32, bitcast=True).to(tl.int64))

    seed, offset = 2**40 + 77, 2**32 - 8
    out = torch.empty(16 * 4, dtype=torch.int64)
    words_kernel[(1,)](out, seed, offset, BLOCK=16)
    expected = torch.stack(ref.philox4x32(seed, torch.arange(16) + offset), dim=1).flatten()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("seed,offset", STREAMS)
def test_integers_and_uniforms_bit_identical(impl, seed, offset):
    shape = (3, 700)
    for dtype in (torch.float32, torch.float64):
        a = rng.uniform(shape, seed, offset, dtype, impl="reference")
        b = rng.uniform(shape, seed, offset, dtype, device=device_for(impl), impl=impl).cpu()
        assert a.dtype == b.dtype == dtype and a.shape == shape
        assert torch.equal(a, b)
        assert bool((a > 0).all()) and bool((a < 1).all())
    for high in (1, 2, 37, 50258, 2**31):
        a = rng.randint(shape, high, seed, offset, impl="reference")
        b = rng.randint(shape, high, seed, offset, device=device_for(impl), impl=impl).cpu()
        assert torch.equal(a, b)
        assert int(a.min()) >= 0 and int(a.max()) < high


@pytest.mark.parametrize("impl", BACKENDS)
def test_normals_within_4_ulp(impl):
    for seed, offset in STREAMS:
        for dtype in (torch.float32, torch.float64):
            a = rng.normal((4096,), seed, offset, dtype, impl="reference")
            b = rng.normal((4096,), seed, offset, dtype, device=device_for(impl), impl=impl).cpu()
            assert int(ulp_distance(a, b).max()) <= 4


def test_float32_normal_is_the_rounded_float64_box_muller():
    w0, w1, _, _ = ref.philox4x32(9, torch.arange(1000))
    u1, u2 = ref.uniform24(w0).double(), ref.uniform24(w1).double()
    exact = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    got = rng.normal((1000,), 9, impl="reference")
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6)


def test_offsets_address_the_same_stream():
    full = rng.uniform((100,), 5, 0, impl="reference")
    tail = rng.uniform((60,), 5, 40, impl="reference")
    assert torch.equal(full[40:], tail)


def test_uniformity_chi_square_1e6():
    u = rng.uniform((10**6,), 2024, impl="cpu")
    counts = torch.histc(u, bins=1000, min=0.0, max=1.0)
    assert chi2_test(counts, torch.ones(1000)) > 1e-4
    ids = rng.randint((10**6,), 1000, 2025, impl="cpu")
    assert chi2_test(torch.bincount(ids, minlength=1000), torch.ones(1000)) > 1e-4
    u64 = rng.uniform((10**6,), 2026, dtype=torch.float64, impl="cpu")
    counts = torch.histc(u64, bins=1000, min=0.0, max=1.0)
    assert chi2_test(counts, torch.ones(1000)) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normality_1e6(dtype):
    z = rng.normal((10**6,), 77, dtype=dtype, impl="cpu").double()
    n = z.numel()
    # moments: mean, variance, skewness and excess kurtosis against their standard errors
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # chi-square over 200 equiprobable bins of the normal CDF
    cells = torch.clamp((torch.special.ndtr(z) * 200).long(), 0, 199)
    assert chi2_test(torch.bincount(cells, minlength=200), torch.ones(200)) > 1e-4
    # the tails: P(|z| > 4) = 6.33e-5
    tail = int((z.abs() > 4).sum())
    p = 2 * normal_sf(4.0)
    assert abs(tail - n * p) < 5 * math.sqrt(n * p)


def test_seed_from_torch_generators():
    torch.manual_seed(11)
    a = rng.uniform((5,))
    torch.manual_seed(11)
    b = rng.uniform((5,))
    assert torch.equal(a, b)
    assert not torch.equal(a, rng.uniform((5,)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert rng.resolve_seed(generator=g1) == rng.resolve_seed(generator=g2)
    assert 0 <= rng.resolve_seed(generator=g1) < 2**64


def test_seed_int64_bits_round_trip():
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        assert -2**63 <= rng.seed_to_int64(seed) < 2**63
        assert rng.seed_from_int64(rng.seed_to_int64(seed)) == seed


@pytest.mark.parametrize("impl", BACKENDS)
def test_torch_compile_fullgraph(impl):
    device = device_for(impl)

    def draw(seed):
        return (rng.uniform((2, 3), seed=seed, offset=5, device=device, impl=impl),
                rng.normal((4,), seed=seed, dtype=torch.float64, device=device, impl=impl),
                rng.randint((5,), 1000, seed=seed, device=device, impl=impl))

    got = torch.compile(draw, fullgraph=True, backend="aot_eager")(2**64 - 3)
    for a, b in zip(got, draw(2**64 - 3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck(impl):
    device, seed = device_for(impl), rng.seed_to_int64(2**64 - 3)
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(torch.ops.duo_kernels.rng_uniform.default, ([2, 3], seed, 7, dtype, device, impl))
        torch.library.opcheck(torch.ops.duo_kernels.rng_normal.default, ([2, 3], seed, 7, dtype, device, impl))
    torch.library.opcheck(torch.ops.duo_kernels.rng_randint.default, ([2, 3], 1000, seed, 7, device, impl))

@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rng.uniform((3,), seed=-1), "seed"),
        (lambda: rng.uniform((3,), seed=2**64), "seed"),
        (lambda: rng.uniform((3,), seed=1.5), "seed"),
        (lambda: rng.uniform((3, -1), seed=1), "shape"),
        (lambda: rng.uniform((3,), seed=1, offset=-2), "offset"),
        (lambda: rng.uniform((3,), seed=1, dtype=torch.float16), "dtype"),
        (lambda: rng.randint((3,), 0, seed=1), "high"),
        (lambda: rng.randint((3,), 2**31 + 1, seed=1), "high"),
        (lambda: rng.uniform((3,), seed=1, impl="fast"), "impl"),
        (lambda: rng.uniform((3,), seed=1, generator="g"), "generator"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_impl_without_cuda():
    with pytest.raises(RuntimeError, match="cuda"):
        rng.uniform((3,), seed=1, impl="cuda")
