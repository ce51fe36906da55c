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

#include "kexue/batch_norm.h"
#include "kexue/cond_layer_norm.h"
#include "kexue/cpu_dispatch.h"
#include "kexue/ema_update.h"
#include "kexue/iresnet.h"
#include "kexue/langevin.h"
#include "kexue/self_orthogonality.h"
#include "kexue/spectral_norm.h"
#include "kexue/tensor_table.h"

namespace py = pybind11;
using kexue::AffineView;
using kexue::BatchNormShape;
using kexue::DType;
using kexue::ReductionPlan;
using kexue::TensorTable;

namespace {

void* ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

// The update of batch_norm_update_stats_ from its launcher's arguments: each tensor as (dtype
// code where it has its own, pointer, stride).
kexue::RunningStatsUpdate running_stats_update(int running_dtype, uintptr_t running_mean, int64_t running_mean_stride,
                                               uintptr_t running_var, int64_t running_var_stride, int stats_dtype,
                                               uintptr_t mean, int64_t mean_stride, uintptr_t var, int64_t var_stride,
                                               int64_t C, int64_t count, double momentum) {
  return kexue::RunningStatsUpdate{static_cast<DType>(running_dtype),
                                   ptr(running_mean),
                                   running_mean_stride,
                                   ptr(running_var),
                                   running_var_stride,
                                   static_cast<DType>(stats_dtype),
                                   ptr(mean),
                                   mean_stride,
                                   ptr(var),
                                   var_stride,
                                   C,
                                   count,
                                   momentum};
}

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
  kexue::active_cpu_isa();  // a bad KEXUE_CPU_ISA fails the import, with its message
  py::class_<TensorTable>(m, "TensorTable",
                          "The multi-tensor argument of every Tensor[] launcher (kexue/tensor_table.h): n "
                          "entries of `slots` (data pointer, dtype code) pairs and `sizes_per_entry` sizes, "
                          "flattened entry-major. Built once by kexue_fast/_tables.py.")
      .def(py::init<int, int, std::vector<uintptr_t>, std::vector<int32_t>, std::vector<int64_t>, const std::string&>(),
           py::arg("slots"), py::arg("sizes_per_entry"), py::arg("pointers"), py::arg("dtypes"), py::arg("sizes"),
           py::arg("what"))
      .def("overlapping", &TensorTable::overlapping, py::arg("extents"), py::arg("written"),
           "Whether a tensor of a written slot shares memory with another tensor of the table; "
           "extents[slot]: the entry sizes whose product is the slot's element count.")
      .def_readonly("n", &TensorTable::n)
      .def_readonly("slots", &TensorTable::slots)
      .def_readonly("sizes_per_entry", &TensorTable::sizes_per_entry);
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

