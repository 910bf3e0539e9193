// pybind11 module of the native kernels. Checks tensors, picks the CPU kernel or the CUDA launcher by
// device, and returns. Shapes and argument ranges are validated in Python before these run.
#include <torch/extension.h>

#include "cpu/kernels.h"

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
}
