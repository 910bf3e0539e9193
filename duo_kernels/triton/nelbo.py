"""The USDM NELBO (duo-math §3.3, eq. 3.5) and its gradient (3.6), fused per logits row, in Triton.

Derivation (shared by the Triton kernels here and the chunked PyTorch path of
:mod:`duo_kernels.ops.nelbo`)
------------------------------------------------------------------------------------------------
Per token: logits ``l`` (V = K entries), ``p = softmax(l)``, ``a = alpha_t``, ``i = z_t``, ``m = x0``,
``eq = [i = m]``. Write ``q_j = K a p_j + 1 - a = (1 - a)(1 + r p_j)`` with ``r = K a / (1 - a)``, so

    log q_j = log(1 - a) + L_j,     L_j = log1p(r p_j) >= 0.

The paper's form ``K log q_i - sum_j log q_j`` subtracts two numbers of size ~K |log(1 - a)| (5e5
at K = 50258): in fp32 it cancels catastrophically (measured: 2e-4 to 7e-4 relative error of the
loss at alpha = 1e-4 and 1 - 1e-4). In the ``L`` variables the ``log(1 - a)`` terms cancel exactly:

    K log q_i - S_log = K L_i - S_L,   S_L = sum_j L_j      (a sum of positive terms)
    log q_m - log q_i = L_m - L_i
    kappa = 1/(1 + r),   log kappa = -log1p(r),   1/xbar_i - 1/q_i = (1/(1 + r eq) - 1/(1 + r p_i)) / (1 - a)

    loss = coeff (K/(1 - a) (1/(1 + r eq) - 1/(1 + r p_i)) - c2 (K L_i - S_L)
                  + [ne] r (L_m - L_i) + ((K - 1) kappa eq - [ne] (1 + r)) log1p(r))

with ``coeff = alpha'/(K a)``, ``c2 = eq kappa + [ne]``. For r < 1 this bracket is a difference of
O(r) terms worth O(r^2), so the forward uses instead the cancellation-free form of
:func:`duo_kernels.reference.nelbo._usdm_nelbo_float64` (every term O(r^2), from ``G = sum_j g(t_j)``
with ``g(t) = t - log1p(t)`` summed as ``r^2 sum_j p_j^2 g(t_j)/t_j^2``), and writes ``coeff * bracket``
as ``alpha'/(1 - a) * (bracket / r)``: accurate from the smallest positive alpha to 1 (the log1p form
alone: 1e27 relative error at alpha = 1e-30, K = 11). The row's only reductions are the
log-sum-exp and ``S_L``; ``p_i`` and ``p_m`` are two gathered logits. Measured at K = 50258 against
the float64 reference (alpha from 1e-4 to 1 - 1e-4, fp32 and bf16 logits, 64 rows): max relative error
4e-7, with plain fp32 per-lane accumulators (in a prototype, a compensated or fp64 accumulator changed
nothing measurable, so none is used); the per-row scalar algebra above runs in fp64 (a handful of
flops per row).

Gradient. With ``u_k = r p_k / (1 + r p_k)`` (in [0, 1)), ``U = sum_k u_k`` and (3.6)'s
``g_j = d loss / d q_j``, ``K a p_k g_k`` collapses to ``coeff c2 u_k`` plus two sparse terms, and

    d loss / d l_k = coeff (c2 u_k - p_k C + [k = i] s_i + [k = m] s_m),   C = c2 U + s_i + s_m,
    s_i = u_i (K / ((1 - a)(1 + r p_i)) - c2 K - [ne] r),   s_m = [ne] r u_m.

For r < 1 these are O(1/a) terms that sum to O(a) (fp32: 4e-2 relative error at a = 1e-6, K = 11), so
there the backward uses the same identity over r^2: with ``W = sum_k p_k^2/(1 + t_k)`` (so ``U = r - r^2 W``),

    d loss / d l_k = alpha' r/(1 - a) (c2 (p_k W - p_k^2/(1 + t_k)) + s'_i ([k = i] - p_k) + s'_m ([k = m] - p_k)),
    s'_i = p_i (K (1 - p_i) + 1 + r)/((1 + t_i)^2 (1 + r))  (z_t = x0),   -(K + r) p_i^2/(1 + t_i)^2  (z_t != x0),
    s'_m = [ne] p_m/(1 + t_m),

every term O(1) (``s_i = r^2 s'_i``, ``s_m = r^2 s'_m``). So the forward also
emits ``U`` (``W`` for r < 1) (with the row's max ``M`` and ``log S``, ``lse = M + log S``; kept
apart because ``M + log S`` rounds to fp32 ulps of ``|M|``, 1e-3 at logits of 1e4), and the backward
is one elementwise pass that writes ``d logits`` once, in the logits' dtype. Rows whose weight is 0
("masked") read nothing and give exactly 0 loss and 0 gradient; a row holding NaN or +inf gives NaN
(loss and gradient) in that row only; -inf logits are zero probabilities.

``log1p`` is Goldberg's ``log(w) t / (w - 1)``, ``w = 1 + t`` (accurate to a few ulp; libdevice's
``log1p`` does not run in the interpreter). All loads convert to fp32 at once (the interpreter
mis-computes bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_kernels.triton.target import gpu_capability

# 4096 fp32 lanes: 16 per thread at 8 warps, 13 tiles per row at V = 50258. [unmeasured on GPU]
# The interpreter's cost is per op rather than per element: 65536-lane tiles run a V = 151936 row 4x
# faster there (0.49 s vs 1.86 s, 2 rows fwd+bwd) and still take three tiles, so tests cover the
# online log-sum-exp across tiles.
# V is a constexpr: the interpreter (numpy 2) cannot loop to a runtime bound, and a fixed trip count
# costs one compile per vocabulary size.
# Rows of odd length (V = 50257, a contiguous (B, L, V) tensor) start at 2-byte-aligned addresses: Triton
# cannot prove 16-byte alignment of ``p_row + o_k`` and emits one 16-bit load per element (here, in the
# DCD and in the sampling kernels); V = 151936 (divisible by 16) gets 128-bit loads. Not measured: no
# GPU was available. Why it likely costs little: a warp's scalar loads of adjacent elements fall in the
# same 32-byte sectors, so DRAM traffic is the same and only the load-instruction count grows (8x for
# bf16), in kernels that are bandwidth-bound at 16 lanes per thread. If the GPU report shows these rows
# far from their memory floor, the remedy needs no kernel change: the kernels take strides, so logits
# of a vocabulary padded to a multiple of 64 (e.g. 50304) and sliced to V keep a 16-divisible row
# stride, which Triton specialises on (the alignment its vectorised loads need; unverified on a GPU).
BLOCK_V = 4096
INTERPRETER_BLOCK_V = 65536
NUM_WARPS = 8


@triton.jit
def log1p(t):
    """log(1 + t) for t > -1 (fp32 or fp64): (1 + t) - 1 is exact, so the ratio undoes 1 + t's rounding."""
    w = 1.0 + t
    tiny = w == 1.0
    return tl.where(tiny, t, tl.log(w) * (t / tl.where(tiny, 1.0, w - 1.0)))