  m.def("modulated_batch_norm_forward_cpu",
        [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b, int64_t b_sb, int64_t b_sm,
           uintptr_t mean, uintptr_t var, bool training, int64_t N, int64_t C, int64_t S, double eps, uintptr_t y) {
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(modulated_batch_norm_forward_cpu)(static_cast<DType>(dtype), ptr(x), affine(w, w_sb, w_sm),
                                                             affine(b, b_sb, b_sm), ptr(mean), ptr(var), training,
                                                             BatchNormShape{N, C, S}, eps, ptr(y));
        });
  m.def("modulated_batch_norm_backward_cpu",
        [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t mean,
           uintptr_t var, bool training, int64_t N, int64_t C, int64_t S, double eps, uintptr_t grad_x,
           uintptr_t grad_w, bool w_per_sample, uintptr_t grad_b, bool b_per_sample) {
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(modulated_batch_norm_backward_cpu)(
              static_cast<DType>(dtype), ptr(grad_out), ptr(x), affine(w, w_sb, w_sm), ptr(mean), ptr(var), training,
              BatchNormShape{N, C, S}, eps, ptr(grad_x), ptr(grad_w), w_per_sample, ptr(grad_b), b_per_sample);
        });
  m.def("batch_norm_update_stats_cpu",
        [](int running_dtype, uintptr_t running_mean, int64_t running_mean_stride, uintptr_t running_var,
           int64_t running_var_stride, int stats_dtype, uintptr_t mean, int64_t mean_stride, uintptr_t var,
           int64_t var_stride, int64_t C, int64_t count, double momentum) {
          const auto update =
              running_stats_update(running_dtype, running_mean, running_mean_stride, running_var, running_var_stride,
                                   stats_dtype, mean, mean_stride, var, var_stride, C, count, momentum);
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(batch_norm_update_stats_cpu)(update);
        });
  m.def("ema_update_cpu", [](const TensorTable& table, double decay) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(ema_update_cpu)(table, decay);
  });

  m.def("self_orthogonality_tanh_cpu",
        [](int dtype, uintptr_t y, uintptr_t t, uintptr_t sumsq, int64_t b, int64_t k, double gamma, bool t_given) {
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(self_orthogonality_tanh_cpu)(static_cast<DType>(dtype), ptr(y), ptr(t), ptr(sumsq), b, k,
                                                        gamma, t_given);
        });

  m.def("spectral_norm_power_iter_cpu", [](int vec_dtype, const TensorTable& mats, int64_t n_iters, double eps,
                                           uintptr_t sigmas) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(spectral_norm_power_iter_cpu)(static_cast<DType>(vec_dtype), mats, n_iters, eps, ptr(sigmas));
  });
  m.def("spectral_sigma_cpu", [](int vec_dtype, const TensorTable& mats, uintptr_t sigmas) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(spectral_sigma_cpu)(static_cast<DType>(vec_dtype), mats, ptr(sigmas));
  });

  m.def("iresnet_inverse_cpu", [](int dtype, const TensorTable& layers, int activation, uintptr_t y, int64_t B,
                                  int64_t max_iter, double atol, double rtol, uintptr_t x, uintptr_t n_iter) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(iresnet_inverse_cpu)(static_cast<DType>(dtype), layers, static_cast<kexue::Activation>(activation),
                                          ptr(y), B, kexue::FixedPointStop{max_iter, atol, rtol}, ptr(x),
                                          static_cast<int32_t*>(ptr(n_iter)));
  });
  m.def("iresnet_inverse_backward_cpu", [](int dtype, const TensorTable& layers, int activation, uintptr_t x,
                                           uintptr_t grad_x, int64_t B, int64_t max_iter, double atol, double rtol,
                                           uintptr_t a, uintptr_t workspace) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(iresnet_inverse_backward_cpu)(static_cast<DType>(dtype), layers,
                                                   static_cast<kexue::Activation>(activation), ptr(x), ptr(grad_x), B,
                                                   kexue::FixedPointStop{max_iter, atol, rtol}, ptr(a), ptr(workspace));
  });

  m.def("iresnet_logdet_cpu", [](int dtype, const TensorTable& layers, int activation, uintptr_t x, int64_t B,
                                 uintptr_t probes, int64_t S, uintptr_t coefficients, int64_t T, uintptr_t gx,
                                 uintptr_t logdet, uintptr_t saved) {
    py::gil_scoped_release release;
    KEXUE_CPU_KERNEL(iresnet_logdet_cpu)(static_cast<DType>(dtype), layers, static_cast<kexue::Activation>(activation),
                                         ptr(x), B, ptr(probes), S, static_cast<const double*>(ptr(coefficients)), T,
                                         ptr(gx), ptr(logdet), ptr(saved));
  });

  m.def("iresnet_logdet_backward_cpu",
        [](int dtype, const TensorTable& layers, int activation, uintptr_t x, int64_t B, int64_t first_row,
           int64_t n_rows, uintptr_t probes, int64_t S, uintptr_t grad_gx, uintptr_t grad_logdet, uintptr_t saved,
           uintptr_t grad_x, uintptr_t workspace) {
          py::gil_scoped_release release;
          KEXUE_CPU_KERNEL(iresnet_logdet_backward_cpu)(
              static_cast<DType>(dtype), layers, static_cast<kexue::Activation>(activation), ptr(x), B, first_row,
              n_rows, ptr(probes), S, ptr(grad_gx), ptr(grad_logdet), ptr(saved), ptr(grad_x), ptr(workspace));
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
  m.def("modulated_batch_norm_forward_cuda",
        [](int dtype, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t b, int64_t b_sb, int64_t b_sm,
           uintptr_t mean, uintptr_t var, bool training, int64_t N, int64_t C, int64_t S, double eps, uintptr_t y,
           uintptr_t scratch, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::modulated_batch_norm_forward_cuda(static_cast<DType>(dtype), ptr(x), affine(w, w_sb, w_sm),
                                                   affine(b, b_sb, b_sm), ptr(mean), ptr(var), training,
                                                   BatchNormShape{N, C, S}, eps, ptr(y), ptr(scratch), ptr(stream));
        });
  m.def(
      "modulated_batch_norm_backward_cuda",
      [](int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t w, int64_t w_sb, int64_t w_sm, uintptr_t mean,
         uintptr_t var, bool training, int64_t N, int64_t C, int64_t S, double eps, uintptr_t grad_x, uintptr_t grad_w,
         bool w_per_sample, uintptr_t grad_b, bool b_per_sample, uintptr_t scratch, uintptr_t stream) {
        py::gil_scoped_release release;
        kexue::modulated_batch_norm_backward_cuda(static_cast<DType>(dtype), ptr(grad_out), ptr(x),
                                                  affine(w, w_sb, w_sm), ptr(mean), ptr(var), training,
                                                  BatchNormShape{N, C, S}, eps, ptr(grad_x), ptr(grad_w), w_per_sample,
                                                  ptr(grad_b), b_per_sample, ptr(scratch), ptr(stream));
      });
  m.def("batch_norm_update_stats_cuda",
        [](int running_dtype, uintptr_t running_mean, int64_t running_mean_stride, uintptr_t running_var,
           int64_t running_var_stride, int stats_dtype, uintptr_t mean, int64_t mean_stride, uintptr_t var,
           int64_t var_stride, int64_t C, int64_t count, double momentum, uintptr_t stream) {
          const auto update =
              running_stats_update(running_dtype, running_mean, running_mean_stride, running_var, running_var_stride,
                                   stats_dtype, mean, mean_stride, var, var_stride, C, count, momentum);
          py::gil_scoped_release release;
          kexue::batch_norm_update_stats_cuda(update, ptr(stream));
        });
  m.def("ema_update_cuda", [](const TensorTable& table, double decay, uintptr_t stream) {
    py::gil_scoped_release release;
    kexue::ema_update_cuda(table, decay, ptr(stream));
  });
  m.def("spectral_norm_scratch_elems_cuda", &kexue::spectral_norm_scratch_elems_cuda, py::arg("mats"),
        "Elements of the vector dtype the spectral-norm CUDA launchers need as scratch for this table.");
  m.def("spectral_norm_power_iter_cuda",
        [](int vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, uintptr_t sigmas, uintptr_t scratch,
           int64_t scratch_elems, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::spectral_norm_power_iter_cuda(static_cast<DType>(vec_dtype), mats, n_iters, eps, ptr(sigmas),
                                               ptr(scratch), scratch_elems, ptr(stream));
        });
  m.def("spectral_sigma_cuda", [](int vec_dtype, const TensorTable& mats, uintptr_t sigmas, uintptr_t scratch,
                                  int64_t scratch_elems, uintptr_t stream) {
    py::gil_scoped_release release;
    kexue::spectral_sigma_cuda(static_cast<DType>(vec_dtype), mats, ptr(sigmas), ptr(scratch), scratch_elems,
                               ptr(stream));
  });
  m.def("iresnet_scratch_elems_cuda", &kexue::iresnet_scratch_elems_cuda, py::arg("layers"), py::arg("B"),
        "Elements of the dtype the i-ResNet CUDA launchers need as scratch for these layers and B rows.");
  m.def("iresnet_inverse_cuda",
        [](int dtype, const TensorTable& layers, int activation, uintptr_t y, int64_t B, int64_t max_iter, double atol,
           double rtol, uintptr_t x, uintptr_t n_iter, uintptr_t scratch, int64_t scratch_elems, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::iresnet_inverse_cuda(static_cast<DType>(dtype), layers, static_cast<kexue::Activation>(activation),
                                      ptr(y), B, kexue::FixedPointStop{max_iter, atol, rtol}, ptr(x),
                                      static_cast<int32_t*>(ptr(n_iter)), ptr(scratch), scratch_elems, ptr(stream));
        });
  m.def("iresnet_adjoint_cuda",
        [](int dtype, const TensorTable& adjoint_layers, uintptr_t grad_x, int64_t B, int64_t max_iter, double atol,
           double rtol, uintptr_t a, uintptr_t n_iter, uintptr_t scratch, int64_t scratch_elems, uintptr_t stream) {
          py::gil_scoped_release release;
          kexue::iresnet_adjoint_cuda(static_cast<DType>(dtype), adjoint_layers, ptr(grad_x), B,
                                      kexue::FixedPointStop{max_iter, atol, rtol}, ptr(a),
                                      static_cast<int32_t*>(ptr(n_iter)), ptr(scratch), scratch_elems, ptr(stream));
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
