"""Microbenchmarks of the fused losses (fwd+bwd) against the reference paths of benchmarks/cases.py.

``pytest benchmarks/test_bench_losses.py --benchmark-only`` times B·L = 128 tokens at V = 50258 (bf16
logits; fp32 hidden states and head on CPU): each fused backend (``impl="cpu"`` on CPU;
``impl="triton"`` on a GPU only, the interpreter being a correctness tool) beside the published
baselines (Duo's fp32 loss; for DCD its fp32 and fp64 KL), our float64 reference (the correctness
oracle) and, for scale, ``F.cross_entropy``. With ``--benchmark-disable`` (CI) every body
runs once at V = 1000 and checks the fused result against the float64 reference.
"""

import pytest
import torch

import duo_kernels
from benchmarks.cases import (_cross_entropy_grad, _dcd_grad, _dcd_inputs, _duo_kl, _duo_nelbo_fp32, _linear_grad,
                              _linear_inputs, _nelbo_grad, _nelbo_inputs)
from duo_kernels.reference import dcd as reference_dcd
from duo_kernels.reference import nelbo as reference_nelbo
from benchmarks.timing import bench_device, synced

BENCH_SHAPE = dict(B=2, L=64, V=50258, d=256)
SMOKE_SHAPE = dict(B=2, L=16, V=1000, d=32)


def _setup(benchmark, path: str, group: str):
    """Shape and device of one path: "cpu" on CPU tensors, everything else on the GPU when there is one;
    "triton" only there."""
    if path == "triton" and not torch.cuda.is_available():
        pytest.skip("triton is timed on a GPU only; the interpreter is too slow to benchmark")
    device = torch.device("cuda" if path != "cpu" and torch.cuda.is_available() else "cpu")
    shape = SMOKE_SHAPE if benchmark.disabled else BENCH_SHAPE
    benchmark.group = f"{group} B={shape['B']} L={shape['L']} V={shape['V']}"
    return shape, device


def _with_impl(fn, impl):
    return lambda *args, **kwargs: fn(*args, **kwargs, impl=impl)


NELBO_PATHS = {
    "cpu": lambda i: _nelbo_grad(_with_impl(duo_kernels.usdm_nelbo, "cpu"), i),
    "triton": lambda i: _nelbo_grad(_with_impl(duo_kernels.usdm_nelbo, "triton"), i),
    "duo fp32": lambda i: _nelbo_grad(_duo_nelbo_fp32, i),
    "reference fp64": lambda i: _nelbo_grad(reference_nelbo.usdm_nelbo, i),
    "F.cross_entropy": _cross_entropy_grad,
}


@pytest.mark.parametrize("path", list(NELBO_PATHS))
def test_usdm_nelbo(benchmark, path):
    shape, device = _setup(benchmark, path, "usdm_nelbo fwd+bwd")
    inputs = _nelbo_inputs(shape, device)
    (grad,) = benchmark(synced(lambda: NELBO_PATHS[path](inputs), device))
    assert grad.shape == inputs["logits"].shape
    if path in ("cpu", "triton"):
        (expected,) = NELBO_PATHS["reference fp64"](inputs)
        torch.testing.assert_close(grad.float(), expected.float(), rtol=2**-7, atol=1e-6)


LINEAR_PATHS = {
    "cpu": lambda i: _linear_fused(i, "cpu"),
    "triton": lambda i: _linear_fused(i, "triton"),
    "F.linear + duo fp32": lambda i: _linear_grad(_duo_nelbo_fp32, i),
    "F.linear + usdm_nelbo": lambda i: _linear_grad(duo_kernels.usdm_nelbo, i),
}


def _linear_fused(inputs, impl):
    params = [inputs["hidden"], inputs["weight"], inputs["bias"]]
    args = {k: inputs[k] for k in ("z_t", "x0", "alpha_t", "dalpha_t")}
    return torch.autograd.grad(duo_kernels.linear_usdm_nelbo(*params, **args, impl=impl).sum(), params)


@pytest.mark.parametrize("path", list(LINEAR_PATHS))
def test_linear_usdm_nelbo(benchmark, path):
    shape, device = _setup(benchmark, path, "linear_usdm_nelbo fwd+bwd")
    inputs = _linear_inputs(shape, device)
    if device.type == "cpu":
        # CPUs without bf16 matrix units run bf16 GEMMs ~100x slower than fp32 (15 s a call here)
        for key in ("hidden", "weight", "bias"):
            inputs[key] = inputs[key].detach().float().requires_grad_()
    grads = benchmark(synced(lambda: LINEAR_PATHS[path](inputs), device))
    assert [g.shape for g in grads] == [inputs[k].shape for k in ("hidden", "weight", "bias")]
    if path in ("cpu", "triton"):
        for got, expected in zip(grads, _linear_grad(reference_nelbo.usdm_nelbo, inputs)):
            scale = float(expected.abs().max())
            torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05 * scale)


DCD_PATHS = {
    "cpu": lambda i: _dcd_grad(_with_impl(duo_kernels.dcd_kl, "cpu"), i),
    "triton": lambda i: _dcd_grad(_with_impl(duo_kernels.dcd_kl, "triton"), i),
    "duo fp32": lambda i: _dcd_grad(lambda s, t: _duo_kl(s, t, torch.float32), i),
    "duo fp64": lambda i: _dcd_grad(lambda s, t: _duo_kl(s, t, torch.float64), i),
    "reference fp64": lambda i: _dcd_grad(reference_dcd.dcd_kl, i),
}


@pytest.mark.parametrize("path", list(DCD_PATHS))
def test_dcd_kl(benchmark, path):
    shape, device = _setup(benchmark, path, "dcd_kl reverse fwd+bwd")
    inputs = _dcd_inputs(shape, device)
    (grad,) = benchmark(synced(lambda: DCD_PATHS[path](inputs), device))
    assert grad.shape == inputs["student"].shape
    if path in ("cpu", "triton"):
        (expected,) = DCD_PATHS["reference fp64"](inputs)
        torch.testing.assert_close(grad.float(), expected.float(), rtol=2**-7, atol=1e-6)
