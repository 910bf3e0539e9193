"""Microbenchmarks of the forward processes and the top-k relaxation on each backend, with the
published code's hot path (transcribed in ``benchmarks/cases.py``) and the reference beside them.

``pytest benchmarks/test_bench_forward_process.py --benchmark-only`` times B = 4, L = 256,
V = 50258 (the CPU target shape); with ``--benchmark-disable`` (CI) every body
runs once on 2 x 16 tokens and V = 1000 and checks the result against the reference. Every path runs on the GPU
when there is one, except ``impl="cpu"``; Triton only on a GPU (the interpreter is a correctness
tool, too slow to time). The published paths: the ``torch.randn`` (B, L, V) latent + argmax of the
Duo curriculum (one latent for both times of the pair), Duo's uniform corruption (``torch.rand`` <
1 - alpha, then ``torch.randint``) and Duo++'s top-k sampler (float64 torch ops);
``benchmarks/cpu_targets.py`` measures the CPU target ratios in one run.
"""

import pytest
import torch

import duo_kernels
from benchmarks.cases import _torch_latent_argmax, published_tempered_softmax_topk
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


def _published_usdm_forward(x0, alpha, vocab_size):
    """Duo's uniform-state corruption: each token moves with probability 1 - alpha to a uniform id."""
    move = torch.rand(x0.shape, device=x0.device) < 1 - alpha
    return torch.where(move, torch.randint(0, vocab_size, x0.shape, device=x0.device), x0)


def _published_topk(x0, vocab_size):
    """Duo++'s sampler (its one rule is our compat mode; it is the baseline of both modes' groups)."""
    a_tilde, s_tilde = reference.gaussian_params(torch.full((x0.shape[0],), GAMMA_T, dtype=torch.float64,
                                                            device=x0.device))
    weights, ids, z_t = published_tempered_softmax_topk(x0, a_tilde, s_tilde, vocab_size, 8, 1.0 / TAU)
    return ids, z_t


def _gammas(x0, *values):
    return [torch.full((x0.shape[0],), v, dtype=torch.float64, device=x0.device) for v in values]


# The published code's hot path of each op, on the same inputs (its own generator: same law, other draws)
PUBLISHED = {
    "gaussian_argmax": lambda x0, v: _torch_latent_argmax(x0, _gammas(x0, GAMMA_T), v)[0],
    "gaussian_argmax_pair": lambda x0, v: tuple(_torch_latent_argmax(x0, _gammas(x0, GAMMA_T, GAMMA_S), v)),
    "usdm_forward": lambda x0, v: _published_usdm_forward(x0, 0.6, v),
    "tempered_softmax_topk k=8": _published_topk,
    "tempered_softmax_topk k=8 compat": _published_topk,
}


@pytest.mark.parametrize("op", list(PUBLISHED))
def test_published(benchmark, op):
    """What each fused op replaces; the dense latents get 3 rounds (~1 s a call on 2 cores)."""
    device = bench_device("published")
    x0, vocab = _inputs(benchmark, device)
    benchmark.group = f"{op} B·L={x0.numel()} V={vocab}"
    run = synced(lambda: PUBLISHED[op](x0, vocab), device)
    dense = op.startswith("gaussian")
    out = benchmark.pedantic(run, rounds=3, iterations=1) if dense and not benchmark.disabled else benchmark(run)
    for z in _as_tuple(out):
        assert z.shape[:2] == x0.shape and bool(((z >= 0) & (z < vocab)).all())


def test_cpu_targets_script_runs(capsys):
    from benchmarks import cpu_targets

    cpu_targets.main(["--smoke"])
    assert "| exact forward process" in capsys.readouterr().out
