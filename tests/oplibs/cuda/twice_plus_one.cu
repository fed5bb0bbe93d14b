// y = 2 * x + 1 on the GPU: the kernel of the CUDA test ops of PyTorch (pytorch/cuda_ops.cc) and
// ONNX Runtime (onnxruntime/cuda_ops.cc), compiled by nvcc. Pointers are device memory.
#include <cstdint>

#include <cuda_runtime.h>

namespace {

__global__ void twice_plus_one_kernel(const float* in, float* out, int64_t n) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2.0f * in[i] + 1.0f;
}

}  // namespace

cudaError_t launch_twice_plus_one(const float* in, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  twice_plus_one_kernel<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}
