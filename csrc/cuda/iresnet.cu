// i-ResNet inversion of an MLP branch on CUDA (kexue/iresnet.h; the math, the stopping rule and
// the NaN semantics: kexue_fast/reference/iresnet.py).
//
// Kernel design
// ---------------------------------------------------------------------------------------------
// The whole solve is ONE kernel launch (solve_kernel; the fallback below adds one before it): no
// host synchronisation, the stop test on the device, so the op is CUDA-graph capturable. Each warp iterates kSlots rows together,
// one row per slot: per iteration the warp runs the branch (the forward layers, or the adjoint's
// transposed layers) over its slots, then tests every slot on its own; a slot whose row has
// stopped (converged, non-finite, or at max_iter) writes the row and its n_iter out at once and
// takes the warp's next row (rows gw, gw + G, gw + 2G, … for warp gw of G), so a converged row
// is never computed again and the warp goes on with fresh rows while slow ones keep running. The
// kernel ends when the warp's slots are all empty. A warp keeps, per slot, the current iterate,
// the new one and two hidden activations (ping-pong); the target (y or ḡ) and the activation
// derivatives of the adjoint are read from global memory where they are used.
//
// The products, per layer: out[r, n] = epilogue(bias[n] + Σ_k M[k, n] · in[r, k]) for the warp's
// slots r. Lane n owns outputs n, n + 32, …, reads M (the layer's matrix laid out with n
// contiguous: Wᵀ for the forward, W itself for the adjoint) a whole warp-row at a time
// (conflict-free in shared memory, coalesced in global memory) and the inputs as broadcasts,
// kVector at a time (aligned vector loads: the warps' buffer rows are padded to whole vectors);
// every weight read feeds kSlots FMAs. Each sum runs over k in order, bias first, one rounding per
// FMA — the same arithmetic on both paths below, so a row's result does not depend on the path.
//
// The two paths and the switch between them (make_plan, host side, below):
//  * shared path, one launch: every layer's matrix (and, in the forward, its bias) is staged into
//    shared memory once per CTA, and the warps' per-slot buffers live there too. Taken when the
//    staged weights plus the buffers of at least kMinSharedWarps warps fit the device's opt-in
//    shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin, 227 KB on sm_90): e.g. a
//    float32 branch of ≈ 50 K weights with D and the hidden widths ≤ 64.
//  * fallback (larger branches): the same kernel with the weights read from global memory (they
//    stay in L2 across iterations, and in L1 as far as they fit) and the per-slot buffers in the
//    caller's scratch. The forward needs Wᵀ: one transposing kernel (transpose_weights_kernel)
//    writes it into the scratch first, on the same stream (two launches, still no host sync);
//    the adjoint reads W where it is. Its grid is at most kMaxFallbackWarps warps, so the scratch
//    is bounded by that and by B.
// Why the switch is there: staging pays off when the weights fit on chip (every iteration of
// every row reads all of them); beyond that, tiling the weights through shared memory would need a
// CTA-wide barrier per tile, which per-warp early exit forbids, while L2 (50 MB on H200) holds
// even 2048-wide layers and serves them to all warps.
//
// Depth: the layer descriptors travel in the kernel parameters up to kParamLayers layers; deeper
// branches have them copied into the head of the scratch by small kernels launched first on the
// same stream (still no host sync, still capturable).
//
// Determinism: a row's arithmetic is the same whatever warp, slot, grid or path it runs in (the
// sums run in a fixed order, no atomics), so results do not depend on the other rows, on B or on
// the shared memory of the device.
// Scratch: kexue/cuda_common.cuh's policy; iresnet_scratch_elems_cuda says how much (0 on the
// shared path with kParamLayers layers or fewer).
#include "kexue/iresnet.h"
#include "kexue/cuda_common.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace kexue {
namespace {

constexpr int kWeight = 0, kSecond = 1;      // table slots: (weight, bias) or (weight, deriv)
constexpr int kRows = 0, kCols = 1;          // table sizes
constexpr int kSlots = 4;                    // rows a warp iterates together
constexpr int kMaxWarps = 8;                 // warps per CTA (shared path: fewer when smem is short)
constexpr int kMinSharedWarps = 4;           // the shared path needs room for this many warps
constexpr int64_t kMaxFallbackWarps = 4096;  // fallback grid: at most this many warps
constexpr int kParamLayers = 48;             // layer descriptors carried in the kernel parameters
constexpr unsigned kFullMask = 0xffffffffu;

using cuda::ceil_div;
using cuda::fma_rn;

// One layer as the kernel sees it.
struct LayerDesc {
  const void* weight;   // rows × cols, row-major, global memory
  const void* second;   // forward: bias (rows); adjoint: deriv (B × rows), null for the last layer
  int64_t rows, cols;   // out_k, in_k
  int64_t staged;       // offset (elements) of the layer's matrix in shared memory / the scratch
  int64_t staged_bias;  // shared path, forward: offset of its bias
};

struct SolveParams {
  LayerDesc layers[kParamLayers];
  const LayerDesc* spilled;  // every descriptor, in the scratch, when n_layers > kParamLayers
  int64_t n_layers;
  const void* target;  // y or grad_x, B × D
  void* result;        // x or a, B × D
  int32_t* n_iter;     // B, may be null
  void* buffers;       // fallback: the warps' slot buffers (scratch)
  void* transposed;    // forward fallback: every layer's Wᵀ (scratch), at its `staged` offset
  int64_t B, D, H;     // H: the widest hidden layer (0 when L = 1)
  int64_t max_iter;    // >= 1
  double atol, rtol;
  int64_t staged_elems;  // shared path: elements before the warps' buffers
};

// Copies up to kParamLayers descriptors into the scratch (deep branches).
struct DescChunk {
  LayerDesc layers[kParamLayers];
  LayerDesc* destination;
  int count;
};

__global__ void copy_descriptors_kernel(const __grid_constant__ DescChunk chunk) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < chunk.count) chunk.destination[i] = chunk.layers[i];
}

