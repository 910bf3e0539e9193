"""Triton kernels of the curriculum's embedding layer (duo-math §4.2, §4.4 "model consumption", §4.5).

Two op families share this file because both end in ``h_0 = P @ E`` for a row-stochastic-ish P:

- ``relaxed_embedding``: P has k non-zeros per token, given as (ids, weights). Forward gathers k rows;
  backward is ``dweights[t, j] = <dh[t], E[ids[t, j]]>`` and a scatter-add of ``weights * dh`` into
  dE, either with atomics or deterministically (entries sorted by row on the host, one program per
  row of dE summing its segment in a fixed order).
- ``tempered_softmax_embedding``: P = softmax(w / tau) over the whole vocabulary, generated from the
  Philox stream and never stored: "flash attention with generated scores". See :func:`_dense_fwd_kernel`.

Numerics of the dense kernel. The latent of token t is ``w = a~ e_x + s~ eps`` with ``eps[t, v]`` the
float32 normal of counter ``t V + v``. Scores are kept in *noise units*: for the V - 1 noise
coordinates ``w_v / tau - w_m / tau = c (eps_v - m)`` with ``c = s~ / tau`` and ``m`` the running
maximum noise value, an exact float32 eps; ``eps_v - m`` is exact or nearly so (Sterbenz), so the
exponent has a relative error of a few ulp even at tau = 1e-4 where ``w / tau`` is ~1e4. The clean
coordinate is left out of the tile loop and joined per token at the end in float64
(``delta = (a~ + s~ (eps_x - m)) / tau``); the argmax compares ``fl64(s~ eps_x + a~)`` with
``fl64(s~ m)`` as the float64 reference does, lowest index on ties.

Saved for backward, per token: ``m`` (noise max), ``lse`` (log normaliser in the noise-unit frame:
``P[t, v] = exp(c (eps_v - m) - lse)`` for v != x) and ``p_x`` (the clean probability): 12 bytes a
token. The backward kernel owns a (vocabulary tile, d tile) of dE and walks all tokens in order, so
dE is deterministic without atomics; it recomputes the scores from the RNG.

GPU cost drivers (not yet measured: no GPU was available): every score needs a Philox block and a
float64 Box-Muller (the contract's exact float32 normal, so that z_t matches the reference); programs
of different d tiles repeat that work (12 times at d = 768, in forward and in backward); and the two
(B L) x V x d GEMMs run as fp32 FMA unless ``torch.set_float32_matmul_precision("high")`` allows TF32.
The first levers if the GPU report falls short: a float32 Box-Muller (normals within a few ulp of
the contract, z_t then equal except at near-ties, and fewer registers per score), which would let the
d tiles widen without spilling (see :func:`_dense_tiles`).
"""

import torch
import triton
import triton.language as tl

from duo_kernels.triton.rng import box_muller, uniform24
from duo_kernels.triton.target import gpu_capability

# Spill budgets of the compile gate (tests/test_compile_gate.py), bytes per thread: the backward at
# TF32 on sm_90 spills 16 + 8 B around the calls of its float64 Box-Muller (24 call sites in the PTX;
# 16-token tiles still spill 8 + 4 B); the other targets and precisions do not spill.
SPILL_BUDGETS = {"_dense_bwd_kernel": 24}


# Loop bounds. The Triton 3.6 interpreter turns a runtime ``range(n)`` bound into a Python int through
# ``int(array of shape (1,))``, which NumPy >= 2.3 rejects. So a loop runs either to a constexpr bound
# (k, d and V: fixed per model, one compilation each) or, over the token count, as a ``while`` loop.


def _pow2(n: int, lo: int = 16, hi: int = 256) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# ---- relaxed_embedding -------------------------------------------------------------------------------

