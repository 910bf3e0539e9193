"""The benchmark registry: every op adds its rows here, and ``gpu_report.py`` times them all.

A :class:`Case` is one row of the report: an op on its fastest backend (``fused``) against the
reference hot path, i.e. what the public Duo code runs (``reference``), at one shape. Shapes are dicts
with the keys ``B, L, V, d`` and any op-specific keys (``k`` for top-k, ...); a case runs at its own
``shape`` on a GPU (``PAPER_SHAPE`` unless given; sampling ops pass ``SAMPLING_SHAPE``) and at
``{**case.shape, **SMOKE_SHAPE}`` in the CPU smoke run, so op-specific keys survive while the sizes
shrink.

Adding a row::

    register(Case(
        name="usdm_nelbo bf16",
        family="nelbo",
        make_inputs=_nelbo_inputs,           # (shape, device) -> {"logits": ..., "x0": ...}
        fused=lambda i: _grad(duo_kernels.usdm_nelbo, i),
        reference=lambda i: _grad(reference.usdm_nelbo, i),
        # bf16 logits read + bf16 gradient written; int64 x0 read + fp32 loss written
        bytes_moved=lambda s: 2 * 2 * s["B"] * s["L"] * s["V"] + (8 + 4) * s["B"] * s["L"],
        target="≥ 15× reference; ≤ 2.5× floor",
        backward=True,
    ))
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import duo_kernels
from duo_kernels import reference, rng
# duo_model's backbone and loss need nothing beyond torch and duo_kernels (no tokenizers, safetensors).
from duo_model import ops as model_ops
from duo_model.dit import PRESETS, DiT, DiTConfig
from duo_model.loss import DuoLoss, Phase, antithetic_t

Shape = dict[str, int]
Inputs = dict[str, Any]

# OWT training shapes of the performance targets: the curriculum's per-GPU micro-batch.
PAPER_SHAPE: Shape = dict(B=32, L=1024, V=50257, d=768)
# Sampling runs at a smaller batch (the reference's fp64 posterior needs 67.5 GiB at B = 32).
SAMPLING_SHAPE: Shape = dict(B=8, L=1024, V=50257, d=768)
# CPU smoke run: the same code path in seconds; V = 1000 keeps top-k keys such as k = 128 valid.
SMOKE_SHAPE: Shape = dict(B=2, L=32, V=1000, d=64)


@dataclass(frozen=True)
class Case:
    """One report row.

    Attributes:
        name: row label, ``"<op> <variant>"``, e.g. ``"rng.normal fp32"``; ``--cases`` filters on it.
        family: the op family (``"rng"``, ``"nelbo"``, ...): the module name in ``duo_kernels/ops``.
        make_inputs: ``(shape, device) -> inputs``; builds everything both paths read, so that its
            memory is excluded from the paths' peak memory. Random data, never zeros.
        fused: ``inputs -> result``: the public op with ``impl="auto"``.
        reference: ``inputs -> result``: the reference hot path on the same inputs.
        bytes_moved: ``shape -> bytes``: the floor's traffic, inputs read once plus outputs written once.
        target: the performance target of this row, shown in the table (``"—"`` if none).
        backward: ``fused`` and ``reference`` each run forward and backward (returning the gradients);
            the report labels the row "fwd+bwd", so the name need not say it.
        shape: the shape the GPU report runs at.
    """

    name: str
    family: str
    make_inputs: Callable[[Shape, torch.device], Inputs]
    fused: Callable[[Inputs], Any]
    reference: Callable[[Inputs], Any]
    bytes_moved: Callable[[Shape], int]
    target: str = "—"
    backward: bool = False
    shape: Shape = field(default_factory=lambda: dict(PAPER_SHAPE))


CASES: list[Case] = []


def register(case: Case) -> Case:
    if any(c.name == case.name for c in CASES):
        raise ValueError(f"a benchmark case named {case.name!r} is already registered")
    CASES.append(case)
    return case


# ---- rng -------------------------------------------------------------------------------------------
# Draws per call: B·L·V / 8 (2.06e8 at the paper shape, 0.77 GiB of fp32). B·L·V itself is the dense
# curriculum's latent (6.1 GiB fp32, and far more in the reference Philox's int64 temporaries); an
# eighth of it still fills the chip many times over (≫ the 50 MB L2, ~2e5 blocks) and leaves room
# for anything else resident on an 80 GB card.
#
# The reference path is torch's own generator (torch.rand / randn / randint of the same shape): that
# is what the public Duo code calls, and it is the same Philox family at the memory floor, so the
# ratio says whether our counter-addressed draws cost anything over torch's. Our impl="reference"
# (Philox in int64 PyTorch ops) is the correctness oracle and CPU fallback, not a hot path anyone
# runs on a GPU; it is timed against the native kernels in benchmarks/test_bench_rng.py.
RNG_SEED = 0


def rng_draws(shape: Shape) -> int:
    return shape["B"] * shape["L"] * shape["V"] // 8


def _rng_inputs(shape: Shape, device: torch.device) -> Inputs:
    return {"shape": (rng_draws(shape),), "high": shape["V"], "device": device}


def _register_rng(name: str, fused: Callable[[Inputs], Any], reference: Callable[[Inputs], Any],
                  bytes_per_draw: int) -> None:
    register(Case(
        name=name,
        family="rng",
        make_inputs=_rng_inputs,
        fused=fused,
        reference=reference,
        bytes_moved=lambda s: rng_draws(s) * bytes_per_draw,
        target="none set; ≈ torch (same bytes)",
    ))


_register_rng(
    "rng.uniform fp32",
    lambda i: rng.uniform(i["shape"], seed=RNG_SEED, device=i["device"]),
    lambda i: torch.rand(i["shape"], device=i["device"]),
    bytes_per_draw=4,
)
_register_rng(
    "rng.normal fp32",
    lambda i: rng.normal(i["shape"], seed=RNG_SEED, device=i["device"]),
    lambda i: torch.randn(i["shape"], device=i["device"]),
    bytes_per_draw=4,
)
_register_rng(
    "rng.randint int64",
    lambda i: rng.randint(i["shape"], high=i["high"], seed=RNG_SEED, device=i["device"]),
    lambda i: torch.randint(i["high"], i["shape"], device=i["device"]),
    bytes_per_draw=8,
)


# ---- forward process -------------------------------------------------------------------------------
# The O(1)-per-token exact samplers against the (B, L, V) latents they replace,
# as the public Duo code draws them: one torch.randn latent and its argmax (published figure: 27.9 ms
# on an H200 at the paper shape, 6.1 GiB of fp32 normals). reference.gaussian_argmax_dense (our Philox
# stream in int64 PyTorch ops, seconds per call) is the correctness oracle, not a baseline.
FORWARD_SEED = 0
# OWT curriculum window and a DCD pair gap.
GAMMA_MIN, GAMMA_MAX, PAIR_GAP = -3.55, -1.85, 0.3


def _forward_inputs(shape: Shape, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    b, l, v = shape["B"], shape["L"], shape["V"]
    gamma_t = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(b, generator=gen, dtype=torch.float64)
    return {"x0": torch.randint(0, v, (b, l), generator=gen).to(device), "gamma_t": gamma_t.to(device),
            "gamma_s": (gamma_t - PAIR_GAP).to(device), "V": v, "k": shape.get("k")}


def _torch_latent_argmax(x0: torch.Tensor, gammas: list[torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """The Duo code's argmax of ``a~ e_x + s~ eps`` with one ``torch.randn`` latent shared by every gamma."""
    eps = torch.randn(*x0.shape, vocab_size, device=x0.device)
    out = []
    for gamma in gammas:
        a_tilde, s_tilde = reference.gaussian_params(gamma.float()[:, None, None])
        w = s_tilde * eps
        w.scatter_add_(-1, x0[..., None], a_tilde.expand(*x0.shape, 1).contiguous())
        out.append(w.argmax(-1))
    return out


