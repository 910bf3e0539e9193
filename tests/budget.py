"""The error budget of ARCHITECTURE.md: a kernel's error is at most twice the error of the reference
run in the kernel's precision, plus that precision's rounding noise."""

from __future__ import annotations

import torch

FP32_EPS = 2.0**-24


def assert_within_budget(name: str, out: torch.Tensor, ref_low: torch.Tensor, ref_exact: torch.Tensor,
                         magnitude: torch.Tensor, *, noise_ulps: float = 16.0, eps: float = FP32_EPS) -> None:
    """``|out - ref_exact| <= 2 max|ref_low - ref_exact| + noise_ulps * eps * magnitude``, elementwise.

    Args:
        out: the kernel's result.
        ref_low: the reference run in the kernel's precision (float32).
        ref_exact: the reference run in float64.
        magnitude: elementwise bound on the sum of absolute terms that make each output (the reference
            run on absolute values), which scales the rounding noise.
    """
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_exact.shape)}"
    out, ref_low, ref_exact = out.double(), ref_low.double(), ref_exact.double()
    reference_error = float((ref_low - ref_exact).abs().max()) if ref_exact.numel() else 0.0
    allowed = 2 * reference_error + noise_ulps * eps * magnitude.double()
    excess = (out - ref_exact).abs() - allowed
    if excess.numel() and float(excess.max()) > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{name}: error {float((out - ref_exact).abs().flatten()[worst]):.3e} at flat index {worst} exceeds the "
            f"budget {float(allowed.flatten()[worst]):.3e} (reference fp32 error {reference_error:.3e})")


def max_error(out: torch.Tensor, ref_exact: torch.Tensor) -> float:
    return float((out.double() - ref_exact.double()).abs().max()) if out.numel() else 0.0
