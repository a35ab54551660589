// Elementwise kernels (forward normalize, backward input) and the small per-channel kernels
// (coefficients, running-statistics update).
//
// Elementwise: a flat grid-stride loop over the tensor in vectors of V elements (128 bits when
// every pointer is 16-byte aligned, else 1), 1-D blocks of kThreads, at most 32 blocks per SM.
// The channel of flat element e is (e / run) % C with run = S (contiguous) or 1 (channels-last),
// found once per vector with fast 32-bit division; within the vector the position is stepped, so
// a vector may straddle runs and any S or C vectorizes. Coefficients are reloaded (from L1) only
// when the channel changes. The last numel % V elements are done by the first threads, scalar.
//
// Channels-last rows of whole 128-bit vectors, at least 128 bytes long, go to a 2-D kernel
// instead (elementwise_rows_kernel): there the flat loop meets a new channel at every element,
// and its reloads, 3 (forward) or 4 (backward) per element with a warp's lanes V channels
// apart, would occupy the load units far longer than the pass's own memory traffic (a warp's
// coefficient load of bf16 rows touches 8 lines for 128 useful bytes: ~24 such loads for 512
// bytes of input). A thread of the 2-D kernel keeps one vector of channels, and their
// coefficients in registers, for all the rows it visits; the values, and so the bits, are the
// flat kernel's.
//
// Sweep direction (BN_EXT_CUDA_REVERSE_MAP=1, an experiment, off by default until a GPU has
// timed it; training maps only). A training map follows its op's reduction, which swept the
// input from its start to its end (all its blocks in one wave, each striding over its rows or
// runs), so when the map starts the last megabytes it read are the ones still in L2. A map that
// sweeps forward evicts them before it gets there; one that sweeps backward (one wave of blocks,
// vector i taken as nv - 1 - i, row r as rows - 1 - r; the flat kernel's scalar tail stays where
// it is) reads them first. Up to the L2's size (50 MB on an H100) of the map's input then comes
// from L2 rather than memory: 205 MB of x and dy in the 32x256x56x56 float32 backward's map,
// 25.7 MB in all in the 32x64x56x56 fp16 one.
// The same values and bits either way: each element's result depends on nothing else.
//
// Per-channel coefficients:
//   forward  (mu | alpha | beta):  y  = (x - mu) * alpha + beta,  alpha = w * invstd, beta = b.
//            The centred form keeps mean * alpha from rounding at a large magnitude.
//   backward (mu | a | b | d):     dx = dy * a + ((x - mu) * b + d)   (training)
//                                  dx = dy * a                        (eval; x is not read)
// A kernel reads them from a table (CoefTable, common.cuh): in training the reductions' finishing
// step writes it, once per channel in double. The eval maps instead derive theirs from the
// statistics as they go (EvalStats, in the math type), so that eval is one launch, as cuDNN's;
// map_plan and derives_coefs below choose the kernel and whether a table comes first.
#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace detail {
namespace {

// Whether a map reading its coefficients from Src may sweep backward: only the training maps
// do (a table), so the eval maps that derive theirs keep the registers the choice would take
// (in the 16-bit rows kernel, enough to spill).
template <typename Src>
constexpr bool kMayReverse = !Src::kDerives;

template <typename T, Elementwise kOp, typename I, int W, typename Src>
__device__ __forceinline__ void elementwise_at(I e, const T* __restrict__ x,
                                               const T* __restrict__ dy, T* __restrict__ out,
                                               const Src& src, I C,
                                               const at::cuda::detail::IntDivider<I>& per_run,
                                               const at::cuda::detail::IntDivider<I>& per_c) {
  using M = math_t<T>;
  constexpr bool kReadsX = kOp != Elementwise::kBackwardEval;
  constexpr bool kReadsDy = kOp != Elementwise::kForward;
  const auto qr = per_run.divmod(e);
  I s = qr.mod;
  I c = per_c.mod(qr.div);
  const I run = per_run.divisor;
  Vec<T, W> xv, gv, ov;
  if constexpr (kReadsX) xv = load_vec<W>(x + e);
  if constexpr (kReadsDy) gv = load_vec<W>(dy + e);
  if constexpr (Src::kDerives) {
    // run >= W (derives_coefs): the vector meets at most one new channel, at w = run - s, so
    // the (costlier) derivation is written twice, not once per element.
    const I left = run - s;  // elements of channel c from e on
    const Coefs<M> k0 = src.template at<kOp>(C, c);
    Coefs<M> k1 = k0;
    if (left < static_cast<I>(W)) k1 = src.template at<kOp>(C, c + 1 == C ? I(0) : c + 1);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const M xw = kReadsX ? lane_value(xv, w) : M(0);
      const M dw = kReadsDy ? lane_value(gv, w) : M(0);
      ov.v[w] = static_cast<T>(
          elementwise_value<kOp>(xw, dw, static_cast<I>(w) < left ? k0 : k1));
    }
  } else {
    I cached = C;  // no channel
    Coefs<M> k{0, 0, 0, 0};
#pragma unroll
    for (int w = 0; w < W; ++w) {
      if (c != cached) {
        cached = c;
        k = src.template at<kOp>(C, c);
      }
      const M xw = kReadsX ? lane_value(xv, w) : M(0);
      const M dw = kReadsDy ? lane_value(gv, w) : M(0);
      ov.v[w] = static_cast<T>(elementwise_value<kOp>(xw, dw, k));
      if (++s == run) {
        s = 0;
        c = c + 1 == C ? I(0) : c + 1;
      }
    }
  }
  store_vec<W>(out + e, ov);
}

