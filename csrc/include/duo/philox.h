// Philox4x32-10 and its integer/uniform conversions: the RNG contract of duo_kernels/rng.py.
// Bit-identical to duo_kernels/reference/rng.py and to Triton's tl.randint4x(seed, offset).
#pragma once

#include "duo/common.h"

namespace duo {

struct Words {
  uint32_t w0, w1, w2, w3;
};

DUO_HD void mul_hi_lo(uint32_t a, uint32_t m, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * m;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Ten rounds on the counter block (c0, c1, c2, c3) with key (k0, k1).
DUO_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(c0, 0xD2511F53u, &hi0, &lo0);
    mul_hi_lo(c2, 0xCD9E8D57u, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words{c0, c1, c2, c3};
}

// Key = the seed's (low, high) words; counter block = (counter low, counter high, 0, 0).
DUO_HD Words philox(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ((w >> 9) + 1/2) / 2^23: the odd multiples of 2^-24, strictly inside (0, 1).
DUO_HD float uniform24(uint32_t w) { return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f; }

// (m + 1/2) / 2^52 with the 52 bits m = (w_hi << 20) | (w_lo >> 12): odd multiples of 2^-53 in (0, 1).
DUO_HD double uniform53(uint32_t w_hi, uint32_t w_lo) {
  const uint64_t m = (static_cast<uint64_t>(w_hi) << 20) | (w_lo >> 12);
  return (static_cast<double>(m) + 0.5) * 2.220446049250313e-16;
}

// floor((w_hi 2^32 + w_lo) * high / 2^64), exact for 1 <= high <= 2^31.
DUO_HD int64_t randint_below(uint32_t w_hi, uint32_t w_lo, int64_t high) {
  const uint64_t h = static_cast<uint64_t>(high);
  const uint64_t t = static_cast<uint64_t>(w_lo) * h;
  const uint64_t s = static_cast<uint64_t>(w_hi) * h + (t >> 32);
  return static_cast<int64_t>(s >> 32);
}

// floor(w * high / 2^32): one word, bias below high / 2^32.
DUO_HD int64_t randint32_below(uint32_t w, int64_t high) {
  return static_cast<int64_t>((static_cast<uint64_t>(w) * static_cast<uint64_t>(high)) >> 32);
}

}  // namespace duo
