// Conditional LayerNorm / RMSNorm on CUDA, forward and backward (docs/cond_layer_norm.md).
//
// Math, for one row x ∈ R^D with gain w and bias b (rows of per-row affine views):
//
//   LayerNorm:  mu = mean_d x,  var = mean_d (x - mu)^2   (two passes over the row, which is held
//               in registers, so x is read from memory once; never E[x^2] - mu^2),
//               rstd = 1 / sqrt(var + eps),  xhat = (x - mu) * rstd,  y = xhat * w + b.
//   RMSNorm:    mu = 0,  rstd = 1 / sqrt(mean_d x^2 + eps),  xhat = x * rstd,  y = xhat * w + b.
//
//   Backward (mu and rstd are recomputed from x; nothing is saved by the forward), with
//   g = grad_out and g' = g * w:
//     grad_x = rstd * (g' - mean_d(g') - xhat * mean_d(g' * xhat))      (LayerNorm)
//     grad_x = rstd * (g' - xhat * mean_d(g' * xhat))                   (RMSNorm)
//     grad_w[grp, d] = sum_{rows r of grp} g[r, d] * xhat[r, d]
//     grad_b[grp, d] = sum_{rows r of grp} g[r, d]
//
// Arithmetic and accumulation in float (double for Float64 tensors).
//
// Kernel design
// -------------
// * A "row slot" is TX threads (a power of two, 1..512) that own one row at a time; a CTA is a
//   (TX, TY) block holding TY row slots. Thread tx of a slot owns the vectors (VEC elements, 16
//   bytes when every pointer/stride allows it, else 1 element) tx, tx + TX, tx + 2 TX, ... of the
//   row, at most NJ of them, kept in registers. Row sums use xor-butterfly warp shuffles (all lanes
//   get bitwise the same sum); when TX > 32 the per-warp sums are combined through shared memory,
//   in warp order, behind one __syncthreads (each reduction site has its own shared slot, double
//   buffered by iteration parity, so one barrier per reduction is enough).
// * Rows too long for the register cache (D > 512 * NJ * VEC) go to "generic" kernels: one row
//   per 512-thread CTA, re-reading the row from global memory (L2) for every pass.
// * Backward: CTA k (of n_blocks = n_groups * K, K = ceil(group_rows / rows_per_block)) walks
//   the rows [start, end) of block k; slot ty takes rows start + ty, start + ty + TY, ... in
//   order and keeps per-column partial sums of g * xhat and g in registers (columns are owned by
//   the same thread for every row). At the end the TY slots add their partials into the
//   block's scratch rows in slot order (one barrier each), so the result is deterministic without
//   atomics. A second kernel sums the K partial rows of each group in block order and casts to
//   the output dtype. The generic backward kernel accumulates straight into the block's scratch
//   rows (each column owned by one thread of the one CTA that owns the block).
// * All index math is 64-bit; grids are grid-stride loops, so any row count works.
#include "kexue/cond_layer_norm.h"
#include "kexue/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace kexue {
namespace {

constexpr int kMaxThreads = 512;             // largest CTA (and largest row slot)
constexpr int kMaxWarps = kMaxThreads / 32;  // warps per CTA, for the reduction scratch
constexpr int kFwdThreads = 256;             // CTA size when row slots are small
constexpr int kBwdThreads = 256;
constexpr int kGenericThreads = kMaxThreads;  // row slot (= CTA) of the generic kernels
constexpr int kReduceThreads = 256;

// ---------------------------------------------------------------------------------------------
// Types and conversions
// ---------------------------------------------------------------------------------------------
using cuda::acc_t;
using cuda::FromAcc;
using cuda::to_acc;

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// VEC consecutive elements moved as one (up to 16-byte) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// 16-byte packs travel as uint4 so that the compiler always emits one 128-bit access (left to
// itself, it sometimes splits an unrolled Pack copy into scalar accesses).
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, acc_t<T> (&out)[VEC]) {
  Pack<T, VEC> pk;
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(&pk, &u, 16);
  } else {
    pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_acc(pk.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const acc_t<T> (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = FromAcc<T>::cast(in[e]);
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    uint4 u;
    memcpy(&u, &pk, 16);
    __stwb(reinterpret_cast<uint4*>(p), u);
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// Row r's parameter row (nullptr when the view is absent).
template <typename T>
__device__ __forceinline__ const T* affine_row(const T* p, int64_t sb, int64_t sm, int64_t r, int64_t rps) {
  if (p == nullptr) return nullptr;
  const int64_t b = r / rps;
  const int64_t m = r - b * rps;
  return p + b * sb + m * sm;
}

// ---------------------------------------------------------------------------------------------
// Row-slot all-reduce: every thread of the TX-thread slot (threads tx = 0..TX-1 at the same
// threadIdx.y) ends with the same sums. Must be reached by every thread of the CTA (it may hold a
// __syncthreads). `red` is this call site's private shared buffer of kMaxWarps * N entries; the
// caller double-buffers it by iteration parity (see the file comment).
// ---------------------------------------------------------------------------------------------
template <typename Acc, int N>
__device__ __forceinline__ void slot_allreduce(Acc (&v)[N], Acc* red) {
  const int TX = static_cast<int>(blockDim.x);
  const int width = TX < 32 ? TX : 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    for (int o = width >> 1; o > 0; o >>= 1) v[n] += __shfl_xor_sync(0xffffffffu, v[n], o);
  }
  if (TX > 32) {  // uniform over the CTA
    const int tid = static_cast<int>(threadIdx.y) * TX + static_cast<int>(threadIdx.x);
    const int warp = tid >> 5;
    const int nw = TX >> 5;                                // warps per slot
    const int first = static_cast<int>(threadIdx.y) * nw;  // first warp of this slot
    if ((tid & 31) == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) red[warp * N + n] = v[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      Acc s = red[first * N + n];
      for (int w = 1; w < nw; ++w) s += red[(first + w) * N + n];
      v[n] = s;
    }
  }
}

// Shared buffers for up to 3 reduction sites of up to 2 values, double-buffered by parity.
template <typename Acc>
struct RedSmem {
  Acc buf[3][2][kMaxWarps * 2];
};

// ---------------------------------------------------------------------------------------------
// Row statistics shared by the forward and backward kernels: mu (0 for RMSNorm) and
// rstd = 1 / sqrt(ms + eps), with ms the mean square of x - mu. They use reduction sites 0 and 1
// of `sm` at parity `par` and, like slot_allreduce, must be reached by every thread of the CTA.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
struct RowStats {
  Acc mu;
  Acc rstd;
};

// Row mean of the slot's per-thread partial sums: slot_allreduce through `red`, then / dn.
template <typename Acc>
__device__ __forceinline__ Acc slot_mean(Acc partial, Acc dn, Acc* red) {
  Acc v[1] = {partial};
  slot_allreduce<Acc, 1>(v, red);
  return v[0] / dn;
}

// Register-cached kernels. The first pass is fused with loading the row: for each vector it
// loads, the kernel calls add_row_sum on its running sum s (starting at 0). cached_row_stats
// then does the rest; v holds this thread's vectors of the row, vector j being column
// c = tx + j * TX, and only those with active && c < nvec belong to the row.
template <typename Acc, int VEC>
__device__ __forceinline__ void add_row_sum(Acc& s, const Acc (&v)[VEC], bool rms) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) s += rms ? v[e] * v[e] : v[e];
}

