// CPU kernels (ATen tensors, at::parallel_for). Declared here, called from bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace duo::cpu {

void rng_uniform(at::Tensor& out, uint64_t seed, uint64_t offset);
void rng_normal(at::Tensor& out, uint64_t seed, uint64_t offset);
void rng_randint(at::Tensor& out, int64_t high, uint64_t seed, uint64_t offset);

}  // namespace duo::cpu
