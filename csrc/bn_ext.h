// Shared declarations: the geometry every kernel sees, and the per-backend kernel entry points.
//
// ops.cpp is the one front door. It checks arguments, brings every tensor into one of the two
// kernel layouts, converts per-channel vectors to the math type, allocates outputs, and then calls
// the backend below. Kernel files do no argument checking.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

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

// Per-channel tensors handed to kernels are contiguous 1-D [C] tensors of the math type
// (float64 for float64 input, float32 otherwise); weight/bias may be undefined (affine=False).
// Outputs are preallocated by the front door.
#define BN_EXT_DECLARE_KERNELS                                                                   \
  /* mean and biased variance per channel */                                                    \
  void batch_stats(const Tensor& x, const Geometry& g, Tensor& mean, Tensor& var);               \
  /* y = (x - mean) * weight / sqrt(var + eps) + bias */                                         \
  void normalize(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var,      \
                 const Tensor& weight, const Tensor& bias, double eps, Tensor& y);               \
  /* batch_stats then normalize, in as few passes over x as the backend can manage */            \
  void train_forward(const Tensor& x, const Geometry& g, const Tensor& weight,                   \
                     const Tensor& bias, double eps, Tensor& y, Tensor& mean, Tensor& var);      \
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
}  // namespace cpu

#ifdef BN_EXT_WITH_CUDA
namespace cuda {
BN_EXT_DECLARE_KERNELS
}  // namespace cuda
#endif

}  // namespace bn_ext