def _tokens_bytes(shape: Shape, per_token: int) -> int:
    return per_token * shape["B"] * shape["L"]


register(Case(
    name="gaussian_argmax",
    family="forward_process",
    make_inputs=_forward_inputs,
    fused=lambda i: duo_kernels.gaussian_argmax(i["x0"], i["gamma_t"], i["V"], seed=FORWARD_SEED),
    reference=lambda i: _torch_latent_argmax(i["x0"], [i["gamma_t"]], i["V"]),
    bytes_moved=lambda s: _tokens_bytes(s, 16),
    target="≥ 1000× dense latent + argmax; no B·L·V memory",
))
register(Case(
    name="gaussian_argmax_pair",
    family="forward_process",
    make_inputs=_forward_inputs,
    fused=lambda i: duo_kernels.gaussian_argmax_pair(i["x0"], i["gamma_t"], i["gamma_s"], i["V"], seed=FORWARD_SEED),
    # DCD's construction: two argmaxes of one shared torch.randn latent
    reference=lambda i: _torch_latent_argmax(i["x0"], [i["gamma_t"], i["gamma_s"]], i["V"]),
    # int64 x0 read, two int64 z written
    bytes_moved=lambda s: _tokens_bytes(s, 24),
    target="none set; O(1) per token, no B·L·V memory",
))


# ---- curriculum: Duo++ top-k relaxation ------------------------------------------------------------
# The fused op in its exact mode (the default) against the published Duo++ sampler's hot path
# (``published_tempered_softmax_topk`` below, transcribed: float64 torch ops, torch's own generator),
# tau = 1e-3 as in the paper runs. Our reference.tempered_softmax_topk (Philox in int64 PyTorch ops) is
# the correctness oracle, several times slower than the published sampler, so not the baseline.
TOPK_TAU = 1e-3


