// The exact forward processes on CPU (duo-math §1.2, §3.1, §5.4): one token per iteration.
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "duo/forward_process.h"

namespace duo::cpu {
namespace {

constexpr int64_t kGrain = 2048;

PerToken view(const at::Tensor& t) { return PerToken{t.data_ptr<double>(), t.stride(0), t.stride(1)}; }

}  // namespace

void gaussian_argmax(at::Tensor& z_t, at::Tensor& z_s, const at::Tensor& x0, const at::Tensor& gamma_t,
                     const at::Tensor& gamma_s, int64_t vocab_size, uint64_t seed) {
  const int64_t* x = x0.data_ptr<int64_t>();
  const int64_t length = x0.size(1);
  const PerToken g_t = view(gamma_t);
  int64_t* out_t = z_t.data_ptr<int64_t>();
  const bool pair = z_s.defined();
  const PerToken g_s = pair ? view(gamma_s) : g_t;
  int64_t* out_s = pair ? z_s.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, x0.numel(), kGrain, [&](int64_t begin, int64_t end) {
    PerTokenCursor c_t(g_t, begin, length), c_s(g_s, begin, length);
    for (int64_t t = begin; t < end; ++t, c_t.next(), c_s.next()) {
      const ArgmaxDraws d = gaussian_argmax_draws(seed, t, x[t], vocab_size);
      out_t[t] = gaussian_argmax_decide(d, x[t], c_t.value());
      if (pair) out_s[t] = gaussian_argmax_decide(d, x[t], c_s.value());
    }
  });
}

void usdm_forward(at::Tensor& z_t, const at::Tensor& x0, const at::Tensor& alpha, int64_t vocab_size, uint64_t seed) {
  const int64_t* x = x0.data_ptr<int64_t>();
  const int64_t length = x0.size(1);
  const PerToken a = view(alpha);
  int64_t* out = z_t.data_ptr<int64_t>();
  at::parallel_for(0, x0.numel(), kGrain, [&](int64_t begin, int64_t end) {
    PerTokenCursor c(a, begin, length);
    for (int64_t t = begin; t < end; ++t, c.next()) out[t] = usdm_forward_token(seed, t, x[t], c.value(), vocab_size);
  });
}

}  // namespace duo::cpu
