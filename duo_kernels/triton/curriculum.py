"""Duo++'s top-k relaxation in Triton (duo-math §4.4): a [BLOCK tokens, KP slots] tile per program.

The stream and formulas are those of :func:`duo_kernels.reference.tempered_softmax_topk`, all in
float64: the k order statistics come from a cumulative sum along the slot axis, the partial
Fisher-Yates shuffle runs k steps over the tile (each step looks up two positions in the records of
the earlier steps: O(k) per step, O(k^2) per token), and the slots are written by scatter stores
(the noise statistic ``o_j`` to slot ``j`` or ``j + 1``, the clean coordinate to its rank), so no
sort is needed. ``KP`` is k rounded up to a power of two (k <= 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_kernels.triton.normal import log_truncated_mean_exp, normal_order_statistic
from duo_kernels.triton.rng import box_muller, randint_below, uniform53
from duo_kernels.triton.target import gpu_capability

MAX_K = 128


@triton.jit
def _fisher_yates_value(b_picks, b_moved, m_before, o_j, pos):
    """The value at position ``pos`` [BLOCK] after the swaps in ``m_before`` [1, KP]: the latest
    swap that targeted ``pos`` recorded what it moved there; else ``pos`` holds itself."""
    hits = m_before & (b_picks == pos[:, None])
    latest = tl.max(tl.where(hits, o_j[None, :], -1), axis=1)
    recorded = tl.sum(tl.where(o_j[None, :] == latest[:, None], b_moved, 0), axis=1)
    return tl.where(latest >= 0, recorded, pos)


@triton.jit(do_not_specialize=["seed"])
def _topk_kernel(x_ptr, g_ptr, g_sb, g_sl, ids_ptr, w_ptr, z_ptr, num_tokens, length, vocab_size, k,
                 inv_tau: tl.float64, seed: tl.uint64,
                 COMPAT: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_t = o_t < num_tokens
    b_x = tl.load(x_ptr + o_t, mask=m_t, other=0)
    b_g = tl.load(g_ptr + (o_t // length) * g_sb + (o_t % length) * g_sl, mask=m_t, other=0.0)
    b_s = tl.sqrt(1.0 / (1.0 + tl.exp(-b_g)))
    # block 0: the clean coordinate w_x = a~ + s~ n
    w0, w1, w2, w3 = tl.randint4x(seed, o_t)
    b_wx = tl.sqrt(1.0 / (1.0 + tl.exp(b_g))) + b_s * box_muller(uniform53(w0, w1), uniform53(w2, w3))

    # blocks 1..k: the order statistics o_j and the Fisher-Yates picks r_j, [BLOCK, KP]
    o_j = tl.arange(0, KP)
    m_j = o_j < k
    w0, w1, w2, w3 = tl.randint4x(seed, (1 + o_j).to(tl.int64)[None, :] * num_tokens + o_t[:, None])
    b_pool = tl.maximum(vocab_size - 1 - o_j, 1).to(tl.int64)
    b_log_u = tl.where(m_j[None, :], tl.log(uniform53(w0, w1)) / b_pool.to(tl.float64)[None, :], 0.0)
    b_o = b_s[:, None] * normal_order_statistic(tl.cumsum(b_log_u, axis=1))
    b_picks = o_j[None, :] + randint_below(w2, w3, b_pool[None, :])

    b_ids = tl.zeros([BLOCK, KP], dtype=tl.int64)
    b_moved = tl.zeros([BLOCK, KP], dtype=tl.int64)
    # KP steps, not k: the interpreter cannot loop to a runtime bound; steps j >= k only touch the
    # padding lanes, which no real lane reads (it only looks at earlier steps)
    for j in range(0, KP):
        m_sel = o_j[None, :] == j
        m_before = o_j[None, :] < j
        pick = tl.sum(tl.where(m_sel, b_picks, 0), axis=1)
        value = _fisher_yates_value(b_picks, b_moved, m_before, o_j, pick)
        moved = _fisher_yates_value(b_picks, b_moved, m_before, o_j, tl.zeros_like(pick) + j)
        b_ids = tl.where(m_sel, value[:, None], b_ids)
        b_moved = tl.where(m_sel, moved[:, None], b_moved)
    b_ids = b_ids + (b_ids >= b_x[:, None]).to(tl.int64)

    o_last = tl.sum(tl.where(o_j[None, :] == k - 1, b_o, 0.0), axis=1)
    if COMPAT:
        # the clean coordinate overwrites the last slot when it beats o_{k-1}
        visible = b_wx > o_last
        rank = tl.where(visible, k - 1, k)
        slot = o_j[None, :] + tl.zeros_like(rank)[:, None]
        m_in_z = m_j[None, :] & (slot != rank[:, None])  # o_j enters the normaliser
        truncation = tl.where(visible, tl.sum(tl.where(o_j[None, :] == k - 2, b_o, 0.0), axis=1), o_last)
        tail_count = tl.where(visible, vocab_size - k, vocab_size - k - 1).to(tl.float64)
    else:
        # the k largest of the k + 1 drawn values: w_x at its rank, o_j at j or j + 1
        rank = tl.sum(tl.where(m_j[None, :] & (b_o > b_wx[:, None]), 1, 0), axis=1)
        slot = o_j[None, :] + (o_j[None, :] >= rank[:, None]).to(tl.int32)
        m_in_z = m_j[None, :] & (slot >= 0)  # every o_j, broadcast to the tile
        truncation = o_last
        tail_count = tl.zeros_like(b_wx) + (vocab_size - k - 1)
    log_tail = tl.where(tail_count > 0, tl.log(tl.maximum(tail_count, 1.0))
                        + log_truncated_mean_exp(truncation, b_s, inv_tau), -float("inf"))

    # log Z over the visible and hidden drawn values and the tail
    b_v = tl.where(m_in_z, b_o * inv_tau, -float("inf"))
    v_x = b_wx * inv_tau
    m = tl.maximum(tl.maximum(tl.max(b_v, axis=1), v_x), log_tail)
    m = tl.where((m == float("inf")) | (m == -float("inf")), 0.0, m)
    total = tl.sum(tl.exp(b_v - m[:, None]), axis=1) + tl.exp(v_x - m) + tl.exp(log_tail - m)
    log_z = tl.log(total) + m

    m_store = m_t[:, None] & m_j[None, :] & (slot < k) & (slot != rank[:, None])
    p_out = o_t[:, None] * k + slot
    tl.store(ids_ptr + p_out, b_ids, mask=m_store)
    tl.store(w_ptr + p_out, tl.exp(b_o * inv_tau - log_z[:, None]).to(tl.float32), mask=m_store)
    m_clean = m_t & (rank < k)
    tl.store(ids_ptr + o_t * k + rank, b_x, mask=m_clean)
    tl.store(w_ptr + o_t * k + rank, tl.exp(v_x - log_z).to(tl.float32), mask=m_clean)
    # z_t: x if it won slot 0 (compat: any visible slot), else the id of o_0
    id_0 = tl.sum(tl.where(o_j[None, :] == 0, b_ids, 0), axis=1)
    if COMPAT:
        z = tl.where(rank < k, b_x, id_0)
    else:
        z = tl.where(rank == 0, b_x, id_0)
    tl.store(z_ptr + o_t, z, mask=m_t)


def tempered_softmax_topk(x0: torch.Tensor, gamma: torch.Tensor, vocab_size: int, k: int, inv_tau: float,
                          reference_compat: bool, seed: int):
    """Validated inputs (x0 (B, L) int64 contiguous, gamma a float64 (B, L) view, 1 <= k <= 128)."""
    b, l = x0.shape
    ids = torch.empty((b, l, k), dtype=torch.int64, device=x0.device)
    weights = torch.empty((b, l, k), dtype=torch.float32, device=x0.device)
    z_t = torch.empty_like(x0)
    num_tokens = x0.numel()
    if num_tokens:
        kp = triton.next_power_of_2(k)
        # A GPU tile of 512 slots at 8 warps (2 slots per thread) keeps the tile's float64 arrays in
        # registers: 192-196 registers, no spills at k = 8, 32, 128 on sm_90, where 1024-slot tiles at
        # 4 warps spilled 0.5-4.9 KB per thread (compile gate, tests/test_compile_gate.py). The
        # interpreter pays per operation, not per element, so it takes larger tiles.
        if gpu_capability(x0.device):
            block, num_warps = 512 // kp, 8
        else:
            block, num_warps = max(32, 4096 // kp), 4
        _topk_kernel[(triton.cdiv(num_tokens, block),)](
            x0, gamma, *gamma.stride(), ids, weights, z_t, num_tokens, l, vocab_size, k, inv_tau, seed,
            COMPAT=reference_compat, BLOCK=block, KP=kp, num_warps=num_warps)
    return ids, weights, z_t
