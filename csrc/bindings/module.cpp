// The one pybind11 file: exposes the torch-free launchers to Python. Pointers arrive as integers
// (tensor.data_ptr()), dtypes as kexue::DType codes, CUDA streams as integers. Every launcher
// releases the GIL; C++ exceptions become Python exceptions (std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kexue/cond_layer_norm.h"
#include "kexue/cpu_dispatch.h"
#include "kexue/ema_update.h"
#include "kexue/langevin.h"
#include "kexue/spectral_norm.h"

namespace py = pybind11;
using kexue::AffineView;
using kexue::DType;
using kexue::ReductionPlan;

namespace {

void* ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

AffineView affine(uintptr_t address, int64_t stride_b, int64_t stride_m) {
  return AffineView{ptr(address), stride_b, stride_m};
}

// The arguments of a multi-tensor EMA launcher: per tensor pair, the dtype codes and data
// pointers of shadow and param and the shared element count.
struct EmaLists {
  std::vector<int32_t> shadow_dtypes, param_dtypes;
  std::vector<uintptr_t> shadows, params;
  std::vector<int64_t> numels;

  void check() const {
    const size_t n = numels.size();
    if (shadow_dtypes.size() != n || param_dtypes.size() != n || shadows.size() != n || params.size() != n)
      kexue::fail("ema_update: the per-tensor lists differ in length");
  }
  void* const* shadow_pointers() const { return reinterpret_cast<void* const*>(shadows.data()); }
  const void* const* param_pointers() const { return reinterpret_cast<const void* const*>(params.data()); }
  int64_t size() const { return static_cast<int64_t>(numels.size()); }
};

// The arguments of the spectral-norm launchers: per matrix, the weight's dtype code and data
// pointer, the u and v pointers, and the matrix size.
struct MatrixLists {
  std::vector<int32_t> weight_dtypes;
  std::vector<uintptr_t> weights, us, vs;
  std::vector<int64_t> rows, cols;

  kexue::MatrixList view() const {
    const size_t n = rows.size();
    if (weight_dtypes.size() != n || weights.size() != n || us.size() != n || vs.size() != n || cols.size() != n)
      kexue::fail("spectral_norm: the per-matrix lists differ in length");
    return kexue::MatrixList{weight_dtypes.data(),
                             reinterpret_cast<const void* const*>(weights.data()),
                             reinterpret_cast<void* const*>(us.data()),
                             reinterpret_cast<void* const*>(vs.data()),
                             rows.data(),
                             cols.data(),
                             static_cast<int64_t>(n)};
  }
};

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
  kexue::active_cpu_isa();  // a bad KEXUE_CPU_ISA fails the import, with its message
  py::class_<EmaLists>(m, "EmaLists")
      .def(py::init<std::vector<int32_t>, std::vector<int32_t>, std::vector<uintptr_t>, std::vector<uintptr_t>,
                    std::vector<int64_t>>(),
           py::arg("shadow_dtypes"), py::arg("param_dtypes"), py::arg("shadows"), py::arg("params"), py::arg("numels"));
  py::class_<MatrixLists>(m, "MatrixLists")
      .def(py::init<std::vector<int32_t>, std::vector<uintptr_t>, std::vector<uintptr_t>, std::vector<uintptr_t>,
                    std::vector<int64_t>, std::vector<int64_t>>(),
           py::arg("weight_dtypes"), py::arg("weights"), py::arg("us"), py::arg("vs"), py::arg("rows"),
           py::arg("cols"));
  m.def("backends", &backends, "Backends this binary was built with.");
  m.def(
      "cpu_isa", [] { return std::string(kexue::cpu_isa_name(kexue::active_cpu_isa())); },
      "The CPU kernels' ISA level in use (kexue/cpu_dispatch.h).");
  m.def(
      "cpu_isas",
      [] {
        std::vector<std::string> names;
        for (kexue::CpuIsa isa : kexue::supported_cpu_isas()) names.emplace_back(kexue::cpu_isa_name(isa));
        return names;
      },
      "The ISA levels this CPU supports, best first.");
  m.def("set_cpu_isa", &kexue::set_cpu_isa, py::arg("name"),
        "Switches the CPU kernels to the ISA level `name` for the whole process.");
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use.");

