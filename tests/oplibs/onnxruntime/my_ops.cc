// A custom-op library for ONNX Runtime, built during the test run.
//
// Domain "my_ops", op "AddOne": y = x + ADD_VALUE for an FP32 tensor of any shape. ADD_VALUE is a
// compile-time constant so that two builds of the same op name can behave differently.
// Op "Checked": y = x, but aborts the process when an element is negative (a crashing op).
// Op "Slow": y = x after sleeping 200 ms per call (for scheduling tests).
// Op "Segfault": y = x, but dereferences a null pointer when an element is negative (SIGSEGV).
// Op "Spin": y = x, but spins on the CPU forever when an element is negative (a hung op).
// Op "Rendezvous": proves two executions overlap, without timing them. Calls that share a key
// (x[0]) meet in a counter in shared memory; each waits (up to 3 s) for a second arrival and
// answers 1 everywhere if it met one, 0 if it waited alone.
// Op "RuntimeMinor": y = x + N, where the onnxruntime that registered the library is 1.N (tells
// which runtime a model's worker runs).
// With REQUEST_API_VERSION defined, the library asks for that ONNX Runtime API version instead of
// its headers' own: a library built for a newer onnxruntime than the server has.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#ifndef ADD_VALUE
#define ADD_VALUE 1.0f
#endif

namespace {

int runtime_minor = 0;  // of the onnxruntime that called RegisterCustomOps

// y = Fn(x) for an FP32 tensor of any shape: Fn::run(x, y, count) when Fn has one, else
// Fn::apply element by element.
template <typename Fn>
struct UnaryFloatKernel {
  UnaryFloatKernel(const OrtApi&, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    Ort::ConstValue input = context.GetInput(0);
    auto info = input.GetTensorTypeAndShapeInfo();
    const float* x = input.GetTensorData<float>();
    Ort::UnownedValue output = context.GetOutput(0, info.GetShape());
    float* y = output.GetTensorMutableData<float>();
    const size_t count = info.GetElementCount();
    if constexpr (requires { Fn::run(x, y, count); }) {
      Fn::run(x, y, count);
    } else {
      for (size_t i = 0; i < count; ++i) y[i] = Fn::apply(x[i]);
    }
  }
};

template <typename Fn>
struct UnaryFloatOp : Ort::CustomOpBase<UnaryFloatOp<Fn>, UnaryFloatKernel<Fn>> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new UnaryFloatKernel<Fn>(api, info);
  }
  const char* GetName() const { return Fn::name; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct AddOne {
  static constexpr const char* name = "AddOne";
  static float apply(float x) { return x + static_cast<float>(ADD_VALUE); }
};

struct Checked {
  static constexpr const char* name = "Checked";
  static float apply(float x) {
    if (x < 0) std::abort();  // the bug this op exists to have
    return x;
  }
};

struct Segfault {
  static constexpr const char* name = "Segfault";
  static float apply(float x) {
    if (x < 0) {
      volatile int* nowhere = nullptr;
      *nowhere = 1;  // the bug this op exists to have
    }
    return x;
  }
};

struct Spin {
  static constexpr const char* name = "Spin";
  static float apply(float x) {
    volatile bool forever = x < 0;
    while (forever) {
    }
    return x;
  }
};

struct Slow {
  static constexpr const char* name = "Slow";
  static void run(const float* x, float* y, size_t count) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    for (size_t i = 0; i < count; ++i) y[i] = x[i];
  }
};

struct Rendezvous {
  static constexpr const char* name = "Rendezvous";
  static void run(const float* x, float* y, size_t count) {
    bool met = false;
    if (count > 0) {
      const std::string name = "/opserve-rendezvous-" + std::to_string(static_cast<long>(x[0]));
      const int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
      if (fd >= 0 && ftruncate(fd, sizeof(long)) == 0) {
        void* memory = mmap(nullptr, sizeof(long), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (memory != MAP_FAILED) {
          long* arrivals = static_cast<long*>(memory);
          __atomic_fetch_add(arrivals, 1, __ATOMIC_SEQ_CST);
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
          while (!(met = __atomic_load_n(arrivals, __ATOMIC_SEQ_CST) >= 2) &&
                 std::chrono::steady_clock::now() < deadline) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
          }
          munmap(memory, sizeof(long));
        }
      }
      if (fd >= 0) close(fd);
    }
    for (size_t i = 0; i < count; ++i) y[i] = met ? 1.0f : 0.0f;
  }
};

struct RuntimeMinor {
  static constexpr const char* name = "RuntimeMinor";
  static float apply(float x) { return x + static_cast<float>(runtime_minor); }
};

const UnaryFloatOp<RuntimeMinor> runtime_minor_op;
const UnaryFloatOp<Rendezvous> rendezvous_op;
const UnaryFloatOp<Slow> slow_op;
const UnaryFloatOp<AddOne> add_one_op;
const UnaryFloatOp<Checked> checked_op;
const UnaryFloatOp<Segfault> segfault_op;
const UnaryFloatOp<Spin> spin_op;
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
#ifdef REQUEST_API_VERSION
  Ort::InitApi(api_base->GetApi(REQUEST_API_VERSION));
#else
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
#endif
  const std::string version = api_base->GetVersionString();  // "1.N.patch"
  runtime_minor = std::atoi(version.substr(version.find('.') + 1).c_str());
  try {
    Ort::CustomOpDomain domain{"my_ops"};
    domain.Add(&add_one_op);
    domain.Add(&checked_op);
    domain.Add(&slow_op);
    domain.Add(&rendezvous_op);
    domain.Add(&segfault_op);
    domain.Add(&spin_op);
    domain.Add(&runtime_minor_op);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
