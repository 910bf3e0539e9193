"""The sampling step (duo-math §3.4, §6): :func:`ancestral_step` (ancestral / Psi-sampler step with
nucleus filtering) and :func:`greedy_tail`, on every backend.

Backends (``impl=``):

========== ============================================================================================
``triton`` one fused kernel (:mod:`duo_kernels.triton.sampling`): a few passes over each logits row,
           nothing of size (B, L, V); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cpu``    PyTorch, chunked over rows: O(rows_per_chunk · V) memory; the same counters and the same
           float32 Gumbel as the kernel; the Gumbel uniforms come from :func:`duo_kernels.rng.uniform`
           (its fastest CPU backend: the C++ kernels when they build, else the PyTorch Philox).
``reference`` :mod:`duo_kernels.reference.sampling`: float64, dense, sort-based nucleus.
========== ============================================================================================

All three draw from the same Philox stream (the reference's docstring gives the layout), so for one
seed they return the same ids except where two candidates' Gumbel keys agree to ~1e-5 or a nucleus
boundary or mixture threshold sits within float32 rounding of a uniform (ties aside); see
``README-sampling.md`` beside this file.
"""

from __future__ import annotations

import math

import torch

from duo_kernels import rng
from duo_kernels._dispatch import dispatch, pure_torch
from duo_kernels.reference import rng as _rng
from duo_kernels.reference import sampling as _reference
from duo_kernels.rng import resolve_seed

# Rows per chunk of the cpu path: about 2^20 logits, 4 MiB per float32 temporary.
CHUNK_ELEMENTS = 1 << 20
# The cpu path draws the Gumbel uniforms of runs of x_theta rows in one call; runs closer than this
# many logits apart are drawn together (the rows between are wasted draws, cheaper than a call).
_MERGE_GAP = 4096


def exponential53(u: torch.Tensor) -> torch.Tensor:
    """``E = -log U`` in float32 from the float64 uniform ``U = uniform53(w0, w1)``: the Triton kernel's
    :func:`duo_kernels.triton.sampling.exponential53`, operation for operation.

    ``U <= 3/4``: ``-log(fp32(U))``; ``U > 3/4``: ``2 atanh(s)``, ``s = d / (2 - d)``, ``d = fp32(1 - U)``
    (exact in float64), by its series. The relative error stays at a few float32 ulp for every U of the
    2^52-point grid, also at ``1 - U = 2^-53`` where the Gumbel ``-log E`` reaches 36.7, so the
    Gumbel's upper tail is the float64 one (``README-sampling.md``).

    Example::

        >>> u = torch.tensor([0.5, 1 - 2.0**-53], dtype=torch.float64)
        >>> [round(float(-torch.log(e)), 3) for e in exponential53(u)]
        [0.367, 36.737]
    """
    d = (1.0 - u).to(torch.float32)
    s = d / (2.0 - d)
    s2 = s * s
    e_near_one = 2.0 * s * (1.0 + s2 * (0.33333334 + s2 * (0.2 + s2 * (0.14285715 + s2 * 0.11111111))))
    e_other = -torch.log(u.to(torch.float32))
    return torch.where(u > 0.75, e_near_one, e_other)


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


def _nucleus(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, top_p: float):
    """Nucleus filtering (duo-math §6.3) of rows x of logits, with row max m and sum s of exp(x - m)
    (probabilities exp(x - m) / s, as in the kernel), without a full sort.

    Returns per row: tau, the logit of the last kept entry in descending order; ``kept_ties``, how many
    entries equal to tau are kept (the first ones by index); and the kept mass Z_p (float64). An entry
    is kept when the mass before it (descending, float64 sums) is <= top_p.

    Partial sorts: the top 64, then 8x more for the rows whose kept set is not complete, up to a full
    sort. The order torch.topk gives equal logits does not matter: they have equal masses.
    """
    num, vocab_size = x.shape
    tau = torch.empty(num, dtype=x.dtype)
    kept_ties = torch.empty(num, dtype=torch.int64)
    kept_mass = torch.empty(num, dtype=torch.float64)
    todo = torch.arange(num)
    k = min(vocab_size, 64)
    while todo.numel():
        values = torch.topk(x[todo], k, dim=-1).values
        probs = (torch.exp(values - m[todo, None]) / s[todo, None]).double()
        mass = torch.cumsum(probs, dim=-1)
        kept = (mass - probs <= top_p).sum(dim=-1)
        done = (kept < k) | (k == vocab_size)
        if done.any():
            values, kept, last = values[done], kept[done], (kept[done] - 1)[:, None]
            rows = todo[done]
            tau[rows] = values.gather(-1, last)[:, 0]
            kept_ties[rows] = kept - (values[:, :int(kept.max())] > tau[rows, None]).sum(dim=-1)
            kept_mass[rows] = mass[done].gather(-1, last)[:, 0]
        todo = todo[~done]
        k = min(vocab_size, 8 * k)
    return tau, kept_ties, kept_mass