template <typename T, Elementwise kOp, typename I, int V, typename Src>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                       const Src src, I numel, I C,
                       at::cuda::detail::IntDivider<I> per_run,
                       at::cuda::detail::IntDivider<I> per_c, bool reverse) {
  wait_for_prior_grid();  // the table (a training map may start early: launch_map)
  const I nv = numel / V;
  const I tid = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x;
  const I step = static_cast<I>(gridDim.x) * kThreads;
  const bool back = kMayReverse<Src> && reverse;
  for (I i = tid; i < nv; i += step) {
    const I v = back ? nv - 1 - i : i;
    elementwise_at<T, kOp, I, V>(v * V, x, dy, out, src, C, per_run, per_c);
  }
  if constexpr (V > 1) {
    const I done = nv * V;
    if (tid < numel - done) {
      elementwise_at<T, kOp, I, 1>(done + tid, x, dy, out, src, C, per_run, per_c);
    }
  }
}

// BN_EXT_CUDA_NARROW_ROWS=1 (read on every call; an experiment, off by default until a GPU has
// timed it): the 16-bit training backward's rows map takes 8-byte vectors, 4 channels a thread,
// and 4 rows of x and dy in flight, where the 16-byte one takes 8 channels and one row (its 32
// coefficients leave no room for more). sm_90 (nvcc 13.0): 47-48 registers, 5 blocks an SM and
// 64 bytes in flight a thread, against 58-59, 4 blocks and 32 bytes: 80 KB an SM against 32 KB.
// The flat map (NCHW) keeps 64 KB an SM in flight; on the first H100 lease the channels-last
// 16-bit backwards took about 13% longer per byte than the NCHW ones (a fit of time against
// size over 32x64x56x56 and 32x256x56x56) and trailed cuDNN (0.83-0.90x). Same values and bits.
template <typename T, Elementwise kOp>
constexpr bool kNarrowRows = sizeof(T) == 2 && kOp == Elementwise::kBackwardTrain;

bool narrow_rows() { return env_is("BN_EXT_CUDA_NARROW_ROWS", "1"); }

// Channels-last, C % V == 0: blocks (bx, by), bx * by = kThreads; thread (tx, ty) of block
// (i, j) maps channels c0 .. c0 + V - 1, c0 = (i * bx + tx) * V, of rows j * by + ty, stepping
// gridDim.y * by (the layout of reduce_channels_last_kernel). A warp reads whole row segments.
// A thread's coefficients (up to 4V loads, and for eval V square roots) are made once and serve
// its rows, loaded U at a time (64 bytes of input in flight) and the first U issued before the
// coefficients: with one row a thread, as the grid once had for (4096, 1024), they took longer
// than the row itself. The training backward loads two rows of dy and x at a time, and one in
// 16-bit types, whose 8 channels' 32 coefficients leave no room for more in the 64 registers
// ptxas gives these kernels on sm_80: two rows spilled there; four with 8-byte vectors (4
// channels; BN_EXT_CUDA_NARROW_ROWS=1, above).