// mu and rstd from this thread's partial sum s of the row (of x, or of x^2 for RMSNorm) and, for
// LayerNorm, deviation_sum(mu): this thread's partial sum of (x - mu)^2.
template <typename Acc, class DeviationSum>
__device__ __forceinline__ RowStats<Acc> row_stats(Acc s, Acc dn, Acc eps, bool rms, RedSmem<Acc>& sm, int par,
                                                   DeviationSum deviation_sum) {
  const Acc m = slot_mean(s, dn, sm.buf[0][par]);  // mean of x^2 (RMSNorm) or of x
  Acc mu = Acc(0);
  Acc ms = m;  // mean square (of x - mu)
  if (!rms) {
    mu = m;
    ms = slot_mean(deviation_sum(mu), dn, sm.buf[1][par]);
  }
  return {mu, inv_sqrt(ms + eps)};
}

template <typename Acc, int VEC, int NJ>
__device__ __forceinline__ RowStats<Acc> cached_row_stats(Acc s, const Acc (&v)[NJ][VEC], bool active, int64_t nvec,
                                                          Acc dn, Acc eps, bool rms, RedSmem<Acc>& sm, int par) {
  const int TX = static_cast<int>(blockDim.x);
  const int tx = static_cast<int>(threadIdx.x);
  return row_stats(s, dn, eps, rms, sm, par, [&](Acc mu) {
    Acc q = Acc(0);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int64_t c = tx + static_cast<int64_t>(j) * TX;
      if (active && c < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const Acc dv = v[j][e] - mu;
          q += dv * dv;
        }
      }
    }
    return q;
  });
}

