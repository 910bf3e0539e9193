"""Microbenchmarks of the sampling step and the greedy tail on each backend, with the published Duo
sampler (float64 dense posterior, sort-based nucleus) and torch.argmax for scale.

``pytest benchmarks/test_bench_sampling.py --benchmark-only`` times B = 4, L = 256, V = 4096 per call;
with ``--benchmark-disable`` (CI) each body runs once on B = 2, L = 32, V = 1000 and checks its ids
against the reference's (same seed, same ids). Every path runs on the GPU when there is one, except
``impl="cpu"``; Triton runs only on a GPU (the interpreter is a correctness tool, too slow to time).
CPU timings use one thread (see ``one_torch_thread``).
"""

import pytest
import torch

import duo_kernels
from benchmarks.cases import SAMPLING_ALPHA_S, SAMPLING_ALPHA_T, published_ancestral_step
from duo_kernels import _dispatch
from duo_kernels.reference import sampling as reference
from benchmarks.timing import bench_device, synced

BENCH_SHAPE = (4, 256, 4096)
SMOKE_SHAPE = (2, 32, 1000)
SEED = 1234


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One CPU thread: on the shared 2-core machine two OpenMP threads made the reference step 100x
    slower (5 s instead of 0.05 s at the smoke shape) whenever other jobs held the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(benchmark, device):
    batch, seq_len, vocab_size = SMOKE_SHAPE if benchmark.disabled else BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(batch, seq_len, vocab_size, generator=gen)).to(torch.bfloat16)
    z_t = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    return logits.to(device), z_t.to(device)


def _skip_unless_runs(impl: str, device: torch.device):
    if impl == "triton" and device.type != "cuda":
        pytest.skip("triton is timed on a GPU only; the interpreter is too slow to benchmark")
    if impl != "cpu":  # the cpu path is plain PyTorch: it runs on any CPU
        ok, why = _dispatch.backend_status(impl, device)
        if not ok:
            pytest.skip(why)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_ancestral_step(benchmark, impl, top_p):
    device = bench_device(impl)
    _skip_unless_runs(impl, device)
    logits, z_t = _inputs(benchmark, device)
    benchmark.group = f"ancestral_step top_p={top_p:g} {tuple(logits.shape)}"
    z_s = benchmark(synced(lambda: duo_kernels.ancestral_step(logits, z_t, SAMPLING_ALPHA_T, SAMPLING_ALPHA_S,
                                                              top_p=top_p, seed=SEED, impl=impl), device))
    expected = reference.ancestral_step(logits.cpu(), z_t.cpu(), SAMPLING_ALPHA_T, SAMPLING_ALPHA_S, top_p=top_p,
                                        seed=SEED)
    assert torch.equal(z_s.cpu(), expected)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_published_ancestral_step(benchmark, top_p):
    """The hot path the fused step replaces (benchmarks/cases.py), timed on the same inputs."""
    device = bench_device("published")
    logits, z_t = _inputs(benchmark, device)
    benchmark.group = f"ancestral_step top_p={top_p:g} {tuple(logits.shape)}"
    z_s = benchmark(synced(lambda: published_ancestral_step(logits, z_t, SAMPLING_ALPHA_T, SAMPLING_ALPHA_S,
                                                            top_p), device))
    assert z_s.shape == z_t.shape and int(z_s.max()) < logits.shape[-1]


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton", "torch.argmax"])
def test_greedy_tail(benchmark, impl):
    device = bench_device(impl)
    if impl != "torch.argmax":
        _skip_unless_runs(impl, device)
    logits, _ = _inputs(benchmark, device)
    benchmark.group = f"greedy_tail {tuple(logits.shape)}"
    if impl == "torch.argmax":
        ids = benchmark(synced(lambda: logits.argmax(dim=-1), device))
    else:
        ids = benchmark(synced(lambda: duo_kernels.greedy_tail(logits, impl=impl), device))
    assert torch.equal(ids.cpu(), logits.cpu().argmax(dim=-1))
