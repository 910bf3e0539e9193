"""The published Duo models, loaded into :class:`duo_model.dit.DiT` exactly.

The Duo authors published DiT backbones trained with their code: on the Hugging Face Hub
(``s-sahoo/duo``, ``s-sahoo/duo-distilled``: a ``config.json`` and a ``model.safetensors``) and as
Lightning ``.ckpt`` files of their trainer. Their backbone computes the same equations as our
:class:`~duo_model.dit.DiT` (checked against an independent re-derivation in the tests):

    h = E[x];   c = SiLU(MLP(sinusoidal_256(sigma)))             embedding, time embedder of sigma
    per block:  (sh1, sc1, g1, sh2, sc2, g2) = Linear(c)         adaLN modulation
                h = h + g1 * Attn(RoPE, LN(h) (1 + sc1) + sh1)   (dropout before the gate, inference: none)
                h = h + g2 * MLP(LN(h) (1 + sc2) + sh2)
    logits = Linear(LN(h) (1 + sc) + sh),  (sh, sc) = Linear(c)  final adaLN layer

with bias-free LayerNorms in fp32, rotary embeddings on non-interleaved halves (``rotate_half``,
base 10000), tanh-GELU, and ``sigma = -log alpha_t`` of the log-linear schedule
``alpha_t = 1 - (1 - 1e-3) t``: exactly what :func:`duo_model.sample.generate` passes. So loading is
renaming: :data:`KEY_TABLE` maps every published tensor to ours.

Sources (:func:`load_published`):

- ``hf:OWNER/NAME`` or ``OWNER/NAME``: a Hub repository, downloaded with ``huggingface_hub`` when it
  is installed and online (``pip install duo-kernels[hub]``); otherwise the error says which folder to pass;
- a snapshot folder holding ``config.json`` (fields ``vocab_size``, ``hidden_dim``, ``cond_dim``,
  ``n_blocks``, ``n_heads``, ``model_length``, ...) and ``model.safetensors`` (keys ``backbone.*``);
- a Lightning ``.ckpt`` of the Duo code: ``state_dict`` (keys ``backbone.*``), the EMA
  (``ema["shadow_params"]``: the backbone's parameters in order, buffers excluded; used by default,
  as the Duo code does for evaluation) and ``hyper_parameters["config"]`` (the Hydra config: sizes
  in ``model``, the schedule in ``noise``). A ``.ckpt`` is a pickle: it is read by
  :func:`safe_torch_load`, which never imports or calls anything outside a short allowlist.

Every tensor must be there and nothing else (``backbone.rotary_emb.inv_freq``, a buffer, is
checked against the formula); a config that disagrees with the weights names the field; a broken
file names the file. The tokenizer is GPT-2's BPE plus ``[PAD]`` = 50257 (V = 50258), offline.

Example::

    >>> model, info = load_published("hf:s-sahoo/duo-distilled")          # doctest: +SKIP
    >>> ids, _ = generate(model, num_samples=4, seq_len=info["seq_len"], steps=8)   # doctest: +SKIP
    >>> texts = info["tokenizer"].batch_decode(ids)                         # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from duo_model.checkpoint import CheckpointError
from duo_model.config import ConfigError
from duo_model.data import GPT2Tokenizer
from duo_model.dit import ROPE_BASE, TIME_FREQUENCIES, DiT, DiTConfig

HF_PREFIX = "hf:"
BACKBONE = "backbone."
ROTARY_BUFFER = "rotary_emb.inv_freq"

# Published name -> our name, in the published backbone's parameter order (the order of its EMA
# list). "{i}" stands for the block index.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("vocab_embed.embedding", "embedding.weight"),
    ("sigma_map.mlp.0.weight", "time_mlp.0.weight"),
    ("sigma_map.mlp.0.bias", "time_mlp.0.bias"),
    ("sigma_map.mlp.2.weight", "time_mlp.2.weight"),
    ("sigma_map.mlp.2.bias", "time_mlp.2.bias"),
    ("blocks.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    ("blocks.{i}.attn_qkv.weight", "blocks.{i}.qkv.weight"),
    ("blocks.{i}.attn_out.weight", "blocks.{i}.attn_out.weight"),
    ("blocks.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    ("blocks.{i}.mlp.0.weight", "blocks.{i}.mlp.0.weight"),
    ("blocks.{i}.mlp.0.bias", "blocks.{i}.mlp.0.bias"),
    ("blocks.{i}.mlp.2.weight", "blocks.{i}.mlp.2.weight"),
    ("blocks.{i}.mlp.2.bias", "blocks.{i}.mlp.2.bias"),
    ("blocks.{i}.adaLN_modulation.weight", "blocks.{i}.adaLN_modulation.weight"),
    ("blocks.{i}.adaLN_modulation.bias", "blocks.{i}.adaLN_modulation.bias"),
    ("output_layer.norm_final.weight", "norm_final.weight"),
    ("output_layer.linear.weight", "output.weight"),
    ("output_layer.linear.bias", "output.bias"),
    ("output_layer.adaLN_modulation.weight", "adaLN_final.weight"),
    ("output_layer.adaLN_modulation.bias", "adaLN_final.bias"),
)


def key_mapping(n_blocks: int) -> list[tuple[str, str]]:
    """``(published name, our name)`` for every parameter of an ``n_blocks`` backbone, in the published
    parameter order (without the ``backbone.`` prefix).

    Example::

        >>> rows = key_mapping(12)
        >>> len(rows), rows[0], rows[6]
        (130, ('vocab_embed.embedding', 'embedding.weight'), ('blocks.0.attn_qkv.weight', 'blocks.0.qkv.weight'))
    """
    rows = []
    block_rows = [row for row in KEY_TABLE if "{i}" in row[0]]
    for published, ours in KEY_TABLE:
        if "{i}" not in published:
            rows.append((published, ours))
        elif (published, ours) == block_rows[0]:
            rows += [(p.format(i=i), o.format(i=i)) for i in range(n_blocks) for p, o in block_rows]
    return rows


# ---- safe unpickling -------------------------------------------------------------------------------

class Inert:
    """A stand-in for a class a pickle names but that is not on the allowlist (a tokenizer, an
    OmegaConf node, or anything hostile). Nothing of the original runs: the constructor arguments
    land in ``args``/``kwargs``, the pickled state in ``state``, dict items in ``items`` and list items
    in ``list_items``. ``qualname`` is the name the pickle gave."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls __new__ alone, REDUCE calls the class
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self):
        return f"<inert {self.qualname}>"


