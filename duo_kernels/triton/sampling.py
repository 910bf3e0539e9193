"""The fused sampling step in Triton (duo-math §3.4, §6.1-6.4): one ancestral / Psi-sampler step with
nucleus filtering, and the greedy tail. The derivation, the tie rule and the precision argument are
in ``duo_kernels/ops/README-sampling.md``.

A program owns ``BLOCK_R`` rows (tokens) and walks their logits in ``BLOCK_V`` columns:

1. row statistics: online max and sum-exp (fp32), ``logit[z_t]``, and (nucleus only) how many
   entries before ``z_t`` share its logit;
2. nucleus only: a threshold search over the logit values — every pass splits the candidate
   interval into ``NUM_BUCKETS`` ranges of the order-preserving int32 key of the fp32 logits and
   keeps the range that holds the threshold, snapped to the values it contains; 1-7 passes on
   the logits tried (README), 10 at worst;
3. the mixture weights (3.4)/(6.2) in fp64 and the component choice from counter ``N V + t``;
4. only for rows whose component is x_theta: one Gumbel-max pass over the kept entries, with the
   Gumbel from 53-bit uniforms computed without cancellation (:func:`exponential53`).

Loads convert to fp32 at once (the interpreter mis-computes bf16); per-row scalars of the mixture are
fp64; nothing of size (B, L, V) is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_kernels.triton.rng import randint32_below, uniform53
from duo_kernels.triton.target import gpu_capability

NUM_BUCKETS = 16
# A pass divides the key width (< 2^32) by ~16, and two distinct keys always fall in different
# buckets: 9-10 passes at worst; a loop bound, not a cost (finished blocks skip the remaining passes).
MAX_SEARCH_PASSES = 12


@triton.jit
def exponential53(w_hi, w_lo):
    """``E = -log U`` in float32 for ``U = uniform53(w_hi, w_lo)``, accurate to a few ulp for every U.

    ``U <= 3/4``: ``-log(fp32(U))``. ``U > 3/4``: with ``d = 1 - U`` (exact in fp64, one rounding to
    fp32) and ``s = d / (2 - d)``, ``-log(1 - d) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...)``;
    ``s < 1/7``, so five terms leave a truncation error below 1e-9. The Gumbel is ``-log E``.
    ``duo_kernels.ops.sampling.exponential53`` is the same function in PyTorch.
    """
    u = uniform53(w_hi, w_lo)
    d = (1.0 - u).to(tl.float32)
    s = d / (2.0 - d)
    s2 = s * s
    e_near_one = 2.0 * s * (1.0 + s2 * (0.33333334 + s2 * (0.2 + s2 * (0.14285715 + s2 * 0.11111111))))
    e_other = -tl.log(u.to(tl.float32))
    return tl.where(u > 0.75, e_near_one, e_other)


@triton.jit
def _order_key(x):
    """int32 key of fp32 x with key(x) < key(y) iff x < y; -0.0 and +0.0 share key 0."""
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return tl.where(k == -1, 0, k)


@triton.jit(do_not_specialize=["seed", "component_counter"])
def _ancestral_step_kernel(
    p_logits, p_z_t, p_alpha_t, p_alpha_s, p_kappa, p_z_s, p_stats,
    n_rows, seq_len, vocab_size, stride_b, stride_l, stride_v, seed: tl.uint64,
    component_counter: tl.int64, top_p,
    FILTER: tl.constexpr, STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, V_BLOCKS: tl.constexpr, NUM_BUCKETS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    o_r = tl.where(m_r, o_r, 0)
    # [BLOCK_R] row pointers: rows are (b, l) pairs, so expanded inputs need no copy
    p_row = p_logits + (o_r // seq_len) * stride_b + (o_r % seq_len) * stride_l
    b_z = tl.load(p_z_t + o_r)
    b_lz = tl.load(p_row + b_z * stride_v).to(tl.float32)

    # ---- 1. row statistics: online max / sum-exp; ties of logit[z_t] before z_t
    b_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_R], tl.float32)
    b_rank_z = tl.zeros([BLOCK_R], tl.int32)
    for i_v in range(V_BLOCKS):
        v0 = i_v * BLOCK_V
        o_v = v0 + tl.arange(0, BLOCK_V)
        # rows past n_rows read row 0 (o_r was clamped) and are never stored: no -inf rows, no NaN
        m_rv = (o_v < vocab_size)[None, :] & (o_r >= 0)[:, None]
        # [BLOCK_R, BLOCK_V]
        b_l = tl.load(p_row[:, None] + o_v[None, :].to(tl.int64) * stride_v, mask=m_rv,
                      other=float("-inf")).to(tl.float32)
        b_new = tl.maximum(b_max, tl.max(b_l, axis=1))
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_sum = b_sum * tl.exp(b_max - b_ref) + tl.sum(tl.exp(b_l - b_ref[:, None]), axis=1)
        b_max = b_new
        if FILTER:
            m_tie = (b_l == b_lz[:, None]) & (o_v[None, :] < b_z[:, None]) & m_rv
            b_rank_z += tl.sum(m_tie.to(tl.int32), axis=1)
    b_lse = b_max + tl.log(b_sum)
    # probabilities as exp(l - max) / sum: the large ones, which dominate the nucleus mass, then
    # carry float32 rounding only (exp(l - lse) would add lse's rounding, ~5e-7 at lse ~ 10)
    b_inv_sum = 1.0 / b_sum
    b_pz = tl.exp(b_lz - b_max) * b_inv_sum

    if FILTER:
        # ---- 2. nucleus threshold tau: the smallest logit value whose first entry (in sorted order)
        # is kept, i.e. with F(tau) = mass strictly above tau <= top_p (duo-math §6.3). The mass at
        # or below tau is >= 1 - top_p and at most V exp(tau - lse), so tau >= lse + log((1 - p)/V);
        # the candidate interval [c_lo, c_hi] starts one nat below that and at the max.
        c_lo = tl.minimum(b_lse + tl.log((1.0 - top_p) / vocab_size) - 1.0, b_max)
        c_hi = b_max
        f_hi = tl.zeros([BLOCK_R], tl.float32)  # mass strictly above c_hi
        n_tau = tl.zeros([BLOCK_R], tl.int32)
        done = b_max != b_max  # rows with NaN logits never search (they stay at z_t)
        o_j = tl.arange(0, NUM_BUCKETS)
        for _ in range(MAX_PASSES):
            if tl.sum((~done).to(tl.int32), axis=0) > 0:
                k_lo = _order_key(c_lo).to(tl.int64)
                scale = NUM_BUCKETS / (_order_key(c_hi).to(tl.int64) - k_lo + 1).to(tl.float32)
                # [BLOCK_R, NUM_BUCKETS]
                b_mass = tl.zeros([BLOCK_R, NUM_BUCKETS], tl.float32)
                b_cnt = tl.zeros([BLOCK_R, NUM_BUCKETS], tl.int32)
                b_lmin = tl.full([BLOCK_R, NUM_BUCKETS], float("inf"), tl.float32)
                b_lmax = tl.full([BLOCK_R, NUM_BUCKETS], float("-inf"), tl.float32)
                for i_v in range(V_BLOCKS):
                    v0 = i_v * BLOCK_V
                    o_v = v0 + tl.arange(0, BLOCK_V)
                    m_rv = (~done)[:, None] & (o_v < vocab_size)[None, :]
                    b_l = tl.load(p_row[:, None] + o_v[None, :].to(tl.int64) * stride_v, mask=m_rv,
                                  other=float("-inf")).to(tl.float32)
                    b_p = tl.exp(b_l - b_max[:, None]) * b_inv_sum[:, None]
                    m_in = m_rv & (b_l >= c_lo[:, None]) & (b_l <= c_hi[:, None])
                    # bucket of each entry: a monotone map of its key onto [0, NUM_BUCKETS)
                    b_j = (_order_key(b_l).to(tl.int64) - k_lo[:, None]).to(tl.float32) * scale[:, None]
                    b_j = tl.minimum(tl.maximum(b_j, 0.0), NUM_BUCKETS - 1.0).to(tl.int32)
                    # [BLOCK_R, BLOCK_V, NUM_BUCKETS]
                    m_hot = (b_j[:, :, None] == o_j[None, None, :]) & m_in[:, :, None]
                    b_mass += tl.sum(tl.where(m_hot, b_p[:, :, None], 0.0), axis=1)
                    b_cnt += tl.sum(m_hot.to(tl.int32), axis=1)
                    b_lmin = tl.minimum(b_lmin, tl.min(tl.where(m_hot, b_l[:, :, None], float("inf")), axis=1))
                    b_lmax = tl.maximum(b_lmax, tl.max(tl.where(m_hot, b_l[:, :, None], float("-inf")), axis=1))
                # mass strictly above each bucket; tau lies in the lowest non-empty bucket with <= top_p
                b_above = f_hi[:, None] + tl.sum(b_mass, axis=1)[:, None] - tl.cumsum(b_mass, axis=1)
                j_star = tl.min(tl.where((b_cnt > 0) & (b_above <= top_p), o_j[None, :], NUM_BUCKETS), axis=1)
                m_pick = o_j[None, :] == j_star[:, None]
                m_upd = ~done & (j_star < NUM_BUCKETS)
                c_lo = tl.where(m_upd, tl.sum(tl.where(m_pick, b_lmin, 0.0), axis=1), c_lo)
                c_hi = tl.where(m_upd, tl.sum(tl.where(m_pick, b_lmax, 0.0), axis=1), c_hi)
                f_hi = tl.where(m_upd, tl.sum(tl.where(m_pick, b_above, 0.0), axis=1), f_hi)
                n_tau = tl.where(m_upd, tl.sum(tl.where(m_pick, b_cnt, 0), axis=1), n_tau)
                done = done | ~m_upd | (c_lo == c_hi)
        # tau = c_hi. Its ties are kept in index order while the mass before them stays <= top_p:
        # the i-th (0-based) has mass F(tau) + i p_tau before it, so k_tau = floor((p - F)/p_tau) + 1.
        b_ptau = tl.exp(c_hi - b_max) * b_inv_sum
        k_tau = tl.minimum(tl.floor((top_p - f_hi) / b_ptau) + 1.0, n_tau.to(tl.float32))
        b_zp = f_hi + k_tau * b_ptau
        m_kept_z = (b_lz > c_hi) | ((b_lz == c_hi) & (b_rank_z.to(tl.float32) < k_tau))
        x_z = tl.where(m_kept_z, b_pz.to(tl.float64) / b_zp.to(tl.float64), 0.0)
    else:
        x_z = tl.exp(b_lz.to(tl.float64) - b_max.to(tl.float64) - tl.log(b_sum.to(tl.float64)))
        b_zp = tl.full([BLOCK_R], 1.0, tl.float32)

    # ---- 3. mixture weights (3.4)/(6.2) in fp64, the reference's expressions, and the component
    alpha_t = tl.load(p_alpha_t + o_r)
    alpha_s = tl.load(p_alpha_s + o_r)
    kappa = tl.load(p_kappa + o_r)
    denom = vocab_size * alpha_t * x_z + 1 - alpha_t
    alpha_ts = alpha_t / alpha_s
    c_p = kappa * ((alpha_s - alpha_t) / denom) + (1 - kappa) * alpha_s * ((1 - alpha_t) / denom)
    c_u = kappa * ((1 - alpha_ts) * (1 - alpha_s) / denom) + (1 - kappa) * (1 - alpha_s)
    w0, w1, w2, w3 = tl.randint4x(seed, component_counter + o_r)
    u = uniform53(w0, w1)
    m_model = (u < c_p) & m_r
    z_s = tl.where(u < c_p + c_u, randint32_below(w2, vocab_size), b_z)

    # ---- 4. Gumbel-max over the kept entries, only when some row of the block draws from x_theta
    if tl.sum(m_model.to(tl.int32), axis=0) > 0:
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
        best_v = tl.zeros([BLOCK_R], tl.int64)
        n_ties = tl.zeros([BLOCK_R], tl.int32)
        for i_v in range(V_BLOCKS):
            v0 = i_v * BLOCK_V
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_rv = m_model[:, None] & (o_v < vocab_size)[None, :]
            b_l = tl.load(p_row[:, None] + o_v[None, :].to(tl.int64) * stride_v, mask=m_rv,
                          other=float("-inf")).to(tl.float32)
            # [BLOCK_R, BLOCK_V] words: their names differ from the [BLOCK_R] words above, as a name bound
            # before a loop and re-bound inside it is loop-carried and must keep its shape
            g0, g1, g2, g3 = tl.randint4x(seed, o_r[:, None] * vocab_size + o_v[None, :])
            b_key = b_l - tl.log(exponential53(g0, g1))
            if FILTER:
                m_tie = (b_l == c_hi[:, None]) & m_rv
                b_rank = n_ties[:, None] + tl.cumsum(m_tie.to(tl.int32), axis=1) - m_tie.to(tl.int32)
                n_ties += tl.sum(m_tie.to(tl.int32), axis=1)
                m_rv = m_rv & ((b_l > c_hi[:, None]) | (m_tie & (b_rank.to(tl.float32) < k_tau[:, None])))
            b_key = tl.where(m_rv, b_key, float("-inf"))
            b_best, b_arg = tl.max(b_key, axis=1, return_indices=True, return_indices_tie_break_left=True)
            m_better = b_best > best
            best = tl.where(m_better, b_best, best)
            best_v = tl.where(m_better, v0 + b_arg.to(tl.int64), best_v)
        z_s = tl.where(m_model, best_v, z_s)

    tl.store(p_z_s + o_r, z_s, mask=m_r)
    if STATS:
        tl.store(p_stats + 2 * o_r, x_z, mask=m_r)
        tl.store(p_stats + 2 * o_r + 1, b_zp.to(tl.float64), mask=m_r)


@triton.jit
def _greedy_tail_kernel(
    p_logits, p_z_t, p_ids, p_probs, n_rows, seq_len, vocab_size, stride_b, stride_l, stride_v,
    PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, V_BLOCKS: tl.constexpr,
):
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    o_r = tl.where(m_r, o_r, 0)
    p_row = p_logits + (o_r // seq_len) * stride_b + (o_r % seq_len) * stride_l
    b_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_arg = tl.zeros([BLOCK_R], tl.int64)
    b_sum = tl.zeros([BLOCK_R], tl.float32)
    for i_v in range(V_BLOCKS):
        v0 = i_v * BLOCK_V
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_rv = (o_v < vocab_size)[None, :] & (o_r >= 0)[:, None]
        # [BLOCK_R, BLOCK_V]
        b_l = tl.load(p_row[:, None] + o_v[None, :].to(tl.int64) * stride_v, mask=m_rv,
                      other=float("-inf")).to(tl.float32)
        b_best, b_idx = tl.max(b_l, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # strictly greater: the first index of the row maximum wins, as in torch.argmax
        m_better = b_best > b_max
        b_new = tl.maximum(b_max, b_best)
        if PROBS:
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
            b_sum = b_sum * tl.exp(b_max - b_ref) + tl.sum(tl.exp(b_l - b_ref[:, None]), axis=1)
        b_arg = tl.where(m_better, v0 + b_idx.to(tl.int64), b_arg)
        b_max = b_new
    tl.store(p_ids + o_r, b_arg, mask=m_r)
    if PROBS:
        b_z = tl.load(p_z_t + o_r)
        b_lz = tl.load(p_row + b_z * stride_v).to(tl.float32)
        x_z = tl.exp(b_lz.to(tl.float64) - b_max.to(tl.float64) - tl.log(b_sum.to(tl.float64)))
        tl.store(p_probs + o_r, x_z.to(tl.float32), mask=m_r)


def _blocks(n_rows: int, vocab_size: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_V). On a GPU a row per program, 1024 columns at a time. In the interpreter,
    whose cost is per program and per call (each call of a jit helper such as tl.randint4x re-patches
    triton.language, ~5 ms), up to 256 rows share a program, a tile of up to 16384 entries."""
    block_v = min(1024, triton.next_power_of_2(vocab_size))
    if gpu_capability(device):
        return 1, block_v
    block_r = max(1, min(triton.next_power_of_2(n_rows), 16384 // block_v, 256))
    return block_r, block_v


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int, int]:
    batch, seq_len, _ = logits.shape
    return batch * seq_len, seq_len, *logits.stride()


def ancestral_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
                   kappa: torch.Tensor, top_p: float, seed: int, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Launch on validated arguments: ``alpha_t, alpha_s, kappa`` (B, L) float64; ``stats``, if given,
    an (N, 2) float64 buffer that receives x_theta[z_t] after filtering and the kept mass Z_p."""
    n_rows, seq_len, stride_b, stride_l, stride_v = _row_layout(logits)
    vocab_size = logits.shape[-1]
    z_s = torch.empty(z_t.shape, dtype=torch.int64, device=z_t.device)
    if n_rows == 0:
        return z_s
    block_r, block_v = _blocks(n_rows, vocab_size, logits.device)
    flat = [t.contiguous().view(-1) for t in (z_t, alpha_t, alpha_s, kappa)]
    _ancestral_step_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, *flat, z_s, z_s if stats is None else stats,
        n_rows, seq_len, vocab_size, stride_b, stride_l, stride_v, seed, n_rows * vocab_size, top_p,
        FILTER=top_p < 1.0, STATS=stats is not None, BLOCK_R=block_r, BLOCK_V=block_v,
        V_BLOCKS=triton.cdiv(vocab_size, block_v),
        NUM_BUCKETS=NUM_BUCKETS, MAX_PASSES=MAX_SEARCH_PASSES, num_warps=8,
    )
    return z_s


def greedy_tail(logits: torch.Tensor, z_t: torch.Tensor | None, return_probs: bool):
    n_rows, seq_len, stride_b, stride_l, stride_v = _row_layout(logits)
    vocab_size = logits.shape[-1]
    ids = torch.empty(logits.shape[:2], dtype=torch.int64, device=logits.device)
    probs = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device) if return_probs else None
    if n_rows:
        block_r, block_v = _blocks(n_rows, vocab_size, logits.device)
        z_flat = z_t.contiguous().view(-1) if return_probs else ids
        _greedy_tail_kernel[(triton.cdiv(n_rows, block_r),)](
            logits, z_flat, ids, ids if probs is None else probs, n_rows, seq_len, vocab_size,
            stride_b, stride_l, stride_v, PROBS=return_probs, BLOCK_R=block_r, BLOCK_V=block_v,
            V_BLOCKS=triton.cdiv(vocab_size, block_v),
        )
    return (ids, probs) if return_probs else ids