def published_tempered_softmax_topk(x0: torch.Tensor, a_tilde: torch.Tensor, s_tilde: torch.Tensor,
                                    vocab_size: int, k: int, inv_tau: float):
    """The published Duo++ top-k sampler (its ten steps), transcribed op for op.

    ``x0`` (B, L) int64; ``a_tilde``, ``s_tilde`` (B,) (cast to float64, as the published code does);
    ``k >= 2``. Returns (weights (B, L, k) float64, ids (B, L, k) int64, z_t (B, L) int64) with the
    published rules: the clean coordinate overwrites the last slot when above it, tail from o_{k-2} then,
    z_t = x whenever the clean coordinate is in the top k, Floyd's algorithm for the ids.
    """
    batch, length = x0.shape
    device = x0.device
    a_tilde, s_tilde = a_tilde.to(torch.float64), s_tilde.to(torch.float64)
    # top k of V - 1 standard normals: descending uniform order statistics in log space, then ndtri
    log_u = torch.rand(batch, length, k, device=device, dtype=torch.float64).log()
    pools = torch.arange(vocab_size - 1, vocab_size - 1 - k, -1, device=device, dtype=torch.float64)
    others = torch.special.ndtri((log_u / pools).cumsum(dim=-1).exp()) * s_tilde[:, None, None]
    # the clean coordinate (a float32 normal, promoted) overwrites the last slot when above it
    clean = a_tilde[:, None] + torch.randn(batch, length, device=device) * s_tilde[:, None]
    visible = clean > others[:, :, -1]
    others[:, :, -1][visible] = clean[visible]
    truncation = torch.where(visible, others[:, :, -2], others[:, :, -1])
    # log E[exp(Y) | Y < c] for Y ~ N(0, S^2), S = s~ / tau, c = truncation / tau
    scale = s_tilde[:, None] * inv_tau
    cut = truncation * inv_tau
    log_mean = (scale**2 / 2.0 + torch.special.log_ndtr((cut - scale**2) / scale)
                - torch.special.log_ndtr(cut / scale))
    log_visible = others * inv_tau
    count = torch.where(visible, vocab_size - k, vocab_size - k - 1).to(log_mean.dtype)
    log_tail = count.log() + log_mean
    log_clean = torch.full_like(log_tail, float("-inf"))
    log_clean[~visible] = (clean * inv_tau)[~visible]
    log_norm = torch.cat([log_visible, log_tail[..., None], log_clean[..., None]], dim=-1).logsumexp(dim=-1,
                                                                                                     keepdim=True)
    weights = (log_visible - log_norm).exp()
    # all weights underflowed: one-hot on slot 0
    underflow = weights.sum(dim=-1, keepdim=True) == 0.0
    weights = torch.where(underflow, 0.0, weights)
    weights[..., 0][underflow[..., 0]] = 1.0
    # k distinct ids in [0, V - 2] by Robert Floyd's algorithm, shifted around x, x in the last slot if visible
    ids = torch.empty(batch, length, k, dtype=torch.int64, device=device)
    for slot, top in enumerate(range(vocab_size - 1 - k, vocab_size - 1)):
        pick = torch.randint(0, top + 1, (batch, length), device=device)
        ids[..., slot] = pick if slot == 0 else torch.where((ids[..., :slot] == pick[..., None]).any(dim=-1), top, pick)
    ids[ids >= x0[..., None]] += 1
    ids[..., -1][visible] = x0[visible]
    z_t = torch.where(visible, x0, ids[..., 0])
    return weights, ids, z_t


def _published_topk(inputs: Inputs):
    return published_tempered_softmax_topk(inputs["x0"], inputs["a_tilde"], inputs["s_tilde"], inputs["V"],
                                           inputs["k"], 1.0 / TOPK_TAU)


def _topk_inputs(shape: Shape, device: torch.device) -> Inputs:
    inputs = _forward_inputs(shape, device)
    # the published sampler receives a~ and s~ (its caller computes them once per batch)
    inputs["a_tilde"], inputs["s_tilde"] = reference.gaussian_params(inputs["gamma_t"])
    return inputs


def _register_topk(k: int) -> None:
    register(Case(
        name=f"tempered_softmax_topk k={k}",
        family="curriculum",
        make_inputs=_topk_inputs,
        fused=lambda i: duo_kernels.tempered_softmax_topk(i["x0"], i["gamma_t"], i["V"], i["k"], TOPK_TAU,
                                                          seed=FORWARD_SEED),
        reference=_published_topk,
        # int64 x0 read; int64 ids, fp32 weights and int64 z_t written
        bytes_moved=lambda s: _tokens_bytes(s, 16 + 12 * s["k"]),
        target="≥ 20× the Duo++ reference (with the embedding)",
        shape={**PAPER_SHAPE, "k": k},
    ))


for _k in (2, 16, 128):
    _register_topk(_k)

# ---- embedding (the curriculum's embedding layer) -------------------------------------------------------
# Both rows run forward and backward with a random upstream gradient and return the gradients.
EMBED_TOP_K = 16
EMBED_SEED = 0
EMBED_GAMMA = -2.7  # inside the OWT window [-3.55, -1.85]
EMBED_TAU = 1e-3  # the paper runs' temperature


def _relaxed_inputs(shape: Shape, device: torch.device) -> Inputs:
    b, l, v, d, k = shape["B"], shape["L"], shape["V"], shape["d"], shape.get("k", EMBED_TOP_K)
    weights = torch.rand(b, l, k, device=device)
    return {
        "weight": (torch.rand(v, d, device=device) - 0.5).requires_grad_(),
        "ids": torch.randint(0, v, (b, l, k), device=device),
        "weights": (weights / weights.sum(-1, keepdim=True)).requires_grad_(),
        "upstream": torch.randn(b, l, d, device=device),
    }


def _relaxed_fused(i: Inputs):
    import duo_kernels

    h = duo_kernels.relaxed_embedding(i["weight"], i["ids"], i["weights"])
    return torch.autograd.grad(h, (i["weight"], i["weights"]), i["upstream"])


def _relaxed_embedding_bag(i: Inputs):
    # what the Duo++ code runs: embedding_bag(mode="sum") with per-sample weights, under autograd
    k = i["ids"].shape[-1]
    h = torch.nn.functional.embedding_bag(i["ids"].view(-1, k), i["weight"],
                                          per_sample_weights=i["weights"].view(-1, k), mode="sum")
    return torch.autograd.grad(h, (i["weight"], i["weights"]), i["upstream"].view(h.shape))


