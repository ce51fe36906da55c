// The one multi-tensor launch scheme of the Tensor[] CUDA kernels (EMA, spectral norm, and next
// the i-ResNet weights). Include only from .cu files.
//
// Idea (NVIDIA apex csrc/multi_tensor_apply.cuh and PyTorch's ATen/native/cuda/
// MultiTensorApply.cuh, written anew): one launch serves many separately allocated tensors, and
// what every CTA works on travels BY VALUE in the kernel's argument, a table of bounded size; the
// host fills tables entry by entry and launches one as soon as it is full.
//
// Here the table (SlotBatch) holds up to kMaxSlots slots, one entry of a kexue::TensorTable each
// in the form its kernels read it (Slot: pointers, sizes, flags), plus per-launch values shared
// by all slots (Head). The kernels of one batch may run on several grids (kGrids; e.g. one over
// row blocks and one over column blocks); in grid g, slot s owns the CTAs
//     [first_cta[g][s], first_cta[g][s + 1])          (the last slot: up to ctas[g]),
// and CTA b of that range works on chunk b - first_cta[g][s] of its slot. apex lists one
// (tensor, chunk) pair per CTA, which bounds a launch to a few hundred CTAs; these ranges are that
// list run-length encoded, so a launch may have up to kMaxBatchCtas CTAs and an entry is never
// split across launches (its chunks can rely on each other's partial sums within one batch). A
// CTA finds its slot by a binary search over at most kMaxSlots first CTAs, uniform over the CTA,
// in the constant bank (kernels take the batch as `const __grid_constant__`, so it is never
// copied). A slot with no CTAs in grid g shares its first CTA with the next slot, so it is never
// found there; grids with one CTA per slot index the slot by blockIdx.x. The host side and the
// search are checked without a GPU by tests/cuda_host/multi_tensor_test.cu.
#pragma once
#include <array>
#include <cstdint>

#include "kexue/common.h"

namespace kexue::cuda {

// Most CTAs of one batch in one grid (fits gridDim.x and the int32 first-CTA table).
constexpr int64_t kMaxBatchCtas = int64_t{1} << 30;
// Most bytes of a kernel's arguments that every supported driver accepts.
constexpr size_t kMaxKernelArgBytes = 4096;

template <class Head, class Slot, int kMaxSlots, int kGrids = 1>
struct SlotBatch {
  static constexpr int kCapacity = kMaxSlots;
  static constexpr int kNumGrids = kGrids;
  using HeadType = Head;
  using SlotType = Slot;

  Head head;
  int32_t n_slots;
  int32_t ctas[kGrids];                  // CTAs of grid g in this batch
  int32_t first_cta[kGrids][kMaxSlots];  // first CTA of slot s in grid g
  Slot slots[kMaxSlots];
};

// Where CTA `cta` of grid kGrid works: slot `slot`, its chunk `chunk` (0-based within the slot).
struct SlotChunk {
  int slot;
  int32_t chunk;
};

template <int kGrid, class Batch>
__host__ __device__ __forceinline__ SlotChunk find_slot_chunk(const Batch& batch, int32_t cta) {
  int lo = 0;  // the largest s with first_cta[kGrid][s] <= cta
  int hi = batch.n_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.first_cta[kGrid][mid] <= cta)
      lo = mid;
    else
      hi = mid - 1;
  }
  return {lo, cta - batch.first_cta[kGrid][lo]};
}

// An entry that owns ctas[g] CTAs of grid g fits one batch (BatchBuilder::add takes it).
template <size_t kGrids>
bool fits_one_batch(const std::array<int64_t, kGrids>& ctas) {
  for (int64_t c : ctas)
    if (c < 0 || c > kMaxBatchCtas) return false;
  return true;
}

// Fills batches on the host slot by slot and hands each full one, and the last, to
// `launch(Batch&)` (which sets what it must in batch.head and enqueues the batch's kernels).
// Callers check every entry with fits_one_batch before adding the first one, so that a bad
// entry fails before anything is launched.
template <class Batch, class Launch>
class BatchBuilder {
 public:
  using Ctas = std::array<int64_t, Batch::kNumGrids>;
  static_assert(sizeof(Batch) <= kMaxKernelArgBytes, "a batch must fit the kernel argument limit");

  BatchBuilder(const typename Batch::HeadType& head, Launch launch) : launch_(launch) {
    batch_.head = head;
    clear();
  }

  // Adds a slot that owns ctas[g] CTAs of grid g, launching the batch first if it has no room.
  void add(const typename Batch::SlotType& slot, const Ctas& ctas) {
    bool room = batch_.n_slots < Batch::kCapacity;
    for (int g = 0; g < Batch::kNumGrids; ++g) room = room && batch_.ctas[g] + ctas[g] <= kMaxBatchCtas;
    if (!room) flush();
    const int s = batch_.n_slots++;
    batch_.slots[s] = slot;
    for (int g = 0; g < Batch::kNumGrids; ++g) {
      batch_.first_cta[g][s] = batch_.ctas[g];
      batch_.ctas[g] += static_cast<int32_t>(ctas[g]);
    }
  }

  // Launches the batch being filled, if it has a slot.
  void flush() {
    if (batch_.n_slots == 0) return;
    launch_(batch_);
    clear();
  }

 private:
  void clear() {
    batch_.n_slots = 0;
    for (int g = 0; g < Batch::kNumGrids; ++g) batch_.ctas[g] = 0;
  }

  Batch batch_{};
  Launch launch_;
};

}  // namespace kexue::cuda
