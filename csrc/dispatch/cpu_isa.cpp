// Detection and choice of the CPU kernels' ISA level (kexue/cpu_dispatch.h). Compiled for the
// baseline target only: it must run on every machine.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kexue/cpu_dispatch.h"

namespace kexue {
namespace {

bool supported(CpuIsa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();  // libgcc's feature bits (it also checks that the OS saves the vector state)
  switch (isa) {
    case CpuIsa::Avx512Bf16: return __builtin_cpu_supports("avx512bf16") && supported(CpuIsa::Avx512);
    case CpuIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && supported(CpuIsa::Avx2);
    case CpuIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::Baseline: return true;
  }
  return false;
#else
  return isa == CpuIsa::Baseline;
#endif
}

constexpr CpuIsa kAllLevels[] = {CpuIsa::Avx512Bf16, CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Baseline};

std::string supported_names() {
  std::string names;
  for (CpuIsa isa : supported_cpu_isas()) names += std::string(names.empty() ? "" : ", ") + cpu_isa_name(isa);
  return names;
}

// The supported level called `name`; throws E naming `origin` if there is none.
template <class E>
CpuIsa parse(const std::string& name, const std::string& origin) {
  for (CpuIsa isa : kAllLevels) {
    if (name != cpu_isa_name(isa)) continue;
    if (!supported(isa))
      throw E(origin + ": this CPU does not support " + name + " (supported: " + supported_names() + ")");
    return isa;
  }
  throw E(origin + ": unknown CPU ISA level '" + name +
          "' (levels: avx512bf16, avx512, avx2, baseline; supported here: " + supported_names() + ")");
}

CpuIsa initial_level() {
  const char* env = std::getenv("KEXUE_CPU_ISA");
  if (!env || !*env || std::string(env) == "auto") return supported_cpu_isas().front();
  return parse<std::runtime_error>(env, "KEXUE_CPU_ISA=" + std::string(env));
}

std::atomic<int>& level() {
  static std::atomic<int> value{static_cast<int>(initial_level())};
  return value;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512Bf16: return "avx512bf16";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Baseline: break;
  }
  return "baseline";
}

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> levels;
  for (CpuIsa isa : kAllLevels)
    if (supported(isa)) levels.push_back(isa);
  return levels;
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(level().load(std::memory_order_relaxed)); }

void set_cpu_isa(const std::string& name) {
  level().store(static_cast<int>(parse<std::invalid_argument>(name, "set_cpu_isa")), std::memory_order_relaxed);
}

}  // namespace kexue
