// Host-only check of the host helpers of kexue/cuda_common.cuh and the dtype dispatch of
// kexue/common.h as the CUDA launchers use them. Built and run by tests/test_cuda_host.py (nvcc,
// no GPU needed). Prints what is wrong; exits 1.
#include "kexue/cuda_common.cuh"

#include <climits>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

template <class T>
int dispatched(kexue::DType dtype) {
  int hits = 0;
  kexue::cuda::dispatch_float_types(dtype, "test",
                                    [&](auto tag) { hits += std::is_same_v<decltype(tag), T> ? 1 : 100; });
  return hits;
}

}  // namespace

int main() {
  using kexue::DType;
  using namespace kexue::cuda;
  expect(ceil_div(0, 4) == 0 && ceil_div(1, 4) == 1 && ceil_div(8, 4) == 2 && ceil_div(9, 4) == 3, "ceil_div");
  expect(ceil_div(int64_t{1} << 46, int64_t{1} << 16) == int64_t{1} << 30, "ceil_div of large sizes");

  alignas(16) char buffer[32];
  expect(aligned16(buffer) && !aligned16(buffer + 8) && is_aligned(buffer + 8, 8) && !is_aligned(buffer + 4, 8),
         "alignment tests");

  expect(grid_size(0) == 1, "a grid has at least one CTA");
  expect(grid_size(7) == 7 && grid_size(7, 3) == 3 && grid_size(7, 100) == 7, "grid_size caps at `cap`");
  expect(grid_size(int64_t{1} << 40) == static_cast<unsigned>(INT_MAX), "grid_size caps at gridDim.x's limit");

  expect(dispatched<float>(DType::Float32) == 1 && dispatched<double>(DType::Float64) == 1 &&
             dispatched<__half>(DType::Float16) == 1 && dispatched<__nv_bfloat16>(DType::BFloat16) == 1,
         "each dtype dispatches to its device type, once");
  try {
    dispatched<float>(static_cast<DType>(9));
    expect(false, "an unknown dtype code throws");
  } catch (const std::invalid_argument& e) {
    expect(std::string(e.what()) == "test: unsupported dtype code 9", "the unknown-code message names the caller");
  }
  expect(kexue::dtype_name(DType::BFloat16) == "bfloat16" &&
             kexue::dtype_name(static_cast<DType>(7)) == "unknown dtype code 7",
         "dtype_name");
  expect(kexue::known_dtype(DType::Float16) && !kexue::known_dtype(static_cast<DType>(4)), "known_dtype");

  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
