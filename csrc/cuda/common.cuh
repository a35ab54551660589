// Shared pieces of the CUDA kernels: math types, 128-bit vector I/O, the index-type and vector-width
// dispatch, launch geometry, and the launchers that batch_norm_kernels.cu strings together.
//
// The entry points (bn_ext.h) live in batch_norm_kernels.cu; the reductions in
// reduce_kernels.cu and the elementwise/per-channel kernels in elementwise_kernels.cu, so that the
// three translation units compile in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../bn_ext.h"

namespace bn_ext {
namespace cuda {
namespace detail {

// float for float16/bfloat16/float32 input, double for float64: every sum and every per-channel
// coefficient is held in this type.
template <typename T>
using math_t = at::opmath_type<T>;

// Threads per block of every kernel.
constexpr int kThreads = 256;

// Elements of T in one 128-bit access.
template <typename T>
constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));

// V elements moved as one access: 128 bits when V == kMaxVec<T> (and the address is 16-aligned).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Lane w of v in the math type. A bfloat16 is the upper half of a float32's bits, so its lane is
// the packed 32-bit word shifted (even lanes) or masked (odd), the value c10's conversion gives.
// Through that conversion (on sm_90, cvt.f32.bf16, which reads a 16-bit register), ptxas moved
// every lane into a register of its own as soon as it was loaded: the one-block bf16 backward
// took 101-103 registers where its slots are masked (70-71 this way), the forward 80 (64).
template <typename T, int V>
__device__ __forceinline__ math_t<T> lane_value(const Vec<T, V>& v, int w) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && V % 2 == 0) {
    uint32_t word;
    memcpy(&word, reinterpret_cast<const unsigned char*>(&v) + 4 * (w / 2), 4);
    const uint32_t bits = w % 2 == 0 ? word << 16 : word & 0xffff0000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
  } else {
    return static_cast<math_t<T>>(v.v[w]);
  }
}

// The host emulator of these kernels (tests/cuda_emulator) checks each access's alignment, which
// a GPU would fault on; nvcc builds define the check away.
#ifndef BN_EXT_EMU_CHECK_ALIGNED
#define BN_EXT_EMU_CHECK_ALIGNED(p, bytes)
#endif

// A kernel's dynamic shared memory (the launch's bytes, 16-byte aligned) as `name`, an
// unsigned char*; on the emulator the block's own buffer (runtime.cpp).
#ifdef BN_EXT_CUDA_EMULATOR
#define BN_EXT_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#else
#define BN_EXT_DYNAMIC_SHARED(name)                              \
  extern __shared__ __align__(16) unsigned char name##_bytes[]; \
  unsigned char* name = name##_bytes
#endif

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  BN_EXT_EMU_CHECK_ALIGNED(p, sizeof(Vec<T, V>));
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  BN_EXT_EMU_CHECK_ALIGNED(p, sizeof(Vec<T, V>));
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Copies a 16-byte vector from global to shared memory with no register between: cp.async on
// sm_80 and later (the copy is in flight while the thread goes on; .cg: through L2 only), a
// plain copy elsewhere and on the emulator. What a thread copied is in shared memory, for that
// thread, after its copy_async_wait_all(); for other threads, after a __syncthreads() too.
template <int V, typename T>
__device__ __forceinline__ void copy_async_16(Vec<T, V>* shared_dst, const T* global_src) {
  static_assert(sizeof(Vec<T, V>) == 16, "cp.async of 16 bytes");
  BN_EXT_EMU_CHECK_ALIGNED(global_src, 16);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<unsigned int>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src)
               : "memory");
#else
  *shared_dst = load_vec<V>(global_src);
#endif
}

__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