// The warps' buffers start at multiples of kVector elements and their rows are padded to such
// multiples, so the products read the inputs kVector at a time as aligned vectors (16 B of float,
// 2 × 16 B of double).
constexpr int kVector = 4;
__host__ __device__ inline int64_t padded(int64_t n) { return ceil_div(n, kVector) * kVector; }

// Elements of one warp's buffers: per slot the iterate, the new iterate and two hidden layers.
__host__ __device__ inline int64_t warp_elems(int64_t D, int64_t H) { return kSlots * (2 * padded(D) + 2 * padded(H)); }

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
template <class T, Activation A>
__device__ __forceinline__ T activate(T h) {
  if constexpr (A == Activation::Elu) {
    return h > T(0) ? h : expm1(h);
  } else if constexpr (A == Activation::Relu) {
    return h < T(0) ? T(0) : h;  // NaN passes through, as in torch
  } else if constexpr (A == Activation::Tanh) {
    return tanh(h);
  } else if constexpr (A == Activation::Softplus) {
    return h > T(20) ? h : log1p(exp(h));  // torch's threshold 20
  } else {
    return h / (T(1) + exp(-h)) / T(1.1);  // LipSwish: h·sigmoid(h)/1.1
  }
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {  // v >= 0, NaN-free: the order does not matter
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// p[0 .. kVector) from an address aligned to kVector elements.
__device__ __forceinline__ void load_vector(const float* p, float (&v)[kVector]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load_vector(const double* p, double (&v)[kVector]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

// out[r·ld_out + n] = epilogue(bias[n] + Σ_k M[k·N + n] · in[r·ld_in + k], r, n) for every slot r
// and n < N, lane n taking n, n + 32, … (M K × N, n contiguous; bias may be null; in and ld_in
// aligned to kVector elements). The sum runs over k in order.
template <class T, class Epilogue>
__device__ __forceinline__ void product_by_outputs(const T* M, const T* bias, int64_t K, int64_t N, const T* in,
                                                   int64_t ld_in, T* out, int64_t ld_out, int lane,
                                                   const Epilogue& epilogue) {
  for (int64_t n = lane; n < N; n += 32) {
    T acc[kSlots];
    const T b = bias != nullptr ? bias[n] : T(0);
#pragma unroll
    for (int r = 0; r < kSlots; ++r) acc[r] = b;
    int64_t k = 0;
#pragma unroll 1
    for (; k + kVector <= K; k += kVector) {  // kVector inputs of each slot as one aligned vector
      T w[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) w[j] = M[(k + j) * N + n];
#pragma unroll
      for (int r = 0; r < kSlots; ++r) {
        T x[kVector];
        load_vector(in + r * ld_in + k, x);
#pragma unroll
        for (int j = 0; j < kVector; ++j) acc[r] = fma_rn(w[j], x[j], acc[r]);
      }
    }
    for (; k < K; ++k) {
      const T w = M[k * N + n];
#pragma unroll
      for (int r = 0; r < kSlots; ++r) acc[r] = fma_rn(w, in[r * ld_in + k], acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kSlots; ++r) out[r * ld_out + n] = epilogue(acc[r], r, n);
  }
}

// Forward fallback: every layer's Wᵀ into the scratch (at the layer's `staged` offset), for
// product_by_outputs; grid-stride over each layer's elements.
template <class T>
__global__ void transpose_weights_kernel(const __grid_constant__ SolveParams p) {
  const LayerDesc* const layers = p.n_layers <= kParamLayers ? p.layers : p.spilled;
  T* const out = static_cast<T*>(p.transposed);
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t l = 0; l < p.n_layers; ++l) {
    const LayerDesc& layer = layers[l];
    const T* w = static_cast<const T*>(layer.weight);
    T* m = out + layer.staged;
    for (int64_t e = start; e < layer.rows * layer.cols; e += step) {
      const int64_t j = e / layer.cols, i = e - j * layer.cols;
      m[i * layer.rows + j] = w[e];
    }
  }
}

// Shared path: every layer's matrix (Wᵀ for the forward, W for the adjoint) and the forward's
// biases into shared memory, by the whole CTA.
template <class T, bool kAdjoint>
__device__ void stage_weights(const LayerDesc* layers, int64_t L, T* smem) {
  const int threads = static_cast<int>(blockDim.x);
  for (int64_t l = 0; l < L; ++l) {
    const LayerDesc& layer = layers[l];
    const T* w = static_cast<const T*>(layer.weight);
    T* m = smem + layer.staged;
    const int rows = static_cast<int>(layer.rows), cols = static_cast<int>(layer.cols);  // fit shared memory
    for (int e = static_cast<int>(threadIdx.x); e < rows * cols; e += threads) {
      if constexpr (kAdjoint) {
        m[e] = w[e];
      } else {
        const int j = e / cols, i = e - j * cols;
        m[i * rows + j] = w[e];
      }
    }
    if constexpr (!kAdjoint) {
      const T* bias = static_cast<const T*>(layer.second);
      for (int e = static_cast<int>(threadIdx.x); e < rows; e += threads) smem[layer.staged_bias + e] = bias[e];
    }
  }
}

// The solve (file comment): forward (kAdjoint false) or adjoint; weights in shared memory
// (kShared) or read from global memory.
template <class T, Activation A, bool kAdjoint, bool kShared>
__global__ void __launch_bounds__(kMaxWarps * 32, 2) solve_kernel(const __grid_constant__ SolveParams p) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* const smem = reinterpret_cast<T*>(smem_bytes);
  const LayerDesc* const layers = p.n_layers <= kParamLayers ? p.layers : p.spilled;
  const int64_t L = p.n_layers, B = p.B, D = p.D, H = p.H;
  if constexpr (kShared) {
    stage_weights<T, kAdjoint>(layers, L, smem);
    __syncthreads();  // the only CTA-wide barrier: from here on every warp runs on its own
  }
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warps_per_cta = blockDim.x / 32;
  const int64_t warp_in_cta = threadIdx.x / 32;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * warps_per_cta + warp_in_cta;
  const int64_t G = static_cast<int64_t>(gridDim.x) * warps_per_cta;
  T* const buffers = kShared ? smem + p.staged_elems + warp_in_cta * warp_elems(D, H)
                             : static_cast<T*>(p.buffers) + gw * warp_elems(D, H);
  const int64_t Dp = padded(D), Hp = padded(H);  // buffer row strides
  T* const current = buffers;                    // kSlots × Dp
  T* const fresh = current + kSlots * Dp;        // kSlots × Dp
  T* const hidden0 = fresh + kSlots * Dp;        // kSlots × Hp
  T* const hidden1 = hidden0 + kSlots * Hp;      // kSlots × Hp
  const T* const target = static_cast<const T*>(p.target);
  T* const result = static_cast<T*>(p.result);
  const T atol = static_cast<T>(p.atol), rtol = static_cast<T>(p.rtol);

  int64_t row[kSlots];    // the slot's row, -1 when empty
  int64_t iters[kSlots];  // iterations done on it
  int64_t next = gw;      // the warp's next row
  const auto take_next = [&](int r) {
    row[r] = next < B ? next : -1;
    iters[r] = 0;
    next += G;
    if (row[r] >= 0)
      for (int64_t d = lane; d < D; d += 32) current[r * Dp + d] = target[row[r] * D + d];
  };
#pragma unroll
  for (int r = 0; r < kSlots; ++r) take_next(r);
  __syncwarp();

  for (;;) {
    bool any = false;
    int64_t safe[kSlots];  // row indices to read per-row inputs at (an empty slot reads row 0)
#pragma unroll
    for (int r = 0; r < kSlots; ++r) {
      any = any || row[r] >= 0;
      safe[r] = row[r] >= 0 ? row[r] : 0;
    }
    if (!any) break;

    // One iteration of the branch over the slots: current → fresh.
    const T* in = current;
    int64_t ld_in = Dp;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t l = kAdjoint ? L - 1 - s : s;
      const LayerDesc& layer = layers[l];
      const bool last = s + 1 == L;
      T* const out = last ? fresh : s % 2 == 0 ? hidden0 : hidden1;
      const int64_t ld_out = last ? Dp : Hp;
      const int64_t K = kAdjoint ? layer.rows : layer.cols;
      const int64_t N = kAdjoint ? layer.cols : layer.rows;
      if constexpr (!kAdjoint) {
        const auto hidden_out = [](T h, int, int64_t) { return activate<T, A>(h); };
        const auto last_out = [&](T g, int r, int64_t n) { return target[safe[r] * D + n] - g; };  // y − g(x)
        const T* m = (kShared ? smem : static_cast<const T*>(p.transposed)) + layer.staged;
        const T* bias = kShared ? smem + layer.staged_bias : static_cast<const T*>(layer.second);
        if (last)
          product_by_outputs(m, bias, K, N, in, ld_in, out, ld_out, lane, last_out);
        else
          product_by_outputs(m, bias, K, N, in, ld_in, out, ld_out, lane, hidden_out);
      } else {
        const T* m = kShared ? smem + layer.staged : static_cast<const T*>(layer.weight);
        if (last) {  // a_new = ḡ − Jᵀ a
          const auto last_out = [&](T v, int r, int64_t n) { return target[safe[r] * D + n] - v; };
          product_by_outputs(m, static_cast<const T*>(nullptr), K, N, in, ld_in, out, ld_out, lane, last_out);
        } else {  // (v W_l) ⊙ a'(h_{l−1})
          const T* deriv = static_cast<const T*>(layers[l - 1].second);
          const auto hidden_out = [&](T v, int r, int64_t n) { return v * deriv[safe[r] * N + n]; };
          product_by_outputs(m, static_cast<const T*>(nullptr), K, N, in, ld_in, out, ld_out, lane, hidden_out);
        }
      }
      __syncwarp();
      in = out;
      ld_in = ld_out;
    }

    // The stop test of every slot; stopped rows go out and their slots take new rows.
#pragma unroll
    for (int r = 0; r < kSlots; ++r) {
      if (row[r] < 0) continue;  // warp-uniform
      const T* f = fresh + r * Dp;
      T* c = current + r * Dp;
      T change = T(0), size = T(0);
      bool finite = true;
      for (int64_t d = lane; d < D; d += 32) {
        const T v = f[d];
        finite = finite && isfinite(v);
        change = fmax(change, fabs(v - c[d]));
        size = fmax(size, fabs(v));
      }
      finite = __all_sync(kFullMask, finite);
      change = warp_max(change);
      size = warp_max(size);
      ++iters[r];
      const bool converged = finite && change <= atol + rtol * size;
      if (converged || !finite || iters[r] >= p.max_iter) {
        T* destination = result + row[r] * D;
        for (int64_t d = lane; d < D; d += 32) destination[d] = f[d];
        if (lane == 0 && p.n_iter != nullptr)
          p.n_iter[row[r]] = static_cast<int32_t>(converged ? iters[r] : p.max_iter);
        take_next(r);
      } else {
        for (int64_t d = lane; d < D; d += 32) c[d] = f[d];
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// How a call runs: decided from the table's sizes, the element size and the device's shared
// memory per block alone (so iresnet_scratch_elems_cuda and the launchers agree).
struct Plan {
  bool shared = false;
  int warps = kMaxWarps;     // per CTA
  int64_t staged_elems = 0;  // shared path: weights and biases
  int64_t weight_elems = 0;  // every layer's rows × cols
  int64_t smem_bytes = 0;    // shared path: dynamic shared memory per CTA
  int64_t D = 0, H = 0;
};

Plan make_plan(const TensorTable& layers, int64_t elem_bytes, int64_t smem_limit) {
  Plan plan;
  plan.D = layers.size(0, kCols);
  int64_t staged = 0;
  for (int64_t l = 0; l < layers.n; ++l) {
    plan.weight_elems += layers.size(l, kRows) * layers.size(l, kCols);
    staged += layers.size(l, kRows) * layers.size(l, kCols) + layers.size(l, kRows);
    if (l + 1 < layers.n && layers.size(l, kRows) > plan.H) plan.H = layers.size(l, kRows);
  }
  plan.staged_elems = padded(staged);  // the warps' buffers start aligned
  const int64_t per_warp = warp_elems(plan.D, plan.H) * elem_bytes;
  const int64_t room = smem_limit - plan.staged_elems * elem_bytes;
  const int64_t warps = room > 0 ? room / per_warp : 0;
  plan.shared = warps >= kMinSharedWarps;
  if (plan.shared) {
    plan.warps = static_cast<int>(warps < kMaxWarps ? warps : kMaxWarps);
    plan.smem_bytes = (plan.staged_elems + plan.warps * warp_elems(plan.D, plan.H)) * elem_bytes;
  }
  return plan;
}

// Fallback grid: CTAs of kMaxWarps warps, one warp per kSlots rows up to kMaxFallbackWarps warps.
int64_t fallback_ctas(int64_t B) {
  const int64_t warps = ceil_div(B, kSlots);
  return ceil_div(warps < kMaxFallbackWarps ? warps : kMaxFallbackWarps, kMaxWarps);
}

// Scratch elements holding the spilled descriptors (deep branches), rounded to 16 bytes.
int64_t spill_elems(int64_t L, int64_t elem_bytes) {
  if (L <= kParamLayers) return 0;
  return ceil_div(L * static_cast<int64_t>(sizeof(LayerDesc)), 16) * 16 / elem_bytes;
}

// The scratch: [the spilled descriptors][fallback: every Wᵀ, then the warps' buffers]. The
// adjoint takes the same amount (one function serves both launchers) and leaves the Wᵀ unused.
int64_t transposed_elems(const Plan& plan) { return padded(plan.weight_elems); }  // buffers start aligned

int64_t scratch_elems(const Plan& plan, int64_t L, int64_t B, int64_t elem_bytes) {
  if (plan.shared || B == 0) return spill_elems(L, elem_bytes);
  return spill_elems(L, elem_bytes) + transposed_elems(plan) +
         fallback_ctas(B) * kMaxWarps * warp_elems(plan.D, plan.H);
}

int64_t device_smem_limit(const char* what) {
  int device = 0, limit = 0;
  check_cuda(cudaGetDevice(&device), what);
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), what);
  return limit;
}

// The CUDA file's own checks (the CPU file has its twins): throw before anything is launched.
void check_table(DType dtype, const TensorTable& layers, bool adjoint, const std::string& what) {
  layers.expect_layout(2, 2, what);
  if (dtype != DType::Float32 && dtype != DType::Float64)
    fail(what + ": dtype must be float32 or float64, got " + dtype_name(dtype));
  if (layers.n < 1) fail(what + ": the branch needs at least one layer");
  for (int64_t l = 0; l < layers.n; ++l) {
    const std::string at = what + ": layer " + std::to_string(l);
    if (layers.dtype(l, kWeight) != dtype || layers.dtype(l, kSecond) != dtype)
      fail(at + " is not of the dtype " + dtype_name(dtype));
    const int64_t rows = layers.size(l, kRows), cols = layers.size(l, kCols);
    if (rows < 1 || cols < 1) fail(at + " has a zero width");
    if (rows > INT32_MAX || cols > INT32_MAX || rows * cols > (int64_t{1} << 40)) fail(at + " is too large");
    const int64_t next_in = layers.size((l + 1) % layers.n, kCols);
    if (rows != next_in)
      fail(at + " has " + std::to_string(rows) + " outputs but the next layer takes " + std::to_string(next_in));
    if (layers.pointer(l, kWeight) == nullptr) fail(at + " has a null weight");
    const bool needs_second = !adjoint || l + 1 < layers.n;
    if (needs_second && layers.pointer(l, kSecond) == nullptr)
      fail(at + (adjoint ? " has no activation derivative" : " has a null bias"));
  }
}

void check_stop(const FixedPointStop& stop, const std::string& what) {
  if (stop.max_iter < 0 || stop.max_iter > INT32_MAX) fail(what + ": max_iter must be in [0, 2^31)");
  if (!(stop.atol >= 0) || !(stop.rtol >= 0)) fail(what + ": atol and rtol must be >= 0");
}

template <class T, Activation A, bool kAdjoint, bool kShared>
void launch(SolveParams& params, const Plan& plan, int64_t B, cudaStream_t stream, const char* what) {
  const auto kernel = solve_kernel<T, A, kAdjoint, kShared>;
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), what);
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), what);
  if constexpr (kShared) {
    // Few rows: fewer warps per CTA, so that the CTAs spread over the SMs (every CTA stages the
    // weights anew; a row's arithmetic does not depend on its CTA).
    const int64_t warps = std::min<int64_t>(plan.warps, std::max<int64_t>(1, ceil_div(ceil_div(B, kSlots), sms)));
    const int threads = static_cast<int>(warps) * 32;
    const int smem =
        static_cast<int>((plan.staged_elems + warps * warp_elems(plan.D, plan.H)) * static_cast<int64_t>(sizeof(T)));
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
    int per_sm = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), what);
    const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    kernel<<<cuda::grid_size(ceil_div(B, warps * kSlots), resident), threads, smem, stream>>>(params);
  } else {
    if constexpr (!kAdjoint) {
      transpose_weights_kernel<T><<<cuda::grid_size(ceil_div(plan.weight_elems, 256), 1024), 256, 0, stream>>>(params);
      check_launch(what);
    }
    // The grid has the warps fallback_ctas(B) CTAs of kMaxWarps would have (the scratch holds
    // their buffers), in CTAs of a power of two ≤ kMaxWarps warps: fewer per CTA when few rows,
    // so that the CTAs spread over the SMs.
    const int64_t warps = std::min(ceil_div(B, kSlots), kMaxFallbackWarps);
    int per_cta = 1;
    while (per_cta < kMaxWarps && per_cta * static_cast<int64_t>(sms) < warps) per_cta *= 2;
    kernel<<<static_cast<unsigned>(ceil_div(warps, per_cta)), per_cta * 32, 0, stream>>>(params);
  }
  check_launch(what);
}