def _relaxed_bytes(s: Shape) -> int:
    b, l, v, d, k = s["B"], s["L"], s["V"], s["d"], s.get("k", EMBED_TOP_K)
    # E, ids (int64), weights, dh read; h, dE, dweights written
    return 4 * v * d + (8 + 4) * b * l * k + 4 * b * l * d + 4 * b * l * d + 4 * v * d + 4 * b * l * k


register(Case(
    name=f"relaxed_embedding k={EMBED_TOP_K}",
    family="embedding",
    make_inputs=_relaxed_inputs,
    fused=_relaxed_fused,
    reference=_relaxed_embedding_bag,
    bytes_moved=_relaxed_bytes,
    target="none set; ≈ embedding_bag (same bytes)",
    backward=True,
    shape=dict(PAPER_SHAPE, k=EMBED_TOP_K),
))


def _dense_inputs(shape: Shape, device: torch.device) -> Inputs:
    b, l, v, d = shape["B"], shape["L"], shape["V"], shape["d"]
    return {
        "weight": ((torch.rand(v, d, device=device) - 0.5) * 2 / d**0.5).requires_grad_(),
        "x0": torch.randint(0, v, (b, l), device=device),
        "upstream": torch.randn(b, l, d, device=device),
    }


def _dense_fused(i: Inputs):
    import duo_kernels

    h, z_t = duo_kernels.tempered_softmax_embedding(i["x0"], EMBED_GAMMA, EMBED_TAU, i["weight"], seed=EMBED_SEED)
    return torch.autograd.grad(h, i["weight"], i["upstream"]), z_t


def _dense_published(i: Inputs):
    # The published Duo 'simple' curriculum: int64 one-hot, torch.randn latent,
    # argmax, softmax(w / tau) saved for backward, fp32 GEMM; ~37 GiB at B = 32 (fits an H200, not an
    # 80 GB card alongside other work). Our reference.tempered_softmax_embedding is the correctness
    # oracle instead (float64, Philox in int64 PyTorch ops): far slower than this, so not the baseline.
    from duo_kernels.reference import gaussian_params

    x0, weight = i["x0"], i["weight"]
    a_tilde, s_tilde = (t.float() for t in gaussian_params(torch.tensor(EMBED_GAMMA, device=x0.device)))
    one_hot = torch.nn.functional.one_hot(x0, weight.shape[0])
    w = a_tilde * one_hot + s_tilde * torch.randn(one_hot.shape, device=x0.device)
    z_t = w.argmax(-1)
    h = torch.softmax(w / EMBED_TAU, dim=-1) @ weight
    return torch.autograd.grad(h, weight, i["upstream"]), z_t


def _dense_bytes(s: Shape) -> int:
    b, l, v, d = s["B"], s["L"], s["V"], s["d"]
    # x0 (int64), E, dh read; h, z_t (int64), dE written. The op is compute-bound (two B L x V x d GEMMs
    # and B L V Philox normals), so this floor is far below any achievable time.
    return 8 * b * l + 4 * v * d + 4 * b * l * d + 4 * b * l * d + 8 * b * l + 4 * v * d


def _tf32(fn: Callable[[Inputs], Any]) -> Callable[[Inputs], Any]:
    """``fn`` under ``torch.set_float32_matmul_precision("high")``: TF32 tensor cores for cuBLAS and for
    our ``tl.dot`` tiles alike (both paths' GEMMs then round their inputs to 10-bit mantissas)."""
    def run(inputs: Inputs):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            return fn(inputs)
        finally:
            torch.set_float32_matmul_precision(previous)

    return run


for _variant, _wrap in (("fp32", lambda fn: fn), ("tf32", _tf32)):
    register(Case(
        name=f"tempered_softmax_embedding {_variant}",
        family="embedding",
        make_inputs=_dense_inputs,
        fused=_wrap(_dense_fused),
        reference=_wrap(_dense_published),
        bytes_moved=_dense_bytes,
        target="≥ 10× reference; ≤ 2 GiB extra at B = 32",
        backward=True,
    ))

# ---- sampling --------------------------------------------------------------------------------------
# One step of an 8-step sampler at t = 0.5 -> s = 0.375 (log-linear: alpha = 1 - t), kappa = 1, bf16
# logits as the backbone emits them. The reference path is a transcription of the published Duo
# sampler's hot path, not our reference (which already uses the mixture
# form): log_softmax -> float64, the sort-based nucleus filter, the dense posterior (3.2) with a
# one-hot z_t, and the exponential race argmax(q / E), E = 1e-10 - log(U + 1e-10), U float64 (B, L, V).
SAMPLING_ALPHA_T, SAMPLING_ALPHA_S = 0.5, 0.625


def _sampling_inputs(shape: Shape, device: torch.device) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    batch, seq_len, vocab_size = shape["B"], shape["L"], shape["V"]
    logits = (3 * torch.randn(batch, seq_len, vocab_size, generator=gen, device=device)).to(torch.bfloat16)
    z_t = torch.randint(0, vocab_size, (batch, seq_len), generator=gen, device=device)
    return {"logits": logits, "z_t": z_t}