// 1 / sqrt(v) rounded to nearest whatever the compiler's -prec-* flags: in float one correctly
// rounded operation (rsqrtf would be up to 2 ulp off), in double a square root and a division,
// each rounded to nearest.
__device__ __forceinline__ float inv_sqrt_rn(float v) { return __frsqrt_rn(v); }
__device__ __forceinline__ double inv_sqrt_rn(double v) { return 1.0 / __dsqrt_rn(v); }

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= v, saturating at 2^30 (callers want at most 32).
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p *= 2;
  return p;
}

// Streaming multiprocessors of the current device (cached by ATen; no device synchronisation).
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of kThreads that fill every SM once at full occupancy (2048 threads an SM on sm_80 and
// sm_90, 1536 on sm_86/sm_89).
inline int64_t full_wave_blocks() {
  const int per_sm = at::cuda::getCurrentDeviceProperties()->maxThreadsPerMultiProcessor;
  return sm_count() * (per_sm / kThreads);
}

// ask() for the current device, asked once per device while it answers non-zero (`cache`: a
// static array of the caller's, one per question; devices from 64 on are asked every time).
template <typename F>
int per_device(std::array<std::atomic<int>, 64>& cache, const F& ask) {
  const int dev = c10::cuda::current_device();
  int n = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    n = ask();
    if (dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks of `kernel` (kThreads each) resident on one SM, per device; asked of the runtime once
// per device and kernel (`cache`: a static array of the caller's, one per kernel).
template <typename Kernel>
int64_t resident_per_sm(Kernel kernel, std::array<std::atomic<int>, 64>& cache) {
  return per_device(cache, [&] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return n;
  });
}

// Whether environment variable `name` is `value` (the CUDA switches, read on every call).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Programmatic dependent launch (sm_90 on; the default, BN_EXT_CUDA_PDL=0 turns it off: 2-6%
// faster training passes on an H100, bench/results/cuda-nvidia-h100-80gb-hbm3-quick.md). A
// kernel launched by launch_after(true, ...) may start while the kernel before it in the stream
// still runs, once every block of that one has passed allow_dependents() or ended, so its blocks
// are placed and its first loads issued during the other's last wave rather than after it. It
// must pass wait_for_prior_grid() before it touches anything the earlier kernel writes; that
// returns once the earlier kernel has ended and its writes are visible. Both are no-ops in a
// kernel launched the ordinary way, and are compiled out below sm_90, where launch_after never
// asks for it (dependent_launch_on). Not asked for under graph capture.
// What the earlier kernel writes is read with coherent loads: not through a const __restrict__
// pointer or __ldg, whose ld.global.nc declares the data read-only for the kernel's whole life,
// which lets ptxas issue it before the wait. It did (nvcc 13.0, sm_90, 12-06): the finalize pass's
// load of the shift, once written right after the wait, came before it in the SASS. Before the
// wait a kernel may read the op's inputs: the op's first kernel is an ordinary launch (so every
// earlier op has ended), and nothing in the op writes them. .ci/check_dependent_loads.py checks
// the sm_90 SASS of every kernel that waits against its expected loads (see there).
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asks for the line holding *p in L2, holding no register for it (a hint: no fault, no value).
template <typename T>
__device__ __forceinline__ void prefetch_l2(const T* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launch_after may overlap: BN_EXT_CUDA_PDL not 0 (read on every call), the current
// stream not being captured, and this build's kernels for the current device made from sm_90
// code or later (so that their wait_for_prior_grid() is there: all are built for the same
// architectures, and one is asked). elementwise_kernels.cu.
bool dependent_launch_on();

// BN_EXT_CUDA_REVERSE_MAP=1 (read on every call; an experiment): the training maps sweep the
// tensor from its end (elementwise_kernels.cu says why).
bool reverse_map();

// kernel<<<grid, block, 0, stream>>>(args...), as a programmatic dependent launch where `overlap`
// (cudaLaunchKernelEx either way: with no attribute it is the ordinary launch).
template <typename... P, typename... A>
void launch_after(bool overlap, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream,
                  A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // (gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs)
  const cudaLaunchConfig_t config = {grid, block, 0, stream, attr, overlap ? 1u : 0u};
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<A>(args)...));
}

// The most blocks a grid may have along x. The emulator lowers it with BN_EXT_EMU_MAX_GRID_X, so
// that a test can reach what depends on it.
#ifndef BN_EXT_MAX_GRID_X
#define BN_EXT_MAX_GRID_X ((int64_t(1) << 31) - 1)
#endif

// The element count from which dispatch_index picks the 64-bit kernels. The emulator lowers it to
// 0 with BN_EXT_EMU_INDEX64=1, so that its small tensors run them.
#ifndef BN_EXT_INDEX32_BOUND
#define BN_EXT_INDEX32_BOUND (int64_t(1) << 31)
#endif

// Index type: unsigned 32-bit when every element index fits in 31 bits (fast division with
// at::cuda::detail::IntDivider, cheaper address arithmetic), 64-bit otherwise. Loop counters may
// run up to one grid stride past the end, which unsigned 32-bit still holds. 31 bits, not 32:
// IntDivider<uint32_t>'s device division computes (t + n) >> shift in 32 bits, exact only for
// dividends below 2^31; the emulator runs its host branch, 64-bit, and would not see a wider bound.
template <typename F>
void dispatch_index(int64_t numel, const F& f) {
  if (numel < BN_EXT_INDEX32_BOUND) {
    f(uint32_t{0});
  } else {
    f(uint64_t{0});
  }
}

// Vector width: kMaxVec<T> (128-bit accesses) when `vectorize`, else scalar.
template <typename T, typename F>
void dispatch_vec(bool vectorize, const F& f) {
  if (vectorize) {
    f(std::integral_constant<int, kMaxVec<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

#define BN_EXT_CUDA_DISPATCH(scalar_type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scalar_type, name, __VA_ARGS__)

template <typename M>
const M* opt_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<M>() : nullptr;
}

template <typename M>
M* opt_mutable_ptr(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<M>() : nullptr;
}

// ---- launchers (all on the current stream; per-channel tensors are contiguous math-type [C]) ---

// Per-channel mean and biased variance of x. When `coef` is defined ([3C]) the same finishing
// step also writes the forward coefficients (mu | alpha = w * invstd | beta = b), with `weight`
// and `bias` (either may be undefined) and eps; and when `running` is given, it also updates
// those running statistics. `running` must then have a momentum: with momentum None every
// channel would read num_batches_tracked while channel 0 increments it.
// With `y` defined (train_forward), the launches may also write the forward map's output there
// (BN_EXT_CUDA_MERGING_MAP=1, reduce_kernels.cu) rather than the table: returns whether they did.
bool launch_batch_stats(const Tensor& x, const Geometry& g, const Tensor& weight,
                        const Tensor& bias, double eps, const Tensor& mean, const Tensor& var,
                        const Tensor& coef, const RunningStats* running = nullptr,
                        const Tensor& y = Tensor());

// sum_dy, sum_dy_xmu (either may be undefined: not stored), grad_bias = sum_dy and
// grad_weight = sum_dy_xmu * invstd. When `coef` is defined ([4C]) also the training backward's
// coefficients (mu | a | b | d, see elementwise_kernels.cu) with n = g.count() and `weight`;
// with `dx` defined too, maybe the map's dx instead of them, as launch_batch_stats' y.
bool launch_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                      const Tensor& var, const Tensor& weight, double eps, const Tensor& sum_dy,
                      const Tensor& sum_dy_xmu, const Tensor& grad_weight,
                      const Tensor& grad_bias, const Tensor& coef,
                      const Tensor& dx = Tensor());

// launch_grad_sums' grad_weight and grad_bias, and eval's grad_input dx = dy * w * invstd (the
// eval map's values, bit for bit) written by the same kernel where it loads dy: one read of dy
// and x. dx must have x's layout (dense, as x and dy).
void launch_grad_sums_eval_dx(const Tensor& dy, const Tensor& x, const Geometry& g,
                              const Tensor& mean, const Tensor& var, const Tensor& weight,
                              double eps, const Tensor& grad_weight, const Tensor& grad_bias,
                              const Tensor& dx);

// coef[3C] = (mean | w * invstd | b) from given statistics.
void launch_forward_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                          const Tensor& bias, double eps, const Tensor& coef);

// coef[4C] = (mean | a | b | d) for the training backward's elementwise kernel, from the sums
// (count, a 0-d device tensor, is read on the device).
void launch_backward_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                           const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& count,
                           double eps, const Tensor& coef);

