// TensorFlow's classic custom op, built during the test run against the installed TensorFlow.
//
// ZeroOut(to_zero: int32) -> zeroed: int32 keeps the first element and zeroes the rest; built with
// KEEP_LAST, the same op name keeps the last element instead (a colliding library).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

using namespace tensorflow;

REGISTER_OP("ZeroOut")
    .Input("to_zero: int32")
    .Output("zeroed: int32")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });

class ZeroOutOp : public OpKernel {
 public:
  explicit ZeroOutOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input_tensor = context->input(0);
    auto input = input_tensor.flat<int32>();
    Tensor* output_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, input_tensor.shape(), &output_tensor));
    auto output = output_tensor->flat<int32>();
    const int n = input.size();
    for (int i = 0; i < n; i++) output(i) = 0;
#ifdef KEEP_LAST
    if (n > 0) output(n - 1) = input(n - 1);
#else
    if (n > 0) output(0) = input(0);
#endif
  }
};

REGISTER_KERNEL_BUILDER(Name("ZeroOut").Device(DEVICE_CPU), ZeroOutOp);
