// Shared declarations: the geometry every kernel sees, and the per-backend kernel entry points.
//
// ops.cpp is the one front door. It checks arguments, brings every tensor into one of the two
// kernel layouts, converts per-channel vectors to the math type, allocates outputs, and then calls
// the backend below. Kernel files do no argument checking.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <numeric>

namespace bn_ext {

using at::Tensor;

// Every input is viewed as (N, C, S), S being the product of the spatial sizes.
//   kContiguous:   element (n, c, s) at (n * C + c) * S + s  -- runs of S per (n, c)
//   kChannelsLast: element (n, c, s) at (n * S + s) * C + c  -- runs of C per (n, s)
// 2-D (N, C) input is kChannelsLast with S = 1: its rows are runs of C.
enum class Layout { kContiguous, kChannelsLast };

struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  Layout layout;
  int64_t count() const { return N * S; }  // elements per channel
};

#ifdef __CUDACC__
#define BN_EXT_HOST_DEVICE __host__ __device__
#else
#define BN_EXT_HOST_DEVICE
#endif

// The shift k of a channel's shifted sums (both backends sum x - k, with k near the mean) is the
// mean of kShiftSamples of its elements, spread over a window of its first W elements in (n, s)
// order: image 0's S positions when S >= 32, else the first min(N * S, 32) elements. Sample j is
// element e_j = (G / 2 + j * G) mod W, G the largest integer <= W (sqrt(5) - 1) / 2 that has no
// factor in common with W: a golden-ratio sequence that repeats no element before it has visited
// all W, and whose column step (G mod the image width, which divides W) is not 0, so the samples
// fall on different rows and columns of an image (a border such as the first row or column of
// image 0 sets few of them). The window is the first data the reduction reads anyway (no extra
// cache misses); it does leave k to image 0 alone, so a first image far from the others (by d,
// against a within-image spread << d) still amplifies the rounding, by up to ~N. The samples are
// added in 8 groups of 4 consecutive ones, ((v0 + v1) + (v2 + v3)), and the groups in a fixed
// tree (add_shift_groups), so that up to 8 threads can share the work and still agree to the bit
// with one thread doing it all. Each sample is scaled by 1/32 as it is loaded (shift_sample):
// a power of two, so every partial sum is the unscaled one's / 32 exactly, and k has the bits of
// sum / 32, but no partial sum can overflow (32 samples of 1.1e37 overflow float's sum, and made
// a constant channel of them a mean of inf).
constexpr int64_t kShiftSamples = 32;
constexpr int kShiftGroups = 8;

struct ShiftSamples {
  int64_t C, S, W, G;
  int64_t G4;  // 4 G mod W: from the first sample of a group to the next group's
  bool channels_last;

  // e_{4i}, the first sample of group i < kShiftGroups; e_{j+1} from e_j. Walked, with no
  // division, in a loop of fixed length that a GPU thread unrolls into straight-line code.
  BN_EXT_HOST_DEVICE int64_t group_start(int i) const {
    int64_t e = G / 2;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < kShiftGroups - 1; ++k) {
      if (k < i) e = step(e, G4);
    }
    return e;
  }
  BN_EXT_HOST_DEVICE int64_t next(int64_t e) const { return step(e, G); }
  BN_EXT_HOST_DEVICE int64_t step(int64_t e, int64_t d) const {  // (e + d) mod W, e and d < W
    e += d;
    return e >= W ? e - W : e;
  }
  // The offset of element e (< W) of channel c: the offset for channel 0 plus c * S
  // (kContiguous) or c (kChannelsLast).
  BN_EXT_HOST_DEVICE int64_t offset(int64_t e, int64_t c) const {
    if (channels_last) return e * C + c;
    if (W <= S) return c * S + e;  // image 0
    const int64_t n = static_cast<int>(e) / static_cast<int>(S);  // e < W <= 32
    return (n * C + c) * S + (e - n * S);
  }
};

// A sample as the groups add it: v / kShiftSamples, exact (below float's normal range it rounds,
// which only moves k within the channel's values).
template <typename M>
BN_EXT_HOST_DEVICE inline M shift_sample(M v) {
  return v * (M(1) / static_cast<M>(kShiftSamples));
}

// k from the 8 group sums of scaled samples; 0 when a sample is inf or NaN. An inf sample would
// make k inf and every x - k inf - inf = NaN, so the mean NaN where torch's is inf (and the
// running mean with it); with k = 0 the sums, and so the mean, are inf as torch's. k - k is 0
// only for finite k.
template <typename M>
BN_EXT_HOST_DEVICE inline M add_shift_groups(const M (&g)[kShiftGroups]) {
  const M k = ((g[0] + g[1]) + (g[2] + g[3])) + ((g[4] + g[5]) + (g[6] + g[7]));
  return k - k == M(0) ? k : M(0);
}

inline ShiftSamples shift_samples(const Geometry& g) {
  ShiftSamples r;
  r.C = g.C;
  r.S = g.S;
  r.W = std::min(g.count(), std::max(g.S, kShiftSamples));
  r.G = r.W * 40503 / 65536;  // 40503 / 2^16 = 0.618034; >= 1 for W >= 2
  while (r.G > 1 && std::gcd(r.G, r.W) != 1) --r.G;
  r.G4 = r.W > 0 ? 4 * r.G % r.W : 0;  // W = 0: an empty batch (its ops return first)
  r.channels_last = g.layout == Layout::kChannelsLast;
  return r;
}

