"""duo_kernels.nn.RelaxedEmbedding: initialisation, the three input forms, gradients, bad inputs."""

import doctest
import math

import pytest
import torch

import duo_kernels
from duo_kernels import nn as duo_nn
from duo_kernels import reference
from duo_kernels.nn import RelaxedEmbedding


def test_init_is_uniform_one_over_sqrt_dim():
    torch.manual_seed(0)
    weight = RelaxedEmbedding(1000, 64).weight.detach()
    bound = 1 / math.sqrt(64)
    assert weight.shape == (1000, 64) and weight.dtype == torch.float32
    assert float(weight.abs().max()) <= bound
    assert float(weight.abs().max()) > 0.99 * bound
    assert abs(float(weight.var()) - bound**2 / 3) < 0.05 * bound**2 / 3


def test_hard_ids():
    emb = RelaxedEmbedding(50, 8)
    ids = torch.tensor([[3, 7, 49], [0, 0, 1]])
    h = emb(ids)
    assert torch.equal(h, emb.weight[ids])
    h.sum().backward()
    assert float(emb.weight.grad[0, 0]) == 2.0


@pytest.mark.parametrize("as_tuple", [False, True])
def test_relaxed_ids_and_weights(as_tuple):
    emb = RelaxedEmbedding(50, 8, deterministic=True)
    ids = torch.randint(0, 50, (2, 3, 4))
    weights = torch.rand(2, 3, 4)
    h = emb((ids, weights)) if as_tuple else emb(ids, weights)
    torch.testing.assert_close(h, reference.relaxed_embedding(emb.weight.detach(), ids, weights))
    h.sum().backward()
    assert emb.weight.grad is not None


def test_dense_curriculum_is_the_op():
    emb = RelaxedEmbedding(50, 8)
    x0 = torch.tensor([[1, 2, 3]])
    h, z_t = emb.dense_curriculum(x0, -3.0, 1e-2, seed=4)
    ref_h, ref_z = duo_kernels.tempered_softmax_embedding(x0, -3.0, 1e-2, emb.weight, seed=4)
    assert torch.equal(z_t, ref_z) and torch.equal(h, ref_h)
    h.sum().backward()
    assert emb.weight.grad.shape == (50, 8)


def test_topk_curriculum_is_the_op():
    emb = RelaxedEmbedding(50, 8, impl="reference")
    x0 = torch.tensor([[1, 2, 3]])
    h, z_t = emb.topk_curriculum(x0, -3.0, 2, 1e-2, seed=4)
    ref_h, ref_z = duo_kernels.tempered_softmax_topk_embedding(x0, -3.0, 50, 2, 1e-2, emb.weight, seed=4)
    assert torch.equal(z_t, ref_z)
    torch.testing.assert_close(h, ref_h)


@pytest.mark.parametrize("call,word", [
    (lambda e: e(torch.tensor([[50]])), "ids"),
    (lambda e: e(torch.tensor([[-1]])), "ids"),
    (lambda e: e(torch.tensor([[1.0]])), "ids"),
    (lambda e: e((torch.zeros(1, 1, 2, dtype=torch.int64),)), "ids"),
    (lambda e: e(torch.zeros(1, 1, 2, dtype=torch.int64), torch.ones(1, 1, 3)), "weights"),
    (lambda e: e.dense_curriculum(torch.tensor([[1]]), -3.0, 0.0), "tau"),
    (lambda e: e.topk_curriculum(torch.tensor([[1]]), -3.0, 50, 1e-3), "k"),
])
def test_bad_inputs(call, word):
    with pytest.raises(ValueError, match=word):
        call(RelaxedEmbedding(50, 8))


@pytest.mark.parametrize("kwargs,word", [
    (dict(vocab_size=1, dim=4), "vocab_size"),
    (dict(vocab_size=10, dim=0), "dim"),
    (dict(vocab_size=10, dim=4, impl="gpu"), "impl"),
    (dict(vocab_size=10, dim=4, deterministic="yes"), "deterministic"),
])
def test_bad_construction(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RelaxedEmbedding(**kwargs)


def test_repr_and_state_dict():
    emb = RelaxedEmbedding(10, 4, impl="cpu")
    assert repr(emb) == "RelaxedEmbedding(10, 4, impl='cpu')"
    assert list(emb.state_dict()) == ["weight"]


def test_docstring_examples():
    result = doctest.testmod(duo_nn, extraglobs={"torch": torch},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
