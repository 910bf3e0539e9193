// pybind11 module of the native kernels. Checks tensors, picks the CPU kernel or the CUDA launcher by
// device, and returns. Shapes and argument ranges are validated in Python before these run.
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "duo/common.h"

#ifdef DUO_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launchers.h"
#endif

namespace {

void check_out(const at::Tensor& out, std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(out.is_contiguous(), "duo_kernels native: output must be contiguous");
  bool ok = false;
  for (auto d : dtypes) ok = ok || out.scalar_type() == d;
  TORCH_CHECK(ok, "duo_kernels native: unsupported output dtype ", out.scalar_type());
}

// Runs `cpu()` for CPU tensors, or `cuda(stream)` (an extern "C" launcher returning a cudaError_t) on
// the tensor's device and current stream. DUO_CUDA(...) wraps a launch so that a CPU-only build
// never references the CUDA launchers.
#ifdef DUO_WITH_CUDA
#define DUO_CUDA(...) [&](void* stream) { return __VA_ARGS__; }

template <typename CpuFn, typename CudaFn>
void on_device(const at::Tensor& t, const char* what, CpuFn cpu, CudaFn cuda) {
  if (!t.is_cuda()) return cpu();
  const c10::cuda::CUDAGuard guard(t.device());
  const int err = cuda(static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()));
  TORCH_CHECK(err == 0, "duo_kernels CUDA launch of ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#else
#define DUO_CUDA(...) nullptr

template <typename CpuFn>
void on_device(const at::Tensor& t, const char* what, CpuFn cpu, std::nullptr_t) {
  TORCH_CHECK(!t.is_cuda(), "duo_kernels native module was built without CUDA (", what, ")");
  cpu();
}
#endif

void rng_uniform(at::Tensor out, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kFloat, at::kDouble});
  const bool f32 = out.scalar_type() == at::kFloat;
  on_device(
      out, "rng_uniform", [&] { duo::cpu::rng_uniform(out, seed, offset); },
      DUO_CUDA(f32 ? duo_rng_uniform_f32(out.data_ptr<float>(), out.numel(), seed, offset, stream)
                   : duo_rng_uniform_f64(out.data_ptr<double>(), out.numel(), seed, offset, stream)));
}

void rng_normal(at::Tensor out, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kFloat, at::kDouble});
  const bool f32 = out.scalar_type() == at::kFloat;
  on_device(
      out, "rng_normal", [&] { duo::cpu::rng_normal(out, seed, offset); },
      DUO_CUDA(f32 ? duo_rng_normal_f32(out.data_ptr<float>(), out.numel(), seed, offset, stream)
                   : duo_rng_normal_f64(out.data_ptr<double>(), out.numel(), seed, offset, stream)));
}

void rng_randint(at::Tensor out, int64_t high, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kLong});
  on_device(
      out, "rng_randint", [&] { duo::cpu::rng_randint(out, high, seed, offset); },
      DUO_CUDA(duo_rng_randint(out.data_ptr<int64_t>(), out.numel(), high, seed, offset, stream)));
}

duo::PerToken per_token_view(const at::Tensor& t) {
  return duo::PerToken{t.data_ptr<double>(), t.stride(0), t.stride(1)};
}

// x0 (B, L) int64 contiguous; per-token scalars (B, L) float64 on x0's device, any strides.
void check_tokens(const at::Tensor& x0, std::initializer_list<const at::Tensor*> scalars) {
  TORCH_CHECK(x0.dim() == 2 && x0.scalar_type() == at::kLong && x0.is_contiguous(),
              "duo_kernels native: x0 must be a contiguous (B, L) int64 tensor");
  for (const at::Tensor* s : scalars) {
    TORCH_CHECK(s->scalar_type() == at::kDouble && s->sizes() == x0.sizes() && s->device() == x0.device(),
                "duo_kernels native: per-token scalars must be (B, L) float64 on x0's device");
  }
}

void check_like(const at::Tensor& out, const at::Tensor& x0, std::initializer_list<at::ScalarType> dtypes) {
  check_out(out, dtypes);
  TORCH_CHECK(out.device() == x0.device(), "duo_kernels native: outputs must be on x0's device");
}

void gaussian_argmax(at::Tensor z_t, const at::Tensor& x0, const at::Tensor& gamma, int64_t vocab_size,
                     uint64_t seed) {
  check_tokens(x0, {&gamma});
  check_like(z_t, x0, {at::kLong});
  at::Tensor none;
  on_device(
      x0, "gaussian_argmax", [&] { duo::cpu::gaussian_argmax(z_t, none, x0, gamma, gamma, vocab_size, seed); },
      DUO_CUDA(duo_gaussian_argmax(z_t.data_ptr<int64_t>(), nullptr, x0.data_ptr<int64_t>(), x0.numel(),
                                   x0.size(1), per_token_view(gamma), per_token_view(gamma), vocab_size, seed,
                                   stream)));
}

void gaussian_argmax_pair(at::Tensor z_t, at::Tensor z_s, const at::Tensor& x0, const at::Tensor& gamma_t,
                          const at::Tensor& gamma_s, int64_t vocab_size, uint64_t seed) {
  check_tokens(x0, {&gamma_t, &gamma_s});
  check_like(z_t, x0, {at::kLong});
  check_like(z_s, x0, {at::kLong});
  on_device(
      x0, "gaussian_argmax_pair",
      [&] { duo::cpu::gaussian_argmax(z_t, z_s, x0, gamma_t, gamma_s, vocab_size, seed); },
      DUO_CUDA(duo_gaussian_argmax(z_t.data_ptr<int64_t>(), z_s.data_ptr<int64_t>(), x0.data_ptr<int64_t>(),
                                   x0.numel(), x0.size(1), per_token_view(gamma_t), per_token_view(gamma_s),
                                   vocab_size, seed, stream)));
}

