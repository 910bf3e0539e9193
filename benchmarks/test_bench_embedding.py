"""Microbenchmarks of the curriculum's embedding layer, forward + backward, each backend beside the
path the public Duo / Duo++ code runs.

``pytest benchmarks/test_bench_embedding.py --benchmark-only`` times ``BENCH`` shapes (V = 50258);
with ``--benchmark-disable`` (CI) each body runs once at ``SMOKE`` shapes and checks its result
against the reference. Triton is timed on a GPU only (the interpreter is a correctness tool).

- ``relaxed_embedding`` (k = 16) vs ``F.embedding_bag(mode="sum", per_sample_weights=...)`` under
  autograd, what Duo++ runs;
- ``tempered_softmax_embedding`` vs the published dense curriculum (one-hot + ``torch.randn`` latent,
  softmax saved for backward, fp32 GEMM; :func:`benchmarks.cases._dense_published`). The CPU path
  regenerates the Philox normals in plain PyTorch (the reference stream, ~60 ms per 2^18 normals on
  2 cores), so on CPU it trades speed for bounded memory and the reference's exact z_t.
"""

import pytest
import torch

from benchmarks.cases import (_dense_fused, _dense_inputs, _dense_published, _relaxed_embedding_bag, _relaxed_fused,
                              _relaxed_inputs)
from duo_kernels import _dispatch
from benchmarks.timing import bench_device, synced

BENCH = dict(relaxed=dict(B=4, L=256, V=50258, d=256, k=16), dense=dict(B=1, L=16, V=50258, d=256))
SMOKE = dict(relaxed=dict(B=2, L=8, V=1000, d=32, k=16), dense=dict(B=1, L=4, V=300, d=16))


def _skip_unless_runnable(impl: str, device: torch.device) -> None:
    if impl == "triton":
        if device.type != "cuda":
            pytest.skip("triton is timed on a GPU only; the interpreter is too slow to benchmark")
        ok, why = _dispatch.backend_status(impl, device)
        if not ok:
            pytest.skip(why)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton", "embedding_bag"])
def test_relaxed_embedding(benchmark, impl, monkeypatch):
    device = bench_device(impl)
    _skip_unless_runnable(impl, device)
    shape = SMOKE["relaxed"] if benchmark.disabled else BENCH["relaxed"]
    benchmark.group = f"relaxed_embedding fwd+bwd k={shape['k']} V={shape['V']} d={shape['d']}"
    inputs = _relaxed_inputs(shape, device)
    if impl != "embedding_bag":
        monkeypatch.setenv(_dispatch.ENV_VAR, impl)
    run = _relaxed_embedding_bag if impl == "embedding_bag" else _relaxed_fused
    d_weight, d_weights = benchmark(synced(lambda: run(inputs), device))
    expected = _relaxed_embedding_bag(inputs)
    torch.testing.assert_close(d_weight, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_weights, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton", "published"])
def test_tempered_softmax_embedding(benchmark, impl, monkeypatch):
    device = bench_device(impl)
    _skip_unless_runnable(impl, device)
    shape = SMOKE["dense"] if benchmark.disabled else BENCH["dense"]
    benchmark.group = f"tempered_softmax_embedding fwd+bwd B*L={shape['B'] * shape['L']} V={shape['V']} d={shape['d']}"
    inputs = _dense_inputs(shape, device)
    if impl != "published":
        monkeypatch.setenv(_dispatch.ENV_VAR, impl)
    run = _dense_published if impl == "published" else _dense_fused
    (d_weight,), z_t = benchmark(synced(lambda: run(inputs), device))
    assert d_weight.shape == inputs["weight"].shape and z_t.shape == inputs["x0"].shape
    if impl != "published":  # same stream as the reference: same z_t, dE to fp32 rounding
        monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
        (ref_d_weight,), ref_z_t = _dense_fused(inputs)
        assert torch.equal(z_t, ref_z_t)
        torch.testing.assert_close(d_weight, ref_d_weight, rtol=1e-5, atol=1e-5)