def published_top_p_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The published nucleus filter on float64 log-probabilities: sort, cumulative softmax, drop the
    entries whose mass before them exceeds top_p (keeping the top one), renormalise."""
    sorted_log_probs, order = torch.sort(log_probs, dim=-1, descending=True)
    cumulative = sorted_log_probs.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    log_probs = log_probs.masked_fill(remove.scatter(-1, order, remove), -torch.inf)
    return log_probs - log_probs.logsumexp(dim=-1, keepdim=True)


def published_ancestral_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_t: float, alpha_s: float,
                             top_p: float = 1.0) -> torch.Tensor:
    """The published Duo ancestral update (float64 posterior (3.2) and exponential race)."""
    vocab_size = logits.shape[-1]
    log_x = logits.log_softmax(dim=-1).to(torch.float64)
    if top_p < 1.0:
        log_x = published_top_p_filter(log_x, top_p)
    x = log_x.exp()
    z = torch.nn.functional.one_hot(z_t, vocab_size)
    alpha_ts = alpha_t / alpha_s
    q = ((alpha_t * vocab_size * x * z + (alpha_ts - alpha_t) * z + (alpha_s - alpha_t) * x
          + (1 - alpha_ts) * (1 - alpha_s) / vocab_size)
         / (alpha_t * vocab_size * x.gather(-1, z_t[..., None]) + 1 - alpha_t))
    exponential = 1e-10 - (torch.rand_like(q) + 1e-10).log()
    return (q / exponential).argmax(dim=-1)


def _sampling_bytes(shape: Shape) -> int:
    # bf16 logits read once; int64 z_t read and z_s written
    return 2 * shape["B"] * shape["L"] * shape["V"] + 16 * shape["B"] * shape["L"]


def _register_step(top_p: float) -> None:
    register(Case(
        name=f"ancestral_step top_p={top_p:g}",
        family="sampling",
        make_inputs=_sampling_inputs,
        fused=lambda i: duo_kernels.ancestral_step(i["logits"], i["z_t"], SAMPLING_ALPHA_T, SAMPLING_ALPHA_S,
                                                   top_p=top_p, seed=0),
        reference=lambda i: published_ancestral_step(i["logits"], i["z_t"], SAMPLING_ALPHA_T, SAMPLING_ALPHA_S,
                                                     top_p),
        bytes_moved=_sampling_bytes,
        target="≥ 50× reference (≥ 8× its torch.compile)",
        shape=dict(SAMPLING_SHAPE),
    ))


_register_step(1.0)
_register_step(0.9)
register(Case(
    name="greedy_tail",
    family="sampling",
    make_inputs=_sampling_inputs,
    fused=lambda i: duo_kernels.greedy_tail(i["logits"]),
    reference=lambda i: i["logits"].argmax(dim=-1),
    # bf16 logits read once; int64 ids written
    bytes_moved=lambda s: 2 * s["B"] * s["L"] * s["V"] + 8 * s["B"] * s["L"],
    target="≈ torch.argmax (same bytes)",
    shape=dict(SAMPLING_SHAPE),
))

# ---- end-to-end training step (duo_model) ----------------------------------------------------------
# One forward + backward of DiT-small (169.6M parameters at V = 50258; 12 blocks, d = 768) on a
# micro-batch of B = 32 sequences of L = 1024 under bf16 autocast (fp32 on CPU), the Duo objective of
# duo_model.loss.DuoLoss in one phase: the dense curriculum (Duo), the top-k curriculum (Duo++, k = 2)
# or the discrete phase. "fused" runs duo_model.ops as bound by default (the duo_kernels op wherever
# one has landed, the fused linear + NELBO head included), "reference" the same step with every op
# bound to duo_kernels.reference (the logits materialised, then the reference NELBO) — the same
# model weights, times and noise seed. The optimizer step is left out: it is the same on both paths.
# The reference dense curriculum needs far more than 80 GB at this shape (published figure: 36.8 GiB
# for its latent alone, plus the NELBO's 21.5 GiB and the backbone's 21.4 GiB); its row records the
# out-of-memory error. The floor counts the weights read twice and the gradients written once (fp32),
# a lower bound only: the step is compute-bound.
# The DiT is the preset of hidden size d (small at d = 768); the CPU smoke run (d = 64) builds 2 blocks.
E2E_SHAPE: Shape = dict(B=32, L=1024, V=50257, d=768, k=2)


def _e2e_blocks(d: int) -> int:
    return next((p["n_blocks"] for p in PRESETS.values() if p["d_model"] == d), 2)


def _e2e_inputs(shape: Shape, device: torch.device) -> Inputs:
    config = DiTConfig(vocab_size=shape["V"], d_model=shape["d"], n_blocks=_e2e_blocks(shape["d"]),
                       n_heads=max(1, shape["d"] // 64), dropout=0.0)
    models = {}
    for impl in ("reference", "auto"):
        model_ops.use(impl)  # the embedding module is bound when the model is built
        torch.manual_seed(0)
        models[impl] = DiT(config).to(device)
    model_ops.use("auto")
    models["auto"].load_state_dict(models["reference"].state_dict())
    x0 = rng.randint((shape["B"], shape["L"]), high=shape["V"], seed=1, device=device)
    return {"models": models, "x0": x0, "t": antithetic_t(shape["B"], torch.Generator().manual_seed(2)).to(device),
            "k": shape["k"], "device": device}


def _e2e_step(inputs: Inputs, impl: str, phase_kind: str):
    model = inputs["models"][impl]
    model_ops.use(impl)
    try:
        objective = DuoLoss(model, fused_head=True)
        device = inputs["device"]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            loss = objective(inputs["x0"], inputs["t"], Phase(phase_kind, tau=1e-3, k=inputs["k"]), seed=3).mean()
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)  # every call allocates its gradients, as a training step does
        return loss.detach(), grad_norm
    finally:
        model_ops.use("auto")


def _e2e_floor_bytes(shape: Shape) -> int:
    d, v, blocks = shape["d"], shape["V"], _e2e_blocks(shape["d"])
    params = 2 * v * d + v + blocks * (12 * d * d + 6 * 128 * d) + 256 * 128
    return 3 * 4 * params


for _phase, _label, _target in (("dense", "curriculum dense", "≥ 1.8× reference (target)"),
                                ("topk", "curriculum top-2", "≥ 1.8× reference (target)"),
                                ("discrete", "discrete phase", "none set")):
    register(Case(
        name=f"train step DiT-small {_label}",
        family="duo_model",
        make_inputs=_e2e_inputs,
        fused=lambda i, p=_phase: _e2e_step(i, "auto", p),
        reference=lambda i, p=_phase: _e2e_step(i, "reference", p),
        bytes_moved=_e2e_floor_bytes,
        target=_target,
        backward=True,
        shape=dict(E2E_SHAPE),
    ))

# ---- end-to-end sampling (duo_model) ---------------------------------------------------------------
# duo_model.sample.generate: 8 ancestral steps and the Greedy-Tail (9 forward passes of DiT-small under
# bf16 autocast) for B = 8 sequences of L = 1024 from uniform noise. "fused" binds duo_model.ops as by
# default (the fused ancestral_step); "reference" runs the same loop, model and seed with the published
# sampler's step (published_ancestral_step above: float64 posterior and exponential race). Tokens/s of
# either path is B·L over its time.


def _e2e_sample_inputs(shape: Shape, device: torch.device) -> Inputs:
    inputs = _e2e_inputs({**shape, "k": 1}, device)
    return {"model": inputs["models"]["auto"].eval(), "shape": shape, "device": device}


def _published_step(logits, z_t, alpha_t, alpha_s, *, kappa=1.0, top_p=1.0, seed=None):
    return published_ancestral_step(logits, z_t, alpha_t, alpha_s, top_p)


@contextlib.contextmanager
def published_sampler(enabled: bool = True):
    """duo_model's sampler with ``published_ancestral_step`` in place of the fused step, inside the block."""
    if enabled:
        model_ops.ancestral_step = _published_step
    try:
        yield
    finally:
        model_ops.use("auto")


