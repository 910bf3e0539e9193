// extern "C" launchers of the CUDA kernels: raw pointers and a stream, no torch or CUDA headers.
// Each returns the cudaError_t of its launch (0 on success).
#pragma once

#include <cstdint>

extern "C" {

int duo_rng_uniform_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_uniform_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_normal_f32(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_normal_f64(double* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int duo_rng_randint(int64_t* out, int64_t n, int64_t high, uint64_t seed, uint64_t offset, void* stream);

}  // extern "C"
