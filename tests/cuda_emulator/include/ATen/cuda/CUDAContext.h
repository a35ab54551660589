// CUDA emulator shim (tests/cuda_emulator): the current stream and the emulated device.
#pragma once

#include "emu.h"

#include <c10/core/Device.h>

namespace at {
namespace cuda {

// Every launch runs to completion before it returns, so one stream is all there is.
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

// The emulated device: BN_EXT_EMU_SMS streaming multiprocessors (default 4), 2048 threads each,
// cooperative launch (runtime.cpp).
cudaDeviceProp* getCurrentDeviceProperties();

}  // namespace cuda
}  // namespace at