_ALLOWED = {
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda: torch._utils._rebuild_parameter,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowlisted globals and torch dtypes; every other name becomes an
    :class:`Inert` subclass, so REDUCE/NEWOBJ/BUILD on it only record their arguments."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]()
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (Inert,), {"qualname": f"{module}.{name}"})


class _RestrictedPickle:
    """The ``pickle_module`` handed to ``torch.load``: torch restores its storages, we resolve names."""

    Unpickler = _RestrictedUnpickler
    __name__ = "duo_model.published.restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | Path):
    """A ``torch.save`` file (e.g. a Lightning ``.ckpt``) on the CPU, without running pickled code:
    only tensors, containers, ``OrderedDict`` and torch dtypes are rebuilt; every other class becomes
    an :class:`Inert` placeholder whose fields can be read (see :func:`plain`).

    Raises :class:`CheckpointError` naming the file if it is truncated or not a torch file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickle, weights_only=False)
    except Exception as exc:  # zipfile, pickle and torch errors of a broken file
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def plain(obj):
    """Plain Python data from an unpickled config: dicts, lists and values; an OmegaConf container
    (an :class:`Inert` whose state holds ``_content``) or value node (``_val``) is unwrapped."""
    if isinstance(obj, Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return plain(state["_content"])
        if "_val" in state:
            return plain(state["_val"])
        if obj.items:
            return plain(obj.items)
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# ---- reading the two layouts -----------------------------------------------------------------------

# Each size and setting the loader reads: (name in a snapshot's config.json, path in a .ckpt's Hydra
# config, default when absent; None: required). A snapshot has no schedule setting: the published
# models use the Duo code's default log-linear eps.
CONFIG_FIELDS = {
    "vocab_size": ("vocab_size", None, None),  # a .ckpt keeps it in hyper_parameters["vocab_size"]
    "d_model": ("hidden_dim", "model.hidden_size", None),
    "cond_dim": ("cond_dim", "model.cond_dim", None),
    "n_blocks": ("n_blocks", "model.n_blocks", None),
    "n_heads": ("n_heads", "model.n_heads", None),
    "dropout": ("dropout", "model.dropout", 0.1),
    "causal": ("causal", "algo.causal_attention", False),
    "seq_len": ("model_length", "model.length", 1024),
    "noise_eps": (None, "noise.eps", 1e-3),
}


def _read_fields(config: dict, layout: int, source: str) -> dict[str, tuple[str, object] | None]:
    """``{our field: (the config's name for it, value)}`` for layout 0 (snapshot) or 1 (.ckpt)."""
    fields = {}
    for key, row in CONFIG_FIELDS.items():
        name, default = row[layout], row[2]
        node = config
        for part in (name or "").split(".") if name else ():
            node = node.get(part) if isinstance(node, dict) else None
        if name is None or node is None:
            if default is None and name is not None:
                raise CheckpointError(f"{source}: the config has no {name}")
            node = default
        fields[key] = None if node is None else (name or key, node)
    return fields


def _read_snapshot(folder: Path) -> tuple[dict, dict[str, torch.Tensor], list | None, dict]:
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise CheckpointError(f"{folder}: a published snapshot folder needs config.json and "
                                  f"model.safetensors; {file.name} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    try:
        tensors = load_tensors(weights_file.read_bytes())
    except Exception as exc:  # safetensors raises its own error type for a broken header or size
        raise CheckpointError(f"{weights_file}: not a readable safetensors file (truncated or corrupt?): "
                              f"{exc}") from None
    fields = _read_fields(config, 0, str(config_file))
    return fields, tensors, None, {"config": config, "files": [str(config_file), str(weights_file)]}


def _read_lightning(file: Path) -> tuple[dict, dict[str, torch.Tensor], list | None, dict]:
    ckpt = safe_torch_load(file)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{file}: not a Lightning checkpoint of the Duo code (no 'state_dict')")
    hparams = plain(ckpt.get("hyper_parameters") or {})
    config = hparams.get("config") if isinstance(hparams, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: hyper_parameters['config'] (the Duo code's Hydra config) is missing or "
                              "unreadable; the model sizes live in it")
    source = f"{file} hyper_parameters['config']"
    fields = _read_fields(config, 1, source)
    vocab = hparams.get("vocab_size")
    fields["vocab_size"] = ("vocab_size", vocab) if isinstance(vocab, int) else None
    noise = (config.get("noise") or {}).get("type", "log-linear")
    if noise != "log-linear":
        raise CheckpointError(f"{source}: noise.type={noise!r}; the sampler here uses the log-linear schedule")
    shadow = None
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and ema.get("shadow_params") is not None:
        shadow = ema["shadow_params"]
        if not isinstance(shadow, (list, tuple)):
            raise CheckpointError(f"{file}: ema['shadow_params'] is a {type(shadow).__name__}, expected a list")
    state = {"config": config, "files": [str(file)], "step": ckpt.get("global_step")}
    return fields, ckpt["state_dict"], shadow, state


# ---- loading ---------------------------------------------------------------------------------------

def _download(repo_id: str) -> Path:
    hint = (f"download it where there is network (`huggingface-cli download {repo_id} config.json "
            f"model.safetensors --local-dir DIR`) and pass that folder: checkpoint=DIR")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise CheckpointError(f"{HF_PREFIX}{repo_id} needs the huggingface_hub package (pip install "
                              f"duo-kernels[hub]) to download; or {hint}")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as exc:  # offline, unknown repository, no permission: all end the same way
        raise CheckpointError(f"could not download {HF_PREFIX}{repo_id} ({type(exc).__name__}: {exc}); "
                              f"{hint}") from None


def resolve_source(source: str | Path) -> Path:
    """A local snapshot folder or ``.ckpt`` file for ``source`` (downloading an ``hf:`` repository)."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        return _download(text[len(HF_PREFIX):])
    path = Path(text).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        return _download(text)
    raise CheckpointError(f"no published model at {text!r}: give hf:OWNER/NAME, a snapshot folder "
                          "(config.json + model.safetensors) or a Lightning .ckpt file")


def _check_sizes(fields: dict, weights: dict[str, torch.Tensor], source: str) -> DiTConfig:
    """The DiTConfig of the weights, after checking every config field the weights reveal."""
    embedding, time_in = weights["vocab_embed.embedding"], weights["sigma_map.mlp.0.weight"]
    found = {"vocab_size": embedding.shape[0], "d_model": embedding.shape[1], "cond_dim": time_in.shape[0]}
    for key, actual in found.items():
        if fields[key] is not None and fields[key][1] != actual:
            name, value = fields[key]
            raise CheckpointError(f"{source}: config field {name}={value} disagrees with the weights "
                                  f"({actual}, from the embedding and time-embedder shapes)")
    name, n_heads = fields["n_heads"]
    d_model = found["d_model"]
    if not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
        raise CheckpointError(f"{source}: config field {name}={n_heads} does not divide hidden size {d_model} "
                              "into heads of even size")
    if ROTARY_BUFFER in weights and 2 * weights[ROTARY_BUFFER].numel() != d_model // n_heads:
        raise CheckpointError(f"{source}: config field {name}={n_heads} gives heads of {d_model // n_heads}, "
                              f"the weights' rotary table has {2 * weights[ROTARY_BUFFER].numel()}")
    if time_in.shape[1] != TIME_FREQUENCIES:
        raise CheckpointError(f"{source}: the time embedder takes {time_in.shape[1]} frequencies, expected "
                              f"{TIME_FREQUENCIES}")
    mlp_ratio, rest = divmod(weights["blocks.0.mlp.0.weight"].shape[0], d_model)
    if rest or not mlp_ratio:
        raise CheckpointError(f"{source}: {BACKBONE}blocks.0.mlp.0.weight has {rest + mlp_ratio * d_model} rows, "
                              f"not a multiple of the hidden size {d_model}")
    if fields["causal"][1]:
        raise CheckpointError(f"{source}: {fields['causal'][0]}=true is the Duo code's autoregressive baseline; "
                              "only the diffusion (adaLN) backbone is supported")
    return DiTConfig(vocab_size=found["vocab_size"], d_model=d_model, n_blocks=fields["n_blocks"][1],
                     n_heads=n_heads, cond_dim=found["cond_dim"], mlp_ratio=mlp_ratio,
                     dropout=float(fields["dropout"][1]))


def _backbone_weights(state: dict, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ``backbone.*`` tensors without the prefix, and the names of the other entries."""
    weights, others = {}, []
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(BACKBONE):
            others.append(str(key))
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        weights[key[len(BACKBONE):]] = value
    if not weights:
        raise CheckpointError(f"{source}: no 'backbone.*' weights (is this a Duo checkpoint?)")
    return weights, others


def load_published(source: str | Path, *, ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """A published Duo model as a :class:`DiT` in eval mode, and ``info``.

    Args:
        source: ``hf:OWNER/NAME`` (or ``OWNER/NAME``), a snapshot folder (config.json +
            model.safetensors) or a Lightning ``.ckpt`` of the Duo code (module docstring).
        ema: for a ``.ckpt``, load its EMA weights when it has them (the default, as the Duo code
            evaluates) rather than the raw ones; a snapshot holds one set of weights and ignores it.
        device: where the model goes.

    Returns:
        ``(model, info)``; info has ``path``, ``weights`` (``"ema"``, ``"raw"`` or ``"snapshot"``),
        ``seq_len`` (the config's model length), ``noise_eps``, ``step`` (None if unknown),
        ``config`` (the published config as plain data), ``ignored`` (non-backbone entries of a
        ``.ckpt`` state_dict, e.g. a noise schedule's) and ``tokenizer`` (GPT-2 + [PAD]).

    Raises:
        CheckpointError: naming the missing or unexpected key, the config field that disagrees with
            the weights, or the unreadable file.
    """
    path = resolve_source(source)
    if path.is_dir():
        fields, state, shadow, meta = _read_snapshot(path)
    else:
        fields, state, shadow, meta = _read_lightning(path)
    where = meta["files"][-1]
    weights, others = _backbone_weights(state, where)
    if path.is_dir() and others:
        raise CheckpointError(f"{where}: unexpected key(s) outside 'backbone.': {sorted(others)[:5]}")
    n_blocks = fields["n_blocks"][1]
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise CheckpointError(f"{where}: config field {fields['n_blocks'][0]}={n_blocks!r} is not a positive int")
    rows = key_mapping(n_blocks)
    expected = {published for published, _ in rows}
    missing = [BACKBONE + k for k, _ in rows if k not in weights]
    unexpected = sorted(BACKBONE + k for k in weights if k not in expected and k != ROTARY_BUFFER)
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]}" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; the config says {fields['n_blocks'][0]}={n_blocks}")
    cfg = _check_sizes(fields, weights, where)
    model = DiT(cfg)
    ours = model.state_dict()
    if ROTARY_BUFFER in weights:
        head_dim = cfg.d_model // cfg.n_heads
        formula = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if not torch.allclose(weights[ROTARY_BUFFER].float(), formula, rtol=1e-6, atol=0):
            raise CheckpointError(f"{where}: {BACKBONE}{ROTARY_BUFFER} is not the rotary table of base "
                                  f"{ROPE_BASE:g}; this backbone is not the published one")
    source_tensors = {published: weights[published] for published, _ in rows}
    used = "snapshot" if path.is_dir() else "raw"
    if ema and shadow is not None:
        if len(shadow) != len(rows):
            raise CheckpointError(f"{where}: the EMA holds {len(shadow)} tensors, the backbone has {len(rows)} "
                                  "parameters")
        for (published, _), tensor in zip(rows, shadow):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != weights[published].shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise CheckpointError(f"{where}: EMA tensor for {BACKBONE}{published} has shape {got}, the weight "
                                      f"{tuple(weights[published].shape)}")
            source_tensors[published] = tensor
        used = "ema"
    mapped = {}
    for published, name in rows:
        tensor = source_tensors[published]
        if tensor.shape != ours[name].shape:
            raise CheckpointError(f"{where}: {BACKBONE}{published} has shape {tuple(tensor.shape)}, a backbone of "
                                  f"this config needs {tuple(ours[name].shape)}")
        mapped[name] = tensor
    model.load_state_dict(mapped, strict=True)
    model.to(device).eval()
    info = {"path": path, "weights": used, "seq_len": int(fields["seq_len"][1]),
            "noise_eps": float(fields["noise_eps"][1]), "step": meta.get("step"), "config": meta["config"],
            "ignored": others, "tokenizer": GPT2Tokenizer() if cfg.vocab_size == GPT2Tokenizer.vocab_size else None}
    return model, info


def load_for_commands(source: str, *, ema: bool, device) -> tuple[DiT, dict]:
    """:func:`load_published` for ``duo sample`` and ``duo eval``, which need the GPT-2 tokenizer and
    the log-linear schedule of the sampler and the NELBO (eps 1e-3); ``info["state"]`` holds the step."""
    from duo_model.loss import LOGLINEAR_EPS

    model, info = load_published(source, ema=ema, device=device)
    if info["tokenizer"] is None:
        raise ConfigError(f"{info['path']}: vocabulary of {model.config.vocab_size} tokens; only GPT-2 + [PAD] "
                          "(50258) published models have their tokenizer here")
    if info["noise_eps"] != LOGLINEAR_EPS:
        raise ConfigError(f"{info['path']}: noise eps {info['noise_eps']}; the log-linear schedule here has "
                          f"{LOGLINEAR_EPS}")
    return model, {**info, "state": {"step": info["step"]}}
