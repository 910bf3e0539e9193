// The public RNG helpers on CPU: element i of `out` uses counter offset + i (duo_kernels/rng.py).
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "duo/normal.h"
#include "duo/philox.h"

namespace duo::cpu {
namespace {

constexpr int64_t kGrain = 4096;

template <typename Fill>
void for_each_element(at::Tensor& out, Fill fill) {
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fill(i);
  });
}

}  // namespace

void rng_uniform(at::Tensor& out, uint64_t seed, uint64_t offset) {
  if (out.scalar_type() == at::kFloat) {
    float* p = out.data_ptr<float>();
    for_each_element(out, [&](int64_t i) { p[i] = uniform24(philox(seed, offset + i).w0); });
  } else {
    double* p = out.data_ptr<double>();
    for_each_element(out, [&](int64_t i) {
      const Words w = philox(seed, offset + i);
      p[i] = uniform53(w.w0, w.w1);
    });
  }
}

void rng_normal(at::Tensor& out, uint64_t seed, uint64_t offset) {
  if (out.scalar_type() == at::kFloat) {
    float* p = out.data_ptr<float>();
    for_each_element(out, [&](int64_t i) {
      const Words w = philox(seed, offset + i);
      p[i] = static_cast<float>(box_muller(uniform24(w.w0), uniform24(w.w1)));
    });
  } else {
    double* p = out.data_ptr<double>();
    for_each_element(out, [&](int64_t i) {
      const Words w = philox(seed, offset + i);
      p[i] = box_muller(uniform53(w.w0, w.w1), uniform53(w.w2, w.w3));
    });
  }
}

void rng_randint(at::Tensor& out, int64_t high, uint64_t seed, uint64_t offset) {
  int64_t* p = out.data_ptr<int64_t>();
  for_each_element(out, [&](int64_t i) {
    const Words w = philox(seed, offset + i);
    p[i] = randint_below(w.w0, w.w1, high);
  });
}

}  // namespace duo::cpu
