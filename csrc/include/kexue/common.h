// Torch-free basics shared by every kernel: dtype codes, 16-bit float conversions, errors.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kexue {

// Dtype codes; the Python side maps torch dtypes onto these (kexue_fast/_native.py).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Bytes per element of a dtype.
constexpr int64_t element_size(DType dtype) { return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2; }

// A tensor of per-row affine parameters (LayerNorm gain or bias) seen by a kernel that walks
// rows r = b * rows_per_sample + m: the row's parameters start at
// ptr + b * stride_b + m * stride_m (element strides, unit stride along the feature dim).
// ptr == nullptr means "absent" (gain 1, bias 0).
struct AffineView {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_m = 0;
};

// How a weight/bias gradient is reduced without float atomics: rows are split into groups of
// `group_rows` consecutive rows that share one parameter row, each group into blocks of at most
// `rows_per_block` rows. Each block writes a partial sum; partials are added in block order.
struct ReductionPlan {
  int64_t group_rows = 1;
  int64_t rows_per_block = 1;
};

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument(what); }

}  // namespace kexue