@triton.jit
def _relaxed_fwd_kernel(e_ptr, ids_ptr, w_ptr, h_ptr, N, K: tl.constexpr, D, stride_ev,
                        ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_t = o_t < N
    m_d = o_d < D
    m_td = m_t[:, None] & m_d[None, :]
    b_h = tl.zeros([BT, BD], dtype=ACC)
    for j in range(K):
        b_id = tl.load(ids_ptr + o_t * K + j, mask=m_t, other=0)
        b_w = tl.load(w_ptr + o_t * K + j, mask=m_t, other=0.0).to(ACC)
        # [BT, BD]
        b_e = tl.load(e_ptr + b_id[:, None] * stride_ev + o_d[None, :], mask=m_td, other=0.0).to(ACC)
        b_h += b_w[:, None] * b_e
    tl.store(h_ptr + o_t[:, None] * D + o_d[None, :], b_h, mask=m_td)


@triton.jit
def _relaxed_dweights_kernel(e_ptr, ids_ptr, dh_ptr, dw_ptr, N, K: tl.constexpr, D: tl.constexpr, stride_ev,
                             ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m_t = o_t < N
    for j in range(K):
        b_id = tl.load(ids_ptr + o_t * K + j, mask=m_t, other=0)
        b_dw = tl.zeros([BT], dtype=ACC)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_td = m_t[:, None] & (o_d < D)[None, :]
            b_dh = tl.load(dh_ptr + o_t[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(ACC)
            b_e = tl.load(e_ptr + b_id[:, None] * stride_ev + o_d[None, :], mask=m_td, other=0.0).to(ACC)
            b_dw += tl.sum(b_dh * b_e, axis=1)
        tl.store(dw_ptr + o_t * K + j, b_dw, mask=m_t)


@triton.jit
def _relaxed_de_atomic_kernel(ids_ptr, w_ptr, dh_ptr, de_ptr, N, K: tl.constexpr, D,
                              ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_t = o_t < N
    m_td = m_t[:, None] & (o_d < D)[None, :]
    b_dh = tl.load(dh_ptr + o_t[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(ACC)
    for j in range(K):
        b_id = tl.load(ids_ptr + o_t * K + j, mask=m_t, other=0)
        b_w = tl.load(w_ptr + o_t * K + j, mask=m_t, other=0.0).to(ACC)
        tl.atomic_add(de_ptr + b_id[:, None] * D + o_d[None, :], b_w[:, None] * b_dh, mask=m_td)


@triton.jit
def _relaxed_de_sorted_kernel(order_ptr, starts_ptr, w_ptr, dh_ptr, de_ptr, K, D,
                              ACC: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr):
    # one program per (row of dE, d tile): its entries are order[starts[v] : starts[v + 1]], the flat
    # (token * K + slot) indices that hold id v, in ascending order; summed in that fixed order.
    v = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    start = tl.load(starts_ptr + v)
    end = tl.load(starts_ptr + v + 1)
    b_acc = tl.zeros([BD], dtype=ACC)
    e0 = start
    while e0 < end:
        o_e = e0 + tl.arange(0, BE)
        m_e = o_e < end
        b_flat = tl.load(order_ptr + o_e, mask=m_e, other=0)
        b_w = tl.load(w_ptr + b_flat, mask=m_e, other=0.0).to(ACC)
        # [BE, BD]
        b_dh = tl.load(dh_ptr + (b_flat // K)[:, None] * D + o_d[None, :],
                       mask=m_e[:, None] & m_d[None, :], other=0.0).to(ACC)
        b_acc += tl.sum(b_w[:, None] * b_dh, axis=0)
        e0 += BE
    tl.store(de_ptr + v * D + o_d, b_acc, mask=m_d)


def _acc_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _torch_dtype(acc) -> torch.dtype:
    return torch.float64 if acc == tl.float64 else torch.float32


RELAXED_BT = 16  # tokens per program: small, so that short inputs still spread over many programs


def relaxed_embedding_forward(weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``h[t] = sum_j weights[t, j] E[ids[t, j]]``; ids, weights (N, K) contiguous; h (N, D) fp32 (fp64 if
    an input is fp64)."""
    n, k = ids.shape
    d = weight.shape[1]
    acc = _acc_dtype(weight, weights)
    h = torch.empty(n, d, dtype=_torch_dtype(acc), device=weight.device)
    if n and d:
        bd = _pow2(d, hi=128)
        grid = (triton.cdiv(n, RELAXED_BT), triton.cdiv(d, bd))
        _relaxed_fwd_kernel[grid](weight, ids, weights, h, n, k, d, weight.stride(0),
                                  ACC=acc, BT=RELAXED_BT, BD=bd)
    return h


def relaxed_embedding_backward(dh: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                               need_weight: bool, need_weights: bool, deterministic: bool):
    """(dE (V, D), dweights (N, K)) in the accumulation dtype; each None when not needed."""
    n, k = ids.shape
    v, d = weight.shape
    acc = _acc_dtype(weight, weights)
    dh = dh.to(_torch_dtype(acc)).contiguous()
    bd = _pow2(d, hi=128)
    d_weight = d_weights = None
    if need_weights:
        d_weights = torch.empty(n, k, dtype=_torch_dtype(acc), device=dh.device)
        if n:
            _relaxed_dweights_kernel[(triton.cdiv(n, RELAXED_BT),)](weight, ids, dh, d_weights, n, k, d,
                                                                    weight.stride(0), ACC=acc, BT=RELAXED_BT, BD=bd)
    if need_weight:
        if deterministic:
            d_weight = torch.empty(v, d, dtype=_torch_dtype(acc), device=dh.device)
            flat = ids.reshape(-1)
            order = torch.sort(flat, stable=True).indices  # entries of each row in ascending (token, slot)
            starts = torch.searchsorted(flat[order], torch.arange(v + 1, device=flat.device))
            if d:
                _relaxed_de_sorted_kernel[(v, triton.cdiv(d, bd))](order, starts, weights, dh, d_weight, k, d,
                                                                   ACC=acc, BE=32, BD=bd)
        else:
            d_weight = torch.zeros(v, d, dtype=_torch_dtype(acc), device=dh.device)
            if n and d:
                grid = (triton.cdiv(n, RELAXED_BT), triton.cdiv(d, bd))
                _relaxed_de_atomic_kernel[grid](ids, weights, dh, d_weight, n, k, d,
                                                ACC=acc, BT=RELAXED_BT, BD=bd)
    return d_weight, d_weights


# ---- tempered_softmax_embedding (dense curriculum) ----------------------------------------------------

# The running noise max starts below any float32 Box-Muller normal (|eps| <= sqrt(-2 log 2^-24) < 5.8) but
# finite, so that c * (m_old - m_new) stays finite when c = s~/tau is 0.
_NO_MAX = tl.constexpr(-1.0e4)


@triton.jit
def _noise(seed, counters):
    """The float32 normal of the RNG contract at each counter (Box-Muller of words 0 and 1)."""
    w0, w1, _, _ = tl.randint4x(seed, counters)
    return box_muller(uniform24(w0), uniform24(w1)).to(tl.float32)


@triton.jit(do_not_specialize=["seed"])
def _dense_fwd_kernel(x_ptr, a_ptr, s_ptr, a_tau_ptr, s_tau_ptr, c_ptr, e_ptr,
                      h_ptr, z_ptr, m_ptr, lse_ptr, px_ptr,
                      seed: tl.uint64, N, V: tl.constexpr, D, stride_ev,
                      PRECISION: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """One program: BT tokens x BD columns of h; loops over the vocabulary in tiles of BV.

    Per tile: eps [BT, BV] from the RNG, noise-unit scores, online softmax over the noise coordinates
    (running max m, sum l, acc += P @ E[tile]) and their running argmax (lowest index on ties). The
    clean coordinate is joined after the loop in float64. Programs of one token block but different
    d tiles repeat the RNG work; the one with d tile 0 writes z_t and the saved statistics.
    """
    pid_d = tl.program_id(1)
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_d = pid_d * BD + tl.arange(0, BD)
    m_t = o_t < N
    m_d = o_d < D
    b_x = tl.load(x_ptr + o_t, mask=m_t, other=0)
    b_c = tl.load(c_ptr + o_t, mask=m_t, other=0.0)
    base = o_t * V
    b_m = tl.full([BT], _NO_MAX, dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_j = tl.zeros([BT], dtype=tl.int64)
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        # [BT, BV]
        b_eps = _noise(seed, base[:, None] + o_v[None, :])
        m_noise = m_v[None, :] & (o_v[None, :] != b_x[:, None])
        b_eps_noise = tl.where(m_noise, b_eps, float("-inf"))
        b_tile_max = tl.max(b_eps_noise, axis=1)
        b_tile_arg = tl.argmax(b_eps_noise, axis=1, tie_break_left=True)
        b_j = tl.where(b_tile_max > b_m, v0 + b_tile_arg.to(tl.int64), b_j)
        b_m_new = tl.maximum(b_m, b_tile_max)
        b_rescale = tl.exp(b_c * (b_m - b_m_new))
        b_p = tl.exp(tl.where(m_noise, b_c[:, None] * (b_eps - b_m_new[:, None]), float("-inf")))
        b_l = b_l * b_rescale + tl.sum(b_p, axis=1)
        # [BV, BD]
        b_e = tl.load(e_ptr + o_v[:, None].to(tl.int64) * stride_ev + o_d[None, :], mask=m_v[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        b_acc = b_acc * b_rescale[:, None] + tl.dot(b_p, b_e, input_precision=PRECISION)
        b_m = b_m_new

    # the clean coordinate, in float64
    b_eps_x = _noise(seed, base + b_x).to(tl.float64)
    b_a = tl.load(a_ptr + o_t, mask=m_t, other=1.0)
    b_s = tl.load(s_ptr + o_t, mask=m_t, other=0.0)
    b_m64 = b_m.to(tl.float64)
    b_w_x = b_s * b_eps_x + b_a
    b_w_m = b_s * b_m64
    b_z = tl.where((b_w_x > b_w_m) | ((b_w_x == b_w_m) & (b_x < b_j)), b_x, b_j)
    b_delta = tl.load(a_tau_ptr + o_t, mask=m_t, other=0.0) + tl.load(s_tau_ptr + o_t, mask=m_t, other=0.0) * (
        b_eps_x - b_m64)
    b_pos = b_delta > 0
    # normalise by max(1, exp(delta)): the larger of the noise max's and the clean term
    b_scale = tl.where(b_pos, tl.exp(-tl.where(b_pos, b_delta, 0.0)), 1.0).to(tl.float32)
    b_ex = tl.where(b_pos, 1.0, tl.exp(tl.where(b_pos, 0.0, b_delta))).to(tl.float32)
    b_sum = b_l * b_scale + b_ex
    b_inv = 1.0 / b_sum
    m_td = m_t[:, None] & m_d[None, :]
    b_e_x = tl.load(e_ptr + b_x[:, None] * stride_ev + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    b_h = (b_acc * b_scale[:, None] + b_ex[:, None] * b_e_x) * b_inv[:, None]
    tl.store(h_ptr + o_t[:, None] * D + o_d[None, :], b_h, mask=m_td)
    m_first = m_t & (pid_d == 0)
    tl.store(z_ptr + o_t, b_z, mask=m_first)
    tl.store(m_ptr + o_t, b_m, mask=m_first)
    b_lse = tl.log(b_sum.to(tl.float64)) + tl.maximum(b_delta, 0.0)
    tl.store(lse_ptr + o_t, b_lse.to(tl.float32), mask=m_first)
    tl.store(px_ptr + o_t, b_ex * b_inv, mask=m_first)


@triton.jit(do_not_specialize=["seed"])
def _dense_bwd_kernel(x_ptr, c_ptr, m_ptr, lse_ptr, px_ptr, dh_ptr, de_ptr,
                      seed: tl.uint64, N, V, D,
                      PRECISION: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """dE[tile] = P[:, tile]^T @ dh for one (BV rows, BD columns) tile of dE, over all tokens in order."""
    o_v = tl.program_id(0).to(tl.int64) * BV + tl.arange(0, BV)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_v = o_v < V
    m_d = o_d < D
    b_de = tl.zeros([BV, BD], dtype=tl.float32)
    t0 = 0
    while t0 < N:
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < N
        b_x = tl.load(x_ptr + o_t, mask=m_t, other=-1)
        b_c = tl.load(c_ptr + o_t, mask=m_t, other=0.0)
        b_m = tl.load(m_ptr + o_t, mask=m_t, other=0.0)
        b_lse = tl.load(lse_ptr + o_t, mask=m_t, other=0.0)
        b_px = tl.load(px_ptr + o_t, mask=m_t, other=0.0)
        # [BT, BV]
        b_eps = _noise(seed, o_t[:, None] * V + o_v[None, :])
        m_clean = o_v[None, :] == b_x[:, None]
        m_noise = m_t[:, None] & m_v[None, :] & ~m_clean
        b_p = tl.exp(tl.where(m_noise, b_c[:, None] * (b_eps - b_m[:, None]) - b_lse[:, None], float("-inf")))
        b_p = tl.where(m_clean, b_px[:, None], b_p)
        # [BT, BD]
        b_dh = tl.load(dh_ptr + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                       other=0.0).to(tl.float32)
        b_de += tl.dot(tl.trans(b_p), b_dh, input_precision=PRECISION)
        t0 += BT
    tl.store(de_ptr + o_v[:, None] * D + o_d[None, :], b_de, mask=m_v[:, None] & m_d[None, :])


def _dense_tiles(d: int, device) -> dict:
    """Tile sizes: small under the interpreter (~1 ms per program step). On a GPU: 32 x 32 score tiles,
    d tiles of up to 64 columns, 8 warps. Each thread then holds 4 scores, whose float64 Box-Muller is
    what fills the registers. Compiled for sm_80 / sm_89 / sm_90 at both matmul precisions (the compile
    gate, tests/test_compile_gate.py): 174-194 registers, no spills, 12.4 KB of shared memory, under the
    99 KB per block of sm_86 / sm_89, so one tile set fits every target. Measured there too:
    BD = 128 spills 144-248 B per thread (255 registers); 64 x 64 x 256 tiles spilled ~59 KB (ieee) and
    needed 112-145 KB of shared memory. [Speed untuned: no GPU was available; d = 768 runs as 12 d
    tiles, each repeating the RNG work.]"""
    if not gpu_capability(device):
        return dict(BT=16, BV=64, BD=_pow2(d, hi=64), num_warps=4, num_stages=1)
    return dict(BT=32, BV=32, BD=_pow2(d, hi=64), num_warps=8, num_stages=2)


def matmul_precision() -> str:
    """``tl.dot``'s input precision for fp32 tiles, following ``torch.get_float32_matmul_precision()``:
    "highest" (torch's default) -> "ieee" (true fp32 FMA), "high"/"medium" -> "tf32" tensor cores."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dense_forward(x: torch.Tensor, a_tilde: torch.Tensor, s_tilde: torch.Tensor, tau: float,
                  weight: torch.Tensor, seed: int):
    """(h (N, D) fp32, z_t (N,) int64, saved statistics (c, m, lse, p_x)) for N flattened tokens.

    ``a_tilde``, ``s_tilde``: (N,) float64; ``weight``: (V, D) with unit column stride.
    """
    n = x.numel()
    v, d = weight.shape
    device = weight.device
    inv_tau = 1.0 / tau
    a_tau = a_tilde * inv_tau
    s_tau = s_tilde * inv_tau
    c = s_tau.clamp(max=torch.finfo(torch.float32).max).to(torch.float32)
    h = torch.empty(n, d, dtype=torch.float32, device=device)
    z = torch.empty(n, dtype=torch.int64, device=device)
    stats = torch.empty(3, n, dtype=torch.float32, device=device)  # m, lse, p_x
    if n:
        tiles = _dense_tiles(d, device)
        grid = (triton.cdiv(n, tiles["BT"]), triton.cdiv(d, tiles["BD"]))
        _dense_fwd_kernel[grid](x, a_tilde, s_tilde, a_tau, s_tau, c, weight, h, z, stats[0], stats[1], stats[2],
                                seed, n, v, d, weight.stride(0), PRECISION=matmul_precision(), **tiles)
    return h, z, (c, stats)


def dense_backward(dh: torch.Tensor, x: torch.Tensor, saved, vocab_size: int, seed: int) -> torch.Tensor:
    """dE (V, D) fp32 from dh (N, D) and the statistics saved by :func:`dense_forward`."""
    c, stats = saved
    n, d = dh.shape
    dh = dh.to(torch.float32).contiguous()
    d_weight = torch.empty(vocab_size, d, dtype=torch.float32, device=dh.device)
    tiles = _dense_tiles(d, dh.device)
    grid = (triton.cdiv(vocab_size, tiles["BV"]), triton.cdiv(d, tiles["BD"]))
    _dense_bwd_kernel[grid](x, c, stats[0], stats[1], stats[2], dh, d_weight, seed, n, vocab_size, d,
                            PRECISION=matmul_precision(), **tiles)
    return d_weight
