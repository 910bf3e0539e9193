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

}  // namespace duo
