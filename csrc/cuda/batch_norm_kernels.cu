// CUDA entry points (bn_ext.h, namespace cuda): each op as a short sequence of launches on the
// current stream, with no host synchronisation and no host reads of device values, so every op
// can be captured in a CUDA graph. Temporaries come from the caching allocator (at::empty).
//
//   batch_stats        reduce [+ finalize]
//   normalize          elementwise, deriving the coefficients from the statistics (or, where
//                      the map would derive them at nearly every element, forward_coefs first)
//   train_forward      one single-pass kernel where a channel fits in a block (by default;
//                      BN_EXT_CUDA_PERSISTENT: common.cuh's SinglePass); else reduce
//                      [+ finalize] (which also write the coefficients and, with a fixed
//                      momentum, update the running statistics), elementwise
//                      [+ running_stats (momentum None, or the cooperative kernel)]
//   backward_reduce    reduce [+ finalize]
//   backward_input     training: backward_coefs (count read on the device), elementwise;
//                      eval: as normalize
//   normalize_backward reduce [+ finalize], the reduction also writing dx (eval's dx needs no
//                      sums): the reads of backward_reduce, and backward_input's write
//   train_backward     reduce [+ finalize] (which also write the coefficients), elementwise;
//                      or one persistent kernel, as train_forward
//   (both training ops: under BN_EXT_CUDA_SEMI_PERSISTENT=1, a channels-last input of one tile
//   runs one semi-persistent kernel, the forward then running_stats)
//   (both training ops: where BN_EXT_CUDA_MERGING_MAP=1 applies, a staged reduction is followed
//   by one map that merges its partial sums, in place of finalize and elementwise)
//   running_stats_update  one single-block kernel
//
// The kernels are described in reduce_kernels.cu, elementwise_kernels.cu and
// persistent_kernels.cu; the reduction value and its merge in reduce.cuh, the reduction ops in
// channel_ops.cuh.
#include "common.cuh"

namespace bn_ext {
namespace cuda {

using detail::Elementwise;

namespace {

Tensor coef_buffer(const Tensor& like, const Geometry& g, int rows) {
  return at::empty({rows * g.C}, like.options());
}

}  // namespace

void batch_stats(const Tensor& x, const Geometry& g, Tensor& mean, Tensor& var) {
  c10::cuda::CUDAGuard guard(x.device());
  detail::launch_batch_stats(x, g, Tensor(), Tensor(), 0.0, mean, var, Tensor());
}

void normalize(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var,
               const Tensor& weight, const Tensor& bias, double eps, Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  detail::launch_eval_elementwise(Elementwise::kForward, x, Tensor(), g, mean, var, weight, bias,
                                  eps, y);
}

void train_forward(const Tensor& x, const Geometry& g, const Tensor& weight, const Tensor& bias,
                   double eps, Tensor& y, Tensor& mean, Tensor& var,
                   const RunningStats* running) {
  c10::cuda::CUDAGuard guard(x.device());
  // With a fixed momentum the multi-pass reduction's finishing step updates the running
  // statistics (no launch of their own), and so does the one-block-per-channel single-pass
  // kernel. Momentum None reads num_batches_tracked on the device, and the cooperative
  // single-pass kernel has no registers to spare for the update: a launch after.
  const RunningStats* fixed =
      running != nullptr && running->momentum.has_value() ? running : nullptr;
  bool folded = false;
  const auto mode = detail::single_pass_mode();
  if (!(mode != detail::SinglePass::kOff &&
        detail::launch_persistent_forward(mode, x, g, weight, bias, eps, y, mean, var, fixed,
                                          folded))) {
    folded = fixed != nullptr;
    const Tensor coef = coef_buffer(mean, g, 3);
    if (!detail::launch_batch_stats(x, g, weight, bias, eps, mean, var, coef, fixed, y)) {
      detail::launch_elementwise(Elementwise::kForward, x, Tensor(), g, coef, y);
    }
  }
  if (running != nullptr && !folded) {
    detail::launch_running_stats_update(running->mean, running->var,
                                        running->num_batches_tracked, mean, var, Tensor(),
                                        static_cast<double>(g.count()), running->momentum);
  }
}

void backward_reduce(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                     const Tensor& var, double eps, Tensor& sum_dy, Tensor& sum_dy_xmu,
                     Tensor& grad_weight, Tensor& grad_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  detail::launch_grad_sums(dy, x, g, mean, var, Tensor(), eps, sum_dy, sum_dy_xmu, grad_weight,
                           grad_bias, Tensor());
}

void backward_input(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, const Tensor& sum_dy,
                    const Tensor& sum_dy_xmu, const Tensor& count, double eps, Tensor& dx) {
  c10::cuda::CUDAGuard guard(x.device());
  if (!sum_dy.defined()) {  // eval
    detail::launch_eval_elementwise(Elementwise::kBackwardEval, x, dy, g, mean, var, weight,
                                    Tensor(), eps, dx);
    return;
  }
  const Tensor coef = coef_buffer(mean, g, 4);
  detail::launch_backward_coefs(mean, var, weight, sum_dy, sum_dy_xmu, count, eps, coef);
  detail::launch_elementwise(Elementwise::kBackwardTrain, x, dy, g, coef, dx);
}

void normalize_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                        const Tensor& var, const Tensor& weight, double eps, Tensor& dx,
                        Tensor& grad_weight, Tensor& grad_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  detail::launch_grad_sums_eval_dx(dy, x, g, mean, var, weight, eps, grad_weight, grad_bias, dx);
}

void train_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, double eps, Tensor& dx,
                    Tensor& grad_weight, Tensor& grad_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  const auto mode = detail::single_pass_mode();
  if (mode != detail::SinglePass::kOff &&
      detail::launch_persistent_backward(mode, dy, x, g, mean, var, weight, eps, dx, grad_weight,
                                         grad_bias)) {
    return;
  }
  const Tensor coef = coef_buffer(mean, g, 4);
  if (!detail::launch_grad_sums(dy, x, g, mean, var, weight, eps, Tensor(), Tensor(),
                                grad_weight, grad_bias, coef, dx)) {
    detail::launch_elementwise(Elementwise::kBackwardTrain, x, dy, g, coef, dx);
  }
}

void running_stats_update(Tensor& running_mean, Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, const Tensor& count,
                          c10::optional<double> momentum) {
  c10::cuda::CUDAGuard guard(mean.device());
  detail::launch_running_stats_update(running_mean, running_var, num_batches_tracked, mean, var,
                                      count, 0.0, momentum);
}

}  // namespace cuda
}  // namespace bn_ext