// Generic kernels (one row per CTA, TY == 1): the row xr is read from global memory for each
// pass.
template <typename T>
__device__ __forceinline__ RowStats<acc_t<T>> generic_row_stats(const T* xr, int64_t D, acc_t<T> dn, acc_t<T> eps,
                                                                bool rms, RedSmem<acc_t<T>>& sm, int par) {
  using Acc = acc_t<T>;
  const int64_t TX = blockDim.x;
  const int64_t tx = threadIdx.x;
  Acc s = Acc(0);
  for (int64_t c = tx; c < D; c += TX) {
    const Acc xv = to_acc(xr[c]);
    s += rms ? xv * xv : xv;
  }
  return row_stats(s, dn, eps, rms, sm, par, [&](Acc mu) {
    Acc q = Acc(0);
    for (int64_t c = tx; c < D; c += TX) {
      const Acc dv = to_acc(xr[c]) - mu;
      q += dv * dv;
    }
    return q;
  });
}

// The VEC parameter values at row + off, or VEC copies of `fill` when the view is absent (row
// is null).
template <typename T, int VEC>
__device__ __forceinline__ void load_pack_or(const T* row, int64_t off, acc_t<T> fill, acc_t<T> (&out)[VEC]) {
  if (row != nullptr) {
    load_pack<T, VEC>(row + off, out);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = fill;
  }
}

// The geometry every register-cached kernel starts from: the CTA's row-slot shape (TX, TY), this
// thread's place (tx, ty) in it, the vectors per row (nvec) and D as Acc (dn, the divisor of
// the means).
template <typename Acc>
struct CachedRows {
  int TX, TY, tx, ty;
  int64_t nvec;
  Acc dn;
};
template <typename Acc, int VEC>
__device__ __forceinline__ CachedRows<Acc> cached_rows(int64_t D) {
  return {static_cast<int>(blockDim.x),
          static_cast<int>(blockDim.y),
          static_cast<int>(threadIdx.x),
          static_cast<int>(threadIdx.y),
          D / VEC,
          static_cast<Acc>(D)};
}

// ---------------------------------------------------------------------------------------------
// Forward, row cached in registers. Block (TX, TY); each thread owns NJ vectors of VEC elements.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, int NJ>
__global__ void __launch_bounds__(kMaxThreads)
    cln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t w_sb, int64_t w_sm,
                   const T* __restrict__ bias, int64_t b_sb, int64_t b_sm, T* __restrict__ y, int64_t rows, int64_t rps,
                   int64_t D, acc_t<T> eps, bool rms) {
  using Acc = acc_t<T>;
  __shared__ RedSmem<Acc> sm;
  const auto [TX, TY, tx, ty, nvec, dn] = cached_rows<Acc, VEC>(D);

  unsigned it = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * TY; base < rows;
       base += static_cast<int64_t>(gridDim.x) * TY, ++it) {
    const int64_t r = base + ty;
    const bool active = r < rows;
    const int par = static_cast<int>(it & 1u);
    const T* xr = x + (active ? r : base) * D;

    Acc v[NJ][VEC];
    Acc s = Acc(0);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int64_t c = tx + static_cast<int64_t>(j) * TX;
      if (active && c < nvec) {
        load_pack<T, VEC>(xr + c * VEC, v[j]);
        add_row_sum<Acc, VEC>(s, v[j], rms);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[j][e] = Acc(0);
      }
    }
    const RowStats<Acc> st = cached_row_stats<Acc, VEC, NJ>(s, v, active, nvec, dn, eps, rms, sm, par);
    const Acc mu = st.mu;
    const Acc rstd = st.rstd;

    if (active) {
      const T* wr = affine_row(w, w_sb, w_sm, r, rps);
      const T* br = affine_row(bias, b_sb, b_sm, r, rps);
      T* yr = y + r * D;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int64_t c = tx + static_cast<int64_t>(j) * TX;
        if (c < nvec) {
          Acc wv[VEC], bv[VEC], out[VEC];
          load_pack_or<T, VEC>(wr, c * VEC, Acc(1), wv);
          load_pack_or<T, VEC>(br, c * VEC, Acc(0), bv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[e] = (v[j][e] - mu) * rstd * wv[e] + bv[e];
          store_pack<T, VEC>(yr + c * VEC, out);
        }
      }
    }
  }
}