void usdm_forward(at::Tensor z_t, const at::Tensor& x0, const at::Tensor& alpha, int64_t vocab_size, uint64_t seed) {
  check_tokens(x0, {&alpha});
  check_like(z_t, x0, {at::kLong});
  on_device(
      x0, "usdm_forward", [&] { duo::cpu::usdm_forward(z_t, x0, alpha, vocab_size, seed); },
      DUO_CUDA(duo_usdm_forward(z_t.data_ptr<int64_t>(), x0.data_ptr<int64_t>(), x0.numel(), x0.size(1),
                                per_token_view(alpha), vocab_size, seed, stream)));
}

// Returns the CPU kernel's bad-input bits (0 on CUDA, whose values are checked in Python when asked).
int64_t tempered_softmax_topk(at::Tensor ids, at::Tensor weights, at::Tensor z_t, const at::Tensor& x0,
                              const at::Tensor& gamma, int64_t vocab_size, int64_t k, double inv_tau,
                              bool reference_compat, uint64_t seed) {
  check_tokens(x0, {&gamma});
  check_like(ids, x0, {at::kLong});
  check_like(weights, x0, {at::kFloat});
  check_like(z_t, x0, {at::kLong});
  TORCH_CHECK(k >= 1 && k < vocab_size && ids.numel() == x0.numel() * k && weights.numel() == ids.numel(),
              "duo_kernels native: tempered_softmax_topk needs 1 <= k < V and (B, L, k) outputs");
  int64_t bad = 0;
  on_device(
      x0, "tempered_softmax_topk",
      [&] {
        bad = duo::cpu::tempered_softmax_topk(ids, weights, z_t, x0, gamma, vocab_size, k, inv_tau, reference_compat,
                                              seed);
      },
      DUO_CUDA(duo_tempered_softmax_topk(ids.data_ptr<int64_t>(), weights.data_ptr<float>(), z_t.data_ptr<int64_t>(),
                                         x0.data_ptr<int64_t>(), x0.numel(), x0.size(1), per_token_view(gamma),
                                         vocab_size, static_cast<int>(k), inv_tau, reference_compat, seed, stream)));
  return bad;
}

// CPU only (the GPU runs the Triton kernel): see csrc/cpu/sampling.cpp; shapes checked in Python.
int64_t sampling_ancestral_step(at::Tensor z_s, at::Tensor stats, const at::Tensor& logits, const at::Tensor& z_t,
                                const at::Tensor& alpha_t, const at::Tensor& alpha_s, const at::Tensor& kappa,
                                double top_p, uint64_t seed) {
  TORCH_CHECK(!logits.is_cuda(), "duo_kernels native: sampling_ancestral_step runs on CPU tensors");
  TORCH_CHECK(logits.dim() == 3 && z_t.is_contiguous() && z_t.scalar_type() == at::kLong &&
                  z_t.numel() == logits.size(0) * logits.size(1),
              "duo_kernels native: sampling_ancestral_step needs (B, L, V) logits and contiguous (B, L) int64 z_t");
  check_tokens(z_t, {&alpha_t, &alpha_s, &kappa});
  check_like(z_s, z_t, {at::kLong});
  TORCH_CHECK(stats.numel() == 0 || (stats.is_contiguous() && stats.scalar_type() == at::kDouble &&
                                     stats.numel() == 2 * z_t.numel()),
              "duo_kernels native: stats must be empty or (B L, 2) float64");
  return duo::cpu::sampling_ancestral_step(z_s, stats, logits, z_t, alpha_t, alpha_s, kappa, top_p, seed);
}

void sampling_exponential53(at::Tensor out, const at::Tensor& u) {
  check_out(out, {at::kFloat});
  TORCH_CHECK(!u.is_cuda() && u.is_contiguous() && u.scalar_type() == at::kDouble && u.numel() == out.numel(),
              "duo_kernels native: sampling_exponential53 needs contiguous float64 CPU uniforms");
  duo::cpu::sampling_exponential53(out, u);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duo_kernels native kernels (CPU, and CUDA when built with it)";
#ifdef DUO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("rng_uniform", &rng_uniform, "fill out with uniforms (counter offset + i)");
  m.def("rng_normal", &rng_normal, "fill out with standard normals (counter offset + i)");
  m.def("rng_randint", &rng_randint, "fill out with ints in [0, high) (counter offset + i)");
  m.def("gaussian_argmax", &gaussian_argmax, "exact argmax forward process into z_t (duo-math 1.2)");
  m.def("gaussian_argmax_pair", &gaussian_argmax_pair, "the DDT pair (z_t, z_s) of one shared noise (5.4)");
  m.def("usdm_forward", &usdm_forward, "uniform-state forward marginal into z_t (3.1)");
  m.def("tempered_softmax_topk", &tempered_softmax_topk, "Duo++ top-k relaxation into (ids, weights, z_t) (4.4)");
  m.def("sampling_ancestral_step", &sampling_ancestral_step, "fused ancestral / Psi-sampler step into z_s (6.2)");
  m.def("sampling_exponential53", &sampling_exponential53, "the sampling step's float32 -log U of float64 U");
}