// Everything both launchers share: checks, max_iter = 0, the descriptors, the launch.
template <bool kAdjoint>
void run(const char* what, DType dtype, const TensorTable& layers, Activation activation, const void* source, int64_t B,
         FixedPointStop stop, void* result, int32_t* n_iter, void* scratch, int64_t scratch_size, void* stream) {
  const std::string name = what;
  check_table(dtype, layers, kAdjoint, name);
  check_stop(stop, name);
  check_activation(activation, what);
  if (B < 0) fail(name + ": B must be >= 0");
  if (B == 0) return;
  if (source == nullptr || result == nullptr || (!kAdjoint && n_iter == nullptr))
    fail(name + ": null input or output pointer");
  const int64_t elem_bytes = element_size(dtype);
  const Plan plan = make_plan(layers, elem_bytes, device_smem_limit(what));
  const int64_t L = layers.n, D = plan.D;
  const int64_t needed = scratch_elems(plan, L, B, elem_bytes);
  if (scratch_size < needed || (needed > 0 && scratch == nullptr))
    fail(name + ": scratch holds " + std::to_string(scratch_size) + " elements, the launch needs " +
         std::to_string(needed) + " (iresnet_scratch_elems_cuda)");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);

  if (stop.max_iter == 0) {  // x = y (a = ḡ), n_iter = 0
    check_cuda(cudaMemcpyAsync(result, source, B * D * elem_bytes, cudaMemcpyDeviceToDevice, st), what);
    if (n_iter != nullptr) check_cuda(cudaMemsetAsync(n_iter, 0, B * sizeof(int32_t), st), what);
    return;
  }

  SolveParams params{};
  int64_t at = 0, bias_at = 0;  // shared path: the matrices first, then the biases
  for (int64_t l = 0; l < L; ++l) bias_at += layers.size(l, kRows) * layers.size(l, kCols);
  auto describe = [&](int64_t l) {
    LayerDesc desc{};
    desc.weight = layers.pointer(l, kWeight);
    desc.second = layers.pointer(l, kSecond);
    desc.rows = layers.size(l, kRows);
    desc.cols = layers.size(l, kCols);
    desc.staged = at;
    desc.staged_bias = bias_at;
    at += desc.rows * desc.cols;
    bias_at += desc.rows;
    return desc;
  };
  LayerDesc* const spilled = static_cast<LayerDesc*>(scratch);  // the head of the scratch
  if (L <= kParamLayers) {
    for (int64_t l = 0; l < L; ++l) params.layers[l] = describe(l);
  } else {
    for (int64_t first = 0; first < L; first += kParamLayers) {
      DescChunk chunk{};
      chunk.destination = spilled + first;
      chunk.count = static_cast<int>(L - first < kParamLayers ? L - first : kParamLayers);
      for (int i = 0; i < chunk.count; ++i) chunk.layers[i] = describe(first + i);
      copy_descriptors_kernel<<<1, kParamLayers, 0, st>>>(chunk);
      check_launch(what);
    }
    params.spilled = spilled;
  }
  params.n_layers = L;
  params.target = source;
  params.result = result;
  params.n_iter = n_iter;
  unsigned char* const after_spill = static_cast<unsigned char*>(scratch) + spill_elems(L, elem_bytes) * elem_bytes;
  params.transposed = after_spill;  // fallback only
  params.buffers = after_spill + transposed_elems(plan) * elem_bytes;
  params.B = B;
  params.D = D;
  params.H = plan.H;
  params.max_iter = stop.max_iter;
  params.atol = stop.atol;
  params.rtol = stop.rtol;
  params.staged_elems = plan.staged_elems;

  const auto typed = [&](auto zero) {
    using T = decltype(zero);
    const auto go = [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      if (plan.shared)
        launch<T, A, kAdjoint, true>(params, plan, B, st, what);
      else
        launch<T, A, kAdjoint, false>(params, plan, B, st, what);
    };
    if constexpr (kAdjoint) {
      go(std::integral_constant<Activation, Activation::Elu>{});  // the adjoint uses no activation
    } else {
      with_activation(activation, go);
    }
  };
  dtype == DType::Float64 ? typed(double{}) : typed(float{});
}

}  // namespace

