// The two per-channel reductions, as the ops that every reduction kernel is instantiated with
// (reduce_kernels.cu: multi-pass; persistent_kernels.cu: single pass):
//   StatsOp  s1 = sum(x - k), s2 = sum((x - k)^2)    -> mean, var; forward coefficients
//   GradOp   s1 = sum(dy),    s2 = sum(dy * (x - mu)) -> grad_bias, grad_weight; dx coefficients
// An op gives the channel's shift k (center), adds one element to a pair of lane sums
// (accumulate), and turns the channel's shift and merged sums into its outputs and elementwise
// coefficients (finish).
#pragma once

#include "reduce.cuh"

namespace bn_ext {
namespace cuda {
namespace detail {

// Statistics: s1 = sum(x - k), s2 = sum((x - k)^2), k = the mean of the channel's first
// kShiftSamples elements (as on the CPU). The rounding of the float sums reaches var amplified by
// 1 + (k - mean)^2 / var: with k one element, a first element 50 std from the mean costs a factor
// of ~2500; averaged over 32 elements, ~3.
constexpr int64_t kShiftSamples = 32;

// The shift from a channel's kShiftSamples sample values (0 past the `samples` it has), added in
// one fixed order (into part[j % 4], j ascending) wherever the values are held: value(j) gives
// sample j. Every caller gets the same bits from the same samples.
template <typename M, typename Value>
__device__ __forceinline__ M shift_of_samples(const Value& value, int64_t samples) {
  M part[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < kShiftSamples; ++j) part[j & 3] += value(j);
  return ((part[0] + part[1]) + (part[2] + part[3])) / static_cast<M>(samples);
}

template <typename T>
struct StatsOp {
  using M = math_t<T>;
  static constexpr bool kNeedsDy = false;
  static constexpr bool kSampledShift = true;  // center() reads kShiftSamples elements
  static constexpr Elementwise kMap = Elementwise::kForward;

  const T* x;
  int64_t S;             // run length; the channel's element j lies at
  bool channels_last;    //   (j / S * C + c) * S + j % S, or j * C + c channels-last
  int64_t samples;       // min(kShiftSamples, N * S)
  int64_t C;
  double n;
  double eps;
  const M* weight;  // nullable
  const M* bias;    // nullable
  M* mean;
  M* var;
  M* coef;  // nullable: (mu | alpha | beta) for the forward elementwise kernel

  // Sample j of channel c (j < kShiftSamples): its j-th element, 0 past `samples`.
  __device__ __forceinline__ M sample(int64_t c, int64_t j) const {
    if (j >= samples) return M(0);
    return static_cast<M>(x[channels_last ? j * C + c : (j / S * C + c) * S + j % S]);
  }

  // Every thread of the channel's blocks (and the finish step) computes the same k from the same
  // loads (cached), added in the same order, so all agree to the bit. The loads are all issued
  // before the first add: one memory latency, not kShiftSamples of them.
  __device__ __forceinline__ M center(int64_t c) const {
    M v[kShiftSamples];
    int64_t n = 0, s = 0;
#pragma unroll
    for (int j = 0; j < kShiftSamples; ++j) {
      const int64_t i = channels_last ? j * C + c : (n * C + c) * S + s;
      v[j] = j < samples ? static_cast<M>(x[i]) : M(0);
      if (++s == S) {
        s = 0;
        ++n;
      }
    }
    return shift_of_samples<M>([&](int j) { return v[j]; }, samples);
  }

  __device__ __forceinline__ static void accumulate(M xv, M /*dy*/, M k, M& a1, M& a2) {
    const M d = xv - k;
    a1 += d;
    a2 = fmadd(d, d, a2);
  }

  // mean = k + s1/n, var = s2/n - (s1/n)^2 (biased), in double, rounded once; a negative
  // rounding residue is clamped to 0 while NaN is kept (NaN stays in its channel); shift is
  // center(c). Stores mean and var (and coef) when `store`; returns the forward coefficients
  // (mu, alpha, beta).
  __device__ __forceinline__ Coefs<M> finish(int64_t c, M shift, M s1, M s2,
                                             bool store = true) const {
    const double k = static_cast<double>(shift);
    const double m1 = static_cast<double>(s1) / n;
    double v = static_cast<double>(s2) / n - m1 * m1;
    v = v < 0 ? 0.0 : v;
    const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
    Coefs<M> r;
    r.mu = static_cast<M>(k + m1);
    const M vm = static_cast<M>(v);
    r.p1 = static_cast<M>(w * (1.0 / sqrt(static_cast<double>(vm) + eps)));
    r.p2 = bias != nullptr ? bias[c] : M(0);
    r.p3 = 0;
    if (store) {
      mean[c] = r.mu;
      var[c] = vm;
      if (coef != nullptr) {
        coef[c] = r.mu;
        coef[C + c] = r.p1;
        coef[2 * C + c] = r.p2;
      }
    }
    return r;
  }
};

// Backward: s1 = sum(dy), s2 = sum(dy * (x - mean)).
template <typename T>
struct GradOp {
  using M = math_t<T>;
  static constexpr bool kNeedsDy = true;
  static constexpr bool kSampledShift = false;  // center() is mean[c]
  static constexpr Elementwise kMap = Elementwise::kBackwardTrain;

