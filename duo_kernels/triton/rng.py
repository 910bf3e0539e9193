"""The RNG contract in Triton (duo_kernels/rng.py): helpers for kernels, and the public fills.

Kernels get the four Philox words of a counter with ``tl.randint4x(seed, counter)`` (int64 counter)
and convert them with the helpers below, which mirror ``duo_kernels.reference.rng`` and
``csrc/include/duo/philox.h`` / ``normal.h``. Loads and math are in fp32/fp64 only (the interpreter
mis-computes bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def uniform24(w):
    """((w >> 9) + 1/2) / 2^23 as float32: odd multiples of 2^-24 in (0, 1)."""
    return ((w.to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def uniform53(w_hi, w_lo):
    """(m + 1/2) / 2^52 as float64, m = (w_hi << 20) | (w_lo >> 12): odd multiples of 2^-53 in (0, 1)."""
    hi = w_hi.to(tl.uint32, bitcast=True).to(tl.uint64)
    lo = w_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    m = (hi << 20) | (lo >> 12)
    return (m.to(tl.float64) + 0.5) * 2.220446049250313e-16


@triton.jit
def cos_2pi(u):
    """cos(2 pi u) for float64 u in (0, 1), reduced exactly by quarter turns."""
    a = tl.minimum(u, 1.0 - u)
    flip = a > 0.25
    a = tl.where(flip, 0.5 - a, a)
    sign = tl.where(flip, -1.0, 1.0)
    c = tl.where(a <= 0.125, tl.cos(6.283185307179586 * a), tl.sin(6.283185307179586 * (0.25 - a)))
    return sign * c


@triton.jit
def box_muller(u1, u2):
    """sqrt(-2 log u1) cos(2 pi u2) in float64."""
    u1 = u1.to(tl.float64)
    u2 = u2.to(tl.float64)
    return tl.sqrt(-2.0 * tl.log(u1)) * cos_2pi(u2)


@triton.jit
def randint_below(w_hi, w_lo, high):
    """floor((w_hi 2^32 + w_lo) high / 2^64), exact for 1 <= high <= 2^31."""
    h = high.to(tl.uint64)
    t = w_lo.to(tl.uint32, bitcast=True).to(tl.uint64) * h
    s = w_hi.to(tl.uint32, bitcast=True).to(tl.uint64) * h + (t >> 32)
    return (s >> 32).to(tl.int64)


@triton.jit
def randint32_below(w, high):
    """floor(w high / 2^32): one word, bias below high / 2^32."""
    return ((w.to(tl.uint32, bitcast=True).to(tl.uint64) * high.to(tl.uint64)) >> 32).to(tl.int64)


@triton.jit(do_not_specialize=["seed", "offset"])
def _fill_kernel(out_ptr, n, seed: tl.uint64, offset: tl.int64, high, KIND: tl.constexpr, BLOCK: tl.constexpr):
    # KIND: 0 uniform f32, 1 uniform f64, 2 normal f32, 3 normal f64, 4 randint
    o_i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    w0, w1, w2, w3 = tl.randint4x(seed, offset + o_i)
    if KIND == 0:
        b_out = uniform24(w0)
    elif KIND == 1:
        b_out = uniform53(w0, w1)
    elif KIND == 2:
        b_out = box_muller(uniform24(w0), uniform24(w1)).to(tl.float32)
    elif KIND == 3:
        b_out = box_muller(uniform53(w0, w1), uniform53(w2, w3))
    else:
        b_out = randint_below(w0, w1, high)
    tl.store(out_ptr + o_i, b_out, mask=m_i)


def _fill(shape, dtype, device, seed: int, offset: int, kind: int, high: int = 1) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    n = out.numel()
    if n:
        _fill_kernel[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, high, KIND=kind, BLOCK=BLOCK)
    return out


def uniform(shape, seed: int, offset: int, dtype: torch.dtype, device) -> torch.Tensor:
    return _fill(shape, dtype, device, seed, offset, 0 if dtype == torch.float32 else 1)


def normal(shape, seed: int, offset: int, dtype: torch.dtype, device) -> torch.Tensor:
    return _fill(shape, dtype, device, seed, offset, 2 if dtype == torch.float32 else 3)


def randint(shape, high: int, seed: int, offset: int, device) -> torch.Tensor:
    return _fill(shape, torch.int64, device, seed, offset, 4, high)