// The running statistics that train_forward updates with the batch statistics it has just
// computed, as running_stats_update below does with n = g.count(): mean and var are contiguous
// math-type [C] tensors; num_batches_tracked, when defined, an int64 scalar. Done inside the
// forward's own kernels, where the backend can, rather than by a launch of its own.
struct RunningStats {
  Tensor mean;
  Tensor var;
  Tensor num_batches_tracked;
  c10::optional<double> momentum;
};

// One channel of that update: running = (1 - m) running + m batch, the batch variance unbiased
// by unbias = n / (n - 1) (inf/nan for n == 1, as in torch); in double, rounded once to M. Every
// backend and path (CPU, the CUDA update kernel, the CUDA reductions' finishing step) calls it.
// The second product is added by an explicit fma: written as a * b + c * d, g++ with -mfma fused
// one of the products, and the emulator's build (-ffp-contract=off) neither, so the backends
// rounded differently; this way they give the same bits from the same batch statistics.
template <typename M>
BN_EXT_HOST_DEVICE inline void blend_running_stats(M& running_mean, M& running_var, M mean, M var,
                                                   double m, double unbias) {
  running_mean = static_cast<M>(
      ::fma(m, static_cast<double>(mean), (1 - m) * static_cast<double>(running_mean)));
  running_var = static_cast<M>(
      ::fma(m * unbias, static_cast<double>(var), (1 - m) * static_cast<double>(running_var)));
}

// Per-channel tensors handed to kernels are contiguous 1-D [C] tensors of the math type
// (float64 for float64 input, float32 otherwise); weight/bias may be undefined (affine=False).
// Outputs are preallocated by the front door, uninitialized (for a non-empty input): a kernel
// writes every element of each output it is given.
#define BN_EXT_DECLARE_KERNELS                                                                   \
  /* mean and biased variance per channel, in the math type or float64 (mean, var agree) */     \
  void batch_stats(const Tensor& x, const Geometry& g, Tensor& mean, Tensor& var);               \
  /* y = (x - mean) * weight / sqrt(var + eps) + bias */                                         \
  void normalize(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var,      \
                 const Tensor& weight, const Tensor& bias, double eps, Tensor& y);               \
  /* batch_stats then normalize, in as few passes over x as the backend can manage; then the    \
     running statistics' update, when `running` is given */                                      \
  void train_forward(const Tensor& x, const Geometry& g, const Tensor& weight,                   \
                     const Tensor& bias, double eps, Tensor& y, Tensor& mean, Tensor& var,       \
                     const RunningStats* running);                                               \
  /* sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) per channel; then                      \
     grad_bias = sum_dy and grad_weight = sum_dy_xmu / sqrt(var + eps) */                        \
  void backward_reduce(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean, \
                       const Tensor& var, double eps, Tensor& sum_dy, Tensor& sum_dy_xmu,        \
                       Tensor& grad_weight, Tensor& grad_bias);                                  \
  /* training: dx = w*invstd * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)           \
     eval (sum_dy undefined): dx = w*invstd * dy */                                              \
  void backward_input(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,  \
                      const Tensor& var, const Tensor& weight, const Tensor& sum_dy,             \
                      const Tensor& sum_dy_xmu, const Tensor& count, double eps, Tensor& dx);    \
  /* backward_reduce then backward_input (training), fused where the backend can */             \
  void train_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,  \
                      const Tensor& var, const Tensor& weight, double eps, Tensor& dx,           \
                      Tensor& grad_weight, Tensor& grad_bias);                                   \
  /* eval's backward, all three gradients: dx = w*invstd * dy, and backward_reduce's grad_weight \
     and grad_bias; with fewer passes over dy than those two ops where the backend can */      \
  void normalize_backward(const Tensor& dy, const Tensor& x, const Geometry& g,                  \
                          const Tensor& mean, const Tensor& var, const Tensor& weight,           \
                          double eps, Tensor& dx, Tensor& grad_weight, Tensor& grad_bias);       \
  /* num_batches_tracked += 1 (when defined); then                                             \
     running = (1 - m) * running + m * batch, running_var being fed the unbiased variance         \
     var * n / (n - 1); m = momentum, or 1 / num_batches_tracked when momentum is None.          \
     running_* are math-type [C] tensors; count is a 0-d math-type tensor holding n. */          \
  void running_stats_update(Tensor& running_mean, Tensor& running_var,                           \
                            const Tensor& num_batches_tracked, const Tensor& mean,               \
                            const Tensor& var, const Tensor& count,                              \
                            c10::optional<double> momentum);

namespace cpu {
BN_EXT_DECLARE_KERNELS
// An uninitialized CPU tensor for a kernel to fill, large ones from the block cache
// (output_cache.cpp); and that cache's controls: give every cached block back, and
// {cached bytes, cached blocks, limit in bytes, hits, misses}.
Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);
void empty_output_cache();
std::vector<int64_t> output_cache_stats();
// Testing: holds the cache's lock for `seconds`, as a thread inside an allocation would.
void hold_output_cache_lock(double seconds);
}  // namespace cpu

#ifdef BN_EXT_WITH_CUDA
namespace cuda {
BN_EXT_DECLARE_KERNELS
}  // namespace cuda
#endif

}  // namespace bn_ext
