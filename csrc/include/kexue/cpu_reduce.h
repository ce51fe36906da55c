// Deterministic, latency-hiding sums over a row for the CPU kernels. Torch-free.
#pragma once
#include <cstdint>
#include <cstring>

#include "kexue/cpu_types.h"
#include "kexue/simd.h"

namespace kexue {
namespace KEXUE_CPU_NS {

// Σ_d term(at_d) for d in [0, D): `term` receives a reader `at` and returns its summand
// computed from at(p) — p[d] as a scalar, or a full-width vector of consecutive elements from p + d —
// e.g. [&](auto at) { return at(x) * at(y); }. p points to A values, or to any T with acc_t<T> = A
// that this level widens in registers (kVectorWidening<T>: bfloat16 rows are read as they are). Four independent vector accumulators hide the
// latency of the additions (a single accumulator, which is what `omp simd reduction` gives,
// runs at a quarter of the speed). The order of the additions depends only on D and the ISA
// level (its vector width).
template <class A, class Term>
A row_sum(int64_t D, Term term) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>;
  auto vec_at = [](int64_t d) {
    return [d](const auto* p) -> V {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(p)>>;
      if constexpr (std::is_same_v<T, A>) {
        V v;
        std::memcpy(&v, p + d, sizeof v);
        return v;
      } else {
        return load_widened(p + d);
      }
    };
  };
  int64_t d = 0;
  if (D < L) {  // no vector: the sum of the scalar tail below, without reducing empty accumulators
    A total = 0;
    for (; d < D; ++d) total += term([d](const auto* p) { return static_cast<A>(to_float(p[d])); });
    return total;
  }
  V acc0{}, acc1{}, acc2{}, acc3{};
  for (; d + 4 * L <= D; d += 4 * L) {
    acc0 += term(vec_at(d));
    acc1 += term(vec_at(d + L));
    acc2 += term(vec_at(d + 2 * L));
    acc3 += term(vec_at(d + 3 * L));
  }
  for (; d + L <= D; d += L) acc0 += term(vec_at(d));
  A total = lane_sum<A>((acc0 + acc1) + (acc2 + acc3));
  for (; d < D; ++d) total += term([d](const auto* p) { return static_cast<A>(to_float(p[d])); });
  return total;
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