// The geometry the generic kernels start from: the CTA (one row slot of TX threads), this
// thread's column offset tx, and D as Acc (dn).
template <typename Acc>
struct GenericRow {
  int64_t TX, tx;
  Acc dn;
};
template <typename Acc>
__device__ __forceinline__ GenericRow<Acc> generic_row(int64_t D) {
  return {blockDim.x, threadIdx.x, static_cast<Acc>(D)};
}

// Forward for rows longer than the register cache: one row per CTA (TY == 1), three passes over
// global memory.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cln_fwd_generic_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t w_sb, int64_t w_sm,
                           const T* __restrict__ bias, int64_t b_sb, int64_t b_sm, T* __restrict__ y, int64_t rows,
                           int64_t rps, int64_t D, acc_t<T> eps, bool rms) {
  using Acc = acc_t<T>;
  __shared__ RedSmem<Acc> sm;
  const auto [TX, tx, dn] = generic_row<Acc>(D);

  unsigned it = 0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x, ++it) {
    const int par = static_cast<int>(it & 1u);
    const T* xr = x + r * D;
    const RowStats<Acc> st = generic_row_stats<T>(xr, D, dn, eps, rms, sm, par);
    const Acc mu = st.mu;
    const Acc rstd = st.rstd;
    const T* wr = affine_row(w, w_sb, w_sm, r, rps);
    const T* br = affine_row(bias, b_sb, b_sm, r, rps);
    T* yr = y + r * D;
    for (int64_t c = tx; c < D; c += TX) {
      const Acc wv = wr != nullptr ? to_acc(wr[c]) : Acc(1);
      const Acc bv = br != nullptr ? to_acc(br[c]) : Acc(0);
      yr[c] = FromAcc<T>::cast((to_acc(xr[c]) - mu) * rstd * wv + bv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, rows cached in registers. CTA k handles block k of the reduction plan (its rows from
// bwd_block_rows). part_w / part_b: the (n_blocks, D) partial-sum rows (either may be null: not
// wanted).
// ---------------------------------------------------------------------------------------------
// Rows of block k of the backward reduction plan: g = k / K, kk = k % K,
// rows [g*group_rows + kk*rpb, min(that + rpb, (g+1)*group_rows)).
struct RowRange {
  int64_t start;
  int64_t end;  // exclusive
};

__device__ __forceinline__ RowRange bwd_block_rows(int64_t k, int64_t group_rows, int64_t rpb, int64_t K) {
  const int64_t grp = k / K;
  const int64_t kk = k - grp * K;
  const int64_t start = grp * group_rows + kk * rpb;
  return {start, min(start + rpb, (grp + 1) * group_rows)};
}

template <typename T, int VEC, int NJ>
__global__ void __launch_bounds__(kMaxThreads)
    cln_bwd_kernel(const T* __restrict__ go, const T* __restrict__ x, const T* __restrict__ w, int64_t w_sb,
                   int64_t w_sm, T* __restrict__ gx, acc_t<T>* __restrict__ part_w, acc_t<T>* __restrict__ part_b,
                   int64_t rps, int64_t D, acc_t<T> eps, bool rms, int64_t group_rows, int64_t rpb, int64_t K,
                   int64_t n_blocks) {
  using Acc = acc_t<T>;
  __shared__ RedSmem<Acc> sm;
  const auto [TX, TY, tx, ty, nvec, dn] = cached_rows<Acc, VEC>(D);
  const bool want_params = part_w != nullptr || part_b != nullptr;

  unsigned it = 0;
  for (int64_t k = blockIdx.x; k < n_blocks; k += gridDim.x) {
    const RowRange blk = bwd_block_rows(k, group_rows, rpb, K);

    Acc aw[NJ][VEC];  // this slot's partial sums of g * xhat, per owned column
    Acc ab[NJ][VEC];  // ... and of g
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        aw[j][e] = Acc(0);
        ab[j][e] = Acc(0);
      }
    }

    for (int64_t base = blk.start; base < blk.end; base += TY, ++it) {
      const int64_t r = base + ty;
      const bool active = r < blk.end;
      const int par = static_cast<int>(it & 1u);
      const int64_t rr = active ? r : base;
      const T* xr = x + rr * D;
      const T* gr = go + rr * D;

      Acc xv[NJ][VEC];  // x, then xhat
      Acc gv[NJ][VEC];  // grad_out, then g' = grad_out * w
      Acc s = Acc(0);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int64_t c = tx + static_cast<int64_t>(j) * TX;
        if (active && c < nvec) {
          load_pack<T, VEC>(xr + c * VEC, xv[j]);
          load_pack<T, VEC>(gr + c * VEC, gv[j]);
          add_row_sum<Acc, VEC>(s, xv[j], rms);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            xv[j][e] = Acc(0);
            gv[j][e] = Acc(0);
          }
        }
      }
      const RowStats<Acc> st = cached_row_stats<Acc, VEC, NJ>(s, xv, active, nvec, dn, eps, rms, sm, par);
      const Acc mu = st.mu;
      const Acc rstd = st.rstd;

      // xhat, g', the parameter partials and the two row sums of grad_x.
      const T* wr = active ? affine_row(w, w_sb, w_sm, r, rps) : nullptr;
      Acc t[2] = {Acc(0), Acc(0)};  // sum g', sum g' * xhat
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int64_t c = tx + static_cast<int64_t>(j) * TX;
        if (active && c < nvec) {
          Acc wv[VEC];
          load_pack_or<T, VEC>(wr, c * VEC, Acc(1), wv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const Acc xh = (xv[j][e] - mu) * rstd;
            const Acc g = gv[j][e];
            aw[j][e] += g * xh;
            ab[j][e] += g;
            const Acc gp = g * wv[e];
            t[0] += gp;
            t[1] += gp * xh;
            xv[j][e] = xh;
            gv[j][e] = gp;
          }
        }
      }
      slot_allreduce<Acc, 2>(t, sm.buf[2][par]);

      if (gx != nullptr && active) {
        const Acc mean_g = rms ? Acc(0) : t[0] / dn;
        const Acc mean_gx = t[1] / dn;
        T* gxr = gx + r * D;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int64_t c = tx + static_cast<int64_t>(j) * TX;
          if (c < nvec) {
            Acc out[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) out[e] = rstd * (gv[j][e] - mean_g - xv[j][e] * mean_gx);
            store_pack<T, VEC>(gxr + c * VEC, out);
          }
        }
      }
    }

    // Slots add their partials into block k's scratch rows, in slot order.
    if (want_params) {
      for (int slot = 0; slot < TY; ++slot) {
        if (ty == slot) {
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const int64_t c = tx + static_cast<int64_t>(j) * TX;
            if (c < nvec) {
              const int64_t idx = k * D + c * VEC;
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                if (part_w != nullptr) part_w[idx + e] = (slot == 0 ? Acc(0) : part_w[idx + e]) + aw[j][e];
                if (part_b != nullptr) part_b[idx + e] = (slot == 0 ? Acc(0) : part_b[idx + e]) + ab[j][e];
              }
            }
          }
        }
        __syncthreads();
      }
    }
  }
}

