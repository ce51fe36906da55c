// Torch-free basics shared by every kernel: dtype codes, 16-bit float conversions, errors.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kexue {

// Dtype codes; the Python side maps torch dtypes onto these (kexue_fast/_native.py).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// `dtype` is one of the codes above (a raw code from Python may be anything).
constexpr bool known_dtype(DType dtype) {
  return dtype == DType::Float32 || dtype == DType::Float64 || dtype == DType::Float16 || dtype == DType::BFloat16;
}

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

// The torch name of a dtype ("float32", ...), for error messages; codes outside DType are named as such.
inline std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown dtype code " + std::to_string(static_cast<int>(dtype));
}

// The one dtype dispatch: calls fn(T{}) with T the C++ type that stores `dtype` on a backend
// whose 16-bit types are F16 and BF16 (float and double are the same everywhere); throws
// std::invalid_argument naming `what` for a code outside DType (the CUDA kernels use it with
// __half / __nv_bfloat16: cuda_common.cuh).
template <class F16, class BF16, class Fn>
void dispatch_dtype(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float64: fn(double{}); return;
    case DType::Float16: fn(F16{}); return;
    case DType::BFloat16: fn(BF16{}); return;
  }
  fail(std::string(what) + ": unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace kexue
