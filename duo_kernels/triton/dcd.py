"""The DCD KL divergence (duo-math §5.4) between student and teacher logits rows, fused, in Triton.

Accurate KL from fp32 math
--------------------------
Write the divergence as ``KL(p || q)`` (reverse: p = student, q = teacher; forward: the other way
round) and ``y_v = log p_v - log q_v``. The direct sum ``sum_v p_v y_v`` mixes signs: for nearby
distributions it is a small difference of O(|y|) terms and loses most of its fp32 digits (the fp32
reference: 7e-4 relative error at KL ~ 3e-3, 50% at KL ~ 1e-7, V = 50258). Instead, with
``phi(y) = e^-y - 1 + y >= 0`` and any per-row shift ``c`` in ``y = (l_p - l_q) - c``:

    E_p[e^-y] = 1 - mu + Phi,   mu = E_p[y],   Phi = E_p[phi(y)]
    KL(p || q) = mu + log1p(Phi - mu) - log Q

With ``c`` the row's ``lse_p - lse_q`` (so that ``y`` is the log-ratio up to ``c``'s rounding),
``mu = KL`` and ``Phi - mu ~ 0``: the result is ``Phi - (Phi - mu)^2 / 2 + ...``, a sum of non-negative
terms, and the error of ``mu`` enters only at second order. ``Q`` is q's mass where p > 0 (below 1 only
when p has -inf logits where q has none), from pass 1 as ``log1p(-S_q[p = 0] / S_q)``: exactly 0 when
p has no -inf. ``phi`` is a 10-term series for
``|y| < 1`` (relative truncation error 6e-9) and ``e^(log p - y) - p + p y`` otherwise; ``y`` is
formed in fp64 from the fp32 logits (two fp64 subtractions per element), so shifted or large logits
lose nothing. The corrected shift ``c* = c - log1p(Phi - mu) + log Q`` makes ``y`` the exact log-ratio for the
backward: reverse ``dKL/dl_s = p_s (y - KL)``, forward ``dKL/dl_s = p_s - p_t``.

Passes: forward reads both rows twice (online log-sum-exp of both, then the sums), backward once (and
writes d student once). Sums accumulate in fp32 lanes and fp64 across lanes. Measured at V = 50258
(bf16 logits, KL from 1e-12 to 10, both directions): max relative error 2e-7 against the exact value
(the float64 reference, or 50-digit mpmath for the rows where the float64 formula itself is off, by
up to 7e-5 at KL ~ 1e-12). A row with NaN or +inf in either input gives NaN; -inf logits are zero
probabilities (0 log 0 = 0); a masked row reads nothing and gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_kernels.triton.nelbo import NUM_WARPS, block_v, log1p, lse_step, row_pointer

# Spill budgets of the compile gate (tests/test_compile_gate.py), bytes per thread. The forward's
# per-row float64 statistics divide 5 times (div.rn.f64); ptxas calls a slow-path subroutine for
# that, and saving registers around the call costs 56-88 B of spill stores + loads on sm_80/89/90
# (fp32 or 16-bit logits), once per row, not per element; 2048-lane tiles did not remove them.
SPILL_BUDGETS = {"_dcd_kl_fwd_kernel": 88}


@triton.jit
def phi_times_p(b_y, b_lp, b_p):
    """p (e^-y - 1 + y), accurate to a few ulp: a series for |y| < 1, else e^(log p - y) - p + p y."""
    # phi(y) / y^2 = sum_k (-y)^k / (k + 2)!, k = 0..9
    b_h = -2.505210838544172e-08 * b_y + 2.755731922398589e-07
    b_h = b_h * b_y - 2.7557319223985893e-06
    b_h = b_h * b_y + 2.48015873015873e-05
    b_h = b_h * b_y - 0.0001984126984126984
    b_h = b_h * b_y + 0.001388888888888889
    b_h = b_h * b_y - 0.008333333333333333
    b_h = b_h * b_y + 0.041666666666666664
    b_h = b_h * b_y - 0.16666666666666666
    b_h = b_h * b_y + 0.5
    small = tl.abs(b_y) < 1.0
    b_far = tl.exp(b_lp - tl.where(small, 0.0, b_y)) - b_p + b_p * b_y
    return tl.where(small, b_p * (b_y * b_y) * b_h, b_far)


@triton.jit
def _dcd_kl_fwd_kernel(p_p, p_q, p_keep, p_loss, p_stats, sp_b, sp_l, sq_b, sq_l, L, V: tl.constexpr,
                       HAS_KEEP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_prow = row_pointer(p_p, row, sp_b, sp_l, L)
    p_qrow = row_pointer(p_q, row, sq_b, sq_l, L)
    keep = row >= 0
    if HAS_KEEP:
        keep = tl.load(p_keep + row) != 0
    o_v = tl.arange(0, BLOCK_V)

    b_max_p = tl.full([], float("-inf"), tl.float32)
    b_max_q = tl.full([], float("-inf"), tl.float32)
    b_sum_p = tl.zeros([], dtype=tl.float64)
    b_sum_q = tl.zeros([], dtype=tl.float64)
    b_out_q = tl.zeros([], dtype=tl.float64)
    n_bad = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        m_v = (start + o_v < V) & keep
        # [BLOCK_V]; a masked row reads nothing
        b_xp = tl.load(p_prow + start + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        b_xq = tl.load(p_qrow + start + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        b_max_p, b_sum_p, n_bad = lse_step(b_xp, b_max_p, b_sum_p, n_bad)
        # q's online sum, and its part where p = 0 (exp(-inf) = 0 on padding lanes)
        n_bad += tl.sum(((b_xq != b_xq) | (b_xq == float("inf"))).to(tl.int32))
        b_new = tl.maximum(b_max_q, tl.max(b_xq))
        b_shift = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_scale = tl.exp(b_max_q - b_shift).to(tl.float64)
        b_e = tl.exp(b_xq - b_shift)
        b_sum_q = b_sum_q * b_scale + tl.sum(b_e).to(tl.float64)
        b_out_q = b_out_q * b_scale + tl.sum(tl.where(b_xp == float("-inf"), b_e, 0.0)).to(tl.float64)
        b_max_q = b_new
    # A masked row continues on finite stand-ins (max 0, S 1) and stores 0.
    bad = n_bad > 0
    b_max_p = tl.where(keep, tl.where(bad, float("nan"), b_max_p), 0.0)
    b_max_q = tl.where(keep, tl.where(bad, float("nan"), b_max_q), 0.0)
    log_s_p = tl.log(tl.where(keep, b_sum_p, 1.0))
    log_s_q = tl.log(tl.where(keep, b_sum_q, 1.0))
    # log Q, Q = q's mass where p > 0 (1 unless p has -inf logits where q has none)
    log_q_mass = log1p(-b_out_q / tl.where(keep, b_sum_q, 1.0))
    # c = lse_p - lse_q, so that y = (l_p - l_q) - c = log p - log q
    c = (b_max_p.to(tl.float64) - b_max_q.to(tl.float64)) + (log_s_p - log_s_q)
    b_log_s_p = log_s_p.to(tl.float32)

    b_acc_z = tl.zeros([BLOCK_V], dtype=tl.float32)
    b_acc_mu = tl.zeros([BLOCK_V], dtype=tl.float32)
    b_acc_phi = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        m_v = (start + o_v < V) & keep
        # [BLOCK_V]
        b_xp = tl.load(p_prow + start + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        b_xq = tl.load(p_qrow + start + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_lp = (b_xp - b_max_p) - b_log_s_p
        b_p = tl.exp(b_lp)
        # p = 0 (a -inf logit, or padding) adds nothing, whatever q is: y = 0 there
        b_y = ((b_xp.to(tl.float64) - b_xq.to(tl.float64)) - c).to(tl.float32)
        b_y = tl.where(b_xp == float("-inf"), 0.0, b_y)
        b_acc_z += b_p
        b_acc_mu += b_p * b_y
        b_acc_phi += phi_times_p(b_y, b_lp, b_p)
    z = tl.where(keep, tl.sum(b_acc_z.to(tl.float64)), 1.0)
    mu = tl.sum(b_acc_mu.to(tl.float64)) / z
    phi = tl.sum(b_acc_phi.to(tl.float64)) / z
    gap = log1p(phi - mu) - log_q_mass
    # q = 0 where p > 0 (a -inf logit of q only): KL = +inf
    kl = tl.where(phi == float("inf"), float("inf"), mu + gap)
    tl.store(p_loss + row, tl.where(keep, kl, 0.0).to(tl.float32))
    p_row_stats = p_stats + row * 6
    tl.store(p_row_stats, b_max_p.to(tl.float64))
    tl.store(p_row_stats + 1, log_s_p)
    tl.store(p_row_stats + 2, b_max_q.to(tl.float64))
    tl.store(p_row_stats + 3, log_s_q)
    tl.store(p_row_stats + 4, c - gap)
    tl.store(p_row_stats + 5, kl)


@triton.jit
def _dcd_kl_bwd_kernel(p_grad, p_s, p_t, p_keep, p_stats, p_ds, ss_b, ss_l, st_b, st_l, L, V: tl.constexpr,
                       REVERSE: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_srow = row_pointer(p_s, row, ss_b, ss_l, L)
    p_trow = row_pointer(p_t, row, st_b, st_l, L)
    p_dsrow = p_ds + row * V
    keep = row >= 0
    if HAS_KEEP:
        keep = tl.load(p_keep + row) != 0
    p_row_stats = p_stats + row * 6
    # reverse: p = student, q = teacher; forward: p = teacher, q = student
    b_max_p = tl.load(p_row_stats).to(tl.float32)
    b_log_s_p = tl.load(p_row_stats + 1).to(tl.float32)
    b_max_q = tl.load(p_row_stats + 2).to(tl.float32)
    b_log_s_q = tl.load(p_row_stats + 3).to(tl.float32)
    c = tl.load(p_row_stats + 4)
    b_kl = tl.load(p_row_stats + 5).to(tl.float32)
    b_g = tl.load(p_grad + row).to(tl.float32)

    o_v = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        o_k = start + o_v
        m_v = o_k < V
        # [BLOCK_V]; a masked row reads nothing and writes zeros
        b_xs = tl.load(p_srow + o_k, mask=m_v & keep, other=float("-inf")).to(tl.float32)
        b_xt = tl.load(p_trow + o_k, mask=m_v & keep, other=float("-inf")).to(tl.float32)
        if REVERSE:
            b_ps = tl.exp((b_xs - b_max_p) - b_log_s_p)
            # p_s = 0 (a -inf logit, or padding): y = 0 there, so that the gradient is 0, not 0 * -inf
            zero = b_xs == float("-inf")
            b_y = ((tl.where(zero, 0.0, b_xs).to(tl.float64) - b_xt.to(tl.float64)) - c).to(tl.float32)
            b_y = tl.where(zero, 0.0, b_y)
            b_d = b_g * b_ps * (b_y - b_kl)
        else:
            b_ps = tl.exp((b_xs - b_max_q) - b_log_s_q)
            b_pt = tl.exp((b_xt - b_max_p) - b_log_s_p)
            b_d = b_g * (b_ps - b_pt)
        b_d = tl.where(keep, b_d, 0.0)
        tl.store(p_dsrow + o_k, b_d.to(p_ds.dtype.element_ty), mask=m_v)


def dcd_kl_forward(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None,
                   reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KL of each row of (B, L, V) student and teacher logits (unit stride along V, any other strides):
    float32 loss (B·L,) and float64 stats (B·L, 6) = (max_p, log S_p, max_q, log S_q, c*, KL) with
    p = student for ``reverse`` (KL(student || teacher)), else p = teacher. ``keep``: bool (B·L,) or None."""
    b, l, vocab_size = student.shape
    n = b * l
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty(n, 6, dtype=torch.float64, device=student.device)
    p, q = (student, teacher) if reverse else (teacher, student)
    if n:
        _dcd_kl_fwd_kernel[(n,)](
            p, q, keep if keep is not None else loss, loss, stats, p.stride(0), p.stride(1), q.stride(0),
            q.stride(1), l, vocab_size, HAS_KEEP=keep is not None, BLOCK_V=block_v(vocab_size, p.device),
            num_warps=NUM_WARPS)
    return loss, stats


def dcd_kl_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                    keep: torch.Tensor | None, stats: torch.Tensor, reverse: bool) -> torch.Tensor:
    """d loss / d student logits, contiguous (B, L, V) in the student's dtype, for a float32 upstream
    gradient (B·L,)."""
    b, l, vocab_size = student.shape
    dstudent = torch.empty((b, l, vocab_size), dtype=student.dtype, device=student.device)
    if b * l:
        _dcd_kl_bwd_kernel[(b * l,)](
            grad_loss, student, teacher, keep if keep is not None else grad_loss, stats, dstudent, student.stride(0),
            student.stride(1), teacher.stride(0), teacher.stride(1), l, vocab_size, REVERSE=reverse,
            HAS_KEEP=keep is not None, BLOCK_V=block_v(vocab_size, student.device), num_warps=NUM_WARPS)
    return dstudent

