// Host-side helpers shared by every CUDA launcher: the dtype dispatch, ceil_div, the alignment
// test, grid sizing, and the scratch-memory policy. Errors: kexue/cuda_check.h (included here);
// device number types and exact-rounding arithmetic: kexue/cuda_types.cuh (included here); the
// multi-tensor launch scheme: kexue/cuda_multi_tensor.cuh. Include only from .cu files.
//
// Scratch memory: launchers never allocate device memory. A launcher whose kernels need scratch
// (partial sums of a deterministic reduction) takes a `void* scratch` that the caller allocates
// on the tensors' device with torch (x.new_empty(...)), of the size its header states or its
// `*_scratch_elems_cuda` function returns. Why this policy rather than cudaMallocAsync or a
// buffer cached here: torch's caching allocator hands out memory it already holds (no driver
// call, no synchronisation), frees it in the order of the current stream, counts it in
// torch.cuda.memory_allocated() and honours PYTORCH_CUDA_ALLOC_CONF, and under CUDA graph
// capture it comes from the graph's private pool, so a replay finds it where the kernels were
// recorded to look. A buffer cached in this library would race between streams and go stale under
// a captured graph once it grows; a separate cudaMallocAsync pool is memory torch can neither
// see nor reuse.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kexue/common.h"
#include "kexue/cuda_check.h"
#include "kexue/cuda_types.cuh"

namespace kexue::cuda {

// ceil(a / b) for a >= 0, b > 0.
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// p is a multiple of `bytes` (a power of two): the test for the vector paths of every kernel.
__host__ __device__ inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}
__host__ __device__ inline bool aligned16(const void* p) { return is_aligned(p, 16); }

// kexue::dispatch_dtype with the device's 16-bit types: fn(T{}) for T in float, double, __half,
// __nv_bfloat16.
template <class Fn>
void dispatch_float_types(DType dtype, const char* what, Fn&& fn) {
  dispatch_dtype<__half, __nv_bfloat16>(dtype, what, static_cast<Fn&&>(fn));
}

// Most CTAs of one grid dimension (gridDim.x).
constexpr int64_t kMaxGridX = INT_MAX;

// The grid of a grid-stride kernel that would like `wanted` CTAs: at least one, at most `cap`
// (e.g. resident_ctas) and kMaxGridX; the grid-stride loop covers whatever the grid does not.
inline unsigned grid_size(int64_t wanted, int64_t cap = kMaxGridX) {
  const int64_t limit = cap < kMaxGridX ? cap : kMaxGridX;
  const int64_t ctas = wanted < limit ? wanted : limit;
  return static_cast<unsigned>(ctas > 1 ? ctas : 1);
}

// How many CTAs of `kernel` (`threads` threads, no dynamic shared memory) the current device
// holds at once: SMs x CTAs per SM (at least one per SM).
template <typename Kernel>
int64_t resident_ctas(Kernel kernel, int threads, const char* what) {
  int device = 0;
  int sm_count = 0;
  int ctas_per_sm = 0;
  check_cuda(cudaGetDevice(&device), what);
  check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), what);
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, threads, 0), what);
  return static_cast<int64_t>(sm_count) * (ctas_per_sm > 0 ? ctas_per_sm : 1);
}

}  // namespace kexue::cuda