template <typename T, Elementwise kOp, typename I, int V, typename Src>
__global__ void __launch_bounds__(kThreads)
    elementwise_rows_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                            const Src src, I rows, I C, bool reverse) {
  using M = math_t<T>;
  constexpr bool kReadsX = kOp != Elementwise::kBackwardEval;
  constexpr bool kReadsDy = kOp != Elementwise::kForward;
  constexpr int U = !(kReadsX && kReadsDy) ? 4 : sizeof(T) != 2 ? 2 : V == 8 ? 1 : 4;
  const I c0 = (static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;  // the last column block's spare lanes (no barrier follows)
  const I step = static_cast<I>(gridDim.y) * blockDim.y;
  I r = static_cast<I>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  Vec<T, V> xv[U], gv[U];
  // Where sweep row ru lies: row ru, or (reverse) rows - 1 - ru.
  const bool back = kMayReverse<Src> && reverse;
  const auto at = [&](I ru) { return (back ? rows - 1 - ru : ru) * C + c0; };
  // Rows r, r + step, ... r + (U - 1) * step, those below `rows`.
  const auto load = [&](I r0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I ru = r0 + static_cast<I>(u) * step;
      if (ru < rows) {
        if constexpr (kReadsX) xv[u] = load_vec<V>(x + at(ru));
        if constexpr (kReadsDy) gv[u] = load_vec<V>(dy + at(ru));
      }
    }
  };
  load(r);
  // A training map may start before the kernel that wrote its table has ended (launch_map); x and
  // dy were whole before that kernel started, so only the table waits.
  wait_for_prior_grid();
  Coefs<M> k[V];
#pragma unroll
  for (int w = 0; w < V; ++w) k[w] = src.template at<kOp>(C, static_cast<I>(c0 + w));
  while (true) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I ru = r + static_cast<I>(u) * step;
      if (ru < rows) {
        Vec<T, V> ov;
#pragma unroll
        for (int w = 0; w < V; ++w) {
          const M xw = kReadsX ? lane_value(xv[u], w) : M(0);
          const M dw = kReadsDy ? lane_value(gv[u], w) : M(0);
          ov.v[w] = static_cast<T>(elementwise_value<kOp>(xw, dw, k[w]));
        }
        store_vec<V>(out + at(ru), ov);
      }
    }
    // On while r + U * step < rows, written so that nothing wraps around in an unsigned I.
    if (static_cast<I>(U) * step >= rows || r >= rows - static_cast<I>(U) * step) break;
    r += static_cast<I>(U) * step;
    load(r);
  }
}

// coef = (mu | alpha | beta), EvalStats' forward coefficients for every channel.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    forward_coefs_kernel(const EvalStats<M> stats, int64_t C, M* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const Coefs<M> k = stats.template at<Elementwise::kForward>(C, c);
  coef[c] = k.mu;
  coef[C + c] = k.p1;
  coef[2 * C + c] = k.p2;
}

// The training backward's: a = w * invstd, b = -a * invstd^2 * sum_dy_xmu / n,
// d = -a * sum_dy / n, in double with n = *count read here on the device.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    backward_coefs_kernel(const M* __restrict__ mean, const M* __restrict__ var,
                          const M* __restrict__ weight, const M* __restrict__ sum_dy,
                          const M* __restrict__ sum_dy_xmu, const M* __restrict__ count,
                          double eps, int64_t C, M* __restrict__ coef) {
  allow_dependents();  // the map after it (a dependent launch)
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
  const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
  const double a = w * invstd;
  const double n = static_cast<double>(*count);
  coef[c] = mean[c];
  coef[C + c] = static_cast<M>(a);
  coef[2 * C + c] = static_cast<M>(-a * invstd * invstd * static_cast<double>(sum_dy_xmu[c]) / n);
  coef[3 * C + c] = static_cast<M>(-a * static_cast<double>(sum_dy[c]) / n);
}

