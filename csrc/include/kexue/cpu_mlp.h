// The building blocks of the CPU kernels of an MLP branch (csrc/cpu/iresnet*.cpp): a layer packed
// for the register-blocked product micro-kernel, the product itself with a fused epilogue, row
// copies between strides, and the split of a batch into blocks of rows among the OpenMP threads.
// Torch-free; included only by csrc/cpu/ (everything lives in the ISA level's namespace, in an
// unnamed namespace: each file that includes it has its own copy, so no copy of one level can be
// linked into another's code).
//
// The product of a block of rows and a layer: a tile of kTileRows rows × kTileVecs vectors of
// outputs lives in registers while the layer's inputs stream through, the weight panel is read as
// whole vectors, each input element is broadcast once per tile, and an epilogue (bias,
// activation, a product with a'(h), an accumulation, ...) is applied to the tile before it leaves
// the registers.
//
// Packed layout of a layer as the product `out = in · P (+ bias)` (P is K × N): columns in slabs of
// kTileVecs vectors (the last slab as many vectors as it needs), each slab K rows of its width,
// zero beyond N; the forward uses P = Wᵀ (K = in, N = out), the adjoint P = W (K = out, N = in).
// A narrow layer (is_narrow) is packed as Pᵀ instead, row by row. Workspace rows are padded to
// whole vectors; the padding lanes of every buffer hold finite values (zeros, or what zero
// weights and biases give) unless the row's own values are not finite, and meet zero weights
// wherever a product reads them.
//
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kexue/common.h"
#include "kexue/simd.h"
#include "kexue/tensor_table.h"

namespace kexue {
namespace KEXUE_CPU_NS {
namespace {

constexpr int kWeight = 0, kSecond = 1;  // table slots: (weight, bias) or (weight, deriv)
constexpr int kRows = 0, kCols = 1;      // table sizes
// Register tile of the micro-kernel: rows × vectors (accumulators + one weight vector per column
// vector + a broadcast fit the 32 registers of AVX-512, the 16 of AVX2 / SSE2).
constexpr int kTileRows = 6;
constexpr int kTileVecs = kVectorBytes == 64 ? 4 : 2;
constexpr int64_t kBlockRows = 48;

template <class T>
constexpr int64_t padded(int64_t n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// One layer as the micro-kernel reads it (the packed layout above).
template <class T>
struct PackedLayer {
  const T* panel = nullptr;  // K × padded(N), slab by slab; narrow: N × padded(K), row by row
  const T* bias = nullptr;   // padded(N) values (zeros beyond N), or null
  int64_t K = 0, N = 0;
  bool narrow = false;  // is_narrow(N)
};

// A layer of at most half a vector of outputs (a 2-D flow's last layer) is computed as dot
// products along K instead: the slab tile would spend most of its lanes on zero padding.
template <class T>
constexpr bool is_narrow(int64_t N) {
  return 2 * N <= kLanes<T>;
}

template <class T>
constexpr int64_t packed_elems(int64_t K, int64_t N) {
  return is_narrow<T>(N) ? N * padded<T>(K) : K * padded<T>(N);
}

// Packs `weight` (rows × cols, row-major) as P = weightᵀ (transposed) or P = weight, and copies
// the bias (rows values, may be null) zero-padded. A narrow layer is packed as Pᵀ, each of its N
// rows padded to whole vectors with zeros.
template <class T>
void pack(const T* weight, int64_t rows, int64_t cols, bool transposed, const T* bias, T* panel, T* padded_bias) {
  const int64_t K = transposed ? cols : rows, N = transposed ? rows : cols;
  const int64_t slab = kTileVecs * kLanes<T>;
  T* out = panel;
  if (is_narrow<T>(N))
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < padded<T>(K); ++k)
        *out++ = k >= K ? T(0) : transposed ? weight[n * cols + k] : weight[k * cols + n];
  for (int64_t c0 = 0; c0 < N && !is_narrow<T>(N); c0 += slab) {
    const int64_t width = std::min(slab, padded<T>(N - c0));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < width; ++c) {
        const int64_t n = c0 + c;
        *out++ = n >= N ? T(0) : transposed ? weight[n * cols + k] : weight[k * cols + n];
      }
  }
  if (padded_bias != nullptr)
    for (int64_t n = 0; n < padded<T>(N); ++n) padded_bias[n] = bias != nullptr && n < N ? bias[n] : T(0);
}

// Applies `epilogue(value, row, col)` in place to the finished tile of `rows` rows × `vecs`
// vectors at out + c0. Out of line: inlined, the epilogue's constants (an activation has a
// dozen) would be hoisted out of the row loop and take the registers of the product loop.
template <class T, class Epilogue>
[[gnu::noinline]] void finish_tile(const Epilogue& epilogue, T* out, int64_t ld_out, int rows, int vecs, int64_t row0,
                                   int64_t c0) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < vecs; ++v) {
      T* at = out + r * ld_out + c0 + v * L;
      store(at, epilogue(load<Vec<T>>(at), row0 + r, c0 + v * L));
    }
}

