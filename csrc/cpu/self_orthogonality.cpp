// The Self-Orthogonality penalty's tanh and column sums of squares on the CPU (kexue/self_orthogonality.h).
// Rows are cut into chunks of kChunkRows; each chunk's rows are done in order, kBlock columns at a
// time, into that chunk's partial sums; the partial sums are then added in chunk order.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "kexue/cpu_activations.h"
#include "kexue/cpu_types.h"
#include "kexue/self_orthogonality.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

constexpr int64_t kChunkRows = 16;  // rows per unit of parallel work and per partial sum
constexpr int64_t kBlock = 512;     // columns converted and processed at a time

// t = tanh(gamma · y) for n values (unless t_given), and partial[j] += t[j]² for each.
template <class A>
void tanh_squares(const A* y, A* t, A* partial, int64_t n, A gamma, bool t_given) {
  constexpr int64_t L = kLanes<A>;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec<A> v = t_given ? load<Vec<A>>(t + j) : activate<Activation::Tanh, A>(gamma * load<Vec<A>>(y + j));
    if (!t_given) store(t + j, v);
    store(partial + j, load<Vec<A>>(partial + j) + v * v);
  }
  if (j < n) {  // the tail, zero-padded to a vector (tanh(0) = 0)
    alignas(64) A in[L] = {}, out[L];
    std::copy(t_given ? t + j : y + j, (t_given ? t : y) + n, in);
    const Vec<A> v = t_given ? load<Vec<A>>(in) : activate<Activation::Tanh, A>(gamma * load<Vec<A>>(in));
    store(out, v);
    for (int64_t i = 0; i < n - j; ++i) {
      if (!t_given) t[j + i] = out[i];
      partial[j + i] += out[i] * out[i];
    }
  }
}

template <class T>
void run(const T* y, acc_t<T>* t, acc_t<T>* sumsq, int64_t b, int64_t k, double gamma, bool t_given) {
  using A = acc_t<T>;
  const int64_t n_chunks = (b + kChunkRows - 1) / kChunkRows;
  std::vector<A> partials(static_cast<size_t>(std::max<int64_t>(n_chunks, 1) * k), A(0));  // b = 0: zero sums
#pragma omp parallel for schedule(static) if (b * k > 16384)
  for (int64_t c = 0; c < n_chunks; ++c) {
    A* partial = partials.data() + c * k;
    A buf[kBlock];
    for (int64_t r = c * kChunkRows; r < std::min(b, (c + 1) * kChunkRows); ++r) {
      for (int64_t j = 0; j < k; j += kBlock) {
        const int64_t m = std::min(kBlock, k - j);
        const A* row = t_given ? nullptr : as_acc(y + r * k + j, m, buf);
        tanh_squares<A>(row, t + r * k + j, partial + j, m, static_cast<A>(gamma), t_given);
      }
    }
  }
  std::copy(partials.begin(), partials.begin() + k, sumsq);
  for (int64_t c = 1; c < n_chunks; ++c) {
    const A* partial = partials.data() + c * k;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) sumsq[j] += partial[j];
  }
}

}  // namespace

void self_orthogonality_tanh_cpu(DType dtype, const void* y, void* t, void* sumsq, int64_t b, int64_t k, double gamma,
                                 bool t_given) {
  if (b < 0 || k <= 0) return;
  dispatch_dtype<Float16, BFloat16>(dtype, "self_orthogonality_tanh", [&](auto zero) {
    using T = decltype(zero);
    run<T>(static_cast<const T*>(y), static_cast<acc_t<T>*>(t), static_cast<acc_t<T>*>(sumsq), b, k, gamma, t_given);
  });
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
