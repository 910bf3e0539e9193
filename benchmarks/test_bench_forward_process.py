"""Microbenchmarks of the forward processes and the top-k relaxation on each backend, with the
reference beside them.

``pytest benchmarks/test_bench_forward_process.py --benchmark-only`` times B = 4, L = 256,
V = 50258 (the CPU target shape of PERF-TARGETS.md); with ``--benchmark-disable`` (CI) every body
runs once on 2 x 16 tokens and V = 1000 and checks the result against the reference. Every path runs on the GPU
when there is one, except ``impl="cpu"``; Triton only on a GPU (the interpreter is a correctness
tool, too slow to time). The dense latent + argmax that ``gaussian_argmax`` replaces takes ~15 s a
call on the 2-core machine, so it gets 3 rounds. ``benchmarks/cpu_targets.py`` measures the
PERF-TARGETS ratios in one run.
"""

import pytest
import torch

import duo_kernels
from benchmarks.timing import bench_device, synced
from duo_kernels import _dispatch, reference

BENCH_SHAPE, BENCH_VOCAB = (4, 256), 50258
SMOKE_SHAPE, SMOKE_VOCAB = (2, 16), 1000
SEED = 1234
GAMMA_T, GAMMA_S, TAU = -2.7, -3.2, 1e-3

# (module, x0, V, **impl): the same call on duo_kernels (with impl=) and on the reference
OPS = {
    "gaussian_argmax": lambda m, x0, v, **kw: m.gaussian_argmax(x0, GAMMA_T, v, seed=SEED, **kw),
    "gaussian_argmax_pair": lambda m, x0, v, **kw: m.gaussian_argmax_pair(x0, GAMMA_T, GAMMA_S, v, seed=SEED, **kw),
    "usdm_forward": lambda m, x0, v, **kw: m.usdm_forward(x0, 0.6, v, seed=SEED, **kw),
    "tempered_softmax_topk k=8": lambda m, x0, v, **kw: m.tempered_softmax_topk(x0, GAMMA_T, v, 8, TAU, seed=SEED,
                                                                                **kw),
    "tempered_softmax_topk k=8 compat": lambda m, x0, v, **kw: m.tempered_softmax_topk(
        x0, GAMMA_T, v, 8, TAU, reference_compat=True, seed=SEED, **kw),
}


def _inputs(benchmark, device: torch.device) -> tuple[torch.Tensor, int]:
    shape, vocab = (SMOKE_SHAPE, SMOKE_VOCAB) if benchmark.disabled else (BENCH_SHAPE, BENCH_VOCAB)
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(device), vocab


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("impl", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_forward_process(benchmark, op, impl):
    device = bench_device(impl)
    if impl == "triton" and device.type != "cuda":
        pytest.skip("triton is timed on a GPU only; the interpreter is too slow to benchmark")
    ok, why = _dispatch.backend_status(impl, device)
    if not ok:
        pytest.skip(why)
    x0, vocab = _inputs(benchmark, device)
    benchmark.group = f"{op} B·L={x0.numel()} V={vocab}"
    out = _as_tuple(benchmark(synced(lambda: OPS[op](duo_kernels, x0, vocab, impl=impl), device)))
    for got, want in zip(out, _as_tuple(OPS[op](reference, x0.cpu(), vocab))):
        torch.testing.assert_close(got.cpu(), want, rtol=2**-23, atol=0)


def test_dense_latent_argmax(benchmark):
    """What gaussian_argmax replaces: the (B, L, V) latent of our stream and its argmax."""
    device = bench_device("reference")
    x0, vocab = _inputs(benchmark, device)
    benchmark.group = f"gaussian_argmax B·L={x0.numel()} V={vocab}"
    run = synced(lambda: reference.gaussian_argmax_dense(x0, GAMMA_T, vocab, seed=SEED), device)
    z = benchmark(run) if benchmark.disabled else benchmark.pedantic(run, rounds=3, iterations=1)
    assert z.shape == x0.shape and bool(((z >= 0) & (z < vocab)).all())


def test_cpu_targets_script_runs(capsys):
    from benchmarks import cpu_targets

    cpu_targets.main(["--smoke"])
    assert "| exact forward process" in capsys.readouterr().out