  m.def("cond_layer_norm_forward_cpu", [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b,
                                          int64_t b_sb, int64_t b_sm, uintptr_t y, int64_t rows,
                                          int64_t rows_per_sample, int64_t D, double eps, bool rms) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(cond_layer_norm_forward_cpu)(static_cast<DType>(dtype), ptr(x), affine(w, w_sb, w_sm),
                                                  affine(b, b_sb, b_sm), ptr(y), rows, rows_per_sample, D, eps, rms);
  });
  m.def("cond_layer_norm_backward_cpu",
        [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t grad_x,
           uintptr_t grad_w, uintptr_t grad_b, int64_t rows, int64_t rows_per_sample, int64_t D, double eps, bool rms,
           int64_t group_rows, int64_t rows_per_block) {
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(cond_layer_norm_backward_cpu)(
              static_cast<DType>(dtype), ptr(grad_out), ptr(x), affine(w, w_sb, w_sm), ptr(grad_x), ptr(grad_w),
              ptr(grad_b), rows, rows_per_sample, D, eps, rms, ReductionPlan{group_rows, rows_per_block});
        });

  m.def("ema_update_cpu", [](EmaLists lists, double decay) {
    lists.check();
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(ema_update_cpu)(lists.shadow_dtypes.data(), lists.param_dtypes.data(), lists.shadow_pointers(),
                                     lists.param_pointers(), lists.numels.data(), lists.size(), decay);
  });

  m.def("spectral_norm_power_iter_cpu", [](int vec_dtype, const MatrixLists& lists, int64_t n_iters, double eps,
                                           uintptr_t sigmas) {
    const kexue::MatrixList mats = lists.view();
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(spectral_norm_power_iter_cpu)(static_cast<DType>(vec_dtype), mats, n_iters, eps, ptr(sigmas));
  });
  m.def("spectral_sigma_cpu", [](int vec_dtype, const MatrixLists& lists, uintptr_t sigmas) {
    const kexue::MatrixList mats = lists.view();
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(spectral_sigma_cpu)(static_cast<DType>(vec_dtype), mats, ptr(sigmas));
  });

  m.def(
      "philox4x32_10",
      [](std::vector<uint32_t> counter, std::vector<uint32_t> key) {
        if (counter.size() != 4 || key.size() != 2) kexue::fail("philox4x32_10: expected 4 counter and 2 key words");
        std::vector<uint32_t> out(4);
        KEXUE_CPU_KERNEL(philox4x32_10_cpu)(counter.data(), key.data(), out.data());
        return out;
      },
      "One Philox4x32-10 block (the known-answer tests).");
  m.def("philox_normal_cpu", [](int dtype, uintptr_t out, int64_t n, uint64_t seed, uint64_t offset) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(philox_normal_cpu)(static_cast<DType>(dtype), ptr(out), n, seed, offset);
  });
  m.def("langevin_step_cpu", [](int dtype, uintptr_t x, uintptr_t grad, int64_t n, double step_size, double noise_std,
                                uint64_t seed, uint64_t offset, double grad_clip, double lo, double hi) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(langevin_step_cpu)(static_cast<DType>(dtype), ptr(x), ptr(grad), n, step_size, noise_std, seed,
                                        offset, grad_clip, lo, hi);
  });

#ifdef KEXUE_WITH_CUDA
  m.def("cond_layer_norm_forward_cuda", [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b,
                                           int64_t b_sb, int64_t b_sm, uintptr_t y, int64_t rows,
                                           int64_t rows_per_sample, int64_t D, double eps, bool rms, uintptr_t stream) {
    py::gil_scoped_release release;
    kexue::cond_layer_norm_forward_cuda(static_cast<DType>(dtype), ptr(x), affine(w, w_sb, w_sm), affine(b, b_sb, b_sm),
                                        ptr(y), rows, rows_per_sample, D, eps, rms, ptr(stream));
  });
  m.def("cond_layer_norm_backward_cuda",
        [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t grad_x,
           uintptr_t grad_w, uintptr_t grad_b, uintptr_t scratch, int64_t rows, int64_t rows_per_sample, int64_t D,
           double eps, bool rms, int64_t group_rows, int64_t rows_per_block, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::cond_layer_norm_backward_cuda(static_cast<DType>(dtype), ptr(grad_out), ptr(x), affine(w, w_sb, w_sm),
                                               ptr(grad_x), ptr(grad_w), ptr(grad_b), ptr(scratch), rows,
                                               rows_per_sample, D, eps, rms, ReductionPlan{group_rows, rows_per_block},
                                               ptr(stream));
        });
  m.def("ema_update_cuda", [](EmaLists lists, double decay, uintptr_t stream) {
    lists.check();
    py::gil_scoped_release release;
    kexue::ema_update_cuda(lists.shadow_dtypes.data(), lists.param_dtypes.data(), lists.shadow_pointers(),
                           lists.param_pointers(), lists.numels.data(), lists.size(), decay, ptr(stream));
  });
  m.def("spectral_norm_power_iter_cuda", [](int vec_dtype, const MatrixLists& lists, int64_t n_iters, double eps,
                                            uintptr_t sigmas, uintptr_t stream) {
    const kexue::MatrixList mats = lists.view();
    py::gil_scoped_release release;
    kexue::spectral_norm_power_iter_cuda(static_cast<DType>(vec_dtype), mats, n_iters, eps, ptr(sigmas), ptr(stream));
  });
  m.def("spectral_sigma_cuda", [](int vec_dtype, const MatrixLists& lists, uintptr_t sigmas, uintptr_t stream) {
    const kexue::MatrixList mats = lists.view();
    py::gil_scoped_release release;
    kexue::spectral_sigma_cuda(static_cast<DType>(vec_dtype), mats, ptr(sigmas), ptr(stream));
  });
  m.def("philox_normal_cuda",
        [](int dtype, uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::philox_normal_cuda(static_cast<DType>(dtype), ptr(out), n, seed, offset, ptr(stream));
        });
  m.def("langevin_step_cuda",
        [](int dtype, uintptr_t x, uintptr_t grad, int64_t n, double step_size, double noise_std, uint64_t seed,
           uint64_t offset, double grad_clip, double lo, double hi, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::langevin_step_cuda(static_cast<DType>(dtype), ptr(x), ptr(grad), n, step_size, noise_std, seed, offset,
                                    grad_clip, lo, hi, ptr(stream));
        });
#endif
}
