// The two per-channel reductions, as the ops that every reduction kernel is instantiated with
// (reduce_kernels.cu: multi-pass; persistent_kernels.cu: single pass):
//   StatsOp  s1 = sum(x - k), s2 = sum((x - k)^2)    -> mean, var; forward coefficients
//   GradOp   s1 = sum(dy),    s2 = sum(dy * (x - mu)) -> grad_bias, grad_weight; dx coefficients
//            (or, kEvalDx, eval's dx itself, written as the reduction goes)
// An op gives the channel's shift k (center), adds one element to a pair of lane sums
// (accumulate), and turns the channel's shift and merged sums into its outputs and elementwise
// coefficients (finish).
#pragma once

#include "reduce.cuh"

namespace bn_ext {
namespace cuda {
namespace detail {

// Statistics: s1 = sum(x - k), s2 = sum((x - k)^2), k = the mean of the channel's kShiftSamples
// samples (bn_ext.h; the CPU's k too). The rounding of the float sums reaches var amplified by
// 1 + (k - mean)^2 / var: ~1 + 1/32 for samples like the rest of the channel. Had k been the
// mean of the channel's first 32 elements, a border of 32 zeros at the top of image 0 in a channel
// of N(5, 0.01) would have set it, for a factor of ~1e4 (var 2e-3 against a 5.0 offset).

// kRunning: finish() can also update running statistics (below). The multi-pass reductions and
// the one-block-per-channel single-pass kernel take that code; in the cooperative single-pass
// kernels, which hold their tile in registers, it cost registers (bf16/fp16 V=8: 80 -> 92, so
// 3 -> 2 resident blocks an SM).
template <typename T, bool kRunning = false>
struct StatsOp {
  using M = math_t<T>;
  static constexpr bool kNeedsDy = false;
  static constexpr bool kSampledShift = true;  // center() reads kShiftSamples elements
  static constexpr bool kWritesDx = false;
  static constexpr Elementwise kMap = Elementwise::kForward;

  const T* x;
  ShiftSamples samples;  // where center()'s samples lie (bn_ext.h)
  int64_t C;
  double n;
  double eps;
  const M* weight;  // nullable
  const M* bias;    // nullable
  M* mean;    // null where mean64 is set
  M* var;
  double* mean64;  // nullable: batch_stats' float64 statistics (ops.cpp), stored instead
  double* var64;
  M* coef;  // nullable: (mu | alpha | beta) for the forward elementwise kernel
  // kRunning, nullable: running statistics that the finishing step updates where it stores mean
  // and var, as running_stats_update does (bn_ext.h) with this fixed momentum; channel 0's step
  // also counts the batch in num_batches_tracked (nullable), which no other channel reads.
  M* running_mean;
  M* running_var;
  int64_t* num_batches_tracked;
  double momentum;

  // Group i of channel c's shift samples into v, and their sum as bn_ext.h says:
  // ((v0 + v1) + (v2 + v3)).
  __device__ __forceinline__ void load_shift_group(int64_t c, int i, M (&v)[4]) const {
    int64_t e[4];
    e[0] = samples.group_start(i);
#pragma unroll
    for (int j = 1; j < 4; ++j) e[j] = samples.next(e[j - 1]);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = static_cast<M>(x[samples.offset(e[j], c)]);
  }
  static __device__ __forceinline__ M add_shift_group(const M (&v)[4]) {
    return (shift_sample(v[0]) + shift_sample(v[1])) + (shift_sample(v[2]) + shift_sample(v[3]));
  }
  __device__ __forceinline__ M shift_group(int64_t c, int i) const {
    M v[4];
    load_shift_group(c, i, v);
    return add_shift_group(v);
  }

  // k, by one thread: the op interface's definition. The kernels share the loads over a block
  // (channel_shift, tile_shifts_rows, below), and the finalize pass reads the k the first pass
  // stored.
  __device__ __forceinline__ M center(int64_t c) const {
    M group[kShiftGroups];
#pragma unroll
    for (int i = 0; i < kShiftGroups; ++i) group[i] = shift_group(c, i);
    return add_shift_groups(group);
  }

  __device__ __forceinline__ static void accumulate(M xv, M /*dy*/, M k, M& a1, M& a2) {
    const M d = xv - k;
    a1 += d;
    a2 = fmadd(d, d, a2);
  }

