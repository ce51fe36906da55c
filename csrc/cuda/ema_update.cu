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
// Kernel design
// ---------------------------------------------------------------------------------------------
// * The table's entries are grouped by dtype pair; each group is processed by kernels
//   instantiated for its (shadow type, param type). Zero-size tensors are skipped.
// * Every tensor is cut into chunks of kChunk = 2^16 elements, one CTA each, and the tensors of
//   a group go out in batches of the one multi-tensor scheme (kexue/cuda_multi_tensor.cuh): up
//   to kMaxSlots tensors per launch, slot = (shadow, param, numel), the CTA's chunk found from
//   the slot's CTA range. A tensor has at most kMaxBatchCtas chunks (2^46 elements).
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
#include "kexue/cuda_common.cuh"
#include "kexue/cuda_multi_tensor.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace kexue {
namespace {

constexpr int kThreads = 512;   // CTA size
constexpr int kChunkLog2 = 16;  // elements per chunk: 2^16
constexpr int kMaxSlots = 144;  // tensors per launch (the batch stays under 4 KB)
constexpr int64_t kChunk = int64_t{1} << kChunkLog2;
constexpr int kShadow = 0;  // the table's slots
constexpr int kParam = 1;

struct EmaHead {
  double decay;   // d, rounded to Acc on the device
  double weight;  // w = 1 - decay (in double), rounded to Acc on the device
};
struct EmaSlot {
  void* shadow;
  const void* param;
  int64_t numel;
};
using EmaBatch = cuda::SlotBatch<EmaHead, EmaSlot, kMaxSlots>;

// ---------------------------------------------------------------------------------------------
// Types and conversions
// ---------------------------------------------------------------------------------------------
using cuda::acc_t;
using cuda::fma_rn;
using cuda::FromAcc;
using cuda::mul_rn;
using cuda::to_acc;

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

// ---------------------------------------------------------------------------------------------
// The kernel: CTA b updates one chunk of one tensor, as the batch's CTA ranges say.
// ---------------------------------------------------------------------------------------------
template <typename S, typename P>
__global__ void __launch_bounds__(kThreads) ema_update_kernel(const __grid_constant__ EmaBatch batch) {
  using Acc = acc_t<S>;
  using Shape = VecShape<S, P>;
  constexpr int V = Shape::V;
  constexpr int WS = Shape::WS;
  constexpr int WP = Shape::WP;
  constexpr int U = Shape::kUnroll;

  const cuda::SlotChunk at = cuda::find_slot_chunk<0>(batch, static_cast<int32_t>(blockIdx.x));
  const EmaSlot& slot = batch.slots[at.slot];
  const int64_t start = static_cast<int64_t>(at.chunk) << kChunkLog2;
  const int64_t left = slot.numel - start;          // > 0 by construction
  const int64_t n = left < kChunk ? left : kChunk;  // elements in this chunk
  S* const s = static_cast<S*>(slot.shadow) + start;
  const P* const p = static_cast<const P*>(slot.param) + start;
  const Acc d = static_cast<Acc>(batch.head.decay);
  const Acc w = static_cast<Acc>(batch.head.weight);
  const int64_t tid = threadIdx.x;

  if (cuda::aligned16(s) && cuda::aligned16(p)) {
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
constexpr const char* kWho = "ema_update_cuda";

bool supported_pair(DType shadow, DType param) {
  return shadow == param || (shadow == DType::Float32 && (param == DType::BFloat16 || param == DType::Float16));
}

// All non-empty tensors of one (shadow, param) dtype pair, in table order, in as few launches as
// the batches allow.
template <typename S, typename P>
void run_group(const TensorTable& table, DType shadow_dtype, DType param_dtype, const EmaHead& head,
               cudaStream_t stream) {
  const auto launch = [stream](const EmaBatch& batch) {
    ema_update_kernel<S, P><<<static_cast<unsigned>(batch.ctas[0]), kThreads, 0, stream>>>(batch);
    check_launch(kWho);
  };
  cuda::BatchBuilder<EmaBatch, decltype(launch)> batches(head, launch);
  for (int64_t i = 0; i < table.n; ++i) {
    const int64_t numel = table.size(i, 0);
    if (numel == 0 || table.dtype(i, kShadow) != shadow_dtype || table.dtype(i, kParam) != param_dtype) continue;
    batches.add(EmaSlot{table.pointer(i, kShadow), table.pointer(i, kParam), numel}, {cuda::ceil_div(numel, kChunk)});
  }
  batches.flush();
}

}  // namespace

void ema_update_cuda(const TensorTable& table, double decay, void* stream) {
  const std::string who = kWho;
  table.expect_layout(2, 1, who);
  // Every tensor is checked before anything is launched (messages are built only on failure).
  const auto at = [&who](int64_t i) { return who + ": tensor " + std::to_string(i); };
  unsigned pairs_with_work = 0;  // bit 4 * shadow code + param code: some non-empty tensor has that pair
  for (int64_t i = 0; i < table.n; ++i) {
    const DType shadow_dtype = table.dtype(i, kShadow);
    const DType param_dtype = table.dtype(i, kParam);
    if (!supported_pair(shadow_dtype, param_dtype))
      fail(at(i) + ": unsupported (shadow, param) dtype pair (" + dtype_name(shadow_dtype) + ", " +
           dtype_name(param_dtype) +
           "); supported: (float32, float32), (float32, bfloat16), (float32, float16), "
           "(float64, float64), (bfloat16, bfloat16), (float16, float16)");
    const int64_t numel = table.size(i, 0);
    if (numel == 0) continue;
    if (table.pointer(i, kShadow) == nullptr || table.pointer(i, kParam) == nullptr)
      fail(at(i) + ": null data pointer for " + std::to_string(numel) + " elements");
    if (!cuda::fits_one_batch(std::array<int64_t, 1>{cuda::ceil_div(numel, kChunk)}))
      fail(at(i) + ": " + std::to_string(numel) + " elements are more than one launch can take");
    pairs_with_work |= 1u << (4 * static_cast<int>(shadow_dtype) + static_cast<int>(param_dtype));
  }

  const EmaHead head{decay, 1.0 - decay};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int pair = 0; pair < 16; ++pair) {
    if ((pairs_with_work & (1u << pair)) == 0) continue;
    const DType shadow_dtype = static_cast<DType>(pair / 4);
    const DType param_dtype = static_cast<DType>(pair % 4);
    cuda::dispatch_float_types(shadow_dtype, kWho, [&](auto shadow_tag) {
      using S = decltype(shadow_tag);
      if (param_dtype == shadow_dtype) {
        run_group<S, S>(table, shadow_dtype, param_dtype, head, st);
      } else if constexpr (std::is_same_v<S, float>) {  // the mixed pairs (supported_pair)
        if (param_dtype == DType::BFloat16)
          run_group<float, __nv_bfloat16>(table, shadow_dtype, param_dtype, head, st);
        else
          run_group<float, __half>(table, shadow_dtype, param_dtype, head, st);
      }
    });
  }
}

}  // namespace kexue
