// Multi-tensor weight EMA on the CPU (docs/ema.md):
//     shadow[i] <- d * shadow[i] + w * param[i],   d = decay, w = 1 - decay,
// in float (double for float64 shadows), rounded to the shadow's dtype. Every tensor is cut into
// chunks of kChunk elements and the chunks of all tensors are shared among the OpenMP threads
// in one parallel loop, so one call updates a whole model. 16-bit values are widened and
// narrowed kBlock elements at a time through stack buffers, with no temporaries on the heap.
#include <omp.h>

#include <string>
#include <utility>
#include <vector>

#include "kexue/cpu_types.h"
#include "kexue/ema_update.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // elements per unit of parallel work
constexpr int64_t kBlock = 512;               // elements per conversion block

template <class S, class P>
void update_range(S* shadow, const P* param, int64_t n, double decay) {
  using A = acc_t<S>;
  const A d = static_cast<A>(decay), w = static_cast<A>(1.0 - decay);
  if constexpr (std::is_same_v<S, A> && std::is_same_v<P, A>) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) shadow[k] = d * shadow[k] + w * param[k];
  } else {
    A s_buf[kBlock], p_buf[kBlock];
    for (int64_t start = 0; start < n; start += kBlock) {
      const int64_t m = std::min(kBlock, n - start);
      A* s = std::is_same_v<S, A> ? reinterpret_cast<A*>(shadow + start) : s_buf;
      if constexpr (!std::is_same_v<S, A>) widen_row(shadow + start, m, s_buf);
      const A* p = as_acc(param + start, m, p_buf);
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) s[k] = d * s[k] + w * p[k];
      if constexpr (!std::is_same_v<S, A>) narrow_row(s_buf, m, shadow + start);
    }
  }
}

using RangeFn = void (*)(void*, const void*, int64_t, double);

template <class S, class P>
void update_erased(void* shadow, const void* param, int64_t n, double decay) {
  update_range<S, P>(static_cast<S*>(shadow), static_cast<const P*>(param), n, decay);
}

// The kernel of a (shadow, param) dtype pair; throws for pairs docs/ema.md does not allow.
RangeFn kernel_for(DType s, DType p, int64_t index) {
  if (s == DType::Float32 && p == DType::Float32) return update_erased<float, float>;
  if (s == DType::Float32 && p == DType::BFloat16) return update_erased<float, BFloat16>;
  if (s == DType::Float32 && p == DType::Float16) return update_erased<float, Float16>;
  if (s == DType::Float64 && p == DType::Float64) return update_erased<double, double>;
  if (s == DType::BFloat16 && p == DType::BFloat16) return update_erased<BFloat16, BFloat16>;
  if (s == DType::Float16 && p == DType::Float16) return update_erased<Float16, Float16>;
  fail("ema_update: unsupported (shadow, param) dtype codes (" + std::to_string(static_cast<int>(s)) + ", " +
       std::to_string(static_cast<int>(p)) + ") at index " + std::to_string(index));
}

}  // namespace

void ema_update_cpu(const TensorTable& table, double decay) {
  table.expect_layout(2, 1, "ema_update");
  constexpr int kShadow = 0, kParam = 1;
  // Validate every pair before touching any memory, and list the chunks of work.
  const int64_t n_tensors = table.n;
  std::vector<RangeFn> kernels(n_tensors);
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (tensor, first element)
  int64_t total = 0;
  for (int64_t i = 0; i < n_tensors; ++i) {
    kernels[i] = kernel_for(table.dtype(i, kShadow), table.dtype(i, kParam), i);
    const int64_t numel = table.size(i, 0);
    for (int64_t start = 0; start < numel; start += kChunk) chunks.emplace_back(i, start);
    total += numel;
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (total > kChunk)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const auto [i, start] = chunks[c];
    const int64_t s_bytes = element_size(table.dtype(i, kShadow));
    const int64_t p_bytes = element_size(table.dtype(i, kParam));
    kernels[i](static_cast<char*>(table.pointer(i, kShadow)) + start * s_bytes,
               static_cast<const char*>(table.pointer(i, kParam)) + start * p_bytes,
               std::min(kChunk, table.size(i, 0) - start), decay);
  }
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
