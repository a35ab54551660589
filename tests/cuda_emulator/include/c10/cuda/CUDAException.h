// CUDA emulator shim (tests/cuda_emulator): runtime errors as torch's CUDA checks raise them.
// A launch's own failures are thrown by the launch (runtime.cpp), so the launch check is empty.
#pragma once

#include "emu.h"

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t bn_ext_emu_err = (expr);                                          \
    TORCH_CHECK(bn_ext_emu_err == cudaSuccess, "CUDA error (emulated): ",               \
                cudaGetErrorString(bn_ext_emu_err));                                    \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