@triton.jit
def log1p_minus_over_square(t):
    """(t - log(1 + t))/t^2 for t >= 0 (fp32 or fp64): its series to t^11 below 0.25, where the
    difference would cancel; over t^2, so that a tiny t cannot underflow."""
    s = tl.minimum(t, 0.25)
    series = 0.5 + s * (-1.0 / 3 + s * (1.0 / 4 + s * (-1.0 / 5 + s * (1.0 / 6 + s * (-1.0 / 7 + s * (
        1.0 / 8 + s * (-1.0 / 9 + s * (1.0 / 10 + s * (-1.0 / 11 + s * (1.0 / 12 - s / 13))))))))))
    return tl.where(t < 0.25, series, (t - log1p(t)) / tl.where(t < 0.25, 1.0, t * t))


@triton.jit
def expm1(x):
    """exp(x) - 1 for fp64 x <= 0 (Kahan: the ratio undoes exp's rounding)."""
    u = tl.exp(x)
    tiny = u == 1.0
    return tl.where(tiny, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / tl.log(tl.where(tiny | (u == 0.0), 2.0, u)))))


@triton.jit
def lse_step(b_x, b_max, b_sum, n_bad):
    """One tile of an online log-sum-exp: fp32 running max, fp64 running sum of exp(x - max), and the
    count of NaN/+inf entries (a NaN max is not reliably produced by tl.max, so it is counted)."""
    n_bad += tl.sum(((b_x != b_x) | (b_x == float("inf"))).to(tl.int32))
    b_new = tl.maximum(b_max, tl.max(b_x))
    # An all -inf prefix keeps max = -inf; shift by 0 there so that exp never sees -inf - -inf.
    b_shift = tl.where(b_new == float("-inf"), 0.0, b_new)
    b_sum = b_sum * tl.exp(b_max - b_shift).to(tl.float64) + tl.sum(tl.exp(b_x - b_shift)).to(tl.float64)
    return b_new, b_sum, n_bad