// One block. num_batches_tracked += 1 (when given) and the momentum m = 1 / num_batches_tracked
// (momentum None) are both done here, so nothing is read back to the host: every thread reads the
// old count, the block synchronises, and then thread 0 writes the new one.
//   running_mean = (1 - m) * running_mean + m * mean
//   running_var  = (1 - m) * running_var  + m * var * n / (n - 1),
// n = *count, or n_host where count is nullptr.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    running_stats_kernel(M* __restrict__ running_mean, M* __restrict__ running_var,
                         int64_t* __restrict__ num_batches_tracked, const M* __restrict__ mean,
                         const M* __restrict__ var, const M* __restrict__ count, double n_host,
                         bool has_momentum, double momentum, int64_t C) {
  int64_t tracked = 1;
  if (num_batches_tracked != nullptr) tracked = *num_batches_tracked + 1;
  __syncthreads();
  if (num_batches_tracked != nullptr && threadIdx.x == 0) *num_batches_tracked = tracked;
  const double m = has_momentum ? momentum : 1.0 / static_cast<double>(tracked);
  const double n = count != nullptr ? static_cast<double>(*count) : n_host;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    blend_running_stats(running_mean[c], running_var[c], mean[c], var[c], m, n / (n - 1));
  }
}

#define BN_EXT_CUDA_DISPATCH_MATH(scalar_type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES(scalar_type, name, __VA_ARGS__)

// f(std::integral_constant<Elementwise, op>{}): the runtime op as a template argument. With
// kEvalOnly, only the ops EvalStats can feed are instantiated.
template <bool kEvalOnly = false, typename F>
void dispatch_op(Elementwise op, const F& f) {
  using E = Elementwise;
  switch (op) {
    case E::kForward:
      f(std::integral_constant<E, E::kForward>{});
      break;
    case E::kBackwardTrain:
      if constexpr (!kEvalOnly) f(std::integral_constant<E, E::kBackwardTrain>{});
      break;
    case E::kBackwardEval:
      f(std::integral_constant<E, E::kBackwardEval>{});
      break;
  }
}

template <typename M>
EvalStats<M> eval_stats(const Tensor& mean, const Tensor& var, const Tensor& weight,
                        const Tensor& bias, double eps) {
  return EvalStats<M>{mean.const_data_ptr<M>(), var.const_data_ptr<M>(), opt_ptr<M>(weight),
                      opt_ptr<M>(bias), static_cast<M>(eps)};
}

// How the elementwise map covers a tensor, decided here for both launchers: channels-last rows
// of whole 128-bit vectors, at least 128 bytes long, by the 2-D rows kernel; everything else by
// the flat kernel, in 128-bit vectors where every pointer is 16-byte aligned. `run` is the flat
// kernel's run of one channel (S contiguous, 1 channels-last).
struct MapPlan {
  bool by_rows;
  bool vectorize;
  int64_t run;
};

template <typename T>
MapPlan map_plan(const T* x, const T* dy, const T* out, const Geometry& g) {
  const bool aligned = is_aligned16(out) && (x == nullptr || is_aligned16(x)) &&
                       (dy == nullptr || is_aligned16(dy));
  const bool by_rows = g.layout == Layout::kChannelsLast && aligned && g.C % kMaxVec<T> == 0 &&
                       g.C * static_cast<int64_t>(sizeof(T)) >= 128;
  return MapPlan{by_rows, aligned, g.layout == Layout::kContiguous ? g.S : 1};
}

// Whether the kernels should derive eval coefficients themselves: the rows kernel does so once
// per thread; the flat kernel once per vector, and twice where a vector straddles two runs, so
// only with whole vectors and runs at least a vector long (a division and a square root per
// 16 bytes of input, far below the memory time). Otherwise a table first.
template <typename T>
bool derives_coefs(const MapPlan& plan) {
  return plan.by_rows || (plan.vectorize && plan.run >= kMaxVec<T>);
}