enum class Elementwise { kForward, kBackwardTrain, kBackwardEval };

// One channel's elementwise coefficients: forward (mu, alpha, beta, -), backward (mu, a, b, d);
// elementwise_kernels.cu derives them.
template <typename M>
struct Coefs {
  M mu, p1, p2, p3;
};

// The elementwise maps, one element:
//   forward         y  = (x - mu) * alpha + beta
//   backward train  dx = dy * a + ((x - mu) * b + d)
//   backward eval   dx = dy * a
template <Elementwise kOp, typename M>
__device__ __forceinline__ M elementwise_value(M x, M dy, const Coefs<M>& k) {
  if constexpr (kOp == Elementwise::kForward) {
    return fmadd(x - k.mu, k.p1, k.p2);
  } else if constexpr (kOp == Elementwise::kBackwardTrain) {
    return fmadd(dy, k.p1, fmadd(x - k.mu, k.p2, k.p3));
  } else {
    return dy * k.p1;
  }
}

// Where an elementwise kernel finds channel c's coefficients (the fields kOp uses, the others 0).
//
// CoefTable: a [3C] or [4C] table (mu | p1 | p2 | p3) from one of the coef launchers above or
// the reductions that write them.
template <typename M>
struct CoefTable {
  static constexpr bool kDerives = false;
  const M* coef;

