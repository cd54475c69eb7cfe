// drift._C: the extension module and the `drift` op library.
//
// This file owns the TORCH_LIBRARY(drift, ...) block and the pybind11 module init. Other files in csrc/
// add ops with TORCH_LIBRARY_FRAGMENT(drift, ...) so each op keeps its schema next to its code
// (drifting_field.cpp: the three passes of the fused CPU drifting field).
#include <torch/extension.h>
#include <ATen/Parallel.h>

TORCH_LIBRARY(drift, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "drift C++ ops (registered under torch.ops.drift)";
  m.def("num_threads", []() { return at::get_num_threads(); }, "intra-op threads used by at::parallel_for");
}