// `reverse`: sweep from the end (training maps under BN_EXT_CUDA_REVERSE_MAP=1, above), in one
// wave of blocks (the rows kernel's grid always is one; the flat kernel's is otherwise up to 4).
template <typename T, bool kEvalOnly, typename Src>
void launch_map(Elementwise op, const T* xp, const T* dyp, T* outp, const Geometry& g,
                const MapPlan& plan, int64_t numel, const Src& src, bool reverse = false) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VM = kMaxVec<T>;
  // A training map (launch_elementwise) comes right after a kernel of its op's that writes its
  // table (a reduction, the finalize pass, or the backward coefficients), launched in stream
  // order; with dependent launches on (the default) it may start before that one ends. An eval
  // map may follow the kernel that wrote its input, so it never does.
  const bool overlap = !kEvalOnly && dependent_launch_on();
  // The index type must also hold the coefficient offsets, up to 4 * C.
  dispatch_index(std::max<int64_t>(numel, 4 * g.C), [&](auto itag) {
    using I = decltype(itag);
    if (plan.by_rows) {
      const int64_t rows = numel / g.C;
      dispatch_op<kEvalOnly>(op, [&](auto otag) {
        constexpr Elementwise kOp = decltype(otag)::value;
        const auto launch_rows = [&](auto vtag) {
          constexpr int V = decltype(vtag)::value;
          const int64_t cv = g.C / V;  // channel vectors per row
          const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cv)));
          const int by = kThreads / bx;
          const int64_t blocks_x = ceil_div(cv, bx);
          const auto kernel = elementwise_rows_kernel<T, kOp, I, V, Src>;
          static std::array<std::atomic<int>, 64> occupancy{};
          // One wave of resident blocks, or fewer where the rows run out first.
          const int64_t resident = resident_per_sm(kernel, occupancy) * sm_count();
          const int64_t blocks_y = std::max<int64_t>(
              1, std::min({ceil_div(rows, by), ceil_div(resident, blocks_x), int64_t{65535}}));
          launch_after(overlap, kernel,
                       dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y)),
                       dim3(bx, by), stream, xp, dyp, outp, src, static_cast<I>(rows),
                       static_cast<I>(g.C), reverse);
        };
        if constexpr (kNarrowRows<T, kOp>) {
          if (narrow_rows()) {
            launch_rows(std::integral_constant<int, VM / 2>{});
            return;
          }
        }
        launch_rows(std::integral_constant<int, VM>{});
      });
      return;
    }
    const at::cuda::detail::IntDivider<I> per_run(static_cast<I>(plan.run));
    const at::cuda::detail::IntDivider<I> per_c(static_cast<I>(g.C));
    const auto flat = [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      const int64_t nv = numel / V;
      dispatch_op<kEvalOnly>(op, [&](auto otag) {
        const auto kernel = elementwise_kernel<T, decltype(otag)::value, I, V, Src>;
        static std::array<std::atomic<int>, 64> occupancy{};  // this kernel's (op's) own
        const int64_t wave =
            reverse ? resident_per_sm(kernel, occupancy) * sm_count() : sm_count() * 32;
        const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nv, kThreads), wave));
        launch_after(overlap, kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                     stream, xp, dyp, outp, src, static_cast<I>(numel), static_cast<I>(g.C),
                     per_run, per_c, reverse);
      });
    };
    if constexpr (Src::kDerives) {  // derives_coefs: whole vectors only
      TORCH_INTERNAL_ASSERT(plan.vectorize);
      flat(std::integral_constant<int, VM>{});
    } else {
      dispatch_vec<T>(plan.vectorize, flat);
    }
  });
}

}  // namespace

bool reverse_map() { return env_is("BN_EXT_CUDA_REVERSE_MAP", "1"); }

bool dependent_launch_on() {
  if (env_is("BN_EXT_CUDA_PDL", "0")) return false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  static std::array<std::atomic<int>, 64> ptx{};  // the kernels' PTX version, per device
  return per_device(ptx, [] {
           cudaFuncAttributes attr;
           C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, backward_coefs_kernel<float>));
           return attr.ptxVersion;
         }) >= 90;
}