  template <Elementwise kOp, typename I>
  __device__ __forceinline__ Coefs<M> at(I C, I c) const {
    Coefs<M> k{0, 0, 0, 0};
    k.p1 = coef[C + c];
    if constexpr (kOp != Elementwise::kBackwardEval) {
      k.mu = coef[c];
      k.p2 = coef[2 * C + c];
    }
    if constexpr (kOp == Elementwise::kBackwardTrain) k.p3 = coef[3 * C + c];
    return k;
  }
};

// The forward map's alpha = w * invstd, invstd = inv_sqrt_rn(var + eps) in the math type (as
// torch's kernels compute it). The training forward's finishing step and the eval maps both take
// it from here, so that train_forward's y is normalize()'s y for the batch statistics, bit for bit.
template <typename M>
__device__ __forceinline__ M forward_alpha(M var, M eps, const M* weight, int64_t c) {
  const M invstd = inv_sqrt_rn(var + eps);
  return weight != nullptr ? weight[c] * invstd : invstd;
}
// The same with the weight already loaded (1 where none: 1 * invstd is invstd exactly).
template <typename M>
__device__ __forceinline__ M forward_alpha(M var, M eps, M w) {
  return w * inv_sqrt_rn(var + eps);
}

// EvalStats: the eval coefficients, derived from given statistics where a thread needs them, in
// the math type as torch's kernels do (invstd = inv_sqrt_rn(var + eps)), so that an eval map is
// one launch:
//   forward       (mu = mean, alpha = w * invstd, beta = b)
//   backward eval (a = w * invstd)
// launch_forward_coefs' table holds the same values, so both routes give the same bits.
// weight and bias are nullable (1 and 0).
template <typename M>
struct EvalStats {
  static constexpr bool kDerives = true;
  const M* mean;
  const M* var;
  const M* weight;
  const M* bias;
  M eps;