int64_t iresnet_scratch_elems_cuda(const TensorTable& layers, int64_t B) {
  const char* what = "iresnet_scratch_elems_cuda";
  layers.expect_layout(2, 2, what);
  if (layers.n < 1) fail(std::string(what) + ": the branch needs at least one layer");
  if (B < 0) fail(std::string(what) + ": B must be >= 0");
  const DType dtype = layers.dtype(0, kWeight);
  if (dtype != DType::Float32 && dtype != DType::Float64)
    fail(std::string(what) + ": dtype must be float32 or float64, got " + dtype_name(dtype));
  const int64_t elem_bytes = element_size(dtype);
  return scratch_elems(make_plan(layers, elem_bytes, device_smem_limit(what)), layers.n, B, elem_bytes);
}

void iresnet_inverse_cuda(DType dtype, const TensorTable& layers, Activation activation, const void* y, int64_t B,
                          FixedPointStop stop, void* x, int32_t* n_iter, void* scratch, int64_t scratch_elems,
                          void* stream) {
  run<false>("iresnet_inverse_cuda", dtype, layers, activation, y, B, stop, x, n_iter, scratch, scratch_elems, stream);
}

void iresnet_adjoint_cuda(DType dtype, const TensorTable& adjoint_layers, const void* grad_x, int64_t B,
                          FixedPointStop stop, void* a, int32_t* n_iter, void* scratch, int64_t scratch_elems,
                          void* stream) {
  run<true>("iresnet_adjoint_cuda", dtype, adjoint_layers, Activation::Elu, grad_x, B, stop, a, n_iter, scratch,
            scratch_elems, stream);
}

}  // namespace kexue
