// extern "C" launchers of the CUDA kernels: raw pointers and a stream, no torch or CUDA headers.
// Each returns the cudaError_t of its launch (0 on success).
#pragma once

#include <cstdint>

#include "duo/common.h"

extern "C" {

int duo_rng_uniform_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_uniform_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_normal_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_normal_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_randint(int64_t* out, int64_t n, int64_t high, uint64_t seed, uint64_t offset, void* stream);

// Forward processes over num_tokens = B L row-major tokens of rows of `length`. z_s == nullptr: the
// single-time sampler (gamma_s unused).
int duo_gaussian_argmax(int64_t* z_t, int64_t* z_s, const int64_t* x0, int64_t num_tokens, int64_t length,
                        duo::PerToken gamma_t, duo::PerToken gamma_s, int64_t vocab_size, uint64_t seed,
                        void* stream);
int duo_usdm_forward(int64_t* z_t, const int64_t* x0, int64_t num_tokens, int64_t length, duo::PerToken alpha,
                     int64_t vocab_size, uint64_t seed, void* stream);

// Duo++ top-k relaxation, 1 <= k <= 128: ids (N, k), weights (N, k), z_t (N,).
int duo_tempered_softmax_topk(int64_t* ids, float* weights, int64_t* z_t, const int64_t* x0, int64_t num_tokens,
                              int64_t length, duo::PerToken gamma, int64_t vocab_size, int k, double inv_tau,
                              bool reference_compat, uint64_t seed, void* stream);

}  // extern "C"
