"""The exact forward processes in Triton (duo-math §1.2, §3.1, §5.4): one token per lane.

Streams and arithmetic are those of :mod:`duo_kernels.reference.forward_process` (token ``t`` reads
the Philox words of counter ``t``); every per-token quantity is float64, so decisions match the
reference up to an ulp of ``n + mu - M``. Per-token scalars (gamma, alpha) are float64 (B, L) views
read through their strides (0 where broadcast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_kernels.triton.normal import normal_order_statistic
from duo_kernels.triton.rng import box_muller, randint32_below, uniform24
from duo_kernels.triton.target import gpu_capability

# Tokens per program. On a GPU 256 at 8 warps, one token per thread: 1024 tokens at 4 warps (8 per
# thread) spilled 1.8 KB per thread of the float64 order statistic on sm_90, 256 at 4 warps still 8 B
# (the pair kernel); one per thread uses 56-68 registers (compile gate, tests/test_compile_gate.py).
# The interpreter pays per program, so it takes 1024.
GPU_BLOCK = 256
GPU_WARPS = 8
INTERPRETER_BLOCK = 1024
# Spill budgets of the compile gate, bytes per thread: on sm_80 the single-time kernel keeps 64
# registers and spills 4 + 8 B around its float64 special-function calls (56 B stack); sm_89 / sm_90
# and the pair kernel do not spill.
SPILL_BUDGETS = {"_gaussian_argmax_kernel": 12}


@triton.jit
def _per_token(p_ptr, stride_b, stride_l, o_t, length, m_t):
    return tl.load(p_ptr + (o_t // length) * stride_b + (o_t % length) * stride_l, mask=m_t, other=0.0)


@triton.jit(do_not_specialize=["seed"])
def _gaussian_argmax_kernel(x_ptr, z_t_ptr, z_s_ptr, g_t_ptr, g_t_sb, g_t_sl, g_s_ptr, g_s_sb, g_s_sl,
                            num_tokens, length, vocab_size, seed: tl.uint64,
                            PAIR: tl.constexpr, BLOCK: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_t = o_t < num_tokens
    b_x = tl.load(x_ptr + o_t, mask=m_t, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, o_t)
    # n, M and j* of §1.2; z = x iff n + exp(-gamma/2) > M
    b_n = box_muller(uniform24(w0), uniform24(w1))
    b_m = normal_order_statistic(tl.log(uniform24(w2).to(tl.float64)) / (vocab_size - 1).to(tl.float64))
    b_j = randint32_below(w3, vocab_size - 1)
    b_j = b_j + (b_j >= b_x).to(tl.int64)
    b_g = _per_token(g_t_ptr, g_t_sb, g_t_sl, o_t, length, m_t)
    tl.store(z_t_ptr + o_t, tl.where(b_n + tl.exp(-b_g / 2) > b_m, b_x, b_j), mask=m_t)
    if PAIR:
        b_g = _per_token(g_s_ptr, g_s_sb, g_s_sl, o_t, length, m_t)
        tl.store(z_s_ptr + o_t, tl.where(b_n + tl.exp(-b_g / 2) > b_m, b_x, b_j), mask=m_t)


@triton.jit(do_not_specialize=["seed"])
def _usdm_forward_kernel(x_ptr, z_ptr, a_ptr, a_sb, a_sl, num_tokens, length, vocab_size, seed: tl.uint64,
                         BLOCK: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_t = o_t < num_tokens
    b_x = tl.load(x_ptr + o_t, mask=m_t, other=0)
    w0, w1, _, _ = tl.randint4x(seed, o_t)
    b_alpha = _per_token(a_ptr, a_sb, a_sl, o_t, length, m_t)
    move = uniform24(w0).to(tl.float64) < 1.0 - b_alpha
    tl.store(z_ptr + o_t, tl.where(move, randint32_below(w1, vocab_size), b_x), mask=m_t)


def _launch(x0: torch.Tensor) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK, num_warps) for the tokens of ``x0``."""
    block, warps = (GPU_BLOCK, GPU_WARPS) if gpu_capability(x0.device) else (INTERPRETER_BLOCK, 4)
    return (triton.cdiv(x0.numel(), block),), block, warps


def gaussian_argmax(x0: torch.Tensor, gamma: torch.Tensor, vocab_size: int, seed: int) -> torch.Tensor:
    z_t = torch.empty_like(x0)
    if x0.numel():
        grid, block, warps = _launch(x0)
        _gaussian_argmax_kernel[grid](x0, z_t, z_t, gamma, *gamma.stride(), gamma, *gamma.stride(),
                                      x0.numel(), x0.shape[1], vocab_size, seed, PAIR=False, BLOCK=block,
                                      num_warps=warps)
    return z_t


def gaussian_argmax_pair(x0: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor, vocab_size: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z_t, z_s = torch.empty_like(x0), torch.empty_like(x0)
    if x0.numel():
        grid, block, warps = _launch(x0)
        _gaussian_argmax_kernel[grid](x0, z_t, z_s, gamma_t, *gamma_t.stride(), gamma_s, *gamma_s.stride(),
                                      x0.numel(), x0.shape[1], vocab_size, seed, PAIR=True, BLOCK=block,
                                      num_warps=warps)
    return z_t, z_s


def usdm_forward(x0: torch.Tensor, alpha: torch.Tensor, vocab_size: int, seed: int) -> torch.Tensor:
    z_t = torch.empty_like(x0)
    if x0.numel():
        grid, block, warps = _launch(x0)
        _usdm_forward_kernel[grid](x0, z_t, alpha, *alpha.stride(), x0.numel(), x0.shape[1], vocab_size, seed,
                                   BLOCK=block, num_warps=warps)
    return z_t
