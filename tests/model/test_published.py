"""Loading the published Duo models (both layouts), safe unpickling, the port's logits against an
independent re-derivation of the published equations, the Duo-style decode, and `duo sample
checkpoint=`. Everything offline: the fixtures are small random backbones in the published layouts."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from duo_model import published
from duo_model.checkpoint import CheckpointError
from duo_model.cli import main
from duo_model.data import GPT2Tokenizer
from duo_model.published import Inert, load_published, plain, safe_torch_load

V, D, N_BLOCKS, N_HEADS, COND = 50258, 16, 2, 2, 8  # GPT-2 + [PAD]; a tiny backbone


def published_tensors(seed: int, vocab: int = V) -> "OrderedDict[str, torch.Tensor]":
    """Random weights under the published names and shapes, in the published parameter order (adaLN
    weights non-zero, so every modulation path matters)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    t = OrderedDict()
    t["vocab_embed.embedding"] = rand(vocab, D)
    t["sigma_map.mlp.0.weight"], t["sigma_map.mlp.0.bias"] = rand(COND, 256), rand(COND)
    t["sigma_map.mlp.2.weight"], t["sigma_map.mlp.2.bias"] = rand(COND, COND), rand(COND)
    for i in range(N_BLOCKS):
        p = f"blocks.{i}."
        t[p + "norm1.weight"] = 1 + rand(D)
        t[p + "attn_qkv.weight"], t[p + "attn_out.weight"] = rand(3 * D, D), rand(D, D)
        t[p + "norm2.weight"] = 1 + rand(D)
        t[p + "mlp.0.weight"], t[p + "mlp.0.bias"] = rand(4 * D, D), rand(4 * D)
        t[p + "mlp.2.weight"], t[p + "mlp.2.bias"] = rand(D, 4 * D), rand(D)
        t[p + "adaLN_modulation.weight"], t[p + "adaLN_modulation.bias"] = rand(6 * D, COND), rand(6 * D)
    t["output_layer.norm_final.weight"] = 1 + rand(D)
    t["output_layer.linear.weight"], t["output_layer.linear.bias"] = rand(vocab, D), rand(vocab)
    t["output_layer.adaLN_modulation.weight"] = rand(2 * D, COND)
    t["output_layer.adaLN_modulation.bias"] = rand(2 * D)
    return t


def inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)


def snapshot_config(**overrides) -> dict:
    return {"model_type": "duo", "vocab_size": V, "model_length": 16, "hidden_dim": D, "cond_dim": COND,
            "n_blocks": N_BLOCKS, "n_heads": N_HEADS, "dropout": 0.1, "causal": False, "var_min": True,
            **overrides}


def write_snapshot(folder, tensors, config=None, rotary=True):
    folder.mkdir(parents=True, exist_ok=True)
    state = {"backbone." + k: v for k, v in tensors.items()}
    if rotary:
        state["backbone.rotary_emb.inv_freq"] = inv_freq(D // N_HEADS)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or snapshot_config()))
    return folder


# A stand-in for OmegaConf's containers, pickled the way they are: state {"_content": ...} of nodes
# holding "_val". The loader must read it without importing it.
class DictConfig:
    def __init__(self, content):
        self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v) for k, v in content.items()}
        self._metadata, self._parent = None, None


class AnyNode:
    def __init__(self, value):
        self._val, self._metadata, self._parent = value, None, None


class AttributeDict(dict):  # Lightning's hyper_parameters: a dict subclass, pickled with its items
    pass


class Tokenizer:  # what the Duo code pickles into hyper_parameters
    def __init__(self):
        self.vocab = {"[PAD]": 50257}


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def lightning_config(**model):
    return {"algo": {"name": "duo", "causal_attention": False},
            "model": {"hidden_size": D, "cond_dim": COND, "n_blocks": N_BLOCKS, "n_heads": N_HEADS, "dropout": 0.1,
                      "length": 16, **model},
            "noise": {"type": "log-linear", "eps": 1e-3}}


