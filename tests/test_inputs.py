"""Inputs at the edges of what the ops accept: NumPy scalars where Python numbers go, a vocabulary of one."""

import numpy as np
import pytest
import torch

import duo_kernels


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    logits = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    expected = duo_kernels.usdm_nelbo(logits, ids, ids, 0.5, -1.0, impl="reference")
    for alpha, dalpha in ((np.float32(0.5), np.float64(-1.0)), (np.float64(0.5), np.int64(-1))):
        got = duo_kernels.usdm_nelbo(logits, ids, ids, alpha, dalpha, impl="reference")
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="alpha_t must be a number or a tensor, got bool"):
        duo_kernels.usdm_nelbo(logits, ids, ids, np.bool_(True), -1.0, impl="reference")


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_a_vocabulary_of_one_names_the_logits(impl):
    logits = torch.zeros(1, 2, 1)
    x = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"logits\.shape\[-1\] must be in \[2, 2\^31\], got 1"):
        duo_kernels.ancestral_step(logits, x, 0.5, 0.9, impl=impl)
