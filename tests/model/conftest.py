"""Fixtures of the duo_model tests: a generated corpus, a shared cache, one torch thread."""

import pytest

from tests.model.helpers import write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tests run many tiny ops; on a shared 2-core machine one thread is ~10x faster than two."""
