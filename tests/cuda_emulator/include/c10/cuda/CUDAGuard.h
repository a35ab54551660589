// CUDA emulator shim (tests/cuda_emulator): one device, nothing to guard.
#pragma once

#include "emu.h"

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

inline c10::DeviceIndex current_device() { return 0; }

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace cuda
}  // namespace c10