  template <Elementwise kOp, typename I>
  __device__ __forceinline__ Coefs<M> at(I /*C*/, I c) const {
    static_assert(kOp != Elementwise::kBackwardTrain, "training coefficients need the sums");
    Coefs<M> k{0, 0, 0, 0};
    k.p1 = forward_alpha(var[c], eps, weight, static_cast<int64_t>(c));
    if constexpr (kOp == Elementwise::kForward) {
      k.mu = mean[c];
      k.p2 = bias != nullptr ? bias[c] : M(0);
    }
    return k;
  }
};

// out = f(x, dy) elementwise with per-channel coefficients from a CoefTable.
void launch_elementwise(Elementwise op, const Tensor& x, const Tensor& dy, const Geometry& g,
                        const Tensor& coef, const Tensor& out);

// The eval maps (op kForward or kBackwardEval) from statistics (EvalStats), in one launch where
// the kernel derives each coefficient for a run of elements; where the flat map meets a new
// channel at nearly every element (channels-last rows it cannot take whole, or unaligned
// tensors), a coefficient table first (launch_forward_coefs, whose alpha is also eval's a).
void launch_eval_elementwise(Elementwise op, const Tensor& x, const Tensor& dy,
                             const Geometry& g, const Tensor& mean, const Tensor& var,
                             const Tensor& weight, const Tensor& bias, double eps,
                             const Tensor& out);

// Which single-pass kernels train_forward / train_backward try before the multi-pass ones, by
// BN_EXT_CUDA_PERSISTENT (read on every call, so it can be switched between calls):
//   kOff       "0": none;
//   kOneBlock  unset (or any other value), the default: one block per channel, where a channel
//              fits in one (measured on an H200 against the multi-pass path in the same process:
//              faster on 33 of 36 ResNet-50 rows at batch 32, bench/results/README.md);
//   kAll       "1": also the cooperative kernel, a channel over several blocks (measured slower
//              than multi-pass: opt-in).
// Unless kOff, BN_EXT_CUDA_SEMI_PERSISTENT=1 (an experiment) first tries the semi-persistent
// channels-last kernel, which holds what fits on chip and reads the rest again.
enum class SinglePass { kOff, kOneBlock, kAll };
SinglePass single_pass_mode();

// The single-pass training forward and backward (persistent_kernels.cu): each channel's slice
// is read once into registers, its blocks merge their sums (one block per channel where the
// slice fits in one, else, under kAll, across a per-channel barrier), and the output is written
// from the registers. They return false, having launched nothing, where that path does not apply
// (the slice does not fit on chip, or the device lacks the cooperative launch that a channel
// spread over several blocks needs; the semi-persistent kernel's: persistent_kernels.cu). The
// forward also updates `running` (nullable; a fixed momentum) where its kernel can, and then
// sets running_updated.
bool launch_persistent_forward(SinglePass mode, const Tensor& x, const Geometry& g,
                               const Tensor& weight, const Tensor& bias, double eps,
                               const Tensor& y, const Tensor& mean, const Tensor& var,
                               const RunningStats* running, bool& running_updated);
bool launch_persistent_backward(SinglePass mode, const Tensor& dy, const Tensor& x,
                                const Geometry& g, const Tensor& mean, const Tensor& var,
                                const Tensor& weight, double eps, const Tensor& dx,
                                const Tensor& grad_weight, const Tensor& grad_bias);

// n unsigned counters at 0 on x's device, for the current stream's next kernel, which must
// leave them at 0 again (merge_if_last's tickets; the semi-persistent kernel's barriers): the
// stream's own buffer, so no launch zeroes it first (reduce_kernels.cu).
Tensor zeroed_counters(int64_t n, const Tensor& like);

// running_stats_update (bn_ext.h) in one single-block launch; n is read from `count` (a 0-d
// device tensor) when it is defined, else it is `n`.
void launch_running_stats_update(const Tensor& running_mean, const Tensor& running_var,
                                 const Tensor& num_batches_tracked, const Tensor& mean,
                                 const Tensor& var, const Tensor& count, double n,
                                 c10::optional<double> momentum);

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
