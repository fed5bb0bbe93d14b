// A TorchScript custom-op library, built during the test run against the installed torch.
//
// my_ops::custom_modulo(a, b) = fmod(a, b) for FP32 tensors (the op of Triton's QA suite);
// my_ops::add_one(x) = x + ADD_VALUE, a compile-time constant, so that two builds of the same op
// name behave differently. With NEEDS_MISSING_SYMBOL defined, add_one calls a c10 function that no
// libtorch defines: a library built against another libtorch than the server has.
#include <torch/script.h>

#ifndef ADD_VALUE
#define ADD_VALUE 1.0
#endif

#ifdef NEEDS_MISSING_SYMBOL
namespace c10 {
void symbol_from_another_libtorch();
}
#endif

namespace {

torch::Tensor custom_modulo(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::fmod(a, b);
}

torch::Tensor add_one(const torch::Tensor& x) {
#ifdef NEEDS_MISSING_SYMBOL
  c10::symbol_from_another_libtorch();
#endif
  return x + ADD_VALUE;
}

}  // namespace

TORCH_LIBRARY(my_ops, m) {
  m.def("custom_modulo(Tensor a, Tensor b) -> Tensor", custom_modulo);
  m.def("add_one(Tensor x) -> Tensor", add_one);
}
