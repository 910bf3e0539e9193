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

from duo_kernels import rng
# duo_model's backbone and loss need nothing beyond torch and duo_kernels (no tokenizers, safetensors).
from duo_model import ops as model_ops
from duo_model.dit import PRESETS, DiT, DiTConfig
from duo_model.loss import DuoLoss, Phase, antithetic_t

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


# ---- end-to-end training step (duo_model) ----------------------------------------------------------
# One forward + backward of DiT-small (169.6M parameters at V = 50258; 12 blocks, d = 768) on a
# micro-batch of B = 32 sequences of L = 1024 under bf16 autocast (fp32 on CPU), the Duo objective of
# duo_model.loss.DuoLoss in one phase: the dense curriculum (Duo), the top-k curriculum (Duo++, k = 2)
# or the discrete phase. "fused" runs duo_model.ops as bound by default (the duo_kernels op wherever
# one has landed, the fused linear + NELBO head included), "reference" the same step with every op
# bound to duo_kernels.reference (the logits materialised, then the reference NELBO) — the same
# model weights, times and noise seed. The optimizer step is left out: it is the same on both paths.
# The reference dense curriculum needs far more than 80 GB at this shape (PERF-TARGETS.md: 36.8 GiB
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


for _phase, _label, _target in (("dense", "curriculum dense", "≥ 1.8× reference (PERF-TARGETS)"),
                                ("topk", "curriculum top-2", "≥ 1.8× reference (PERF-TARGETS)"),
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
