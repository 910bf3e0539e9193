// Duo++'s top-k relaxation on CPU (duo-math §4.4): O(k^2) work and O(k) scratch per token, any k.
// On x86-64 CPUs with AVX2 and FMA (checked at run time; the build needs no -march flag) 4 tokens at
// a time as float64 vector code (cpu/topk_avx2.h), ~0.16 us per token at k = 8 on one core of
// the development machine; elsewhere, or with DUO_KERNELS_NO_SIMD=1 in the environment, one token at
// a time through the scalar code of duo/order_stats.h (~1.3 us per token: a Philox block, log, expm1
// and ndtri per order statistic, all scalar libm calls). Both agree with the reference to its
// contract (ids exact, z_t up to ties, weights to float32 rounding).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/topk_avx2.h"
#include "duo/order_stats.h"

namespace duo::cpu {

static_assert(kBadId == 1 && kBadGamma == 2, "the bits tempered_softmax_topk_tokens returns");

int64_t tempered_softmax_topk(at::Tensor& ids, at::Tensor& weights, at::Tensor& z_t, const at::Tensor& x0,
                              const at::Tensor& gamma, int64_t vocab_size, int64_t k, double inv_tau,
                              bool reference_compat, uint64_t seed) {
  const int64_t num_tokens = x0.numel();
  const TopkConfig cfg = make_topk_config(seed, num_tokens, vocab_size, static_cast<int>(k), inv_tau, reference_compat);
  const int64_t* x = x0.data_ptr<int64_t>();
  std::atomic<int> bad{0};
  const int64_t length = x0.size(1);
  const PerToken g{gamma.data_ptr<double>(), gamma.stride(0), gamma.stride(1)};
  int64_t* out_ids = ids.data_ptr<int64_t>();
  float* out_weights = weights.data_ptr<float>();
  int64_t* out_z = z_t.data_ptr<int64_t>();
#ifdef DUO_TOPK_AVX2
  const char* no_simd = std::getenv("DUO_KERNELS_NO_SIMD");
  // (the vector randint_below multiplies 32-bit words: pools below 2^31, as the scalar one needs)
  if (avx2::avx2_available() && !(no_simd && std::strcmp(no_simd, "1") == 0) && vocab_size <= (int64_t{1} << 31)) {
    // grains of ~50 us, whole groups of 4 tokens
    const int64_t grain = std::max<int64_t>(4, 1600 / k / 4 * 4);
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(avx2::topk_scratch_doubles(static_cast<int>(k)) + 4);
      const auto aligned = (reinterpret_cast<uintptr_t>(scratch.data()) + 31) & ~static_cast<uintptr_t>(31);
      bad |= avx2::tempered_softmax_topk_tokens(cfg, begin, end, x, g, length, reinterpret_cast<double*>(aligned),
                                                out_ids, out_weights, out_z);
    });
    return bad;
  }
#endif
  // grains of ~50 us: both cores get work from a few hundred tokens on
  const int64_t grain = std::max<int64_t>(1, 400 / k);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> others(k);
    std::vector<int64_t> scratch(3 * k);
    const TopkScratch s{others.data(), scratch.data(), scratch.data() + k, scratch.data() + 2 * k};
    PerTokenCursor gamma_at(g, begin, length);
    // a~ and s~ once per run of equal gamma (a per-sequence gamma: once per row)
    double last_gamma = NAN;
    GaussianStd std_dev{0.0, 0.0};
    for (int64_t t = begin; t < end; ++t, gamma_at.next()) {
      const double gamma_t = gamma_at.value();
      if (!(gamma_t == last_gamma)) {
        std_dev = gaussian_std(gamma_t);
        last_gamma = gamma_t;
        if (!std::isfinite(gamma_t)) bad |= kBadGamma;
      }
      if (static_cast<uint64_t>(x[t]) >= static_cast<uint64_t>(vocab_size)) bad |= kBadId;
      tempered_softmax_topk_token(cfg, s, t, x[t], std_dev, out_ids + t * k, out_weights + t * k, out_z + t);
    }
  });
  return bad;
}

}  // namespace duo::cpu
