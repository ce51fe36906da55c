// The elementwise head of the Self-Orthogonality penalty on the CPU (kexue_fast/ops/self_orthogonality.py
// has the math). Torch-free.
//
// For y (b × k, row-major, dtype `dtype`) and the sharpness gamma, in the arithmetic type A
// (double for float64 y, else float):
//     t[r, j] = tanh(gamma · y[r, j])                 (written to t, b × k of A; skipped if t_given)
//     sumsq[j] = Σ_r t[r, j]²                         (k values of A)
// With t_given, t is read (the forward's) and only the sums are formed, with the same bits as the
// forward's. The sums run over fixed chunks of rows, combined in chunk order, so they do not
// depend on the thread count. tanh is kexue's vector tanh (kexue/cpu_activations.h).
#pragma once
#include <cstdint>

#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

KEXUE_PER_CPU_ISA(void self_orthogonality_tanh_cpu(DType dtype, const void* y, void* t, void* sumsq, int64_t b,
                                                   int64_t k, double gamma, bool t_given);)  // KEXUE_PER_CPU_ISA

}  // namespace kexue
