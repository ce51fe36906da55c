// The one pybind11 file: exposes the torch-free launchers to Python. Pointers arrive as integers
// (tensor.data_ptr()), dtypes as kexue::DType codes, CUDA streams as integers. Every launcher
// releases the GIL; C++ exceptions become Python exceptions (std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kexue/cond_layer_norm.h"

namespace py = pybind11;
using kexue::AffineView;
using kexue::DType;
using kexue::ReductionPlan;

namespace {

void* ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

AffineView affine(uintptr_t address, int64_t stride_b, int64_t stride_m) {
  return AffineView{ptr(address), stride_b, stride_m};
}

std::vector<std::string> backends() {
  std::vector<std::string> names{"cpu"};
#ifdef KEXUE_WITH_CUDA
  names.push_back("cuda");
#endif
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kexue_fast native kernels (torch-free)";
  m.def("backends", &backends, "Backends this binary was built with.");
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use.");

  m.def(
      "cond_layer_norm_forward_cpu",
      [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b,
         int64_t b_sb, int64_t b_sm, uintptr_t y, int64_t rows, int64_t rows_per_sample,
         int64_t D, double eps, bool rms) {
        py::gil_scoped_release release;
        kexue::cond_layer_norm_forward_cpu(static_cast<DType>(dtype), ptr(x),
                                           affine(w, w_sb, w_sm), affine(b, b_sb, b_sm), ptr(y),
                                           rows, rows_per_sample, D, eps, rms);
      });
  m.def(
      "cond_layer_norm_backward_cpu",
      [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm,
         uintptr_t grad_x, uintptr_t grad_w, uintptr_t grad_b, int64_t rows,
         int64_t rows_per_sample, int64_t D, double eps, bool rms, int64_t group_rows,
         int64_t rows_per_block) {
        py::gil_scoped_release release;
        kexue::cond_layer_norm_backward_cpu(
            static_cast<DType>(dtype), ptr(grad_out), ptr(x), affine(w, w_sb, w_sm), ptr(grad_x),
            ptr(grad_w), ptr(grad_b), rows, rows_per_sample, D, eps, rms,
            ReductionPlan{group_rows, rows_per_block});
      });

#ifdef KEXUE_WITH_CUDA
  m.def(
      "cond_layer_norm_forward_cuda",
      [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b,
         int64_t b_sb, int64_t b_sm, uintptr_t y, int64_t rows, int64_t rows_per_sample,
         int64_t D, double eps, bool rms, uintptr_t stream) {
        py::gil_scoped_release release;
        kexue::cond_layer_norm_forward_cuda(static_cast<DType>(dtype), ptr(x),
                                            affine(w, w_sb, w_sm), affine(b, b_sb, b_sm), ptr(y),
                                            rows, rows_per_sample, D, eps, rms, ptr(stream));
      });
  m.def(
      "cond_layer_norm_backward_cuda",
      [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm,
         uintptr_t grad_x, uintptr_t grad_w, uintptr_t grad_b, uintptr_t scratch, int64_t rows,
         int64_t rows_per_sample, int64_t D, double eps, bool rms, int64_t group_rows,
         int64_t rows_per_block, uintptr_t stream) {
        py::gil_scoped_release release;
        kexue::cond_layer_norm_backward_cuda(
            static_cast<DType>(dtype), ptr(grad_out), ptr(x), affine(w, w_sb, w_sm), ptr(grad_x),
            ptr(grad_w), ptr(grad_b), ptr(scratch), rows, rows_per_sample, D, eps, rms,
            ReductionPlan{group_rows, rows_per_block}, ptr(stream));
      });
#endif
}
