// CPU kernels (ATen tensors, at::parallel_for). Declared here, called from bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace duo::cpu {

void rng_uniform(at::Tensor& out, uint64_t seed, uint64_t offset);
void rng_normal(at::Tensor& out, uint64_t seed, uint64_t offset);
void rng_randint(at::Tensor& out, int64_t high, uint64_t seed, uint64_t offset);

// Forward processes: x0 (B, L) int64 contiguous; gamma / alpha (B, L) float64, any strides; outputs
// (B, L) int64 contiguous. z_s undefined for the single-time sampler.
void gaussian_argmax(at::Tensor& z_t, at::Tensor& z_s, const at::Tensor& x0, const at::Tensor& gamma_t,
                     const at::Tensor& gamma_s, int64_t vocab_size, uint64_t seed);
void usdm_forward(at::Tensor& z_t, const at::Tensor& x0, const at::Tensor& alpha, int64_t vocab_size, uint64_t seed);

// Duo++ top-k relaxation: ids (B, L, k) int64, weights (B, L, k) float32, z_t (B, L) int64.
void tempered_softmax_topk(at::Tensor& ids, at::Tensor& weights, at::Tensor& z_t, const at::Tensor& x0,
                           const at::Tensor& gamma, int64_t vocab_size, int64_t k, double inv_tau,
                           bool reference_compat, uint64_t seed);

}  // namespace duo::cpu
