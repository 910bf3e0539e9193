"""The examples in duo_model's docstrings run and print what they say."""

import doctest
import importlib

import pytest
import torch

MODULES = ["duo_model.ops", "duo_model.dit", "duo_model.data", "duo_model.config", "duo_model.sample",
           "duo_model.published", "duo_model.ar_sample"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