  const M* mean;
  const M* var;
  const M* weight;  // nullable
  int64_t C;
  double n;
  double eps;
  M* sum_dy;      // nullable
  M* sum_dy_xmu;  // nullable
  M* grad_weight;
  M* grad_bias;
  M* coef;  // nullable: (mu | a | b | d) for the training backward elementwise kernel

  __device__ __forceinline__ M center(int64_t c) const { return mean[c]; }

  __device__ __forceinline__ static void accumulate(M xv, M dy, M mu, M& a1, M& a2) {
    a1 += dy;
    a2 = fmadd(dy, xv - mu, a2);
  }

  // grad_bias = sum_dy, grad_weight = sum_dy_xmu * invstd; and, with w' = w * invstd,
  //   dx = w' * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)
  //      = dy * a + (x - mean) * b + d,
  //   a = w',  b = -w' invstd^2 sum_dy_xmu / n,  d = -w' sum_dy / n.
  // mu is center(c) = mean[c]. Stores the gradients (and coef) when `store`; returns
  // (mu, a, b, d).
  __device__ __forceinline__ Coefs<M> finish(int64_t c, M mu, M s1, M s2,
                                             bool store = true) const {
    const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
    const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
    const double a = w * invstd;
    Coefs<M> r;
    r.mu = mu;
    r.p1 = static_cast<M>(a);
    r.p2 = static_cast<M>(-a * invstd * invstd * static_cast<double>(s2) / n);
    r.p3 = static_cast<M>(-a * static_cast<double>(s1) / n);
    if (store) {
      if (sum_dy != nullptr) sum_dy[c] = s1;
      if (sum_dy_xmu != nullptr) sum_dy_xmu[c] = s2;
      grad_bias[c] = s1;
      grad_weight[c] = static_cast<M>(static_cast<double>(s2) * invstd);
      if (coef != nullptr) {
        coef[c] = r.mu;
        coef[C + c] = r.p1;
        coef[2 * C + c] = r.p2;
        coef[3 * C + c] = r.p3;
      }
    }
    return r;
  }
};

// The ops for a launch: per-channel tensors are math-type [C]; undefined ones become nullptr.
template <typename T>
StatsOp<T> stats_op(const Tensor& x, const Geometry& g, const Tensor& weight, const Tensor& bias,
                    double eps, const Tensor& mean, const Tensor& var, const Tensor& coef) {
  using M = math_t<T>;
  StatsOp<T> op;
  op.x = x.const_data_ptr<T>();
  op.S = g.S;
  op.channels_last = g.layout == Layout::kChannelsLast;
  op.samples = std::min<int64_t>(kShiftSamples, g.count());
  op.C = g.C;
  op.n = static_cast<double>(g.count());
  op.eps = eps;
  op.weight = opt_ptr<M>(weight);
  op.bias = opt_ptr<M>(bias);
  op.mean = mean.mutable_data_ptr<M>();
  op.var = var.mutable_data_ptr<M>();
  op.coef = opt_mutable_ptr<M>(coef);
  return op;
}

template <typename T>
GradOp<T> grad_op(const Geometry& g, const Tensor& mean, const Tensor& var, const Tensor& weight,
                  double eps, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                  const Tensor& grad_weight, const Tensor& grad_bias, const Tensor& coef) {
  using M = math_t<T>;
  GradOp<T> op;
  op.mean = mean.const_data_ptr<M>();
  op.var = var.const_data_ptr<M>();
  op.weight = opt_ptr<M>(weight);
  op.C = g.C;
  op.n = static_cast<double>(g.count());
  op.eps = eps;
  op.sum_dy = opt_mutable_ptr<M>(sum_dy);
  op.sum_dy_xmu = opt_mutable_ptr<M>(sum_dy_xmu);
  op.grad_weight = grad_weight.mutable_data_ptr<M>();
  op.grad_bias = grad_bias.mutable_data_ptr<M>();
  op.coef = opt_mutable_ptr<M>(coef);
  return op;
}

template <typename Op, int V, typename T, typename M>
__device__ __forceinline__ void accumulate_vec(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                               const M (&k)[V], M (&a1)[V], M (&a2)[V]) {
#pragma unroll
  for (int w = 0; w < V; ++w) {
    Op::accumulate(static_cast<M>(xv.v[w]), Op::kNeedsDy ? static_cast<M>(dv.v[w]) : M(0), k[w],
                   a1[w], a2[w]);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
