// Portability macros shared by the CPU and CUDA kernels. No torch headers: CUDA sources include
// only csrc/include, so CI can compile-check them with nvcc on a machine whose torch has no CUDA.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUO_HD __host__ __device__ __forceinline__
#else
#define DUO_HD inline
#endif