void launch_forward_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                          const Tensor& bias, double eps, const Tensor& coef) {
  const int64_t C = mean.numel();
  if (C == 0) return;
  BN_EXT_CUDA_DISPATCH_MATH(mean.scalar_type(), "bn_ext::cuda::forward_coefs", [&] {
    forward_coefs_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            eval_stats<scalar_t>(mean, var, weight, bias, eps), C,
            coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                           const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& count,
                           double eps, const Tensor& coef) {
  const int64_t C = mean.numel();
  if (C == 0) return;
  BN_EXT_CUDA_DISPATCH_MATH(mean.scalar_type(), "bn_ext::cuda::backward_coefs", [&] {
    backward_coefs_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
            opt_ptr<scalar_t>(weight), sum_dy.const_data_ptr<scalar_t>(),
            sum_dy_xmu.const_data_ptr<scalar_t>(), count.const_data_ptr<scalar_t>(), eps, C,
            coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_elementwise(Elementwise op, const Tensor& x, const Tensor& dy, const Geometry& g,
                        const Tensor& coef, const Tensor& out) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  BN_EXT_CUDA_DISPATCH(out.scalar_type(), "bn_ext::cuda::elementwise", [&] {
    using T = scalar_t;
    const T* xp = op != Elementwise::kBackwardEval ? x.const_data_ptr<T>() : nullptr;
    const T* dyp = op != Elementwise::kForward ? dy.const_data_ptr<T>() : nullptr;
    T* outp = out.mutable_data_ptr<T>();
    launch_map<T, false>(op, xp, dyp, outp, g, map_plan(xp, dyp, outp, g), numel,
                         CoefTable<math_t<T>>{coef.const_data_ptr<math_t<T>>()},
                         reverse_map());
  });
}

void launch_eval_elementwise(Elementwise op, const Tensor& x, const Tensor& dy,
                             const Geometry& g, const Tensor& mean, const Tensor& var,
                             const Tensor& weight, const Tensor& bias, double eps,
                             const Tensor& out) {
  TORCH_INTERNAL_ASSERT(op != Elementwise::kBackwardTrain);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  BN_EXT_CUDA_DISPATCH(out.scalar_type(), "bn_ext::cuda::eval_elementwise", [&] {
    using T = scalar_t;
    using M = math_t<T>;
    const bool forward = op == Elementwise::kForward;
    const T* xp = forward ? x.const_data_ptr<T>() : nullptr;
    const T* dyp = forward ? nullptr : dy.const_data_ptr<T>();
    T* outp = out.mutable_data_ptr<T>();
    const MapPlan plan = map_plan(xp, dyp, outp, g);
    if (derives_coefs<T>(plan)) {
      launch_map<T, true>(op, xp, dyp, outp, g, plan, numel,
                          eval_stats<M>(mean, var, weight, bias, eps));
      return;
    }
    // The forward table serves the eval backward too: its p1 is the same w * invstd, the only
    // field kBackwardEval reads.
    const Tensor coef = at::empty({3 * g.C}, mean.options());
    launch_forward_coefs(mean, var, weight, bias, eps, coef);
    launch_map<T, true>(op, xp, dyp, outp, g, plan, numel, CoefTable<M>{coef.const_data_ptr<M>()});
  });
}

void launch_running_stats_update(const Tensor& running_mean, const Tensor& running_var,
                                 const Tensor& num_batches_tracked, const Tensor& mean,
                                 const Tensor& var, const Tensor& count, double n,
                                 c10::optional<double> momentum) {
  const int64_t C = mean.numel();
  BN_EXT_CUDA_DISPATCH_MATH(mean.scalar_type(), "bn_ext::cuda::running_stats_update", [&] {
    running_stats_kernel<scalar_t><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
        opt_mutable_ptr<int64_t>(num_batches_tracked), mean.const_data_ptr<scalar_t>(),
        var.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(count), n, momentum.has_value(),
        momentum.value_or(0.0), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