def write_lightning(path, raw, shadow, config=None, extra=None):
    state_dict = OrderedDict(("backbone." + k, v) for k, v in raw.items())
    state_dict["backbone.rotary_emb.inv_freq"] = inv_freq(D // N_HEADS)
    ckpt = {"epoch": 0, "global_step": 42, "pytorch-lightning_version": "2.2.1", "state_dict": state_dict,
            "ema": {"decay": 0.9999, "num_updates": 42, "shadow_params": list(shadow.values())},
            "hyper_parameters": AttributeDict(config=DictConfig(config or lightning_config()), tokenizer=Tokenizer(),
                                              vocab_size=V),
            "loops": {"fit_loop": {}}, "optimizer_states": [], **(extra or {})}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    tensors = published_tensors(0)
    return write_snapshot(tmp_path_factory.mktemp("published") / "duo-tiny", tensors), tensors


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    raw, shadow = published_tensors(1), published_tensors(2)
    return write_lightning(tmp_path_factory.mktemp("lightning") / "last.ckpt", raw, shadow), raw, shadow


def assert_weights(model, tensors):
    ours = model.state_dict()
    for p, o in published.key_mapping(N_BLOCKS):
        assert torch.equal(ours[o], tensors[p]), p


# ---- loading --------------------------------------------------------------------------------------

def test_snapshot_loads_bit_identical(snapshot):
    folder, tensors = snapshot
    model, info = load_published(folder)
    assert_weights(model, tensors)
    assert (model.config.vocab_size, model.config.d_model, model.config.n_heads) == (V, D, N_HEADS)
    assert info["weights"] == "snapshot" and info["seq_len"] == 16 and not model.training
    assert isinstance(info["tokenizer"], GPT2Tokenizer)


def test_lightning_loads_ema_by_default_and_raw_on_request(lightning):
    path, raw, shadow = lightning
    model, info = load_published(path)
    assert_weights(model, shadow)
    assert info["weights"] == "ema" and info["step"] == 42 and info["seq_len"] == 16
    assert info["config"]["model"]["hidden_size"] == D  # read through the inert OmegaConf stand-ins
    model, info = load_published(path, ema=False)
    assert_weights(model, raw)
    assert info["weights"] == "raw"


def test_key_table_covers_the_published_parameter_order():
    names = [p for p, _ in published.key_mapping(N_BLOCKS)]
    assert names == list(published_tensors(0, vocab=4))


@pytest.mark.parametrize("change, message", [
    ("missing", "missing key backbone.blocks.1.mlp.2.bias"),
    ("extra", "unexpected key backbone.blocks.2.norm1.weight"),
    ("vocab", "vocab_size=50000 disagrees"),
    ("hidden", "hidden_dim=32 disagrees"),
    ("heads", "n_heads=4 gives heads of 4"),
])
def test_snapshot_errors_name_the_key_or_field(tmp_path, change, message):
    tensors, config = published_tensors(0), snapshot_config()
    if change == "missing":
        del tensors["blocks.1.mlp.2.bias"]
    elif change == "extra":
        tensors["blocks.2.norm1.weight"] = torch.ones(D)
    elif change == "vocab":
        config["vocab_size"] = 50000
    elif change == "hidden":
        config["hidden_dim"] = 32
    elif change == "heads":
        config["n_heads"] = 4
    folder = write_snapshot(tmp_path / "snap", tensors, config)
    with pytest.raises(CheckpointError, match=message):
        load_published(folder)


def test_corrupt_or_truncated_files_name_the_file(tmp_path, snapshot, lightning):
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "config.json").write_bytes((snapshot[0] / "config.json").read_bytes())
    data = (snapshot[0] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_published(folder)
    truncated = tmp_path / "half.ckpt"
    truncated.write_bytes(lightning[0].read_bytes()[:4000])
    with pytest.raises(CheckpointError, match=r"half\.ckpt: not a readable torch checkpoint"):
        load_published(truncated)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_published(tmp_path)


def test_ema_shapes_are_checked(tmp_path):
    raw, shadow = published_tensors(1), published_tensors(2)
    shadow["blocks.0.attn_out.weight"] = torch.zeros(D, D + 1)
    path = write_lightning(tmp_path / "bad.ckpt", raw, shadow)
    with pytest.raises(CheckpointError, match="EMA tensor for backbone.blocks.0.attn_out.weight has shape"):
        load_published(path)


def test_hub_download_offline_names_the_folder_to_pass(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)  # nothing is downloaded
    with pytest.raises(CheckpointError, match="checkpoint=DIR"):
        load_published("hf:s-sahoo/duo-distilled")


def test_hub_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setattr(published.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="needs the huggingface_hub package.*checkpoint=DIR"):
        load_published("hf:s-sahoo/duo-distilled")


# ---- safe unpickling ------------------------------------------------------------------------------

def test_malicious_pickle_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hyper_parameters": {"config": Evil(marker)}}, path)
    ckpt = safe_torch_load(path)
    assert not marker.exists()
    payload = ckpt["hyper_parameters"]["config"]
    assert isinstance(payload, Inert) and payload.qualname.endswith(".system")
    assert payload.args == (f"touch {marker}",)  # readable, never run
    assert torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(CheckpointError, match="hyper_parameters\\['config'\\]"):
        load_published(path)


def test_plain_unwraps_inert_configs(lightning):
    hparams = safe_torch_load(lightning[0])["hyper_parameters"]
    assert isinstance(hparams, Inert)  # an unknown dict subclass: its items are kept
    hparams = plain(hparams)
    assert isinstance(hparams["tokenizer"], Inert) and hparams["vocab_size"] == V
    assert hparams["config"]["noise"] == {"type": "log-linear", "eps": 1e-3}


# ---- the port's logits ----------------------------------------------------------------------------

def reference_logits(w: dict, ids: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The published DiT's equations written out with einsums from the published weights (DiT with
    adaLN-zero blocks, rotary on halves, GELU-tanh MLP, bias-free LayerNorms; no dropout at inference)."""
    b, length = ids.shape
    hd = D // N_HEADS
    sigma = sigma.reshape(b, -1).mean(-1)
    k = torch.arange(128, dtype=torch.float64)
    args = sigma.double()[:, None] * torch.exp(-math.log(10000.0) * k / 128)
    freq = torch.cat([args.cos(), args.sin()], -1).float()
    c = torch.einsum("bf,cf->bc", freq, w["sigma_map.mlp.0.weight"]) + w["sigma_map.mlp.0.bias"]
    c = c * torch.sigmoid(c)
    c = torch.einsum("bf,cf->bc", c, w["sigma_map.mlp.2.weight"]) + w["sigma_map.mlp.2.bias"]
    c = c * torch.sigmoid(c)

    def norm(x, weight):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * weight

    angle = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq(hd).double()[None]  # (L, hd/2)
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):  # x (B, L, H, hd): first half and second half rotate as pairs
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        cs, sn = cos[None, :, None], sin[None, :, None]
        return torch.cat([x1 * cs - x2 * sn, x2 * cs + x1 * sn], -1)

    h = w["vocab_embed.embedding"][ids]
    for i in range(N_BLOCKS):
        p = f"blocks.{i}."
        mod = torch.einsum("bc,oc->bo", c, w[p + "adaLN_modulation.weight"]) + w[p + "adaLN_modulation.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.split(D, -1))
        x = norm(h, w[p + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = torch.einsum("bld,od->blo", x, w[p + "attn_qkv.weight"]).reshape(b, length, 3, N_HEADS, hd)
        q, kk, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, D)
        h = h + g1 * torch.einsum("bld,od->blo", o, w[p + "attn_out.weight"])
        x = norm(h, w[p + "norm2.weight"]) * (1 + sc2) + sh2
        x = F.gelu(torch.einsum("bld,od->blo", x, w[p + "mlp.0.weight"]) + w[p + "mlp.0.bias"], approximate="tanh")
        h = h + g2 * (torch.einsum("bld,od->blo", x, w[p + "mlp.2.weight"]) + w[p + "mlp.2.bias"])
    mod = torch.einsum("bc,oc->bo", c, w["output_layer.adaLN_modulation.weight"]) + \
        w["output_layer.adaLN_modulation.bias"]
    sh, sc = (m[:, None] for m in mod.split(D, -1))
    x = norm(h, w["output_layer.norm_final.weight"]) * (1 + sc) + sh
    return torch.einsum("bld,vd->blv", x, w["output_layer.linear.weight"]) + w["output_layer.linear.bias"]


@pytest.mark.parametrize("sigma_shape", [(3,), (3, 1)])
def test_port_matches_the_published_equations(snapshot, sigma_shape):
    folder, tensors = snapshot
    model, _ = load_published(folder)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 12), generator=g)
    sigma = -torch.log(1 - (1 - 1e-3) * torch.rand(sigma_shape, generator=g))  # -log alpha_t, as the samplers
    with torch.no_grad():
        ours = model(ids, sigma)
    expected = reference_logits(tensors, ids, sigma)
    assert expected.std() > 0.1  # not a degenerate model
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


# ---- tokenizer ------------------------------------------------------------------------------------

def test_duo_style_batch_decode_keeps_specials_and_cleans_spaces():
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello , world . It 's fine ! ") + [50256, 50257]
    assert tok.batch_decode([ids]) == ["Hello, world. It's fine! <|endoftext|>[PAD]"]
    assert tok.batch_decode([[50257, 50257]]) == ["[PAD][PAD]"]


# ---- duo sample checkpoint= -----------------------------------------------------------------------

def test_duo_sample_published_checkpoint_is_reproducible(snapshot, tmp_path):
    folder, _ = snapshot
    outs = []
    for run in range(2):
        out = tmp_path / f"s{run}.json"
        assert main(["sample", f"checkpoint={folder}", "steps=8", "num_samples=2", "batch_size=2", "seed=7",
                     f"out={out}", "device=cpu"]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["samples"] == outs[1]["samples"]
    assert outs[0]["nfe"] == 9 and outs[0]["noise_removal"] == "greedy" and outs[0]["seq_len"] == 16
    sample = outs[0]["samples"][0]
    assert len(sample["ids"]) == 16 and sample["text"] == GPT2Tokenizer().batch_decode([sample["ids"]])[0]


def test_duo_eval_published_checkpoint(snapshot, corpus, cache, capsys):
    folder, _ = snapshot
    settings = [f"checkpoint={folder}", f"corpus=text:{corpus}", f"cache_dir={cache}", "batches=1", "batch_size=2",
                "device=cpu"]
    assert main(["eval", *settings]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["eval", *settings]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert first["algo"] == "duo" and first["val_tokens"] == 2 * 16 and math.isfinite(first["val_ppl"])
    assert main(["eval", f"checkpoint={folder}"]) == 2  # no corpus: a clear error
    assert "brings no corpus" in capsys.readouterr().err


def test_duo_sample_help_documents_published_checkpoints(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "checkpoint=hf:s-sahoo/duo-distilled" in text and "model.safetensors" in text and ".ckpt" in text