def _e2e_sample(inputs: Inputs, published: bool):
    from duo_model.sample import generate

    with published_sampler(published):
        shape = inputs["shape"]
        ids, _ = generate(inputs["model"], num_samples=shape["B"], seq_len=shape["L"], steps=8, seed=0,
                          batch_size=shape["B"], device=inputs["device"])
        return ids


def _register_sampling(name: str, make_inputs, target: str, shape: Shape) -> None:
    """A sampling run of ``generate``: the fused step against the published sampler's step."""
    register(Case(
        name=name,
        family="duo_model",
        make_inputs=make_inputs,
        fused=lambda i: _e2e_sample(i, published=False),
        reference=lambda i: _e2e_sample(i, published=True),
        # 9 forward passes reading the bf16 weights once each; a lower bound only (compute-bound)
        bytes_moved=lambda s: 9 * 2 * (2 * s["V"] * s["d"] + _e2e_blocks(s["d"]) * 12 * s["d"] ** 2),
        target=target,
        shape=shape,
    ))


_register_sampling("sample 8 steps + Greedy-Tail DiT-small", _e2e_sample_inputs,
                   "≥ 2× reference sampler (target)", dict(SAMPLING_SHAPE))



def _published_sample_inputs(shape: Shape, device: torch.device) -> Inputs:
    """DiT-small with random weights (adaLN and head included), written in the published snapshot
    layout and read back with ``duo_model.published.load_published``: the published models' path."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from duo_model.published import key_mapping, load_published

    config = DiTConfig(vocab_size=shape["V"], d_model=shape["d"], n_blocks=_e2e_blocks(shape["d"]),
                       n_heads=max(1, shape["d"] // 64), dropout=0.0)
    torch.manual_seed(0)
    weights = {name: torch.randn_like(p) * 0.02 for name, p in DiT(config).state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        save_file({"backbone." + p: weights[o] for p, o in key_mapping(config.n_blocks)},
                  str(Path(folder) / "model.safetensors"))
        (Path(folder) / "config.json").write_text(json.dumps(
            {"vocab_size": config.vocab_size, "hidden_dim": config.d_model, "cond_dim": config.cond_dim,
             "n_blocks": config.n_blocks, "n_heads": config.n_heads, "model_length": shape["L"]}))
        model, _ = load_published(folder, device=device)
    return {"model": model, "shape": shape, "device": device}


_register_sampling("sample 8 steps + Greedy-Tail published DiT-small B=32", _published_sample_inputs,
                   "time per batch, recorded next to the published sampler's", dict(B=32, L=1024, V=50258, d=768))

# Latency of one sequence of L = 1024 tokens from DiT-small at B = 1, bf16 autocast: Duo with 8 fused
# steps and the Greedy-Tail (9 forward passes) against the autoregressive DiT of the same size with a
# KV cache (duo_model.ar_sample.generate_ar: 1023 one-token calls); the speed-up is AR time / Duo time.
# benchmarks/generation.py times the whole grid (step counts, batch 32, the published step, Gen PPL).


def _generation_inputs(shape: Shape, device: torch.device) -> Inputs:
    inputs = _e2e_sample_inputs(shape, device)
    torch.manual_seed(0)
    inputs["ar_model"] = DiT(dataclasses.replace(inputs["model"].config, causal=True)).to(device).eval()
    return inputs


def _generate_ar(inputs: Inputs):
    from duo_model.ar_sample import generate_ar

    shape = inputs["shape"]
    return generate_ar(inputs["ar_model"], num_samples=shape["B"], seq_len=shape["L"], bos_id=0, seed=0,
                       batch_size=shape["B"], device=inputs["device"])[0]


register(Case(
    name="generate Duo 8 steps + Greedy-Tail vs AR with KV cache DiT-small",
    family="duo_model",
    make_inputs=_generation_inputs,
    fused=lambda i: _e2e_sample(i, published=False),
    reference=_generate_ar,
    # the 9 Duo forward passes reading the bf16 weights once each; a lower bound only
    bytes_moved=lambda s: 9 * 2 * (2 * s["V"] * s["d"] + _e2e_blocks(s["d"]) * 12 * s["d"] ** 2),
    target="≥ 3× lower latency than AR",
    shape=dict(B=1, L=1024, V=50257, d=768),
))

# ---- losses ----------------------------------------------------------------------------------------
# The reference side of every loss row is what the public Duo code runs: the NELBO and the KL in fp32
# from bf16 logits (log_softmax, exp, xbar_theta, log, sums), written out below;
# the DCD fp64 row runs the same KL in float64, Duo's fp64 loss_precision (the targets list both).
# duo_kernels.reference (float64, the correctness oracle) is not a baseline. Each call runs forward and backward
# (torch.autograd.grad, so nothing accumulates in .grad between timed calls).


def _nelbo_inputs(shape: Shape, device: torch.device) -> Inputs:
    b, l, v = shape["B"], shape["L"], shape["V"]
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(v, (b, l), device=device, generator=gen)
    noise = torch.randint(v, (b, l), device=device, generator=gen)
    z_t = torch.where(torch.rand(b, l, device=device, generator=gen) < 0.5, x0, noise)
    alpha_t = 0.05 + 0.9 * torch.rand(b, device=device, generator=gen)
    logits = (3 * torch.randn(b, l, v, device=device, generator=gen)).to(torch.bfloat16).requires_grad_()
    return {"logits": logits, "z_t": z_t, "x0": x0, "alpha_t": alpha_t, "dalpha_t": -torch.ones_like(alpha_t)}


def _duo_nelbo_fp32(logits, z_t, x0, alpha_t, dalpha_t):
    """Duo's ``nll_per_token`` (eq. 3.5) as the reference code computes it after the curriculum: fp32
    log_softmax of the bf16 logits, then dense xbar_theta and its log."""
    k = logits.shape[-1]
    log_x_theta = torch.log_softmax(logits.float(), -1)
    alpha, dalpha = alpha_t[:, None], dalpha_t[:, None]
    xbar_theta = k * alpha[..., None] * log_x_theta.exp() + (1 - alpha[..., None])
    log_xbar_theta = xbar_theta.log()
    eq = (z_t == x0).float()
    ne = 1 - eq
    kappa = (1 - alpha) / (k * alpha + 1 - alpha)
    r = k * alpha / (1 - alpha)
    xbar_i = (1 - alpha) + k * alpha * eq
    xbar_theta_i = xbar_theta.gather(-1, z_t[..., None])[..., 0]
    log_i = log_xbar_theta.gather(-1, z_t[..., None])[..., 0]
    log_m = log_xbar_theta.gather(-1, x0[..., None])[..., 0]
    term1 = k * (1 / xbar_i - 1 / xbar_theta_i)
    term2 = ((eq * kappa + ne) * (k * log_i - log_xbar_theta.sum(-1)) - ne * r * (log_m - log_i)
             + ((k - 1) * kappa * eq - ne / kappa) * torch.log(kappa))
    return dalpha / (k * alpha) * (term1 - term2)


def _nelbo_grad(loss_fn: Callable, inputs: Inputs):
    args = {k: v for k, v in inputs.items() if k != "logits"}
    loss = loss_fn(inputs["logits"], **args)
    return torch.autograd.grad(loss.sum(), inputs["logits"])


def _cross_entropy_grad(inputs: Inputs):
    logits = inputs["logits"]
    loss = F.cross_entropy(logits.flatten(0, 1), inputs["x0"].flatten(), reduction="sum")
    return torch.autograd.grad(loss, logits)


def _logits_bytes(shape: Shape, rows: int = 1) -> int:
    """bf16 logits read once per input row tensor, the bf16 gradient written once."""
    return 2 * (rows + 1) * shape["B"] * shape["L"] * shape["V"]


register(Case(
    name="usdm_nelbo bf16",
    family="nelbo",
    make_inputs=_nelbo_inputs,
    fused=lambda i: _nelbo_grad(duo_kernels.usdm_nelbo, i),
    reference=lambda i: _nelbo_grad(_duo_nelbo_fp32, i),
    # bf16 logits read + bf16 gradient written; int64 z_t, x0 read + fp32 loss written
    bytes_moved=lambda s: _logits_bytes(s) + (8 + 8 + 4) * s["B"] * s["L"],
    target="≥ 15× reference; ≤ 2.5× floor",
    backward=True,
))

# For scale, PyTorch's own loss on the same logits as the reference side: the speed-up column then
# reads "how many times faster than F.cross_entropy" (target: > 1×), and both peaks sit side by side.
register(Case(
    name="usdm_nelbo bf16 vs F.cross_entropy",
    family="nelbo",
    make_inputs=_nelbo_inputs,
    fused=lambda i: _nelbo_grad(duo_kernels.usdm_nelbo, i),
    reference=_cross_entropy_grad,
    bytes_moved=lambda s: _logits_bytes(s) + (8 + 8 + 4) * s["B"] * s["L"],
    target="> 1× (faster than F.cross_entropy)",
    backward=True,
))


def _linear_inputs(shape: Shape, device: torch.device) -> Inputs:
    b, l, v, d = shape["B"], shape["L"], shape["V"], shape["d"]
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randint(v, (b, l), device=device, generator=gen)
    noise = torch.randint(v, (b, l), device=device, generator=gen)
    z_t = torch.where(torch.rand(b, l, device=device, generator=gen) < 0.5, x0, noise)
    alpha_t = 0.05 + 0.9 * torch.rand(b, device=device, generator=gen)
    hidden = torch.randn(b, l, d, device=device, generator=gen)
    weight = torch.randn(v, d, device=device, generator=gen) * d**-0.5
    return {"hidden": hidden.to(torch.bfloat16).requires_grad_(), "weight": weight.to(torch.bfloat16).requires_grad_(),
            "bias": torch.zeros(v, device=device, dtype=torch.bfloat16, requires_grad=True),
            "z_t": z_t, "x0": x0, "alpha_t": alpha_t, "dalpha_t": -torch.ones_like(alpha_t)}


def _linear_grad(loss_fn: Callable, inputs: Inputs):
    """Gradients of hidden, weight and bias; ``loss_fn(logits, ...)`` gets ``F.linear``'s logits,
    ``loss_fn=None`` runs the fused op."""
    params = [inputs["hidden"], inputs["weight"], inputs["bias"]]
    args = {k: inputs[k] for k in ("z_t", "x0", "alpha_t", "dalpha_t")}
    if loss_fn is None:
        loss = duo_kernels.linear_usdm_nelbo(*params, **args)
    else:
        loss = loss_fn(F.linear(*params), **args)
    return torch.autograd.grad(loss.sum(), params)


def _linear_bytes(shape: Shape) -> int:
    """bf16 hidden and weight read, their gradients written (a GEMM-bound op: the floor is far below)."""
    b, l, v, d = shape["B"], shape["L"], shape["V"], shape["d"]
    return 2 * 2 * (b * l * d + v * d + v) + (8 + 8 + 4) * b * l


register(Case(
    name="linear_usdm_nelbo bf16",
    family="nelbo",
    make_inputs=_linear_inputs,
    fused=lambda i: _linear_grad(None, i),
    reference=lambda i: _linear_grad(_duo_nelbo_fp32, i),
    bytes_moved=_linear_bytes,
    target="peak ≤ 1/10 of logits-then-loss",
    backward=True,
))
# The target's comparison: the same GEMMs with the fused loss on materialized logits.
register(Case(
    name="linear_usdm_nelbo bf16 vs F.linear + usdm_nelbo",
    family="nelbo",
    make_inputs=_linear_inputs,
    fused=lambda i: _linear_grad(None, i),
    reference=lambda i: _linear_grad(duo_kernels.usdm_nelbo, i),
    bytes_moved=_linear_bytes,
    target="peak ≤ 1/10; time ≤ 1.2× of GEMM + fused loss",
    backward=True,
))


def _dcd_inputs(shape: Shape, device: torch.device) -> Inputs:
    b, l, v = shape["B"], shape["L"], shape["V"]
    gen = torch.Generator(device=device).manual_seed(2)
    student = 3 * torch.randn(b, l, v, device=device, generator=gen)
    teacher = student + 0.3 * torch.randn(b, l, v, device=device, generator=gen)
    return {"student": student.to(torch.bfloat16).requires_grad_(), "teacher": teacher.to(torch.bfloat16)}


def _duo_kl(student, teacher, dtype: torch.dtype):
    """Duo's 'kl-bwd' loss: log_softmax of both in ``dtype``, KL(p_s || p_t) per token."""
    log_s = torch.log_softmax(student.to(dtype), -1)
    log_t = torch.log_softmax(teacher.to(dtype), -1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def _dcd_grad(loss_fn: Callable, inputs: Inputs):
    return torch.autograd.grad(loss_fn(inputs["student"], inputs["teacher"]).sum(), inputs["student"])


register(Case(
    name="dcd_kl reverse bf16 (fp32 reference)",
    family="dcd",
    make_inputs=_dcd_inputs,
    fused=lambda i: _dcd_grad(duo_kernels.dcd_kl, i),
    reference=lambda i: _dcd_grad(lambda s, t: _duo_kl(s, t, torch.float32), i),
    # bf16 student and teacher read, bf16 student gradient written, fp32 loss written
    bytes_moved=lambda s: _logits_bytes(s, rows=2) + 4 * s["B"] * s["L"],
    target="≥ 15× reference; rel. err ≤ 1e-6",
    backward=True,
))
register(Case(
    name="dcd_kl reverse bf16 (fp64 reference)",
    family="dcd",
    make_inputs=_dcd_inputs,
    fused=lambda i: _dcd_grad(duo_kernels.dcd_kl, i),
    reference=lambda i: _dcd_grad(lambda s, t: _duo_kl(s, t, torch.float64), i),
    bytes_moved=lambda s: _logits_bytes(s, rows=2) + 4 * s["B"] * s["L"],
    target="—",
    backward=True,
))
