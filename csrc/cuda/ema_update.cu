// Multi-tensor weight EMA on CUDA (docs/ema.md).
//
// Math, for every tensor i and element k < numels[i]:
//
//   shadow[i][k] <- round_S( fma(d, shadow[i][k], w * param[i][k]) )
//
// with d = decay and w = 1 - decay (w formed in double), both rounded once to the arithmetic type
// Acc (float, or double when the shadow is Float64). The sum d*s + w*p is evaluated as one fused
// multiply-add over the exactly rounded product w*p (fma(d, s, round(w*p))), written out with
// explicit _rn intrinsics so the compiler cannot contract it differently; round_S is the
// round-to-nearest-even conversion to the shadow dtype (cuda_bf16.h / cuda_fp16.h).
// Supported (shadow, param) pairs: (F32, F32), (F32, BF16), (F32, F16), (F64, F64),
// (BF16, BF16), (F16, F16); every pair is checked before anything is launched.
//
// Kernel design (the multi_tensor_apply pattern; learnt from NVIDIA/apex
// csrc/multi_tensor_apply.cuh and PyTorch's ATen/native/cuda/MultiTensorApply.cuh, written anew)
// ---------------------------------------------------------------------------------------------
// * Tensors are grouped by dtype pair; each group is processed by kernels instantiated for its
//   (shadow type, param type). Zero-size tensors are skipped.
// * Every tensor is cut into chunks of kChunk = 2^16 elements. A launch ("batch") carries, BY
//   VALUE as its only kernel argument (struct EmaBatch, < 4 KB), up to kMaxSlots tensor slots
//   (shadow pointer, param pointer, element count) and a chunk table of up to kMaxEntries 32-bit
//   entries, one per CTA: entry = slot << 24 | chunk index. CTA b processes chunk
//   (chunk_table[b] & 0xffffff) of slot (chunk_table[b] >> 24). The host fills the batch tensor
//   by tensor and launches whenever the slots or the table are full; a tensor whose chunks do
//   not all fit continues in the next batch as slot 0 (as apex does).
// * 24 bits of chunk index cover 2^24 * 2^16 = 2^40 elements per slot; a (hypothetical) larger
//   tensor is split on the host into slots ("segments") of 2^40 elements, so any size works.
//   Offsets into a tensor are 64-bit throughout.
// * Within a chunk, 512 threads stride over vectors of V = 16 / min(sizeof S, sizeof P)
//   elements, each moved as 16-byte accesses (the param vector is one 16-byte word, the shadow
//   vector one or two): every thread first issues the loads of kUnroll vectors, then converts,
//   updates and stores them (memory-level parallelism). Chunks start at multiples of 2^16
//   elements, so a chunk is vector-aligned exactly when both base pointers are 16-byte
//   aligned; otherwise (a view at an odd offset) the whole chunk takes the scalar path, which
//   is uniform over the CTA. The < V trailing elements of a chunk are done one per thread, scalar.
// * Launch failures (no GPU, bad stream) surface through check_launch as std::runtime_error;
//   nothing here touches the device before the first launch.
#include "kexue/ema_update.h"
#include "kexue/cuda_check.h"
#include "kexue/cuda_types.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace kexue {
namespace {

constexpr int kThreads = 512;        // CTA size
constexpr int kChunkLog2 = 16;       // elements per chunk: 2^16
constexpr int kChunkIndexBits = 24;  // chunk-table bits for the chunk index
constexpr int kMaxSlots = 96;        // tensor slots per launch
constexpr int kMaxEntries = 440;     // chunk-table entries (= CTAs) per launch
constexpr int64_t kChunk = int64_t{1} << kChunkLog2;
constexpr uint32_t kChunkIndexMask = (uint32_t{1} << kChunkIndexBits) - 1u;
constexpr int64_t kSegment = kChunk << kChunkIndexBits;  // most elements one slot can address

static_assert(kMaxSlots <= (1 << (32 - kChunkIndexBits)), "slot index must fit the entry");

// The per-launch metadata, passed by value as the kernel's only argument.
struct EmaBatch {
  double decay;   // d, rounded to Acc on the device
  double weight;  // w = 1 - decay (in double), rounded to Acc on the device
  void* shadow[kMaxSlots];
  const void* param[kMaxSlots];
  int64_t numel[kMaxSlots];
  uint32_t chunk_table[kMaxEntries];  // slot << kChunkIndexBits | chunk index, one per CTA
};
static_assert(sizeof(EmaBatch) < 4096, "kernel parameters must stay under 4 KB");

// ---------------------------------------------------------------------------------------------
// Types and conversions
// ---------------------------------------------------------------------------------------------
using cuda::acc_t;
using cuda::FromAcc;
using cuda::to_acc;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// One element: round_S(fma(d, s, round(w * p))).
template <typename S, typename P>
__device__ __forceinline__ S ema_one(S s, P p, acc_t<S> d, acc_t<S> w) {
  return FromAcc<S>::cast(fma_rn(d, to_acc(s), mul_rn(w, to_acc(p))));
}

// Vector shape of a (shadow, param) pair: V elements, WS 16-byte words of shadow and WP of
// param per vector; kUnroll vectors in flight per thread (four 16-byte shadow words).
template <typename S, typename P>
struct VecShape {
  static constexpr int kMinSize = sizeof(S) < sizeof(P) ? static_cast<int>(sizeof(S)) : static_cast<int>(sizeof(P));
  static constexpr int V = 16 / kMinSize;
  static constexpr int WS = V * static_cast<int>(sizeof(S)) / 16;
  static constexpr int WP = V * static_cast<int>(sizeof(P)) / 16;
  static constexpr int kUnroll = WS == 1 ? 4 : 2;
  static_assert(WS * 16 == V * static_cast<int>(sizeof(S)) && WP * 16 == V * static_cast<int>(sizeof(P)),
                "vectors must be whole 16-byte words");
  static_assert((kChunk % V) == 0, "a chunk must start vector-aligned");
};

// Updates one vector held as raw 16-byte words, in place in `su`.
template <typename S, typename P, int V, int WS, int WP>
__device__ __forceinline__ void ema_vec(uint4 (&su)[WS], const uint4 (&pu)[WP], acc_t<S> d, acc_t<S> w) {
  S s[V];
  P p[V];
  memcpy(s, su, sizeof s);
  memcpy(p, pu, sizeof p);
#pragma unroll
  for (int e = 0; e < V; ++e) s[e] = ema_one<S, P>(s[e], p[e], d, w);
  memcpy(su, s, sizeof s);
}

inline __device__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & uintptr_t{15}) == 0; }

