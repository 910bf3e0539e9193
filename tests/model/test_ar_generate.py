"""Autoregressive generation with a KV cache: cached logits equal the full forward's, greedy decoding
equals a loop without a cache, draws follow the nucleus distribution, a seed fixes the text, and
`duo sample` runs on AR checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from duo_model.ar_sample import generate_ar, next_token
from duo_model.cli import main
from duo_model.dit import DiT, DiTConfig, KVCache
from duo_model.train import train
from tests.model.helpers import tiny_config
from tests.stats import chi2_test

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    """A causal DiT-demo whose zero-initialised layers (adaLN, head) are filled too: a fresh model's
    logits are all zero, which any cache would reproduce."""
    torch.manual_seed(0)
    net = DiT(DiTConfig.preset("demo", vocab_size=VOCAB, n_blocks=2, causal=True)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@torch.no_grad()
def test_cached_decoding_gives_the_full_forwards_logits_at_every_position(model):
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    sigma = torch.zeros(3)
    full = model(ids, sigma)
    for chunks in ([1] * 24, [5, 1, 1, 1, 7, 1, 8]):  # one-token steps; prefills, steps, a mid-sequence chunk
        cache = KVCache(24)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(ids[:, start:start + n], sigma, cache=cache))
            start += n
        cached = torch.cat(parts, dim=1)
        assert cache.length == 24
        # fp32 rounding, on logits of up to ~200: the full forward itself moves by 1e-4 between batch sizes
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))
    assert full.std() > 1  # a model with real logits


@torch.no_grad()
def test_greedy_generation_equals_decoding_without_a_cache(model):
    ids, stats = generate_ar(model, num_samples=3, seq_len=20, bos_id=1, greedy=True, batch_size=2)
    x = torch.full((3, 1), 1)
    for _ in range(19):
        x = torch.cat([x, model(x, torch.zeros(3))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, x)
    assert stats["nfe"] == 19 and stats["seconds_per_sample"] > 0
    assert len(set(x[0].tolist())) > 2  # not a constant sequence


def test_the_same_seed_gives_the_same_samples(model):
    kwargs = dict(num_samples=4, seq_len=16, bos_id=0, temperature=1.5, top_p=0.9, batch_size=2)
    first, _ = generate_ar(model, seed=7, **kwargs)
    assert torch.equal(first, generate_ar(model, seed=7, **kwargs)[0])
    assert not torch.equal(first, generate_ar(model, seed=8, **kwargs)[0])


def test_draws_follow_the_tempered_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).repeat(20000, 1)
    temperature, top_p = 1.5, 0.8
    draws = next_token(logits, seed=3, temperature=temperature, top_p=top_p)
    probs = torch.softmax(logits[0].double() / temperature, -1)
    mass_before = probs.cumsum(0) - probs  # sorted descending already
    probs = torch.where(mass_before <= top_p, probs, 0.0)
    assert probs[3:].sum() == 0 and probs[:3].min() > 0  # the nucleus cuts off the tail here
    assert chi2_test(torch.bincount(draws, minlength=6), probs) > 1e-4
    # a nucleus of one token is greedy decoding
    assert torch.equal(next_token(logits[:5], seed=0, top_p=0.01), logits[:5].argmax(-1))


def test_bad_inputs_are_rejected(model):
    with pytest.raises(ValueError, match="causal"):
        DiT(DiTConfig.preset("demo", vocab_size=VOCAB))(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1),
                                                         cache=KVCache(2))
    cache = KVCache(4)
    model(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2), cache=cache)
    with pytest.raises(ValueError, match="holds 4 positions; 3 are filled and 2 more"):
        model(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2), cache=cache)
    for sigma in (torch.zeros(1), torch.ones(2)):  # another batch, another conditioning
        with pytest.raises(ValueError, match="same sigma"):
            model(torch.zeros(len(sigma), 1, dtype=torch.int64), sigma, cache=cache)
    for bad in (dict(greedy=True, temperature=0.5), dict(temperature=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            generate_ar(model, num_samples=1, seq_len=4, bos_id=0, **bad)


def test_duo_sample_runs_on_an_ar_checkpoint(corpus, cache, tmp_path, capsys):
    train(tiny_config(corpus, tmp_path / "ar", cache, algo="ar", max_steps=4))
    out = tmp_path / "ar-samples.json"
    assert main(["sample", str(tmp_path / "ar"), "num_samples=3", "batch_size=2", "temperature=0.9", "top_p=0.95",
                 f"out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    record = json.loads(out.read_text())
    assert summary["algo"] == "ar" and summary["nfe"] == 31 and len(record["samples"]) == 3
    assert all(len(s["ids"]) == 32 and s["ids"][0] == 256 for s in record["samples"])  # bytes: BOS = 256
    assert main(["sample", str(tmp_path / "ar"), "steps=8"]) == 2
    assert "steps cannot be used with an autoregressive" in capsys.readouterr().err
    train(tiny_config(corpus, tmp_path / "duo", cache, max_steps=2))
    assert main(["sample", str(tmp_path / "duo"), "greedy=true"]) == 2
    assert "greedy cannot be used with a Duo checkpoint" in capsys.readouterr().err