def _kept(x: torch.Tensor, tau: torch.Tensor, kept_ties: torch.Tensor) -> torch.Tensor:
    """Nucleus mask of rows x: logits above tau, and the first ``kept_ties`` (index order) equal to it."""
    tie = x == tau[:, None]
    rank = torch.cumsum(tie, dim=-1) - tie.to(torch.int64)
    return (x > tau[:, None]) | (tie & (rank < kept_ties[:, None]))


def _merged_runs(rows: torch.Tensor, vocab_size: int) -> list[tuple[int, int]]:
    """Sorted row indices as ``[start, stop)`` runs, merging runs less than _MERGE_GAP logits apart."""
    if rows.numel() == 0:
        return []
    split = torch.nonzero(torch.diff(rows) >= max(1, _MERGE_GAP // vocab_size))[:, 0]
    starts = torch.cat([rows[:1], rows[split + 1]]).tolist()
    stops = torch.cat([rows[split] + 1, rows[-1:] + 1]).tolist()
    return list(zip(starts, stops))


@pure_torch
def _cpu_ancestral_step(logits, z_t, alpha_t, alpha_s, kappa, top_p: float, seed: int) -> torch.Tensor:
    """The kernel's algorithm in PyTorch, chunk by chunk: float32 row statistics, the nucleus
    threshold by partial sorts, float64 mixture weights, the kernel's float32 Gumbel."""
    num = z_t.numel()
    vocab_size = logits.shape[-1]
    z = z_t.reshape(-1)
    alpha_t, alpha_s, kappa = (t.reshape(-1) for t in (alpha_t, alpha_s, kappa))
    z_s = torch.empty(num, dtype=torch.int64)
    for r0, rows in _row_chunks(logits, max(1, CHUNK_ELEMENTS // vocab_size)):
        r1 = r0 + rows.shape[0]
        x = rows.to(torch.float32)
        z_c = z[r0:r1]
        m = x.amax(dim=-1)
        s = torch.exp(x - m[:, None]).sum(dim=-1)
        l_z = x.gather(-1, z_c[:, None])[:, 0]
        if top_p < 1.0:
            tau, kept_ties, kept_mass = _nucleus(x, m, s, top_p)
            kept_z = l_z > tau
            # z_t tied with tau: kept if fewer than kept_ties equal entries come before it
            tied = torch.nonzero(l_z == tau)[:, 0]
            rank_z = ((x[tied] == tau[tied, None]) & (torch.arange(vocab_size) < z_c[tied, None])).sum(dim=-1)
            kept_z[tied] = rank_z < kept_ties[tied]
            x_z = torch.where(kept_z, (torch.exp(l_z - m) / s).double() / kept_mass, 0.0)
        else:
            x_z = torch.exp(l_z.double() - m.double() - torch.log(s.double()))
        c_p, c_u, _ = _reference._psi_mixture(x_z, alpha_t[r0:r1], alpha_s[r0:r1], kappa[r0:r1], vocab_size)
        w0, w1, w2, _ = _rng.philox4x32(seed, num * vocab_size + torch.arange(r0, r1))
        u = _rng.uniform53(w0, w1)
        out = torch.where(u < c_p + c_u, _rng.randint32_below(w2, vocab_size), z_c)
        model_rows = torch.nonzero(u < c_p)[:, 0]
        for a, b in _merged_runs(model_rows, vocab_size):
            uniforms = rng.uniform(((b - a) * vocab_size,), seed=seed, offset=(r0 + a) * vocab_size,
                                   dtype=torch.float64).view(b - a, vocab_size)
            key = x[a:b] - torch.log(exponential53(uniforms))
            if top_p < 1.0:
                key = key.masked_fill(~_kept(x[a:b], tau[a:b], kept_ties[a:b]), -math.inf)
            out[a:b] = torch.where(u[a:b] < c_p[a:b], key.argmax(dim=-1), out[a:b])
        z_s[r0:r1] = out
    return z_s.view_as(z_t)


def _triton_ancestral_step(*args):
    from duo_kernels.triton import sampling as triton_sampling

    return triton_sampling.ancestral_step(*args)


def _reference_ancestral_step(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed):
    return _reference.ancestral_step(logits, z_t, alpha_t, alpha_s, kappa=kappa, top_p=top_p, seed=seed)


_STEP_KERNELS = {"triton": _triton_ancestral_step, "cpu": _cpu_ancestral_step, "reference": _reference_ancestral_step}


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
    _, alpha_t, alpha_s, kappa, top_p = _reference._step_args(logits, z_t, alpha_t, alpha_s, kappa, top_p)
    _, fn = dispatch("sampling.ancestral_step", impl, logits.device, _STEP_KERNELS)
    seed = resolve_seed(seed, generator)
    return fn(logits, z_t, alpha_t, alpha_s, kappa, top_p, seed)


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
    _, fn = dispatch("sampling.greedy_tail", impl, logits.device, _GREEDY_KERNELS)
    return fn(logits, z_t, return_probs)