  // What finish() reads of channel c besides its sums, which a kernel may load ahead of them:
  // weight (1 where none: w * invstd is invstd exactly), bias (0), and the running statistics.
  struct Params {
    M w, b, running_mean, running_var;
  };
  __device__ __forceinline__ Params params(int64_t c) const {
    Params p;
    p.w = weight != nullptr ? weight[c] : M(1);
    p.b = bias != nullptr ? bias[c] : M(0);
    const bool running = kRunning && running_mean != nullptr;
    p.running_mean = running ? running_mean[c] : M(0);
    p.running_var = running ? running_var[c] : M(0);
    return p;
  }

  // mean = k + s1/n, var = s2/n - (s1/n)^2 (biased), in double, rounded once; a negative
  // rounding residue is clamped to 0 while NaN is kept (NaN stays in its channel); shift is
  // center(c). Stores mean and var (and coef) when `store`; returns the forward coefficients
  // (mu, alpha, beta), alpha from the rounded var as the eval maps derive it (forward_alpha).
  // The parameters are read here, or taken from `p` (params(c), loaded ahead); p is a constant
  // once inlined, so without it this is the code that reads them where they are used.
  __device__ __forceinline__ Coefs<M> finish(int64_t c, M shift, M s1, M s2, bool store = true,
                                             const Params* p = nullptr) const {
    const double k = static_cast<double>(shift);
    const double m1 = static_cast<double>(s1) / n;
    double v = static_cast<double>(s2) / n - m1 * m1;
    v = v < 0 ? 0.0 : v;
    Coefs<M> r;
    r.mu = static_cast<M>(k + m1);
    const M vm = static_cast<M>(v);
    r.p1 = p != nullptr ? forward_alpha(vm, static_cast<M>(eps), p->w)
                        : forward_alpha(vm, static_cast<M>(eps), weight, c);
    r.p2 = p != nullptr ? p->b : bias != nullptr ? bias[c] : M(0);
    r.p3 = 0;
    if (store) {
      if (mean64 != nullptr) {
        mean64[c] = k + m1;
        var64[c] = v;
      } else {
        mean[c] = r.mu;
        var[c] = vm;
      }
      if (coef != nullptr) {
        coef[c] = r.mu;
        coef[C + c] = r.p1;
        coef[2 * C + c] = r.p2;
      }
      if (kRunning && running_mean != nullptr) {
        const double unbias = n / (n - 1);
        if (p != nullptr) {
          M rm = p->running_mean, rv = p->running_var;
          blend_running_stats(rm, rv, r.mu, vm, momentum, unbias);
          running_mean[c] = rm;
          running_var[c] = rv;
        } else {
          blend_running_stats(running_mean[c], running_var[c], r.mu, vm, momentum, unbias);
        }
        if (c == 0 && num_batches_tracked != nullptr) *num_batches_tracked += 1;
      }
    }
    return r;
  }
};

// Backward: s1 = sum(dy), s2 = sum(dy * (x - mean)).
//
// kEvalDx: the multi-pass reduction also writes eval's dx = dy * a (a = eval_dx_scale(c)) at
// each element of dy it loads. Eval's dx needs none of the sums, so normalize_backward reads dy
// and x once and writes dx: 3 passes, not the 4 of backward_reduce then the eval map.
template <typename T, bool kEvalDx = false>
struct GradOp {
  using M = math_t<T>;
  static constexpr bool kNeedsDy = true;
  static constexpr bool kSampledShift = false;  // center() is mean[c]
  static constexpr bool kWritesDx = kEvalDx;
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
  T* dx;    // kEvalDx: eval's grad_input, laid out as x and dy

  __device__ __forceinline__ M center(int64_t c) const { return mean[c]; }

  // Eval's a = w * invstd as the eval map derives it (EvalStats: forward_alpha in the math
  // type), so that the fused dx is the eval map's to the bit.
  __device__ __forceinline__ M eval_dx_scale(int64_t c) const {
    return forward_alpha(var[c], static_cast<M>(eps), weight, c);
  }

  __device__ __forceinline__ static void accumulate(M xv, M dy, M mu, M& a1, M& a2) {
    a1 += dy;
    a2 = fmadd(dy, xv - mu, a2);
  }

  // What finish() reads of channel c besides its sums and mean: var and weight (1 where none).
  struct Params {
    M var, w;
  };
  __device__ __forceinline__ Params params(int64_t c) const {
    return Params{var[c], weight != nullptr ? weight[c] : M(1)};
  }

