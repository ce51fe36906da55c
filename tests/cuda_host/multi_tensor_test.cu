// Host-only check of the multi-tensor batch template (kexue/cuda_multi_tensor.cuh): BatchBuilder
// packs entries into batches within both limits, never splits an entry, and find_slot_chunk maps
// every CTA of every grid back to exactly one (entry, chunk), empty entries included. Built and
// run by tests/test_cuda_host.py (nvcc, no GPU needed). Prints what is wrong; exits 1.
#include "kexue/cuda_multi_tensor.cuh"

#include <array>
#include <cstdint>
#include <cstdio>
#include <map>
#include <utility>
#include <vector>

namespace {

using kexue::cuda::BatchBuilder;
using kexue::cuda::find_slot_chunk;
using kexue::cuda::kMaxBatchCtas;

struct Head {
  int tag;
};
struct Slot {
  int64_t entry;
};
constexpr int kSlots = 4;
using Batch = kexue::cuda::SlotBatch<Head, Slot, kSlots, 2>;
using Ctas = std::array<int64_t, 2>;

int failures = 0;

void expect(bool ok, const char* what, int64_t a = 0, int64_t b = 0) {
  if (!ok) {
    std::printf("FAIL: %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
    ++failures;
  }
}

std::vector<Batch> build(const std::vector<Ctas>& ctas) {
  std::vector<Batch> batches;
  const auto launch = [&batches](Batch& b) { batches.push_back(b); };
  BatchBuilder<Batch, decltype(launch)> builder(Head{42}, launch);
  for (size_t i = 0; i < ctas.size(); ++i) builder.add(Slot{static_cast<int64_t>(i)}, ctas[i]);
  builder.flush();
  return batches;
}

// Every CTA of every grid of every batch, found back as (entry, chunk): each entry's chunks
// 0 .. ctas[g] - 1 exactly once, entries in order, and nothing else.
void check_coverage(const std::vector<Ctas>& ctas) {
  std::map<std::pair<int64_t, int>, std::vector<int>> hits;  // (entry, grid) -> times each chunk was found
  int64_t next_entry = 0;
  for (const Batch& b : build(ctas)) {
    expect(b.head.tag == 42, "head copied into every batch", b.head.tag);
    expect(b.n_slots >= 1 && b.n_slots <= kSlots, "slots per batch within the limit", b.n_slots);
    for (int s = 0; s < b.n_slots; ++s) expect(b.slots[s].entry == next_entry++, "entries in order", b.slots[s].entry);
    for (int g = 0; g < 2; ++g) {
      expect(b.ctas[g] <= kMaxBatchCtas, "CTAs per batch within the limit", b.ctas[g]);
      for (int32_t cta = 0; cta < b.ctas[g]; ++cta) {
        const kexue::cuda::SlotChunk at = g == 0 ? find_slot_chunk<0>(b, cta) : find_slot_chunk<1>(b, cta);
        const int64_t entry = b.slots[at.slot].entry;
        std::vector<int>& counts = hits[{entry, g}];
        if (counts.empty()) counts.assign(static_cast<size_t>(ctas[entry][g]), 0);
        const bool inside = at.chunk >= 0 && at.chunk < ctas[entry][g];
        expect(inside, "chunk within its entry", entry, at.chunk);
        if (inside) ++counts[at.chunk];
      }
    }
  }
  expect(next_entry == static_cast<int64_t>(ctas.size()), "every entry in a batch", next_entry);
  for (size_t e = 0; e < ctas.size(); ++e)
    for (int g = 0; g < 2; ++g) {
      const auto it = hits.find({static_cast<int64_t>(e), g});
      const int64_t found = it == hits.end() ? 0 : static_cast<int64_t>(it->second.size());
      expect(found == ctas[e][g], "every chunk of an entry reached", static_cast<int64_t>(e), g);
      if (it != hits.end())
        for (int c : it->second) expect(c == 1, "each chunk exactly once", static_cast<int64_t>(e), c);
    }
}

// The CTA limit: an entry that would overflow a batch in either grid starts the next one, whole.
void check_cta_limit() {
  const int64_t big = kMaxBatchCtas / 2 + 1;
  const std::vector<Batch> batches = build({{big, 1}, {big, 1}, {1, 1}, {1, kMaxBatchCtas}});
  expect(batches.size() == 3, "batches for entries over the CTA limit", static_cast<int64_t>(batches.size()));
  if (batches.size() == 3) {
    expect(batches[0].n_slots == 1 && batches[0].ctas[0] == big, "first batch: one big entry", batches[0].ctas[0]);
    expect(batches[1].n_slots == 2 && batches[1].ctas[0] == big + 1 && batches[1].ctas[1] == 2,
           "second batch: the other big entry and a small one", batches[1].ctas[0], batches[1].ctas[1]);
    expect(batches[2].n_slots == 1 && batches[2].ctas[1] == kMaxBatchCtas, "third batch: a full grid C",
           batches[2].ctas[1]);
  }
  expect(kexue::cuda::fits_one_batch(Ctas{kMaxBatchCtas, 0}), "an entry of kMaxBatchCtas CTAs fits");
  expect(!kexue::cuda::fits_one_batch(Ctas{0, kMaxBatchCtas + 1}), "an entry over kMaxBatchCtas does not fit");
}

}  // namespace

int main() {
  // Empty entries first, in the middle and last; entries empty in one grid only; more entries
  // than one batch holds.
  check_coverage({{0, 0}, {3, 1}, {0, 0}, {2, 5}, {1, 0}, {0, 2}, {4, 4}, {7, 1}, {0, 0}, {1, 1}, {5, 3}, {0, 0}});
  check_coverage({{1, 1}});
  check_coverage({{0, 0}, {0, 0}});
  check_cta_limit();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
