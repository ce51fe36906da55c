// Runtime choice of the CPU kernels' instruction set. Torch-free.
//
// Every file in csrc/cpu/ is compiled once per ISA level, each time into its own namespace
// kexue::cpu_<level> (the macro KEXUE_CPU_NS, set by CMakeLists.txt) with that level's compiler
// flags; the vector code is written once, over the vector width of the level it is compiled for
// (kexue/simd.h). At run time one level is active for the whole process: the best one this CPU
// supports, or the one named by the environment variable KEXUE_CPU_ISA when _C is loaded, or
// the one set by set_cpu_isa() (the tests run each level this way). KEXUE_CPU_KERNEL(fn) is
// the active level's version of the CPU entry point `fn`.
//
// Levels (x86-64; elsewhere only the baseline exists):
//   baseline  the compiler's default target (SSE2 on x86-64): runs on any x86-64 machine
//   avx2      AVX2 + FMA + F16C                              (Haswell, Zen 1 and later)
//   avx512    AVX-512 F/BW/DQ/VL on top of avx2, 512-bit vectors (Skylake-X, Zen 4 and later)
//   avx512bf16  avx512 + AVX512_BF16: float32 -> bfloat16 rounding in one instruction
//             (Cooper Lake, Sapphire Rapids, Zen 4 and later)
#pragma once
#include <string>
#include <vector>

namespace kexue {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// "baseline", "avx2", "avx512" or "avx512bf16".
const char* cpu_isa_name(CpuIsa isa);
// The levels this CPU (and its operating system) supports, best first; always ends in baseline.
std::vector<CpuIsa> supported_cpu_isas();
// The level in use. The first call reads KEXUE_CPU_ISA (empty or "auto": the best supported) and
// throws std::runtime_error if it names an unknown or unsupported level.
CpuIsa active_cpu_isa();
// Makes `name` the level in use; throws std::invalid_argument (nothing changes) if it is unknown
// or this CPU does not support it. Not meant to be called while kernels run on other threads.
void set_cpu_isa(const std::string& name);

template <class Fn>
Fn pick_cpu_kernel([[maybe_unused]] Fn baseline, [[maybe_unused]] Fn avx2, [[maybe_unused]] Fn avx512,
                   [[maybe_unused]] Fn avx512bf16) {
  switch (active_cpu_isa()) {
    case CpuIsa::Avx512Bf16: return avx512bf16;
    case CpuIsa::Avx512: return avx512;
    case CpuIsa::Avx2: return avx2;
    case CpuIsa::Baseline: break;
  }
  return baseline;
}

}  // namespace kexue

#if defined(__x86_64__)
// Declares the enclosed CPU entry points once per ISA level, each in its own namespace.
#define KEXUE_PER_CPU_ISA(...) \
  namespace cpu_baseline {     \
  __VA_ARGS__                  \
  }                            \
  namespace cpu_avx2 {         \
  __VA_ARGS__                  \
  }                            \
  namespace cpu_avx512 {       \
  __VA_ARGS__                  \
  }                            \
  namespace cpu_avx512bf16 {   \
  __VA_ARGS__                  \
  }
#define KEXUE_CPU_KERNEL(fn)                                                                             \
  ::kexue::pick_cpu_kernel(&::kexue::cpu_baseline::fn, &::kexue::cpu_avx2::fn, &::kexue::cpu_avx512::fn, \
                           &::kexue::cpu_avx512bf16::fn)
#else
#define KEXUE_PER_CPU_ISA(...) \
  namespace cpu_baseline {     \
  __VA_ARGS__                  \
  }
#define KEXUE_CPU_KERNEL(fn) (&::kexue::cpu_baseline::fn)
#endif
