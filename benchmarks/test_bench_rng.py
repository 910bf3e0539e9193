"""Microbenchmarks of the RNG fills on each backend, with torch's own generator for scale.

``pytest benchmarks/test_bench_rng.py --benchmark-only`` times 2^18 draws per call; with
``--benchmark-disable`` (CI) each body runs once on 2^10 draws and checks its stream against the
reference. Every path runs on the GPU when there is one, except ``impl="cpu"``; Triton runs only on
a GPU (the interpreter is a correctness tool, too slow to time), ``impl="cuda"`` too.
"""

import pytest
import torch

from duo_kernels import _dispatch, rng
from benchmarks.timing import bench_device, synced

BENCH_DRAWS = 2**18  # the reference Philox takes ~65 ms a call on 2 cores: 10+ rounds in ~1 s
SMOKE_DRAWS = 2**10
CHECKED = 256  # counters address elements, so a prefix of the stream is checked against a short draw
HIGH = 50257
SEED = 1234
# Integers and uniforms agree bit for bit across backends; normals to a few ulp (tests/test_rng.py).
EXACT = dict(rtol=0, atol=0)
TOLERANCE = {"uniform": EXACT, "normal": dict(rtol=1e-6, atol=1e-6), "randint": EXACT}

FILLS = {
    "uniform": lambda n, impl, device: rng.uniform((n,), seed=SEED, device=device, impl=impl),
    "normal": lambda n, impl, device: rng.normal((n,), seed=SEED, device=device, impl=impl),
    "randint": lambda n, impl, device: rng.randint((n,), high=HIGH, seed=SEED, device=device, impl=impl),
}
TORCH_FILLS = {
    "uniform": lambda n, device: torch.rand(n, device=device),
    "normal": lambda n, device: torch.randn(n, device=device),
    "randint": lambda n, device: torch.randint(HIGH, (n,), device=device),
}


@pytest.mark.parametrize("impl", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("op", list(FILLS))
def test_rng_fill(benchmark, op, impl):
    device = bench_device(impl)
    if impl == "triton" and device.type != "cuda":
        pytest.skip("triton is timed on a GPU only; the interpreter is too slow to benchmark")
    ok, why = _dispatch.backend_status(impl, device)
    if not ok:
        pytest.skip(why)
    n = SMOKE_DRAWS if benchmark.disabled else BENCH_DRAWS
    benchmark.group = f"rng.{op} {n} draws"
    out = benchmark(synced(lambda: FILLS[op](n, impl, device), device))
    assert out.shape == (n,)
    expected = FILLS[op](CHECKED, "reference", torch.device("cpu"))
    torch.testing.assert_close(out[:CHECKED].cpu(), expected, **TOLERANCE[op])


@pytest.mark.parametrize("op", list(TORCH_FILLS))
def test_torch_fill(benchmark, op):
    device = bench_device("torch")
    n = SMOKE_DRAWS if benchmark.disabled else BENCH_DRAWS
    benchmark.group = f"rng.{op} {n} draws"
    out = benchmark(synced(lambda: TORCH_FILLS[op](n, device), device))
    assert out.shape == (n,)
