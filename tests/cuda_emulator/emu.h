// The CUDA emulator's device side: what csrc/cuda's sources need from CUDA, on the host.
//
// build.py compiles those sources with g++ as C++, with this header first and the shim headers
// in include/ ahead of torch's. A block's threads run as fibers on one host thread (runtime.cpp);
// __syncthreads() switches fibers, so every thread of the block reaches it before any passes it,
// and `__shared__` is `static thread_local`: one copy per host thread, so per block. The blocks of
// an ordinary launch run one after another; those of a cooperative launch run at once, one host
// thread each, so that the single-pass kernels' tile barriers can be met.
//
// What it checks that a plain host build would not: that all threads of a block wait at the same
// __syncthreads (divergent barriers hang or corrupt on a GPU), that 128-bit accesses are 16-byte
// aligned (they fault on a GPU), and that a cooperative grid fits the emulated device.
// A block's threads run in thread order between barriers, or the other way round with
// BN_EXT_EMU_ORDER=reverse, so that a value one thread stores in shared memory and others read
// without a barrier between is caught in one of the two orders; the blocks of an ordinary launch
// run in the order of their indices, or with =reverse the other way round (so a different block
// of each channel is the last to arrive at a counter).
// What it cannot check: the GPU memory model (fences, L1 coherence: x86 orders more strongly),
// concurrent blocks of an ordinary launch, warp-synchronous code (none outside CUB, which is
// replaced here), sizes that overflow 32-bit arithmetic (tensors of 2^31 elements: the 64-bit
// index kernels do run here, on small tensors, with BN_EXT_EMU_INDEX64=1), and speed.
// compute-sanitizer on a GPU does the first ones (bench/gpu_proof.sh). Shared memory starts each
// block as all-ones bits (NaN), so a read before any write shows.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

#define BN_EXT_CUDA_EMULATOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorCooperativeLaunchTooLarge = 720,
};

// No stream is ever captured into a graph here.
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

// The fields of cudaDeviceProp that csrc/cuda reads.
struct cudaDeviceProp {
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  int cooperativeLaunch;
  size_t sharedMemPerMultiprocessor;  // BN_EXT_EMU_SMEM_PER_SM (default an H100's 228 KB)
  size_t sharedMemPerBlockOptin;
  size_t reservedSharedMemPerBlock;
};

const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int, size_t);
cudaError_t cudaLaunchCooperativeKernel(const void* kernel, dim3 grid, dim3 block, void** args,
                                        size_t shared_bytes, cudaStream_t stream);

