// pybind11 module of the native kernels. Checks tensors, picks the CPU kernel or the CUDA launcher by
// device, and returns. Shapes and argument ranges are validated in Python before these run.
#include <torch/extension.h>

#include "cpu/kernels.h"

#ifdef DUO_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
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

#ifdef DUO_WITH_CUDA
void* stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "duo_kernels CUDA launch of ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

void rng_uniform(at::Tensor out, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kFloat, at::kDouble});
  if (out.is_cuda()) {
#ifdef DUO_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    const int err = out.scalar_type() == at::kFloat
                        ? duo_rng_uniform_f32(out.data_ptr<float>(), out.numel(), seed, offset, stream_of(out))
                        : duo_rng_uniform_f64(out.data_ptr<double>(), out.numel(), seed, offset, stream_of(out));
    check_launch(err, "rng_uniform");
    return;
#else
    TORCH_CHECK(false, "duo_kernels native module was built without CUDA");
#endif
  }
  duo::cpu::rng_uniform(out, seed, offset);
}

void rng_normal(at::Tensor out, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kFloat, at::kDouble});
  if (out.is_cuda()) {
#ifdef DUO_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    const int err = out.scalar_type() == at::kFloat
                        ? duo_rng_normal_f32(out.data_ptr<float>(), out.numel(), seed, offset, stream_of(out))
                        : duo_rng_normal_f64(out.data_ptr<double>(), out.numel(), seed, offset, stream_of(out));
    check_launch(err, "rng_normal");
    return;
#else
    TORCH_CHECK(false, "duo_kernels native module was built without CUDA");
#endif
  }
  duo::cpu::rng_normal(out, seed, offset);
}

void rng_randint(at::Tensor out, int64_t high, uint64_t seed, uint64_t offset) {
  check_out(out, {at::kLong});
  if (out.is_cuda()) {
#ifdef DUO_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    check_launch(duo_rng_randint(out.data_ptr<int64_t>(), out.numel(), high, seed, offset, stream_of(out)),
                 "rng_randint");
    return;
#else
    TORCH_CHECK(false, "duo_kernels native module was built without CUDA");
#endif
  }
  duo::cpu::rng_randint(out, high, seed, offset);
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
