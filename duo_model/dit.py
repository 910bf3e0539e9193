"""The DiT backbone of Duo ("DDiT", duo-math §7): adaLN-zero transformer blocks with rotary attention,
conditioned on ``sigma = -log alpha_t``.

    h = Embed(ids | (ids, weights) | h0)                       (B, L, d) fp32
    c = SiLU(MLP(sinusoidal_256(sigma)))                       (B, cond_dim) fp32
    n_blocks x:  h += g1 * Dropout(Attn(RoPE, LN(h) (1 + sc1) + sh1))
                 h += g2 * Dropout(MLP(LN(h) (1 + sc2) + sh2))
    hidden = LN(h) (1 + sc) + sh;   logits = hidden W^T + b    (B, L, V)

LayerNorms have no bias and run in fp32 with autocast off; the adaLN projections and the output
head are zero-initialised, so a fresh model predicts the uniform distribution. Under a bf16
autocast (the trainer's, on GPU) the embedding and time MLP stay fp32 and the blocks and head run in
bf16; the residual stream stays fp32.

``causal=True`` gives the autoregressive baseline (causal SDPA; it is called with ``sigma = 0``).
A causal DiT also decodes incrementally: ``forward(ids, sigma, cache=KVCache(...))`` runs only the new
positions, attending to the keys and values the cache holds for the earlier ones (see :class:`KVCache`).
``forward(..., return_hidden=True)`` returns ``hidden`` instead of the logits, for the fused
``linear_usdm_nelbo`` head, which takes ``model.output.weight`` and ``model.output.bias``.

Example::

    >>> model = DiT(DiTConfig.preset("demo", vocab_size=300))
    >>> ids = torch.randint(0, 300, (2, 16))
    >>> model(ids, torch.ones(2)).shape
    torch.Size([2, 16, 300])
    >>> model(ids, torch.ones(2), return_hidden=True).shape
    torch.Size([2, 16, 128])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duo_model import ops

# duo-math §7, configs/model/*.yaml; "demo" is sized for a laptop CPU.
PRESETS: dict[str, dict[str, int]] = {
    "demo": dict(d_model=128, n_blocks=4, n_heads=4, cond_dim=64),
    "tiny": dict(d_model=256, n_blocks=8, n_heads=8, cond_dim=128),
    "small": dict(d_model=768, n_blocks=12, n_heads=12, cond_dim=128),
    "medium": dict(d_model=1024, n_blocks=24, n_heads=16, cond_dim=128),
}

TIME_FREQUENCIES = 256
ROPE_BASE = 10000.0


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. ``vocab_size`` is V (the tokenizer's size, specials included)."""

    vocab_size: int
    d_model: int = 768
    n_blocks: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1
    causal: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_blocks", "n_heads", "cond_dim", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) times an even head size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "DiTConfig":
        """A named size (``demo``, ``tiny``, ``small``, ``medium``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm without bias, in fp32 with autocast off (duo-math §7); returns fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, 1e-5)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(sigma: torch.Tensor, dim: int = TIME_FREQUENCIES) -> torch.Tensor:
    """``[cos(sigma f), sin(sigma f)]`` with ``f_k = exp(-ln(10000) k / (dim/2))``; sigma (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_tables(length: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim) fp32, frequencies duplicated as [f, f] (rotate-half layout)."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE on x (B, H, L, Dh) in x's dtype, autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of a causal DiT's earlier positions, for incremental decoding.

    Each block's keys and values live in one preallocated (B, H, max_len, Dh) buffer per tensor,
    created at the first call in the dtype the block computes in (bf16 under a bf16 autocast) and
    written in place; nothing is ever recomputed or reallocated. ``length`` positions are filled. The
    conditioning on sigma (time MLP, adaLN modulations) is computed once too: every call of one cache
    passes the same sigma. A call
    ``model(ids, sigma, cache=cache)`` with ids (B, n) runs positions ``length .. length + n - 1``
    (a prefill for n > 1, a decode step for n = 1), returns their logits (B, n, V) and advances
    ``length``; those logits equal the full forward's at the same positions up to float rounding.

    Example::

        >>> model = DiT(DiTConfig.preset("demo", vocab_size=300, causal=True)).eval()
        >>> ids, sigma = torch.randint(0, 300, (2, 6)), torch.zeros(2)
        >>> cache = KVCache(max_len=6)
        >>> prefill = model(ids[:, :4], sigma, cache=cache)            # positions 0..3
        >>> step = model(ids[:, 4:5], sigma, cache=cache)              # position 4, reusing 0..3
        >>> prefill.shape, step.shape, cache.length
        (torch.Size([2, 4, 300]), torch.Size([2, 1, 300]), 5)
    """

    def __init__(self, max_len: int):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._conditioning: dict = {}
        self._sigma: torch.Tensor | None = None

    def check_sigma(self, sigma: torch.Tensor) -> None:
        """The conditioning on sigma is computed at the first call and reused: every call must pass the
        first call's sigma (an AR model's is 0). Checked on CPU tensors (a GPU check would synchronize)."""
        if self._sigma is None:
            self._sigma = sigma.clone()
        elif sigma.shape != self._sigma.shape or (sigma.device.type == "cpu" and not torch.equal(sigma, self._sigma)):
            raise ValueError("every call with one KV cache must pass the same sigma as the first (same batch)")

    def reuse(self, key, compute):
        """``compute()`` at the first call, the stored result after: the conditioning and the adaLN
        modulations depend on sigma only, not on the position."""
        if key not in self._conditioning:
            self._conditioning[key] = compute()
        return self._conditioning[key]

    def rotary(self, n: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of the next ``n`` positions, (n, head_dim) each."""
        if self.length + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length} are filled and "
                             f"{n} more were given")
        if self._rotary is None:
            self._rotary = rotary_tables(self.max_len, head_dim, device)
        cos, sin = self._rotary
        return cos[self.length:self.length + n], sin[self.length:self.length + n]

    def attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store block ``index``'s k, v (B, H, n, Dh) at the next n positions; causal attention of q
        (B, H, n, Dh) over every filled position."""
        if index == len(self.keys):
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        keys, values = self.keys[index], self.values[index]
        if keys.dtype != k.dtype:
            raise ValueError(f"this KV cache holds {keys.dtype} keys; got {k.dtype} (keep one precision per cache)")
        start, n = self.length, k.shape[2]
        keys[:, :, start:start + n] = k
        values[:, :, start:start + n] = v
        keys, values = keys[:, :, :start + n], values[:, :, :start + n]
        if n == 1:  # one new position sees every filled one
            return F.scaled_dot_product_attention(q, keys, values)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.norm1 = LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, h, c, cos, sin, cache: KVCache | None = None, index: int = 0):
        b, length, d = h.shape
        if cache is None:
            modulation = self.adaLN_modulation(c)
        else:
            modulation = cache.reuse(index, lambda: self.adaLN_modulation(c))
        sh1, sc1, g1, sh2, sc2, g2 = modulation[:, None].chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(h), sh1, sc1)).view(b, length, 3, self.n_heads, -1).permute(
            2, 0, 3, 1, 4)  # each [B, H, L, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            o = cache.attend(index, q, k, v)
        o = o.transpose(1, 2).reshape(b, length, d)
        h = h + g1 * self.dropout(self.attn_out(o))
        return h + g2 * self.dropout(self.mlp(modulate(self.norm2(h), sh2, sc2)))


class DiT(nn.Module):
    """The Duo backbone (duo-math §7). See the module docstring."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.embedding = ops.RelaxedEmbedding(cfg.vocab_size, d)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, cfg.cond_dim), nn.SiLU(),
                                      nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.norm_final = LayerNorm(d)
        self.adaLN_final = nn.Linear(cfg.cond_dim, 2 * d)
        self.output = nn.Linear(d, cfg.vocab_size)
        for layer in (self.adaLN_final, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x) -> torch.Tensor:
        """(B, L, d) fp32 from ids (B, L), a top-k relaxation ``(ids, weights)`` (each (B, L, k)) or a
        precomputed h0 (B, L, d), e.g. the dense curriculum's ``softmax(w / tau) @ E``."""
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if x.dim() != 3 or x.shape[-1] != self.config.d_model:
                raise ValueError(f"a float input must be h0 of shape (B, L, {self.config.d_model}), got "
                                 f"{tuple(x.shape)}")
            return x.float()
        with torch.autocast(self.output.weight.device.type, enabled=False):
            return self.embedding(x).float()

    def forward(self, x, sigma: torch.Tensor, *, return_hidden: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, L, V), or with ``return_hidden`` the head's input (B, L, d).

        Args:
            x: token ids (B, L) int64, ``(ids, weights)`` of shape (B, L, k), or h0 (B, L, d) float.
            sigma: ``-log alpha_t``, (B,) or (B, 1) (averaged over the last dim), any float dtype.
            cache: causal DiTs only: x holds the positions after the cache's filled ones, which the
                call attends to and extends (:class:`KVCache`).
        """
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal DiT (DiTConfig(causal=True)); Duo attends both ways")
        h = self.embed(x)
        if sigma.dim() == 2:
            sigma = sigma.mean(-1)
        if sigma.shape != (h.shape[0],):
            raise ValueError(f"sigma must have shape ({h.shape[0]},) or ({h.shape[0]}, 1), got {tuple(sigma.shape)}")
        if cache is not None:
            cache.check_sigma(sigma)
        with torch.autocast(h.device.type, enabled=False):
            c = F.silu(self.time_mlp(timestep_embedding(sigma))) if cache is None else cache.reuse(
                "c", lambda: F.silu(self.time_mlp(timestep_embedding(sigma))))
        head_dim = self.config.d_model // self.config.n_heads
        if cache is None:
            cos, sin = rotary_tables(h.shape[1], head_dim, h.device)
        else:
            cos, sin = cache.rotary(h.shape[1], head_dim, h.device)
        for index, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, cache, index)
        if cache is not None:
            cache.length += h.shape[1]
        final = self.adaLN_final(c) if cache is None else cache.reuse("final", lambda: self.adaLN_final(c))
        shift, scale = final[:, None].chunk(2, dim=-1)
        hidden = modulate(self.norm_final(h), shift, scale)
        return hidden if return_hidden else self.output(hidden)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