// Backward for rows longer than the register cache: TY == 1, one row at a time per CTA, the row
// re-read from global memory for each pass; partials accumulated directly in the block's scratch
// rows (column c is always handled by the same thread of the one CTA that owns block k).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cln_bwd_generic_kernel(const T* __restrict__ go, const T* __restrict__ x, const T* __restrict__ w, int64_t w_sb,
                           int64_t w_sm, T* __restrict__ gx, acc_t<T>* __restrict__ part_w,
                           acc_t<T>* __restrict__ part_b, int64_t rps, int64_t D, acc_t<T> eps, bool rms,
                           int64_t group_rows, int64_t rpb, int64_t K, int64_t n_blocks) {
  using Acc = acc_t<T>;
  __shared__ RedSmem<Acc> sm;
  const auto [TX, tx, dn] = generic_row<Acc>(D);

  unsigned it = 0;
  for (int64_t k = blockIdx.x; k < n_blocks; k += gridDim.x) {
    const RowRange blk = bwd_block_rows(k, group_rows, rpb, K);
    Acc* pw = part_w != nullptr ? part_w + k * D : nullptr;
    Acc* pb = part_b != nullptr ? part_b + k * D : nullptr;

    for (int64_t r = blk.start; r < blk.end; ++r, ++it) {
      const int par = static_cast<int>(it & 1u);
      const bool first_row = r == blk.start;
      const T* xr = x + r * D;
      const T* gr = go + r * D;
      const RowStats<Acc> st = generic_row_stats<T>(xr, D, dn, eps, rms, sm, par);
      const Acc mu = st.mu;
      const Acc rstd = st.rstd;
      const T* wr = affine_row(w, w_sb, w_sm, r, rps);

      Acc t[2] = {Acc(0), Acc(0)};
      for (int64_t c = tx; c < D; c += TX) {
        const Acc xh = (to_acc(xr[c]) - mu) * rstd;
        const Acc g = to_acc(gr[c]);
        if (pw != nullptr) pw[c] = (first_row ? Acc(0) : pw[c]) + g * xh;
        if (pb != nullptr) pb[c] = (first_row ? Acc(0) : pb[c]) + g;
        const Acc gp = g * (wr != nullptr ? to_acc(wr[c]) : Acc(1));
        t[0] += gp;
        t[1] += gp * xh;
      }
      slot_allreduce<Acc, 2>(t, sm.buf[2][par]);

      if (gx != nullptr) {
        const Acc mean_g = rms ? Acc(0) : t[0] / dn;
        const Acc mean_gx = t[1] / dn;
        T* gxr = gx + r * D;
        for (int64_t c = tx; c < D; c += TX) {
          const Acc xh = (to_acc(xr[c]) - mu) * rstd;
          const Acc gp = to_acc(gr[c]) * (wr != nullptr ? to_acc(wr[c]) : Acc(1));
          gxr[c] = FromAcc<T>::cast(rstd * (gp - mean_g - xh * mean_gx));
        }
      }
    }
  }
}