// out[r, c0 : c0 + NV·lanes] = epilogue(bias + in[r, :K] · slab) for MR rows.
template <class T, int MR, int NV, class Epilogue>
inline void tile(const T* in, int64_t ld_in, const T* slab, int64_t K, const T* bias, T* out, int64_t ld_out,
                 int64_t row0, int64_t c0, const Epilogue& epilogue) {
  using V = Vec<T>;
  constexpr int L = kLanes<T>;
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const V b = bias != nullptr ? load<V>(bias + c0 + v * L) : V{};
    for (int r = 0; r < MR; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load<V>(slab + k * NV * L + v * L);
    for (int r = 0; r < MR; ++r) {
      const V a = splat(in[r * ld_in + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * w[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * ld_out + c0 + v * L, acc[r][v]);
  finish_tile(epilogue, out, ld_out, MR, NV, row0, c0);
}

template <class T, int NV, class Epilogue>
void slab_rows(const T* in, int64_t ld_in, int64_t rows, const T* slab, int64_t K, const T* bias, T* out,
               int64_t ld_out, int64_t c0, const Epilogue& epilogue) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile<T, kTileRows, NV>(in + r * ld_in, ld_in, slab, K, bias, out + r * ld_out, ld_out, r, c0, epilogue);
  const T* i = in + r * ld_in;
  T* o = out + r * ld_out;
  static_assert(kTileRows == 6);
  switch (rows - r) {
    case 5: tile<T, 5, NV>(i, ld_in, slab, K, bias, o, ld_out, r, c0, epilogue); break;
    case 4: tile<T, 4, NV>(i, ld_in, slab, K, bias, o, ld_out, r, c0, epilogue); break;
    case 3: tile<T, 3, NV>(i, ld_in, slab, K, bias, o, ld_out, r, c0, epilogue); break;
    case 2: tile<T, 2, NV>(i, ld_in, slab, K, bias, o, ld_out, r, c0, epilogue); break;
    case 1: tile<T, 1, NV>(i, ld_in, slab, K, bias, o, ld_out, r, c0, epilogue); break;
    default: break;
  }
}

// The narrow product for MR rows: out[r, n] = bias[n] + Σ_k in[r, k] P[k, n], each a dot product
// of whole vectors along K (the input's padding lanes are finite and meet zero weights), then the
// epilogue on the row's one vector (zeros beyond N).
template <class T, int MR, class Epilogue>
inline void narrow_tile(const T* in, int64_t ld_in, const PackedLayer<T>& layer, T* out, int64_t ld_out, int64_t row0,
                        const Epilogue& epilogue) {
  using V = Vec<T>;
  constexpr int L = kLanes<T>;
  const int64_t Kp = padded<T>(layer.K);
  T sums[MR][L] = {};
  for (int64_t n = 0; n < layer.N; ++n) {
    const T* w = layer.panel + n * Kp;
    V acc[MR] = {};
    for (int64_t k = 0; k < Kp; k += L) {
      const V weight = load<V>(w + k);
      for (int r = 0; r < MR; ++r) acc[r] += load<V>(in + r * ld_in + k) * weight;
    }
    for (int r = 0; r < MR; ++r) sums[r][n] = lane_sum<T>(acc[r]) + (layer.bias != nullptr ? layer.bias[n] : T(0));
  }
  for (int r = 0; r < MR; ++r) std::memcpy(out + r * ld_out, sums[r], sizeof sums[r]);
  finish_tile(epilogue, out, ld_out, MR, 1, row0, 0);
}

template <class T, class Epilogue>
void narrow_rows(const T* in, int64_t ld_in, int64_t rows, const PackedLayer<T>& layer, T* out, int64_t ld_out,
                 const Epilogue& epilogue) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    narrow_tile<T, kTileRows>(in + r * ld_in, ld_in, layer, out + r * ld_out, ld_out, r, epilogue);
  for (; r < rows; ++r) narrow_tile<T, 1>(in + r * ld_in, ld_in, layer, out + r * ld_out, ld_out, r, epilogue);
}

// out (rows × padded(N), row stride ld_out) = epilogue(in · P + bias); in has row stride ld_in
// (at least padded(K), every lane finite).
template <class T, class Epilogue>
void product(const T* in, int64_t ld_in, int64_t rows, const PackedLayer<T>& layer, T* out, int64_t ld_out,
             const Epilogue& epilogue) {
  if (layer.narrow) return narrow_rows(in, ld_in, rows, layer, out, ld_out, epilogue);
  constexpr int64_t slab_width = kTileVecs * kLanes<T>;
  const T* slab = layer.panel;
  for (int64_t c0 = 0; c0 < layer.N; c0 += slab_width) {
    const int nv = static_cast<int>(std::min(slab_width, padded<T>(layer.N - c0)) / kLanes<T>);
    switch (nv) {
      case 1: slab_rows<T, 1>(in, ld_in, rows, slab, layer.K, layer.bias, out, ld_out, c0, epilogue); break;
      case 2: slab_rows<T, 2>(in, ld_in, rows, slab, layer.K, layer.bias, out, ld_out, c0, epilogue); break;
      default:
        if constexpr (kTileVecs == 4) {
          if (nv == 3)
            slab_rows<T, 3>(in, ld_in, rows, slab, layer.K, layer.bias, out, ld_out, c0, epilogue);
          else
            slab_rows<T, 4>(in, ld_in, rows, slab, layer.K, layer.bias, out, ld_out, c0, epilogue);
        }
        break;
    }
    slab += layer.K * nv * kLanes<T>;
  }
}

// The packed layers of one call, shared by the threads.
template <class T>
struct PackedBranch {
  std::vector<T> storage;
  std::vector<PackedLayer<T>> layers;
  int64_t max_width = 0;  // padded, over every layer's N

  PackedBranch(const TensorTable& table, bool forward) : layers(table.n) {
    int64_t total = 0;
    for (int64_t k = 0; k < table.n; ++k) {
      const int64_t K = forward ? table.size(k, kCols) : table.size(k, kRows);
      const int64_t N = forward ? table.size(k, kRows) : table.size(k, kCols);
      total += packed_elems<T>(K, N) + padded<T>(N);
      max_width = std::max(max_width, padded<T>(N));
    }
    storage.resize(total);
    T* at = storage.data();
    for (int64_t k = 0; k < table.n; ++k) {
      const int64_t rows = table.size(k, kRows), cols = table.size(k, kCols);
      PackedLayer<T>& layer = layers[k];
      layer.K = forward ? cols : rows;
      layer.N = forward ? rows : cols;
      layer.narrow = is_narrow<T>(layer.N);
      T* bias = at + packed_elems<T>(layer.K, layer.N);
      pack(static_cast<const T*>(table.pointer(k, kWeight)), rows, cols, forward,
           forward ? static_cast<const T*>(table.pointer(k, kSecond)) : nullptr, at, bias);
      layer.panel = at;
      layer.bias = forward ? bias : nullptr;
      at = bias + padded<T>(layer.N);
    }
  }
};

// Copies `rows` rows of `n` elements between row strides `from_stride` and `to_stride`.
template <class T>
void copy_rows(const T* from, int64_t from_stride, int64_t rows, int64_t n, T* to, int64_t to_stride) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(to + r * to_stride, from + r * from_stride, n * sizeof(T));
}

// Calls body(first, rows) for every block of rows, the blocks shared among the threads.
template <class Body>
void for_each_block(int64_t B, const Body& body) {
  const int64_t threads = omp_get_max_threads();
  const int64_t rows = std::clamp<int64_t>((B + threads - 1) / threads, 1, kBlockRows);
  const int64_t blocks = (B + rows - 1) / rows;
#pragma omp parallel for schedule(dynamic, 1) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) body(b * rows, std::min(rows, B - b * rows));
}

// Throws std::invalid_argument (naming `what`) unless `table` is an MLP branch of `dtype`
// (float32 or float64): slots (weight, second), sizes (rows, cols), L ≥ 1 layers chained with no zero width.
inline void check_branch_table(DType dtype, const TensorTable& table, const char* what) {
  table.expect_layout(2, 2, what);
  if (dtype != DType::Float32 && dtype != DType::Float64)
    fail(std::string(what) + ": dtype must be float32 or float64, got " + dtype_name(dtype));
  if (table.n < 1) fail(std::string(what) + ": the branch needs at least one layer");
  for (int64_t k = 0; k < table.n; ++k) {
    if (table.dtype(k, kWeight) != dtype || table.dtype(k, kSecond) != dtype)
      fail(std::string(what) + ": layer " + std::to_string(k) + " is not of the dtype " + dtype_name(dtype));
    if (table.size(k, kRows) < 1 || table.size(k, kCols) < 1)
      fail(std::string(what) + ": layer " + std::to_string(k) + " has a zero width");
    const int64_t next_in = table.size((k + 1) % table.n, kCols);
    if (table.size(k, kRows) != next_in)
      fail(std::string(what) + ": layer " + std::to_string(k) + " has " + std::to_string(table.size(k, kRows)) +
           " outputs but the next layer takes " + std::to_string(next_in));
  }
}

}  // namespace
}  // namespace KEXUE_CPU_NS
}  // namespace kexue
