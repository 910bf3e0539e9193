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

// Duo++ top-k relaxation: ids (B, L, k) int64, weights (B, L, k) float32, z_t (B, L) int64. Checks
// the values it reads: returns 0, or a bit set: kBadId an x0 outside [0, V), kBadGamma a non-finite
// gamma (the outputs are then meaningless).
constexpr int kBadId = 1, kBadGamma = 2;
int64_t tempered_softmax_topk(at::Tensor& ids, at::Tensor& weights, at::Tensor& z_t, const at::Tensor& x0,
                              const at::Tensor& gamma, int64_t vocab_size, int64_t k, double inv_tau,
                              bool reference_compat, uint64_t seed);

// The fused sampling step (csrc/cpu/sampling.cpp): logits (B, L, V) float16 / bfloat16 / float32 /
// float64, any strides; z_t (B, L) int64 contiguous; alpha_t, alpha_s, kappa (B, L) float64, any
// strides; z_s (B, L) int64 contiguous; stats empty or (B L, 2) float64 (x_theta[z_t] after
// filtering, kept mass). Returns 0, or a bit set: 1 a NaN / +inf logit, 2 a row without finite entry.
int64_t sampling_ancestral_step(at::Tensor& z_s, at::Tensor& stats, const at::Tensor& logits, const at::Tensor& z_t,
                                const at::Tensor& alpha_t, const at::Tensor& alpha_s, const at::Tensor& kappa,
                                double top_p, uint64_t seed);
// out[i] = exponential53(u[i]): float32 E = -log U of float64 uniforms, as the kernel's Gumbel uses it.
void sampling_exponential53(at::Tensor& out, const at::Tensor& u);

}  // namespace duo::cpu
