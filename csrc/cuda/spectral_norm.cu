// Batched spectral-norm power iteration on CUDA (docs/spectral_norm.md; contract in kexue/spectral_norm.h).
//
// Math, for every matrix W (rows × cols, row-major) with vectors u (rows) and v (cols), in the
// arithmetic type Acc (float, or double when vec_dtype is Float64), one round is
//
//   y = W v;   u ← y / max(‖y‖, eps);   t = Wᵀ u;   v ← t / max(‖t‖, eps)
//
// (the order of torch.nn.utils.parametrizations.spectral_norm's power method), and after the last
// round sigma = uᵀWv = t·v = ‖t‖² / max(‖t‖, eps). With n_iters = 0 (and in spectral_sigma)
// sigma = Σ_r u[r] (W v)[r] is computed directly. Matrices with rows or cols of 0 get sigma 0
// and their vectors are not touched.
//
// Kernel design
// ---------------------------------------------------------------------------------------------
// The per-launch metadata of many matrices travels BY VALUE as the kernels' only struct argument
// (struct Batch, < 4 KB), the multi_tensor_apply pattern this project already uses in
// ema_update.cu (learnt there from NVIDIA/apex csrc/multi_tensor_apply.cuh; written anew here).
// Matrices are grouped by weight dtype; each group is cut into batches of up to kMaxSlots
// matrices. Every launch covers all the matrices of one batch; a CTA finds its matrix by a binary
// search over the per-slot first-CTA indices (the search is uniform over the CTA). Per round
// and batch there are three launches:
//
//  (A) matvec_kernel, CTAs over (matrix, block of kRowsPerCta = 32 rows). Each warp owns
//      kRowsPerWarp = 4 consecutive rows: its lanes stride over the columns in vectors of
//      VEC = 16 / sizeof(W) elements (one 16-byte load of W per row, the matching VEC elements of
//      v loaded once and reused for the 4 rows), then a shuffle butterfly reduces each row's dot
//      product. Lane 0 writes y[r] into u (raw, not yet normalized) and the CTA writes ONE
//      partial sum of squares of its rows (warps in order) to scratch: partial_a[cta].
//  (C) rmatvec_kernel, CTAs over (matrix, block of kColVecs · VEC = 8 · VEC columns = 128 bytes
//      of a row). Thread (cx, ry), cx < 8, ry < 32, accumulates the VEC columns of vector cx
//      down rows ry, ry + 32, ... (a warp reads 4 rows × 128 contiguous bytes: coalesced),
//      kRowUnroll rows loaded before they are used, times u[r] / max(‖y‖, eps), where ‖y‖² is
//      the matrix's partial_a summed in block order by thread 0. The 32 row-group partials of each column are then added in ry order through shared
//      memory; t is written into v (raw) and the CTA writes the sum of squares of its columns
//      (in column order) to partial_c[cta].
//  (D) finish_kernel, one CTA per matrix: sums the matrix's partials in order, normalizes u and v
//      in place (the same divisions (C) used for u), and after the last round writes
//      sigma = ‖t‖² / max(‖t‖, eps). In the direct mode (n_iters = 0, spectral_sigma) (A) runs
//      with u read instead of written, its partials being Σ u[r] y[r] over the block, and (D)
//      only adds them up.
//
// The (A)/(C) split (warp-per-row dot products for W v, column-parallel threads walking down the
// rows for Wᵀu) is the usual GEMV layout for row-major storage; written here from scratch.
// Determinism: no atomics; every sum (lanes by a fixed butterfly, warps, CTAs, row groups,
// columns) runs in an order fixed by the launch configuration alone.
// Scratch: partial_a / partial_c (one Acc per CTA of (A) and (C)) come from cudaMallocAsync on the
// stream and go back with cudaFreeAsync (stream-ordered), also when a launch throws.
// Vector loads: a matrix takes the 16-byte path when W and v are 16-byte aligned and cols is a
// multiple of VEC (then every row and every vector is aligned); otherwise the same loops load
// element by element (uniform per matrix, decided on the host).
// Launch failures (no GPU, bad stream) surface as std::runtime_error (check_cuda/check_launch);
// nothing touches the device before the first CUDA call of a launcher.
#include "kexue/spectral_norm.h"
#include "kexue/cuda_check.h"
#include "kexue/cuda_types.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kexue {
namespace {

constexpr int kThreads = 256;  // CTA size of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;                     // (A)
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;  // (A): 32
constexpr int kColVecs = 8;                         // (C): column vectors per CTA
constexpr int kRowGroups = kThreads / kColVecs;     // (C): 32
constexpr int kRowUnroll = 4;                       // (C): rows loaded before they are accumulated
constexpr int kMaxSlots = 70;                       // matrices per launch
constexpr int64_t kMaxCtas = int64_t{1} << 30;      // CTAs of one grid (fits grid.x and int32)

// One matrix of a batch.
struct Slot {
  const void* w;  // rows × cols of W (weight dtype)
  void* u;        // rows of Acc
  void* v;        // cols of Acc
  int64_t rows;
  int64_t cols;
  int32_t a_begin;      // first CTA of this matrix in the (A) grid (and its first partial_a)
  int32_t c_begin;      // first CTA of this matrix in the (C) grid (and its first partial_c)
  int32_t sigma_index;  // index into sigmas
  int32_t aligned;      // 1: the 16-byte vector path is valid
};

// The per-launch metadata, passed by value.
struct Batch {
  void* sigmas;     // n of Acc
  void* partial_a;  // a_ctas of Acc
  void* partial_c;  // c_ctas of Acc
  double eps;
  int32_t n_slots;
  int32_t write_sigma;  // (D): 1 in the last round (or the direct mode)
  Slot slots[kMaxSlots];
};
static_assert(sizeof(Batch) < 4096, "kernel parameters must stay under 4 KB");

using cuda::to_acc;

template <typename W>
struct Vec {
  static constexpr int value = 16 / static_cast<int>(sizeof(W));  // elements per 16 bytes of W
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CTAs (= partials) of one matrix in (A) and (C); 0 for an empty matrix.
__host__ __device__ inline int64_t row_blocks(int64_t rows, int64_t cols) {
  return rows > 0 && cols > 0 ? ceil_div(rows, kRowsPerCta) : 0;
}
__host__ __device__ inline int64_t col_blocks(int64_t rows, int64_t cols, int vec) {
  return rows > 0 && cols > 0 ? ceil_div(cols, static_cast<int64_t>(kColVecs) * vec) : 0;
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <int kBytes>
struct RawWord;
template <>
struct RawWord<16> {
  using type = uint4;
};
template <>
struct RawWord<8> {
  using type = uint2;
};

// N consecutive T's from an address aligned to min(16, N·sizeof T), as 16- or 8-byte words.
template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kWord = kBytes < 16 ? kBytes : 16;
  using Word = typename RawWord<kWord>::type;
  static_assert(kBytes % kWord == 0, "whole words only");
  Word words[kBytes / kWord];
#pragma unroll
  for (int i = 0; i < kBytes / kWord; ++i) words[i] = reinterpret_cast<const Word*>(p)[i];
  memcpy(out, words, kBytes);
}

// out[e] = p[e] as Acc for e < N: one vector load when `vec` (then valid ≥ N), else element by
// element, elements e ≥ valid read as 0.
template <typename Acc, typename T, int N>
__device__ __forceinline__ void load_acc(const T* p, bool vec, int64_t valid, Acc (&out)[N]) {
  if (vec) {
    T raw[N];
    load_raw<T, N>(p, raw);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = static_cast<Acc>(to_acc(raw[e]));
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = e < valid ? static_cast<Acc>(to_acc(p[e])) : Acc(0);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {  // fixed butterfly; lane 0's value is used
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc sum_in_order(const Acc* p, int64_t n) {
  Acc total = Acc(0);
  for (int64_t i = 0; i < n; ++i) total += p[i];
  return total;
}

// max(sqrt(sum_sq), eps), NaN propagating like torch's clamp_min.
template <typename Acc>
__device__ __forceinline__ Acc norm_denominator(Acc sum_sq, Acc eps) {
  const Acc norm = sqrt(sum_sq);
  return norm < eps ? eps : norm;
}

// The slot whose CTA range holds CTA `cta` of grid (A) (kGridA) or (C): the largest s with
// begin[s] <= cta (empty matrices share their begin with the next one, so they are never found).
template <bool kGridA>
__device__ __forceinline__ int find_slot(const Batch& b, int32_t cta) {
  int lo = 0;
  int hi = b.n_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    const int32_t begin = kGridA ? b.slots[mid].a_begin : b.slots[mid].c_begin;
    if (begin <= cta)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// (A) y = W v over (matrix, 32-row block). kDirect: partial = Σ u[r] y[r] (u read);
// otherwise u[r] = y[r] and partial = Σ y[r]².
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc, bool kDirect>
__global__ void __launch_bounds__(kThreads) matvec_kernel(const Batch b) {
  constexpr int VEC = Vec<W>::value;
  const int32_t cta = static_cast<int32_t>(blockIdx.x);
  const Slot s = b.slots[find_slot<true>(b, cta)];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int64_t row0 = static_cast<int64_t>(cta - s.a_begin) * kRowsPerCta + static_cast<int64_t>(warp) * kRowsPerWarp;
  Acc* const u = static_cast<Acc*>(s.u);

  Acc acc[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = Acc(0);

  if (row0 < rows) {  // warp-uniform
    const W* const w = static_cast<const W*>(s.w);
    const Acc* const v = static_cast<const Acc*>(s.v);
    const bool vec = s.aligned != 0;
    const W* wrow[kRowsPerWarp];  // rows past the end re-read the last row; results dropped
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t r = row0 + i < rows ? row0 + i : rows - 1;
      wrow[i] = w + r * cols;
    }
    const int64_t n_vec = ceil_div(cols, VEC);
#pragma unroll 2
    for (int64_t k = lane; k < n_vec; k += 32) {
      const int64_t c0 = k * VEC;
      const int64_t valid = cols - c0;
      Acc x[VEC];
      load_acc<Acc, Acc, VEC>(v + c0, vec, valid, x);
      Acc a[kRowsPerWarp][VEC];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) load_acc<Acc, W, VEC>(wrow[i] + c0, vec, valid, a[i]);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i] = fma_rn(a[i][e], x[e], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = warp_sum(acc[i]);

  __shared__ Acc warp_partial[kWarps];
  if (lane == 0) {
    Acc part = Acc(0);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t r = row0 + i;
      if (r < rows) {
        if (kDirect) {
          part = fma_rn(u[r], acc[i], part);
        } else {
          u[r] = acc[i];
          part = fma_rn(acc[i], acc[i], part);
        }
      }
    }
    warp_partial[warp] = part;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = Acc(0);
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += warp_partial[i];
    static_cast<Acc*>(b.partial_a)[cta] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// (C) t = Wᵀ (u / max(‖u‖, eps)) over (matrix, block of 8·VEC columns); t written into v,
// partial = Σ t[c]² over the block.
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc>
__global__ void __launch_bounds__(kThreads) rmatvec_kernel(const Batch b) {
  constexpr int VEC = Vec<W>::value;
  constexpr int kCols = kColVecs * VEC;
  const int32_t cta = static_cast<int32_t>(blockIdx.x);
  const Slot s = b.slots[find_slot<false>(b, cta)];
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int tid = static_cast<int>(threadIdx.x);

  __shared__ Acc u_denominator;
  __shared__ Acc row_group_sums[kRowGroups][kCols];
  __shared__ Acc squares[kCols];
  if (tid == 0) {
    const Acc* const pa = static_cast<const Acc*>(b.partial_a) + s.a_begin;
    u_denominator = norm_denominator(sum_in_order(pa, row_blocks(rows, cols)), static_cast<Acc>(b.eps));
  }
  __syncthreads();
  const Acc denom = u_denominator;

  const int cx = tid % kColVecs;
  const int ry = tid / kColVecs;
  const int64_t col_base = static_cast<int64_t>(cta - s.c_begin) * kCols;
  const int64_t c0 = col_base + static_cast<int64_t>(cx) * VEC;
  const int64_t valid = cols - c0;
  Acc acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = Acc(0);
  if (valid > 0) {
    const W* const w = static_cast<const W*>(s.w) + c0;
    const Acc* const u = static_cast<const Acc*>(s.u);
    const bool vec = s.aligned != 0;
    for (int64_t r0 = ry; r0 < rows; r0 += static_cast<int64_t>(kRowGroups) * kRowUnroll) {
      Acc ur[kRowUnroll];
      Acc a[kRowUnroll][VEC];
      // All loads first; rows past the end re-read the last row (their terms are skipped).
#pragma unroll
      for (int j = 0; j < kRowUnroll; ++j) {
        const int64_t r = r0 + static_cast<int64_t>(j) * kRowGroups;
        const int64_t rc = r < rows ? r : rows - 1;
        ur[j] = u[rc];
        load_acc<Acc, W, VEC>(w + rc * cols, vec, valid, a[j]);
      }
#pragma unroll
      for (int j = 0; j < kRowUnroll; ++j) {
        if (r0 + static_cast<int64_t>(j) * kRowGroups < rows) {  // rows in increasing order
          const Acc un = ur[j] / denom;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] = fma_rn(a[j][e], un, acc[e]);
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) row_group_sums[ry][cx * VEC + e] = acc[e];
  __syncthreads();
  if (tid < kCols) {
    Acc t = Acc(0);
#pragma unroll 8
    for (int g = 0; g < kRowGroups; ++g) t += row_group_sums[g][tid];
    const int64_t col = col_base + tid;
    Acc sq = Acc(0);
    if (col < cols) {
      static_cast<Acc*>(s.v)[col] = t;
      sq = t * t;
    }
    squares[tid] = sq;
  }
  __syncthreads();
  if (tid == 0) {
    Acc total = Acc(0);
#pragma unroll 8
    for (int j = 0; j < kCols; ++j) total += squares[j];
    static_cast<Acc*>(b.partial_c)[cta] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// (D) one CTA per matrix: direct mode: sigma = Σ partial_a; round mode: normalize u and v in
// place, sigma = ‖t‖² / max(‖t‖, eps) when write_sigma.
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc, bool kDirect>
__global__ void __launch_bounds__(kThreads) finish_kernel(const Batch b) {
  const Slot s = b.slots[blockIdx.x];
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int tid = static_cast<int>(threadIdx.x);
  Acc* const sigma = static_cast<Acc*>(b.sigmas) + s.sigma_index;
  if (rows == 0 || cols == 0) {  // uniform over the CTA
    if (tid == 0 && b.write_sigma) *sigma = Acc(0);
    return;
  }
  const Acc* const pa = static_cast<const Acc*>(b.partial_a) + s.a_begin;
  if (kDirect) {
    if (tid == 0 && b.write_sigma) *sigma = sum_in_order(pa, row_blocks(rows, cols));
    return;
  }
  __shared__ Acc u_denominator;
  __shared__ Acc v_denominator;
  __shared__ Acc t_sum_sq;
  if (tid == 0) {
    const Acc eps = static_cast<Acc>(b.eps);
    const Acc* const pc = static_cast<const Acc*>(b.partial_c) + s.c_begin;
    u_denominator = norm_denominator(sum_in_order(pa, row_blocks(rows, cols)), eps);
    const Acc tt = sum_in_order(pc, col_blocks(rows, cols, Vec<W>::value));
    t_sum_sq = tt;
    v_denominator = norm_denominator(tt, eps);
  }
  __syncthreads();
  const Acc du = u_denominator;
  const Acc dv = v_denominator;
  Acc* const u = static_cast<Acc*>(s.u);
  Acc* const v = static_cast<Acc*>(s.v);
  for (int64_t r = tid; r < rows; r += kThreads) u[r] = u[r] / du;
  for (int64_t c = tid; c < cols; c += kThreads) v[c] = v[c] / dv;
  if (tid == 0 && b.write_sigma) *sigma = t_sum_sq / dv;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
constexpr int32_t kCodeF32 = static_cast<int32_t>(DType::Float32);
constexpr int32_t kCodeF64 = static_cast<int32_t>(DType::Float64);
constexpr int32_t kCodeF16 = static_cast<int32_t>(DType::Float16);
constexpr int32_t kCodeBF16 = static_cast<int32_t>(DType::BFloat16);

std::string dtype_name(int32_t code) {
  switch (code) {
    case kCodeF32: return "float32";
    case kCodeF64: return "float64";
    case kCodeF16: return "float16";
    case kCodeBF16: return "bfloat16";
    default: return "unknown dtype code " + std::to_string(code);
  }
}

int weight_bytes(int32_t code) { return static_cast<int>(element_size(static_cast<DType>(code))); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & uintptr_t{15}) == 0; }

// One planned launch batch: its metadata (scratch pointers filled in later), its weight dtype
// and its grid sizes.
struct PlannedBatch {
  Batch batch;
  int32_t weight_code;
  int64_t a_ctas;
  int64_t c_ctas;
};

// Returns the scratch to the stream's pool when the launcher leaves, normally or by a throw.
struct ScratchGuard {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ScratchGuard() = default;
  ScratchGuard(const ScratchGuard&) = delete;
  ScratchGuard& operator=(const ScratchGuard&) = delete;
  ~ScratchGuard() {
    if (ptr != nullptr && cudaFreeAsync(ptr, stream) != cudaSuccess) cudaGetLastError();
  }
};

// All rounds of one batch. n_iters == 0: the direct sigma.
template <typename W, typename Acc>
void run_batch(PlannedBatch& pb, int64_t n_iters, cudaStream_t stream, const char* who) {
  Batch& b = pb.batch;
  const unsigned a_grid = static_cast<unsigned>(pb.a_ctas);
  const unsigned c_grid = static_cast<unsigned>(pb.c_ctas);
  const unsigned d_grid = static_cast<unsigned>(b.n_slots);
  if (n_iters == 0) {
    if (a_grid > 0) {
      matvec_kernel<W, Acc, true><<<a_grid, kThreads, 0, stream>>>(b);
      check_launch(who);
    }
    b.write_sigma = 1;
    finish_kernel<W, Acc, true><<<d_grid, kThreads, 0, stream>>>(b);
    check_launch(who);
    return;
  }
  for (int64_t it = 0; it < n_iters; ++it) {
    const bool last = it + 1 == n_iters;
    if (a_grid == 0 && !last) continue;  // only empty matrices: just the sigmas, once
    if (a_grid > 0) {
      matvec_kernel<W, Acc, false><<<a_grid, kThreads, 0, stream>>>(b);
      check_launch(who);
      rmatvec_kernel<W, Acc><<<c_grid, kThreads, 0, stream>>>(b);
      check_launch(who);
    }
    b.write_sigma = last ? 1 : 0;
    finish_kernel<W, Acc, false><<<d_grid, kThreads, 0, stream>>>(b);
    check_launch(who);
  }
}

void run(const char* who, DType vec_dtype, const MatrixList& mats, int64_t n_iters, double eps, void* sigmas,
         void* stream) {
  const std::string name = who;
  const int64_t n = mats.n;
  const int32_t vec_code = static_cast<int32_t>(vec_dtype);
  if (vec_code != kCodeF32 && vec_code != kCodeF64)
    fail(name + ": vec_dtype must be float32 or float64, got " + dtype_name(vec_code));
  if (n < 0) fail(name + ": n must be >= 0, got " + std::to_string(n));
  if (n_iters < 0) fail(name + ": n_iters must be >= 0, got " + std::to_string(n_iters));
  if (n == 0) return;
  if (n > INT32_MAX) fail(name + ": at most 2^31 - 1 matrices, got " + std::to_string(n));
  if (mats.weight_dtypes == nullptr || mats.weights == nullptr || mats.us == nullptr || mats.vs == nullptr ||
      mats.rows == nullptr || mats.cols == nullptr)
    fail(name + ": null metadata array with n = " + std::to_string(n));
  if (sigmas == nullptr) fail(name + ": null sigmas with n = " + std::to_string(n));

  // Every matrix is checked before anything is launched.
  const auto at = [&name](int64_t i) { return name + ": matrix " + std::to_string(i); };
  unsigned codes_present = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t code = mats.weight_dtypes[i];
    if (code != kCodeF32 && code != kCodeF64 && code != kCodeF16 && code != kCodeBF16)
      fail(at(i) + ": unsupported weight dtype (" + dtype_name(code) +
           "); supported: float32, float64, float16, bfloat16");
    if (vec_code == kCodeF64 && code != kCodeF64)
      fail(at(i) + ": weight dtype " + dtype_name(code) +
           " with float64 vectors; float64 vectors need float64 weights");
    const int64_t rows = mats.rows[i];
    const int64_t cols = mats.cols[i];
    if (rows < 0 || cols < 0) fail(at(i) + ": negative shape " + std::to_string(rows) + " x " + std::to_string(cols));
    if (rows > 0 && cols > 0) {
      if (mats.weights[i] == nullptr || mats.us[i] == nullptr || mats.vs[i] == nullptr)
        fail(at(i) + ": null weight or vector pointer");
      if (row_blocks(rows, cols) > kMaxCtas || col_blocks(rows, cols, 16 / weight_bytes(code)) > kMaxCtas)
        fail(at(i) + ": too large (" + std::to_string(rows) + " x " + std::to_string(cols) + ")");
      if (cols > INT64_MAX / rows) fail(at(i) + ": rows * cols overflows int64");
    }
    codes_present |= 1u << code;
  }

  // Plan the batches: one weight dtype each, at most kMaxSlots matrices and kMaxCtas CTAs.
  std::vector<PlannedBatch> plan;
  for (int32_t code = 0; code < 4; ++code) {
    if ((codes_present & (1u << code)) == 0) continue;
    const int vec = 16 / weight_bytes(code);
    PlannedBatch* pb = nullptr;
    for (int64_t i = 0; i < n; ++i) {
      if (mats.weight_dtypes[i] != code) continue;
      const int64_t rows = mats.rows[i];
      const int64_t cols = mats.cols[i];
      const int64_t ra = row_blocks(rows, cols);
      const int64_t rc = col_blocks(rows, cols, vec);
      if (pb == nullptr || pb->batch.n_slots == kMaxSlots || pb->a_ctas + ra > kMaxCtas || pb->c_ctas + rc > kMaxCtas) {
        plan.emplace_back();
        pb = &plan.back();
        std::memset(&pb->batch, 0, sizeof(Batch));
        pb->batch.sigmas = sigmas;
        pb->batch.eps = eps;
        pb->weight_code = code;
        pb->a_ctas = 0;
        pb->c_ctas = 0;
      }
      Slot& s = pb->batch.slots[pb->batch.n_slots++];
      s.w = mats.weights[i];
      s.u = mats.us[i];
      s.v = mats.vs[i];
      s.rows = rows;
      s.cols = cols;
      s.a_begin = static_cast<int32_t>(pb->a_ctas);
      s.c_begin = static_cast<int32_t>(pb->c_ctas);
      s.sigma_index = static_cast<int32_t>(i);
      s.aligned = aligned16(s.w) && aligned16(s.v) && cols % vec == 0 ? 1 : 0;
      pb->a_ctas += ra;
      pb->c_ctas += rc;
    }
  }

  // Scratch: the partials of every batch, one Acc per CTA of (A) and (C).
  const int64_t acc_bytes = vec_code == kCodeF64 ? 8 : 4;
  int64_t scratch_elems = 0;
  for (const PlannedBatch& pb : plan) scratch_elems += pb.a_ctas + pb.c_ctas;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  ScratchGuard scratch;
  scratch.stream = st;
  if (scratch_elems > 0) {
    check_cuda(cudaMallocAsync(&scratch.ptr, static_cast<size_t>(scratch_elems * acc_bytes), st), who);
  }
  int64_t offset = 0;
  for (PlannedBatch& pb : plan) {
    char* const base = static_cast<char*>(scratch.ptr);
    pb.batch.partial_a = base == nullptr ? nullptr : base + offset * acc_bytes;
    offset += pb.a_ctas;
    pb.batch.partial_c = base == nullptr ? nullptr : base + offset * acc_bytes;
    offset += pb.c_ctas;
  }

  for (PlannedBatch& pb : plan) {
    if (vec_code == kCodeF64) {
      run_batch<double, double>(pb, n_iters, st, who);
      continue;
    }
    switch (pb.weight_code) {
      case kCodeF32: run_batch<float, float>(pb, n_iters, st, who); break;
      case kCodeF64: run_batch<double, float>(pb, n_iters, st, who); break;
      case kCodeF16: run_batch<__half, float>(pb, n_iters, st, who); break;
      case kCodeBF16: run_batch<__nv_bfloat16, float>(pb, n_iters, st, who); break;
      default: break;
    }
  }
}

}  // namespace

void spectral_norm_power_iter_cuda(DType vec_dtype, const MatrixList& mats, int64_t n_iters, double eps, void* sigmas,
                                   void* stream) {
  run("spectral_norm_power_iter_cuda", vec_dtype, mats, n_iters, eps, sigmas, stream);
}

void spectral_sigma_cuda(DType vec_dtype, const MatrixList& mats, void* sigmas, void* stream) {
  run("spectral_sigma_cuda", vec_dtype, mats, 0, 0.0, sigmas, stream);
}

}  // namespace kexue