// ---------------------------------------------------------------------------------------------
// The kernel: CTA b updates one chunk, the one chunk_table[b] names.
// ---------------------------------------------------------------------------------------------
template <typename S, typename P>
__global__ void __launch_bounds__(kThreads) ema_update_kernel(const EmaBatch batch) {
  using Acc = acc_t<S>;
  using Shape = VecShape<S, P>;
  constexpr int V = Shape::V;
  constexpr int WS = Shape::WS;
  constexpr int WP = Shape::WP;
  constexpr int U = Shape::kUnroll;

  const uint32_t entry = batch.chunk_table[blockIdx.x];
  const int slot = static_cast<int>(entry >> kChunkIndexBits);
  const int64_t start = static_cast<int64_t>(entry & kChunkIndexMask) << kChunkLog2;
  const int64_t left = batch.numel[slot] - start;   // > 0 by construction
  const int64_t n = left < kChunk ? left : kChunk;  // elements in this chunk
  S* const s = static_cast<S*>(batch.shadow[slot]) + start;
  const P* const p = static_cast<const P*>(batch.param[slot]) + start;
  const Acc d = static_cast<Acc>(batch.decay);
  const Acc w = static_cast<Acc>(batch.weight);
  const int64_t tid = threadIdx.x;

  if (aligned16(s) && aligned16(p)) {
    const int64_t nvec = n / V;
    uint4* const sv = reinterpret_cast<uint4*>(s);
    const uint4* const pv = reinterpret_cast<const uint4*>(p);
    for (int64_t v0 = tid; v0 < nvec; v0 += static_cast<int64_t>(U) * kThreads) {
      uint4 su[U][WS];
      uint4 pu[U][WP];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // all loads first
        const int64_t v = v0 + static_cast<int64_t>(u) * kThreads;
        if (v < nvec) {
#pragma unroll
          for (int k = 0; k < WS; ++k) su[u][k] = sv[v * WS + k];
#pragma unroll
          for (int k = 0; k < WP; ++k) pu[u][k] = pv[v * WP + k];
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * kThreads;
        if (v < nvec) {
          ema_vec<S, P, V, WS, WP>(su[u], pu[u], d, w);
#pragma unroll
          for (int k = 0; k < WS; ++k) sv[v * WS + k] = su[u][k];
        }
      }
    }
    for (int64_t k = nvec * V + tid; k < n; k += kThreads)  // the < V trailing elements
      s[k] = ema_one<S, P>(s[k], p[k], d, w);
  } else {
    constexpr int kScalarUnroll = 4;
    for (int64_t k0 = tid; k0 < n; k0 += static_cast<int64_t>(kScalarUnroll) * kThreads) {
      S sr[kScalarUnroll];
      P pr[kScalarUnroll];
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {  // all loads first
        const int64_t k = k0 + static_cast<int64_t>(u) * kThreads;
        if (k < n) {
          sr[u] = s[k];
          pr[u] = p[k];
        }
      }
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * kThreads;
        if (k < n) s[k] = ema_one<S, P>(sr[u], pr[u], d, w);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
enum PairKind : int { kF32F32 = 0, kF32BF16, kF32F16, kF64F64, kBF16BF16, kF16F16, kNumPairKinds, kUnsupported = -1 };

int pair_kind(int32_t shadow_code, int32_t param_code) {
  constexpr int32_t f32 = static_cast<int32_t>(DType::Float32);
  constexpr int32_t f64 = static_cast<int32_t>(DType::Float64);
  constexpr int32_t f16 = static_cast<int32_t>(DType::Float16);
  constexpr int32_t bf16 = static_cast<int32_t>(DType::BFloat16);
  if (shadow_code == f32 && param_code == f32) return kF32F32;
  if (shadow_code == f32 && param_code == bf16) return kF32BF16;
  if (shadow_code == f32 && param_code == f16) return kF32F16;
  if (shadow_code == f64 && param_code == f64) return kF64F64;
  if (shadow_code == bf16 && param_code == bf16) return kBF16BF16;
  if (shadow_code == f16 && param_code == f16) return kF16F16;
  return kUnsupported;
}

std::string dtype_name(int32_t code) {
  switch (code) {
    case static_cast<int32_t>(DType::Float32): return "float32";
    case static_cast<int32_t>(DType::Float64): return "float64";
    case static_cast<int32_t>(DType::Float16): return "float16";
    case static_cast<int32_t>(DType::BFloat16): return "bfloat16";
    default: return "unknown dtype code " + std::to_string(code);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename S, typename P>
void launch_batch(const EmaBatch& batch, int n_entries, cudaStream_t stream) {
  ema_update_kernel<S, P><<<static_cast<unsigned>(n_entries), kThreads, 0, stream>>>(batch);
  check_launch("ema_update_cuda");
}

// All non-empty tensors of pair kind `kind`, in order, as few launches as the limits allow.
template <typename S, typename P>
void run_group(int kind, const int32_t* shadow_dtypes, const int32_t* param_dtypes, void* const* shadows,
               const void* const* params, const int64_t* numels, int64_t n_tensors, double decay, double weight,
               cudaStream_t stream) {
  EmaBatch batch{};
  batch.decay = decay;
  batch.weight = weight;
  int n_slots = 0;
  int n_entries = 0;
  for (int64_t i = 0; i < n_tensors; ++i) {
    if (numels[i] <= 0 || pair_kind(shadow_dtypes[i], param_dtypes[i]) != kind) continue;
    for (int64_t seg = 0; seg < numels[i]; seg += kSegment) {
      const int64_t seg_n = numels[i] - seg < kSegment ? numels[i] - seg : kSegment;
      const int64_t n_chunks = ceil_div(seg_n, kChunk);
      int slot = n_slots++;
      batch.shadow[slot] = static_cast<char*>(shadows[i]) + seg * static_cast<int64_t>(sizeof(S));
      batch.param[slot] = static_cast<const char*>(params[i]) + seg * static_cast<int64_t>(sizeof(P));
      batch.numel[slot] = seg_n;
      for (int64_t c = 0; c < n_chunks; ++c) {
        batch.chunk_table[n_entries++] = (static_cast<uint32_t>(slot) << kChunkIndexBits) | static_cast<uint32_t>(c);
        if (n_entries == kMaxEntries) {
          launch_batch<S, P>(batch, n_entries, stream);
          n_entries = 0;
          n_slots = 0;
          if (c + 1 < n_chunks) {  // the segment goes on in the next batch, as slot 0
            batch.shadow[0] = batch.shadow[slot];
            batch.param[0] = batch.param[slot];
            batch.numel[0] = batch.numel[slot];
            slot = 0;
            n_slots = 1;
          }
        }
      }
      if (n_slots == kMaxSlots) {
        if (n_entries > 0) launch_batch<S, P>(batch, n_entries, stream);
        n_entries = 0;
        n_slots = 0;
      }
    }
  }
  if (n_entries > 0) launch_batch<S, P>(batch, n_entries, stream);
}

}  // namespace

void ema_update_cuda(const int32_t* shadow_dtypes, const int32_t* param_dtypes, void* const* shadows,
                     const void* const* params, const int64_t* numels, int64_t n_tensors, double decay, void* stream) {
  const std::string who = "ema_update_cuda";
  if (n_tensors < 0) fail(who + ": n_tensors must be >= 0, got " + std::to_string(n_tensors));
  if (n_tensors == 0) return;
  if (shadow_dtypes == nullptr || param_dtypes == nullptr || shadows == nullptr || params == nullptr ||
      numels == nullptr)
    fail(who + ": null metadata array with n_tensors = " + std::to_string(n_tensors));
  // Every tensor is checked before anything is launched (messages are built only on failure).
  const auto at = [&who](int64_t i) { return who + ": tensor " + std::to_string(i); };
  unsigned kinds_with_work = 0;  // bit k: some non-empty tensor has pair kind k
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int kind = pair_kind(shadow_dtypes[i], param_dtypes[i]);
    if (kind == kUnsupported)
      fail(at(i) + ": unsupported (shadow, param) dtype pair (" + dtype_name(shadow_dtypes[i]) + ", " +
           dtype_name(param_dtypes[i]) +
           "); supported: (float32, float32), (float32, bfloat16), (float32, float16), "
           "(float64, float64), (bfloat16, bfloat16), (float16, float16)");
    if (numels[i] < 0) fail(at(i) + ": numel must be >= 0, got " + std::to_string(numels[i]));
    if (numels[i] > 0 && (shadows[i] == nullptr || params[i] == nullptr))
      fail(at(i) + ": null data pointer for " + std::to_string(numels[i]) + " elements");
    if (numels[i] > 0) kinds_with_work |= 1u << kind;
  }
  if (kinds_with_work == 0) return;

  const double weight = 1.0 - decay;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int kind = 0; kind < kNumPairKinds; ++kind) {
    if ((kinds_with_work & (1u << kind)) == 0) continue;
    switch (kind) {
      case kF32F32:
        run_group<float, float>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors, decay, weight,
                                st);
        break;
      case kF32BF16:
        run_group<float, __nv_bfloat16>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors, decay,
                                        weight, st);
        break;
      case kF32F16:
        run_group<float, __half>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors, decay, weight,
                                 st);
        break;
      case kF64F64:
        run_group<double, double>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors, decay, weight,
                                  st);
        break;
      case kBF16BF16:
        run_group<__nv_bfloat16, __nv_bfloat16>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors,
                                                decay, weight, st);
        break;
      case kF16F16:
        run_group<__half, __half>(kind, shadow_dtypes, param_dtypes, shadows, params, numels, n_tensors, decay, weight,
                                  st);
        break;
      default: break;
    }
  }
}

}  // namespace kexue
