// Duo++'s top-k relaxation on CUDA (duo-math §4.4): one thread per token, its k order statistics
// and Fisher-Yates records in per-thread arrays sized by the smallest of 8, 32, 128 that holds k.
#include <cuda_runtime.h>

#include "launchers.h"
#include "duo/order_stats.h"

namespace {

constexpr int kThreads = 128;

template <int KMAX>
__global__ void tempered_softmax_topk_kernel(int64_t* ids, float* weights, int64_t* z_t, const int64_t* x0,
                                             int64_t length, duo::PerToken gamma, duo::TopkConfig cfg) {
  double others[KMAX];
  int64_t other_ids[KMAX], picks[KMAX], moved[KMAX];
  const duo::TopkScratch scratch{others, picks, moved, other_ids};
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < cfg.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    duo::tempered_softmax_topk_token(cfg, scratch, t, x0[t], duo::gaussian_std(duo::per_token(gamma, t, length)),
                                     ids + t * cfg.k, weights + t * cfg.k, z_t + t);
  }
}

template <int KMAX>
int launch(int64_t* ids, float* weights, int64_t* z_t, const int64_t* x0, int64_t length, duo::PerToken gamma,
           const duo::TopkConfig& cfg, void* stream) {
  const int64_t blocks64 = (cfg.num_tokens + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 * 32 ? blocks64 : 65535 * 32);
  tempered_softmax_topk_kernel<KMAX><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      ids, weights, z_t, x0, length, gamma, cfg);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int duo_tempered_softmax_topk(int64_t* ids, float* weights, int64_t* z_t, const int64_t* x0, int64_t num_tokens,
                              int64_t length, duo::PerToken gamma, int64_t vocab_size, int k, double inv_tau,
                              bool reference_compat, uint64_t seed, void* stream) {
  if (num_tokens == 0) return 0;
  const duo::TopkConfig cfg = duo::make_topk_config(seed, num_tokens, vocab_size, k, inv_tau, reference_compat);
  if (k <= 8) return launch<8>(ids, weights, z_t, x0, length, gamma, cfg, stream);
  if (k <= 32) return launch<32>(ids, weights, z_t, x0, length, gamma, cfg, stream);
  if (k <= 128) return launch<128>(ids, weights, z_t, x0, length, gamma, cfg, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // extern "C"
