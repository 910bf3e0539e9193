"""The sampling step (duo-math §3.4, §6): :func:`ancestral_step` (ancestral / Psi-sampler step with
nucleus filtering) and :func:`greedy_tail`, on every backend.

Backends (``impl=``):

========== ============================================================================================
``triton`` one fused kernel (:mod:`duo_kernels.triton.sampling`): a few passes over each logits row,
           nothing of size (B, L, V); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cpu``    ``ancestral_step``: the native C++ kernel ``csrc/cpu/sampling.cpp`` (row by row, O(V)
           memory per thread; the kernel's counters, float32 row statistics and Gumbel, the nucleus
           threshold by a quickselect); it needs the native build, and ``impl="auto"`` falls back to
           the reference (with a warning) where that build fails. ``greedy_tail``: PyTorch, chunked
           over rows, no build.
``reference`` :mod:`duo_kernels.reference.sampling`: float64, dense, sort-based nucleus.
========== ============================================================================================

All three draw from the same Philox stream (the reference's docstring gives the layout), so for one
seed they return the same ids except where two candidates' Gumbel keys agree to ~1e-5 or a nucleus
boundary or mixture threshold sits within float32 rounding of a uniform (ties aside); see
``README-sampling.md`` beside this file.

The ``triton`` and ``cpu`` backends run through ``torch.library`` custom ops
(``duo_kernels::ancestral_step``, ``duo_kernels::greedy_tail``) with fake implementations, so
``torch.compile(fullgraph=True)`` traces a step as one node (with ``seed=`` an int: ``generator=``
draws the seed on the host). The backend is a ``str`` argument of the op, resolved from ``impl``
before the call; ``reference`` is plain PyTorch and is traced as such. Value checks of the logits
(NaN, +inf, rows without a finite entry) happen inside the native kernel on the ``cpu`` path, in
the same pass that reads the row.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from duo_kernels._dispatch import pure_torch, resolve_backend
from duo_kernels.reference import sampling as _reference
from duo_kernels.rng import resolve_seed, seed_from_int64, seed_to_int64

# Rows per chunk of the cpu greedy tail: about 2^20 logits, 4 MiB per float32 temporary.
CHUNK_ELEMENTS = 1 << 20


def exponential53(u: torch.Tensor) -> torch.Tensor:
    """``E = -log U`` in float32 from float64 uniforms ``U = uniform53(w0, w1)``, as the "cpu" kernel
    computes it (``csrc/cpu/sampling.cpp``, the same operations as the Triton kernel's
    :func:`duo_kernels.triton.sampling.exponential53`); needs the native build.

    ``U <= 3/4``: ``-log(fp32(U))``; ``U > 3/4``: ``2 atanh(s)``, ``s = d / (2 - d)``, ``d = fp32(1 - U)``
    (exact in float64), by its series. The relative error stays at a few float32 ulp for every U of the
    2^52-point grid, also at ``1 - U = 2^-53`` where the Gumbel ``-log E`` reaches 36.7, so the
    Gumbel's upper tail is the float64 one (``README-sampling.md``).

    Example::

        >>> u = torch.tensor([0.5, 1 - 2.0**-53], dtype=torch.float64)
        >>> [round(float(-torch.log(e)), 3) for e in exponential53(u)]
        [0.367, 36.737]
    """
    from duo_kernels import _native

    u = u.to(torch.float64).contiguous()
    out = torch.empty(u.shape, dtype=torch.float32)
    _native.load().sampling_exponential53(out, u)
    return out


def _row_chunks(logits: torch.Tensor, rows_per_chunk: int):
    """``(first_row, rows)``: (c, V) views of consecutive rows of (B, L, V) logits, without copying
    them (expanded inputs stay expanded)."""
    batch, seq_len, vocab_size = logits.shape
    try:
        flat = logits.view(batch * seq_len, vocab_size)
    except RuntimeError:
        flat = None
    if flat is not None:
        for r0 in range(0, batch * seq_len, rows_per_chunk):
            yield r0, flat[r0:r0 + rows_per_chunk]
        return
    for b in range(batch):
        for l0 in range(0, seq_len, rows_per_chunk):
            yield b * seq_len + l0, logits[b, l0:l0 + rows_per_chunk]


# The native kernel's error bits (csrc/cpu/kernels.h) and the reference's messages for them.
_LOGIT_ERRORS = {1: "logits must be finite or -inf", 2: "logits must have a finite entry in every row"}


def _cpu_ancestral_step(logits, z_t, alpha_t, alpha_s, kappa, top_p: float, seed: int,
                        stats: torch.Tensor | None = None) -> torch.Tensor:
    """The native kernel (``csrc/cpu/sampling.cpp``) on validated arguments; it also checks the
    logits' values. ``stats``, if given, an (N, 2) float64 buffer that receives x_theta[z_t] after
    filtering and the kept mass Z_p."""
    from duo_kernels import _native

    z_s = torch.empty(z_t.shape, dtype=torch.int64)
    errors = _native.load().sampling_ancestral_step(
        z_s, torch.empty(0, dtype=torch.float64) if stats is None else stats, logits, z_t.contiguous(),
        alpha_t, alpha_s, kappa, top_p, seed)
    for bit, message in _LOGIT_ERRORS.items():
        if errors & bit:
            raise ValueError(message)
    return z_s


def _triton_ancestral_step(*args):
    from duo_kernels.triton import sampling as triton_sampling

    return triton_sampling.ancestral_step(*args)


def _reference_ancestral_step(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed):
    return _reference.ancestral_step(logits, z_t, alpha_t, alpha_s, kappa=kappa, top_p=top_p, seed=seed)


_STEP_KERNELS = {"triton": _triton_ancestral_step, "cpu": _cpu_ancestral_step, "reference": _reference_ancestral_step}


# ---- torch.library ops --------------------------------------------------------------------------------
# The seed travels as the int64 of its bits (duo_kernels.rng.seed_to_int64).


@torch.library.custom_op("duo_kernels::ancestral_step", mutates_args=())
def _ancestral_step_op(logits: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, kappa: Tensor, top_p: float,
                       seed: int, backend: str) -> Tensor:
    """z_s (B, L) int64 from validated arguments (``alpha_t, alpha_s, kappa`` (B, L) float64)."""
    return _STEP_KERNELS[backend](logits, z_t, alpha_t, alpha_s, kappa, top_p, seed_from_int64(seed))


@_ancestral_step_op.register_fake
def _(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed, backend):
    return torch.empty(z_t.shape, dtype=torch.int64, device=z_t.device)


def ancestral_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_t, alpha_s, *, kappa=1.0, top_p: float = 1.0,
                   seed: int | None = None, generator: torch.Generator | None = None,
                   impl: str = "auto") -> torch.Tensor:
    """One reverse step ``z_s ~ Psi^theta_{s|t}(. | z_t)`` (duo-math §6.1-6.4, eq. 6.2), fused.

    ``kappa = 1`` is ancestral sampling (3.2), ``alpha_s = 1`` the noise-removal step (3.3),
    ``kappa < 1`` a Psi-sampler step; ``top_p < 1`` filters x_theta to its nucleus (§6.3) first, by
    a per-row threshold search instead of a sort. Same arguments, stream and law as
    :func:`duo_kernels.reference.ancestral_step`.

    Args:
        logits: (B, L, V) float16 / bfloat16 / float32 / float64 (read as float32); entries finite or
            -inf, at least one finite per row. Any strides (an expanded tensor is not copied).
        z_t: current tokens, (B, L) int64 in [0, V).
        alpha_t: signal level at t, in (0, 1], a number or (B,), (B, 1), (B, L).
        alpha_s: signal level at s, in (0, 1], same shapes; ``alpha_s >= alpha_t``.
        kappa: Psi weight in [0, 1], a number or (B,), (B, 1), (B, L); default 1.
        top_p: nucleus mass in (0, 1]; default 1 (no filtering).
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (module docstring).

    Returns:
        z_s: (B, L) int64.

    Nucleus ties: entries with equal logits are ordered by index, as the reference's stable sort; at
    the threshold logit the first ones are kept while the mass before them is <= top_p.

    Example::

        >>> logits = torch.randn(2, 3, 37)
        >>> z_t = torch.randint(0, 37, (2, 3))
        >>> z_s = ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=0)
        >>> torch.equal(z_s, ancestral_step(logits, z_t, 0.3, 0.6, kappa=0.5, top_p=0.9, seed=0, impl="reference"))
        True
    """
    _reference._check_rows("logits", logits)
    backend = resolve_backend("sampling.ancestral_step", impl, str(logits.device), _STEP_KERNELS)
    # the cpu kernel checks the logits' values in the pass that reads them (no (B, L, V) temporaries)
    _, alpha_t, alpha_s, kappa, top_p = _reference._step_args(logits, z_t, alpha_t, alpha_s, kappa, top_p,
                                                              check_logit_values=backend != "cpu")
    seed = resolve_seed(seed, generator)
    if backend == "reference":
        return _reference_ancestral_step(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed)
    return _ancestral_step_op(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed_to_int64(seed), backend)


@pure_torch
def _cpu_greedy_tail(logits, z_t, return_probs: bool):
    ids = torch.empty(logits.shape[:2], dtype=torch.int64)
    probs = torch.empty(logits.shape[:2], dtype=torch.float32) if return_probs else None
    flat_ids = ids.view(-1)
    flat_probs = probs.view(-1) if return_probs else None
    z = z_t.reshape(-1) if return_probs else None
    for r0, rows in _row_chunks(logits, max(1, CHUNK_ELEMENTS // logits.shape[-1])):
        r1 = r0 + rows.shape[0]
        # argmax in the logits' own dtype, as the reference (for half types and float32 the same ids
        # as on the float32 values the kernel reads), without a converted copy
        flat_ids[r0:r1] = rows.argmax(dim=-1)
        if return_probs:
            x = rows.to(torch.float32)
            m = x.amax(dim=-1)
            log_s = torch.log(torch.exp(x - m[:, None]).sum(dim=-1).double())
            l_z = x.gather(-1, z[r0:r1, None])[:, 0]
            flat_probs[r0:r1] = torch.exp(l_z.double() - m.double() - log_s).to(torch.float32)
    return (ids, probs) if return_probs else ids


def _triton_greedy_tail(*args):
    from duo_kernels.triton import sampling as triton_sampling

    return triton_sampling.greedy_tail(*args)


def _reference_greedy_tail(logits, z_t, return_probs):
    return _reference.greedy_tail(logits, z_t, return_probs=return_probs)


_GREEDY_KERNELS = {"triton": _triton_greedy_tail, "cpu": _cpu_greedy_tail, "reference": _reference_greedy_tail}


@torch.library.custom_op("duo_kernels::greedy_tail", mutates_args=())
def _greedy_tail_op(logits: Tensor, z_t: Optional[Tensor], return_probs: bool, backend: str) -> tuple[Tensor, Tensor]:
    """ids (B, L) int64 and probs (B, L) float32, or an empty probs tensor without ``return_probs``."""
    out = _GREEDY_KERNELS[backend](logits, z_t, return_probs)
    if return_probs:
        return out
    return out, torch.empty(0, dtype=torch.float32, device=logits.device)


@_greedy_tail_op.register_fake
def _(logits, z_t, return_probs, backend):
    shape = logits.shape[:2] if return_probs else (0,)
    return (torch.empty(logits.shape[:2], dtype=torch.int64, device=logits.device),
            torch.empty(shape, dtype=torch.float32, device=logits.device))


def greedy_tail(logits: torch.Tensor, z_t: torch.Tensor | None = None, *, return_probs: bool = False,
                impl: str = "auto"):
    """The Greedy-Tail noise removal (duo-math §6.1): ``argmax`` over V, the first index on ties
    (as ``torch.argmax``), in one pass over each logits row.

    Args:
        logits: (B, L, V) float16 / bfloat16 / float32 / float64 (read as float32); entries finite or
            -inf, at least one finite per row.
        z_t: (B, L) int64 in [0, V); needed only with ``return_probs``.
        return_probs: also return ``x_theta[z_t] = exp(logits[z_t] - logsumexp(logits))``.
        impl: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ids (B, L) int64, or ``(ids, probs)`` with probs (B, L) float32.

    Example::

        >>> logits = torch.tensor([[[0.0, 2.0, 2.0], [1.0, 0.0, 0.0]]])
        >>> greedy_tail(logits).tolist()
        [[1, 0]]
    """
    _reference._greedy_args(logits, z_t, return_probs)
    backend = resolve_backend("sampling.greedy_tail", impl, str(logits.device), _GREEDY_KERNELS)
    if backend == "reference":
        return _reference_greedy_tail(logits, z_t, return_probs)
    ids, probs = _greedy_tail_op(logits, z_t if return_probs else None, return_probs, backend)
    return (ids, probs) if return_probs else ids
