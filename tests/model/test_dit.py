"""The DiT of duo-math §7: sizes, inputs, zero-initialised head, causality."""

import pytest
import torch

from duo_model import ops
from duo_model.dit import DiT, DiTConfig, count_parameters


def meta_model(preset: str, vocab_size: int = 50258) -> DiT:
    with torch.device("meta"):
        return DiT(DiTConfig.preset(preset, vocab_size))


def test_small_has_the_papers_169_6m_parameters():
    # duo-math §7: embed 38.60M + blocks 92.13M + output 38.85M + time MLP 0.05M at V = 50258.
    assert count_parameters(meta_model("small")) == 169_627_218


@pytest.mark.parametrize("preset, millions", [("tiny", 33.8), ("medium", 424.5)])
def test_other_presets_match_the_config_table(preset, millions):
    assert count_parameters(meta_model(preset)) / 1e6 == pytest.approx(millions, abs=0.1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=50, d_model=32, n_blocks=2, n_heads=2, cond_dim=16, dropout=0.0))
    with torch.no_grad():  # a trained-looking head and modulation instead of the zero init
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return m


def test_inputs_ids_topk_and_precomputed_h_agree(model):
    ids = torch.randint(0, 50, (3, 7))
    sigma = torch.rand(3)
    logits = model(ids, sigma)
    assert logits.shape == (3, 7, 50) and logits.dtype == torch.float32
    # A one-hot top-k relaxation and the precomputed embedding are the same input as the ids.
    topk = (ids[..., None], torch.ones(3, 7, 1))
    torch.testing.assert_close(model(topk, sigma), logits)
    torch.testing.assert_close(model(model.embedding.weight[ids], sigma), logits)
    # sigma (B, 1) is averaged over its last dimension (duo-math §3.6).
    torch.testing.assert_close(model(ids, sigma[:, None]), logits)


def test_return_hidden_feeds_the_fused_head(model):
    ids = torch.randint(0, 50, (2, 5))
    hidden = model(ids, torch.ones(2), return_hidden=True)
    assert hidden.shape == (2, 5, 32)
    torch.testing.assert_close(torch.nn.functional.linear(hidden, model.output.weight, model.output.bias),
                               model(ids, torch.ones(2)))
    x0 = torch.randint(0, 50, (2, 5))
    alpha = torch.full((2,), 0.5)
    fused = ops.linear_usdm_nelbo(hidden, model.output.weight, model.output.bias, ids, x0, alpha, -torch.ones(2))
    torch.testing.assert_close(fused, ops.usdm_nelbo(model(ids, torch.ones(2)), ids, x0, alpha, -torch.ones(2)))


def test_a_fresh_model_predicts_the_uniform_distribution():
    model = DiT(DiTConfig.preset("demo", vocab_size=300))
    logits = model(torch.randint(0, 300, (2, 9)), torch.rand(2))
    assert torch.count_nonzero(logits) == 0  # adaLN-zero and a zero-initialised head


def test_causal_variant_ignores_the_future(model):
    causal = DiT(DiTConfig(**{**model.config.to_dict(), "causal": True}))
    causal.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 50
    zero = torch.zeros(1)
    torch.testing.assert_close(causal(ids, zero)[:, :5], causal(changed, zero)[:, :5])
    assert not torch.allclose(model(ids, zero)[:, :5], model(changed, zero)[:, :5])


def test_bad_shapes_are_rejected(model):
    with pytest.raises(ValueError, match="sigma must have shape"):
        model(torch.randint(0, 50, (2, 4)), torch.ones(3))
    with pytest.raises(ValueError, match="h0 of shape"):
        model(torch.randn(2, 4, 31), torch.ones(2))
    with pytest.raises(ValueError, match="n_heads"):
        DiTConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        DiTConfig.preset("huge", 10)
