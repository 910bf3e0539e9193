"""Philox4x32-10 and its conversions in plain PyTorch: the oracle of the RNG contract.

The contract itself (key, counter, which words feed which conversion) is documented in
:mod:`duo_kernels.rng`. Every function here works on int64 tensors that hold uint32 values, on any
device, with no integer overflow: 32x32-bit products are formed from 16-bit halves.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mul_hi_lo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product of uint32 tensor ``a`` and uint32 constant ``m``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = a_lo * m  # < 2^48
    p_hi = a_hi * m  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al., SC'11) on a counter block of four uint32 tensors and a key of two
    uint32 integers."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox4x32(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64 tensors) of Philox4x32-10 for each 64-bit counter.

    Key = (seed low word, seed high word); counter block = (counter low word, counter high word, 0, 0):
    the layout of Triton's ``tl.randint4x(seed, offset)`` for an int64 ``offset``.
    """
    counter = counter.to(torch.int64)
    zero = torch.zeros_like(counter)
    return philox4x32_10(counter & MASK32, (counter >> 32) & MASK32, zero, zero, seed & MASK32, (seed >> 32) & MASK32)


def uniform24(w: torch.Tensor) -> torch.Tensor:
    """float32 uniform from one word: ((w >> 9) + 1/2) / 2^23, the odd multiples of 2^-24 in (0, 1)."""
    return ((w >> 9).to(torch.float32) + 0.5) * 2.0**-23


def uniform53(w_hi: torch.Tensor, w_lo: torch.Tensor) -> torch.Tensor:
    """float64 uniform from two words: 52 bits, (m + 1/2) / 2^52, the odd multiples of 2^-53 in (0, 1)."""
    m = (w_hi << 20) | (w_lo >> 12)
    return (m.to(torch.float64) + 0.5) * 2.0**-52


def cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u) for u in (0, 1), with exact quarter-turn reduction so that the result keeps full
    relative precision near its zeros (every subtraction below is exact on the uniform grid)."""
    a = torch.minimum(u, 1.0 - u)  # cos(2 pi u) = cos(2 pi (1 - u)); a in (0, 1/2]
    sign = torch.where(a > 0.25, -1.0, 1.0).to(u.dtype)
    a = torch.where(a > 0.25, 0.5 - a, a)  # cos(2 pi a) = -cos(2 pi (1/2 - a)); a in [0, 1/4]
    two_pi = 2.0 * math.pi
    return sign * torch.where(a <= 0.125, torch.cos(two_pi * a), torch.sin(two_pi * (0.25 - a)))


def box_muller(u1: torch.Tensor, u2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(-2 log u1) cos(2 pi u2), evaluated in float64 and rounded to ``dtype``."""
    u1, u2 = u1.to(torch.float64), u2.to(torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * cos_2pi(u2)).to(dtype)


def randint_below(w_hi: torch.Tensor, w_lo: torch.Tensor, high: int) -> torch.Tensor:
    """floor(m * high / 2^64) for the 64-bit word m = w_hi 2^32 + w_lo; exact for 1 <= high <= 2^31.

    The bias of each value is below high / 2^64 (Lemire's multiply-shift on 64 bits).
    """
    t = w_lo * high  # < 2^63
    s = w_hi * high + (t >> 32)  # < 2^63
    return s >> 32


# Long streams are drawn 2^18 counters at a time: over a whole (B, L, V) stream the int64 temporaries
# of philox4x32 fall out of cache and page in fresh memory, ~5x slower (8e6 normals: 20 s vs 4 s).
_CHUNK = 1 << 18


def counter_stream(seed: int, num: int, convert, offset: int = 0, device=None) -> torch.Tensor:
    """``convert(w0, w1, w2, w3)`` of the Philox words of counters ``offset .. offset + num - 1``, 1-D."""
    chunks = [convert(*philox4x32(seed, torch.arange(start, min(start + _CHUNK, num), device=device) + offset))
              for start in range(0, num, _CHUNK)]
    return torch.cat(chunks) if chunks else convert(*philox4x32(seed, torch.zeros(0, dtype=torch.int64, device=device)))


def float32_normal(w0, w1, w2, w3) -> torch.Tensor:
    """The float32 normal of the contract: Box-Muller of the float32 uniforms of words 0 and 1."""
    return box_muller(uniform24(w0), uniform24(w1), torch.float32)


def float64_normal(w0, w1, w2, w3) -> torch.Tensor:
    """The float64 normal of the contract: Box-Muller of the float64 uniforms of words 0-1 and 2-3."""
    return box_muller(uniform53(w0, w1), uniform53(w2, w3), torch.float64)


def uniform(shape, seed: int, offset: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Element i gets counter offset + i; float32 uses word 0, float64 words 0 and 1."""
    if dtype == torch.float32:
        convert = lambda w0, w1, w2, w3: uniform24(w0)  # noqa: E731
    else:
        convert = lambda w0, w1, w2, w3: uniform53(w0, w1)  # noqa: E731
    return counter_stream(seed, math.prod(shape), convert, offset, device).reshape(shape)


def normal(shape, seed: int, offset: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Box-Muller of (word 0, word 1) as float32 uniforms, or of (words 0-1, words 2-3) as float64."""
    convert = float32_normal if dtype == torch.float32 else float64_normal
    return counter_stream(seed, math.prod(shape), convert, offset, device).reshape(shape)


def randint(shape, high: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Uniform int64 in [0, high) from words 0 (high half) and 1 (low half)."""
    convert = lambda w0, w1, w2, w3: randint_below(w0, w1, high)  # noqa: E731
    return counter_stream(seed, math.prod(shape), convert, offset, device).reshape(shape)


def randint32_below(w: torch.Tensor, high: int) -> torch.Tensor:
    """floor(w * high / 2^32) for one word w: uniform on [0, high) up to a bias below high / 2^32
    (1.2e-5 relative at high = 50258); exact arithmetic for 1 <= high <= 2^31."""
    return (w * high) >> 32
