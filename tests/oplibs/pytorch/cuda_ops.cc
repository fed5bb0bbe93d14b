// A TorchScript custom op whose kernel is CUDA (../cuda/twice_plus_one.cu), built by `opserve ops build`
// from both files: cuda_ops::twice_plus_one(x) = 2 * x + 1 for FP32 CUDA tensors.
//
// The op has a CUDA implementation only: a model that runs it on the CPU gets PyTorch's
// "Could not run 'cuda_ops::twice_plus_one' with arguments from the 'CPU' backend".
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/script.h>

cudaError_t launch_twice_plus_one(const float* in, float* out, int64_t n, cudaStream_t stream);

namespace {

torch::Tensor twice_plus_one(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "cuda_ops::twice_plus_one takes CUDA tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "cuda_ops::twice_plus_one takes float32");
  auto input = x.contiguous();
  auto output = torch::empty_like(input);
  auto stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  cudaError_t status = launch_twice_plus_one(
      input.data_ptr<float>(), output.data_ptr<float>(), input.numel(), stream);
  TORCH_CHECK(status == cudaSuccess, "twice_plus_one kernel: ", cudaGetErrorString(status));
  return output;
}

}  // namespace

TORCH_LIBRARY(cuda_ops, m) { m.def("twice_plus_one(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(cuda_ops, CUDA, m) { m.impl("twice_plus_one", twice_plus_one); }
