"""The examples in the docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "duo_kernels.rng",
    "duo_kernels.reference.transform",
    "duo_kernels.reference.forward_process",
    "duo_kernels.reference.curriculum",
    "duo_kernels.reference.nelbo",
    "duo_kernels.reference.dcd",
    "duo_kernels.reference.sampling",
    "duo_kernels.ops.forward_process",
    "duo_kernels.ops.curriculum",
    "duo_kernels.ops.sampling",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import torch

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
