// An ONNX Runtime custom op whose kernel is CUDA (../cuda/twice_plus_one.cu), built by
// `opserve ops build` from both files: domain "cuda_ops", op "TwicePlusOne": y = 2 * x + 1 for an
// FP32 tensor of any shape. It runs under the CPU execution provider: the tensor goes to the GPU,
// through the kernel, and back.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cuda_runtime_api.h>

#include <mutex>
#include <string>
#include <vector>

cudaError_t launch_twice_plus_one(const float* in, float* out, int64_t n, cudaStream_t stream);

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Ort::Exception(std::string("TwicePlusOne: ") + what + ": " + cudaGetErrorString(status),
                         ORT_RUNTIME_EXCEPTION);
  }
}

struct TwicePlusOneKernel {
  TwicePlusOneKernel(const OrtApi&, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    Ort::ConstValue input = context.GetInput(0);
    auto info = input.GetTensorTypeAndShapeInfo();
    Ort::UnownedValue output = context.GetOutput(0, info.GetShape());
    const size_t count = info.GetElementCount();
    if (count == 0) return;
    const size_t bytes = count * sizeof(float);
    void* memory = nullptr;
    check(cudaMalloc(&memory, 2 * bytes), "cudaMalloc");
    float* device = static_cast<float*>(memory);
    cudaError_t status = cudaMemcpy(device, input.GetTensorData<float>(), bytes, cudaMemcpyHostToDevice);
    if (status == cudaSuccess) status = launch_twice_plus_one(device, device + count, count, nullptr);
    if (status == cudaSuccess) {
      status = cudaMemcpy(output.GetTensorMutableData<float>(), device + count, bytes, cudaMemcpyDeviceToHost);
    }
    cudaFree(device);
    check(status, "kernel");
  }
};

struct TwicePlusOneOp : Ort::CustomOpBase<TwicePlusOneOp, TwicePlusOneKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new TwicePlusOneKernel(api, info);
  }
  const char* GetName() const { return "TwicePlusOne"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

const TwicePlusOneOp twice_plus_one_op;
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    Ort::CustomOpDomain domain{"cuda_ops"};
    domain.Add(&twice_plus_one_op);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
