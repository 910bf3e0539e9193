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


# ---- losses ----------------------------------------------------------------------------------------
# The reference side of every loss row is what the public Duo code runs: the NELBO and the KL in fp32
# from bf16 logits (log_softmax, exp, xbar_theta, log, sums: duo-math §10 H4/H5/H9), written out below.
# duo_kernels.reference (float64, the correctness oracle) is slower still; the DCD fp64 row times it,
# as PERF-TARGETS.md lists Duo's fp64 loss_precision too. Each call runs forward and backward
# (torch.autograd.grad, so nothing accumulates in .grad between timed calls).
import duo_kernels  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from duo_kernels.reference import dcd as reference_dcd  # noqa: E402


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
# The PERF-TARGETS.md comparison: the same GEMMs with the fused loss on materialized logits.
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
    reference=lambda i: _dcd_grad(reference_dcd.dcd_kl, i),
    bytes_moved=lambda s: _logits_bytes(s, rows=2) + 4 * s["B"] * s["L"],
    target="—",
    backward=True,
))