  // grad_bias = sum_dy, grad_weight = sum_dy_xmu * invstd; and, with w' = w * invstd,
  //   dx = w' * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)
  //      = dy * a + (x - mean) * b + d,
  //   a = w',  b = -w' invstd^2 sum_dy_xmu / n,  d = -w' sum_dy / n.
  // mu is center(c) = mean[c]. Stores the gradients (and coef) when `store`; returns
  // (mu, a, b, d).
  // The parameters are read here, or taken from `p` (params(c), loaded ahead).
  __device__ __forceinline__ Coefs<M> finish(int64_t c, M mu, M s1, M s2, bool store = true,
                                             const Params* p = nullptr) const {
    const double invstd = 1.0 / sqrt(static_cast<double>(p != nullptr ? p->var : var[c]) + eps);
    const M wm = p != nullptr ? p->w : weight != nullptr ? weight[c] : M(1);
    const double w = static_cast<double>(wm);
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

// The ops for a launch: per-channel tensors are math-type [C], but for mean and var, which may
// be float64 (then stored as mean64 and var64); undefined ones become nullptr. `running`
// (nullable; only with kRunning) must have a momentum: see launch_batch_stats.
template <typename T, bool kRunning = false>
StatsOp<T, kRunning> stats_op(const Tensor& x, const Geometry& g, const Tensor& weight,
                              const Tensor& bias, double eps, const Tensor& mean,
                              const Tensor& var, const Tensor& coef,
                              const RunningStats* running = nullptr) {
  using M = math_t<T>;
  TORCH_INTERNAL_ASSERT(kRunning || running == nullptr);
  StatsOp<T, kRunning> op;
  op.x = x.const_data_ptr<T>();
  op.samples = shift_samples(g);
  op.C = g.C;
  op.n = static_cast<double>(g.count());
  op.eps = eps;
  op.weight = opt_ptr<M>(weight);
  op.bias = opt_ptr<M>(bias);
  const bool wide = mean.scalar_type() == at::kDouble && !std::is_same_v<M, double>;
  op.mean = wide ? nullptr : mean.mutable_data_ptr<M>();
  op.var = wide ? nullptr : var.mutable_data_ptr<M>();
  op.mean64 = wide ? mean.mutable_data_ptr<double>() : nullptr;
  op.var64 = wide ? var.mutable_data_ptr<double>() : nullptr;
  op.coef = opt_mutable_ptr<M>(coef);
  op.running_mean = running != nullptr ? running->mean.mutable_data_ptr<M>() : nullptr;
  op.running_var = running != nullptr ? running->var.mutable_data_ptr<M>() : nullptr;
  op.num_batches_tracked =
      running != nullptr ? opt_mutable_ptr<int64_t>(running->num_batches_tracked) : nullptr;
  op.momentum = running != nullptr ? running->momentum.value() : 0.0;
  return op;
}

// kEvalDx: `dx` is eval's grad_input, which the reduction writes (GradOp).
template <typename T, bool kEvalDx = false>
GradOp<T, kEvalDx> grad_op(const Geometry& g, const Tensor& mean, const Tensor& var,
                           const Tensor& weight, double eps, const Tensor& sum_dy,
                           const Tensor& sum_dy_xmu, const Tensor& grad_weight,
                           const Tensor& grad_bias, const Tensor& coef,
                           const Tensor& dx = Tensor()) {
  using M = math_t<T>;
  TORCH_INTERNAL_ASSERT(kEvalDx == dx.defined());
  GradOp<T, kEvalDx> op;
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
  op.dx = opt_mutable_ptr<T>(dx);
  return op;
}

// The shifts (center()) of channels first .. first + here - 1 (here <= width <= kThreads) into
// shifts[0, here), once their 8 groups of samples are staged in groups[kShiftGroups * width]
// (sampled shifts): one thread a channel adds them as center() does, so the bits are center()'s
// with the loads spread over the block. Every thread of the block calls it (one or two barriers).
template <typename Op, typename M>
__device__ __forceinline__ void add_staged_shifts(const Op& op, int64_t first, int width, int here,
                                                  int tid, const M* groups, M* shifts) {
  if constexpr (Op::kSampledShift) {
    __syncthreads();
    if (tid < here) {
      M g[kShiftGroups];
#pragma unroll
      for (int i = 0; i < kShiftGroups; ++i) g[i] = groups[i * width + tid];
      shifts[tid] = add_shift_groups(g);
    }
  } else {
    if (tid < here) shifts[tid] = op.center(first + tid);
  }
  __syncthreads();
}

// The shift of channel c (contiguous: one channel a block) into *shift: threads 0-7 each load and
// add one of its groups of samples (StatsOp::load_shift_group), tid being a thread's index in
// the block. Every thread of the block calls it.
template <typename Op, typename M>
__device__ __forceinline__ void channel_shift(const Op& op, int64_t c, int tid, M* groups,
                                              M* shift) {
  if constexpr (Op::kSampledShift) {
    if (tid < kShiftGroups) {
      M v[4];
      op.load_shift_group(c, tid, v);
      groups[tid] = Op::add_shift_group(v);
    }
  }
  add_staged_shifts(op, c, 1, 1, tid, groups, shift);
}

// The shifts of a channels-last tile (blocks (bx, by) over rows of C, a thread's V channels from
// first + tx * V, `active` where they are in the tensor; tid = ty * bx + tx), loaded a row's
// vector at a time: block row ty < kShiftGroups adds group ty, the 4 sample rows' vectors of
// its V channels (4 loads in flight), each lane's 4 samples by add_shift_group. by >= 8, as
// bx <= 32. Loaded a channel's scalars at a time instead, a 16-bit tile as wide as the block
// (256 channels) had one thread a channel load 32 samples, in two dependent rounds. Every
// thread of the block calls it.
template <typename T, int V, typename Op, typename M>
__device__ __forceinline__ void tile_shifts_rows(const Op& op, int64_t first, int width, int here,
                                                 int tx, int ty, int tid, bool active,
                                                 M* groups, M* shifts) {
  if constexpr (Op::kSampledShift) {
    if (ty < kShiftGroups && active) {
      const int64_t c0 = first + static_cast<int64_t>(tx) * V;
      int64_t e[4];
      e[0] = op.samples.group_start(ty);
#pragma unroll
      for (int j = 1; j < 4; ++j) e[j] = op.samples.next(e[j - 1]);
      Vec<T, V> v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = load_vec<V>(op.x + op.samples.offset(e[j], c0));
#pragma unroll
      for (int w = 0; w < V; ++w) {
        const M lane[4] = {lane_value(v[0], w), lane_value(v[1], w), lane_value(v[2], w),
                           lane_value(v[3], w)};
        groups[ty * width + tx * V + w] = Op::add_shift_group(lane);
      }
    }
  }
  add_staged_shifts(op, first, width, here, tid, groups, shifts);
}

// A thread's V lane accumulators (a lane a vector element), all shifted by the channel's k0.
template <int V, typename M>
__device__ __forceinline__ void start_lanes(M k0, M (&k)[V], M (&a1)[V], M (&a2)[V]) {
#pragma unroll
  for (int w = 0; w < V; ++w) {
    k[w] = k0;
    a1[w] = 0;
    a2[w] = 0;
  }
}

// The same for a channels-last thread's V channels, each lane shifted by its channel's shift
// (shifts: the thread's V, from tile_shifts_rows), or by 0 where the thread has no channels.
template <int V, typename M>
__device__ __forceinline__ void start_tile_lanes(const M* shifts, bool active, M (&k)[V],
                                                 M (&a1)[V], M (&a2)[V]) {
#pragma unroll
  for (int w = 0; w < V; ++w) {
    k[w] = active ? shifts[w] : M(0);
    a1[w] = 0;
    a2[w] = 0;
  }
}

// The lanes of one channel merged in lane order.
template <int V, typename M>
__device__ __forceinline__ Sums<M> merge_lanes(const M (&a1)[V], const M (&a2)[V]) {
  Sums<M> s{a1[0], a2[0]};
#pragma unroll
  for (int w = 1; w < V; ++w) s = merge(s, Sums<M>{a1[w], a2[w]});
  return s;
}

// Lane w of a vector goes into pair w % L of the sums: a pair a lane (L = V, the kernels' usual
// choice), or one pair for every lane (L = 1: fewer registers, a longer chain of adds).
template <typename Op, int V, typename T, typename M, int L>
__device__ __forceinline__ void accumulate_vec(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                               const M (&k)[L], M (&a1)[L], M (&a2)[L]) {
  static_assert(L == V || L == 1, "a pair of sums a lane, or one pair");
#pragma unroll
  for (int w = 0; w < V; ++w) {
    Op::accumulate(lane_value(xv, w), Op::kNeedsDy ? lane_value(dv, w) : M(0), k[w % L],
                   a1[w % L], a2[w % L]);
  }
}

// accumulate_vec over the lanes w of a vector with rel + w < S only (unsigned: a rel that wrapped
// below 0 excludes the first lanes); the memory under the others is never read into the sums.
// (Feeding them x = k, dy = 0 instead would add 0 * (k - k), which is NaN when the center is
// +-inf: a float32 channel whose sum overflows.)
template <typename Op, int V, typename T, typename M, typename I, int L>
__device__ __forceinline__ void accumulate_vec_masked(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                                      I rel, I S, const M (&k)[L], M (&a1)[L],
                                                      M (&a2)[L]) {
  static_assert(L == V || L == 1, "a pair of sums a lane, or one pair");
#pragma unroll
  for (int w = 0; w < V; ++w) {
    if (rel + static_cast<I>(w) < S) {
      Op::accumulate(lane_value(xv, w), Op::kNeedsDy ? lane_value(dv, w) : M(0),
                     k[w % L], a1[w % L], a2[w % L]);
    }
  }
}

// The elementwise map of one vector of x (and of dy, for the backward) with its channel's
// coefficients, as finish() returns them (the kernels that map what they reduced).
template <typename Op, int V, typename T, typename M>
__device__ __forceinline__ Vec<T, V> map_vec(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                             const Coefs<M>& kc) {
  Vec<T, V> o;
#pragma unroll
  for (int w = 0; w < V; ++w) {
    const M xw = lane_value(xv, w);
    const M dw = Op::kNeedsDy ? lane_value(dv, w) : M(0);
    o.v[w] = static_cast<T>(elementwise_value<Op::kMap>(xw, dw, kc));
  }
  return o;
}

// The masked layout of a contiguous (N, C, S) channel whose runs of S elements do not start on a
// vector boundary (S % V != 0): run n's K = (S + 2V - 2) / V slots are the aligned vectors from
// the one holding its first element, their lanes outside the run masked (reduce_kernels.cu).
//
// Slot j (run j / K, slot j % K) of channel c in the masked layout: the aligned vector at o, and
// rel = o - b (modulo the index type's range) for the run's first element b, so that lane w is in
// the run where rel + w < S. A slot wholly past its run's end (runs that start late in a vector
// need one slot fewer) gets rel = S, no lane, and o at the run's first vector, whose load is
// harmless.
template <typename I>
struct MaskedSlot {
  I o;
  I rel;
};

template <int V, typename I>
__device__ __forceinline__ MaskedSlot<I> masked_slot(
    I j, I c, I C, I S, const at::cuda::detail::IntDivider<I>& per_run) {
  const auto qr = per_run.divmod(j);  // (n, slot)
  const I b = (qr.div * C + c) * S;   // the run's first element
  const I first = b & ~static_cast<I>(V - 1);
  const I o = first + qr.mod * V;
  return o < b + S ? MaskedSlot<I>{o, o - b} : MaskedSlot<I>{first, S};
}

// The slot's vector, whole where it ends within the tensor's `limit` elements; else (the
// tensor's last vector, when limit % V != 0) only the lanes in the run, so nothing past the end
// is read.
// 16-bit lanes are handled as packed 32-bit words on both paths, so that the two meet as words:
// gathered lane by lane, or joined as lanes, the vector was held as one register per lane through
// the rest of the kernel (ptxas, sm_90, the one-block fp16 backward, masked: 102-103 registers
// built lane by lane, 74 with the tail gathered as words, 70-71 with both paths as words).
template <int V, typename T, typename I>
__device__ __forceinline__ Vec<T, V> load_masked(const T* __restrict__ p, const MaskedSlot<I>& m,
                                                 I S, I limit) {
  if constexpr (sizeof(T) == 2 && V % 2 == 0) {
    uint32_t words[V / 2] = {};
    if (m.o + V <= limit) {
      const Vec<T, V> whole = load_vec<V>(p + m.o);
      memcpy(words, &whole, sizeof(words));
    } else {
      const auto* bits = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
      for (int w = 0; w < V; ++w) {
        if (m.rel + static_cast<I>(w) < S) {
          words[w / 2] |= static_cast<uint32_t>(bits[m.o + w]) << (16 * (w % 2));
        }
      }
    }
    Vec<T, V> v;
    memcpy(&v, words, sizeof(words));
    return v;
  } else {
    if (m.o + V <= limit) return load_vec<V>(p + m.o);
    Vec<T, V> v{};
#pragma unroll
    for (int w = 0; w < V; ++w) {
      if (m.rel + static_cast<I>(w) < S) v.v[w] = p[m.o + w];
    }
    return v;
  }
}

// Stores the slot's lanes that lie in the run: one vector where they all do (rel <= S - V, which
// a rel that wrapped below 0 is not), else lane by lane.
template <int V, typename T, typename I>
__device__ __forceinline__ void store_masked(T* __restrict__ p, const MaskedSlot<I>& m, I S,
                                             const Vec<T, V>& v) {
  if (S >= static_cast<I>(V) && m.rel <= S - static_cast<I>(V)) {
    store_vec<V>(p + m.o, v);
  } else {
#pragma unroll
    for (int w = 0; w < V; ++w) {
      if (m.rel + static_cast<I>(w) < S) p[m.o + w] = v.v[w];
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
