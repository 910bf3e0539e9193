"""Statistical helpers for the distribution tests (no scipy needed)."""

from __future__ import annotations

import torch


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs``.

    Cells whose expected count is below ``min_expected`` are pooled into one cell.
    """
    counts = counts.to(torch.float64).flatten()
    probs = probs.to(torch.float64).flatten()
    probs = probs / probs.sum()
    n = counts.sum()
    expected = n * probs
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        if expected[-1] == 0:
            assert counts[-1] == 0, "draws fell where the probability is zero"
            counts, expected = counts[:-1], expected[:-1]
    stat = float(((counts - expected) ** 2 / expected).sum())
    return chi2_sf(stat, counts.numel() - 1)


def normal_sf(z: float) -> float:
    return float(0.5 * torch.special.erfc(torch.tensor(z / 2**0.5, dtype=torch.float64)))