@triton.jit
def row_pointer(p_base, row, stride_b, stride_l, L):
    """The first element of row ``row`` of a (B, L, V) tensor with unit stride along V."""
    return p_base + (row // L) * stride_b + (row % L) * stride_l


@triton.jit
def nelbo_row_constants(p_alpha, p_dalpha, row, i, m, V):
    """fp64 per-row scalars: K, 1 - a, r = K a/(1 - a), coeff = alpha'/(K a), kappa, ne, c2 = eq kappa + ne."""
    b_a = tl.load(p_alpha + row).to(tl.float64)
    b_da = tl.load(p_dalpha + row).to(tl.float64)
    k = tl.full([], V, tl.float64)
    one_minus_a = 1.0 - b_a
    r = k * b_a / one_minus_a
    coeff = b_da / (k * b_a)
    kappa = 1.0 / (1.0 + r)
    ne = tl.where(i == m, 0.0, 1.0).to(tl.float64)
    c2 = ne + (1.0 - ne) * kappa
    return k, one_minus_a, r, coeff, kappa, ne, c2


@triton.jit
def _usdm_nelbo_fwd_kernel(p_logits, p_z, p_x0, p_alpha, p_dalpha, p_keep, p_loss, p_stats, stride_b, stride_l,
                           L, V: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row = row_pointer(p_logits, row, stride_b, stride_l, L)
    keep = row >= 0
    if HAS_KEEP:
        keep = tl.load(p_keep + row) != 0
    o_v = tl.arange(0, BLOCK_V)

    b_max = tl.full([], float("-inf"), tl.float32)
    b_sum = tl.zeros([], dtype=tl.float64)
    n_bad = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        # [BLOCK_V]; a masked row reads nothing (all its loads are masked off)
        b_x = tl.load(p_row + start + o_v, mask=(start + o_v < V) & keep, other=float("-inf")).to(tl.float32)
        b_max, b_sum, n_bad = lse_step(b_x, b_max, b_sum, n_bad)
    # A masked row continues on finite stand-ins (max 0, S 1) and stores 0.
    b_max = tl.where(keep, tl.where(n_bad > 0, float("nan"), b_max), 0.0)
    b_log_s = tl.log(tl.where(keep, b_sum, 1.0))

    i = tl.load(p_z + row)
    m = tl.load(p_x0 + row)
    k, one_minus_a, r, coeff, kappa, ne, c2 = nelbo_row_constants(p_alpha, p_dalpha, row, i, m, V)
    # p_j = exp(l_j - max) / S, t_j = r p_j
    b_inv_s = tl.exp(-b_log_s).to(tl.float32)
    b_r = r.to(tl.float32)
    b_acc_g = tl.zeros([BLOCK_V], dtype=tl.float32)
    b_acc_l = tl.zeros([BLOCK_V], dtype=tl.float32)
    b_acc_u = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        # [BLOCK_V]
        b_x = tl.load(p_row + start + o_v, mask=(start + o_v < V) & keep, other=float("-inf")).to(tl.float32)
        b_p = b_inv_s * tl.exp(b_x - b_max)
        b_t = b_r * b_p
        b_acc_g += b_p * b_p * log1p_minus_over_square(b_t)
        b_acc_l += log1p(b_t)
        b_acc_u += tl.where(r < 1.0, b_p * b_p, b_t) / (1.0 + b_t)  # W for r < 1, U for r >= 1
    big_g = r * r * tl.sum(b_acc_g.to(tl.float64))  # G = sum_j t_j - log(1 + t_j)
    s_l = tl.sum(b_acc_l.to(tl.float64))
    s_u = tl.sum(b_acc_u.to(tl.float64))

    b_li = tl.load(p_row + i, mask=keep, other=0.0).to(tl.float32)
    b_lm = tl.load(p_row + m, mask=keep, other=0.0).to(tl.float32)
    log_p_i = (b_li - b_max).to(tl.float64) - b_log_s
    log_p_m = (b_lm - b_max).to(tl.float64) - b_log_s
    p_i = tl.exp(log_p_i)
    # the bracket over r (duo_kernels.reference.nelbo): cancellation-free for r < 1, eq. (3.5) in log1p form above
    rs = tl.where(r < 1.0, r, 0.5)
    t_i = rs * p_i
    t_m = rs * tl.exp(log_p_m)
    phi_i = log1p_minus_over_square(t_i)
    g_r = rs * rs * log1p_minus_over_square(rs)
    differ = (-(k + rs) * t_i * t_i * (1.0 / (1.0 + t_i) - phi_i) - big_g + rs * rs * expm1(log_p_m)
              - rs * t_m * t_m * log1p_minus_over_square(t_m) + (1.0 + rs) * g_r)
    same = (rs * rs * expm1(log_p_i) * (1.0 - k * p_i) / (1.0 + t_i) + k * t_i * t_i * phi_i - big_g
            - (k - 1.0) * g_r) / (1.0 + rs)
    small = tl.where(ne == 0.0, same, differ) / rs
    rl = tl.where(r < 1.0, 2.0, r)
    t_i = rl * p_i
    l_i = log1p(t_i)
    l_m = log1p(rl * tl.exp(log_p_m))
    l_r = log1p(rl)
    differ = (k + rl) * (1.0 - 1.0 / (1.0 + t_i)) - (k * l_i - s_l) + rl * (l_m - l_i) - (1.0 + rl) * l_r
    same = ((k + rl) * (1.0 / (1.0 + rl) - 1.0 / (1.0 + t_i)) - (k * l_i - s_l) / (1.0 + rl)
            + (k - 1.0) / (1.0 + rl) * l_r)
    large = tl.where(ne == 0.0, same, differ) / rl
    # coeff * bracket = alpha'/(1 - a) * (bracket / r): coeff overflows for a subnormal alpha
    loss = tl.load(p_dalpha + row).to(tl.float64) / one_minus_a * tl.where(r < 1.0, small, large)
    tl.store(p_loss + row, tl.where(keep, loss, 0.0).to(tl.float32))
    tl.store(p_stats + row * 3, b_max)
    tl.store(p_stats + row * 3 + 1, b_log_s.to(tl.float32))
    tl.store(p_stats + row * 3 + 2, tl.where(keep, s_u, 0.0).to(tl.float32))


@triton.jit
def _usdm_nelbo_bwd_kernel(p_grad, p_logits, p_z, p_x0, p_alpha, p_dalpha, p_keep, p_stats, p_dlogits,
                           stride_b, stride_l, L, V: tl.constexpr, HAS_KEEP: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row = row_pointer(p_logits, row, stride_b, stride_l, L)
    p_drow = p_dlogits + row * V
    keep = row >= 0
    if HAS_KEEP:
        keep = tl.load(p_keep + row) != 0

    i = tl.load(p_z + row)
    m = tl.load(p_x0 + row)
    k, one_minus_a, r, coeff, kappa, ne, c2 = nelbo_row_constants(p_alpha, p_dalpha, row, i, m, V)
    b_max = tl.load(p_stats + row * 3)
    b_log_s = tl.load(p_stats + row * 3 + 1)
    s_u = tl.load(p_stats + row * 3 + 2).to(tl.float64)

    b_li = tl.load(p_row + i, mask=keep, other=0.0).to(tl.float32)
    b_lm = tl.load(p_row + m, mask=keep, other=0.0).to(tl.float32)
    log_p_i = (b_li - b_max).to(tl.float64) - b_log_s.to(tl.float64)
    log_p_m = (b_lm - b_max).to(tl.float64) - b_log_s.to(tl.float64)
    p_i = tl.exp(log_p_i)
    p_m = tl.exp(log_p_m)
    small = r < 1.0
    # r >= 1: scale = coeff, x1 = c2 r, x2 = 0, y = c2 U + s_i + s_m
    t_i = r * p_i
    t_m = r * p_m
    big_si = t_i / (1.0 + t_i) * (k / (one_minus_a * (1.0 + t_i)) - c2 * k - ne * r)
    big_sm = ne * r * t_m / (1.0 + t_m)
    # r < 1: s_i, s_m, y over r^2; scale = coeff r^2 = alpha' r/(1 - a)
    rs = tl.where(small, r, 0.5)
    t_i = rs * p_i
    t_m = rs * p_m
    small_si = tl.where(ne == 0.0, p_i * (1.0 + rs - k * expm1(log_p_i)) / ((1.0 + t_i) * (1.0 + t_i) * (1.0 + rs)),
                        -(k + rs) * (p_i / (1.0 + t_i)) * (p_i / (1.0 + t_i)))
    small_sm = ne * p_m / (1.0 + t_m)
    s_i = tl.where(small, small_si, big_si)
    s_m = tl.where(small, small_sm, big_sm)
    scale = tl.load(p_grad + row).to(tl.float64) * tl.where(
        small, tl.load(p_dalpha + row).to(tl.float64) / one_minus_a * rs, coeff)
    b_scale = tl.where(keep, scale, 0.0).to(tl.float32)
    b_x1 = tl.where(small, 0.0, c2 * r).to(tl.float32)
    b_x2 = tl.where(small, -c2, 0.0).to(tl.float32)
    b_y = tl.where(small, s_i + s_m - c2 * s_u, c2 * s_u + s_i + s_m).to(tl.float32)
    b_si = s_i.to(tl.float32)
    b_sm = s_m.to(tl.float32)
    b_r = r.to(tl.float32)

    o_v = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        o_k = start + o_v
        m_v = o_k < V
        # [BLOCK_V]; a masked row reads nothing and writes zeros
        b_x = tl.load(p_row + o_k, mask=m_v & keep, other=float("-inf")).to(tl.float32)
        b_p = tl.exp((b_x - b_max) - b_log_s)
        b_t = b_r * b_p
        b_d = (b_x1 + b_x2 * b_p) * b_p / (1.0 + b_t) - b_y * b_p
        b_d += tl.where(o_k == i, b_si, 0.0) + tl.where(o_k == m, b_sm, 0.0)
        b_d = tl.where(keep, b_d * b_scale, 0.0)
        tl.store(p_drow + o_k, b_d.to(p_dlogits.dtype.element_ty), mask=m_v)


def block_v(vocab_size: int, device) -> int:
    block = BLOCK_V if gpu_capability(device) else INTERPRETER_BLOCK_V
    return min(block, triton.next_power_of_2(vocab_size))


def _keep_or(keep: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return keep if keep is not None else dummy


def usdm_nelbo_forward(logits: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor,
                       dalpha_t: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each row of (B, L, V) logits (unit stride along V, any other strides).

    Per-row inputs are contiguous (B·L,) tensors: int64 ``z_t``, ``x0``, float64 ``alpha_t``,
    ``dalpha_t``, bool ``keep`` (False: a masked row) or None. Returns float32 loss (B·L,) and float32
    stats (B·L, 3) = (max, log S, U, or W for r < 1) for :func:`usdm_nelbo_backward`.
    """
    b, l, vocab_size = logits.shape
    n = b * l
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
    if n:
        _usdm_nelbo_fwd_kernel[(n,)](
            logits, z_t, x0, alpha_t, dalpha_t, _keep_or(keep, loss), loss, stats, logits.stride(0),
            logits.stride(1), l, vocab_size, HAS_KEEP=keep is not None, BLOCK_V=block_v(vocab_size, logits.device),
            num_warps=NUM_WARPS)
    return loss, stats


def usdm_nelbo_backward(grad_loss: torch.Tensor, logits: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor,
                        alpha_t: torch.Tensor, dalpha_t: torch.Tensor, keep: torch.Tensor | None,
                        stats: torch.Tensor) -> torch.Tensor:
    """d loss / d logits, contiguous (B, L, V) in the logits' dtype, for a float32 upstream gradient (B·L,)."""
    b, l, vocab_size = logits.shape
    dlogits = torch.empty((b, l, vocab_size), dtype=logits.dtype, device=logits.device)
    if b * l:
        _usdm_nelbo_bwd_kernel[(b * l,)](
            grad_loss, logits, z_t, x0, alpha_t, dalpha_t, _keep_or(keep, grad_loss), stats, dlogits,
            logits.stride(0), logits.stride(1), l, vocab_size, HAS_KEEP=keep is not None,
            BLOCK_V=block_v(vocab_size, logits.device), num_warps=NUM_WARPS)
    return dlogits
