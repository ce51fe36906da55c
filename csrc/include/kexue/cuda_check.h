// Error handling for CUDA launchers: every CUDA call's status becomes a C++ exception that the
// bindings turn into a Python RuntimeError (never an abort). Include only from .cu files.
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace kexue {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    throw std::runtime_error(std::string("kexue CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

// Checks the launch that was just enqueued.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

}  // namespace kexue
