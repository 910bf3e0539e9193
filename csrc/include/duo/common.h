// Portability macros shared by the CPU and CUDA kernels. No torch headers: CUDA sources include
// only csrc/include, so CI can compile-check them with nvcc on a machine whose torch has no CUDA.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUO_HD __host__ __device__ __forceinline__
#else
#define DUO_HD inline
#endif

namespace duo {

// A per-token float64 scalar (gamma, alpha) given as a strided (B, L) view: stride 0 where it is
// broadcast over a dimension, so a per-sequence value is never expanded in memory.
struct PerToken {
  const double* data;
  int64_t stride_b;
  int64_t stride_l;
};

// The value for token t of the row-major (B, L) tokens, rows of `length`.
DUO_HD double per_token(const PerToken& p, int64_t t, int64_t length) {
  return p.data[(t / length) * p.stride_b + (t % length) * p.stride_l];
}

// per_token for consecutive tokens begin, begin + 1, ... without a division per token (two 64-bit
// divisions cost ~25 ns, a quarter of an argmax token on CPU).
struct PerTokenCursor {
  const double* row;  // the value's row start
  int64_t l, length, stride_b, stride_l;

  DUO_HD PerTokenCursor(const PerToken& p, int64_t begin, int64_t length_)
      : row(p.data + (begin / length_) * p.stride_b), l(begin % length_), length(length_), stride_b(p.stride_b),
        stride_l(p.stride_l) {}
  DUO_HD double value() const { return row[l * stride_l]; }
  DUO_HD void next() {
    if (++l == length) {
      l = 0;
      row += stride_b;
    }
  }
};

}  // namespace duo
