// The exact forward processes on CUDA (duo-math §1.2, §3.1, §5.4): one thread per token, all the
// per-token math in double (a few transcendental calls per token; the kernel is memory-bound).
#include <cuda_runtime.h>

#include "launchers.h"
#include "duo/forward_process.h"

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

__global__ void gaussian_argmax_kernel(int64_t* z_t, int64_t* z_s, const int64_t* x0, int64_t num_tokens,
                                       int64_t length, duo::PerToken gamma_t, duo::PerToken gamma_s,
                                       int64_t vocab_size, uint64_t seed) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = x0[t];
    const duo::ArgmaxDraws d = duo::gaussian_argmax_draws(seed, t, x, vocab_size);
    z_t[t] = duo::gaussian_argmax_decide(d, x, duo::per_token(gamma_t, t, length));
    if (z_s != nullptr) z_s[t] = duo::gaussian_argmax_decide(d, x, duo::per_token(gamma_s, t, length));
  }
}

__global__ void usdm_forward_kernel(int64_t* z_t, const int64_t* x0, int64_t num_tokens, int64_t length,
                                    duo::PerToken alpha, int64_t vocab_size, uint64_t seed) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    z_t[t] = duo::usdm_forward_token(seed, t, x0[t], duo::per_token(alpha, t, length), vocab_size);
  }
}

}  // namespace

extern "C" {

int duo_gaussian_argmax(int64_t* z_t, int64_t* z_s, const int64_t* x0, int64_t num_tokens, int64_t length,
                        duo::PerToken gamma_t, duo::PerToken gamma_s, int64_t vocab_size, uint64_t seed,
                        void* stream) {
  if (num_tokens == 0) return 0;
  gaussian_argmax_kernel<<<blocks_for(num_tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      z_t, z_s, x0, num_tokens, length, gamma_t, gamma_s, vocab_size, seed);
  return static_cast<int>(cudaGetLastError());
}

int duo_usdm_forward(int64_t* z_t, const int64_t* x0, int64_t num_tokens, int64_t length, duo::PerToken alpha,
                     int64_t vocab_size, uint64_t seed, void* stream) {
  if (num_tokens == 0) return 0;
  usdm_forward_kernel<<<blocks_for(num_tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      z_t, x0, num_tokens, length, alpha, vocab_size, seed);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
