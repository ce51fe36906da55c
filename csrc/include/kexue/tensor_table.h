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

  void* pointer(int64_t entry, int slot) const { return reinterpret_cast<void*>(pointers[entry * slots + slot]); }
  DType dtype(int64_t entry, int slot) const { return static_cast<DType>(dtypes[entry * slots + slot]); }
  int64_t size(int64_t entry, int k) const { return sizes[entry * sizes_per_entry + k]; }
};

}  // namespace kexue
