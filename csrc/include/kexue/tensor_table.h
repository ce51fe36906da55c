// The one multi-tensor argument of every Tensor[] launcher (EMA, spectral norm, i-ResNet
// weights, ...). Torch-free.
//
// A table of `n` entries; each entry has the same number of tensor slots (a data pointer and a
// dtype code each) and the same number of int64 sizes. Examples:
//   ema_update:          slots (shadow, param),  sizes (numel)
//   spectral norm:       slots (weight, u, v),   sizes (rows, cols)
// Python builds a table once (kexue_fast/_tables.py) and passes the same object on every call,
// so a launch costs no per-tensor Python work. Pointers are host or device addresses; the
// table itself always lives on the host (a CUDA launcher copies what its kernels need).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kexue/common.h"

namespace kexue {

struct TensorTable {
  int64_t n = 0;                    // entries
  int slots = 0;                    // tensors per entry
  int sizes_per_entry = 0;          // int64 sizes per entry
  std::vector<uintptr_t> pointers;  // [entry * slots + slot]
  std::vector<int32_t> dtypes;      // [entry * slots + slot], kexue::DType codes
  std::vector<int64_t> sizes;       // [entry * sizes_per_entry + k]

  // Throws std::invalid_argument (naming `what`) unless the three arrays fit n, slots and
  // sizes_per_entry and every dtype code and size is valid.
  TensorTable(int slots, int sizes_per_entry, std::vector<uintptr_t> pointers, std::vector<int32_t> dtypes,
              std::vector<int64_t> sizes, const std::string& what)
      : slots(slots),
        sizes_per_entry(sizes_per_entry),
        pointers(std::move(pointers)),
        dtypes(std::move(dtypes)),
        sizes(std::move(sizes)) {
    if (slots < 1 || sizes_per_entry < 0) fail(what + ": a table needs at least one slot per entry");
    n = static_cast<int64_t>(this->pointers.size()) / slots;
    if (static_cast<int64_t>(this->pointers.size()) != n * slots ||
        static_cast<int64_t>(this->dtypes.size()) != n * slots ||
        static_cast<int64_t>(this->sizes.size()) != n * sizes_per_entry)
      fail(what + ": the table's pointer, dtype and size lists do not fit " + std::to_string(slots) + " slots and " +
           std::to_string(sizes_per_entry) + " sizes per entry");
    for (int32_t code : this->dtypes)
      if (code < 0 || code > static_cast<int32_t>(DType::BFloat16))
        fail(what + ": unknown dtype code " + std::to_string(code));
    for (int64_t s : this->sizes)
      if (s < 0) fail(what + ": negative size in the table");
  }

  // Throws std::invalid_argument (naming `what`) unless the table has this layout; every
  // launcher calls it first, so a table built for another op is refused before any access.
  void expect_layout(int want_slots, int want_sizes, const std::string& what) const {
    if (slots != want_slots || sizes_per_entry != want_sizes)
      fail(what + ": expected a table of " + std::to_string(want_slots) + " slots and " + std::to_string(want_sizes) +
           " sizes per entry, got " + std::to_string(slots) + " and " + std::to_string(sizes_per_entry));
  }

  // Whether a tensor of a slot with written[slot] shares a byte with any other tensor of the
  // table (empty tensors and null pointers occupy nothing). Tensor (entry, slot) spans element_size(dtype) times
  // the product of the entry's sizes listed in extents[slot] bytes from its pointer (contiguous
  // tensors), e.g. spectral norm's weight {0, 1} (rows * cols), u {0}, v {1}. A sweep over the
  // ranges sorted by start: a range overlaps an earlier one exactly when it starts before the
  // largest end so far, so the running largest end of all ranges and of the written ones find a
  // written/any overlap in O(N log N).
  bool overlapping(const std::vector<std::vector<int>>& extents, const std::vector<bool>& written) const {
    if (static_cast<int>(extents.size()) != slots || static_cast<int>(written.size()) != slots)
      fail("TensorTable.overlapping: expected an extent and a written flag per slot");
    for (const auto& sizes_of_slot : extents)
      for (int k : sizes_of_slot)
        if (k < 0 || k >= sizes_per_entry) fail("TensorTable.overlapping: a size index is out of range");
    struct Range {
      uintptr_t start, end;
      bool written;
    };
    std::vector<Range> ranges;
    ranges.reserve(static_cast<size_t>(n * slots));
    for (int64_t entry = 0; entry < n; ++entry)
      for (int slot = 0; slot < slots; ++slot) {
        int64_t bytes = element_size(dtype(entry, slot));
        for (int k : extents[slot]) bytes *= size(entry, k);
        const uintptr_t start = pointers[entry * slots + slot];
        if (bytes > 0 && start != 0) ranges.push_back({start, start + static_cast<uintptr_t>(bytes), written[slot]});
      }
    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.start < b.start; });
    uintptr_t max_end = 0, max_written_end = 0;
    for (const Range& r : ranges) {
      if (r.start < max_written_end || (r.written && r.start < max_end)) return true;
      max_end = std::max(max_end, r.end);
      if (r.written) max_written_end = std::max(max_written_end, r.end);
    }
    return false;
  }

  void* pointer(int64_t entry, int slot) const { return reinterpret_cast<void*>(pointers[entry * slots + slot]); }
  DType dtype(int64_t entry, int slot) const { return static_cast<DType>(dtypes[entry * slots + slot]); }
  int64_t size(int64_t entry, int k) const { return sizes[entry * sizes_per_entry + k]; }
};

}  // namespace kexue