namespace emu {

// One emulated thread's built-in variables.
struct Thread {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

const Thread& self();                              // the thread running now
void syncthreads(const char* file, int line);      // the block barrier
void spin_wait();                                  // one round of a spin loop (__nanosleep)
void note_progress();                              // a block has arrived (atomicAdd)
void check_aligned(const void* p, size_t bytes);   // a vector access's alignment
void poison_shared(void* p, size_t bytes);         // all ones, once per block (build.py)
unsigned char* dynamic_shared();                   // the block's dynamic shared memory
int blocks_per_sm();                               // the emulated occupancy of every kernel
int blocks_per_sm(const char* kernel_type);        // ... or of some (BN_EXT_EMU_BLOCKS_PER_SM_OF)
// ... and no more than the SM's shared memory holds with that much dynamic shared memory a
// block (and 1 KB reserved; static shared memory is not known here)
int blocks_with_shared(int blocks, size_t dynamic_bytes);
void set_dynamic_limit(const void* kernel, int bytes);  // cudaFuncSetAttribute's
int64_t index32_bound();                           // 0 with BN_EXT_EMU_INDEX64=1, else 2^31
int64_t max_grid_x();                              // BN_EXT_EMU_MAX_GRID_X, else 2^31 - 1

// The blocks of a grid, each running `block_body` in every thread (block by block, or all at
// once for a cooperative launch), with `dynamic_bytes` of dynamic shared memory each (all ones
// at first, as __shared__ variables).
void run_grid(dim3 grid, dim3 block, const std::function<void()>& block_body, bool cooperative,
              size_t dynamic_bytes = 0);

// Type erasure for cudaLaunchCooperativeKernel, which gets `const void*` and `void** args`: the
// kernel's parameter types are kept with its address when build.py's rewrite of
// reinterpret_cast<const void*>(kernel) calls erase(kernel).
void register_kernel(const void* key, std::function<void(void**)> call);

template <typename... P, size_t... I>
void call_with(void (*k)(P...), void** args, std::index_sequence<I...>) {
  k(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <typename... P>
const void* erase(void (*k)(P...)) {
  const void* key = reinterpret_cast<const void*>(k);
  register_kernel(key, [k](void** args) { call_with(k, args, std::index_sequence_for<P...>{}); });
  return key;
}

// build.py rewrites `kernel<<<grid, block, bytes, stream>>>(args...)` as
// `kernel ->* ::emu::launch(grid, block, bytes, stream)(args...)`: the arguments are copied, as a
// launch copies them, and operator->* runs the grid.
template <typename... A>
struct PendingLaunch {
  dim3 grid;
  dim3 block;
  std::tuple<A...> args;
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  template <typename... A>
  PendingLaunch<std::decay_t<A>...> operator()(A&&... a) const {
    return {grid, block, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};

template <typename S = cudaStream_t>
LaunchConfig launch(dim3 grid, dim3 block, size_t /*shared_bytes*/ = 0, S /*stream*/ = S()) {
  return {grid, block};
}

template <typename K, typename... A>
void operator->*(K kernel, PendingLaunch<A...>&& p) {
  const auto& args = p.args;
  run_grid(p.grid, p.block, [&] { std::apply([&](const A&... a) { kernel(a...); }, args); },
           false);
}

void note_dependent_launch();  // a launch that asked to overlap the one before (cudaLaunchKernelEx)

}  // namespace emu

// Programmatic dependent launch: the launch runs as an ordinary one (each launch here ends before
// the next begins, so there is nothing to overlap); the runtime counts those that asked for it.
// The kernels' griddepcontrol instructions are compiled only for sm_90 on, so none here.
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 6 };  // as CUDA 13

union cudaLaunchAttributeValue {
  int programmaticStreamSerializationAllowed;
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

// The fields of cudaFuncAttributes that csrc/cuda reads: the emulated kernels count as sm_90's,
// with no static shared memory (its size is not known here).
struct cudaFuncAttributes {
  int ptxVersion;
  int binaryVersion;
  size_t sharedSizeBytes;
};

template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K) {
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->sharedSizeBytes = 0;
  return cudaSuccess;
}

// A kernel's dynamic shared memory may exceed 48 KB once this raises its limit: a cooperative
// launch with more than the limit fails, as on a GPU (runtime.cpp).
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int bytes) {
  ::emu::set_dynamic_limit(reinterpret_cast<const void*>(kernel), bytes);
  return cudaSuccess;
}

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...),
                               A&&... args) {
  for (unsigned int i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
        config->attrs[i].val.programmaticStreamSerializationAllowed != 0) {
      ::emu::note_dependent_launch();
    }
  }
  const std::tuple<std::decay_t<P>...> coerced(std::forward<A>(args)...);  // as a launch copies
  ::emu::run_grid(config->gridDim, config->blockDim, [&] { std::apply(kernel, coerced); }, false);
  return cudaSuccess;
}

#define threadIdx (::emu::self().thread_idx)
#define blockIdx (::emu::self().block_idx)
#define blockDim (::emu::self().block_dim)
#define gridDim (::emu::self().grid_dim)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define BN_EXT_EMU_CHECK_ALIGNED(p, bytes) ::emu::check_aligned(p, bytes)
#define BN_EXT_INDEX32_BOUND (::emu::index32_bound())
#define BN_EXT_MAX_GRID_X (::emu::max_grid_x())

// Device intrinsics, computed as the GPU does (rounding included) where that is cheap to say.
inline float __frsqrt_rn(float v) {
  // 1/sqrt in double, then rounded to float. Rounding twice could miss the correctly rounded
  // float (the GPU's) only where 1/sqrt(v) lies within ~2^-52 of a midpoint between two floats;
  // no float does (test_cuda_emulator.py checks every one, exactly), so this is the GPU's result.
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(v)));
}
inline double __dsqrt_rn(double v) { return std::sqrt(v); }

template <typename T>
inline T __ldcg(const T* p) {
  T v;
  __atomic_load(p, &v, __ATOMIC_ACQUIRE);
  return v;
}

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  ::emu::note_progress();
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline void __nanosleep(unsigned int) { ::emu::spin_wait(); }

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int,
                                                          size_t dynamic_bytes) {
  *blocks = ::emu::blocks_with_shared(::emu::blocks_per_sm(typeid(K).name()), dynamic_bytes);
  return cudaSuccess;
}
