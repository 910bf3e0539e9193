// The public RNG helpers on CUDA: element i of `out` uses counter offset + i (duo_kernels/rng.py).
#include <cuda_runtime.h>

#include "launchers.h"
#include "duo/normal.h"
#include "duo/philox.h"

namespace {

constexpr int kThreads = 256;

struct Uniform32 {
  __device__ float operator()(const duo::Words& w) const { return duo::uniform24(w.w0); }
};
struct Uniform64 {
  __device__ double operator()(const duo::Words& w) const { return duo::uniform53(w.w0, w.w1); }
};
struct Normal32 {
  __device__ float operator()(const duo::Words& w) const {
    return static_cast<float>(duo::box_muller(duo::uniform24(w.w0), duo::uniform24(w.w1)));
  }
};
struct Normal64 {
  __device__ double operator()(const duo::Words& w) const {
    return duo::box_muller(duo::uniform53(w.w0, w.w1), duo::uniform53(w.w2, w.w3));
  }
};
struct Randint {
  int64_t high;
  __device__ int64_t operator()(const duo::Words& w) const { return duo::randint_below(w.w0, w.w1, high); }
};

template <typename T, typename Convert>
__global__ void fill_kernel(T* out, int64_t n, uint64_t seed, uint64_t offset, Convert convert) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = convert(duo::philox(seed, offset + static_cast<uint64_t>(i)));
  }
}

template <typename T, typename Convert>
int launch_fill(T* out, int64_t n, uint64_t seed, uint64_t offset, void* stream, Convert convert) {
  if (n == 0) return 0;
  const int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 * 32 ? blocks64 : 65535 * 32);
  fill_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, n, seed, offset, convert);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int duo_rng_uniform_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  return launch_fill(out, n, seed, offset, stream, Uniform32{});
}
int duo_rng_uniform_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  return launch_fill(out, n, seed, offset, stream, Uniform64{});
}
int duo_rng_normal_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  return launch_fill(out, n, seed, offset, stream, Normal32{});
}
int duo_rng_normal_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  return launch_fill(out, n, seed, offset, stream, Normal64{});
}
int duo_rng_randint(int64_t* out, int64_t n, int64_t high, uint64_t seed, uint64_t offset, void* stream) {
  return launch_fill(out, n, seed, offset, stream, Randint{high});
}

}  // extern "C"
