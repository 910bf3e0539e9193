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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import duo_kernels
from duo_kernels import rng

Shape = dict[str, int]
Inputs = dict[str, Any]

# OWT training shapes of PERF-TARGETS.md: the curriculum's per-GPU micro-batch.
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
        target: the PERF-TARGETS.md goal for this row, shown in the table (``"—"`` if none).
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


# ---- sampling --------------------------------------------------------------------------------------
# One step of an 8-step sampler at t = 0.5 -> s = 0.375 (log-linear: alpha = 1 - t), kappa = 1, bf16
# logits as the backbone emits them. The reference path is a transcription of the published Duo
# sampler's hot path (duo-math §6.1, §6.3, H10-H11), not our reference (which already uses the mixture
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