// sum_{kk < K} p[kk * D], added strictly in order kk = 0, 1, ...; the loads of a chunk are
// issued together (they do not depend on the running sum) to keep several in flight.
template <typename Acc>
__device__ __forceinline__ Acc sum_partials_in_order(const Acc* __restrict__ p, int64_t K, int64_t D) {
  constexpr int kChunk = 8;
  Acc s = Acc(0);
  int64_t kk = 0;
  for (; kk + kChunk <= K; kk += kChunk) {
    Acc v[kChunk];
#pragma unroll
    for (int u = 0; u < kChunk; ++u) v[u] = p[(kk + u) * D];
#pragma unroll
    for (int u = 0; u < kChunk; ++u) s += v[u];
  }
  for (; kk < K; ++kk) s += p[kk * D];
  return s;
}

// out[grp, d] = sum_{kk < K} part[grp * K + kk, d] (block order), cast to T; weight and bias.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    cln_param_reduce_kernel(const acc_t<T>* __restrict__ part_w, const acc_t<T>* __restrict__ part_b,
                            T* __restrict__ gw, T* __restrict__ gb, int64_t n_groups, int64_t K, int64_t D) {
  const int64_t total = n_groups * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t grp = i / D;
    const int64_t d = i - grp * D;
    const int64_t off = grp * K * D + d;
    if (gw != nullptr) gw[i] = FromAcc<T>::cast(sum_partials_in_order(part_w + off, K, D));
    if (gb != nullptr) gb[i] = FromAcc<T>::cast(sum_partials_in_order(part_b + off, K, D));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
using cuda::aligned16;
using cuda::ceil_div;
using cuda::grid_size;

inline bool affine_vec_ok(const AffineView& a, int vec) {
  return a.ptr == nullptr || (aligned16(a.ptr) && a.stride_b % vec == 0 && a.stride_m % vec == 0);
}

// Register-cache capacity, in elements per thread.
template <typename Acc>
constexpr int fwd_elems() {
  return sizeof(Acc) == 8 ? 16 : 32;
}
template <typename Acc>
constexpr int bwd_elems() {
  return sizeof(Acc) == 8 ? 8 : 16;
}

// Threads per row slot: one vector per lane up to a warp, then as many lanes as the register
// cache needs (power of two, at most kMaxThreads). The caller checks tx * nj >= nvec.
inline int pick_tx(int64_t nvec, int nj) {
  int tx = 1;
  while (tx < 32 && tx < nvec) tx <<= 1;
  while (tx < kMaxThreads && static_cast<int64_t>(tx) * nj < nvec) tx <<= 1;
  return tx;
}

template <typename T, int VEC>
bool launch_fwd_cached(const T* x, const T* w, const AffineView& wv, const T* b, const AffineView& bv, T* y,
                       int64_t rows, int64_t rps, int64_t D, acc_t<T> eps, bool rms, cudaStream_t stream) {
  constexpr int NJ = fwd_elems<acc_t<T>>() / VEC;
  const int64_t nvec = D / VEC;
  const int tx = pick_tx(nvec, NJ);
  if (static_cast<int64_t>(tx) * NJ < nvec) return false;
  const int ty = std::max(1, kFwdThreads / tx);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  cln_fwd_kernel<T, VEC, NJ><<<grid_size(ceil_div(rows, ty)), block, 0, stream>>>(
      x, w, wv.stride_b, wv.stride_m, b, bv.stride_b, bv.stride_m, y, rows, rps, D, eps, rms);
  check_launch("cond_layer_norm_forward");
  return true;
}

template <typename T>
void forward_impl(const void* x_, AffineView wv, AffineView bv, void* y_, int64_t rows, int64_t rps, int64_t D,
                  double eps_d, bool rms, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const T* x = static_cast<const T*>(x_);
  const T* w = static_cast<const T*>(wv.ptr);
  const T* b = static_cast<const T*>(bv.ptr);
  T* y = static_cast<T*>(y_);
  const acc_t<T> eps = static_cast<acc_t<T>>(eps_d);
  const bool vec = D % V == 0 && aligned16(x) && aligned16(y) && affine_vec_ok(wv, V) && affine_vec_ok(bv, V);
  if (vec ? launch_fwd_cached<T, V>(x, w, wv, b, bv, y, rows, rps, D, eps, rms, stream)
          : launch_fwd_cached<T, 1>(x, w, wv, b, bv, y, rows, rps, D, eps, rms, stream))
    return;
  cln_fwd_generic_kernel<T><<<grid_size(rows), kGenericThreads, 0, stream>>>(
      x, w, wv.stride_b, wv.stride_m, b, bv.stride_b, bv.stride_m, y, rows, rps, D, eps, rms);
  check_launch("cond_layer_norm_forward");
}

struct BwdGeometry {
  int64_t group_rows, rpb, K, n_blocks, n_groups;
};

template <typename T, int VEC>
bool launch_bwd_cached(const T* go, const T* x, const T* w, const AffineView& wv, T* gx, acc_t<T>* pw, acc_t<T>* pb,
                       int64_t rows, int64_t rps, int64_t D, acc_t<T> eps, bool rms, bool use_plan,
                       const ReductionPlan& plan, cudaStream_t stream, BwdGeometry* geo) {
  constexpr int NJ = bwd_elems<acc_t<T>>() / VEC;
  const int64_t nvec = D / VEC;
  const int tx = pick_tx(nvec, NJ);
  if (static_cast<int64_t>(tx) * NJ < nvec) return false;
  int ty = std::max(1, kBwdThreads / tx);
  BwdGeometry g;
  if (use_plan) {
    g.group_rows = plan.group_rows;
    g.rpb = plan.rows_per_block;
    // No more slots than a block has rows (keeping whole warps).
    const int64_t block_rows = std::min(g.rpb, g.group_rows);
    while (ty > 1 && ty / 2 >= block_rows && tx * (ty / 2) >= 32) ty /= 2;
  } else {
    g.group_rows = rows;
    g.rpb = static_cast<int64_t>(ty) * 4;
  }
  g.n_groups = rows / g.group_rows;
  g.K = ceil_div(g.group_rows, g.rpb);
  g.n_blocks = g.n_groups * g.K;
  *geo = g;
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  cln_bwd_kernel<T, VEC, NJ><<<grid_size(g.n_blocks), block, 0, stream>>>(
      go, x, w, wv.stride_b, wv.stride_m, gx, pw, pb, rps, D, eps, rms, g.group_rows, g.rpb, g.K, g.n_blocks);
  check_launch("cond_layer_norm_backward");
  return true;
}

template <typename T>
void backward_impl(const void* go_, const void* x_, AffineView wv, void* gx_, void* gw_, void* gb_, void* scratch,
                   int64_t rows, int64_t rps, int64_t D, double eps_d, bool rms, ReductionPlan plan,
                   cudaStream_t stream) {
  using Acc = acc_t<T>;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const T* go = static_cast<const T*>(go_);
  const T* x = static_cast<const T*>(x_);
  const T* w = static_cast<const T*>(wv.ptr);
  T* gx = static_cast<T*>(gx_);
  T* gw = static_cast<T*>(gw_);
  T* gb = static_cast<T*>(gb_);
  const Acc eps = static_cast<Acc>(eps_d);
  const bool use_plan = gw != nullptr || gb != nullptr;

  int64_t plan_blocks = 0;
  if (use_plan) {
    plan_blocks = (rows / plan.group_rows) * ceil_div(plan.group_rows, plan.rows_per_block);
  }
  Acc* part = static_cast<Acc*>(scratch);
  Acc* pw = gw != nullptr ? part : nullptr;
  Acc* pb = gb != nullptr ? part + plan_blocks * D : nullptr;

  BwdGeometry g{};
  const bool vec =
      D % V == 0 && aligned16(go) && aligned16(x) && (gx == nullptr || aligned16(gx)) && affine_vec_ok(wv, V);
  const bool cached =
      vec ? launch_bwd_cached<T, V>(go, x, w, wv, gx, pw, pb, rows, rps, D, eps, rms, use_plan, plan, stream, &g)
          : launch_bwd_cached<T, 1>(go, x, w, wv, gx, pw, pb, rows, rps, D, eps, rms, use_plan, plan, stream, &g);
  if (!cached) {
    if (use_plan) {
      g.group_rows = plan.group_rows;
      g.rpb = plan.rows_per_block;
    } else {
      g.group_rows = rows;
      g.rpb = 16;
    }
    g.n_groups = rows / g.group_rows;
    g.K = ceil_div(g.group_rows, g.rpb);
    g.n_blocks = g.n_groups * g.K;
    cln_bwd_generic_kernel<T><<<grid_size(g.n_blocks), kGenericThreads, 0, stream>>>(
        go, x, w, wv.stride_b, wv.stride_m, gx, pw, pb, rps, D, eps, rms, g.group_rows, g.rpb, g.K, g.n_blocks);
    check_launch("cond_layer_norm_backward");
  }
  if (use_plan) {
    cln_param_reduce_kernel<T><<<grid_size(ceil_div(g.n_groups * D, kReduceThreads)), kReduceThreads, 0, stream>>>(
        pw, pb, gw, gb, g.n_groups, g.K, D);
    check_launch("cond_layer_norm_backward (weight/bias reduction)");
  }
}

// Validation shared by both launchers; runs before anything is launched.
void check_args(DType dtype, const char* who, int64_t rows, int64_t rps, int64_t D, bool has_affine) {
  if (!known_dtype(dtype))
    fail(std::string(who) + ": unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
  if (rows < 0) fail(std::string(who) + ": rows must be >= 0, got " + std::to_string(rows));
  if (D < 0) fail(std::string(who) + ": D must be >= 0, got " + std::to_string(D));
  if (has_affine && rows > 0 && rps <= 0)
    fail(std::string(who) + ": rows_per_sample must be > 0, got " + std::to_string(rps));
}

}  // namespace

void cond_layer_norm_forward_cuda(DType dtype, const void* x, AffineView weight, AffineView bias, void* y, int64_t rows,
                                  int64_t rows_per_sample, int64_t D, double eps, bool rms, void* stream) {
  check_args(dtype, "cond_layer_norm_forward_cuda", rows, rows_per_sample, D,
             weight.ptr != nullptr || bias.ptr != nullptr);
  if (rows == 0 || D == 0) return;
  cuda::dispatch_float_types(dtype, "cond_layer_norm_forward_cuda", [&](auto tag) {
    forward_impl<decltype(tag)>(x, weight, bias, y, rows, rows_per_sample, D, eps, rms,
                                static_cast<cudaStream_t>(stream));
  });
}

void cond_layer_norm_backward_cuda(DType dtype, const void* grad_out, const void* x, AffineView weight, void* grad_x,
                                   void* grad_weight, void* grad_bias, void* scratch, int64_t rows,
                                   int64_t rows_per_sample, int64_t D, double eps, bool rms, ReductionPlan plan,
                                   void* stream) {
  check_args(dtype, "cond_layer_norm_backward_cuda", rows, rows_per_sample, D, weight.ptr != nullptr);
  if (rows == 0 || D == 0) return;
  if (grad_x == nullptr && grad_weight == nullptr && grad_bias == nullptr) return;
  if (grad_weight != nullptr || grad_bias != nullptr) {
    if (plan.group_rows <= 0 || plan.rows_per_block <= 0)
      fail("cond_layer_norm_backward_cuda: ReductionPlan sizes must be positive");
    if (rows % plan.group_rows != 0)
      fail("cond_layer_norm_backward_cuda: rows (" + std::to_string(rows) + ") is not a multiple of plan.group_rows (" +
           std::to_string(plan.group_rows) + ")");
    if (scratch == nullptr) fail("cond_layer_norm_backward_cuda: scratch is required for grad_weight/grad_bias");
  }
  cuda::dispatch_float_types(dtype, "cond_layer_norm_backward_cuda", [&](auto tag) {
    backward_impl<decltype(tag)>(grad_out, x, weight, grad_x, grad_weight, grad_bias, scratch, rows, rows_per_sample, D,
                                 eps, rms, plan, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace kexue
