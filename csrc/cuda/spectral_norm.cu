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
// Matrices are grouped by weight dtype; each group goes out in batches of the one multi-tensor
// scheme (kexue/cuda_multi_tensor.cuh): up to kMaxSlots matrices per batch, slot = (W, u, v,
// rows, cols, ...), two grids whose CTA ranges are a matrix's row blocks (A) and column blocks
// (C), and a third grid of one CTA per slot (D). Per round and batch there are three launches:
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
// Scratch: partial_a / partial_c, one Acc per CTA of (A) and (C) of every batch, in the caller's
// scratch (spectral_norm_scratch_elems_cuda; the policy is in kexue/cuda_common.cuh).
// Vector loads: a matrix takes the 16-byte path when W and v are 16-byte aligned and cols is a
// multiple of VEC (then every row and every vector is aligned); otherwise the same loops load
// element by element (uniform per matrix, decided on the host).
// Launch failures (no GPU, bad stream) surface as std::runtime_error (check_cuda/check_launch);
// nothing touches the device before the first CUDA call of a launcher.
#include "kexue/spectral_norm.h"
#include "kexue/cuda_common.cuh"
#include "kexue/cuda_multi_tensor.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace kexue {
namespace {

constexpr int kThreads = 256;  // CTA size of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;                     // (A)
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;  // (A): 32
constexpr int kColVecs = 8;                         // (C): column vectors per CTA
constexpr int kRowGroups = kThreads / kColVecs;     // (C): 32
constexpr int kRowUnroll = 4;                       // (C): rows loaded before they are accumulated
constexpr int kMaxSlots = 70;                       // matrices per launch (the batch stays under 4 KB)
constexpr int kGridA = 0;                           // the batch's grids: (A) row blocks
constexpr int kGridC = 1;                           //                    (C) column blocks
constexpr int kWeight = 0, kU = 1, kV = 2;          // the table's slots
constexpr int kRows = 0, kCols = 1;                 // and sizes

// One matrix of a batch. Its first CTA in grid (A) / (C) is also the index of its first
// partial_a / partial_c.
struct MatrixSlot {
  const void* w;  // rows × cols of W (weight dtype)
  void* u;        // rows of Acc
  void* v;        // cols of Acc
  int64_t rows;
  int64_t cols;
  int32_t sigma_index;  // index into sigmas
  int32_t aligned;      // 1: the 16-byte vector path is valid
};

// The per-launch values shared by the batch's matrices.
struct SpectralHead {
  void* sigmas;     // n of Acc
  void* partial_a;  // ctas[kGridA] of Acc
  void* partial_c;  // ctas[kGridC] of Acc
  double eps;
  int32_t write_sigma;  // (D): 1 in the last round (or the direct mode)
};
using Batch = cuda::SlotBatch<SpectralHead, MatrixSlot, kMaxSlots, 2>;

using cuda::ceil_div;
using cuda::fma_rn;
using cuda::to_acc;

template <typename W>
struct Vec {
  static constexpr int value = 16 / static_cast<int>(sizeof(W));  // elements per 16 bytes of W
};

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

// ---------------------------------------------------------------------------------------------
// (A) y = W v over (matrix, 32-row block). kDirect: partial = Σ u[r] y[r] (u read);
// otherwise u[r] = y[r] and partial = Σ y[r]².
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc, bool kDirect>
__global__ void __launch_bounds__(kThreads) matvec_kernel(const __grid_constant__ Batch b) {
  constexpr int VEC = Vec<W>::value;
  const int32_t cta = static_cast<int32_t>(blockIdx.x);
  const cuda::SlotChunk at = cuda::find_slot_chunk<kGridA>(b, cta);
  const MatrixSlot s = b.slots[at.slot];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int64_t row0 = static_cast<int64_t>(at.chunk) * kRowsPerCta + static_cast<int64_t>(warp) * kRowsPerWarp;
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
    static_cast<Acc*>(b.head.partial_a)[cta] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// (C) t = Wᵀ (u / max(‖u‖, eps)) over (matrix, block of 8·VEC columns); t written into v,
// partial = Σ t[c]² over the block.
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc>
__global__ void __launch_bounds__(kThreads) rmatvec_kernel(const __grid_constant__ Batch b) {
  constexpr int VEC = Vec<W>::value;
  constexpr int kCols = kColVecs * VEC;
  const int32_t cta = static_cast<int32_t>(blockIdx.x);
  const cuda::SlotChunk at = cuda::find_slot_chunk<kGridC>(b, cta);
  const MatrixSlot s = b.slots[at.slot];
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int tid = static_cast<int>(threadIdx.x);

  __shared__ Acc u_denominator;
  __shared__ Acc row_group_sums[kRowGroups][kCols];
  __shared__ Acc squares[kCols];
  if (tid == 0) {
    const Acc* const pa = static_cast<const Acc*>(b.head.partial_a) + b.first_cta[kGridA][at.slot];
    u_denominator = norm_denominator(sum_in_order(pa, row_blocks(rows, cols)), static_cast<Acc>(b.head.eps));
  }
  __syncthreads();
  const Acc denom = u_denominator;

  const int cx = tid % kColVecs;
  const int ry = tid / kColVecs;
  const int64_t col_base = static_cast<int64_t>(at.chunk) * kCols;
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
    static_cast<Acc*>(b.head.partial_c)[cta] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// (D) one CTA per matrix: direct mode: sigma = Σ partial_a; round mode: normalize u and v in
// place, sigma = ‖t‖² / max(‖t‖, eps) when write_sigma.
// ---------------------------------------------------------------------------------------------
template <typename W, typename Acc, bool kDirect>
__global__ void __launch_bounds__(kThreads) finish_kernel(const __grid_constant__ Batch b) {
  const MatrixSlot s = b.slots[blockIdx.x];
  const int64_t rows = s.rows;
  const int64_t cols = s.cols;
  const int tid = static_cast<int>(threadIdx.x);
  Acc* const sigma = static_cast<Acc*>(b.head.sigmas) + s.sigma_index;
  if (rows == 0 || cols == 0) {  // uniform over the CTA
    if (tid == 0 && b.head.write_sigma) *sigma = Acc(0);
    return;
  }
  const Acc* const pa = static_cast<const Acc*>(b.head.partial_a) + b.first_cta[kGridA][blockIdx.x];
  if (kDirect) {
    if (tid == 0 && b.head.write_sigma) *sigma = sum_in_order(pa, row_blocks(rows, cols));
    return;
  }
  __shared__ Acc u_denominator;
  __shared__ Acc v_denominator;
  __shared__ Acc t_sum_sq;
  if (tid == 0) {
    const Acc eps = static_cast<Acc>(b.head.eps);
    const Acc* const pc = static_cast<const Acc*>(b.head.partial_c) + b.first_cta[kGridC][blockIdx.x];
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
  if (tid == 0 && b.head.write_sigma) *sigma = t_sum_sq / dv;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int vec_of(DType weight_dtype) { return 16 / static_cast<int>(element_size(weight_dtype)); }

// CTAs of entry i in the grids (A) and (C).
std::array<int64_t, 2> matrix_ctas(const TensorTable& mats, int64_t i) {
  const int64_t rows = mats.size(i, kRows);
  const int64_t cols = mats.size(i, kCols);
  return {row_blocks(rows, cols), col_blocks(rows, cols, vec_of(mats.dtype(i, kWeight)))};
}

// All rounds of one batch, its partials at `partials`. n_iters == 0: the direct sigma.
template <typename W, typename Acc>
void run_batch(Batch& b, Acc* partials, int64_t n_iters, cudaStream_t stream, const char* who) {
  b.head.partial_a = partials;
  b.head.partial_c = partials + b.ctas[kGridA];
  const unsigned a_grid = static_cast<unsigned>(b.ctas[kGridA]);
  const unsigned c_grid = static_cast<unsigned>(b.ctas[kGridC]);
  const unsigned d_grid = static_cast<unsigned>(b.n_slots);
  if (n_iters == 0) {
    if (a_grid > 0) {
      matvec_kernel<W, Acc, true><<<a_grid, kThreads, 0, stream>>>(b);
      check_launch(who);
    }
    b.head.write_sigma = 1;
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
    b.head.write_sigma = last ? 1 : 0;
    finish_kernel<W, Acc, false><<<d_grid, kThreads, 0, stream>>>(b);
    check_launch(who);
  }
}

// The matrices of one weight dtype, in table order, batch by batch; each batch's partials
// follow the previous batch's in the scratch: scratch[used], then `used` moves past them.
template <typename W, typename Acc>
void run_group(const TensorTable& mats, DType weight_dtype, const SpectralHead& head, Acc* scratch, int64_t& used,
               int64_t n_iters, cudaStream_t stream, const char* who) {
  const auto launch = [&](Batch& b) {
    run_batch<W, Acc>(b, scratch + used, n_iters, stream, who);
    used += b.ctas[kGridA] + b.ctas[kGridC];
  };
  cuda::BatchBuilder<Batch, decltype(launch)> batches(head, launch);
  const int vec = vec_of(weight_dtype);
  for (int64_t i = 0; i < mats.n; ++i) {
    if (mats.dtype(i, kWeight) != weight_dtype) continue;
    MatrixSlot s{};
    s.w = mats.pointer(i, kWeight);
    s.u = mats.pointer(i, kU);
    s.v = mats.pointer(i, kV);
    s.rows = mats.size(i, kRows);
    s.cols = mats.size(i, kCols);
    s.sigma_index = static_cast<int32_t>(i);
    s.aligned = cuda::aligned16(s.w) && cuda::aligned16(s.v) && s.cols % vec == 0 ? 1 : 0;
    batches.add(s, matrix_ctas(mats, i));
  }
  batches.flush();
}

// The scratch the launchers need: one Acc per CTA of (A) and (C) over all batches, which is the
// sum over the matrices (a matrix is never split across batches).
int64_t scratch_elems(const TensorTable& mats) {
  int64_t total = 0;
  for (int64_t i = 0; i < mats.n; ++i) {
    const std::array<int64_t, 2> ctas = matrix_ctas(mats, i);
    total += ctas[kGridA] + ctas[kGridC];
  }
  return total;
}

void run(const char* who, DType vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, void* sigmas,
         void* scratch, int64_t scratch_size, void* stream) {
  const std::string name = who;
  mats.expect_layout(3, 2, name);
  const int64_t n = mats.n;
  if (vec_dtype != DType::Float32 && vec_dtype != DType::Float64)
    fail(name + ": vec_dtype must be float32 or float64, got " + dtype_name(vec_dtype));
  if (n_iters < 0) fail(name + ": n_iters must be >= 0, got " + std::to_string(n_iters));
  if (n == 0) return;
  if (n > INT32_MAX) fail(name + ": at most 2^31 - 1 matrices, got " + std::to_string(n));
  if (sigmas == nullptr) fail(name + ": null sigmas with n = " + std::to_string(n));

  // Every matrix is checked before anything is launched.
  const auto at = [&name](int64_t i) { return name + ": matrix " + std::to_string(i); };
  unsigned dtypes_present = 0;
  for (int64_t i = 0; i < n; ++i) {
    const DType weight_dtype = mats.dtype(i, kWeight);
    if (vec_dtype == DType::Float64 && weight_dtype != DType::Float64)
      fail(at(i) + ": weight dtype " + dtype_name(weight_dtype) +
           " with float64 vectors; float64 vectors need float64 weights");
    if (mats.dtype(i, kU) != vec_dtype || mats.dtype(i, kV) != vec_dtype)
      fail(at(i) + ": u and v must be " + dtype_name(vec_dtype) + ", got " + dtype_name(mats.dtype(i, kU)) + " and " +
           dtype_name(mats.dtype(i, kV)));
    const int64_t rows = mats.size(i, kRows);
    const int64_t cols = mats.size(i, kCols);
    if (rows > 0 && cols > 0) {
      if (mats.pointer(i, kWeight) == nullptr || mats.pointer(i, kU) == nullptr || mats.pointer(i, kV) == nullptr)
        fail(at(i) + ": null weight or vector pointer");
      if (!cuda::fits_one_batch(matrix_ctas(mats, i)))
        fail(at(i) + ": too large (" + std::to_string(rows) + " x " + std::to_string(cols) + ")");
      if (cols > INT64_MAX / rows) fail(at(i) + ": rows * cols overflows int64");
    }
    dtypes_present |= 1u << static_cast<int>(weight_dtype);
  }
  const int64_t needed = scratch_elems(mats);
  if (scratch_size < needed || (needed > 0 && scratch == nullptr))
    fail(name + ": scratch holds " + std::to_string(scratch_size) + " elements, the launch needs " +
         std::to_string(needed) + " (spectral_norm_scratch_elems_cuda)");

  const SpectralHead head{sigmas, nullptr, nullptr, eps, 0};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  int64_t used = 0;  // scratch elements taken by the batches so far
  for (int code = 0; code < 4; ++code) {
    if ((dtypes_present & (1u << code)) == 0) continue;
    const DType weight_dtype = static_cast<DType>(code);
    cuda::dispatch_float_types(weight_dtype, who, [&](auto weight_tag) {
      using W = decltype(weight_tag);
      if (vec_dtype == DType::Float64) {
        if constexpr (std::is_same_v<W, double>)  // float64 vectors come with float64 weights only
          run_group<double, double>(mats, weight_dtype, head, static_cast<double*>(scratch), used, n_iters, st, who);
      } else {
        run_group<W, float>(mats, weight_dtype, head, static_cast<float*>(scratch), used, n_iters, st, who);
      }
    });
  }
}

}  // namespace

int64_t spectral_norm_scratch_elems_cuda(const TensorTable& mats) {
  mats.expect_layout(3, 2, "spectral_norm_scratch_elems_cuda");
  return scratch_elems(mats);
}

void spectral_norm_power_iter_cuda(DType vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, void* sigmas,
                                   void* scratch, int64_t scratch_elems, void* stream) {
  run("spectral_norm_power_iter_cuda", vec_dtype, mats, n_iters, eps, sigmas, scratch, scratch_elems, stream);
}

void spectral_sigma_cuda(DType vec_dtype, const TensorTable& mats, void* sigmas, void* scratch, int64_t scratch_elems,
                         void* stream) {
  run("spectral_sigma_cuda", vec_dtype, mats, 0, 0.0, sigmas, scratch, scratch_elems, stream);
}

}  // namespace kexue
