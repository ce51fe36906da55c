// Host-only check of the host side of the i-ResNet CUDA launchers (csrc/cuda/iresnet.cu, compiled
// into this program): the switch between the shared-memory path and the global-memory fallback
// (make_plan) at and around its boundary, the scratch sizes of both paths and of deep branches,
// and the table checks that throw before anything is launched. Built and run by
// tests/test_cuda_host.py (nvcc, no GPU needed). Prints what is wrong; exits 1.
#include "../../csrc/cuda/iresnet.cu"

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using kexue::DType;
using kexue::TensorTable;

int failures = 0;

void expect(bool ok, const char* what, int64_t a = 0, int64_t b = 0) {
  if (!ok) {
    std::printf("FAIL: %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
    ++failures;
  }
}

// The (weight, bias) table of an MLP with these widths (dims[0] → … → dims.back()); the
// pointers are never dereferenced. null_second: the entry whose second pointer is null (-1: none).
TensorTable mlp(const std::vector<int64_t>& dims, DType dtype = DType::Float32, int64_t null_second = -1) {
  std::vector<uintptr_t> pointers;
  std::vector<int32_t> dtypes;
  std::vector<int64_t> sizes;
  for (size_t k = 0; k + 1 < dims.size(); ++k) {
    pointers.push_back(0x1000 + 64 * k);
    pointers.push_back(static_cast<int64_t>(k) == null_second ? 0 : 0x2000 + 64 * k);
    dtypes.push_back(static_cast<int32_t>(dtype));
    dtypes.push_back(static_cast<int32_t>(dtype));
    sizes.push_back(dims[k + 1]);
    sizes.push_back(dims[k]);
  }
  return TensorTable(2, 2, pointers, dtypes, sizes, "test");
}

// The message check_table throws, or "" if it accepts the table.
std::string table_error(const TensorTable& table, bool adjoint, DType dtype = DType::Float32) {
  try {
    kexue::check_table(dtype, table, adjoint, "t");
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

int main() {
  using namespace kexue;
  constexpr int64_t kH200 = 232448;  // sm_90's opt-in shared memory per block

  // A toy branch: shared path, full CTAs, no scratch whatever B.
  const TensorTable toy = mlp({2, 64, 64, 2});
  const Plan toy_plan = make_plan(toy, 4, kH200);
  expect(toy_plan.shared && toy_plan.warps == kMaxWarps && toy_plan.H == 64 && toy_plan.D == 2, "toy: shared path");
  expect(toy_plan.staged_elems == 4484,
         "toy: staged weights and biases (2·64 + 64·64 + 64·2 + 64 + 64 + 2 = 4482), "
         "padded to a whole vector",
         toy_plan.staged_elems);
  expect(warp_elems(7, 37) == kSlots * (2 * 8 + 2 * 40), "warp buffers: rows padded to whole vectors");
  expect(toy_plan.smem_bytes == (toy_plan.staged_elems + kMaxWarps * warp_elems(2, 64)) * 4, "toy: shared bytes",
         toy_plan.smem_bytes);
  expect(scratch_elems(toy_plan, toy.n, 4096, 4) == 0 && scratch_elems(toy_plan, toy.n, 1, 4) == 0,
         "shared path: no scratch");

  // The boundary: room for exactly kMinSharedWarps warps is the smallest shared plan.
  const int64_t staged_bytes = toy_plan.staged_elems * 8, warp_bytes = warp_elems(2, 64) * 8;
  const Plan at_edge = make_plan(toy, 8, staged_bytes + kMinSharedWarps * warp_bytes);
  expect(at_edge.shared && at_edge.warps == kMinSharedWarps, "at the boundary: shared with the fewest warps",
         at_edge.warps);
  expect(!make_plan(toy, 8, staged_bytes + kMinSharedWarps * warp_bytes - 1).shared, "one byte short: fallback");
  expect(make_plan(toy, 8, staged_bytes + 6 * warp_bytes + 5).warps == 6, "warps: as many as fit");
  expect(!make_plan(toy, 8, staged_bytes / 2).shared, "weights alone too large: fallback");

  // A 2048-wide hidden layer: the fallback; the scratch holds every Wᵀ and the warps' buffers,
  // bounded by B and the grid cap.
  const TensorTable wide = mlp({16, 2048, 16});
  const Plan wide_plan = make_plan(wide, 4, kH200);
  expect(!wide_plan.shared && wide_plan.H == 2048, "wide: fallback");
  const int64_t wide_weights = 2 * 16 * 2048;
  expect(wide_plan.weight_elems == wide_weights, "weights counted", wide_plan.weight_elems);
  const int64_t per_warp = warp_elems(16, 2048);
  expect(per_warp == kSlots * (2 * 16 + 2 * 2048), "warp buffers: two iterates and two hidden layers per slot");
  expect(scratch_elems(wide_plan, wide.n, 300, 4) ==
             wide_weights + ceil_div(ceil_div(300, kSlots), kMaxWarps) * kMaxWarps * per_warp,
         "fallback scratch: one warp per kSlots rows, whole CTAs", scratch_elems(wide_plan, wide.n, 300, 4));
  expect(scratch_elems(wide_plan, wide.n, 0, 4) == 0, "B = 0: no scratch");
  expect(scratch_elems(wide_plan, wide.n, int64_t{1} << 30, 4) == wide_weights + kMaxFallbackWarps * per_warp,
         "fallback scratch: capped with the grid");
  expect(fallback_ctas(1) == 1 && fallback_ctas(int64_t{1} << 30) * kMaxWarps == kMaxFallbackWarps,
         "fallback grid: at least one CTA, at most the cap");
  expect(make_plan(wide, 8, kH200).shared == false && make_plan(mlp({16, 2048, 16}), 4, 64 << 20).shared,
         "the switch follows the shared memory available");

  // Depth: descriptors beyond kParamLayers go to the head of the scratch, 16-byte aligned.
  std::vector<int64_t> deep(kParamLayers + 2, 3);
  const TensorTable deep_table = mlp(deep);
  expect(deep_table.n == kParamLayers + 1, "deep table");
  expect(spill_elems(kParamLayers, 4) == 0 && spill_elems(kParamLayers + 1, 4) * 4 % 16 == 0 &&
             spill_elems(kParamLayers + 1, 8) * 8 >= (kParamLayers + 1) * static_cast<int64_t>(sizeof(LayerDesc)),
         "spill: none up to kParamLayers, whole descriptors beyond");
  const Plan deep_plan = make_plan(deep_table, 4, kH200);
  expect(deep_plan.shared && scratch_elems(deep_plan, deep_table.n, 10, 4) == spill_elems(deep_table.n, 4),
         "deep shared branch: scratch holds just the descriptors");

  // The checks, before anything is launched.
  expect(table_error(toy, false).empty() && table_error(mlp({2, 64, 2}, DType::Float32, 1), true).empty(),
         "valid tables pass (the adjoint's last deriv may be null)");
  expect(table_error(mlp({2, 64, 2}, DType::Float32, 1), false) == "t: layer 1 has a null bias", "null bias");
  expect(table_error(mlp({2, 64, 2}, DType::Float32, 0), true) == "t: layer 0 has no activation derivative",
         "null derivative");
  expect(table_error(toy, false, DType::Float64) == "t: layer 0 is not of the dtype float64", "dtype mismatch");
  expect(table_error(mlp({2, 64, 2}, DType::Float16), false, DType::Float16).find("float32 or float64") !=
             std::string::npos,
         "16-bit dtypes refused");
  expect(table_error(mlp({2, 0, 2}), false) == "t: layer 0 has a zero width", "zero width");
  TensorTable broken = mlp({2, 5, 2});
  broken.sizes[3] = 4;  // layer 1 takes 4 inputs, layer 0 gives 5
  expect(table_error(broken, false) == "t: layer 0 has 5 outputs but the next layer takes 4", "broken chain");
  broken = mlp({2, 5, 3});  // g maps 2 to 3
  expect(table_error(broken, false) == "t: layer 1 has 3 outputs but the next layer takes 2", "g must map D to D");
  expect(table_error(TensorTable(3, 2, {}, {}, {}, "test"), false).find("expected a table of 2 slots") !=
             std::string::npos,
         "wrong layout");
  expect(table_error(TensorTable(2, 2, {}, {}, {}, "test"), false) == "t: the branch needs at least one layer",
         "no layers");

  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
